"""CI miniature of ``benchmarks/accuracy.py``: a tiny setting, three strategies, one seed, two
rounds on a real local Ray. Checks the harness end to end (runs, selection, report, plots,
resume from the partial file), not accuracy levels."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from ..conftest import REPO

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def acc():
    spec = importlib.util.spec_from_file_location("fedbip_bench_accuracy",
                                                  REPO / "benchmarks" / "accuracy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_strategy_specs_with_list_values(acc):
    assert acc.parse_strategy("fedbip") == ("fedbip", {})
    assert acc.parse_strategy("fedbip[gate=[];top_k=3]") == ("fedbip", {"gate": [], "top_k": 3})
    assert acc.parse_strategy("fedbip[gate=[1.0, 0.0]]") == ("fedbip", {"gate": [1.0, 0.0]})
    with pytest.raises(ValueError, match="closing"):
        acc.parse_strategy("fedbip[gate=1")


def test_selection_uses_validation_only(acc):
    rows = [{"round": 1, "mean_accuracy": 0.9, "worst10_accuracy": 0.8, "mean_val_accuracy": 0.5},
            {"round": 2, "mean_accuracy": 0.6, "worst10_accuracy": 0.5, "mean_val_accuracy": 0.7},
            {"round": 3, "mean_accuracy": None, "worst10_accuracy": None,
             "mean_val_accuracy": None}]
    sel = acc.select(rows)
    assert sel["selected_round"] == 2 and sel["mean"] == 0.6 and sel["val"] == 0.7
    assert sel["final_mean"] == 0.6 and sel["rounds_to_95"] == 1  # round 1 already >= 0.95 x final


def test_miniature_run_writes_tables_plots_and_resumes(acc, ray_local, tmp_path):
    out = tmp_path / "acc.md"
    args = ["--settings", "tiny-conflict", "--seeds", "0", "--strategies", "local,fedbip,oracle",
            "--set", "federation.rounds=2", "--set", "data.examples_per_client=40",
            "--out", str(out), "--workdir", str(tmp_path / "runs")]
    assert acc.main(args) == 0
    text = out.read_text()
    results = json.loads(out.with_suffix(".json").read_text())
    assert sorted(r["strategy"] for r in results) == ["fedbip", "local", "oracle"]
    for r in results:
        assert 0 <= r["mean"] <= 1 and 0 <= r["worst10"] <= r["mean"] + 1e-9
        assert r["selected_round"] in (1, 2) and 0 <= r["val"] <= 1
        assert [c[0] for c in r["curve"]] == [1, 2]
    fedbip = next(r for r in results if r["strategy"] == "fedbip")
    assert 0 <= fedbip["group_share"] <= 1 and "ari" in fedbip  # groups are known here
    assert "### Goals (fedbip" in text and "| tiny-conflict | " in text
    assert text.count("| fedbip | 1 |") == 1 and "| oracle | 1 |" in text
    local = next(r for r in results if r["strategy"] == "local")
    assert set(fedbip["per_client"]) == set(local["test_n"]) and min(local["test_n"].values()) > 0
    assert "### Clients: fedbip against local, one by one" in text
    assert (tmp_path / "acc_tiny-conflict.png").stat().st_size > 1000
    assert not out.with_suffix(".partial.jsonl").exists()  # completed runs leave no partial file
    # an interrupted benchmark resumes from its partial file without rerunning what it holds
    partial = out.with_suffix(".partial.jsonl")
    partial.write_text("".join(json.dumps(r) + "\n" for r in results))
    assert acc.main(args + ["--report-only"]) == 0
    assert json.loads(out.with_suffix(".json").read_text()) == results


def test_goals_compare_with_the_best_2023_2025_peer(acc):
    def res(strategy, mean, seed=0):
        return {"setting": "s", "strategy": strategy, "seed": seed, "mean": mean,
                "worst10": mean - 0.1, "rounds_to_95": 1.0}
    results = [res("fedbip", 0.80), res("fedbip", 0.70, 1), res("local", 0.70),
               res("fedavg", 0.50), res("fedsa-lora", 0.72), res("fedawa", 0.78),
               res("oracle", 0.74)]
    row = next(x for x in acc.goal_lines(results, ["s"]) if x.startswith("| s |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:7] == ["s", "2", "0.750", "local 0.700", "+0.050", "fedawa 0.780", "-0.030"]
    assert cells[7] == "+0.010"  # vs oracle


def test_paired_table_differences_only_over_shared_seeds(acc):
    def res(strategy, seed, mean, val=None):
        return {"setting": "s", "strategy": strategy, "seed": seed, "mean": mean,
                "worst10": mean - 0.2, "val": val}
    results = [res("fedbip", 0, 0.80, 0.7), res("fedbip", 1, 0.60, 0.6), res("fedbip", 2, 0.9),
               res("local", 0, 0.70, 0.5), res("local", 1, 0.65, 0.5),
               res("fedawa", 2, 0.95), res("other-setting", 0, 0.1) | {"setting": "t"}]
    lines = acc.paired_table(results, "s")
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
            for r in lines if r.startswith("| ") and not r.startswith("| strategy")}
    assert set(rows) == {"local", "fedawa"}
    # local: seeds 0, 1 -> +0.10 and -0.05; val +0.2 and +0.1
    assert rows["local"][1:] == ["2", "+0.025 ± 0.075", "+0.025 ± 0.075", "+0.150 ± 0.050", "1/2"]
    # fedawa: only seed 2, whose val is missing on both sides
    assert rows["fedawa"][1:] == ["1", "-0.050 ± 0.000", "-0.050 ± 0.000", "n/a", "0/1"]


def test_client_gaps_count_losses_beyond_each_clients_noise(acc):
    def res(strategy, seed, per_client, n):
        return {"setting": "s", "strategy": strategy, "seed": seed, "per_client": per_client,
                "test_n": n}
    n = {"0": 100, "1": 100, "2": 25}
    results = [res("fedbip", 0, {"0": 0.5, "1": 0.9, "2": 1.0}, n),
               res("local", 0, {"0": 0.6, "1": 0.9, "2": 0.8}, n),
               res("fedbip", 1, {"0": 0.7}, {"0": 100}),  # no local run of seed 1: left out
               res("local", 2, {"0": 0.7}, {"0": 100})]
    gaps = acc.client_gaps(results, "s", "fedbip")
    assert [(g.seed, g.client) for g in gaps] == [(0, "0"), (0, "1"), (0, "2")]
    # client 0: -0.1, SE sqrt((0.25 + 0.24) / 100) = 0.07 -> below by > 1 SE, not by > 2 SE
    assert abs(gaps[0].diff + 0.1) < 1e-12 and abs(gaps[0].se - 0.07) < 1e-12
    row = next(x for x in acc.client_gap_lines(results, ["s"]) if x.startswith("| s |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["s", "1", "3", "+0.033"]
    assert cells[4].startswith("-0.100 (client 0, seed 0, n=100, SE 0.070)")
    assert cells[5:] == ["1", "0"]
    assert acc.client_gap_lines(results, ["s"], reference="fedavg") == []
