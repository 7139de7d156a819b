#!/usr/bin/env bash
# Start the MLflow dashboard on http://127.0.0.1:${PORT:-5000} over the local store mlflow.db.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec .venv/bin/mlflow server --backend-store-uri "${MLFLOW_BACKEND:-sqlite:///mlflow.db}" \
    --default-artifact-root "${MLFLOW_ARTIFACTS:-./mlartifacts}" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers 1
