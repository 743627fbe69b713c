"""Asynchronous model-based search with early stopping: TPE refills and a
median pruner, every lane busy.

A population of lanes trains trials side by side. Between segments (a fifth
of a trial), a trial whose best score so far is worse than the median of the
*finished* trials' scores at the same step stops (Optuna's
``MedianPruner``); a finished, stopped or diverged trial's lane
is refilled at once with a config proposed by a Tree-structured Parzen
Estimator fitted on every trial observed so far (``_tpe``). Refills are
asynchronous, so only a few are proposed per decision whatever the number of
lanes, and each draws its own candidates (no constant liar).

The classic advice stays visible: the first lanes are a quasi-random (Sobol)
design over the whole space with each structural value balanced across lanes
(random before model-based, coarse before fine); TPE works in each
hyperparameter's sampling coordinate (log for ``loguniform``, ``log(1 - x)``
for ``reverse_loguniform``); a tenth of the refills stay uniformly random.
Lanes follow the proposals between programs: each model
shape (bucket) gets room for every lane, in chunks of the first population's
largest bucket (a chunk whose lanes all idle is skipped), and a refill TPE
proposes for another shape starts in a free lane of that shape's program
while the freed lane idles; random refills draw a shape at random too, so the
shapes TPE left keep being tried. Pinned to their programs' shapes, four of
ten lanes spent 40% of a digits search's lane-steps on the narrowest width,
which Optuna's sequential TPE gave up after a few trials. With a timeout on
CPU (where lanes are started and charged by their programs' measured pace) a
proposal moves only to a shape whose program has trained and whose trial fits
in the time left at that shape's measured cost; otherwise it is drawn again
with the freed lane's shape. ``move_lanes=False`` pins every lane to its
first program's shape (TPE then proposes the rest conditioned on it).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import math
from typing import ClassVar, NamedTuple, Sequence

import numpy as np

from . import _space
from ._pacing import _BEST, _C, _CHECKS, _SCORE, _STATUS, _STEP, _U, Costs, Pacing, alone_fits, slowest_step
from ._region import Region
from ._sampling import Stream, trial_seed
from ._strategy import Cadence, Clock, Context, Decision, LaneView, NewTrial
from ._tpe import Encoder, TPEModel
from ._trial import Trial

__all__ = ["Adaptive", "AdaptiveState"]


class AdaptiveState(NamedTuple):
  """Attributes:
    trials: ``{trial id: [u, c, steps, score, best, status, checks]}`` (see
      the module's ``_U``... indices; scores negated when maximizing).
    finished_at: ``{step: sorted scores}`` of finished trials at each check step.
    reached_at: ``{step: sorted scores}`` of every trial that reached it.
    next_id: the id of the next trial.
    lanes: the population size.
    region: the whole space, as JSON (the strategy draws no regions).
    retired: with a timeout, the lanes (slots) given up so that the rest
      can finish trials in the time (None until every chunk has trained a
      segment).
    short: consecutive decisions at which the lanes could not finish
      ``MIN_TRIALS`` trial-lengths in the time left.
    held: with a timeout on CPU, the first population's trials not started
      yet, ``[trial id, config, seed]`` in the order they start (a first
      trial's slot is its id).
    paced_left: with a timeout on CPU, the seconds left at the first
      decision with a measured pace (held lanes still held once half of it
      has passed are given up).
    layout: when lanes follow the proposals, each slot's bucket (an index
      into ``shapes``); slots from ``lanes`` on start idle (None: lanes keep
      their programs).
    shapes: a config of each bucket, in order (its signature is the bucket's).
  """

  trials: dict
  finished_at: dict
  reached_at: dict
  next_id: int
  lanes: int
  region: dict
  retired: list | None = None
  short: int = 0
  held: list | None = None
  layout: list | None = None
  shapes: list | None = None
  paced_left: float | None = None


@dataclasses.dataclass(frozen=True)
class Adaptive(Pacing):
  """TPE refills and median pruning over a population of lanes
  (``search(..., strategy="adaptive")``; what ``strategy="auto"`` picks for
  searches of 80 trial-lengths or more, or with a ``timeout``).

  Without a ``timeout`` the search trains ``num_configs * rounds * num_steps``
  lane-steps, as zoom would (less the trial-lengths its ``recheck`` takes),
  but spends them on many more, mostly shorter,
  trials: ``lanes`` lanes (default: enough for about ten trial-lengths each,
  between 8 and ``num_configs``; ``num_configs`` with a ``timeout``) each run trial
  after trial. With a ``timeout`` it goes on until the time is spent; on a
  CPU it then starts with one lane per model shape (and the enqueued configs)
  and adds lanes while each can still finish a trial at the measured pace,
  each lane charged its own program's measured cost, so a slow model (a conv
  net on a CPU) trains a few lanes that finish trials, and a wide model's
  lanes do not pass for as cheap as a narrow one's.

  Args:
    lanes: the population size, or None (see above).
    segment: steps between decisions (and evaluations, unless ``eval_every``
      is given) as a fraction of a trial's ``num_steps``.
    check_every: a trial is compared with the finished ones every this
      fraction of ``num_steps`` (a multiple of ``segment``).
    percentile: a trial stops if its best score so far is worse than this
      percentile of the finished trials' scores at that step (50: the median).
    min_finished: the pruner compares with finished trials once this many
      finished; before, with every trial that reached the step (as many).
    random_fraction: the share of refills drawn uniformly at random.
    n_startup: refills are random until this many trials have a score
      (None: the number of lanes, at least 8).
    tpe: the TPE settings (:class:`vmaptune.TPEModel`).
    move_lanes: a refill may go to another model shape's program (see the
      module's docstring); False pins each lane to its first program's
      shape.

  >>> import vmaptune as vt
  >>> vt.Adaptive(lanes=16).lanes
  16
  """

  lanes: int | None = None
  segment: float = 0.2
  check_every: float = 0.2
  percentile: float = 50.0
  min_finished: int = 5
  random_fraction: float = 0.1
  n_startup: int | None = None
  tpe: TPEModel = TPEModel()
  move_lanes: bool = True

  name: ClassVar[str] = "adaptive"
  sequential: ClassVar[bool] = False
  asynchronous: ClassVar[bool] = True

  def __post_init__(self):
    if self.lanes is not None and (isinstance(self.lanes, bool) or not isinstance(self.lanes, int) or self.lanes < 1):
      raise ValueError(f"Adaptive: `lanes` must be a positive int or None, got {self.lanes!r}.")
    for name in ("segment", "check_every", "random_fraction"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 or (name != "random_fraction"
                                                                                       and v == 0):
        raise ValueError(f"Adaptive: `{name}` must be a fraction in (0, 1], got {v!r}.")
    if not 0 < self.percentile < 100:
      raise ValueError(f"Adaptive: `percentile` must lie in (0, 100), got {self.percentile!r}.")
    startup = 1 if self.n_startup is None else self.n_startup  # None: max(8, lanes)
    for name, v in (("min_finished", self.min_finished), ("n_startup", startup)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"Adaptive: `{name}` must be a positive int, got {v!r}.")
    if not isinstance(self.move_lanes, bool):
      raise TypeError(f"Adaptive: `move_lanes` must be a bool, got {self.move_lanes!r}.")
    if not isinstance(self.tpe, TPEModel):
      raise TypeError(f"Adaptive: `tpe` must be a vmaptune.TPEModel, got {self.tpe!r}.")

  # Setup -------------------------------------------------------------------

  def check(self, ctx: Context) -> None:
    if ctx.num_steps is None:
      raise ValueError(f"strategy={self.name!r} needs a `num_steps` budget, not `epochs`.")
    if ctx.sampler == "grid":
      raise ValueError("strategy='adaptive' proposes its own configs; sampler='grid' needs strategy='zoom'.")

  def segment_steps(self, ctx: Context) -> int:
    """Steps between decisions: a multiple of ``eval_every``."""
    want = max(1, int(round(self.segment * ctx.num_steps)))
    every = ctx.eval_every or want
    return every * max(1, int(round(want / every)))

  def check_steps(self, ctx: Context) -> int:
    seg = self.segment_steps(ctx)
    return seg * max(1, int(round(self.check_every * ctx.num_steps / seg)))

  def cadence(self, ctx: Context, signature: tuple) -> Cadence:
    seg = self.segment_steps(ctx)
    every = ctx.eval_every or seg
    return Cadence(every, seg // every, ctx.num_steps)

  def num_lanes(self, ctx: Context) -> int:
    """The population size (see the class docstring)."""
    if self.lanes is not None:
      n = self.lanes
    elif ctx.timeout is not None:
      n = ctx.num_configs  # more lanes, more lane-steps per second; a slow model is narrowed (_narrow)
    else:
      n = int(min(ctx.num_configs, max(8, round(ctx.num_configs * ctx.rounds / 10))))
    return max(n, len(ctx.enqueue))  # every enqueued config starts at once

  def total_steps(self, ctx: Context) -> int | None:
    """Population steps: ``num_configs * rounds`` trial-lengths, less those
    held back for the re-check, spread over the lanes."""
    if ctx.timeout is not None:
      return None
    seg = self.segment_steps(ctx)
    lanes = self.num_lanes(ctx)
    per_lane = (ctx.num_configs * ctx.rounds - ctx.reserve) * ctx.num_steps / lanes
    return max(ctx.num_steps, seg * int(round(per_lane / seg)))

  def state_type(self) -> type:
    return AdaptiveState

  def regions(self, state: AdaptiveState) -> list[Region]:
    return [Region.from_json(state.region)]

  def init(self, ctx: Context) -> tuple[list[NewTrial], AdaptiveState]:
    region = Region.full(ctx.space)
    n = self.num_lanes(ctx)
    # A Sobol design over the numeric values, each structural value balanced
    # across lanes (Halton if asked for; the quasi-random design covers the
    # space better than independent draws at a few dozen points).
    sampler = "halton" if ctx.sampler == "halton" else "sobol"
    configs = ctx.drawer.batch(0, n, region, sampler=sampler)
    if ctx.enqueue:
      configs[: len(ctx.enqueue)] = [dict(c) for c in ctx.enqueue[: len(configs)]]
    trials = [NewTrial(i, c, trial_seed(ctx.seed, 0, i), 0) for i, c in enumerate(configs)]
    enc = Encoder(ctx.space)
    records = {t.id: _record(enc, t.config) for t in trials}
    held = None
    if ctx.timeout is not None and not ctx.accelerator:
      # One lane per bucket trains first (and every enqueued config); the
      # others start as the pace allows (``_release``), bucket by bucket in turn.
      buckets: dict[tuple, list[NewTrial]] = {}
      for t in trials[len(ctx.enqueue):]:
        buckets.setdefault(ctx.signature(t.config), []).append(t)
      turns = itertools.zip_longest(*(ts[1:] for ts in buckets.values()))
      held = [[t.id, t.config, t.seed] for turn in turns for t in turn if t is not None]
    state = AdaptiveState(records, {}, {}, len(trials), len(trials), region.to_json(), held=held)
    if self.move_lanes:
      trials, state = _spare_lanes(ctx, trials, state)
    return trials, state

  def held(self, state: AdaptiveState) -> list[int]:
    """The slots of the first population that start idle: held lanes (see
    ``_release``) and the spare lanes that proposals may move to."""
    spare = list(range(state.lanes, len(state.layout))) if state.layout is not None else []
    return [trial_id for trial_id, *_ in state.held or ()] + spare

  def chunk_lanes(self, state: AdaptiveState) -> int | None:
    """The lanes a program wants (None: the largest bucket's trials). Lanes
    that follow the proposals: the first population's largest bucket, for
    every bucket's spare slots too."""
    if state.layout is None:
      return None
    return max(collections.Counter(state.layout[:state.lanes]).values())

  # Decisions ---------------------------------------------------------------

  def _can_start(self, ctx: Context, clock: Clock) -> bool:
    """A new trial fits in the time (or budget) left."""
    total = self.total_steps(ctx)
    if total is not None and clock.elapsed + ctx.num_steps > total:
      return False
    return clock.fits(ctx.num_steps)

  def stop(self, ctx: Context, state: AdaptiveState, lanes: Sequence[LaneView], clock: Clock):
    sign = -1.0 if ctx.maximize else 1.0
    check = self.check_steps(ctx)
    ended, running = [], []
    for v in lanes:
      if not v.started:  # its chunk has not trained yet: nothing to judge
        continue
      rec = state.trials[v.trial.id]
      if v.diverged or not math.isfinite(v.score):
        rec[_STEP], rec[_SCORE], rec[_BEST], rec[_STATUS], rec[_CHECKS] = v.steps, math.inf, math.inf, "diverged", {}
        ended.append((v.slot, {"status": "diverged"}))
        continue
      score = sign * float(v.score)
      rec[_STEP], rec[_SCORE], rec[_BEST] = v.steps, score, min(rec[_BEST], score)
      if v.steps % check == 0 or v.steps >= ctx.num_steps:
        rec[_CHECKS][v.steps] = rec[_BEST]
        bisect.insort(state.reached_at.setdefault(v.steps, []), rec[_BEST])
      if v.steps >= ctx.num_steps:
        rec[_STATUS] = "ok"
        for step, best in rec[_CHECKS].items():
          bisect.insort(state.finished_at.setdefault(step, []), best)
        rec[_CHECKS] = {}
        ended.append((v.slot, {"status": "ok"}))
      else:
        running.append((v, rec))
    self._doomed(ctx, state, clock, ended, running)
    costs = Costs.of(ctx, lanes)
    state = self._narrow(ctx, state, lanes, clock, costs, ended, running)
    paced = costs.load(v for v in lanes if v.started)
    can_start = self._can_start(ctx, clock)
    if not can_start:
      self._finish_best(ctx, state, clock, paced, costs, ended, running)
    # Stop only while a refill could still finish: a stop would otherwise
    # only idle the lane.
    if can_start:
      for v, rec in running:
        if v.steps % check == 0 and self._prune(state, v.steps, rec[_BEST]):
          rec[_STATUS], rec[_CHECKS] = "stopped", {}
          ended.append((v.slot, {"status": "stopped"}))
    elif self._over(ctx, clock, costs.load(v for v, _ in running), paced):  # the budget is spent: stop all
      gone = {slot for slot, _ in ended}
      for v, rec in running:
        if v.slot not in gone:
          rec[_STATUS], rec[_CHECKS] = "stopped", {}
          ended.append((v.slot, {"status": "stopped"}))
    return ended, state

  def _prune(self, state: AdaptiveState, step: int, best: float) -> bool:
    """Optuna's percentile rule: worse than the percentile of the finished
    trials' best scores at this step (of every trial that reached it until
    ``min_finished`` have finished)."""
    ref = state.finished_at.get(step, [])
    if len(ref) < self.min_finished:
      ref = state.reached_at.get(step, [])
      if len(ref) < self.min_finished:
        return False
    return best > _percentile(ref, self.percentile)

  def next(self, ctx: Context, state: AdaptiveState, lanes: Sequence[LaneView], ended: Sequence[int],
           history: Sequence[Trial], clock: Clock):
    elapsed = clock.elapsed
    seg = self.segment_steps(ctx)
    report = elapsed // ctx.num_steps > (elapsed - seg) // ctx.num_steps
    retired = set(state.retired or ())
    can_start = self._can_start(ctx, clock)
    # Lanes given up before their chunk trained, and in the second half those
    # whose trial could no longer finish, idle from the start; their trials
    # never ran and are not reported.
    late = bool(self._second_half(ctx, clock)) and not can_start
    dropped = {}
    for v in lanes:
      if not v.started and (late or v.slot in retired):
        dropped[v.slot] = None
        state.trials[v.trial.id][_STATUS] = "unused"
    costs = Costs.of(ctx, lanes)
    paced = costs.load(v for v in lanes if v.started)  # the lanes the last segment's pace is of
    released, state = self._release(ctx, state, lanes, clock, costs, paced, can_start)
    busy = len(lanes) - len(ended) - len(dropped) + len(released)
    gone = set(ended) | set(dropped)
    # Lanes whose chunk has not trained cost nothing until it starts, and on
    # CPU it starts only if a trial fits (``Population._first_call_fits``):
    # charged here, five such lanes kept a 10 s CNN search's only trained
    # lane from a new trial, and it ended 3 s early with nothing training.
    load = (costs.load(v for v in lanes if v.slot not in gone and v.started)
            + [(sig, costs.bucket(sig)) for sig in (ctx.signature(t.config) for t in released.values())])
    dropped.update(released)
    if self._over(ctx, clock, load, paced):
      return Decision(report=report, done=True), state
    if not ended:
      return Decision(refill=dropped, report=report, done=busy == 0), state
    by_slot = {v.slot: v for v in lanes}
    idle = {s: None for s in ended if s in retired}
    if costs.by_slot and clock.remaining is not None:
      # On CPU a freed lane takes a new trial if the trial could finish
      # beside every lane that trains on, each charged its own cost: near
      # the end a narrow conv net's lane still refills when a wide one's
      # new trial would not fit (else it idles).
      for s in sorted(ended):
        if s in idle:
          continue
        lane = costs.load([by_slot[s]])
        if (self._fits(ctx, clock, ctx.num_steps, load + lane, paced)
            and alone_fits(ctx, clock, by_slot[s].step_seconds, ctx.num_steps)):
          load += lane
        else:
          idle[s] = None
    elif not can_start:  # a new trial could not finish: the lane idles
      idle = {slot: None for slot in ended}
    if len(idle) == len(ended):
      done = busy == 0
      return Decision(refill={**dropped, **idle}, report=report and not done, done=done), state
    slots = sorted((s for s in ended if s not in idle), key=lambda s: (by_slot[s].chunk, by_slot[s].lane))
    rng = np.random.default_rng([ctx.seed, Stream.ADAPTIVE, elapsed])
    signatures = [by_slot[s].signature for s in slots]
    model = self._model(ctx, state)  # one fit a decision: the redraws in _place share it
    configs = self._propose(ctx, state, signatures, rng, free=state.layout is not None, model=model)
    targets = slots
    if state.layout is not None:
      fits = None
      if costs.by_slot and clock.remaining is not None:
        # On CPU with a timeout a proposal moves only to a shape whose
        # program has trained (its cost measured) and whose trial fits
        # beside the others at that cost (else it keeps the freed lane's shape).
        seconds = slowest_step(lanes)

        def fits(slot: int, sig: tuple) -> bool:
          if sig not in costs.by_signature or not alone_fits(ctx, clock, seconds.get(sig, math.nan), ctx.num_steps):
            return False
          moved = list(load)
          moved.remove(costs.load([by_slot[slot]])[0])  # the freed lane's trial, charged above
          moved.append((sig, costs.by_signature[sig]))
          if not self._fits(ctx, clock, ctx.num_steps, moved, paced):
            return False
          load[:] = moved
          return True
      targets, configs = self._place(ctx, state, lanes, ended, slots, configs, rng, fits, reserved=dropped,
                                     model=model)
    enc = Encoder(ctx.space)
    refill, next_id = {**dropped, **idle, **{s: None for s in slots}}, state.next_id
    for slot, config in zip(targets, configs):
      refill[slot] = NewTrial(next_id, config, trial_seed(ctx.seed, Stream.REFILL, next_id), elapsed // ctx.num_steps)
      state.trials[next_id] = _record(enc, config)
      next_id += 1
    return Decision(refill=refill, report=report), state._replace(next_id=next_id)

  def _place(self, ctx: Context, state: AdaptiveState, lanes: Sequence[LaneView], ended: Sequence[int],
             slots: Sequence[int], configs: Sequence[dict], rng: np.random.Generator, fits=None,
             reserved=(), model=None):
    """The slot each proposal starts in: the lowest free slot of its shape's
    bucket (so the busy lanes gather in a bucket's first chunks and the
    others idle and are skipped). A proposal for a shape with no program in
    this population is drawn again with the freed lane's shape pinned, as
    is one for another shape that ``fits`` (with a timeout on CPU) rejects.
    Held and given-up slots are never free, nor ``reserved`` ones (held
    lanes starting at this decision)."""
    index = {ctx.signature(config): b for b, config in enumerate(state.shapes)}
    busy = (({v.slot for v in lanes} - set(ended)) | set(state.retired or ()) | {i for i, *_ in state.held or ()}
            | set(reserved))
    signature_of = {v.slot: v.signature for v in lanes}
    free: dict[int, collections.deque] = collections.defaultdict(collections.deque)
    for s, b in enumerate(state.layout):  # ascending: each bucket's lowest free slot first
      if s not in busy:
        free[b].append(s)
    targets, out, again = [], [], []
    for slot, config in zip(slots, configs):
      sig, wanted = signature_of[slot], ctx.signature(config)
      b = index.get(wanted)
      if b is None or (fits is not None and wanted != sig and not fits(slot, wanted)):
        again.append((len(out), sig))  # drawn again below, all in one batch
        b = index[sig]
      targets.append(free[b].popleft())  # a bucket has a slot for every lane: never empty
      out.append(config)
    for (i, _), config in zip(again, self._propose(ctx, state, [sig for _, sig in again], rng, model=model)):
      out[i] = config
    return targets, out

  def _model(self, ctx: Context, state: AdaptiveState):
    """``(encoder, (good, bad) densities or None)`` of the trials observed so far.

    Fitted once a decision (for every redraw it took 39% of a 25 s diabetes
    search's wall time on the 2-core CPU), from a ranking by ``np.lexsort``
    and only the trials the densities keep: ranking 5,000 with ``sorted`` and
    gathering them all took 2.2 s in a py-spy profile of a 40 s diabetes
    search (once its proposals were drawn together)."""
    enc = Encoder(ctx.space)
    observed = [rec for rec in state.trials.values() if rec[_STEP] > 0]
    n_startup = self.n_startup if self.n_startup is not None else max(8, state.lanes)
    if len(observed) < n_startup or not enc.numeric + enc.cats:
      return enc, None
    # Best first: deeper trials before shallower ones (a trial that survived
    # longer beats any stopped earlier), then by score there; diverged last.
    # (np.lexsort is stable, as sorted: ties keep the trials' order.)
    order = np.lexsort((np.fromiter((r[_SCORE] for r in observed), np.float64, len(observed)),
                        -np.fromiter((r[_STEP] for r in observed), np.int64, len(observed)),
                        np.fromiter((r[_STATUS] == "diverged" for r in observed), bool, len(observed))))
    n_good, rest = self.tpe.split(len(order))

    def gather(ranks):
      rows = [observed[i] for i in order[ranks]]
      return (np.asarray([r[_U] for r in rows], np.float64).reshape(len(rows), len(enc.numeric)),
              np.asarray([r[_C] for r in rows], np.int64).reshape(len(rows), len(enc.cats)))

    return enc, self.tpe.densities(enc, *gather(slice(None, n_good)), *gather(rest))

  def _propose(self, ctx: Context, state: AdaptiveState, signatures: Sequence[tuple],
               rng: np.random.Generator, free: bool = False, model=None) -> list[dict]:
    """One config per freed lane, keeping the lane's structural values
    (``free``: TPE proposes them too, and random refills after the first
    ones draw a shape of ``state.shapes`` at random). ``model``: what
    :meth:`_model` gives for ``state`` (fitted here if None)."""
    enc, fitted = model if model is not None else self._model(ctx, state)
    out: list = []
    region = Region.full(ctx.space)
    modelled = []  # (position, fixed values, pins) of the refills TPE proposes
    for sig in signatures:
      fixed = {} if free else {k: v for k, v in sig if k in ctx.space}
      if fitted is None or rng.random() < self.random_fraction:
        if free and fitted is not None:  # a random shape too: shapes TPE left keep being tried
          sig = ctx.signature(state.shapes[int(rng.integers(len(state.shapes)))])
        out.append(ctx.drawer.refill(sig, region, rng))
        continue
      if fixed:
        pins = enc.pins({**_space.complete(ctx.space, ctx.drawer.refill(sig, region, rng)), **fixed}, fixed)
      else:  # nothing pinned
        pins = (np.full(len(enc.numeric), np.nan), np.full(len(enc.cats), -1, np.int64))
      modelled.append((len(out), fixed, pins))
      out.append(None)
    if modelled:
      points = self.tpe.propose_many(rng, *fitted, [pins for _, _, pins in modelled])
      for (i, fixed, _), (u, c) in zip(modelled, points):
        out[i] = _space.complete(ctx.space, enc.decode(u, c), fixed)
    return out


def _spare_lanes(ctx: Context, trials: list[NewTrial], state: AdaptiveState):
  """The first population with room in every bucket for every lane: spare
  slots (idle from the start) after the trials, each bucket's in chunks of
  the largest bucket's trials. One bucket: unchanged."""
  buckets: dict[tuple, list[NewTrial]] = {}
  for t in trials:
    buckets.setdefault(ctx.signature(t.config), []).append(t)
  if len(buckets) < 2:
    return trials, state
  chunk = max(len(ts) for ts in buckets.values())
  room = chunk * -(-len(trials) // chunk)
  trials, layout, next_id = list(trials), [None] * len(trials), len(trials)
  for b, ts in enumerate(buckets.values()):
    for t in ts:
      layout[t.id] = b
    for _ in range(room - len(ts)):  # placeholders: never started as such (their slots idle)
      trials.append(NewTrial(next_id, ts[0].config, ts[0].seed, 0))
      layout.append(b)
      next_id += 1
  shapes = [ts[0].config for ts in buckets.values()]
  return trials, state._replace(next_id=next_id, layout=layout, shapes=shapes)


def _percentile(ordered: Sequence[float], q: float) -> float:
  """``np.percentile(ordered, q)`` of a sorted list without copying it to an
  array: numpy's linear interpolation, bit for bit (each decision compares
  every trial at a check step with lists of up to hundreds of scores)."""
  pos = (len(ordered) - 1) * (q / 100)
  lo = math.floor(pos)
  a, b = ordered[lo], ordered[min(lo + 1, len(ordered) - 1)]
  t = pos - lo
  return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def _record(enc: Encoder, config: dict) -> list:
  u, c = enc.encode(config)
  return [u.tolist(), c.tolist(), 0, math.inf, math.inf, "running", {}]

