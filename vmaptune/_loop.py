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

from . import _faults
from ._check import model_digest
from ._checkpoint import CheckpointError, Checkpointer, CheckpointMismatch, fingerprint_diff
from ._lane import lane_init, stack_inputs
from ._plan import Plan
from ._population import Population, Replay
from ._program import host_leaf, unhost
from ._progress import Progress
from ._result import SearchResult
from ._strategy import Context, Strategy
from ._trial import AllDivergedError, Stats, Trial, better, rank_trials

__all__ = ["Ledger", "run"]


class Ledger:
  """The finished trials, the best of them and its parameters (host copies,
  kept apart from any lane: a lane may be refilled or freed).

  A lane's parameters must be copied while its state exists, which for a
  sequential chunk is before its round ends: :meth:`offer` keeps a
  *candidate*, and :meth:`add` confirms it when its trial finishes. An
  interrupted round's candidate never reaches the result.
  """

  def __init__(self, maximize: bool):
    self.maximize = maximize
    self.trials: list[Trial] = []
    self.best: Trial | None = None
    self.best_params: dict[int, tuple] = {}
    self.candidate: tuple[Trial, tuple] | None = None

  def offer(self, trial: Trial, params: Callable[[], tuple]) -> None:
    """Keeps ``params()`` if ``trial`` is healthy and better than any so far."""
    if trial.status != "ok" or not math.isfinite(trial.score):
      return
    current = self.candidate[0] if self.candidate is not None else self.best
    if current is None or better(trial, current, self.maximize):
      self.candidate = (trial, params())

  def add(self, trial: Trial) -> None:
    """A finished trial; confirms the candidate if it is this one."""
    self.trials.append(trial)
    if self.candidate is not None and self.candidate[0].id == trial.id:
      if trial.status == "ok" and (self.best is None or better(trial, self.best, self.maximize)):
        self.best, self.best_params = trial, {trial.id: self.candidate[1]}
      self.candidate = None


class _Run:
  """One search in progress: the strategy, its population, what is finished."""

  def __init__(self, *, ctx: Context, strategy: Strategy, plan: Plan, population: Population, stats: Stats,
               checkpointer: Checkpointer | None, fingerprint: dict | None, overwrite: bool,
               callbacks: Sequence[Callable], verbose: bool, metric: str, options: dict):
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
    self.ledger = Ledger(ctx.maximize)
    self.progress = Progress(metric, verbose and jax.process_index() == 0)
    self.state: Any = None
    self.elapsed = 0      # population time: steps every lane could have trained
    self.horizons = 0     # decision points passed (a zoom round each)
    self.phase = "advance"

  # The loop ------------------------------------------------------------------

  def run(self, t_start: float) -> SearchResult:
    strategy = self.strategy
    if self.checkpointer is not None:
      self.checkpointer.acquire()
    interrupted = False
    try:
      found = self._load() if self.checkpointer is not None else None
      if found is not None:
        self._restore(*found)
      else:
        trials, self.state = strategy.init(self.ctx)
        self.population.start(trials)
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
            RuntimeWarning, stacklevel=4)
    finally:
      self.progress.close()
      if self.checkpointer is not None:
        self.checkpointer.release()
    if not rank_trials(self.ledger.trials, self.ctx.maximize):
      raise AllDivergedError(
          f"all {len(self.ledger.trials)} trials diverged; lower the learning-rate range or check the data.",
          self.ledger.trials)
    return self.snapshot(t_start, interrupted)

  def _advance(self) -> None:
    sequential = self.strategy.sequential
    self.population.advance(sequential, on_call=self._on_call, on_done=self._on_chunk_done)
    if sequential:
      self.elapsed += max(c.cadence.budget for c in self.population.chunks)
    else:
      c = self.population.chunks[0].cadence
      self.elapsed += c.eval_every * c.evals_per_call
    self.horizons += 1
    self.stats.segments += 1
    self.phase = "decide"
    self.progress.advance(self.stats.lane_steps, self._best_score())
    if self._checkpoint_due():
      self._save()

  def _decide(self, t_start: float) -> bool:
    """Ends trials, asks what comes next and applies it; True when done."""
    lanes = self.population.views()
    ended, self.state = self.strategy.stop(self.ctx, self.state, lanes, self.elapsed)
    for slot, fields in ended:
      trial = self.population.finish(slot, fields, self.ctx.maximize)
      if not self.strategy.sequential:  # sequential chunks offered theirs when they finished
        self.ledger.offer(trial, lambda slot=slot: self.population.lane_params(slot))
      self.ledger.add(trial)
    decision, self.state = self.strategy.next(self.ctx, self.state, lanes, [s for s, _ in ended],
                                              self.ledger.trials, self.elapsed)
    if self.strategy.sequential or decision.report or decision.done:
      self.progress.end_round(self._best_score(), self.horizons)
    if decision.report or decision.done:
      for fn in self.callbacks:
        fn(self.snapshot(t_start))
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
    self.progress.advance(self.stats.lane_steps, self._best_score())
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
    self.progress.advance(self.stats.lane_steps, self._best_score())

  def _best_score(self) -> float | None:
    best = self.ledger.candidate[0] if self.ledger.candidate is not None else self.ledger.best
    return best.score if best is not None else None

  def _start_progress(self) -> None:
    total = self.strategy.total_steps(self.ctx)
    if total is not None:
      total *= self.ctx.num_configs
    elif self.ctx.num_steps is not None:
      total = self.ctx.rounds * self.ctx.num_configs * self.ctx.num_steps
    self.progress.start(self.strategy.name, total, done=self.stats.lane_steps)

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
    ``num_steps``) and at the end."""
    if self.checkpointer is None:
      return False
    if self.strategy.sequential:
      return True
    c = self.population.chunks[0].cadence
    step = c.eval_every * c.evals_per_call
    every = self.ctx.checkpoint_every or self.ctx.num_steps
    total = self.strategy.total_steps(self.ctx)
    return self.elapsed // every > (self.elapsed - step) // every or self.elapsed >= total

  def _save(self) -> None:
    t0 = time.perf_counter()
    arrays: dict = {}
    meta = {
        "fingerprint": self.fingerprint,
        "phase": self.phase,
        "elapsed": self.elapsed,
        "horizons": self.horizons,
        "strategy": self.strategy.name,
        "strategy_state": self.state._asdict(),
        "trials": [t.to_dict() for t in self.ledger.trials],
        "plan": {"lanes_per_program": self.plan.lanes_per_program,
                 "chunk_lanes": list(self.plan.chunk_lanes.items())},
        "population": self.population.save(arrays),
        "best": None,
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
        self.ledger.best, self.ledger.best_params = trial, {trial.id: params}
      else:
        self.ledger.candidate = (trial, params)


def run(**kwargs) -> SearchResult:
  """Runs one search to the end (see :class:`_Run` for the arguments)."""
  t_start = kwargs.pop("t_start")
  return _Run(**kwargs).run(t_start)
