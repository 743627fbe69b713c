"""Regions of a space: boxes in sampling coordinates, and drawing inside them.

A zoom round samples inside the region around the best trials so far; random,
grid and quasi-random draws all take a :class:`Region` (the full space is
``Region.full(space)``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ._space import Choice, Distribution, Integer, searched

__all__ = ["Region", "sample_values", "grid_values", "coords", "zoom_region"]


@dataclasses.dataclass(frozen=True)
class Region:
  """A box in sampling coordinates (numeric) and allowed values (choices).

  ``result.regions[r]`` is the region round ``r`` sampled.

  >>> import vmaptune as vt
  >>> space = {"lr": vt.loguniform(1e-4, 1e-1), "h": vt.choice([32, 64])}
  >>> region = vt.Region.full(space)
  >>> region.choices["h"], region.contains(space, {"lr": 1e-3, "h": 32})
  ((32, 64), True)

  Attributes:
    numeric: name -> ``(lo, hi)`` in the distribution's sampling coordinate.
    choices: name -> tuple of allowed values.
  """

  numeric: Mapping[str, tuple[float, float]]
  choices: Mapping[str, tuple]

  @classmethod
  def full(cls, space: Mapping[str, Any]) -> "Region":
    numeric, choices = {}, {}
    for k, d in searched(space).items():
      if isinstance(d, Choice):
        choices[k] = d.values
      else:
        numeric[k] = d.bounds()
    return cls(numeric, choices)

  def get(self, name: str):
    if name in self.numeric:
      return self.numeric[name]
    return self.choices.get(name)

  def to_json(self) -> dict:
    return {
        "numeric": {k: list(v) for k, v in self.numeric.items()},
        "choices": {k: list(v) for k, v in self.choices.items()},
    }

  @classmethod
  def from_json(cls, obj: Mapping[str, Any]) -> "Region":
    return cls(numeric={k: tuple(v) for k, v in obj["numeric"].items()},
               choices={k: tuple(v) for k, v in obj["choices"].items()})

  def contains(self, space, config: Mapping[str, Any], tol: float = 1e-9) -> bool:
    for k, (lo, hi) in self.numeric.items():
      d = space[k]
      t = d.to_coord(config[k])
      if isinstance(d, Integer):
        # An integer region is the set of integers whose rounding lands in it.
        if not (d.from_coord(lo + 1e-12) <= config[k] <= d.from_coord(hi - 1e-12)):
          return False
      elif not (lo - tol * max(1.0, abs(lo)) <= t <= hi + tol * max(1.0, abs(hi))):
        return False
    for k, vals in self.choices.items():
      if config[k] not in vals:
        return False
    return True


def sample_values(
    dists: Mapping[str, Distribution],
    rng: np.random.Generator,
    n: int,
    region: Region,
) -> list[dict[str, Any]]:
  """Draws ``n`` independent configs over ``dists`` inside ``region``."""
  cols = {k: d.sample(rng, n, region.get(k)) for k, d in dists.items()}
  return [{k: cols[k][i] for k in dists} for i in range(n)]


def grid_values(
    dists: Mapping[str, Distribution], num_configs: int, region: Region
) -> list[dict[str, Any]]:
  """The largest full grid over ``dists`` with at most ``num_configs`` points.

  Choice dimensions take all their allowed values; numeric dimensions share
  the remaining budget as evenly as possible (a 5×5 grid for 25 configs over
  two numeric dimensions).
  """
  fixed = {k: d.grid(0, region.get(k)) for k, d in dists.items() if isinstance(d, Choice)}
  numeric = [k for k, d in dists.items() if not isinstance(d, Choice)]
  fixed_size = math.prod(len(v) for v in fixed.values()) if fixed else 1
  if fixed_size > num_configs:
    raise ValueError(
        f"sampler='grid': the choice dimensions alone need {fixed_size} grid "
        f"points, more than num_configs={num_configs}."
    )
  budget = num_configs // fixed_size
  counts = {k: 1 for k in numeric}
  if numeric:
    g = max(1, int(math.floor(budget ** (1.0 / len(numeric)) + 1e-9)))
    counts = {k: g for k in numeric}
    for k in numeric:  # grow dimensions one at a time while the grid fits
      if math.prod(counts.values()) // g * (g + 1) <= budget:
        counts[k] = g + 1
  axes = dict(fixed)
  for k in numeric:
    axes[k] = dists[k].grid(counts[k], region.get(k))
  names = list(dists)
  return [dict(zip(names, combo)) for combo in itertools.product(*(axes[k] for k in names))]


def coords(space: Mapping[str, Any], config: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
  """A config's numeric sampling coordinates, normalised to [0, 1] by bounds."""
  out = []
  for k in names:
    lo, hi = space[k].bounds()
    out.append((space[k].to_coord(config[k]) - lo) / (hi - lo))
  return np.asarray(out, dtype=np.float64)


def zoom_region(
    space: Mapping[str, Any],
    top_configs: Sequence[Mapping[str, Any]],
    round_index: int,
    shrink: float,
) -> Region:
  """The region a zoom round samples, around the best configs so far.

  Numeric dimensions: the bounding box of ``top_configs`` in sampling
  coordinates, padded by 10% of its span, with its width held between
  ``shrink**round_index / 4`` and ``shrink**round_index`` of the full range
  (centred on the best config when it must be cut), clipped to the bounds.
  Choice dimensions narrow to the values seen among ``top_configs``.
  ``top_configs[0]`` must be the best.
  """
  dists = searched(space)
  best = top_configs[0]
  numeric, choices = {}, {}
  max_frac = shrink**round_index
  min_frac = max_frac / 4.0
  for k, d in dists.items():
    if isinstance(d, Choice):
      seen = [v for v in d.values if any(c[k] == v for c in top_configs)]
      choices[k] = tuple(seen)
      continue
    lo, hi = d.bounds()
    full = hi - lo
    ts = [d.to_coord(c[k]) for c in top_configs]
    tb = d.to_coord(best[k])
    a, b = min(ts), max(ts)
    pad = 0.1 * (b - a)
    a, b = a - pad, b + pad
    width = b - a
    if width > max_frac * full:
      width = max_frac * full
      a, b = tb - width / 2, tb + width / 2
    elif width < min_frac * full:
      centre = 0.5 * (a + b)
      width = min_frac * full
      a, b = centre - width / 2, centre + width / 2
    # Shift (not cut) the box back inside the bounds so it keeps its width.
    if a < lo:
      a, b = lo, lo + width
    if b > hi:
      a, b = hi - width, hi
    numeric[k] = (max(a, lo), min(b, hi))
  return Region(numeric, choices)
