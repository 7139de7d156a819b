"""Pure numpy core of FedBip: task vectors, similarity, weights, aggregation, strategies.

Imports only numpy (and scipy lazily, when clustering); never torch, ray, mlflow, transformers
or peft. Torch tensors are accepted duck-typed where noted.
"""

from .aggregate import aggregate_layerwise, aggregate_task_vectors, clip_rows, mix_models
from .grouping import adjusted_rand_index, group_recovery
from .similarity import (
    SCOPES,
    cosine_similarity,
    per_module_similarity,
    similarity_matrix,
    smooth_similarity,
)
from .strategies import (
    STRATEGIES,
    AggregationInput,
    AggregationResult,
    ClientOptions,
    ClippedStrategy,
    GaussianNoiseStrategy,
    Strategy,
    make_strategy,
    strategy_param_names,
)
from .taskvector import Layout, LayoutMismatchError, TaskVector, module_groups, module_key
from .validation import UpdateRejected, validate_update
from .weights import (
    fedamp_weights,
    fedavg_weights,
    local_weights,
    oracle_weights,
    personalized_weights,
)

__all__ = [
    "SCOPES",
    "STRATEGIES",
    "AggregationInput",
    "AggregationResult",
    "ClientOptions",
    "ClippedStrategy",
    "GaussianNoiseStrategy",
    "Layout",
    "LayoutMismatchError",
    "Strategy",
    "TaskVector",
    "UpdateRejected",
    "adjusted_rand_index",
    "aggregate_layerwise",
    "aggregate_task_vectors",
    "clip_rows",
    "cosine_similarity",
    "fedamp_weights",
    "fedavg_weights",
    "group_recovery",
    "local_weights",
    "make_strategy",
    "mix_models",
    "module_groups",
    "module_key",
    "oracle_weights",
    "per_module_similarity",
    "personalized_weights",
    "similarity_matrix",
    "smooth_similarity",
    "strategy_param_names",
    "validate_update",
]
