"""Asynchronous successive halving with refill.

A trial reaching a rung continues only if it is in the top ``1/eta`` of the
trials that reached that rung so far (ASHA's rule, as Optuna's
``SuccessiveHalvingPruner`` and Ray Tune's ``ASHAScheduler``). A stopped,
finished or diverged trial's lane is refilled at once with a new config from
the current zoom region (or proposed by TPE, BOHB-style), so the program keeps
its lane count and no lane sits idle.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
from typing import ClassVar, NamedTuple, Sequence

import numpy as np

from ._region import Region, zoom_region
from ._sampling import Stream, nearest_finder, trial_seed
from ._space import searched
from ._strategy import Cadence, Clock, Context, Decision, LaneView, NewTrial
from ._trial import Trial, rank_trials

__all__ = ["Halving", "HalvingState"]


class HalvingState(NamedTuple):
  """Attributes:
    rung_scores: per rung, the scores recorded there so far, sorted better
      first (negated when maximizing).
    best_rung: ``{trial id: (rung, score)}``, the highest rung each reached.
    observations: per rung, ``(config, score)`` of each arrival (TPE refills).
    regions: one refill region per round of population time, as JSON.
    next_id: the id of the next trial.
  """

  rung_scores: list
  best_rung: dict
  observations: list
  regions: tuple
  next_id: int


def _rung_of(rungs: Sequence[int], steps: int) -> int | None:
  reached = [k for k, r in enumerate(rungs) if steps >= r]
  return reached[-1] if reached else None


@dataclasses.dataclass(frozen=True)
class Halving:
  """Successive halving with refill (``search(..., strategy=Halving(...))``).

  Rungs sit at ``min_fraction``, ``min_fraction * eta``, ... and 1 of
  ``num_steps``; a trial reaching a rung continues only if it is in the top
  ``1/eta`` of the trials that reached that rung so far (asynchronous
  successive halving, as Optuna's ``SuccessiveHalvingPruner`` and Ray Tune's
  ASHA), and a stopped lane is refilled at once with a new config.

  >>> import vmaptune as vt
  >>> vt.Halving(eta=3, min_fraction=1 / 9)
  Halving(eta=3, min_fraction=0.1111111111111111)
  """

  eta: int = 3
  min_fraction: float = 1 / 9

  name: ClassVar[str] = "halving"
  sequential: ClassVar[bool] = False
  asynchronous: ClassVar[bool] = True

  def __post_init__(self):
    if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
      raise ValueError(f"Halving: `eta` must be an int >= 2, got {self.eta!r}.")
    if not isinstance(self.min_fraction, (int, float)) or not 0 < self.min_fraction < 1:
      raise ValueError(f"Halving: `min_fraction` must lie in (0, 1), got {self.min_fraction!r}.")

  # Setup -------------------------------------------------------------------

  def rungs(self, steps: int) -> list[int]:
    """The rungs' steps: ``min_fraction`` of ``steps``, ``eta`` times that,
    ... while below ``steps``, and ``steps``.

    >>> import vmaptune as vt
    >>> vt.Halving(eta=3, min_fraction=1 / 9).rungs(36), vt.Halving(eta=3, min_fraction=0.5).rungs(90)
    ([4, 12, 36], [45, 90])
    """
    below = 0  # rungs before the last (a rounding from 1/eta**k is not one more)
    while self.min_fraction * self.eta ** below < 1 - 1e-9:
      below += 1
    r0 = int(steps * self.min_fraction + 1e-9)
    if r0 < 1:
      raise ValueError(
          f"strategy='halving': num_steps={steps} is too short for rungs at "
          f"{self.min_fraction:g} of the budget with eta={self.eta}.")
    return [r0 * self.eta**k for k in range(below)] + [steps]

  def check(self, ctx: Context) -> None:
    if ctx.num_steps is None:
      raise ValueError(f"strategy={self.name!r} needs a `num_steps` budget, not `epochs`.")
    segment = self.rungs(ctx.num_steps)[0]
    eval_every = ctx.eval_every or segment
    if segment % eval_every:
      raise ValueError(f"strategy='halving': eval_every={eval_every} must divide the first rung "
                       f"({segment} steps).")

  def cadence(self, ctx: Context, signature: tuple) -> Cadence:
    segment = self.rungs(ctx.num_steps)[0]
    eval_every = ctx.eval_every or segment
    return Cadence(eval_every, segment // eval_every, ctx.num_steps)

  def total_steps(self, ctx: Context) -> int | None:
    return None if ctx.timeout is not None else ctx.rounds * ctx.num_steps

  def _over(self, ctx: Context, clock: Clock) -> bool:
    """No time for another segment: the search ends at this decision."""
    total = self.total_steps(ctx)
    if total is not None:
      return clock.elapsed >= total
    return not clock.fits(self.rungs(ctx.num_steps)[0])

  def state_type(self) -> type:
    return HalvingState

  def regions(self, state: HalvingState) -> list[Region]:
    return [Region.from_json(g) for g in state.regions]

  def init(self, ctx: Context) -> tuple[list[NewTrial], HalvingState]:
    region = Region.full(ctx.space)
    configs = ctx.drawer.batch(0, ctx.num_configs, region)
    if ctx.enqueue:
      configs[: len(ctx.enqueue)] = [dict(c) for c in ctx.enqueue[: len(configs)]]
    trials = [NewTrial(i, c, trial_seed(ctx.seed, 0, i), 0) for i, c in enumerate(configs)]
    rungs = self.rungs(ctx.num_steps)
    state = HalvingState([[] for _ in rungs], {}, [[] for _ in rungs], (region.to_json(),), len(trials))
    return trials, state

  # Decisions ---------------------------------------------------------------

  def _promoted(self, score: float, ranked: list[float], maximize: bool) -> bool:
    """ASHA: in the top 1/eta of the scores recorded at this rung so far.

    ``ranked`` is kept sorted, better first (negated when maximizing), so a
    decision costs a binary search, not a sort: halving's host work then
    grows linearly with the population.
    """
    key = -score if maximize else score
    top = max(1, len(ranked) // self.eta)
    return bisect.bisect_left(ranked, key) < top

  def stop(self, ctx: Context, state: HalvingState, lanes: Sequence[LaneView], clock: Clock):
    rungs = self.rungs(ctx.num_steps)
    ended, arrived = [], []
    for v in lanes:
      if v.diverged or not math.isfinite(v.score):
        # A diverged lane is the first to go: stopped and refilled now.
        ended.append((v.slot, {"status": "diverged", "rung": _rung_of(rungs, v.steps)}))
      elif v.steps in rungs:
        k = rungs.index(v.steps)
        bisect.insort(state.rung_scores[k], -v.score if ctx.maximize else v.score)
        state.best_rung[v.trial.id] = (k, v.score)
        state.observations[k].append((v.trial.config, v.score))
        arrived.append((v, k))
    for v, k in arrived:
      if k == len(rungs) - 1:
        ended.append((v.slot, {"status": "ok", "rung": k}))
      elif not self._promoted(v.score, state.rung_scores[k], ctx.maximize):
        ended.append((v.slot, {"status": "stopped", "rung": k}))
    if self._over(ctx, clock):  # the budget is spent: whatever runs stops here
      gone = {slot for slot, _ in ended}
      ended += [(v.slot, {"status": "stopped", "rung": _rung_of(rungs, v.steps)}) for v in lanes
                if v.slot not in gone]
    return ended, state

  def next(self, ctx: Context, state: HalvingState, lanes: Sequence[LaneView], ended: Sequence[int],
           history: Sequence[Trial], clock: Clock):
    elapsed = clock.elapsed
    segment = self.rungs(ctx.num_steps)[0]
    over = self._over(ctx, clock)
    # Callbacks follow rounds of population time (and the end, by the loop).
    report = elapsed // ctx.num_steps > (elapsed - segment) // ctx.num_steps and not over
    if over:
      return Decision(report=report, done=True), state
    if not ended:
      return Decision(report=report), state
    if not clock.fits(ctx.num_steps):  # a new trial could not finish in time: its lane idles
      return Decision(refill={slot: None for slot in ended}, report=report), state
    level = min(elapsed // ctx.num_steps, ctx.rounds - 1)
    regions = list(state.regions)
    while len(regions) <= level:  # one region per round of population time, fixed when it starts
      regions.append(self._region(ctx, state, history, len(regions)).to_json())
    region = Region.from_json(regions[level])
    by_slot = {v.slot: v for v in lanes}
    # Refills go chunk by chunk, in the order the chunks first ended a trial.
    order: dict[int, list[int]] = collections.OrderedDict()
    for slot in ended:
      order.setdefault(by_slot[slot].chunk, []).append(slot)
    slots = [slot for group in order.values() for slot in group]
    if ctx.sampler == "tpe":  # BOHB-style: TPE proposes every refill of this segment
      configs = self._tpe(ctx, state, [by_slot[s].signature for s in slots], elapsed)
    else:
      rng = np.random.default_rng([ctx.seed, Stream.REFILL, elapsed])
      configs = [ctx.drawer.refill(by_slot[s].signature, region, rng) for s in slots]
    nearest = nearest_finder(ctx.space, rank_trials(history, ctx.maximize)[: ctx.keep_count()])
    refill, next_id = {}, state.next_id
    for slot, config in zip(slots, configs):
      refill[slot] = NewTrial(next_id, config, trial_seed(ctx.seed, Stream.REFILL, next_id), level, nearest(config))
      next_id += 1
    return Decision(refill=refill, report=report), state._replace(regions=tuple(regions), next_id=next_id)

  def _region(self, ctx: Context, state: HalvingState, history: Sequence[Trial], level: int) -> Region:
    """The refill region of round ``level`` of population time: around the
    trials that reached the highest rungs with the best scores there."""
    if level == 0:
      return Region.full(ctx.space)
    ranked = sorted(state.best_rung.items(),
                    key=lambda kv: (-kv[1][0], -kv[1][1] if ctx.maximize else kv[1][1]))
    by_id = {t.id: t for t in history}
    configs = [by_id[i].config for i, _ in ranked if i in by_id][: ctx.keep_count()]
    if not configs:
      return Region.full(ctx.space)
    return zoom_region(ctx.space, configs, level, ctx.shrink)

  def _tpe(self, ctx: Context, state: HalvingState, signatures: Sequence[tuple], elapsed: int) -> list[dict]:
    """Refills proposed by TPE, as BOHB does: fitted on the scores at the
    highest rung with at least ``dims + 2`` of them (low rungs fill first; a
    higher rung's scores are the better estimate once there are enough),
    asked for the segment's whole batch at once. Each proposal keeps its
    lane's bucket. A fresh sampler seeded by ``(seed, elapsed)`` and rebuilt
    from the observations: deterministic, and resumable from a checkpoint."""
    dims = len(searched(ctx.space))
    level = max((k for k, obs in enumerate(state.observations) if len(obs) >= dims + 2), default=0)
    seed = trial_seed(ctx.seed, Stream.TPE_REFILL, elapsed)
    return ctx.drawer.tpe_refills(state.observations[level], signatures, seed)
