"""The classifier evaluation's scores, against per-example losses computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedbip_ray.training.loops import classification_eval


def test_classification_eval_reports_accuracy_mean_loss_and_its_spread():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(7, 3), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # uneven batches sum to the same totals
    got = classification_eval(model, batches, lambda inp: model(inp), n=7)
    with torch.no_grad():
        logits = model(x).numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    per = -logp[np.arange(7), y.numpy()]
    assert got["n"] == 7
    assert got["accuracy"] == pytest.approx(float((logits.argmax(1) == y.numpy()).mean()))
    assert got["loss"] == pytest.approx(per.mean(), rel=1e-5)
    assert got["loss_sd"] == pytest.approx(per.std(), rel=1e-4)  # population sd, as the gate's se


def test_empty_split_scores_are_nan():
    got = classification_eval(torch.nn.Linear(3, 2), [], lambda inp: inp, n=0)
    assert got["n"] == 0 and math.isnan(got["accuracy"]) and "loss_sd" not in got
