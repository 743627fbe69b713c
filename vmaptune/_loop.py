"""The one driver: every strategy runs through :func:`run`.

The loop owns what strategies share: training a population to the next
decision point, asking the strategy what ends and what comes next,
checkpoints (one format: this loop's state, the strategy's state and the
population), progress, callbacks, Ctrl-C, the all-diverged error and the
stats. Its shape, as in optimistix's ``iterative_solve``::

  trials, state = strategy.init(ctx); population.start(trials)
  while True:
    population.advance()                     # to the next decision point
    ended, state = strategy.stop(...)        # trials that end now
    decision, state = strategy.next(...)     # refill / exploit / new generation / done
    population.apply(decision)
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Sequence

import jax

from . import _faults, _recheck
from ._check import model_digest
from ._checkpoint import CheckpointError, Checkpointer, CheckpointMismatch, fingerprint_diff
from ._compiler import expected_compile_seconds
from ._lane import lane_init, stack_inputs
from ._plan import Plan
from ._placement import host_leaf, unhost
from ._population import Population
from ._replay import Replay
from ._progress import Progress
from ._result import SearchResult
from ._strategy import Clock, Context, Strategy
from ._trial import AllDivergedError, Stats, Trial, better, callback_stops, rank_trials, user_stacklevel

__all__ = ["Ledger", "run"]


class Ledger:
  """The finished trials, the best of them and its parameters (host copies,
  kept apart from any lane: a lane may be refilled or freed).

  A lane's parameters must be copied while its state exists, which for a
  sequential chunk is before its round ends: :meth:`offer` keeps a
  *candidate*, and :meth:`add` confirms it when its trial finishes. An
  interrupted round's candidate never reaches the result.
  """

  def __init__(self, maximize: bool, keep: int = 1):
    self.maximize = maximize
    self.keep = keep
    self.trials: list[Trial] = []
    #: ``{trial id: params}`` of the best trial and, with ``keep > 1``, the
    #: next best finished ones (a re-check may keep one of them).
    self.best_params: dict[int, tuple] = {}
    self.kept: list[Trial] = []  # the best ``keep`` finished trials whose params are kept, best first
    self.candidate: tuple[Trial, tuple] | None = None

  @property
  def best(self) -> Trial | None:
    return self.kept[0] if self.kept else None

  def offer(self, trial: Trial, params: Callable[[], tuple]) -> None:
    """Keeps ``params()`` if ``trial`` is healthy and better than any so far
    (or than the ``keep``-th best so far)."""
    if trial.status != "ok" or not math.isfinite(trial.score):
      return
    if self.candidate is not None:
      current = self.candidate[0]
    else:
      current = self.kept[-1] if len(self.kept) >= self.keep else None
    if current is None or better(trial, current, self.maximize):
      self.candidate = (trial, params())

  def add(self, trial: Trial) -> None:
    """A finished trial; confirms the candidate if it is this one."""
    self.trials.append(trial)
    if self.candidate is not None and self.candidate[0].id == trial.id:
      if trial.status == "ok":
        self._keep(trial, self.candidate[1])
      self.candidate = None

  def replace(self, trial: Trial, params) -> bool:
    """``trial`` in place of the one of its id (a stopped trial trained on to
    its end), its ``params`` kept if it is healthy; whether it is."""
    self.trials = [trial if t.id == trial.id else t for t in self.trials]
    if not rank_trials([trial], self.maximize):
      return False
    self._keep(trial, params)
    return True

  def _keep(self, trial: Trial, params) -> None:
    kept = rank_trials(self.kept + [trial], self.maximize)[:self.keep]
    self.best_params = {t.id: params if t.id == trial.id else self.best_params[t.id] for t in kept}
    self.kept = kept

  def restore_best(self, trial: Trial, params) -> None:
    """The best trial and its params, from a checkpoint (the others kept are not saved)."""
    self.best_params, self.kept = {trial.id: params}, [trial]


class _Run:
  """One search in progress: the strategy, its population, what is finished."""

  def __init__(self, *, ctx: Context, strategy: Strategy, plan: Plan, population: Population, stats: Stats,
               checkpointer: Checkpointer | None, fingerprint: dict | None, overwrite: bool,
               callbacks: Sequence[Callable], verbose: bool, metric: str, options: dict,
               timeout: float | None = None, recheck: tuple[int, int] | None = None):
    self.ctx = ctx
    self.strategy = strategy
    self.plan = plan
    self.population = population
    self.stats = stats
    self.checkpointer = checkpointer
    self.fingerprint = fingerprint or {}
    self.overwrite = overwrite
    self.callbacks = callbacks
    self.metric = metric
    self.options = options
    self.recheck = recheck  # (top, seeds) to re-check at the end, or None
    self.ledger = Ledger(ctx.maximize, recheck[0] if recheck else 1)
    self.progress = Progress(metric, verbose and jax.process_index() == 0)
    self.state: Any = None
    self.elapsed = 0      # population time: steps every lane could have trained
    self.horizons = 0     # decision points passed (a zoom round each)
    self.phase = "advance"
    self.timeout = timeout
    self.deadline: float | None = None       # what the strategy plans to: the re-check's time held back
    self.deadline_full: float | None = None  # the timeout's
    self.wall_before, self._saved_at = 0.0, -math.inf  # wall seconds earlier runs used; the last save's clock
    self._pace = _Pace()

  # The loop ------------------------------------------------------------------

  def run(self, t_start: float) -> SearchResult:
    strategy = self.strategy
    if self.checkpointer is not None:
      self.checkpointer.acquire()
    interrupted = False
    self._t_start = t_start
    self.population.start_tier = "restarts" if getattr(strategy, "asynchronous", False) else "init"  # _compiler.TIERS
    try:
      found = self._load() if self.checkpointer is not None else None
      if found is not None:
        self._restore(*found)
      else:
        trials, self.state = strategy.init(self.ctx)
        self.population.start(trials, strategy.chunk_lanes(self.state) if hasattr(strategy, "chunk_lanes") else None)
        held = strategy.held(self.state) if hasattr(strategy, "held") else ()
        if held:  # lanes that start later, as the strategy decides: idle until refilled
          self.population.refill({slot: None for slot in held})
      if self.timeout is not None:  # a resumed search gets what is left of its budget
        self.deadline = self.deadline_full = t_start + self.timeout - self.wall_before
        # Trials that go at their own pace can start as their programs compile.
        self.population.staggered = getattr(strategy, "asynchronous", False)
        self.population.time_left = lambda: self.deadline - time.perf_counter()
      self._start_progress()
      try:
        while True:
          if self.phase == "advance":
            self._advance()
          if self._decide(t_start):
            break
      except KeyboardInterrupt:
        if not rank_trials(self.ledger.trials, self.ctx.maximize):
          raise
        interrupted = True
        warnings.warn(
            f"vmaptune: interrupted; returning the {len(self.ledger.trials)} finished trial(s)"
            + (f" (saved in {self.checkpointer.directory})" if self.checkpointer else ""),
            RuntimeWarning, stacklevel=user_stacklevel())
    finally:
      self.progress.close()
      self.population.cancel_compiles()  # a program no lane will run must not hold the process up at exit
      if self.checkpointer is not None:
        self.checkpointer.release()
    if not rank_trials(self.ledger.trials, self.ctx.maximize) and self.timeout is not None:
      self._finish_one()
    if not rank_trials(self.ledger.trials, self.ctx.maximize):
      raise AllDivergedError(self._no_result_message(), self.ledger.trials)
    result = self.snapshot(t_start, interrupted)
    if self.recheck is not None and not interrupted:
      size = self.recheck
      if self.deadline_full is not None:  # only what fits in the time left, by the trials' own measured time
        size = _recheck.fit(result.top(size[0]), *size, self.deadline_full - time.perf_counter(), self._width)
      try:
        _recheck.settle(result, size, requested=self.recheck, t_start=t_start, verbose=self.progress.enabled,
                        deadline=self.deadline_full, batched=any(self._width(t) for t in result.top(self.recheck[0])))
      except KeyboardInterrupt:  # the search is done: return it, keeping its best score's trial
        result.rechecked = None
        result.interrupted = True
        warnings.warn("vmaptune: interrupted during the re-check; returning the search's best score's trial",
                      RuntimeWarning, stacklevel=user_stacklevel())
    return result

  def _width(self, trial: Trial) -> tuple | None:
    """``(program, lanes)`` of a trial's program where its padding lanes cost
    time (lanes batched together: accelerators), None where idle lanes are
    skipped (one lane at a time: CPU); see :func:`_recheck.estimate`."""
    ref = self.population.refs.get(trial.id)
    if ref is None or self.plan.layout(ref.lanes).lane_batch <= 1:
      return None
    return ref, ref.lanes

  def _finish_one(self) -> None:
    """The time ran out before any trial finished: trains the trial that got
    furthest on to its end (the next if it diverges, up to three), as Optuna
    finishes the trial it is in, so that the search returns a model; warns
    how far past the timeout that took."""
    if self.options.get("strategy") == "pbt":  # a PBT lane's trial is a schedule, not one config
      return
    stopped = [t for t in self.ledger.trials if t.status == "stopped" and t.id in self.population.refs]
    replay = Replay(self.plan, self.population)
    for trial in sorted(stopped, key=lambda t: (-t.steps, t.id))[:3]:
      done, params = replay.finish(trial, self.metric, self.ctx.maximize, self.stats)
      if self.ledger.replace(done, params):
        warnings.warn(
            f"vmaptune: the timeout of {self.timeout:g} s ran out before any trial finished (compiling took "
            f"{self.stats.compile_wall_seconds:.1f} s); trial {done.id} was trained on to its end so that the search "
            f"has a result, ending {time.perf_counter() - self.deadline_full:.1f} s past the timeout",
            RuntimeWarning, stacklevel=user_stacklevel())
        return

  def _no_result_message(self) -> str:
    trials = self.ledger.trials
    diverged = sum(t.status == "diverged" for t in trials)
    if diverged == len(trials):
      return f"all {len(trials)} trials diverged; lower the learning-rate range or check the data."
    text = f"no trial finished its budget ({len(trials) - diverged} stopped early, {diverged} diverged)"
    if self.timeout is not None:
      text += (f": the timeout of {self.timeout:g} s ran out first (compiling took "
               f"{self.stats.compile_wall_seconds:.1f} s of it); give the search more time or shorter trials")
    return text + "."

  def _advance(self) -> None:
    self._pace.start(self)
    sequential = self.strategy.sequential
    self.population.advance(sequential, on_call=self._on_call, on_done=self._on_chunk_done)
    if sequential:
      self.elapsed += max(c.cadence.budget for c in self.population.chunks)
    else:
      c = self.population.chunks[0].cadence
      self.elapsed += c.steps_per_call
    self.horizons += 1
    self.stats.segments += 1
    self._pace.stop(self)
    self.phase = "decide"
    self.progress.advance(self._progress_done(), self._best_score())
    if self._checkpoint_due():
      self._save()

  def _decide(self, t_start: float) -> bool:
    """Ends trials, asks what comes next and applies it; True when done."""
    t0 = time.perf_counter()
    try:
      return self._decide_now(t_start)
    finally:
      self._pace.decide_seconds = time.perf_counter() - t0

  def _decide_now(self, t_start: float) -> bool:
    lanes = self.population.views()
    clock = self._clock()
    ended, self.state = self.strategy.stop(self.ctx, self.state, lanes, clock)
    for slot, fields in ended:
      trial = self.population.finish(slot, fields, self.ctx.maximize)
      if not self.strategy.sequential:  # sequential chunks offered theirs when they finished
        self.ledger.offer(trial, lambda slot=slot: self.population.lane_params(slot))
      self.ledger.add(trial)
    decision, self.state = self.strategy.next(self.ctx, self.state, lanes, [s for s, _ in ended],
                                              self.ledger.trials, clock)
    if decision.generation is not None and not self._fits(decision.generation):
      decision = decision._replace(generation=None, done=True, report=True)
    if self.strategy.sequential or decision.report or decision.done:
      # Rounds: zoom's, or trial-lengths of population time.
      rounds = self.horizons if self.strategy.sequential else self.elapsed // (self.ctx.num_steps or self.elapsed or 1)
      self.progress.end_round(self._best_score(), rounds, last=decision.done)
    if decision.report or decision.done:
      if any([callback_stops(fn(self.snapshot(t_start))) for fn in self.callbacks]):
        return True  # a callback ended the search: as if its budget were spent
    if decision.done:
      return True
    if decision.generation is not None:
      self.population.start(decision.generation)
    if decision.refill:
      self.population.refill(decision.refill)
    if decision.exploit:
      self.population.exploit(decision.exploit)
    self.phase = "advance"
    return False

  def _on_call(self, kind: str, j: int) -> None:
    """After a sequential chunk's call (``"mid"``: more follow) or after a
    chunk finished (``"chunk"``: more chunks follow): checkpoint points."""
    self.progress.advance(self._progress_done(), self._best_score())
    if self.checkpointer is None:
      return
    self._save()
    if kind == "mid":
      _faults.failpoint(f"round{self.horizons}:mid")

  def _on_chunk_done(self, j: int) -> None:
    """A sequential chunk finished its trials: keep the best one's parameters
    before its state is released."""
    chunk = self.population.chunks[j]
    for i in chunk.members:
      trial = self.population.slots[i].to_trial("ok", self.ctx.maximize)
      self.ledger.offer(trial, lambda i=i: self.population.lane_params(i))
    self.progress.advance(self._progress_done(), self._best_score())

  # Time budget ---------------------------------------------------------------

  def _clock(self) -> Clock:
    """Population time, and with a timeout the steps that fit in the time left."""
    remaining = left = None
    if self.deadline_full is not None and self.recheck is not None:
      self.deadline = self.deadline_full - _recheck.reserve(self.ledger.kept, *self.recheck, self.timeout,
                                                            self._width)
    if self.deadline is not None:
      left = self.deadline - time.perf_counter()
      if self._pace.steps_per_second:
        remaining = max(0, int(left * self._pace.steps_per_second))
    return Clock(self.elapsed, remaining, left)

  def _fits(self, trials) -> bool:
    """Whether a new generation (a zoom round) would finish before the deadline,
    by estimate: its lane-steps at the last round's rate, the programs it
    still needs compiled, and a round's host work."""
    if self.deadline is None or not self._pace.lane_steps_per_second:
      return True
    plan = self.plan
    lane_steps, programs = 0, set()
    for t in trials:
      sig = plan.routing.signature(t.config)
      lane_steps += self.ctx.steps_for(sig)
      c = self.strategy.cadence(self.ctx, sig)
      if not plan.program(sig, plan.fit_lanes(sig, plan.capacity(1)), c.evals_per_call).compiled:
        programs.add(sig)
    estimate = (lane_steps / self._pace.lane_steps_per_second + len(programs) * expected_compile_seconds(self.stats)
                + self._pace.host_seconds)
    return time.perf_counter() + estimate <= self.deadline

  def _best_score(self) -> float | None:
    best = self.ledger.candidate[0] if self.ledger.candidate is not None else self.ledger.best
    return best.score if best is not None else None

  def _start_progress(self) -> None:
    """A bar of lane-steps, or of seconds with a timeout; compiles show in its label."""
    if self.timeout is not None:
      self.progress.unit = "s"
      total = int(round(self.timeout))
    else:
      total = self.strategy.total_steps(self.ctx)
      if total is not None:
        total *= self.ctx.num_configs
      elif self.ctx.num_steps is not None:
        total = self.ctx.rounds * self.ctx.num_configs * self.ctx.num_steps
    self.progress.start(self.strategy.name, total, done=self._progress_done())
    self.population.on_compile = lambda status: self.progress.status(
        None if status is None else f"compiling {status[0]}/{status[1]} programs")
    self.population.steps_ahead = self._steps_ahead

  def _steps_ahead(self, chunk) -> int:
    """Steps each lane of ``chunk`` will still train with its program: a zoom
    round's budget times the rounds left (a bucket's program serves every
    round it recurs in); a halving or PBT lane, the whole run. With a
    timeout: long (programs get the fast-running compile)."""
    if self.timeout is not None:
      return 10**9
    if self.strategy.sequential:
      return chunk.cadence.budget * max(1, self.ctx.rounds - self.horizons)
    return self.strategy.total_steps(self.ctx) or chunk.cadence.budget

  def _progress_done(self) -> int:
    if self.timeout is not None:
      return int(self.wall_before + time.perf_counter() - self._t_start)
    return self.stats.lane_steps

  # Results -------------------------------------------------------------------

  def snapshot(self, t_start: float, interrupted: bool = False) -> SearchResult:
    """A SearchResult of the trials finished so far."""
    self.stats.wall_seconds = time.perf_counter() - t_start
    self.stats.lane_batch = self.plan.layout(self.plan.lanes_per_program or 1).lane_batch
    result = SearchResult(
        trials=sorted(self.ledger.trials, key=lambda t: t.id), space=self.ctx.space, metric=self.metric,
        maximize=self.ctx.maximize, regions=self.strategy.regions(self.state), stats=self.stats,
        replay=Replay(self.plan, self.population), best_params=dict(self.ledger.best_params),
        options=dict(self.options))
    result.interrupted = interrupted
    return result

  # Checkpoints -------------------------------------------------------------

  def _checkpoint_due(self) -> bool:
    """After a decision point's training: every zoom round; with halving and
    PBT every ``checkpoint_every`` steps of population time (default
    ``num_steps``; with a timeout, at least a twentieth of it apart) and at the end."""
    if self.checkpointer is None:
      return False
    if self.strategy.sequential:
      return True
    if self.timeout is not None and self.ctx.checkpoint_every is None and time.perf_counter() - self._saved_at < \
        self.timeout / 20:  # at most about twenty saves: a small model's, every num_steps, took half of 8 s
      return False
    c = self.population.chunks[0].cadence
    step = c.steps_per_call
    every = self.ctx.checkpoint_every or self.ctx.num_steps
    total = self.strategy.total_steps(self.ctx)
    return self.elapsed // every > (self.elapsed - step) // every or (total is not None and self.elapsed >= total)

  def _save(self) -> None:
    t0 = time.perf_counter()
    arrays: dict = {}
    meta = {
        "fingerprint": self.fingerprint, "phase": self.phase, "elapsed": self.elapsed, "horizons": self.horizons,
        "wall_used": self.wall_before + time.perf_counter() - self._t_start, "strategy": self.strategy.name,
        "strategy_state": self.state._asdict(),
        "trials": [t.to_dict() for t in self.ledger.trials],
        "plan": {"lanes_per_program": self.plan.lanes_per_program,
                 "chunk_lanes": list(self.plan.chunk_lanes.items())},
        "population": self.population.save(arrays), "best": None,
    }
    kept = {"best": (self.ledger.best, self.ledger.best_params.get(getattr(self.ledger.best, "id", None))),
            "candidate": self.ledger.candidate}
    for name, pair in kept.items():
      if pair is None or pair[0] is None:
        meta[name] = None
        continue
      leaves = jax.tree.leaves(pair[1])
      for j, leaf in enumerate(leaves):
        arrays[f"{name}/{j}"] = host_leaf(leaf)
      meta[name] = {"trial": pair[0].to_dict(), "leaves": len(leaves)}
    self.checkpointer.save(meta, arrays)
    self._saved_at = time.perf_counter()
    self.stats.checkpoint_seconds += time.perf_counter() - t0
    _faults.failpoint(f"{self.strategy.name}:saved")

  def _load(self):
    """The directory's newest checkpoint of *this* call, as ``(meta, arrays)``.

    A checkpoint of a different call is refused (:class:`CheckpointMismatch`
    listing the differences) unless ``overwrite=True``, which clears it.
    """
    self.fingerprint = dict(self.fingerprint, model_structure=self._model_structure())
    try:
      found = self.checkpointer.load()
    except CheckpointError as e:
      if not (self.overwrite and "format version" in str(e)):
        raise
      self.checkpointer.clear()  # another format's checkpoint: start afresh, as asked
      found = None
    if found is not None:
      diff = fingerprint_diff(found[0]["fingerprint"], self.fingerprint)
      if diff and not self.overwrite:
        raise CheckpointMismatch(
            f"checkpoint_dir {self.checkpointer.directory} holds a different search; "
            "refusing to mix results. Differences: " + "; ".join(diff)
            + ". Pass overwrite=True to start afresh, or use another directory.")
      if diff:
        self.checkpointer.clear()
        found = None
      else:
        self.stats.resumed_from = self.checkpointer.directory
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("vmaptune:checkpoint-loaded")
    return found

  def _model_structure(self) -> str:
    """The model's structure at round 0's first config joins the fingerprint:
    a changed architecture is a different search even under the same name."""
    trials, _ = self.strategy.init(self.ctx)
    self.plan.lanes_per_program = None  # drawn again when the search starts
    return model_digest(self.plan.spec(self.plan.routing.signature(trials[0].config)))

  def _restore(self, meta: dict, arrays: dict) -> None:
    plan = meta["plan"]
    self.plan.lanes_per_program = plan["lanes_per_program"]
    self.plan.chunk_lanes.update({sig: lanes for sig, lanes in plan["chunk_lanes"]})
    self.population.restore(meta["population"], arrays)
    self.ledger.trials = [Trial.from_dict(d) for d in meta["trials"]]
    self.state = self.strategy.state_type()(**meta["strategy_state"])
    self.phase, self.elapsed, self.horizons = meta["phase"], int(meta["elapsed"]), int(meta["horizons"])
    self.wall_before = float(meta.get("wall_used", 0.0))
    for name in ("best", "candidate"):
      saved = meta.get(name)
      if not saved:
        continue
      trial = Trial.from_dict(saved["trial"])
      spec = self.plan.spec(self.plan.routing.signature(trial.config))
      inputs = stack_inputs([trial.seed], [{k: trial.config[k] for k in spec.injected}], [0.0], [1], spec)
      inputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), inputs)
      abstract = jax.eval_shape(lambda i: lane_init(spec, i), inputs)
      leaves, treedef = jax.tree.flatten((abstract.params, abstract.model_state))
      params = jax.tree.unflatten(treedef, [unhost(arrays[f"{name}/{j}"], a) for j, a in enumerate(leaves)])
      if name == "best":
        self.ledger.restore_best(trial, params)
      else:
        self.ledger.candidate = (trial, params)


class _Pace:
  """How fast the search goes, from the last decision point's stretch of
  training: population steps and lane-steps per second (compiling left out:
  it is paid once) and the host work around it."""

  def __init__(self):
    self.steps_per_second = None
    self.lane_steps_per_second = None
    self.host_seconds = 0.0
    self.decide_seconds = 0.0  # the last decision's host time (sampling, strategy)
    self._mark = None

  def start(self, run: "_Run") -> None:
    s = run.stats
    self._mark = (time.perf_counter(), s.compile_wall_seconds + s.trace_seconds, run.elapsed, s.lane_steps,
                  s.train_seconds)

  def stop(self, run: "_Run") -> None:
    t0, c0, e0, l0, tr0 = self._mark
    s = run.stats
    seconds = time.perf_counter() - t0 - (s.compile_wall_seconds + s.trace_seconds - c0) + self.decide_seconds
    if seconds > 0 and run.elapsed > e0:
      self.steps_per_second = (run.elapsed - e0) / seconds
    train = s.train_seconds - tr0
    if train > 0 and s.lane_steps > l0:
      self.lane_steps_per_second = (s.lane_steps - l0) / train
    self.host_seconds = max(0.0, seconds - train)


def run(**kwargs) -> SearchResult:
  """Runs one search to the end (see :class:`_Run` for the arguments)."""
  t_start = kwargs.pop("t_start")
  return _Run(**kwargs).run(t_start)
