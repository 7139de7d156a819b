#!/usr/bin/env bash
# Start the MLflow dashboard on http://127.0.0.1:${PORT:-5000} over the local store mlflow.db
# (MLFLOW_BACKEND=URI for another store). `fedbip run` prints its run's page on it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
backend="${MLFLOW_BACKEND:-sqlite:///mlflow.db}"
echo "MLflow UI over ${backend}: http://${HOST:-127.0.0.1}:${PORT:-5000}/#/experiments?workflowType=machine_learning"
exec .venv/bin/mlflow server --backend-store-uri "${backend}" \
    --default-artifact-root "${MLFLOW_ARTIFACTS:-./mlartifacts}" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers 1
