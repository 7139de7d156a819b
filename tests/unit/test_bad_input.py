"""Bad input through the real `fedbip` CLI: every case exits 2 with ONE line on stderr naming
the problem, and no traceback. Cases that get as far as Ray share the session's local Ray."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedbip_ray.cli import main
from fedbip_ray.config import config_from_dict
from fedbip_ray.runtime import checkpoint

from ..conftest import REPO, tiny_config


def _base(**sections) -> dict:
    return tiny_config(**sections)


@dataclass(frozen=True)
class Case:
    """``cfg``: the YAML written to ``c.yaml`` (None: ``files`` writes it); ``args`` after
    ``run`` with ``{tmp}`` replaced; ``files(tmp)`` prepares extra files."""

    id: str
    needle: str
    cfg: dict | None = field(default_factory=_base)
    args: tuple[str, ...] = ("{tmp}/c.yaml", "--output", "{tmp}/out")
    files: Callable[[Path], None] | None = None
    ray: bool = False

    def argv(self, tmp: Path) -> list[str]:
        if self.cfg is not None:
            (tmp / "c.yaml").write_text(yaml.safe_dump(self.cfg))
        if self.files is not None:
            self.files(tmp)
        return ["run", *(a.replace("{tmp}", str(tmp)) for a in self.args)]


def _sets(*overrides: str) -> tuple[str, ...]:
    return ("{tmp}/c.yaml", "--output", "{tmp}/out", *(x for o in overrides for x in ("--set", o)))


def _csv(tmp: Path) -> None:
    (tmp / "reviews.csv").write_text("text,stars\ngreat film,5\nawful film,1\n" * 20)


def _text(name: str, content: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / name).write_text(content)
    return write


def _bytes(name: str, content: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / name).write_bytes(content)
    return write


def _run_dir(tmp: Path) -> Path:
    """A run directory with its config.yaml, as `fedbip run` leaves it."""
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_base()))
    return run


def _corrupt_checkpoint(tmp: Path) -> None:
    (_run_dir(tmp) / "checkpoints" / "latest.json").write_text("{truncated")


def _valid_checkpoint(tmp: Path) -> None:
    run = _run_dir(tmp)
    cfg = config_from_dict(_base())
    tensors = {"states": np.zeros((4, 2), np.float32), "init": np.zeros(2, np.float32)}
    layout = {"names": ["w"], "shapes": [[2]], "offsets": [0]}
    checkpoint.write_checkpoint(run / "checkpoints", 1, tensors, layout, [{"round": 1}],
                                cfg.to_dict())


def _empty_model_dir(tmp: Path) -> None:
    (tmp / "model").mkdir()


CASES = [
    Case("unknown-key", "config field 'bogus': unknown key", cfg=_base(bogus=1)),
    Case("unknown-nested-key", "config field 'federation.speed': unknown key",
         args=_sets("federation.speed=3")),
    Case("wrong-type", "config field 'federation.rounds'", args=_sets("federation.rounds=abc")),
    Case("negative-rounds", "federation.rounds': Input should be greater than or equal to 1",
         args=_sets("federation.rounds=-2")),
    Case("threshold-out-of-range", "threshold must be in [-1, 1]",
         args=_sets("strategy.params.threshold=1.5")),
    Case("unknown-strategy", "unknown strategy 'fedfoo'", args=_sets("strategy.name=fedfoo")),
    Case("unknown-strategy-param", "unknown parameter 'bogus' for strategy 'fedbip'",
         args=_sets("strategy.params.bogus=1")),
    Case("bad-strategy-param-value", "strategy.params: temperature",
         args=_sets("strategy.params.temperature=-1")),
    Case("missing-dataset-file", "data.path '/nonexistent/reviews.csv': file not found",
         args=_sets("data.dataset=file", "data.path=/nonexistent/reviews.csv")),
    Case("dataset-path-required", "data.path: required", args=_sets("data.dataset=file")),
    Case("missing-label-column", "data.label_column: column 'label' not in",
         args=_sets("data.dataset=file", "data.path={tmp}/reviews.csv"), files=_csv),
    Case("unsupported-data-format", "unsupported format",
         args=_sets("data.dataset=file", "data.path={tmp}/notes.txt"),
         files=_text("notes.txt", "x")),
    Case("unknown-dataset", "data.dataset: unknown dataset 'imagenet'",
         args=_sets("data.dataset=imagenet")),
    Case("more-clients-than-samples", "data.num_clients: 500 clients x 60 examples need 30000",
         args=_sets("data.num_clients=500")),
    Case("fractions-too-large", "val_fraction + test_fraction must be < 0.9",
         args=_sets("data.val_fraction=0.5", "data.test_fraction=0.5")),
    Case("clients-per-round-too-many", "clients_per_round (9) exceeds data.num_clients (4)",
         args=_sets("federation.clients_per_round=9")),
    Case("min-report-zero", "federation.min_report_fraction",
         args=_sets("federation.min_report_fraction=0")),
    Case("bad-excess-norm-policy", "federation.updates.on_excess_norm",
         args=_sets("federation.updates.on_excess_norm=ignore")),
    Case("negative-noise", "privacy.noise_multiplier",
         args=_sets("privacy.clip_norm=1", "privacy.noise_multiplier=-1")),
    Case("bad-set-syntax", "override 'federation.rounds': expected dotted.key=value",
         args=_sets("federation.rounds")),
    Case("bad-set-yaml", "value is not valid YAML",
         args=_sets("model.peft.target_modules=[query,")),
    Case("invalid-yaml", ": invalid YAML", cfg=None,
         files=_text("c.yaml", "name: x\nseed: [1, 2\n")),
    Case("yaml-not-a-mapping", "top level must be a mapping", cfg=None,
         files=_text("c.yaml", "- 1\n")),
    Case("binary-config", "c.yaml': not a text YAML file", cfg=None,
         files=_bytes("c.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x80")),
    Case("control-characters-config", "c.yaml': not a text YAML file", cfg=None,
         files=_bytes("c.yaml", b"name: x\nseed: \x00\x07\n")),
    Case("config-file-missing", "config file '/nonexistent.yaml': not found", cfg=None,
         args=("/nonexistent.yaml",)),
    Case("no-config", "give a CONFIG file", cfg=None, args=()),
    Case("unknown-model-path", "model.name '/nonexistent/model': not an alias",
         args=_sets("model.name=/nonexistent/model")),
    Case("unknown-model-id", "model.name 'someorg/no-such-model': not an alias",
         args=_sets("model.name=someorg/no-such-model")),
    Case("model-dir-without-config", "directory has no config.json",
         args=_sets("model.name={tmp}/model"), files=_empty_model_dir),
    Case("output-is-a-file", "output directory", args=("{tmp}/c.yaml", "--output", "{tmp}/c.yaml")),
    Case("resume-dir-missing", "--resume /nonexistent/run: directory not found", cfg=None,
         args=("--resume", "/nonexistent/run")),
    Case("resume-dir-without-config", "config.yaml': not found", cfg=None,
         args=("--resume", "{tmp}"), files=lambda tmp: None),
    Case("unreadable-checkpoint", "latest.json unreadable", cfg=None,
         args=("--resume", "{tmp}/run"), files=_corrupt_checkpoint),
    Case("resume-with-other-config",
         "config differs from the checkpoint's (data.num_clients: 4 -> 6)",
         cfg=None, args=("--resume", "{tmp}/run", "--set", "data.num_clients=6"),
         files=_valid_checkpoint),
    Case("gpus-requested-but-absent", "num_gpus_per_client=1: the Ray cluster has 0 GPUs",
         args=_sets("resources.num_gpus_per_client=1"), ray=True),
    Case("more-cpus-than-cluster", "num_cpus_per_client=64: the Ray cluster has 2 CPUs",
         args=_sets("resources.num_cpus_per_client=64"), ray=True),
    Case("bad-adapter-target-inside-actor", "model.peft:",
         args=_sets("model.peft.target_modules=[no_such_layer]"), ray=True),
]


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.ray] if c.ray else []) for c in CASES])
def test_bad_input_exits_2_with_one_line(case: Case, tmp_path, capfd, request):
    if case.ray:
        request.getfixturevalue("ray_local")
    argv = case.argv(tmp_path)
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("fedbip: error: ") and case.needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_there_are_at_least_20_cases():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id", ["invalid-yaml", "binary-config", "missing-dataset-file"])
def test_the_installed_command_prints_one_line(case_id, tmp_path):
    """The same through the `fedbip` executable: nothing else reaches stderr."""
    case = next(c for c in CASES if c.id == case_id)
    argv = case.argv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "fedbip"), *argv], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and case.needle in proc.stderr, proc.stderr
