"""Python API: run a federation, join new clients to it, load any client's model.

Example::

    import fedbip_ray

    summary = fedbip_ray.run("jobs/configs/quickstart.yaml", output="runs/qs",
                             federation__rounds=3)
    joined = fedbip_ray.join("runs/qs", "new_users.csv", client_column="user")
    print(joined[0].weights, joined[0].test["accuracy"])
    model = fedbip_ray.load_client_model("runs/qs", 3)                # a stored client
    model = fedbip_ray.load_client_model("runs/qs", joined[0].name)   # a joined one
    with fedbip_ray.reuse_actors():  # later runs start on the first run's warm actors
        ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbip_ray.config import Config, ConfigError, config_from_dict, load_config

if TYPE_CHECKING:
    from fedbip_ray.runtime.join import JoinResult

__all__ = ["join", "load_client_model", "reuse_actors", "run"]


def _overrides(sets: Mapping[str, Any]) -> list[str]:
    """``{"federation.rounds": 3}`` (or ``federation__rounds=3``) as
    ``["federation.rounds=3"]`` (values as YAML)."""
    import yaml

    out = []
    for key, value in sets.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True)
        value_text = str(text).strip().removesuffix("...").strip()
        out.append(f"{key.replace('__', '.')}={value_text}")
    return out


def _config(config: str | Path | Mapping[str, Any] | Config, sets: Mapping[str, Any]) -> Config:
    if isinstance(config, Config):
        return config_from_dict(config.to_dict(), _overrides(sets)) if sets else config
    if isinstance(config, Mapping):
        return config_from_dict(config, _overrides(sets))
    return load_config(config, _overrides(sets))


def run(config: str | Path | Mapping[str, Any] | Config, output: str | Path | None = None,
        **sets: Any) -> dict[str, Any]:
    """Run a federation (as ``fedbip run``) and return its ``summary.json`` content.

    Args:
        config: a YAML path, a config mapping or a :class:`~fedbip_ray.config.Config`.
        output: output directory or storage URI (default ``runs/<name>``).
        **sets: overrides, dotted (``**{"strategy.name": "fedavg"}``) or with ``__`` for the
            dots (``federation__rounds=3``).

    Example::

        summary = fedbip_ray.run("jobs/configs/quickstart.yaml", output="runs/qs",
                                 federation__rounds=3, strategy__name="fedbip")
        print(summary["mean_accuracy"])
    """
    from fedbip_ray.runtime.federation import run_federation

    cfg = _config(config, sets)
    callbacks = []
    if cfg.tracking.mlflow:
        from fedbip_ray.tracking.mlflow_logger import MlflowCallback

        callbacks.append(MlflowCallback(cfg))
    out = str(output) if output is not None else str(Path("runs") / cfg.name)  # path or URI
    return run_federation(cfg, out, callbacks=callbacks, echo=lambda s: None)


def reuse_actors() -> AbstractContextManager[None]:
    """Inside this block, runs on the embedded local Ray keep their client actors warm for the
    next run of the same shape (actors, CPUs and GPUs per actor) instead of starting new ones:
    no second import of torch and peft, no second model load. Leaving the block stops them.

    Example::

        with fedbip_ray.reuse_actors():
            for name in ("fedavg", "fedbip"):
                fedbip_ray.run("jobs/configs/quickstart.yaml", strategy__name=name)
    """
    from fedbip_ray.runtime.actor_pool import reuse_actors as pool

    return pool()


def join(run_dir: str | Path, data: str | Path, client_column: str | None = None,
         output: str | Path | None = None, overrides: Sequence[str] = (),
         quiet: bool = True) -> list[JoinResult]:
    """Give the newcomers in ``data`` a personalized adapter from the run in ``run_dir``
    (as ``fedbip join``); one :class:`~fedbip_ray.runtime.join.JoinResult` per newcomer.

    Example::

        res = fedbip_ray.join("runs/qs", "new_users.parquet", client_column="user")
        best = max(range(len(res[0].weights)), key=res[0].weights.__getitem__)
        print(res[0].peers[best], res[0].mix, res[0].test["accuracy"])
    """
    from fedbip_ray.runtime.join import join_run

    echo = (lambda s: None) if quiet else print
    return join_run(run_dir, data, client_column, overrides, output, echo=echo)


def load_client_model(run_dir: str | Path, client: int | str,
                      joined_dir: str | Path | None = None) -> Any:
    """Client ``client``'s personalized model as a ``peft.PeftModel`` in eval mode, on CPU.

    ``client`` is a stored client's id (from the run's latest checkpoint) or a joined
    newcomer's name or directory (from ``joined_dir``, default ``run_dir/joined``).

    Example::

        model = fedbip_ray.load_client_model("runs/qs", 2)
        logits = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
    """
    import numpy as np

    from fedbip_ray.runtime.join import load_run

    snap = load_run(run_dir)
    if isinstance(client, int) and not isinstance(client, bool):
        if not 0 <= client < snap.shards.num_clients:
            raise ConfigError(f"client {client}: the run has clients "
                              f"0..{snap.shards.num_clients - 1}")
        state = snap.states[client]
    else:
        state = _joined_state(Path(joined_dir) if joined_dir else snap.run_dir / "joined",
                              str(client))
    return _model_with_state(snap, np.asarray(state, dtype=np.float32))


def _joined_state(directory: Path, name: str) -> Any:
    """The flat state of the joined newcomer called ``name`` (or stored in dir ``name``)."""
    import json

    from safetensors.numpy import load_file

    try:
        entries = json.loads((directory / "summary.json").read_text())["newcomers"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{directory}: no join summary (summary.json)") from None
    for e in entries:
        if name in (e.get("name"), e.get("directory")):
            return load_file(str(directory / e["directory"] / "state.safetensors"))["state"]
    raise ConfigError(f"{directory}: no joined client '{name}' "
                      f"(joined: {[e.get('name') for e in entries]})")


def _model_with_state(snap: Any, state: Any) -> Any:
    """The run's base model + adapter (built on CPU) with ``state`` loaded."""
    import torch

    from fedbip_ray.core.taskvector import Layout
    from fedbip_ray.training.registry import make_trainer

    trainer = make_trainer(snap.cfg, snap.shards.num_labels, torch.device("cpu"))
    diff = trainer.layout.first_difference(snap.layout)
    if diff:
        raise ConfigError(f"the run's checkpoint adapter does not match the model ({diff})")
    assert isinstance(snap.layout, Layout)
    trainer.load_state(state)
    return trainer.model.eval()
