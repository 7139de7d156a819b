"""fedbip-ray: personalized federated fine-tuning with FedBip on Ray.

The Python API (:mod:`fedbip_ray.api`) is loaded on first use, so ``import fedbip_ray`` stays
free of torch and ray::

    import fedbip_ray

    summary = fedbip_ray.run("jobs/configs/quickstart.yaml", output="runs/qs")
    joined = fedbip_ray.join("runs/qs", "new_users.csv", client_column="user")
    model = fedbip_ray.load_client_model("runs/qs", joined[0].name)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["join", "load_client_model", "reuse_actors", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedbip_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedbip_ray' has no attribute {name!r}")
