#!/usr/bin/env bash
# Create (or update) the project-local virtual environment .venv and install the project into it
# with scripts/install.sh (the same install cluster.yaml runs on every node). Idempotent: a second
# run with unchanged requirements returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEDBIP_VENV:-.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.fedbip-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
[ -x "$PY" ] || python3 -m venv "$VENV"
echo "setting up $VENV (first time: about 2 minutes)" >&2
bash scripts/install.sh "$PY"
echo "$want" > "$STAMP"
