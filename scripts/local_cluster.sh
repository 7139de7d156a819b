#!/usr/bin/env bash
# A fake multi-node Ray cluster on this machine (cluster.local.yaml): start|stop|status DIR.
#   scripts/local_cluster.sh start /tmp/fbc     # prints the GCS address and the dashboard URL (JSON)
#   scripts/local_cluster.sh stop /tmp/fbc      # stops exactly that cluster's processes, by pid
# One implementation: fedbip_ray/runtime/local_cluster.py (the tests use it too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${FEDBIP_VENV:-.venv}/bin/python"
exec "$PY" -m fedbip_ray.runtime.local_cluster "$@"
