"""Schedulers that exploit a population living in one array.

Stopping a lane, copying a good lane into a bad one, or handing a lane a fresh
config is an index operation on device memory here, not a checkpoint on disk
and a new process. Both strategies run the population in segments of a fixed
number of steps (one compiled call per bucket each) and decide on the host
between segments; the decisions are tiny next to a segment of training, and
every segment reuses the same compiled programs.

* :class:`HalvingSearch` — asynchronous successive halving (ASHA) with
  *refill*: a trial reaching a rung continues only if it is in the top
  ``1/eta`` of the trials that reached that rung so far; a stopped (or
  finished, or diverged) trial's lane is refilled at once with a new config
  from the current zoom region, so the program keeps its lane count and no
  lane sits idle.
* :class:`PBTSearch` — population based training: every ``ready`` steps the
  bottom fraction of each bucket's lanes takes the parameters and optimizer
  state of a random top lane of the same bucket (a gather along the lane
  axis) and perturbs its continuous hyperparameters.
"""

from __future__ import annotations

import bisect
import collections
import math
import time
import warnings
from typing import Mapping, Sequence

import numpy as np

from . import _faults, _space
from ._checkpoint import CheckpointError
from ._result import AllDivergedError, Trial, rank_trials
from ._search import (_host, _lane_params, _Search, _trial_to_dict, _unhost, abstract_population,
                      nearest_finder, trial_seed)
from ._space import Choice, Integer, Region

__all__ = ["HalvingSearch", "PBTSearch", "STRATEGIES"]

STRATEGIES = ("zoom", "halving", "pbt")


class _Slot:
  """One lane of the population and the trial it currently trains."""

  __slots__ = ("chunk", "lane", "signature", "trial", "curve", "curve_steps", "train_curve")

  def __init__(self, chunk: int, lane: int, signature: tuple):
    self.chunk, self.lane, self.signature = chunk, lane, signature
    self.trial = None
    self.curve, self.curve_steps, self.train_curve = [], [], []

  def start(self, trial: dict) -> None:
    self.trial = trial
    self.curve, self.curve_steps, self.train_curve = [], [], []


class _Population:
  """The lanes of a strategy's population, grouped into compiled programs."""

  def __init__(self, search, configs: list[dict], evals_per_call: int, budget: int):
    self.search = search
    ctx = search.ctx
    self.ctx = ctx
    self.budget = budget
    self.segment_steps = evals_per_call * search.eval_every
    self.chunks = []  # (signature, program, lanes, slot positions)
    buckets = collections.OrderedDict()
    for i, c in enumerate(configs):
      buckets.setdefault(ctx.routing.signature(c), []).append(i)
    self.slots: list[_Slot] = [None] * len(configs)  # type: ignore[list-item]
    for sig, members in buckets.items():
      lanes = ctx.fit_lanes(sig, search.lanes_per_program)
      for start in range(0, len(members), lanes):
        part = members[start:start + lanes]
        key, program = ctx.program_for(sig, lanes, evals_per_call)
        self.chunks.append([sig, program, lanes, part, None, key])
        for lane, i in enumerate(part):
          self.slots[i] = _Slot(len(self.chunks) - 1, lane, sig)

  def _inputs(self, j: int, configs: Mapping[int, dict], seeds: Mapping[int, int]):
    sig, program, lanes, part, _, _ = self.chunks[j]
    cfgs = [configs[i] for i in part]
    sds = [seeds[i] for i in part]
    return self.ctx.inputs(program.spec, cfgs, sds, lanes, budget=self.budget)

  def start(self, configs: Mapping[int, dict], seeds: Mapping[int, int]):
    """Initialises every program's lanes and trains the first segment.

    The population starts as a refill of every lane of an all-zero state, so a
    strategy compiles two programs per bucket (refill, advance), not three.
    """
    import jax

    for j, chunk in enumerate(self.chunks):
      leaves, treedef = jax.tree.flatten(self._abstract(j, configs, seeds))
      chunk[4] = self.search._place_state(treedef, [_zeros(a) for a in leaves])
      self.refill(j, np.ones(len(chunk[3]), bool), configs, seeds)
    return self.advance()

  def _abstract(self, j: int, configs: Mapping[int, dict], seeds: Mapping[int, int]):
    return abstract_population(self.chunks[j][1].spec, self._inputs(j, configs, seeds))

  def save(self, arrays: dict) -> None:
    """Adds every program's population state to a checkpoint's arrays."""
    import jax

    for j, chunk in enumerate(self.chunks):
      for k, leaf in enumerate(jax.tree.leaves(chunk[4])):
        arrays[f"pop/{j}/{k}"] = _host(leaf)

  def restore(self, arrays: Mapping[str, np.ndarray], configs: Mapping[int, dict],
              seeds: Mapping[int, int]) -> None:
    """Places a checkpoint's population state on the devices (no training)."""
    import jax

    for j, chunk in enumerate(self.chunks):
      leaves, treedef = jax.tree.flatten(self._abstract(j, configs, seeds))
      missing = [f"pop/{j}/{k}" for k in range(len(leaves)) if f"pop/{j}/{k}" not in arrays]
      if missing:
        raise CheckpointError(f"checkpoint in {self.search.checkpointer.directory} lacks the population "
                              f"arrays {missing[:3]}; pass overwrite=True to start afresh.")
      host = [_unhost(arrays[f"pop/{j}/{k}"], a) for k, a in enumerate(leaves)]
      chunk[4] = self.search._place_state(treedef, host)

  def advance(self):
    """Trains one more segment in every program; returns the host metrics."""
    from ._trainer import to_host

    t0 = time.perf_counter()
    befores = [self._before(chunk[1]) for chunk in self.chunks]
    out = []
    for chunk in self.chunks:
      chunk[4], metrics = chunk[1].advance(chunk[4], self.ctx.data, self.search.eval_every)
      out.append(metrics)
      self.ctx.stats.lane_steps += self.segment_steps * len(chunk[3])
    host = [to_host(m) for m in out]  # waits for the devices: inside the clock
    self._time_many(t0, befores)
    return host

  def refill(self, j: int, mask: np.ndarray, configs: Mapping[int, dict], seeds: Mapping[int, int]) -> None:
    """Fresh lanes (new configs, fresh init and budget) where ``mask``."""
    from ._trainer import place_inputs

    chunk = self.chunks[j]
    inputs = place_inputs(self._inputs(j, configs, seeds), self.ctx.mesh, len(self.ctx.devices))
    lanes_mask = np.zeros(chunk[2], bool)
    lanes_mask[: len(mask)] = mask
    before = self._before(chunk[1])
    t0 = time.perf_counter()
    chunk[4] = chunk[1].refill(chunk[4], inputs, self.search._place_lanes(lanes_mask))
    self._time_many(t0, [before], [chunk])

  def _time_many(self, t0: float, befores, chunks=None) -> None:
    """Books calls' time: compiling (first use of a program) apart from training.

    Chunks of one bucket may share a program: each program counts once.
    """
    stats = self.ctx.stats
    elapsed = time.perf_counter() - t0
    programs = {}
    for chunk, before in zip(chunks or self.chunks, befores):
      programs.setdefault(id(chunk[1]), (chunk[1], before))
    for program, (compiled, compile_s, trace_s) in programs.values():
      stats.programs_compiled += program.programs_compiled - compiled
      stats.compile_seconds += program.compile_seconds - compile_s
      stats.trace_seconds += program.trace_seconds - trace_s
      elapsed -= (program.compile_seconds - compile_s) + (program.trace_seconds - trace_s)
    stats.train_seconds += max(0.0, elapsed)

  @staticmethod
  def _before(program):
    return program.programs_compiled, program.compile_seconds, program.trace_seconds

  @staticmethod
  def _host(metrics):
    from ._trainer import to_host

    return to_host(metrics)

  def diverged(self, j: int) -> np.ndarray:
    from ._trainer import to_host

    return to_host(self.chunks[j][4].diverged_at)

  def record(self, all_metrics) -> None:
    """Appends a segment's evaluations to the trial each lane trains."""
    for j, (scores, losses, steps) in enumerate(all_metrics):
      part = self.chunks[j][3]
      for lane, i in enumerate(part):
        slot = self.slots[i]
        slot.curve.extend(scores[lane].tolist())
        slot.train_curve.extend(losses[lane].tolist())
        slot.curve_steps.extend(steps[lane].tolist())


def _zeros(abstract):
  """Host zeros of a state leaf's shape and dtype (a typed key leaf: zero key data)."""
  import jax

  if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
    return _unhost(np.zeros(abstract.shape + (2,), np.uint32), abstract)
  return np.zeros(abstract.shape, abstract.dtype)


def _finish(slot: _Slot, status: str, maximize: bool, rung=None, extra=None) -> Trial:
  t = slot.trial
  curve = np.asarray(slot.curve, np.float32)
  score = float(curve[-1]) if len(curve) else math.nan
  diverged_at = t.get("diverged_at")
  if status != "diverged" and not math.isfinite(score):
    status = "diverged"
  if status == "diverged":
    score = -math.inf if maximize else math.inf
    if diverged_at is None:
      diverged_at = int(slot.curve_steps[-1]) if slot.curve_steps else 0
  return Trial(
      id=t["id"], config=dict(t["config"]), score=score, round=t["round"], lane=slot.lane,
      status=status, seed=t["seed"], curve=curve, curve_steps=np.asarray(slot.curve_steps, np.int32),
      train_curve=np.asarray(slot.train_curve, np.float32),
      diverged_at=diverged_at if status == "diverged" else None, parent=t.get("parent"),
      steps=int(slot.curve_steps[-1]) if slot.curve_steps else 0, bucket=t["bucket"], rung=rung,
      **(extra or {}),
  )


def _default_ready(total: int, steps: int, eval_every: int | None) -> int:
  """The largest divisor of ``total`` no larger than ``steps // 4`` (and a
  multiple of ``eval_every`` when that is set): ready points that tile the run."""
  cap = max(1, steps // 4)
  for d in range(cap, 0, -1):
    if total % d == 0 and (eval_every is None or d % eval_every == 0):
      return d
  return eval_every or 1


def _perturb(d, value, rng: np.random.Generator, factors=(0.8, 1.2)):
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


class _StrategyMixin(_Search):
  """Shared by the strategies: setup from round 0's sampling, bookkeeping."""

  def run(self, t_start: float, callbacks: Sequence = ()):
    """Runs the strategy; with ``checkpoint_dir``, resumes from the newest
    checkpoint of the same call (the population, every trial, the decisions)."""
    configs, seeds = self._setup(t_start)
    saved = None
    if self.checkpointer is not None:
      self._acquire_checkpoint(configs[0])
    try:
      if self.checkpointer is not None:
        saved = self._load_checkpoint()  # the fingerprint holds the strategy: no other's checkpoint
      try:
        return self._run(t_start, configs, seeds, saved, callbacks)
      except KeyboardInterrupt:
        # Ctrl-C: the trials finished so far (halving), as the zoom search
        # returns its finished rounds. PBT's lanes all finish at the end.
        finished = list(getattr(self, "_finished", ()))
        if not rank_trials(finished, self.maximize):
          raise
        self.trials = sorted(finished, key=lambda t: t.id)
        warnings.warn(
            f"vmaptune: interrupted; returning the {len(self.trials)} finished trial(s)"
            + (f" (saved in {self.checkpointer.directory})" if self.checkpointer else ""),
            RuntimeWarning, stacklevel=3)
        return self.snapshot(t_start, interrupted=True)
    finally:
      self.progress.close()
      if self.checkpointer is not None:
        self.checkpointer.release()

  def _checkpoint_due(self, elapsed: int, step: int) -> bool:
    """Whether a checkpoint is due after the segment ending at ``elapsed``:
    every ``checkpoint_every`` steps of the population's time (default: every
    ``num_steps``), and at the end."""
    if self.checkpointer is None:
      return False
    every = self.checkpoint_every or self.steps
    return elapsed // every > (elapsed - step) // every or elapsed >= self.rounds * self.steps

  def _save(self, elapsed: int, state: dict) -> None:
    """Commits the population (device state and host bookkeeping) after the
    segment ending at ``elapsed`` was recorded, before any decision on it."""
    arrays: dict = {}
    self.population.save(arrays)
    meta = {
        "fingerprint": self.fingerprint,
        "strategy": self.strategy,
        "elapsed": elapsed,
        "next_id": self._next_id,
        "regions": [g.to_json() for g in self.regions],
        "slots": [{"trial": slot.trial, "curve": slot.curve, "curve_steps": slot.curve_steps,
                   "train_curve": slot.train_curve} for slot in self.population.slots],
        "trial_program": [[tid, list(v)] for tid, v in self.ctx.trial_program.items()],
        "chunk_lanes": list(self.ctx.chunk_lanes.items()),
        "state": state,
    }
    self._save_best(meta, arrays)
    self.checkpointer.save(meta, arrays)
    _faults.failpoint(f"{self.strategy}:saved")

  def _resume(self, meta: dict, arrays: dict, trials: Sequence[Trial]):
    """Restores what :meth:`_save` wrote; returns ``(elapsed, configs, seeds)``
    of the lanes as they stand."""
    pop = self.population
    self._next_id = int(meta["next_id"])
    self.regions = [Region.from_json(g) for g in meta["regions"]]
    for slot, saved in zip(pop.slots, meta["slots"]):
      slot.trial = dict(saved["trial"], config=self._revive(saved["trial"]["config"]))
      slot.curve, slot.curve_steps, slot.train_curve = (
          list(saved["curve"]), list(saved["curve_steps"]), list(saved["train_curve"]))
    configs = {i: slot.trial["config"] for i, slot in enumerate(pop.slots)}
    seeds = {i: slot.trial["seed"] for i, slot in enumerate(pop.slots)}
    pop.restore(arrays, configs, seeds)
    self._restore_best(meta, arrays, trials)
    if self.best_params:
      (tid,) = self.best_params
      self._by_id = {t.id: t for t in trials if t.id == tid}
    return int(meta["elapsed"]), configs, seeds

  def _setup(self, t_start: float):
    ctx = self.ctx
    if ctx.epochs is not None:
      raise ValueError(f"strategy={self.strategy!r} needs a `num_steps` budget, not `epochs`.")
    self.steps = ctx.num_steps
    region = Region.full(self.space)
    configs = self._sample(0, region)
    if self.enqueue:
      configs[: len(self.enqueue)] = [dict(c) for c in self.enqueue[: len(configs)]]
    for c in configs:
      ctx.spec_for(ctx.routing.signature(c))  # validate before compiling
    self.regions = [region]
    self.sig_index = {}
    for c in configs:
      self.sig_index.setdefault(ctx.routing.signature(c), len(self.sig_index))
    seeds = [trial_seed(self.seed, 0, i) for i in range(len(configs))]
    return configs, seeds

  def _new_trial(self, config: dict, seed: int, level: int, parent=None) -> dict:
    t = {"id": self._next_id, "config": config, "seed": seed, "round": level, "parent": parent,
         "bucket": self.sig_index[self.ctx.routing.signature(config)]}
    self._next_id += 1
    return t

  def _start(self, slot: _Slot, trial: dict) -> None:
    slot.start(trial)
    chunk = self.population.chunks[slot.chunk]
    self.ctx.trial_program[trial["id"]] = (chunk[0], chunk[2])

  def _keep_params(self, trial: Trial, slot: _Slot) -> None:
    """Keeps the best healthy trial's parameters (its lane may be refilled)."""
    if trial.status != "ok" or not math.isfinite(trial.score):
      return
    if self.best_params:
      (best_id,) = self.best_params
      best = self._by_id.get(best_id)
      if best is not None and not (trial.score > best.score if self.maximize else trial.score < best.score):
        return
    self.best_params = {trial.id: _lane_params(self.population.chunks[slot.chunk][4], slot.lane)}
    self._by_id[trial.id] = trial

  def snapshot(self, t_start: float, interrupted: bool = False):
    result = super().snapshot(t_start, interrupted)
    result.options["strategy"] = self.strategy
    return result

  def _result(self, t_start: float, callbacks: Sequence = ()):
    for fn in callbacks:  # the last round's call: every trial, finished
      fn(self.snapshot(t_start))
    if not rank_trials(self.trials, self.maximize):
      raise AllDivergedError(
          f"all {len(self.trials)} trials diverged; lower the learning-rate range or check the data.",
          self.trials)
    return self.snapshot(t_start)


class HalvingSearch(_StrategyMixin):
  """Asynchronous successive halving with refill (``strategy="halving"``)."""

  strategy = "halving"

  def configure(self, eta: int, min_fraction: float):
    self.eta = eta
    self.min_fraction = min_fraction

  def rungs(self) -> list[int]:
    n = 1 + max(0, int(round(math.log(1.0 / self.min_fraction) / math.log(self.eta))))
    r0 = self.steps // self.eta ** (n - 1)
    if r0 < 1:
      raise ValueError(
          f"strategy='halving': num_steps={self.steps} is too short for rungs at "
          f"{self.min_fraction:g} of the budget with eta={self.eta}.")
    return [r0 * self.eta**k for k in range(n - 1)] + [self.steps]

  def _run(self, t_start: float, configs, seeds, saved, callbacks: Sequence = ()):
    self._by_id = {}
    rungs = self.rungs()
    segment = rungs[0]
    self.eval_every = self.ctx.eval_every or segment
    self.ctx.eval_every, self.ctx.segment_evals = self.eval_every, segment // max(1, self.eval_every)
    if segment % self.eval_every:
      raise ValueError(f"strategy='halving': eval_every={self.eval_every} must divide the first rung "
                       f"({segment} steps).")
    total = self.rounds * self.steps
    if saved is not None:
      self._restore_programs(saved[0])  # the saved lane layout, before the population is built
    pop = _Population(self, configs, segment // self.eval_every, self.steps)
    self.population = pop
    self._next_id = 0
    self.progress.start_round(0, total * len(configs), label="halving")
    if saved is None:
      for i, c in enumerate(configs):
        self._start(pop.slots[i], self._new_trial(c, seeds[i], 0))
      cur_configs = dict(enumerate(configs))
      cur_seeds = dict(enumerate(seeds))
      rung_scores: list[list[float]] = [[] for _ in rungs]
      done: list[Trial] = []
      best_rung: dict[int, tuple[int, float]] = {}
      observations: list[list] = [[] for _ in rungs]  # (config, score) of each arrival at a rung
      metrics = pop.start(cur_configs, cur_seeds)
      elapsed = segment
    else:
      meta, arrays = saved
      state = meta["state"]
      done = [self._revive_trial(d) for d in state["done"]]
      rung_scores = [list(r) for r in state["rung_scores"]]
      best_rung = {int(k): tuple(v) for k, v in state["best_rung"].items()}
      observations = [[(self._revive(c), score) for c, score in obs] for obs in state["observations"]]
      elapsed, cur_configs, cur_seeds = self._resume(meta, arrays, done)
      self.progress.advance(elapsed * len(configs), self._best_score_of(done))
    self._finished = done
    announced = elapsed - segment  # callbacks follow rounds of population time
    while True:
      if saved is None:
        pop.record(metrics)
        self.progress.advance(segment * len(configs), self._best_score_of(done))
        if self._checkpoint_due(elapsed, segment):
          self._save(elapsed, {"done": [_trial_to_dict(t) for t in done], "rung_scores": rung_scores,
                               "best_rung": best_rung, "observations": observations})
      saved = None
      level = min(elapsed // self.steps, self.rounds - 1)
      refills = collections.defaultdict(list)
      arrived = []  # trials at a rung now: scored together, then decided
      for j in range(len(pop.chunks)):
        diverged = pop.diverged(j)
        for lane, i in enumerate(pop.chunks[j][3]):
          slot = pop.slots[i]
          trial_steps = slot.curve_steps[-1]
          score = slot.curve[-1]
          if diverged[lane] >= 0 or not math.isfinite(score):
            # A diverged lane is the first to go: stopped and refilled now.
            slot.trial["diverged_at"] = int(diverged[lane]) if diverged[lane] >= 0 else None
            done.append(_finish(slot, "diverged", self.maximize, rung=self._rung_of(rungs, trial_steps)))
            refills[j].append((lane, i))
          elif trial_steps in rungs:
            k = rungs.index(trial_steps)
            bisect.insort(rung_scores[k], -score if self.maximize else score)
            best_rung[slot.trial["id"]] = (k, score)
            observations[k].append((slot.trial["config"], score))
            arrived.append((j, lane, i, k, score))
      for j, lane, i, k, score in arrived:
        slot = pop.slots[i]
        if k == len(rungs) - 1:
          done.append(_finish(slot, "ok", self.maximize, rung=k))
          self._keep_params(done[-1], slot)
          refills[j].append((lane, i))
        elif not self._promoted(score, rung_scores[k]):
          done.append(_finish(slot, "stopped", self.maximize, rung=k))
          refills[j].append((lane, i))
      if callbacks and elapsed // self.steps > announced // self.steps and elapsed < total:
        # A round of population time passed: the trials finished so far.
        self.trials = sorted(done, key=lambda t: t.id)
        for fn in callbacks:
          fn(self.snapshot(t_start))
      announced = elapsed
      if elapsed >= total:
        break
      # Refill: new configs from the zoom region around the best so far.
      if refills:
        # One region per round of global time, fixed when the round starts.
        while len(self.regions) <= level:
          self.regions.append(self._refill_region(done, best_rung, len(self.regions)))
        region = self.regions[level]
        rng = np.random.default_rng([self.seed, 0x4A11, elapsed])
        nearest = self._nearest_finder(done)
        proposals = None
        if self.sampler == "tpe":  # BOHB-style: TPE proposes every refill of this segment
          proposals = iter(self._tpe_refills(
              observations, [pop.slots[i].signature for lanes in refills.values() for _, i in lanes], elapsed))
        for j, lanes in refills.items():
          mask = np.zeros(len(pop.chunks[j][3]), bool)
          for lane, i in lanes:
            slot = pop.slots[i]
            config = next(proposals) if proposals is not None else self._refill_config(
                slot.signature, region, rng)
            parent = nearest(config)
            trial = self._new_trial(config, trial_seed(self.seed, 0x4A11, self._next_id), level, parent)
            cur_configs[i], cur_seeds[i] = config, trial["seed"]
            self._start(slot, trial)
            mask[lane] = True
          pop.refill(j, mask, cur_configs, cur_seeds)
      metrics = pop.advance()
      elapsed += segment
    finished = {t.id for t in done}
    for i, slot in enumerate(pop.slots):
      if slot.trial["id"] not in finished:
        steps = slot.curve_steps[-1] if slot.curve_steps else 0
        done.append(_finish(slot, "stopped", self.maximize, rung=self._rung_of(rungs, steps)))
    self.trials = sorted(done, key=lambda t: t.id)
    self.progress.end_round(self._best_score_of(self.trials))
    self.progress.close()
    return self._result(t_start, callbacks)

  @staticmethod
  def _rung_of(rungs, steps):
    reached = [k for k, r in enumerate(rungs) if steps >= r]
    return reached[-1] if reached else None

  def _promoted(self, score: float, ranked: list[float]) -> bool:
    """ASHA: in the top 1/eta of the scores recorded at this rung so far.

    ``ranked`` is kept sorted, better first (negated when maximizing), so a
    decision costs a binary search, not a sort: halving's host work then
    grows linearly with the population.
    """
    key = -score if self.maximize else score
    top = max(1, len(ranked) // self.eta)
    return bisect.bisect_left(ranked, key) < top

  def _refill_region(self, done, best_rung, level) -> Region:
    if level == 0:
      return Region.full(self.space)
    ranked = sorted(best_rung.items(), key=lambda kv: (-kv[1][0], -kv[1][1] if self.maximize else kv[1][1]))
    by_id = {t.id: t for t in done}
    configs = [by_id[i].config for i, _ in ranked if i in by_id][: self._keep_count()]
    if not configs:
      return Region.full(self.space)
    return _space.zoom_region(self.space, configs, level, self.shrink)

  def _keep_count(self) -> int:
    if isinstance(self.keep, float):
      return max(2, int(round(self.keep * self.num_configs)))
    return self.keep

  def _tpe_refills(self, observations: Sequence[list], signatures: Sequence[tuple], elapsed: int) -> list[dict]:
    """Refill configs proposed by TPE (``sampler="tpe"``), as BOHB does.

    The model is fitted on the scores at the highest rung that has at least
    ``dims + 2`` of them (low rungs fill first; a higher rung's scores are
    the better estimate once there are enough), then asked for the whole
    batch of this segment's refills at once, with the constant liar so the
    batch spreads out. Each proposal keeps its lane's bucket (the structural
    keys of the lane it refills). A fresh sampler seeded by ``(seed,
    elapsed)`` and rebuilt from the observations: deterministic, and
    resumable from a checkpoint.
    """
    from ._samplers import TPEProposer

    dims = len(_space.searched(self.space))
    level = max((k for k, obs in enumerate(observations) if len(obs) >= dims + 2), default=0)
    proposer = TPEProposer(self.space, seed=int(trial_seed(self.seed, 0xB0B, elapsed)), maximize=self.maximize)
    obs = observations[level]
    proposer.tell([c for c, _ in obs], [s for _, s in obs], [True] * len(obs))
    fixed = [{k: v for k, v in sig if k in self.space} for sig in signatures]
    return [_space.complete(self.space, c) for c in proposer.ask(len(signatures), fixed)]

  def _refill_config(self, signature: tuple, region: Region, rng) -> dict:
    dists = _space.searched(self.space)
    fixed = dict(signature)
    rest = {k: d for k, d in dists.items() if k not in fixed}
    values = _space.sample_values(rest, rng, 1, region)[0]
    return _space.complete(self.space, fixed, values)

  def _nearest_finder(self, done):
    """``config -> id`` of the nearest of the best finished trials (one ranking a segment)."""
    return nearest_finder(self.space, rank_trials(done, self.maximize)[: self._keep_count()])


class PBTSearch(_StrategyMixin):
  """Population based training (``strategy="pbt"``)."""

  strategy = "pbt"

  def configure(self, ready: int | None, fraction: float, resample_probability: float):
    self.ready = ready
    self.fraction = fraction
    self.resample_probability = resample_probability

  def _run(self, t_start: float, configs, seeds, saved, callbacks: Sequence = ()):
    total = self.rounds * self.steps
    ready = self.ready or _default_ready(total, self.steps, self.ctx.eval_every)
    self.eval_every = self.ctx.eval_every or ready
    self.ctx.eval_every, self.ctx.segment_evals = self.eval_every, ready // max(1, self.eval_every)
    if ready % self.eval_every or total % ready:
      raise ValueError(
          f"strategy='pbt': `ready`={ready} must be a multiple of eval_every={self.eval_every} "
          f"and divide the run of rounds*num_steps={total} steps.")
    if saved is not None:
      self._restore_programs(saved[0])  # the saved lane layout, before the population is built
    pop = _Population(self, configs, ready // self.eval_every, total)
    self.population = pop
    self._next_id = 0
    self._by_id = {}
    dists = _space.searched(self.space)
    sig_keys = set(self.ctx.routing.signature_keys)
    mutable = {k: d for k, d in dists.items() if k not in sig_keys}
    self.progress.start_round(0, total * len(configs), label="pbt")
    if saved is None:
      current = {i: dict(c) for i, c in enumerate(configs)}
      schedules = {i: [(0, dict(c))] for i, c in enumerate(configs)}
      for i, c in enumerate(configs):
        self._start(pop.slots[i], self._new_trial(c, seeds[i], 0))
      metrics = pop.start(current, dict(enumerate(seeds)))
      elapsed = ready
      self.exploits = []
    else:
      meta, arrays = saved
      state = meta["state"]
      elapsed, _, _ = self._resume(meta, arrays, [])
      current = {int(i): self._revive(c) for i, c in state["current"].items()}
      schedules = {int(i): [(int(step), self._revive(c)) for step, c in v] for i, v in state["schedules"].items()}
      self.exploits = [tuple(e) for e in state["exploits"]]
      self.progress.advance(elapsed * len(configs), None)
    while True:
      if saved is None:
        pop.record(metrics)
        self.progress.advance(ready * len(configs), None)
        if self._checkpoint_due(elapsed, ready):
          self._save(elapsed, {"current": current, "schedules": schedules, "exploits": self.exploits})
      saved = None
      if elapsed >= total:
        break
      rng = np.random.default_rng([self.seed, 0x9B7, elapsed])
      for j, chunk in enumerate(pop.chunks):
        part = chunk[3]
        diverged = pop.diverged(j)
        scores = [pop.slots[i].curve[-1] for i in part]
        bad = [(lane, i) for lane, i in enumerate(part)
               if diverged[lane] >= 0 or not math.isfinite(scores[lane])]
        order = sorted(((lane, i) for lane, i in enumerate(part) if (lane, i) not in bad),
                       key=lambda li: scores[li[0]], reverse=self.maximize)  # best first
        n = len(part)
        q = max(1, int(math.floor(self.fraction * n))) if n >= 2 else 0
        sources = order[:q]
        targets = (bad + list(reversed(order)))[:q]
        targets = [t for t in targets if t not in sources]
        if not sources or not targets:
          continue
        source = np.arange(chunk[2], dtype=np.int32)
        for lane, i in targets:
          src_lane, src_i = sources[int(rng.integers(0, len(sources)))]
          source[lane] = src_lane
          new = dict(current[src_i])
          for k, d in mutable.items():
            if rng.random() < self.resample_probability:
              new[k] = _space.sample_values({k: d}, rng, 1, Region.full(self.space))[0][k]
            else:
              new[k] = _perturb(d, new[k], rng)
          current[i] = new
          schedules[i].append((elapsed, dict(new)))
          pop.slots[i].trial["parent"] = pop.slots[src_i].trial["id"]
          self.exploits.append((elapsed, pop.slots[src_i].trial["id"], pop.slots[i].trial["id"]))
        self._exploit(j, source, current)
      metrics = pop.advance()
      elapsed += ready
    trials = []
    for i, slot in enumerate(pop.slots):
      slot.trial["config"] = current[i]
      diverged = pop.diverged(slot.chunk)[slot.lane]
      if diverged >= 0:
        slot.trial["diverged_at"] = int(diverged)
      trials.append(_finish(slot, "diverged" if diverged >= 0 else "ok", self.maximize,
                            extra={"schedule": schedules[i]}))
      self._keep_params(trials[-1], slot)
    self.trials = trials
    self.progress.end_round(self._best_score_of(trials))
    self.progress.close()
    return self._result(t_start, callbacks)

  def _exploit(self, j: int, source: np.ndarray, current: Mapping[int, dict]) -> None:
    pop = self.population
    chunk = pop.chunks[j]
    program, lanes, part = chunk[1], chunk[2], chunk[3]
    spec = program.spec
    configs = [current[i] for i in part] + [current[part[0]]] * (lanes - len(part))
    hparams = {k: np.asarray([c[k] for c in configs], np.int32 if k in spec.int_injected else np.float32)
               for k in spec.injected}
    lr_key = "learning_rate" if "learning_rate" in spec.injected else None
    lr0 = np.asarray([c[lr_key] if lr_key else 0.0 for c in configs], np.float32)
    decay = np.asarray([float(c.get("lr_decay", 0.0)) for c in configs], np.float32)
    if spec.schedule is not None and lr_key is None:
      # The schedule decays the optimizer's default learning rate.
      from ._trainer import to_host

      lr0 = to_host(chunk[4].lr0)
    before = pop._before(program)
    t0 = time.perf_counter()
    chunk[4] = program.exploit(chunk[4], source, hparams, lr0, decay)
    pop._time_many(t0, [before], [chunk])
