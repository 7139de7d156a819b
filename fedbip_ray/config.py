"""One typed, validated configuration: YAML in, frozen objects out.

``load_config(path, overrides)`` is the only entry point; it raises :class:`ConfigError` with a
single line naming the offending field and the reason. Reading YAML and applying ``--set``
overrides is :mod:`fedbip_ray.config_io`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fedbip_ray.config_io import ConfigError, apply_overrides, read_yaml
from fedbip_ray.core.strategies import (
    STRATEGIES,
    ParamError,
    Strategy,
    check_strategy_params,
    construct_strategy,
)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PeftConfig(_Frozen):
    """Adapter (peft) settings. ``target_modules=None`` picks the model family's attention
    projections (query/value for BERT-like models, q_proj/v_proj otherwise)."""

    method: Literal["lora", "ia3"] = "lora"
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None


class TinyModelConfig(_Frozen):
    """A random-init model built from a config (tests, benchmarks); no download."""

    hidden_size: int = Field(32, ge=4)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(64, ge=4)
    vocab_size: int = Field(1000, ge=16)


class ModelConfig(_Frozen):
    """``name`` is an alias (``minilm``, ``tiny-bert``), a local directory or a model id
    already in the local Hugging Face cache."""

    name: str = "minilm"
    task: Literal["sequence-classification", "image-classification",
                  "causal-lm"] = "sequence-classification"
    max_length: int = Field(64, ge=4, le=8192)
    peft: PeftConfig = PeftConfig()
    tiny: TinyModelConfig = TinyModelConfig()
    torch_threads: int | None = Field(None, ge=1)


class PartitionConfig(_Frozen):
    """How examples are split across clients.

    kind: ``iid``; ``dirichlet`` (label skew, ``alpha``); ``groups`` (clients in ``num_groups``
    groups; with ``shift: label-flip`` group g sees label y as (y + g) mod K, i.e. conflicting
    interests; with ``shift: rotation`` group g sees images rotated by g * 360/num_groups
    degrees, a covariate shift);
    ``column`` (natural: by ``data.client_column``; one client per value, or with fewer values
    than clients, several clients per value and the value index as group);
    ``pathological`` (label skew: ``classes_per_client`` classes per client).
    """

    kind: Literal["iid", "dirichlet", "groups", "column", "pathological"] = "groups"
    num_groups: int = Field(2, ge=1)
    shift: Literal["label-flip", "rotation", "none"] = "label-flip"
    alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(2, ge=1)


class DataConfig(_Frozen):
    dataset: str = "rotten-tomatoes"
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    client_column: str | None = None
    num_clients: int = Field(4, ge=1, le=100_000)
    examples_per_client: int | None = Field(None, ge=4)
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    partition: PartitionConfig = PartitionConfig()
    shard_dir: str | None = None
    # generative data from a file (model.task causal-lm): prompt/response columns, or a chat
    # column of {role, content} turns whose last assistant turn is the response
    prompt_column: str | None = None
    response_column: str = "response"
    messages_column: str | None = None
    task_column: str | None = None
    task_metrics: dict[str, Literal["exact", "rougeL"]] = Field(default_factory=dict)
    default_metric: Literal["exact", "rougeL"] | None = None
    # a split the user made: the column and its value for each of train/val/test
    split_column: str | None = None
    split_values: dict[Literal["train", "val", "test"], str] = Field(
        default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    # true group of each natural client (partition.kind column): oracle and diagnostics
    group_column: str | None = None
    # `fedbip join` output directories whose newcomers take part from a resumed round on
    # (clients N, N+1, ... after the run's N; runtime/joined.py)
    joined: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be < 0.9")
        return self

    @field_validator("split_values", mode="before")
    @classmethod
    def _split_defaults(cls, v: Any) -> Any:
        """Splits the user does not rename keep their own name as value."""
        return {"train": "train", "val": "val", "test": "test", **v} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _own_data(self) -> DataConfig:
        if self.prompt_column and self.messages_column:
            raise ValueError("data.prompt_column and data.messages_column: set one, not both")
        if self.task_metrics and not self.task_column:
            raise ValueError("data.task_metrics needs data.task_column")
        values = list(self.split_values.values())
        if len(set(values)) != len(values):
            raise ValueError(f"data.split_values: values must differ (got {values})")
        if self.group_column and self.partition.kind != "column":
            raise ValueError("data.group_column needs data.partition.kind 'column' "
                             f"(got '{self.partition.kind}')")
        return self

    @property
    def generative(self) -> bool:
        """True when the file holds (prompt, response) pairs or chat turns."""
        return bool(self.prompt_column or self.messages_column)


class TrainConfig(_Frozen):
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    max_steps_per_round: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    # auto: bf16 autocast on a CUDA device that supports it, else fp16 + GradScaler on CUDA,
    # the trainer's own default on CPU (fp32; bf16 autocast for causal LMs)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False  # causal LMs only


class StrategyConfig(_Frozen):
    """``name`` is a registered strategy; ``params`` its options as written. They are
    validated once, at parse time, against the strategy's typed fields
    (:func:`~fedbip_ray.core.strategies.check_strategy_params`); :meth:`build` uses the
    result without checking again."""

    name: str = "fedbip"
    params: dict[str, Any] = Field(default_factory=dict)
    _checked: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r} (known: {', '.join(sorted(STRATEGIES))})")
        return v

    @model_validator(mode="after")
    def _params(self) -> StrategyConfig:
        self._checked = check_strategy_params(self.name, self.params)  # ParamError: one line
        return self

    @property
    def checked_params(self) -> dict[str, Any]:
        """``params`` validated and normalized (e.g. ``gate`` a sorted tuple)."""
        return dict(self._checked)

    def build(self) -> Strategy:
        """The configured strategy, built from the parameters validated at parse time. Call
        it once per run and hand the strategy down."""
        return construct_strategy(self.name, self._checked)


class UpdateCheckConfig(_Frozen):
    max_norm: float | None = Field(None, gt=0)
    on_excess_norm: Literal["reject", "clip"] = "reject"


class FederationConfig(_Frozen):
    rounds: int = Field(3, ge=1, le=100_000)
    clients_per_round: int | None = Field(None, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    round_deadline_s: float = Field(3600.0, gt=0)
    min_report_fraction: float = Field(0.5, gt=0, le=1)
    eval_every: int = Field(1, ge=1)
    # write a checkpoint every k rounds (and always after the last); 0: only after the last
    checkpoint_every: int = Field(1, ge=0)
    updates: UpdateCheckConfig = UpdateCheckConfig()
    # nearest neighbours per client in each round's report (the matrices go to similarity/)
    report_top_k: int = Field(8, ge=1)
    # server actors, each holding one block of the adapter's columns for every client (split
    # at module boundaries) and spread over the nodes; 1: one server actor
    server_shards: int = Field(1, ge=1, le=1024)

    def checkpoint_due(self, round_num: int) -> bool:
        """Whether round ``round_num``'s checkpoint is written."""
        every = self.checkpoint_every
        return round_num == self.rounds or (every > 0 and round_num % every == 0)


class PrivacyConfig(_Frozen):
    """Client-level differential privacy on task vectors (off while ``clip_norm`` is None).

    The server clips every accepted task vector to L2 norm ``clip_norm`` and adds Gaussian
    noise of std ``noise_multiplier * clip_norm``; the privacy spent (epsilon at ``delta``) is
    accounted with dp-accounting and written to metrics.jsonl every round.
    """

    clip_norm: float | None = Field(None, gt=0)
    noise_multiplier: float = Field(1.0, ge=0, le=1000)
    delta: float = Field(1e-5, gt=0, lt=1)

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None


class ResourcesConfig(_Frozen):
    num_cpus_per_client: float = Field(1.0, ge=0)
    num_gpus_per_client: float = Field(0.0, ge=0)
    max_actors: int | None = Field(None, ge=1)
    # client actors to reserve (None: as many as the clients, max_actors and the cluster allow)
    num_actors: int | None = Field(None, ge=1)
    # on a joined cluster: how long to wait for the actors' resources (the autoscaler's nodes)
    acquire_timeout_s: float = Field(600, gt=0)
    # auto: CUDA when Ray assigned the actor a GPU that torch can see, else CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the server actor's CPUs (its BLAS threads) and memory reservation (GiB; None: none)
    server_cpus: float = Field(0.0, ge=0)
    server_memory_gb: float | None = Field(None, gt=0)
    # the client actors of a node share one read-only copy of the frozen base model (Ray's
    # object store); false: each actor loads its own
    share_base_model: bool = True


class TrackingConfig(_Frozen):
    mlflow: bool = True
    tracking_uri: str | None = None
    experiment: str = "fedbip"
    # per-client metrics per round up to this many clients; beyond: quantiles and a histogram
    per_client_metrics_limit: int = Field(100, ge=0)


class Config(_Frozen):
    name: str = "fedbip"
    seed: int = Field(0, ge=0)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    federation: FederationConfig = FederationConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _cross(self) -> Config:
        if (self.federation.clients_per_round
                and self.federation.clients_per_round > self.data.num_clients):
            raise ValueError(
                f"federation.clients_per_round ({self.federation.clients_per_round}) exceeds "
                f"data.num_clients ({self.data.num_clients})"
            )
        _check_task_fit(self.model.name, self.model.task, self.data.dataset)
        if self.data.partition.shift == "rotation" and self.model.task != "image-classification":
            raise ValueError("data.partition.shift 'rotation' needs model.task "
                             "'image-classification'")
        if (self.privacy.clip_norm is not None
                and self.strategy.checked_params.get("reference") == "gradient"):
            raise ValueError("strategy.params.reference 'gradient' sends gradient signals that "
                             "privacy does not cover: use 'pretrained' or 'round' with privacy")
        generative = self.data.prompt_column or self.data.messages_column
        if generative and self.model.task != "causal-lm":
            field = "prompt_column" if self.data.prompt_column else "messages_column"
            raise ValueError(f"data.{field} holds instruction data: it needs model.task "
                             f"'causal-lm' (got '{self.model.task}')")
        if self.strategy.name == "fedsa-lora" and self.model.peft.method != "lora":
            raise ValueError("strategy 'fedsa-lora' shares LoRA A factors: it needs "
                             f"model.peft.method 'lora' (got '{self.model.peft.method}')")
        if self.strategy.name == "fedala" and self.model.task == "causal-lm":
            raise ValueError("strategy 'fedala' learns its weights on classification losses: "
                             "model.task 'causal-lm' is not supported")
        if self.strategy.name == "feddpa" and self.model.task != "sequence-classification":
            raise ValueError("strategy 'feddpa' mixes its global and local adapters in the "
                             "sequence-classification trainer: model.task "
                             f"'{self.model.task}' is not supported")
        if self.strategy.name == "feddpa" and self.model.peft.method != "lora":
            raise ValueError("strategy 'feddpa' mixes two LoRA adapters: it needs "
                             f"model.peft.method 'lora' (got '{self.model.peft.method}')")
        return self

    def clients_per_round(self, num_clients: int | None = None) -> int:
        """Number of clients sampled each round out of ``num_clients`` (default
        data.num_clients; more with data.joined)."""
        if self.federation.clients_per_round:
            return self.federation.clients_per_round
        n = num_clients or self.data.num_clients
        return max(1, math.ceil(self.federation.fraction * n))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# The one table of built-in model aliases and datasets that only make sense for one task type
# (the model and dataset registries do not record a task yet).
_TASK_OF: dict[str, dict[str, str]] = {
    "model.name": {"efficientnet-lite0": "image-classification", "tiny-cnn": "image-classification",
                   "smollm2": "causal-lm", "tiny-llama": "causal-lm",
                   "minilm": "sequence-classification", "tiny-bert": "sequence-classification"},
    "data.dataset": {"fashion-mnist": "image-classification", "mnist-5k": "image-classification",
                     "digits": "image-classification", "instruct-tasks": "causal-lm",
                     "rotten-tomatoes": "sequence-classification",
                     "synthetic-text": "sequence-classification"},
}


def _check_task_fit(model: str, task: str, dataset: str) -> None:
    """Built-in model/dataset aliases must match ``model.task``."""
    for key, value in (("model.name", model), ("data.dataset", dataset)):
        want = _TASK_OF[key].get(value)
        if want and want != task:
            raise ValueError(f"{key} '{value}' needs model.task '{want}' (got '{task}')")


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if isinstance(first.get("ctx", {}).get("error"), ParamError):  # raised by StrategyConfig
        return f"config: {loc}.params: {msg}{extra}"
    if not loc:  # a check across fields: the message names them
        return f"config: {msg}{extra}"
    return f"config field '{loc}': {msg}{extra}"


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Validate a mapping (plus overrides) into a frozen :class:`Config`."""
    merged = apply_overrides(dict(data), overrides)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read the YAML file at ``path`` (None: all defaults) and validate it."""
    return config_from_dict(read_yaml(path) if path is not None else {}, overrides)
