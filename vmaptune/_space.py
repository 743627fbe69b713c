"""Search spaces: distributions and their sampling scale (regions: ``_region``).

Every numeric distribution is sampled uniformly in its *sampling coordinate*
``t``: ``t = x`` for :func:`uniform` and linear :func:`integer`, ``t = log(x)``
for :func:`loguniform` and ``integer(..., log=True)``, and ``t = log(1 - x)``
for :func:`reverse_loguniform`. Zoom regions and grids live in the same
coordinates, so "the region around the best lanes" means the same thing on a
log axis as it does on a linear one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

__all__ = [
    "Distribution",
    "Uniform",
    "LogUniform",
    "ReverseLogUniform",
    "Integer",
    "Choice",
    "uniform",
    "loguniform",
    "reverse_loguniform",
    "integer",
    "choice",
]


def _real(name: str, value: Any, arg: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
        f"{name}: `{arg}` must be a real number, got {value!r} "
        f"of type {type(value).__name__}."
    )
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{name}: `{arg}` must be finite, got {value!r}.")
  return value


def _ordered(name: str, low: float, high: float) -> None:
  if not low < high:
    hint = (
        " For a fixed value put the plain value in the space instead."
        if low == high
        else " Swap them."
    )
    raise ValueError(
        f"{name}: `low` must be smaller than `high`, got low={low!r}, "
        f"high={high!r}.{hint}"
    )


class Distribution:
  """Base class of the distributions a search space may hold.

  Numeric distributions map a value ``x`` to the coordinate ``t`` in which
  they are sampled uniformly (:meth:`to_coord`) and back (:meth:`from_coord`).

  >>> import numpy as np, vmaptune as vt
  >>> d = vt.loguniform(1e-4, 1e-1)
  >>> isinstance(d, vt.Distribution), d.scale
  (True, 'log')
  >>> all(1e-4 <= x <= 1e-1 for x in d.sample(np.random.default_rng(0), 5))
  True
  """

  #: ``"linear"``, ``"log"`` or ``"reverse_log"``: the axis to plot on.
  scale: str = "linear"

  def bounds(self) -> tuple[float, float]:
    """The distribution's extent in sampling coordinates, ``lo < hi``."""
    raise NotImplementedError

  def to_coord(self, x: Any) -> float:
    raise NotImplementedError

  def from_coord(self, t: float) -> Any:
    raise NotImplementedError

  def sample(self, rng: np.random.Generator, n: int, region=None) -> list:
    """Draws ``n`` values uniformly in sampling coordinates."""
    lo, hi = self.bounds() if region is None else region
    return [self.from_coord(t) for t in rng.uniform(lo, hi, size=n)]

  def grid(self, n: int, region=None) -> list:
    """``n`` evenly spaced values in sampling coordinates (ends included)."""
    lo, hi = self.bounds() if region is None else region
    ts = [0.5 * (lo + hi)] if n == 1 else np.linspace(lo, hi, n)
    out = []
    for t in ts:
      x = self.from_coord(float(t))
      if x not in out:
        out.append(x)
    return out


@dataclasses.dataclass(frozen=True)
class Uniform(Distribution):
  """Uniform on ``[low, high]``."""

  low: float
  high: float
  scale = "linear"

  def __post_init__(self):
    low = _real("uniform", self.low, "low")
    high = _real("uniform", self.high, "high")
    _ordered("uniform", low, high)
    object.__setattr__(self, "low", low)
    object.__setattr__(self, "high", high)

  def bounds(self):
    return (self.low, self.high)

  def to_coord(self, x):
    return float(x)

  def from_coord(self, t):
    return float(min(max(t, self.low), self.high))


@dataclasses.dataclass(frozen=True)
class LogUniform(Distribution):
  """Log-uniform on ``[low, high]``, ``0 < low < high``."""

  low: float
  high: float
  scale = "log"

  def __post_init__(self):
    low = _real("loguniform", self.low, "low")
    high = _real("loguniform", self.high, "high")
    if low <= 0:
      raise ValueError(
          f"loguniform: `low` must be > 0 (a log scale has no zero or "
          f"negative values), got low={low!r}. Use uniform() for ranges "
          "that include 0."
      )
    _ordered("loguniform", low, high)
    object.__setattr__(self, "low", low)
    object.__setattr__(self, "high", high)

  def bounds(self):
    return (math.log(self.low), math.log(self.high))

  def to_coord(self, x):
    return math.log(x)

  def from_coord(self, t):
    return float(min(max(math.exp(t), self.low), self.high))


@dataclasses.dataclass(frozen=True)
class ReverseLogUniform(Distribution):
  """``1 - x`` log-uniform, for values near 1 such as momentum β.

  ``reverse_loguniform(0.9, 0.999)`` samples ``1 - β`` log-uniformly in
  ``[1e-3, 1e-1]``: as many draws land in ``[0.99, 0.999]`` as in
  ``[0.9, 0.99]``.
  """

  low: float
  high: float
  scale = "reverse_log"

  def __post_init__(self):
    low = _real("reverse_loguniform", self.low, "low")
    high = _real("reverse_loguniform", self.high, "high")
    for arg, v in (("low", low), ("high", high)):
      if not 0.0 < v < 1.0:
        raise ValueError(
            f"reverse_loguniform: `{arg}` must lie strictly between 0 and 1 "
            f"(it samples 1 - x on a log scale), got {arg}={v!r}."
        )
    _ordered("reverse_loguniform", low, high)
    object.__setattr__(self, "low", low)
    object.__setattr__(self, "high", high)

  def bounds(self):
    # log(1 - x) decreases in x: high maps to the lower coordinate.
    return (math.log1p(-self.high), math.log1p(-self.low))

  def to_coord(self, x):
    return math.log1p(-x)

  def from_coord(self, t):
    return float(min(max(-math.expm1(t), self.low), self.high))


@dataclasses.dataclass(frozen=True)
class Integer(Distribution):
  """An integer in ``[low, high]``, both inclusive; log-uniform if ``log``."""

  low: int
  high: int
  log: bool = False

  def __post_init__(self):
    for arg in ("low", "high"):
      v = getattr(self, arg)
      if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(
            f"integer: `{arg}` must be an int, got {v!r} of type "
            f"{type(v).__name__}."
        )
      object.__setattr__(self, arg, int(v))
    _ordered("integer", self.low, self.high)
    if self.log and self.low < 1:
      raise ValueError(
          f"integer(log=True): `low` must be >= 1, got low={self.low}."
      )
    if not isinstance(self.log, bool):
      raise TypeError(f"integer: `log` must be a bool, got {self.log!r}.")

  @property
  def scale(self):  # type: ignore[override]
    return "log" if self.log else "linear"

  def bounds(self):
    # Widen by half a unit so rounding gives every integer the same mass.
    lo, hi = self.low - 0.5, self.high + 0.5
    return (math.log(lo), math.log(hi)) if self.log else (lo, hi)

  def to_coord(self, x):
    return math.log(x) if self.log else float(x)

  def from_coord(self, t):
    x = math.exp(t) if self.log else t
    return int(min(max(round(x), self.low), self.high))

  def grid(self, n, region=None):
    lo, hi = self.bounds() if region is None else region
    # Grid over the integers themselves, not the half-unit padding.
    a, b = self.from_coord(lo + 1e-9), self.from_coord(hi - 1e-9)
    ta, tb = self.to_coord(a), self.to_coord(b)
    ts = [0.5 * (ta + tb)] if n == 1 else np.linspace(ta, tb, n)
    out = []
    for t in ts:
      x = self.from_coord(float(t))
      if x not in out:
        out.append(x)
    return out


@dataclasses.dataclass(frozen=True)
class Choice(Distribution):
  """One of ``values``, each equally likely."""

  values: tuple
  scale = "categorical"

  def __post_init__(self):
    values = self.values
    if isinstance(values, (str, bytes)) or not isinstance(
        values, (Sequence, set, frozenset, range, np.ndarray)
    ):
      raise TypeError(
          f"choice: `values` must be a list or tuple of options, got "
          f"{values!r}."
      )
    values = tuple(v.item() if isinstance(v, np.generic) else v for v in values)
    if not values:
      raise ValueError("choice: `values` must not be empty.")
    seen = []
    for v in values:
      try:
        hash(v)
      except TypeError:
        raise TypeError(
            f"choice: every value must be hashable (it names a program "
            f"bucket), got {v!r} of type {type(v).__name__}."
        ) from None
      if v in seen:
        raise ValueError(f"choice: duplicate value {v!r} in {list(values)}.")
      seen.append(v)
    object.__setattr__(self, "values", values)

  def sample(self, rng, n, region=None):
    vals = self.values if region is None else tuple(region)
    return [vals[i] for i in rng.integers(0, len(vals), size=n)]

  def grid(self, n, region=None):
    return list(self.values if region is None else region)


def uniform(low: float, high: float, log: bool = False) -> Uniform | LogUniform:
  """A float drawn uniformly from ``[low, high]``; with ``log``, as
  :func:`loguniform` (Optuna's ``suggest_float(..., log=True)``).

  >>> import vmaptune as vt
  >>> vt.uniform(0.0, 1.0)
  Uniform(low=0.0, high=1.0)
  >>> vt.uniform(1e-4, 1e-1, log=True) == vt.loguniform(1e-4, 1e-1)
  True
  """
  if not isinstance(log, bool):
    raise TypeError(f"uniform: `log` must be a bool, got {log!r}.")
  return LogUniform(low, high) if log else Uniform(low, high)


def loguniform(low: float, high: float) -> LogUniform:
  """A positive float whose log is uniform: for learning rates and ε.

  >>> import vmaptune as vt
  >>> vt.loguniform(1e-4, 1e-1).bounds()  # sampled uniformly in log space
  (-9.210340371976182, -2.3025850929940455)
  """
  return LogUniform(low, high)


def reverse_loguniform(low: float, high: float) -> ReverseLogUniform:
  """A float in (0, 1) whose ``1 - x`` is log-uniform: for β near 1.

  >>> import vmaptune as vt
  >>> d = vt.reverse_loguniform(0.9, 0.999)
  >>> round(d.from_coord(d.to_coord(0.99)), 6)
  0.99
  """
  return ReverseLogUniform(low, high)


def integer(low: int, high: int, log: bool = False) -> Integer:
  """An int in ``[low, high]``, both ends included (log-uniform if ``log``).

  >>> import vmaptune as vt
  >>> vt.integer(1, 3)
  Integer(low=1, high=3, log=False)
  """
  return Integer(low, high, log)


def choice(values: Sequence[Hashable]) -> Choice:
  """One of a list of values (widths, batch sizes, activation names, ...).

  >>> import vmaptune as vt
  >>> vt.choice([32, 64, 128]).values
  (32, 64, 128)
  """
  return Choice(values)


# --------------------------------------------------------------------------
# Spaces
# --------------------------------------------------------------------------

_CONSTANT_TYPES = (
    numbers.Number,
    str,
    bytes,
    type(None),
    tuple,
    types.FunctionType,
    types.BuiltinFunctionType,
    np.generic,
)


def validate_space(space: Any) -> dict[str, Any]:
  """Checks a user's space and returns it as a plain dict (constants as-is)."""
  if not isinstance(space, Mapping):
    raise TypeError(
        f"`space` must be a dict mapping names to distributions or constants, "
        f"got {type(space).__name__}."
    )
  if not space:
    raise ValueError(
        "`space` is empty: give at least one hyperparameter, e.g. "
        "{'learning_rate': vt.loguniform(1e-4, 1e-1)}."
    )
  out = {}
  for name, value in space.items():
    if not isinstance(name, str) or not name:
      raise TypeError(f"`space` keys must be non-empty strings, got {name!r}.")
    if isinstance(value, Distribution):
      out[name] = value
    elif isinstance(value, (list, set, frozenset)):
      raise TypeError(
          f"space[{name!r}] is a {type(value).__name__}: did you mean "
          f"vt.choice({list(value)!r})? Use a tuple for a constant sequence."
      )
    elif isinstance(value, _CONSTANT_TYPES) or (
        callable(value) and not _looks_like_distribution(value)
    ):
      if isinstance(value, np.generic):
        value = value.item()
      out[name] = value
    else:
      raise TypeError(
          f"space[{name!r}]: unknown distribution object {value!r} of type "
          f"{type(value).__name__}. Use vt.uniform, vt.loguniform, "
          "vt.reverse_loguniform, vt.integer or vt.choice, or a plain "
          "constant (number, string, bool, None, tuple or function)."
      )
  return out


def _looks_like_distribution(value: Any) -> bool:
  # scipy frozen distributions and optuna distributions are callables or
  # objects with sampling methods; refuse them instead of treating them as
  # constants handed to the model.
  return any(hasattr(value, a) for a in ("rvs", "sample", "single", "to_internal_repr"))


def searched(space: Mapping[str, Any]) -> dict[str, Distribution]:
  """The names in ``space`` that are distributions (not constants)."""
  return {k: v for k, v in space.items() if isinstance(v, Distribution)}


def constants(space: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in space.items() if not isinstance(v, Distribution)}


def complete(space: Mapping[str, Any], *parts: Mapping[str, Any]) -> dict[str, Any]:
  """A whole config in the space's key order: its constants, then ``parts``
  (later ones win); keys outside the space are dropped."""
  merged = constants(space)
  for part in parts:
    merged.update(part)
  return {k: merged[k] for k in space}


def describe(d: Any) -> str:
  """A short human description of a space entry, for tables and errors."""
  if isinstance(d, Choice):
    return f"choice{list(d.values)}"
  if isinstance(d, Integer):
    return f"integer({d.low}, {d.high}{', log' if d.log else ''})"
  if isinstance(d, (Uniform, LogUniform, ReverseLogUniform)):
    name = {Uniform: "uniform", LogUniform: "loguniform", ReverseLogUniform: "reverse_loguniform"}[type(d)]
    return f"{name}({d.low:g}, {d.high:g})"
  return repr(d)


def to_json(d: Any) -> Any:
  """A JSON-able description of a space entry; :func:`from_json` inverts it."""
  if isinstance(d, Uniform):
    return {"dist": "uniform", "low": d.low, "high": d.high}
  if isinstance(d, LogUniform):
    return {"dist": "loguniform", "low": d.low, "high": d.high}
  if isinstance(d, ReverseLogUniform):
    return {"dist": "reverse_loguniform", "low": d.low, "high": d.high}
  if isinstance(d, Integer):
    return {"dist": "integer", "low": d.low, "high": d.high, "log": d.log}
  if isinstance(d, Choice):
    return {"dist": "choice", "values": [_jsonable(v) for v in d.values]}
  return {"dist": "constant", "value": _jsonable(d)}


def _jsonable(v: Any) -> Any:
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, tuple):
    return {"tuple": [_jsonable(x) for x in v]}
  if callable(v):
    return {"callable": f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"}
  return {"repr": repr(v)}


def _from_jsonable(v: Any) -> Any:
  if isinstance(v, dict):
    if "tuple" in v:
      return tuple(_from_jsonable(x) for x in v["tuple"])
    if "callable" in v:
      return v["callable"]
    if "repr" in v:
      return v["repr"]
  return v


def from_json(obj: Mapping[str, Any]) -> Any:
  kind = obj["dist"]
  if kind == "uniform":
    return Uniform(obj["low"], obj["high"])
  if kind == "loguniform":
    return LogUniform(obj["low"], obj["high"])
  if kind == "reverse_loguniform":
    return ReverseLogUniform(obj["low"], obj["high"])
  if kind == "integer":
    return Integer(obj["low"], obj["high"], obj["log"])
  if kind == "choice":
    return Choice(tuple(_from_jsonable(v) for v in obj["values"]))
  return _from_jsonable(obj["value"])

