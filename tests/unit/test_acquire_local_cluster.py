"""runtime/local_cluster.py without Ray: config filling, stopping exactly the processes of a dir,
and killing exactly one node's processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from fedbip_ray.runtime import local_cluster


def test_the_autoscaling_config_gets_the_gcs_address(tmp_path):
    cfg = local_cluster.write_autoscaling_config(local_cluster.DEFAULT_CONFIG, "127.0.0.1:1234",
                                                 tmp_path / "a.yaml")
    assert cfg["provider"]["gcs_address"] == "127.0.0.1:1234"
    assert yaml.safe_load((tmp_path / "a.yaml").read_text())["provider"]["type"] == "fake_multinode"
    assert cfg["available_node_types"]["gpu_worker"]["min_workers"] == 0


def test_the_head_command_names_every_port_and_the_temp_dir(tmp_path):
    ports = {"gcs": 1, "dashboard": 2, **{f: 3 for f in local_cluster.PORT_FLAGS}}
    cmd = local_cluster.head_command(tmp_path, tmp_path / "a.yaml", {"CPU": 1, "GPU": 0}, ports)
    assert f"--temp-dir={tmp_path}" in cmd and "--port=1" in cmd and "--num-gpus=0" in cmd
    assert all(any(part.startswith(f"--{f}=") for part in cmd) for f in local_cluster.PORT_FLAGS)


def test_stop_ends_the_processes_holding_the_dir_and_spares_the_rest(tmp_path):
    held, other = tmp_path / "d", tmp_path / "d2"
    held.mkdir()
    other.mkdir()
    code = "import sys, time; f = open(sys.argv[1], 'w'); time.sleep(60)"
    mine = subprocess.Popen([sys.executable, "-c", code, str(held / "log")])
    spare = subprocess.Popen([sys.executable, "-c", code, str(other / "log")])
    try:
        with open(held / "mine.txt", "w"):  # the caller holding the dir is never stopped
            deadline = time.time() + 10
            while local_cluster.cluster_pids(held) != [mine.pid] and time.time() < deadline:
                time.sleep(0.1)
            assert local_cluster.cluster_pids(held) == [mine.pid]
            assert local_cluster.stop(held, grace_s=2) == [mine.pid]
        assert mine.wait(5) is not None and spare.poll() is None
        assert os.getpid() not in local_cluster.cluster_pids(held)
    finally:
        for p in (mine, spare):
            p.kill()
            p.wait()


def test_kill_node_ends_one_nodes_processes_and_their_children_only(tmp_path):
    held = tmp_path / "c"
    held.mkdir()
    node = "ab" * 28
    sleeper = "import subprocess, sys, time; "
    parent = (sleeper + "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "time.sleep(60)")
    raylet = subprocess.Popen([sys.executable, "-c", parent, f"--node_id={node}",
                               f"--store_socket_name={held}/sockets/plasma"])
    other_dir = subprocess.Popen([sys.executable, "-c", sleeper + "time.sleep(60)",
                                  f"--node_id={node}", f"--store_socket_name={tmp_path}/x/p"])
    other_node = subprocess.Popen([sys.executable, "-c", sleeper + "time.sleep(60)",
                                   f"--node-id={'cd' * 28}", f"--session-dir={held}/session"])
    procs = (raylet, other_dir, other_node)
    try:
        deadline = time.time() + 10
        while len(local_cluster.node_pids(held, node)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        pids = local_cluster.node_pids(held, node)
        assert raylet.pid in pids and len(pids) == 2  # the node's process and its child
        assert local_cluster.kill_node(held, node) == pids
        assert raylet.wait(5) is not None
        assert other_dir.poll() is None and other_node.poll() is None
        assert local_cluster.node_pids(held, node) == []
        with pytest.raises(RuntimeError, match="no process of node"):
            local_cluster.kill_node(held, node)
    finally:
        for p in procs:
            p.kill()
            p.wait()
