"""How the adaptive strategy fits its population to a time budget on CPU.

With a ``timeout`` the adaptive strategy (``_adaptive``) decides from the
pace of the last segment (``Clock``) how many lanes can still finish trials:
it starts held lanes as the pace allows (``_release``), gives lanes up when
the model is too slow for the population (``_narrow``), and near the
deadline keeps the best trials that can finish (``_finish_best``). On CPU a
lane's cost does not depend on the others but does on its program (a
two-layer convolution can cost a hundred times a one-layer one), so every
estimate charges each lane its measured cost (:class:`Costs`). The
methods are a mixin of :class:`~vmaptune.Adaptive`; they read its settings
(``segment_steps``, ``total_steps``, ``held``) and its state's records.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from ._strategy import Clock, Context, LaneView, NewTrial

# ``state`` below is an ``_adaptive.AdaptiveState`` (annotated as the tuple it
# is: ``_adaptive`` imports this module).

#: With a timeout, the population narrows (see ``Adaptive._narrow``) until each
#: lane can still train this many trial-lengths. Measured on the 2-core CPU
#: (digits MLP, 10 s, 3 seeds), 3 gave up lanes too early: fewer lane-steps and
#: worse best scores on every seed than 1.
MIN_TRIALS = 1

#: With a timeout on CPU, the population starts with one lane per bucket and
#: grows, at each decision in the first half of the time left at the first
#: measured pace, while every lane
#: can still train this many trial-lengths at the measured pace (see
#: ``Adaptive._release``): a slow model (a conv net on a CPU) gets a few lanes
#: that finish trials, a fast one the whole population within a few segments.
START_TRIALS = 1

# A trial's record in the state: its searched values in unit coordinates (u
# for numeric, c for choices), steps reached, score there, best score so far
# (both negated when maximizing: smaller is better), status, and its scores at
# the pruner's check steps while it runs.
_U, _C, _STEP, _SCORE, _BEST, _STATUS, _CHECKS = range(7)


class Pacing:
  """The time-budget decisions of :class:`~vmaptune.Adaptive` (a mixin)."""

  @staticmethod
  def _second_half(ctx: Context, clock: Clock) -> bool | None:
    """With a timeout, whether less than half of it is left (None without one)."""
    if ctx.timeout is None or clock.left is None:
      return None
    return clock.left < ctx.timeout / 2

  @staticmethod
  def _fits(ctx: Context, clock: Clock, steps: int, busy: Sequence[tuple] = (), paced: Sequence[tuple] = ()) -> bool:
    """``steps`` more population steps fit in the time left. On CPU a lane's
    cost does not depend on the others, so the pace of the lanes that ran the
    last segment (``paced``: each lane's signature and cost, in units of their
    mean cost: :class:`Costs`) scales to those that will run (``busy``) by
    their :func:`span`."""
    if not ctx.accelerator and clock.remaining is not None and busy and paced:
      return clock.remaining * span(ctx, paced) / span(ctx, busy) >= steps
    return clock.fits(steps)

  def _over(self, ctx: Context, clock: Clock, busy: Sequence[tuple] = (), paced: Sequence[tuple] = ()) -> bool:
    """The budget is spent: no further segment fits (see :meth:`_fits`)."""
    total = self.total_steps(ctx)
    if total is not None:
      return clock.elapsed >= total
    return not self._fits(ctx, clock, self.segment_steps(ctx), busy, paced)

  @staticmethod
  def _doomed(ctx: Context, state: tuple, clock: Clock, ended: list, running: list) -> None:
    """With a timeout on CPU, stops the running trials that cannot finish
    even alone on a device: their steps left at their own measured pace
    (``LaneView.step_seconds``, a lower bound of a lane's time on its
    device) take longer than the time left. Only finished trials count, so
    such a lane's steps are lost; stopped at once, its device's time goes
    to trials that can finish. (In a 40 s digits-CNN search a two-layer
    32-channel trial ran 200 of its 500 steps at 70 ms a step, 14 s in
    which the other lanes waited for it each segment.) Not before a trial
    has finished: a search with none fails, and a first call's pace is
    slow (it was 2.4 times the next for a digits CNN)."""
    if ctx.accelerator or clock.left is None or not state.finished_at:
      return
    for v, rec in list(running):
      if not alone_fits(ctx, clock, v.step_seconds, ctx.num_steps - v.steps):
        rec[_STATUS], rec[_CHECKS] = "stopped", {}
        ended.append((v.slot, {"status": "stopped"}))
        running.remove((v, rec))

  def _finish_best(self, ctx: Context, state: tuple, clock: Clock, paced: Sequence[tuple], costs: Costs,
                   ended: list, running: list) -> None:
    """In the second half of the time on CPU (before, :meth:`_narrow`), when
    the running trials cannot all finish, keeps the best that can (by their
    best score so far; a lane that stops costs nothing there, and each is
    charged its own measured cost) and stops the others, rather than stopping
    all at the end."""
    if ctx.accelerator or not clock.remaining or not running or not self._second_half(ctx, clock):
      return
    per_step = clock.left / (clock.remaining * span(ctx, paced))  # seconds per step of a lane of mean cost
    # A lane's work to finish, in lane-steps of mean cost; a set of lanes
    # finishes in the span of their work (lanes on other devices at once).
    work = lambda v: (v.signature, max(0, ctx.num_steps - v.steps) * costs.lane(v))
    if span(ctx, [work(v) for v, _ in running]) * per_step <= clock.left:
      return
    room = 0.8 * clock.left  # the pace of fewer lanes is an estimate: a margin
    kept, stop = [], []
    for v, rec in sorted(running, key=lambda p: (p[1][_BEST], p[0].slot)):
      tried = kept + [work(v)]
      if span(ctx, tried) * per_step <= room:
        kept = tried
      else:
        stop.append((v, rec))
    for v, rec in stop:
      rec[_STATUS], rec[_CHECKS] = "stopped", {}
      ended.append((v.slot, {"status": "stopped"}))
      running.remove((v, rec))

  def _narrow(self, ctx: Context, state: tuple, lanes: Sequence[LaneView], clock: Clock,
              costs: Costs, ended: list, running: list) -> tuple:
    """With a timeout too short for the population (a slow model), gives up
    lanes, worst trial first, until each remaining lane can still train
    ``MIN_TRIALS`` trial-lengths in the time left. Judged at each decision in
    the first half of the time, on the pace of the last segment.

    On CPU a lane's cost does not depend on the others and a lane past its
    budget skips its steps, so single lanes go, judged as soon as the first
    chunk has trained: the pace per lane, times every lane of the population
    (chunks still compiling included), says what fits, and each bucket
    (program) keeps that share of its lanes, so every width or depth stays in
    the search; lanes of chunks not started yet never start. On accelerators
    a lane's cost barely depends on how many train beside it: whole chunks go
    (a chunk whose lanes all idle is not run), once every chunk trains. Both
    only after two short decisions in a row."""
    if clock.remaining is None or self._second_half(ctx, clock) is not False:
      return state
    retired = list(state.retired or [])
    live = live_lanes(state, lanes)
    if not live:
      return state
    paced = [v for v in live if v.started]  # the lanes the last segment's pace is of
    if not paced:
      return state
    if ctx.accelerator and state.retired is None and len(paced) < len(live):
      return state  # some chunks still compiling: the pace is not the population's
    state = state._replace(retired=retired)
    # Trial-lengths each lane can still train, lanes weighted by their cost (on
    # CPU a lane of a chunk not trained yet costs its bucket's, or the mean).
    fits = clock.remaining * span(ctx, costs.load(paced)) / span(ctx, costs.load(live)) / ctx.num_steps
    if fits >= MIN_TRIALS:
      return state._replace(short=0)
    if state.short < 1:
      # One slow segment is not a pace: a chunk's first call, or a compile
      # finishing beside it, can make one look 20x slower (measured).
      return state._replace(short=state.short + 1)
    state = state._replace(short=0)
    share = fits / MIN_TRIALS
    best = lambda vs: min(state.trials[v.trial.id][_BEST] for v in vs)
    gone: list[int] = []
    if ctx.accelerator:
      chunks: dict[int, list] = {}
      for v in live:
        chunks.setdefault(v.chunk, []).append(v)
      afford, n = max(1, int(len(live) * share)), 0
      for j in sorted(chunks, key=lambda j: (best(chunks[j]), j)):
        if n >= afford:
          gone += [v.slot for v in chunks[j]]
        n += len(chunks[j])
    else:
      buckets: dict[tuple, list] = {}
      for v in live:
        buckets.setdefault(v.signature, []).append(v)
      for vs in buckets.values():
        keep = max(1, int(len(vs) * share))
        gone += [v.slot for v in sorted(vs, key=lambda v: (best([v]), v.slot))[keep:]]
    if not gone:
      return state
    ending = {slot for slot, _ in ended}
    for v, rec in list(running):  # (lanes not started yet are dropped by ``next``)
      if v.slot in gone and v.slot not in ending:
        rec[_STATUS], rec[_CHECKS] = "stopped", {}
        ended.append((v.slot, {"status": "stopped"}))
        running.remove((v, rec))
    return state._replace(retired=sorted(retired + gone))

  def _release(self, ctx: Context, state: tuple, lanes: Sequence[LaneView], clock: Clock,
               costs: Costs, paced: Sequence[tuple], can_start: bool) -> tuple[dict, tuple]:
    """With a timeout on CPU, starts held lanes of the first population while
    each lane, those started included, can train ``START_TRIALS``
    trial-lengths and two more segments in the time left at the pace of the
    last segment (a lane's cost does not depend on the others there, and a
    held lane costs nothing: it is skipped; the margin keeps a lane just
    started from being given up by ``_narrow`` a segment later). Each lane
    is charged its bucket's measured cost (:class:`Costs`): a lane of a
    bucket whose program has not trained yet stays held (the others are
    charged the costliest measured for it), and the population at most
    doubles per decision unless everything fits twice over (a pace measured
    on a few lanes is a rough one). Lanes stay held while nothing more
    fits; once half the time left at the first measured pace
    (``state.paced_left``) has passed, those still held are given up
    (``retired``; their trials' status ``"unused"``). Counted from the start
    of the search instead, a 10 s digits search whose first program took
    4-5 s to trace and compile (it varies with the machine's load) passed
    half time before its first pace, gave up 58 of its 64 lanes unstarted
    and trained 7,000 lane-steps instead of 40,000 (measured). On an accelerator (a
    search resumed on another platform) every held lane starts. ``paced``:
    the lanes that ran the last segment, as :meth:`Costs.load` gives them."""
    if not state.held:
      return {}, state
    held = list(state.held)
    round_ = clock.elapsed // ctx.num_steps
    start = lambda entries: {i: NewTrial(i, config, seed, round_) for i, config, seed in entries}
    if state.paced_left is None and paced and clock.left is not None:
      state = state._replace(paced_left=clock.left)
    if state.paced_left is not None and clock.left is not None and clock.left < state.paced_left / 2:
      for trial_id, *_ in held:
        state.trials[trial_id][_STATUS] = "unused"
      return {}, state._replace(held=[], retired=sorted(list(state.retired or ()) + [i for i, *_ in held]))
    if ctx.accelerator:
      return start(held), state._replace(held=[])
    live = live_lanes(state, lanes)
    if not paced or clock.remaining is None or not can_start:
      return {}, state
    need = START_TRIALS * ctx.num_steps + 2 * self.segment_steps(ctx)
    # Lanes of buckets whose program has not trained yet: the costliest measured.
    load = [(v.signature, costs.lane(v) if v.started else costs.bucket(v.signature)) for v in live]
    # (Without measurements, as after a resume, every lane counts 1.)
    signatures = [ctx.signature(config) for _, config, _ in held]
    cost = [costs.by_signature.get(sig) if costs.by_signature else 1.0 for sig in signatures]
    # A bucket whose trial cannot finish alone in the time left starts no lane.
    seconds = slowest_step(lanes)
    cost = [None if not alone_fits(ctx, clock, seconds.get(sig, math.nan), ctx.num_steps) else c
            for sig, c in zip(signatures, cost)]
    if all(c is not None for c in cost) and self._fits(ctx, clock, 2 * need, load + list(zip(signatures, cost)),
                                                       paced):
      go = list(range(len(held)))
    else:
      go = []
      for k, c in enumerate(cost):
        if c is None:  # its program has not trained yet (the lane waits for its cost), or cannot finish
          continue
        if len(go) >= len(live) or not self._fits(ctx, clock, need, load + [(signatures[k], c)], paced):
          break
        load.append((signatures[k], c))
        go.append(k)
    if not go:
      return {}, state
    chosen = set(go)
    return start([held[k] for k in go]), state._replace(held=[e for k, e in enumerate(held) if k not in chosen])


def slowest_step(lanes: Sequence[LaneView]) -> dict[tuple, float]:
  """Each bucket's measured seconds a lane-step, its slowest chunk's (the
  pace :func:`alone_fits` judges a new trial of that bucket by)."""
  seconds: dict[tuple, float] = {}
  for v in lanes:
    if v.started and math.isfinite(v.step_seconds):
      seconds[v.signature] = max(seconds.get(v.signature, 0.0), v.step_seconds)
  return seconds


def alone_fits(ctx: Context, clock: Clock, step_seconds: float, steps: int) -> bool:
  """``steps`` of a lane measured at ``step_seconds`` a step can finish in
  the time left (True without a timeout, on accelerators or unmeasured)."""
  if ctx.accelerator or clock.left is None or not math.isfinite(step_seconds):
    return True
  return steps * step_seconds <= clock.left


def span(ctx: Context, load: Sequence[tuple[tuple, float]]) -> float:
  """How long a segment of lanes takes, relatively: ``load`` holds each
  lane's ``(signature, cost)``, costs in units of the mean lane's.

  On CPU each device trains its lanes one after another, and the devices
  train at once. A bucket's lanes alternate devices in the order they start
  (``_slots.spread_lanes``), so no device holds more than
  ``ceil(n / devices)`` of a bucket's ``n`` lanes; a segment takes at most
  the sum of that share of each bucket. Lanes of one bucket then fill the
  devices evenly, and single lanes of different buckets count in full (they
  may share a device). On one device: the lanes' total, as before devices
  were counted.
  """
  buckets: dict[tuple, list] = {}
  for signature, cost in load:
    buckets.setdefault(signature, []).append(cost)
  d = max(1, ctx.devices)
  return sum(math.ceil(len(c) / d) * sum(c) / len(c) for c in buckets.values())


class Costs(NamedTuple):
  """On CPU, what a lane costs relative to the mean of the lanes that
  trained the last segment (measured per chunk: ``LaneView.step_seconds``;
  a two-layer convolution costs up to a hundred times a one-layer one there),
  so that pace estimates in lane units charge each lane its own cost. On
  accelerators, or before any measurement, every lane counts 1."""

  by_slot: dict
  by_signature: dict

  @classmethod
  def of(cls, ctx: Context, lanes: Sequence[LaneView]) -> "Costs":
    measured = [v for v in lanes if v.started and math.isfinite(v.step_seconds) and v.step_seconds > 0]
    if ctx.accelerator or not measured:
      return cls({}, {})
    mean = sum(v.step_seconds for v in measured) / len(measured)
    by_signature: dict[tuple, list] = {}
    for v in measured:
      by_signature.setdefault(v.signature, []).append(v.step_seconds / mean)
    return cls({v.slot: v.step_seconds / mean for v in measured},
               {sig: sum(ws) / len(ws) for sig, ws in by_signature.items()})

  def lane(self, v: LaneView) -> float:
    return self.by_slot.get(v.slot, self.by_signature.get(v.signature, 1.0))

  def load(self, lanes) -> list[tuple[tuple, float]]:
    """Each lane's ``(signature, cost)``, as :func:`span` takes them."""
    return [(v.signature, self.lane(v)) for v in lanes]

  def bucket(self, signature: tuple) -> float:
    """A new lane of this bucket (not measured yet: the costliest measured)."""
    return self.by_signature.get(signature, max(self.by_signature.values(), default=1.0))


def live_lanes(state: tuple, lanes: Sequence[LaneView]) -> list[LaneView]:
  """The lanes not given up (``state.retired``)."""
  retired = set(state.retired or ())
  return [v for v in lanes if v.slot not in retired]
