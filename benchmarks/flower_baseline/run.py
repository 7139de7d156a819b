"""Run one Flower simulation job (``python run.py JOB.json`` with the Flower venv's python).

``benchmarks/performance.py`` writes the job and measures this process (wall time from launch
to exit, memory of its process tree, which includes the Ray cluster Flower starts). The
ServerApp writes the per-round clock and metrics to ``job["result"]``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def main(argv: list[str]) -> int:
    """Start Flower's simulation engine for the job in ``argv[0]``; 0 when results were written."""
    if len(argv) != 1:
        print("usage: run.py JOB.json", file=sys.stderr)
        return 2
    job_path = Path(argv[0]).resolve()
    job = json.loads(job_path.read_text())
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    os.environ["FEDBIP_FLOWER_JOB"] = str(job_path)
    for path in (str(REPO), str(HERE.parent)):  # fedbip_ray, flower_baseline (Flower passes
        if path not in sys.path:  # sys.path on to its Ray workers through PYTHONPATH)
            sys.path.insert(0, path)

    from flwr.simulation import run_simulation

    from flower_baseline.app import client_app, server_app

    cpus = int(job["cpus"])
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=int(job["num_clients"]),
        backend_config={
            "client_resources": {"num_cpus": float(job["client_num_cpus"]), "num_gpus": 0.0},
            # address "local": always a fresh local Ray, never a cluster someone else started
            "init_args": {"address": "local", "num_cpus": cpus, "num_gpus": 0,
                          "include_dashboard": False},
        },
    )
    return 0 if Path(job["result"]).is_file() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
