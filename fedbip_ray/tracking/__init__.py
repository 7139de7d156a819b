"""MLflow tracking: :class:`~fedbip_ray.tracking.mlflow_logger.MlflowCallback` mirrors a run
(params, per-round metrics, bytes moved, similarity/weight matrices and heatmaps, plots,
adapters, git commit; FAILED/KILLED on errors);
:func:`~fedbip_ray.tracking.adapters.load_client_adapter`
loads a logged client adapter back as a peft model."""
