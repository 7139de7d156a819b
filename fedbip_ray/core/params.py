"""Strategy parameters: one declarative check per parameter, applied once.

A strategy class declares each parameter as a dataclass field made with :func:`param`, whose
:class:`Check` states the accepted values. :func:`check_params` validates and normalizes a raw
mapping against those fields; it is the only validator of strategy parameters, and building a
strategy from its output checks nothing again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np

__all__ = ["NONNEGATIVE", "POSITIVE", "Check", "ParamError", "check_params", "param", "param_names"]

Kind = Literal["number", "integer", "bool", "choice", "custom"]


class ParamError(ValueError):
    """A bad strategy parameter; ``param`` names it (None when no single one is at fault)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Check:
    """The accepted values of one parameter.

    ``kind``: ``number`` (finite real, returned as float), ``integer`` (an int, or a float
    with an integral value; returned as int), ``bool``, ``choice`` (one of ``choices``), or
    ``custom`` (``convert(value)`` returns the normalized value or raises ValueError with the
    whole message). ``ge``/``gt``/``le``/``lt`` bound numbers and integers; ``optional``
    also accepts None.
    """

    kind: Kind
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False
    convert: Callable[[Any], Any] | None = None

    def describe(self) -> str:
        """What the check accepts, e.g. ``in [-1, 1]`` or ``an integer >= 1``."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return f"one of {', '.join(self.choices)}"
        lo = (f"[{_fmt(self.ge)}" if self.ge is not None
              else f"({_fmt(self.gt)}" if self.gt is not None else None)
        hi = (f"{_fmt(self.le)}]" if self.le is not None
              else f"{_fmt(self.lt)})" if self.lt is not None else None)
        if lo is not None and hi is not None:
            return f"in {lo}, {hi}"
        noun = "an integer" if self.kind == "integer" else "a finite number"
        bounds = [f"{op} {_fmt(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le),
                                                   ("<", self.lt)) if v is not None]
        return " ".join([noun, *bounds])

    def _in_bounds(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def _convert(self, value: Any) -> Any:
        """The normalized value, or None when ``value`` is not accepted."""
        if self.kind == "bool":
            return bool(value) if isinstance(value, bool | np.bool_) else None
        if self.kind == "choice":
            return value if isinstance(value, str) and value in self.choices else None
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            return None
        if self.kind == "integer":
            if not isinstance(value, Integral) and not float(value).is_integer():
                return None
            value = int(value)
        else:
            value = float(value)
        return value if self._in_bounds(value) else None

    def __call__(self, name: str, value: Any) -> Any:
        """``value`` validated and normalized; ParamError naming ``name`` otherwise."""
        if value is None and self.optional:
            return None
        if self.kind == "custom":
            assert self.convert is not None, "a custom check needs convert"
            try:
                return self.convert(value)
            except ValueError as exc:
                raise ParamError(str(exc), name) from None
        out = self._convert(value)
        if out is None:
            null = " or null" if self.optional else ""
            raise ParamError(f"{name} must be {self.describe()}{null}, got {value!r}", name)
        return out


POSITIVE = Check("number", gt=0)
NONNEGATIVE = Check("number", ge=0)


def param(default: Any, check: Check) -> Any:
    """A dataclass field for a strategy parameter: ``default`` plus its ``check``."""
    return dataclasses.field(default=default, metadata={"check": check})


def param_names(cls: type) -> tuple[str, ...]:
    """The parameters a strategy class takes (its init fields, in declaration order)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def check_params(cls: type, params: Mapping[str, Any] | None, label: str) -> dict[str, Any]:
    """``params`` validated against ``cls``'s fields: the given keys, normalized.

    Raises ParamError for an unknown key (naming strategy ``label`` and the valid keys), a
    bad value (naming the parameter), or a failed ``cls.check_together(values)`` over the
    given values merged into the defaults.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key not in fields:
            takes = f"valid: {', '.join(fields)}" if fields else "it takes no parameters"
            raise ParamError(f"unknown parameter {key!r} for strategy {label!r} ({takes})", key)
        check = fields[key].metadata.get("check")
        out[key] = check(key, value) if check is not None else value
    together = getattr(cls, "check_together", None)
    if together is not None:
        together({**{k: f.default for k, f in fields.items()}, **out})
    return out
