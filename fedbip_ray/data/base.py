"""What every dataset loader shares: the :class:`LoadedDataset` it returns and the lookup of
data files shipped inside installed packages (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedbip_ray.config import ConfigError


@dataclass(frozen=True)
class LoadedDataset:
    """Examples plus label names; ``frame`` has text/label[/client] columns (n rows).

    ``splits`` (n,) str: the split ("train"/"val"/"test") the user gave each row, None for a
    random split; ``group_keys`` (n,) str: each row's true group, None when unknown.
    """

    frame: pd.DataFrame
    label_names: tuple[str, ...]
    splits: np.ndarray | None = None
    group_keys: np.ndarray | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def package_dir(package: str, install_hint: str) -> Path:
    """The directory of an installed (never imported) data package; ConfigError with
    ``install_hint`` when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data package '{package}' is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])
