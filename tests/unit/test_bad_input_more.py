"""More bad input through the real `fedbip` CLI: config fields, data files, models, storage
locations, tracking URIs and cluster addresses. Every case exits 2 with ONE line on stderr
naming the problem, and no traceback. ``env`` is set for the case only; cases that get as far as
Ray share the session's local Ray."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedbip_ray.cli import main

from ..conftest import fedbip_cli
from .test_bad_input import CASES, Case, _sets
from .test_bad_input_services import SERVICE_CASES

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port
S3_DEAD = {"AWS_ENDPOINT_URL": DEAD, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
CSV = "text,label\n" + "great film,pos\nawful film,neg\n" * 40


@dataclass(frozen=True)
class EnvCase:
    """A :class:`Case` run with ``env`` set."""

    case: Case
    env: dict[str, str] = field(default_factory=dict)


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        path = tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return write


def _bad_model_config(tmp: Path) -> None:
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{not json")


def _file(name: str, *overrides: str) -> tuple[str, ...]:
    """Overrides reading the user's own table ``{tmp}/name``."""
    return _sets("data.dataset=file", f"data.path={{tmp}}/{name}", "data.examples_per_client=8",
                 *overrides)


def _out(target: str) -> tuple[str, ...]:
    return ("{tmp}/c.yaml", "--output", target)


def _c(id: str, needle: str, **kw) -> EnvCase:
    env = kw.pop("env", {})
    return EnvCase(Case(id, needle, **kw), env)


MORE_CASES = [
    # config fields
    _c("zero-local-epochs", "config field 'train.local_epochs'",
       args=_sets("train.local_epochs=0")),
    _c("unknown-optimizer", "config field 'train.optimizer'", args=_sets("train.optimizer=lion")),
    _c("negative-lr", "config field 'train.lr'", args=_sets("train.lr=-1")),
    _c("unknown-peft-method", "config field 'model.peft.method'",
       args=_sets("model.peft.method=prefix")),
    _c("zero-lora-rank", "config field 'model.peft.r'", args=_sets("model.peft.r=0")),
    _c("unknown-device", "config field 'resources.device'", args=_sets("resources.device=tpu")),
    _c("task-does-not-fit-model", "model.name 'tiny-bert' needs model.task",
       args=_sets("model.task=causal-lm")),
    _c("unknown-partition", "config field 'data.partition.kind'",
       args=_sets("data.partition.kind=zipf")),
    _c("negative-prox-mu", "prox_mu must be a finite number >= 0",
       args=_sets("strategy.name=fedprox", "strategy.params.prox_mu=-1")),
    _c("zero-fedamp-sigma", "sigma must be a finite number > 0",
       args=_sets("strategy.name=fedamp", "strategy.params.sigma=0")),
    _c("unknown-reference", "reference must be one of round, pretrained, gradient",
       args=_sets("strategy.params.reference=foo")),
    _c("gate-mix-out-of-range", "gate entries must be numbers in [0, 1]",
       args=_sets("strategy.params.gate=[2]")),
    _c("zero-server-shards", "config field 'federation.server_shards'",
       args=_sets("federation.server_shards=0")),
    _c("more-server-shards-than-modules", "federation.server_shards=64: 64 server shards but "
       "the adapter has", args=_sets("federation.server_shards=64")),
    # data files
    _c("empty-data-file", "e.csv': no rows", args=_file("e.csv"), files=_write("e.csv", "")),
    _c("header-only-data-file", "h.csv': no rows", args=_file("h.csv"),
       files=_write("h.csv", "text,label\n")),
    _c("data-file-without-text-column", "data.text_column: column 'text' not in",
       args=_file("n.csv"), files=_write("n.csv", "review,label\n" + "a,1\nb,0\n" * 30)),
    _c("missing-labels", "label column 'label': 30 missing values", args=_file("m.csv"),
       files=_write("m.csv", "text,label\n" + "a,1\nb,\n" * 30)),
    _c("single-label", "label column 'label': needs at least 2 distinct labels",
       args=_file("one.csv"), files=_write("one.csv", "text,label\n" + "a,1\nb,1\n" * 30)),
    _c("corrupt-parquet", "bad.parquet': cannot read", args=_file("bad.parquet"),
       files=_write("bad.parquet", b"PAR1 not a parquet file")),
    _c("invalid-jsonl", "bad.jsonl': cannot read", args=_file("bad.jsonl"),
       files=_write("bad.jsonl", '{"text": "a", "label": 1}\n{not json\n')),
    _c("client-column-missing", "data.client_column: column 'user' not in",
       args=_file("r.csv", "data.client_column=user"), files=_write("r.csv", CSV)),
    _c("split-column-missing", "data.split_column: column 'split' not in",
       args=_file("r.csv", "data.split_column=split"), files=_write("r.csv", CSV)),
    # models
    _c("model-id-not-a-repo-id", "model.name 'a/b/c': not an alias",
       args=_sets("model.name=a/b/c")),
    _c("model-dir-with-broken-config", "model.name '{tmp}/model'",
       args=_sets("model.name={tmp}/model"), files=_bad_model_config, ray=True),
    # storage
    _c("unknown-output-scheme", "foo://x: unsupported storage scheme 'foo'", args=_out("foo://x")),
    _c("unknown-resume-scheme", "foo://x: unsupported storage scheme 'foo'", cfg=None,
       args=("--resume", "foo://x")),
    _c("s3-endpoint-unreachable", "s3://bucket/x: cannot be written at endpoint "
       "http://127.0.0.1:9 (the endpoint is unreachable)", args=_out("s3://bucket/x"), env=S3_DEAD),
    _c("s3-resume-endpoint-unreachable", "s3://bucket/x/config.yaml: cannot read (the endpoint "
       "is unreachable)", cfg=None, args=("--resume", "s3://bucket/x"), env=S3_DEAD),
    _c("output-below-a-file", "a file is in the way of a directory", args=_out("{tmp}/c.yaml/sub")),
    _c("file-uri-output-is-a-file", "c.yaml: is a file, not a directory",
       args=_out("file://{tmp}/c.yaml")),
    _c("credentials-in-uri", "credentials in the URI are not accepted",
       args=_out("s3://user:secret@bucket/x")),
    _c("bucket-name-too-short", "'b' is not a valid bucket name", args=_out("s3://b/x")),
    _c("hdfs-without-client", "hdfs://127.0.0.1:9/x: cannot connect to HDFS",
       args=_out("hdfs://127.0.0.1:9/x")),
    # tracking
    _c("https-tracking-server-down", "tracking URI https://127.0.0.1:9: no MLflow server answers",
       args=_sets("tracking.mlflow=true", "tracking.tracking_uri=https://127.0.0.1:9")),
    _c("env-tracking-server-down", "tracking URI http://127.0.0.1:9: no MLflow server answers",
       args=_sets("tracking.mlflow=true"), env={"MLFLOW_TRACKING_URI": DEAD}),
    _c("tracking-uri-bad-port", "tracking URI http://127.0.0.1:notaport",
       args=_sets("tracking.mlflow=true", "tracking.tracking_uri=http://127.0.0.1:notaport")),
    _c("tracking-uri-unknown-scheme", "tracking URI foo://x",
       args=_sets("tracking.mlflow=true", "tracking.tracking_uri=foo://x"), ray=True),
    # cluster addresses
    _c("ray-http-address-nobody-home", "RAY_ADDRESS=http://127.0.0.1:9: no Ray cluster answers",
       env={"RAY_ADDRESS": DEAD}),
    _c("ray-hostname-nobody-home", "RAY_ADDRESS=localhost:9: no Ray cluster answers",
       env={"RAY_ADDRESS": "localhost:9"}),
    _c("ray-address-without-port", "RAY_ADDRESS=127.0.0.1: not host:port",
       env={"RAY_ADDRESS": "127.0.0.1"}),
    _c("ray-address-port-out-of-range", "RAY_ADDRESS=127.0.0.1:99999: not host:port",
       env={"RAY_ADDRESS": "127.0.0.1:99999"}),
]


def _param(ec: EnvCase):
    return pytest.param(ec, id=ec.case.id, marks=[pytest.mark.ray] if ec.case.ray else [])


@pytest.mark.parametrize("ec", [_param(ec) for ec in MORE_CASES])
def test_more_bad_input_exits_2_with_one_line(ec: EnvCase, tmp_path, capfd, monkeypatch,
                                             request):
    case = ec.case
    argv = case.argv(tmp_path)
    if "RAY_ADDRESS" in ec.env:  # a fresh process: an in-process Ray would hide the address
        proc = fedbip_cli(argv, ec.env, tmp_path)
        code, err = proc.returncode, proc.stderr
    else:
        if case.ray:
            request.getfixturevalue("ray_local")
        else:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        for key, value in ec.env.items():
            monkeypatch.setenv(key, value)
        capfd.readouterr()
        code = main(argv)
        err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    needle = case.needle.replace("{tmp}", str(tmp_path))
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("fedbip: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_at_least_50_cli_cases_across_the_files():
    ids = [c.id for c in CASES] + [c.id for c, _ in SERVICE_CASES] + [e.case.id for e in MORE_CASES]
    assert len(ids) >= 50, len(ids)
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
