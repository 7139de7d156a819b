"""fedbip_ray.storage against a real S3-protocol server (moto, IAM checks on): objects, row logs,
checkpoint publication, the owner lock and one-line errors for bad locations."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from fedbip_ray import storage
from fedbip_ray.storage import StorageError, open_location
from fedbip_ray.storage.lock import OWNER, new_owner, write_owner
from fedbip_ray.storage.publish import write_round
from tests.e2e.s3server import MotoS3  # the fixtures are in conftest.py

pytestmark = pytest.mark.e2e


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def no_secrets(text: str, server: MotoS3) -> None:
    for key, secret in server.keys.values():
        assert key not in text and secret not in text


def test_objects_write_read_list_delete(s3env, moto_s3):
    loc = open_location(s3env)
    assert not loc.is_local and loc.describe() == s3env
    (loc / "a.json").write_text('{"x": 1}')
    with (loc / "sub" / "b.bin").open_writer() as fh:
        fh.write(b"\x00" * 10)
        fh.write(memoryview(b"tail"))
    assert (loc / "a.json").read_text() == '{"x": 1}'
    assert (loc / "sub" / "b.bin").read_bytes() == b"\x00" * 10 + b"tail"
    assert loc.listdir() == ["a.json", "sub"] and (loc / "sub").exists()
    with pytest.raises(FileNotFoundError):
        (loc / "missing").read_bytes()
    (loc / "a.json").delete()
    (loc / "a.json").delete()  # absent: nothing to do
    (loc / "sub").delete_dir()
    assert not (loc / "a.json").exists() and not (loc / "sub" / "b.bin").exists()
    blob = pickle.dumps(loc)
    no_secrets(repr(loc) + str(loc) + blob.decode("latin-1"), moto_s3)
    assert pickle.loads(blob) == loc


def test_failed_writer_leaves_no_object(s3env):
    obj = open_location(s3env) / "half.bin"
    with pytest.raises(RuntimeError), obj.open_writer() as fh:
        fh.write(b"partial")
        raise RuntimeError("writer died")
    assert not obj.exists()


def test_rows_are_objects_read_back_whole(s3env):
    out = open_location(s3env)
    log = storage.open_rows(out, "metrics")
    for rnd in (1, 2, 3):
        log.append({"round": rnd, "mean_accuracy": rnd / 10})
    assert (out / "metrics").listdir() == ["000001.json", "000002.json", "000003.json"]
    assert [r["round"] for r in storage.open_rows(out, "metrics").read()] == [1, 2, 3]
    log.truncate_after(2)
    log.append({"round": 3, "mean_accuracy": 0.9})
    rows = storage.open_rows(out, "metrics").read()
    assert rows == [{"round": 1, "mean_accuracy": 0.1}, {"round": 2, "mean_accuracy": 0.2},
                    {"round": 3, "mean_accuracy": 0.9}]
    log.consolidate()
    assert [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] == rows
    log.replace(rows[:1])
    assert storage.open_rows(out, "metrics").read() == rows[:1]
    assert not (out / "metrics.jsonl").exists()


def files_for(rnd: int) -> dict:
    digest: dict[str, str] = {}

    def tensors(fh):
        fh.write(bytes([rnd]) * 4096)
        digest["t"] = "done"

    return {"server.safetensors": tensors, "layout.json": b"{}",
            "meta.json": lambda fh: fh.write(json.dumps({"round": rnd, **digest}).encode())}


def test_checkpoints_pointer_last_and_verified(s3env):
    root = open_location(s3env) / "checkpoints"
    for rnd in (1, 2, 3):
        storage.publish_checkpoint(root, rnd, files_for(rnd))
    assert root.listdir() == ["latest.json", "round_00002", "round_00003"]  # keep two
    got = storage.read_latest(root)
    assert got.round == 3 and got.files["server.safetensors"] == bytes([3]) * 4096
    assert json.loads(got.files["meta.json"]) == {"round": 3, "t": "done"}
    # a complete round whose pointer has not moved is never loaded
    write_round(root / "round_00004", 4, files_for(4))
    assert storage.read_latest(root).round == 3
    # a truncated tensor object: the previous complete checkpoint is used
    (root / "round_00003" / "server.safetensors").write_bytes(bytes([3]) * 100)
    warnings: list[str] = []
    got = storage.read_latest(root, warn=warnings.append)
    assert got.round == 2 and "truncated or corrupt" in warnings[0]
    # no pointer: no checkpoint
    (root / "latest.json").delete()
    assert storage.read_latest(root) is None
    storage.clear_checkpoints(root)
    assert storage.read_latest(root) is None and root.listdir() == []


def test_interrupted_publish_keeps_previous(s3env):
    root = open_location(s3env) / "checkpoints"
    storage.publish_checkpoint(root, 1, files_for(1))

    def dies(fh):
        fh.write(b"\x01" * 1000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.publish_checkpoint(root, 2, {"server.safetensors": dies, "meta.json": b"{}"})
    assert storage.read_pointer(root) == (1, "round_00001")
    assert "round_00002" not in root.listdir()
    assert storage.read_latest(root).round == 1


def test_second_run_on_one_uri_fails(s3env):
    out = open_location(s3env)
    first = storage.acquire(out, settle_s=0.0)
    try:
        with pytest.raises(StorageError) as exc:
            storage.acquire(out, settle_s=0.0)
        assert s3env in one_line(exc) and "another fedbip run is using it" in str(exc.value)
        first.refresh()
    finally:
        first.release()
    assert not (out / OWNER).exists()
    with storage.run_lock(out, settle_s=0.0):
        pass


def test_heartbeat_keeps_the_lease(s3env):
    out = open_location(s3env)
    with storage.run_lock(out, lease_s=0.6, settle_s=0.0) as lock:
        lock.start_heartbeat(0.1)
        time.sleep(0.9)
        with pytest.raises(StorageError):
            storage.acquire(out, settle_s=0.0, heartbeat=False)
        lock.refresh()


def test_stale_owner_taken_over_and_first_run_told(s3env):
    out = open_location(s3env)
    first = storage.acquire(out, lease_s=0.3, heartbeat=False, settle_s=0.0)
    time.sleep(0.5)
    warnings: list[str] = []
    second = storage.acquire(out, settle_s=0.0, heartbeat=False, warn=warnings.append)
    assert "lease expired" in warnings[0]
    with pytest.raises(storage.OwnershipLost) as exc:
        first.refresh()
    assert "took it over" in one_line(exc)
    first.release()  # not ours any more: the new owner object stays
    assert (out / OWNER).exists()
    second.release()


def test_resume_after_crash_on_this_host(s3env):
    out = open_location(s3env)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_owner(out / OWNER, replace(new_owner(3600.0, time.time()), pid=dead.pid))
    warnings: list[str] = []
    with storage.run_lock(out, settle_s=0.0, warn=warnings.append) as lock:
        assert lock.owner.pid == os.getpid()
    assert "process is gone" in warnings[0]


def test_probe_ok_leaves_nothing(s3env):
    loc = storage.probe(s3env)
    assert loc.listdir() == []


def test_unknown_scheme():
    with pytest.raises(StorageError) as exc:
        storage.probe("foo://x")
    assert "unsupported storage scheme 'foo'" in one_line(exc)


def test_unreachable_endpoint_fails_fast(s3env, monkeypatch, moto_s3):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(StorageError) as exc:
        storage.probe(s3env)
    assert time.monotonic() - start < 20
    text = one_line(exc)
    assert text.startswith(s3env) and "unreachable" in text and "127.0.0.1:9" in text
    no_secrets(text, moto_s3)


def test_silent_endpoint_fails_within_the_probe_timeout(s3env, monkeypatch):
    """An endpoint that accepts connections and never answers (a hung proxy or server)."""
    import socket

    from fedbip_ray.storage import probing

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(probing, "PROBE_TIMEOUT_S", 1.0)
        start = time.monotonic()
        with pytest.raises(StorageError) as exc:
            storage.probe(s3env)
        assert time.monotonic() - start < 30  # measured: 1 s + about 7 s inside the S3 client
    assert "did not answer in time" in one_line(exc)


def test_missing_bucket(s3env, moto_s3):
    with pytest.raises(StorageError) as exc:
        storage.probe("s3://no-such-bucket/run")
    text = one_line(exc)
    assert "s3://no-such-bucket/run" in text and "bucket does not exist" in text
    no_secrets(text, moto_s3)


def test_denied_write_writes_nothing(s3env, moto_s3, monkeypatch):
    for name, value in moto_s3.env("reader").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StorageError) as exc:
        storage.probe(s3env)
    text = one_line(exc)
    assert text.startswith(s3env) and "access denied" in text
    no_secrets(text, moto_s3)
    for name, value in moto_s3.env("admin").items():
        monkeypatch.setenv(name, value)
    assert open_location(s3env).listdir() == []


def test_rejected_credentials(s3env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKEFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    with pytest.raises(StorageError) as exc:
        storage.probe(s3env)
    text = one_line(exc)
    assert "AKIAFAKEFAKEFAKEFAKE" not in text and "not-the-secret" not in text


def test_credentials_in_uri_refused_and_hidden(moto_s3):
    key, secret = moto_s3.keys["admin"]
    with pytest.raises(StorageError) as exc:
        storage.probe(f"s3://{key}:{secret}@runs/x")
    assert "credentials in the URI are not accepted" in one_line(exc)
    no_secrets(str(exc.value), moto_s3)


def test_large_safetensors_streamed_and_loaded(s3env):
    """A multi-part upload (> one 10 MB part) written chunk by chunk, loaded by safetensors."""
    import numpy as np
    from safetensors.numpy import load, save

    states = np.random.default_rng(0).standard_normal((3, 1_000_000), dtype=np.float32)
    blob = save({"states": states, "init": states[0].copy()})

    def stream(fh):
        for start in range(0, len(blob), 1 << 20):
            fh.write(memoryview(blob)[start:start + (1 << 20)])

    root = open_location(s3env) / "checkpoints"
    storage.publish_checkpoint(root, 1, {"server.safetensors": stream, "meta.json": b"{}"})
    got = storage.read_latest(root)
    loaded = load(got.files["server.safetensors"])
    assert np.array_equal(loaded["states"], states) and len(blob) > 10 * 2**20
