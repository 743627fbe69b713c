"""Coarse to fine: rounds of fresh configs, each drawn around the best so far."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Sequence

from ._region import Region, zoom_region
from ._sampling import nearest_finder, trial_seed
from ._strategy import Cadence, Clock, Context, Decision, LaneView, NewTrial, top_trials
from ._trial import Trial

__all__ = ["Zoom", "ZoomState"]


class ZoomState(NamedTuple):
  """Attributes:
    round: the round in progress (or the last one, once done).
    finished: rounds finished.
    regions: each started round's region, as ``Region.to_json()``.
    next_id: the id of the next trial.
  """

  round: int
  finished: int
  regions: tuple
  next_id: int


@dataclasses.dataclass(frozen=True)
class Zoom:
  """Rounds of fresh configs, zooming in (``search(..., strategy="zoom")``, the default).

  Round 0 samples ``num_configs`` configs over the whole space; each later
  round samples as many in a region around the best ``keep`` trials so far,
  in sampling coordinates, no wider than ``shrink ** round`` of each range
  (``keep`` and ``shrink`` are arguments of :func:`vmaptune.search`). Every
  trial trains its whole budget. With a ``timeout`` rounds go on until the
  time is spent; from round ``rounds - 1`` on they sample at that depth,
  around the best so far (the loop starts a round only if its estimate says
  it will finish in time).

  >>> import vmaptune as vt
  >>> vt.Zoom()
  Zoom()
  """

  name: ClassVar[str] = "zoom"
  sequential: ClassVar[bool] = True

  def check(self, ctx: Context) -> None:
    pass

  def cadence(self, ctx: Context, signature: tuple) -> Cadence:
    steps = ctx.steps_for(signature)
    eval_every = ctx.eval_every_for(steps)
    evals = -(-steps // eval_every)
    per_call = evals
    if ctx.checkpoint_every is not None:
      per_call = max(1, min(evals, ctx.checkpoint_every // eval_every))
    return Cadence(eval_every, per_call, steps)

  def total_steps(self, ctx: Context) -> int | None:
    return None

  def state_type(self) -> type:
    return ZoomState

  def regions(self, state: ZoomState) -> list[Region]:
    return [Region.from_json(g) for g in state.regions[: state.finished]]

  def _round(self, ctx: Context, r: int, region: Region, history: Sequence[Trial], first_id: int
             ) -> list[NewTrial]:
    configs = ctx.drawer.batch(r, ctx.num_configs, region, history)
    if r == 0 and ctx.enqueue:
      configs[: len(ctx.enqueue)] = [dict(c) for c in ctx.enqueue[: len(configs)]]
    parents = [None] * len(configs)
    if r > 0:
      nearest = nearest_finder(ctx.space, top_trials(ctx, history))
      parents = [nearest(c) for c in configs]
    return [NewTrial(first_id + i, c, trial_seed(ctx.seed, r, i), r, parents[i]) for i, c in enumerate(configs)]

  def init(self, ctx: Context) -> tuple[list[NewTrial], ZoomState]:
    region = Region.full(ctx.space)
    trials = self._round(ctx, 0, region, (), 0)
    return trials, ZoomState(0, 0, (region.to_json(),), len(trials))

  def stop(self, ctx: Context, state: ZoomState, lanes: Sequence[LaneView], clock: Clock):
    # A round ends when every lane has trained its whole budget.
    return [(v.slot, {"status": "ok"}) for v in lanes], state

  def next(self, ctx: Context, state: ZoomState, lanes, ended, history: Sequence[Trial], clock: Clock):
    r = state.round + 1
    state = state._replace(finished=r)
    if r >= ctx.rounds and ctx.timeout is None:
      return Decision(report=True, done=True), state
    # TPE models the whole space itself; the others zoom in (no deeper than
    # round ``rounds - 1`` when a timeout keeps rounds coming).
    if ctx.sampler == "tpe":
      region = Region.full(ctx.space)
    else:
      depth = min(r, ctx.rounds - 1) if ctx.rounds > 1 else r
      region = zoom_region(ctx.space, [t.config for t in top_trials(ctx, history)], depth, ctx.shrink)
    trials = self._round(ctx, r, region, history, state.next_id)
    state = state._replace(round=r, regions=state.regions + (region.to_json(),), next_id=state.next_id + len(trials))
    return Decision(generation=trials, report=True), state
