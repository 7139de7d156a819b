"""The ``tune:`` section of a tune config: schema, search-space parsing and sampling.

A tune config is a normal run config plus a top-level ``tune:`` section::

    tune:
      num_samples: 4
      metric: mean_val_accuracy        # validation only; never a test metric
      mode: max
      max_concurrent: 1
      grace_period: 1                  # ASHA: rounds before a trial may be stopped
      space:
        strategy.params.threshold: {uniform: [-0.2, 0.6]}
        strategy.params.temperature: {choice: [null, 0.1, 0.5]}
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.peft.r: {choice: [4, 8]}

Each ``space`` key is a dotted path into the run config; each value one distribution:
``uniform: [lo, hi]``, ``loguniform: [lo, hi]``, ``randint: [lo, hi]`` (both ends included),
``choice: [v, ...]`` or ``grid: [v, ...]`` (every value, ``num_samples`` times each).
Everything here is pure (no Ray): the Ray Tune domains are built in :mod:`.search`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedbip_ray.config import Config, ConfigError, config_from_dict
from fedbip_ray.config_io import apply_overrides, read_yaml, set_path

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
#: Keys a search may not touch: the trial's resource reservation is computed from them, the
#: scheduler's budget is the number of rounds, and tracking is set per trial.
FORBIDDEN_PREFIXES = ("resources", "tracking", "federation.rounds", "federation.eval_every",
                      "name", "tune")
#: Validation metrics a search may select on (reported by every trial each evaluated round).
METRICS = ("mean_val_accuracy", "worst10_val_accuracy")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_Strict):
    """One dimension of the search space (exactly one distribution)."""

    kind: Literal["uniform", "loguniform", "randint", "choice", "grid"]
    values: tuple[Any, ...]

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        v = self.values
        if self.kind in ("choice", "grid"):
            if not v:
                raise ValueError(f"{self.kind} needs at least one value")
            return self
        if len(v) != 2 or not all(_is_number(x) for x in v):
            raise ValueError(f"{self.kind} needs [low, high] numbers, got {list(v)}")
        lo, hi = float(v[0]), float(v[1])
        if not lo < hi and not (self.kind == "randint" and lo == hi):
            raise ValueError(f"{self.kind} needs low < high, got [{v[0]}, {v[1]}]")
        if self.kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform needs low > 0, got {v[0]}")
        if self.kind == "randint" and not all(float(x).is_integer() for x in v):
            raise ValueError(f"randint needs integer bounds, got {list(v)}")
        return self

    def corners(self) -> list[Any]:
        """Values that bound the dimension (each choice, or both ends of a range)."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        if self.kind == "randint":
            return [int(self.values[0]), int(self.values[1])]
        return [float(self.values[0]), float(self.values[1])]


class TuneSettings(_Strict):
    """The ``tune:`` section."""

    num_samples: int = Field(4, ge=1, le=10_000)
    metric: Literal["mean_val_accuracy", "worst10_val_accuracy"] = "mean_val_accuracy"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int = Field(1, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    seed: int = Field(0, ge=0)
    actors_per_trial: int | None = Field(None, ge=1)
    log_adapters: bool = False
    final_eval: Literal["trial", "rerun"] = "trial"
    space: dict[str, ParamSpec] = Field(default_factory=dict)

    @field_validator("space", mode="before")
    @classmethod
    def _parse_space(cls, raw: Any) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise ValueError("must be a mapping of dotted.key: {distribution: values}")
        out: dict[str, Any] = {}
        for key, spec in _flatten_space(raw).items():
            if not isinstance(spec, Mapping) or len(spec) != 1:
                raise ValueError(f"'{key}': give exactly one of {', '.join(DISTRIBUTIONS)}")
            ((kind, values),) = spec.items()
            if kind not in DISTRIBUTIONS:
                raise ValueError(f"'{key}': unknown distribution {kind!r} "
                                 f"(known: {', '.join(DISTRIBUTIONS)})")
            if not isinstance(values, list | tuple):
                raise ValueError(f"'{key}': {kind} needs a list, got {values!r}")
            if any(str(key) == p or str(key).startswith(p + ".") for p in FORBIDDEN_PREFIXES):
                raise ValueError(f"'{key}' cannot be searched (fixed per search: "
                                 f"{', '.join(FORBIDDEN_PREFIXES)})")
            out[str(key)] = {"kind": kind, "values": tuple(values)}
        return out

    @model_validator(mode="after")
    def _nonempty(self) -> TuneSettings:
        if not self.space:
            raise ValueError("give at least one parameter to search")
        return self


def _flatten_space(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys: ``{train: {lr: {uniform: ..}}}`` is ``train.lr`` (so
    ``--set tune.space.train.lr.uniform=[0.001,0.01]`` works). A mapping whose values are all
    mappings is a section; anything else is a leaf (a distribution, checked later)."""
    out: dict[str, Any] = {}
    for key, spec in raw.items():
        name = f"{prefix}{key}"
        if (isinstance(spec, Mapping) and spec
                and all(isinstance(v, Mapping) for v in spec.values())):
            out.update(_flatten_space(spec, name + "."))
        else:
            out[name] = spec
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p not in ("kind", "values")) or "space"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"config field 'tune.{loc}': {msg}"


def parse_settings(raw: Any) -> TuneSettings:
    """Validate a ``tune:`` mapping; ConfigError with one line naming the field."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config field 'tune': must be a mapping (with at least a 'space')")
    try:
        return TuneSettings.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def split_tune_config(data: Mapping[str, Any], overrides: Sequence[str] = ()
                      ) -> tuple[dict[str, Any], Config, TuneSettings]:
    """(run-config mapping, validated Config, TuneSettings) from a tune config mapping.

    ``overrides`` (``dotted.key=value``) apply to both parts (``tune.num_samples=2`` too).
    """
    merged = apply_overrides(dict(data), overrides)
    if "tune" not in merged:
        raise ConfigError("config field 'tune': missing (a tune config is a run config plus a "
                          "'tune:' section with a search 'space')")
    raw_tune = merged.pop("tune")
    settings = parse_settings(raw_tune)
    cfg = config_from_dict(merged)
    return merged, cfg, settings


def load_tune_config(path: str | Path, overrides: Sequence[str] = ()
                     ) -> tuple[dict[str, Any], Config, TuneSettings]:
    """:func:`split_tune_config` of the YAML file at ``path``."""
    return split_tune_config(read_yaml(path), overrides)


def set_dotted(data: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``a.b.c`` set to ``value`` (sections created as needed)."""
    out = apply_overrides(dict(data), [])
    set_path(out, key.split("."), value, f"config field '{key}'")
    return out


def plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (YAML, JSON and pydantic want plain values)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def apply_params(data: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the run-config mapping with each ``dotted.key: value`` of ``params`` set."""
    out = dict(data)
    for key, value in params.items():
        out = set_dotted(out, key, plain(value))
    return out


def trial_config(data: Mapping[str, Any], params: Mapping[str, Any]) -> Config:
    """The validated Config of one trial (ConfigError naming the field if invalid)."""
    return config_from_dict(apply_params(data, params))


def check_space(data: Mapping[str, Any], settings: TuneSettings) -> None:
    """Fail fast: every bound of every dimension must give a valid config on its own.

    Raises ConfigError ``tune.space.'KEY' = VALUE: <reason>``.
    """
    for key, spec in settings.space.items():
        for value in spec.corners():
            try:
                trial_config(data, {key: value})
            except ConfigError as err:
                raise ConfigError(f"tune.space.'{key}' = {value!r}: {err}") from None


def sample_space(space: Mapping[str, ParamSpec], num_samples: int, seed: int
                 ) -> list[dict[str, Any]]:
    """Concrete parameter sets, as Ray Tune's variant generator would: every combination of
    the ``grid`` dimensions, ``num_samples`` times each, other dimensions sampled at random."""
    rng = np.random.default_rng(seed)
    grid_keys = [k for k, s in space.items() if s.kind == "grid"]
    combos = list(itertools.product(*[space[k].values for k in grid_keys])) or [()]
    out: list[dict[str, Any]] = []
    for _ in range(num_samples):
        for combo in combos:
            params: dict[str, Any] = dict(zip(grid_keys, combo, strict=True))
            for key, spec in space.items():
                if spec.kind != "grid":
                    params[key] = sample_one(spec, rng)
            out.append(params)
    return out


def sample_one(spec: ParamSpec, rng: np.random.Generator) -> Any:
    """One draw from a (non-grid) dimension."""
    v = spec.values
    if spec.kind == "uniform":
        return float(rng.uniform(float(v[0]), float(v[1])))
    if spec.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(float(v[0])), math.log(float(v[1])))))
    if spec.kind == "randint":
        return int(rng.integers(int(v[0]), int(v[1]) + 1))
    return v[int(rng.integers(len(v)))]
