"""Population based training: bad lanes copy good ones and perturb.

Every ``ready`` steps the bottom fraction of each chunk's lanes takes the
parameters and optimizer state of a random top lane of the same chunk (a
gather along the lane axis, on the device) and perturbs its continuous
hyperparameters. Here a copy is an index operation, not a checkpoint on disk
and a new process.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import ClassVar, NamedTuple, Sequence

import numpy as np

from ._region import Region, sample_values
from ._sampling import Stream, trial_seed
from ._space import Choice, Integer, searched
from ._strategy import Cadence, Clock, Context, Decision, LaneView, NewTrial
from ._trial import Trial

__all__ = ["PBT", "PBTState"]


class PBTState(NamedTuple):
  """Attributes:
    current: ``{slot: config}``, each lane's hyperparameters now.
    schedules: ``{slot: [(step, config), ...]}``, each lane's history of them.
    exploits: ``[(step, source trial id, target trial id), ...]``.
  """

  current: dict
  schedules: dict
  exploits: list


def default_ready(total: int, steps: int, eval_every: int | None) -> int:
  """The largest divisor of ``total`` no larger than ``steps // 4`` (and a
  multiple of ``eval_every`` when that is set): ready points that tile the run."""
  cap = max(1, steps // 4)
  for d in range(cap, 0, -1):
    if total % d == 0 and (eval_every is None or d % eval_every == 0):
      return d
  return eval_every or 1


def perturb(d, value, rng: np.random.Generator, factors=(0.8, 1.2)):
  """Multiplies on the hyperparameter's own scale, clipped to its bounds."""
  f = factors[int(rng.integers(0, 2))]
  if isinstance(d, Choice):
    return value
  if d.scale == "reverse_log":
    out = 1.0 - (1.0 - value) * f
  else:
    out = value * f
  out = min(max(out, d.low), d.high)
  return int(round(out)) if isinstance(d, Integer) else float(out)


@dataclasses.dataclass(frozen=True)
class PBT:
  """Population based training (``search(..., strategy=PBT(...))``).

  Every ``ready`` steps (default ``num_steps // 4``), the worst ``fraction``
  of each bucket's lanes copies the parameters and optimizer state of a
  random lane from the best ``fraction`` of the same bucket, then perturbs
  each continuous hyperparameter by ×0.8 or ×1.2 on its own scale (clipped
  to the space), or redraws it with probability ``resample_probability``.

  >>> import vmaptune as vt
  >>> vt.PBT(ready=100, fraction=0.25)
  PBT(ready=100, fraction=0.25, resample_probability=0.25)
  """

  ready: int | None = None
  fraction: float = 0.25
  resample_probability: float = 0.25

  name: ClassVar[str] = "pbt"
  sequential: ClassVar[bool] = False

  def __post_init__(self):
    if self.ready is not None and (isinstance(self.ready, bool) or not isinstance(self.ready, int) or self.ready < 1):
      raise ValueError(f"PBT: `ready` must be a positive int (steps) or None, got {self.ready!r}.")
    if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 0.5:
      raise ValueError(f"PBT: `fraction` must lie in (0, 0.5], got {self.fraction!r}.")
    if not isinstance(self.resample_probability, (int, float)) or not 0 <= self.resample_probability <= 1:
      raise ValueError(f"PBT: `resample_probability` must lie in [0, 1], got {self.resample_probability!r}.")

  def _ready(self, ctx: Context) -> int:
    return self.ready or default_ready(ctx.rounds * ctx.num_steps, ctx.num_steps, ctx.eval_every)

  def _over(self, ctx: Context, clock: Clock) -> bool:
    total = self.total_steps(ctx)
    if total is not None:
      return clock.elapsed >= total
    return not clock.fits(self._ready(ctx))

  def check(self, ctx: Context) -> None:
    if ctx.num_steps is None:
      raise ValueError(f"strategy={self.name!r} needs a `num_steps` budget, not `epochs`.")
    ready = self._ready(ctx)
    eval_every = ctx.eval_every or ready
    if ready % eval_every or (ctx.rounds * ctx.num_steps) % ready:
      raise ValueError(
          f"strategy='pbt': `ready`={ready} must be a multiple of eval_every={eval_every} "
          f"and divide the run of rounds*num_steps={ctx.rounds * ctx.num_steps} steps.")

  def cadence(self, ctx: Context, signature: tuple) -> Cadence:
    ready = self._ready(ctx)
    eval_every = ctx.eval_every or ready
    # With a timeout the lanes train until the search ends.
    return Cadence(eval_every, ready // eval_every, self.total_steps(ctx) or 2**31 - 1)

  def total_steps(self, ctx: Context) -> int | None:
    return None if ctx.timeout is not None else ctx.rounds * ctx.num_steps

  def state_type(self) -> type:
    return PBTState

  def regions(self, state: PBTState) -> list[Region]:
    return []

  def init(self, ctx: Context) -> tuple[list[NewTrial], PBTState]:
    configs = ctx.drawer.batch(0, ctx.num_configs, Region.full(ctx.space))
    if ctx.enqueue:
      configs[: len(ctx.enqueue)] = [dict(c) for c in ctx.enqueue[: len(configs)]]
    trials = [NewTrial(i, c, trial_seed(ctx.seed, 0, i), 0) for i, c in enumerate(configs)]
    state = PBTState({i: dict(c) for i, c in enumerate(configs)}, {i: [(0, dict(c))] for i, c in enumerate(configs)}, [])
    return trials, state

  def stop(self, ctx: Context, state: PBTState, lanes: Sequence[LaneView], clock: Clock):
    if not self._over(ctx, clock):
      return [], state
    # Every lane finishes at the end; its schedule says how it got there.
    return [(v.slot, {"status": "diverged" if v.diverged else "ok", "config": state.current[v.slot],
                      "schedule": state.schedules[v.slot]}) for v in lanes], state

  def next(self, ctx: Context, state: PBTState, lanes: Sequence[LaneView], ended, history: Sequence[Trial],
           clock: Clock):
    elapsed = clock.elapsed
    if self._over(ctx, clock):
      return Decision(done=True), state
    rng = np.random.default_rng([ctx.seed, Stream.PBT, elapsed])
    mutable = {k: d for k, d in searched(ctx.space).items() if k in ctx.drawer.rest}
    by_chunk: dict[int, list[LaneView]] = collections.OrderedDict()
    for v in lanes:
      by_chunk.setdefault(v.chunk, []).append(v)
    exploit = {}
    for part in by_chunk.values():
      bad = [v for v in part if v.diverged or not math.isfinite(v.score)]
      bad_slots = {v.slot for v in bad}
      order = sorted((v for v in part if v.slot not in bad_slots), key=lambda v: v.score,
                     reverse=ctx.maximize)  # best first; ties keep lane order
      n = len(part)
      q = max(1, int(math.floor(self.fraction * n))) if n >= 2 else 0
      sources = order[:q]
      source_slots = {v.slot for v in sources}
      targets = [v for v in (bad + list(reversed(order)))[:q] if v.slot not in source_slots]
      if not sources or not targets:
        continue
      for v in targets:
        src = sources[int(rng.integers(0, len(sources)))]
        new = dict(state.current[src.slot])
        for k, d in mutable.items():
          if rng.random() < self.resample_probability:
            new[k] = sample_values({k: d}, rng, 1, Region.full(ctx.space))[0][k]
          else:
            new[k] = perturb(d, new[k], rng)
        state.current[v.slot] = new
        state.schedules[v.slot].append((elapsed, dict(new)))
        state.exploits.append((elapsed, src.trial.id, v.trial.id))
        exploit[v.slot] = (src.slot, new)
    return Decision(exploit=exploit), state
