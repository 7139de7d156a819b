"""fedbip_ray.storage on local paths and file:// URIs (no server, no Ray)."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedbip_ray import storage
from fedbip_ray.config import ConfigError
from fedbip_ray.storage import StorageError, open_location
from fedbip_ray.storage.errors import scrub
from fedbip_ray.storage.lock import Owner, parse_owner
from fedbip_ray.storage.publish import MANIFEST, write_round


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


# ---------------------------------------------------------------------------- locations
def test_local_path_and_file_uri_are_the_same_place(tmp_path):
    a, b = open_location(tmp_path / "out"), open_location(f"file://{tmp_path}/out")
    assert a.is_local and b.is_local and a.path == b.path == str(tmp_path / "out")
    assert a.local_path == tmp_path / "out" and b.describe() == f"file://{tmp_path}/out"
    child = a / "checkpoints" / "latest.json"
    assert (child.path == str(tmp_path / "out/checkpoints/latest.json")
            and child.name == "latest.json")
    assert str(b / "x") == f"file://{tmp_path}/out/x"
    assert open_location(a) is a
    assert pickle.loads(pickle.dumps(a)) == a


def test_relative_path_keeps_its_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = open_location("runs/tiny")
    assert loc.describe() == "runs/tiny" and loc.path == str(tmp_path / "runs/tiny")


@pytest.mark.parametrize("name", ["", "..", "a/../b", "/"])
def test_bad_child_names(tmp_path, name):
    with pytest.raises(ValueError):
        open_location(tmp_path) / name


def test_write_read_list_delete(tmp_path):
    loc = open_location(tmp_path / "out")
    (loc / "a" / "b.txt").write_text("hello")
    (loc / "c.bin").write_bytes(b"\x00\x01")
    assert (loc / "a" / "b.txt").read_text() == "hello"
    assert loc.listdir() == ["a", "c.bin"] and (loc / "a").exists()
    assert (loc / "nothing").listdir() == [] and not (loc / "nothing").exists()
    with pytest.raises(FileNotFoundError):
        (loc / "nothing").read_bytes()
    (loc / "c.bin").delete()
    (loc / "c.bin").delete()
    (loc / "a").delete_dir()
    (loc / "a").delete_dir()
    assert loc.listdir() == []


def test_write_is_all_or_nothing(tmp_path):
    target = open_location(tmp_path) / "config.yaml"
    target.write_text("old")
    with pytest.raises(RuntimeError), target.open_writer() as fh:
        fh.write(b"new but unfinished")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.yaml"]
    target.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["config.yaml"]


def test_write_below_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError) as exc:
        (open_location(tmp_path / "f") / "x.json").write_text("{}")
    assert one_line(exc).startswith(str(tmp_path / "f" / "x.json"))


@pytest.mark.parametrize("uri, words", [
    ("foo://x", "unsupported storage scheme 'foo'"),
    ("s3://ab/x", "'ab' is not a valid bucket name"),
    ("gs://Bad_Bucket/x", "not a valid bucket name"),
    ("s3://AKIAABCDEFGHIJKLMNOP:verysecret@bucket/x", "credentials in the URI"),
    ("s3://AKIAABCDEFGHIJKLMNOP:very/secret+x@bucket/x", "credentials in the URI"),
    ("s3://AKIAABCDEFGHIJKLMNOP:ve?ry#secret@bucket/x", "credentials in the URI"),
    ("hdfs://user:verysecret@namenode:8020/x", "credentials in the URI"),
    ("s3://bucket/x?access_key=AKIAABCDEFGHIJKLMNOP&secret_key=verysecret", "query options"),
    ("file://otherhost/x", "absolute local path"),
    ("hdfs:///x", "name node"),
    ("   ", "empty"),
])
def test_bad_uris_are_one_line_storage_errors(uri, words):
    with pytest.raises(StorageError) as exc:
        open_location(uri)
    text = one_line(exc)
    assert words in text and "AKIAABCDEFGHIJKLMNOP" not in text
    assert not any(part in text for part in ("verysecret", "very/secret", "secret+x", "ry#secret"))
    assert isinstance(exc.value, ConfigError)


def test_scrub_removes_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert scrub("x s3cr3t-value AKIAABCDEFGHIJKLMNOP s3://u:p@b/k") == "x *** *** s3://***@b/k"


# ---------------------------------------------------------------------------- probe
def test_probe_creates_the_directory_and_leaves_nothing(tmp_path):
    loc = storage.probe(tmp_path / "new" / "out")
    assert loc.local_path.is_dir() and loc.listdir() == []
    assert storage.probe(f"file://{tmp_path}/new/out").path == loc.path


def test_probe_on_a_file_or_below_one(tmp_path):
    (tmp_path / "f").write_text("x")
    for target in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(StorageError) as exc:
            storage.probe(target)
        assert one_line(exc).startswith(str(target))
    assert (tmp_path / "f").read_text() == "x"


# ---------------------------------------------------------------------------- rows
def test_local_rows_are_the_historic_jsonl_file(tmp_path):
    out = open_location(tmp_path)
    log = storage.open_rows(out, "metrics")
    rows = [{"round": r, "mean_accuracy": r / 4} for r in (1, 2, 3)]
    for row in rows:
        log.append(row)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows)
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 4, "mean_acc')  # torn by a kill
    assert storage.open_rows(out, "metrics").read() == rows
    log.truncate_after(2)
    assert log.read() == rows[:2]
    log.append(rows[2])
    log.consolidate()
    assert log.read() == rows and os.listdir(tmp_path) == ["metrics.jsonl"]
    log.replace([])
    assert log.read() == [] and (tmp_path / "metrics.jsonl").read_text() == ""


def test_truncate_drops_rows_without_a_round(tmp_path):
    log = storage.open_rows(open_location(tmp_path), "similarity")
    for row in ({"round": 1}, {"note": "x"}, {"round": 2}):
        log.append(row)
    log.truncate_after(5)
    assert log.read() == [{"round": 1}, {"round": 2}]
    assert storage.open_rows(open_location(tmp_path / "none"), "metrics").read() == []


# ---------------------------------------------------------------------------- lock
def test_local_lock_is_exclusive_and_released(tmp_path):
    out = open_location(tmp_path / "run")
    with storage.run_lock(out) as lock:
        assert lock.owner is None and (tmp_path / "run" / ".lock").exists()
        with pytest.raises(StorageError) as exc:
            storage.acquire(out)
        assert one_line(exc) == f"output {out}: another fedbip run is using this directory"
        lock.refresh()
    storage.acquire(out).release()


def test_local_lock_is_the_same_flock_as_output_lock(tmp_path):
    (tmp_path / ".lock").touch()
    with (tmp_path / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StorageError):
            storage.acquire(open_location(tmp_path))
    storage.acquire(open_location(tmp_path)).release()


def test_owner_record_staleness_and_liveness():
    now = time.time()
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = Owner("t", host, os.getpid(), "me", now - 50, now - 10, 60.0)
    assert not live.stale(now) and live.stale(now + 51) and not live.dead_here()
    assert Owner("t", host, dead.pid, "me", now, now, 60.0).dead_here()
    assert not Owner("t", "elsewhere", dead.pid, "me", now, now, 60.0).dead_here()
    assert parse_owner(json.dumps(live.__dict__).encode()) == live
    assert parse_owner(b"{not json") is None and parse_owner(b'{"token": 1}') is None


# ---------------------------------------------------------------------------- checkpoints
def files_for(rnd: int, size: int = 2048) -> dict:
    return {"server.safetensors": lambda fh: fh.write(memoryview(bytes([rnd]) * size)),
            "layout.json": b'{"names": []}',
            "meta.json": json.dumps({"round": rnd}).encode()}


@pytest.mark.parametrize("as_uri", [False, True])
def test_publish_and_read_latest(tmp_path, as_uri):
    root = open_location(f"file://{tmp_path}/ck" if as_uri else tmp_path / "ck")
    for rnd in (1, 2, 3):
        final = storage.publish_checkpoint(root, rnd, files_for(rnd))
        assert final.name == f"round_{rnd:05d}"
    assert sorted(os.listdir(tmp_path / "ck")) == ["latest.json", "round_00002", "round_00003"]
    assert json.loads((tmp_path / "ck/latest.json").read_text()) == {
        "round": 3, "path": "round_00003"}
    got = storage.read_latest(root)
    assert got.round == 3 and got.location == root / "round_00003"
    assert got.files == {"server.safetensors": bytes([3]) * 2048, "layout.json": b'{"names": []}',
                         "meta.json": b'{"round": 3}'}
    assert sorted(os.listdir(tmp_path / "ck/round_00003")) == [
        "layout.json", MANIFEST, "meta.json", "server.safetensors"]


def test_truncated_tensor_falls_back_and_unpublished_round_is_ignored(tmp_path):
    root = open_location(tmp_path)
    storage.publish_checkpoint(root, 1, files_for(1))
    storage.publish_checkpoint(root, 2, files_for(2))
    write_round(root / "round_00003", 3, files_for(3))  # complete, but the pointer never moved
    assert storage.read_latest(root).round == 2
    with (tmp_path / "round_00002/server.safetensors").open("r+b") as fh:
        fh.truncate(100)
    warnings: list[str] = []
    assert storage.read_latest(root, warn=warnings.append).round == 1
    assert len(warnings) == 1 and "server.safetensors is truncated or corrupt" in warnings[0]
    (tmp_path / "round_00001" / MANIFEST).unlink()
    (tmp_path / "round_00001" / "meta.json").unlink()
    assert storage.read_latest(root, warn=warnings.append) is None
    (tmp_path / "latest.json").unlink()
    assert storage.read_latest(root) is None


def test_unreadable_store_is_an_error_not_a_fallback(tmp_path):
    root = open_location(tmp_path)
    storage.publish_checkpoint(root, 1, files_for(1))
    storage.publish_checkpoint(root, 2, files_for(2))
    tensors = tmp_path / "round_00002" / "server.safetensors"
    tensors.unlink()
    tensors.mkdir()  # reading it fails with an OS error, as an unreachable store would
    with pytest.raises(StorageError) as exc:
        storage.read_latest(root)
    assert not isinstance(exc.value, storage.CheckpointInvalid)
    assert one_line(exc).startswith(str(tensors)) and "cannot read" in str(exc.value)


def test_load_latest_rejects_and_falls_back(tmp_path):
    root = open_location(tmp_path)
    storage.publish_checkpoint(root, 1, files_for(1))
    storage.publish_checkpoint(root, 2, files_for(2))

    def only_round_one(pub):
        if pub.round != 1:
            raise ConfigError(f"checkpoint {pub.location}: layout does not match")
        return json.loads(pub.files["meta.json"])

    warnings: list[str] = []
    assert storage.load_latest(root, only_round_one, warn=warnings.append) == {"round": 1}
    assert "layout does not match; trying an older checkpoint" in warnings[0]
    assert storage.load_latest(root, lambda pub: pub.round) == 2


def test_failed_publish_keeps_the_previous_pointer_and_no_temporaries(tmp_path):
    root = open_location(tmp_path)
    storage.publish_checkpoint(root, 1, files_for(1))

    def dies(fh):
        fh.write(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError) as exc:
        storage.publish_checkpoint(root, 2, {"server.safetensors": dies})
    assert "server.safetensors" in one_line(exc)
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "round_00001"]
    assert storage.read_pointer(root) == (1, "round_00001")


def test_republishing_a_round_and_leftovers_are_pruned(tmp_path):
    root = open_location(tmp_path)
    (tmp_path / ".tmp_round_00002").mkdir()
    (tmp_path / "round_00009").mkdir()
    storage.publish_checkpoint(root, 1, files_for(1))
    storage.publish_checkpoint(root, 1, files_for(1, size=10))
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "round_00001"]
    assert storage.read_latest(root).files["server.safetensors"] == b"\x01" * 10


def test_checkpoint_without_manifest_written_before_manifests(tmp_path):
    ck = tmp_path / "round_00004"
    ck.mkdir()
    (ck / "meta.json").write_text('{"round": 4}')
    (ck / "server.safetensors").write_bytes(b"abc")
    (tmp_path / "latest.json").write_text('{"round": 4, "path": "round_00004"}')
    got = storage.read_latest(open_location(tmp_path))
    assert got.round == 4 and set(got.files) == {"meta.json", "server.safetensors"}


@pytest.mark.parametrize("pointer", ['{"round": 2, "path": "round_00003"}', "not json",
                                     '{"round": "2", "path": "round_00002"}'])
def test_malformed_pointer_is_one_line(tmp_path, pointer):
    (tmp_path / "latest.json").write_text(pointer)
    with pytest.raises(StorageError) as exc:
        storage.read_latest(open_location(tmp_path))
    assert "latest.json is malformed" in one_line(exc)


def test_clear_checkpoints(tmp_path):
    root = open_location(tmp_path / "ck")
    storage.publish_checkpoint(root, 1, files_for(1))
    storage.clear_checkpoints(root)
    assert os.listdir(tmp_path / "ck") == [] and storage.read_latest(root) is None
    storage.clear_checkpoints(open_location(tmp_path / "absent"))
    assert not Path(tmp_path / "absent").exists()


# ---------------------------------------------------------------------------- remote, offline
def test_s3_location_endpoint_from_standard_variables(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-show-0123456789")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAABCDEFGHIJKLMNOP")
    loc = open_location("s3://bucket//runs/tiny/")
    assert (loc.path, loc.describe(), loc.endpoint) == ("bucket/runs/tiny", "s3://bucket/runs/tiny",
                                                        "http://general:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://only-s3:2")
    loc = open_location("s3://bucket/runs")
    assert loc.endpoint == "https://only-s3:2" and not loc.is_local
    shown = repr(loc) + str(loc / "x") + pickle.dumps(loc).decode("latin-1")
    assert "do-not-show" not in shown and "AKIAABCDEFGHIJKLMNOP" not in shown
    with pytest.raises(ValueError):
        _ = loc.local_path


def test_gs_location_opens_without_contacting_anything():
    loc = open_location("gs://my-bucket/runs/a")
    assert loc.describe() == "gs://my-bucket/runs/a" and loc.path == "my-bucket/runs/a"


def test_hdfs_without_a_client_is_one_line():
    with pytest.raises(StorageError) as exc:
        open_location("hdfs://namenode:8020/runs")
    assert one_line(exc).startswith("hdfs://namenode:8020/runs: cannot connect to HDFS")
