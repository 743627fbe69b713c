"""The population: every lane's device state, and the trials the lanes run.

A population is a list of *slots* (a lane and the trial it runs, with its
curve so far) grouped into *chunks*: a chunk is ``lanes`` lanes of one
compiled :class:`~vmaptune._program.Program`, one bucket's configs (or a
slice of them that fits memory). The population starts a generation of
trials, advances it (a chunk at a time to the end of its trials, or every
chunk one segment in lockstep), refills lanes, copies lanes into others
(PBT), retries a chunk in halves when the device runs out of memory, and
turns a lane into a :class:`~vmaptune.Trial`. It decides nothing: the
strategy does, through the loop.
"""

from __future__ import annotations

import collections
import math
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from . import _faults
from ._plan import Plan
from ._building import Builder
from ._placement import DeviceData, host_leaf, lane_params, place_data, place_lanes, to_host, unhost
from ._slots import Chunk, ProgramRef, Slot, lane_inputs, spread_lanes
from ._strategy import Cadence, LaneView, NewTrial
from ._trial import Stats, Trial, user_stacklevel

__all__ = ["Population", "Slot", "Chunk", "ProgramRef"]


class Population(Builder):
  """Device state per chunk, and each lane's trial (building its programs: :class:`Builder`).

  Args:
    plan: the search's plan (specs, programs, layouts, memory).
    cadence: ``signature -> Cadence`` (the strategy's).
    stats: where compile, train and lane-step counts are booked.
    capacity: ``wanted -> lanes per program`` (fixed by its first call).
  """

  def __init__(self, plan: Plan, cadence: Callable[[tuple], Cadence], stats: Stats,
               capacity: Callable[[int], int]):
    self.plan = plan
    self.cadence = cadence
    self.stats = stats
    self.capacity = capacity
    self.slots: list[Slot] = []
    self.chunks: list[Chunk] = []
    self.refs: dict[int, ProgramRef] = {}
    self._data: DeviceData | None = None
    self._spare: dict[int, Any] = {}  # id(program) -> a finished chunk's state, reused as buffers
    self._building: dict[int, tuple] = {}  # id(program) -> (program, its compile counters before)
    self._signatures_seen: set = set()
    self._round = 0
    self._logged = True  # the current generation's programs are in stats.programs_by_round
    self._lowered_now: list = []  # programs lowered for the current generation so far
    #: Called with ``(compiled, total)`` while programs compile, None when all are done.
    self.on_compile: Callable[[tuple | None], None] | None = None
    #: Lockstep chunks start as their programs become ready, not after the
    #: last compile (asynchronous strategies with a timeout).
    self.staggered = False
    self._advanced: set | None = None  # chunks the last advance ran (None: all)
    #: ``chunk -> steps`` each of its lanes will still train with the chunk's
    #: program (this and later generations): the loop's estimate, for tiers.
    self.steps_ahead: Callable[[Chunk], int] = lambda chunk: chunk.cadence.budget
    #: Seconds left of the search's timeout (None: no timeout).
    self.time_left: Callable[[], float | None] = lambda: None
    #: Its programs' ``start`` tier (``Program.start_tier``): "restarts" under
    #: a strategy that restarts lanes at every decision, set by the loop.
    self.start_tier = "init"

  @property
  def data(self) -> DeviceData:
    if self._data is None:
      self._data = place_data(self.plan.dataset, self.plan.eval_batch_size, self.plan.mesh)
    return self._data

  # Layout ------------------------------------------------------------------

  def start(self, trials: Sequence[NewTrial], lanes: int | None = None) -> None:
    """A new generation: ``trials`` grouped into buckets and chunks, every
    lane to be initialised at its chunk's first call. Every bucket is
    validated before anything compiles. ``lanes``: the lanes a program
    wants (default: the largest bucket's trials); a bucket with more trials
    takes several chunks of the same program."""
    buckets: "collections.OrderedDict[tuple, list[int]]" = collections.OrderedDict()
    for i, t in enumerate(trials):
      buckets.setdefault(self.plan.routing.signature(t.config), []).append(i)
    for sig in buckets:
      self.plan.spec(sig)
    wanted = self.capacity(lanes or max(len(v) for v in buckets.values()))
    self.slots, self.chunks = [None] * len(trials), []  # type: ignore[list-item]
    self._logged, self._lowered_now = False, []
    for bucket, (sig, members) in enumerate(buckets.items()):
      cadence = self.cadence(sig)
      lanes = self.plan.fit_lanes(sig, wanted)
      evals = -(-cadence.budget // cadence.eval_every)
      for start in range(0, len(members), lanes):
        part = members[start:start + lanes]
        order = spread_lanes(len(part), lanes, len(self.plan.devices), len(self.chunks))
        for lane, i in zip(order, part):
          self.slots[i] = Slot(trials[i], len(self.chunks), lane, bucket, cadence.budget, evals)
        self._add_chunk(sig, lanes, sorted(part, key=lambda i: self.slots[i].lane), cadence)

  def _add_chunk(self, sig: tuple, lanes: int, members: list, cadence: Cadence, at: int | None = None) -> Chunk:
    program = self.plan.program(sig, lanes, cadence.evals_per_call)
    chunk = Chunk(sig, program, lanes, list(members), cadence, fresh=np.ones(lanes, bool))
    self.stats.padded_lanes += lanes - len(members)
    if at is None:
      self.chunks.append(chunk)
    else:
      self.chunks.insert(at, chunk)
    return chunk

  def _renumber(self) -> None:
    for j, chunk in enumerate(self.chunks):
      for lane, i in enumerate(chunk.members):
        self.slots[i].chunk, self.slots[i].lane = j, lane

  def views(self) -> list[LaneView]:
    """Every busy lane as the strategy sees it, chunk by chunk, in lane order
    (staggered: lanes of chunks that have not trained yet are ``started=False``)."""
    out = []
    for j, chunk in enumerate(self.chunks):
      started = self._advanced is None or j in self._advanced
      for lane, i in enumerate(chunk.members):
        s = self.slots[i]
        if s.idle:
          continue
        score = float(s.curve[-1]) if s.curve else math.nan
        out.append(LaneView(i, j, lane, s.trial, chunk.signature, s.steps, score, s.diverged_at >= 0, started,
                            chunk.step_seconds))
    return out

  # Training ----------------------------------------------------------------

  def advance(self, sequential: bool, on_call: Callable[[str, int], None] | None = None,
              on_done: Callable[[int], None] | None = None) -> None:
    """Trains to the strategy's next decision point.

    Sequential: each chunk in turn runs every call its trials need, then
    ``on_done(chunk)`` is called and its state is released (kept as the
    buffers of the program's next chunk); ``on_call("mid", j)`` follows every
    call but a chunk's last, ``on_call("chunk", j)`` every chunk but the last
    (checkpoint points). Lockstep: every chunk runs one call.
    """
    self.prepare(limit=1 if self.staggered else None)
    try:
      self._advance(sequential, on_call, on_done)
    finally:
      self._book_compiles()  # programs compiled in the background, never waited for

  def _advance(self, sequential, on_call, on_done) -> None:
    if not sequential:
      t0 = time.perf_counter()
      waited = self.stats.compile_wall_seconds
      # Chunks whose lanes all idle have nothing to train: skipped.
      run = [j for j, c in enumerate(self.chunks) if any(not self.slots[i].idle for i in c.members)]
      self._advanced = None
      if self.staggered:
        fit = [j for j in run if self._first_call_fits(self.chunks[j])]
        run = [j for j in fit if self._started(self.chunks[j])]
        if not run and fit:  # none ready: wait for the first built, if its build fits
          built = {id(c): r for r, c in enumerate(self._build_order())}
          first = min(fit, key=lambda j: built[id(self.chunks[j])])
          run = [first] if self._build_fits(self.chunks[first]) else []
        if not run:  # only chunks whose first call would not fit: wait for the deadline
          time.sleep(0.05)
        self._advanced = set(run) if len(run) < len(self.chunks) else None
      pending = [(j, self._call(j)) for j in run]
      # Each chunk's time: the wait for its results after the previous
      # chunk's (the devices run the calls in order), plus an even share of
      # the dispatch; the waits are inside the clock.
      marks = [time.perf_counter()]
      results = []
      for j, metrics in pending:
        results.append(to_host(metrics))
        marks.append(time.perf_counter())
      seconds = marks[-1] - t0 - (self.stats.compile_wall_seconds - waited)
      dispatch = max(0.0, seconds - (marks[-1] - marks[0])) / max(1, len(run))
      for k, ((j, _), metrics) in enumerate(zip(pending, results)):
        busy = sum(not self.slots[i].idle for i in self.chunks[j].members)
        self._record(j, metrics)
        chunk_seconds = marks[k + 1] - marks[k] + dispatch
        self._charge(j, chunk_seconds)
        ran = self.chunks[j].cadence.steps_per_call
        self.chunks[j].step_seconds = chunk_seconds / (ran * max(1, busy))
      self.stats.train_seconds += seconds
      return
    j = 0
    while j < len(self.chunks):
      chunk = self.chunks[j]
      if chunk.done:
        j += 1
        continue
      try:
        while chunk.calls < chunk.calls_needed:
          t0 = time.perf_counter()
          waited = self.stats.compile_wall_seconds
          self._record(j, to_host(self._call(j)))
          seconds = time.perf_counter() - t0 - (self.stats.compile_wall_seconds - waited)
          self.stats.train_seconds += seconds
          self._charge(j, seconds)
          if chunk.calls < chunk.calls_needed and on_call is not None:
            on_call("mid", j)
      except Exception as e:  # noqa: BLE001 - only running out of memory is handled here
        if not _faults.is_out_of_memory(e):
          raise
        self._split(j, str(e).splitlines()[0][:200])
        self.prepare()
        continue
      chunk.done = True
      if on_done is not None:
        on_done(j)
      self._spare = {id(chunk.program): chunk.state}
      chunk.state = None
      if on_call is not None and any(not c.done for c in self.chunks):
        on_call("chunk", j)
      j += 1

  def _charge(self, j: int, seconds: float) -> None:
    """Splits chunk ``j``'s measured training time evenly over its lanes:
    vectorised, every lane costs the same, busy or not; one lane at a time,
    a lane without steps left is skipped, so the busy lanes share it."""
    chunk = self.chunks[j]
    busy = [i for i in chunk.members if not self.slots[i].idle]
    lanes = len(busy) if chunk.program.layout.lane_batch == 1 else chunk.lanes
    if not busy or seconds <= 0:
      return
    for i in busy:
      self.slots[i].seconds += seconds / lanes

  def _call(self, j: int):
    """One compiled call of chunk ``j`` (waiting for its program first)."""
    chunk = self.chunks[j]
    program = chunk.program
    self._ready(chunk)
    inputs = None
    if chunk.state is None or chunk.fresh.any():  # host inputs go to the devices only when lanes start
      inputs = place_lanes(lane_inputs(chunk, self.slots), self.plan.mesh)
    if chunk.state is None:
      # A finished chunk's state is the buffers of its program's next chunk;
      # another program's is dropped first, so at most one is ever kept.
      spare = self._spare.pop(id(program), None)
      self._spare.clear()
      chunk.state = spare if spare is not None else program.zeros(inputs)
    self.plan.check_budget(program)
    _faults.failpoint("execute")
    if chunk.tier is None:
      chunk.tier = program.tier
    for lane, i in enumerate(chunk.members):
      if chunk.fresh[lane] and not self.slots[i].idle:
        s = self.slots[i]
        self.refs[s.trial.id] = ProgramRef(chunk.signature, chunk.lanes, chunk.cadence.evals_per_call,
                                           chunk.cadence.eval_every, chunk.tier, self.start_tier)
    if chunk.fresh.any():
      chunk.state = program.start(chunk.state, inputs, place_lanes(chunk.fresh, self.plan.mesh), self.data,
                                  self.start_tier)
    chunk.state, metrics = program.run(chunk.state, self.data, chunk.cadence.eval_every, chunk.tier)
    chunk.fresh = np.zeros(chunk.lanes, bool)
    chunk.calls += 1
    return metrics

  def _record(self, j: int, metrics) -> None:
    """Appends a call's evaluations to the trial of each real lane."""
    chunk = self.chunks[j]
    scores, losses, steps = metrics
    diverged = to_host(chunk.state.diverged_at)
    ran = chunk.cadence.steps_per_call  # every lane runs the whole call
    self.stats.idle_lane_steps += ran * (chunk.lanes - len(chunk.members))
    for lane, i in enumerate(chunk.members):
      s = self.slots[i]
      if s.idle:
        self.stats.idle_lane_steps += ran
        continue
      before = s.steps
      room = s.evals - len(s.curve)  # a last call may run past the trial's evaluations
      s.curve.extend(scores[lane, :room].tolist())
      s.train_curve.extend(losses[lane, :room].tolist())
      s.curve_steps.extend(int(v) for v in steps[lane, :room])
      s.diverged_at = int(diverged[lane])
      self.stats.lane_steps += s.steps - before

  def _split(self, j: int, why: str) -> None:
    """Chunk ``j`` ran out of memory: it restarts as chunks of half the lanes."""
    chunk = self.chunks[j]
    smaller = self.plan.shrink(chunk.signature, chunk.lanes, why)
    warnings.warn(
        f"vmaptune: out of memory with {chunk.lanes} lanes of bucket {dict(chunk.signature)}; retrying "
        f"with {smaller} lanes per program.", RuntimeWarning, stacklevel=user_stacklevel())
    del self.chunks[j]
    self.stats.padded_lanes -= chunk.lanes - len(chunk.members)
    for k, start in enumerate(range(0, len(chunk.members), smaller)):
      part = chunk.members[start:start + smaller]
      for i in part:
        s = self.slots[i]
        s.restart(s.trial)
      self._add_chunk(chunk.signature, smaller, part, chunk.cadence, at=j + k)
    self._renumber()

  # Decisions -----------------------------------------------------------------

  def finish(self, slot: int, fields: Mapping[str, Any], maximize: bool) -> Trial:
    """The trial of lane ``slot`` as it ends (the lane keeps running until refilled)."""
    fields = dict(fields)
    return self.slots[slot].to_trial(fields.pop("status"), maximize, **fields)

  def refill(self, refills: Mapping[int, NewTrial | None]) -> None:
    """Fresh trials in those lanes, initialised at their chunk's next call
    (None: the lane idles, re-initialised with a budget of 0 steps)."""
    for slot, trial in refills.items():
      s = self.slots[slot]
      s.restart(trial)
      self.chunks[s.chunk].fresh[s.lane] = True

  def exploit(self, exploits: Mapping[int, tuple[int, dict]]) -> None:
    """PBT: each target lane copies its source lane (same chunk) and takes new
    hyperparameters; one gather per chunk."""
    by_chunk: dict[int, dict[int, tuple[int, dict]]] = collections.defaultdict(dict)
    for slot, (source, config) in exploits.items():
      by_chunk[self.slots[slot].chunk][slot] = (source, config)
    for j, targets in by_chunk.items():
      chunk = self.chunks[j]
      spec = chunk.program.spec
      source = np.arange(chunk.lanes, dtype=np.int32)
      for slot, (src, config) in targets.items():
        s = self.slots[slot]
        source[s.lane] = self.slots[src].lane
        s.trial = s.trial._replace(config=dict(config), parent=self.slots[src].trial.id)
      configs = [self.slots[i].trial.config for i in chunk.members]
      configs += [configs[0]] * (chunk.lanes - len(configs))
      hparams = {k: np.asarray([c[k] for c in configs], np.int32 if k in spec.int_injected else np.float32)
                 for k in spec.injected}
      lr_key = "learning_rate" if "learning_rate" in spec.injected else None
      lr0 = np.asarray([c[lr_key] if lr_key else 0.0 for c in configs], np.float32)
      decay = np.asarray([float(c.get("lr_decay", 0.0)) for c in configs], np.float32)
      if spec.schedule is not None and lr_key is None:
        lr0 = to_host(chunk.state.lr0)  # the schedule decays the optimizer's default learning rate
      c = chunk.program.compiler
      before = (c.trace_seconds, c.compile_seconds, c.programs_compiled)
      t0 = time.perf_counter()
      chunk.state = chunk.program.exploit(chunk.state, source, hparams, lr0, decay)
      traced, compiled = c.trace_seconds - before[0], c.compile_seconds - before[1]
      self.stats.trace_seconds += traced
      self.stats.compile_seconds += compiled
      self.stats.compile_wall_seconds += compiled
      self.stats.programs_compiled += c.programs_compiled - before[2]
      self.stats.train_seconds += max(0.0, time.perf_counter() - t0 - traced - compiled)

  def lane_params(self, slot: int):
    """``(params, model_state)`` of a lane, as host arrays (every process)."""
    s = self.slots[slot]
    return lane_params(self.chunks[s.chunk].state, s.lane)

  # Checkpoints ---------------------------------------------------------------

  def save(self, arrays: dict) -> dict:
    """The population as checkpoint metadata; device states go into ``arrays``."""
    chunks = []
    for j, c in enumerate(self.chunks):
      leaves = jax.tree.leaves(c.state) if c.state is not None else []
      for k, leaf in enumerate(leaves):
        arrays[f"pop/{j}/{k}"] = host_leaf(leaf)
      chunks.append({"signature": c.signature, "lanes": c.lanes, "members": list(c.members),
                     "cadence": tuple(c.cadence), "calls": c.calls, "fresh": c.fresh.tolist(), "done": c.done,
                     "leaves": len(leaves), "tier": c.tier})
    slots = [{"trial": tuple(s.trial), "bucket": s.bucket, "budget": s.budget, "evals": s.evals,
              "curve": s.curve, "curve_steps": s.curve_steps, "train_curve": s.train_curve,
              "diverged_at": s.diverged_at, "idle": s.idle} for s in self.slots]
    return {"chunks": chunks, "slots": slots, "refs": [[tid, tuple(r)] for tid, r in self.refs.items()]}

  def restore(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Rebuilds the population :meth:`save` described, states on the devices."""
    self.refs = {int(tid): ProgramRef(*r) for tid, r in meta["refs"]}
    self.slots = [Slot(NewTrial(*d["trial"]), 0, 0, d["bucket"], d["budget"], d["evals"], list(d["curve"]),
                       list(d["curve_steps"]), list(d["train_curve"]), d["diverged_at"], d["idle"])
                  for d in meta["slots"]]
    self.chunks = []
    for j, d in enumerate(meta["chunks"]):
      cadence = Cadence(*d["cadence"])
      program = self.plan.program(d["signature"], d["lanes"], cadence.evals_per_call)
      chunk = Chunk(d["signature"], program, d["lanes"], list(d["members"]), cadence, d["calls"],
                    np.asarray(d["fresh"], bool), None, d["done"], d["tier"])
      if d["leaves"]:
        abstract = program.abstract_state(lane_inputs(chunk, self.slots))
        leaves, treedef = jax.tree.flatten(abstract)
        missing = [f"pop/{j}/{k}" for k in range(len(leaves)) if f"pop/{j}/{k}" not in arrays]
        if missing or len(leaves) != d["leaves"]:
          from ._checkpoint import CheckpointError

          raise CheckpointError(f"the checkpoint lacks the population arrays {missing[:3]} (or they do not "
                                "fit the model); pass overwrite=True to start afresh.")
        host = [unhost(arrays[f"pop/{j}/{k}"], a) for k, a in enumerate(leaves)]
        chunk.state = place_lanes(jax.tree.unflatten(treedef, host), self.plan.mesh)
      self.chunks.append(chunk)
    self._renumber()
    # Chunks that never trained (staggered: their programs were compiling)
    # have lanes without scores: not started, as before the checkpoint.
    trained = {j for j, c in enumerate(self.chunks) if c.calls > 0}
    self._advanced = trained if len(trained) < len(self.chunks) else None
