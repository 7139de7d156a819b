"""Config input and output: the YAML reader and writer, ``--set dotted.key=value`` overrides,
and :class:`ConfigError`, the one-line error every config or input check raises.

:func:`read_yaml` is the one reader of YAML files (run configs, tune configs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from fedbip_ray.config import Config


class ConfigError(ValueError):
    """A configuration or input error; ``str(err)`` is one line for the user."""


class RunFailed(RuntimeError):
    """A run stopped by a failure it cannot go on from (e.g. a server shard died); ``str(err)``
    is one line for the user, and the last checkpoint is intact (``--resume`` continues)."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=VALUE"`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return parts, value


def set_path(data: dict[str, Any], parts: Sequence[str], value: Any, label: str) -> None:
    """Set ``data[parts[0]]...[parts[-1]] = value`` in place, creating sections as needed;
    a non-section on the way raises ConfigError prefixed with ``label``."""
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{label}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` applied."""
    out: dict[str, Any] = _deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        set_path(out, parts, value, f"override {text!r}")
    return out


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file at ``path`` (an empty file: ``{}``).

    ConfigError, one line naming the file: not found; not a text YAML file (not UTF-8, or
    control characters such as binary garbage); invalid YAML (with its line); top level not a
    mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}': not found")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file '{p}': cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.reader.ReaderError):
        raise ConfigError(f"config file '{p}': not a text YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = f" ({exc.problem})" if getattr(exc, "problem", None) else ""
        raise ConfigError(f"config file '{p}'{where}: invalid YAML{problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}': top level must be a mapping")
    return data


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
