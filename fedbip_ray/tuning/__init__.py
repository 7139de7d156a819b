"""Hyperparameter search: :func:`~fedbip_ray.tuning.search.run_tune` (Ray Tune, ASHA on
validation accuracy, one MLflow parent run with a child run per trial) and
:func:`~fedbip_ray.tuning.replay.run_replay` (aggregation-only parameters scored on a recorded
run's task vectors, no retraining). The ``tune:`` config section is parsed in :mod:`.space`."""
