"""How a population's programs get built: lowered, given a compile tier,
compiled in the background, and (with a timeout) started only when they can
still train a trial.

A mixin of :class:`~vmaptune._population.Population`: it reads the
population's ``plan``, ``chunks``, ``slots``, ``stats``, ``staggered``,
``steps_ahead``, ``time_left`` and ``on_compile``, and keeps ``_building``
(programs compiling, with their compile counters before) and
``_lowered_now`` (this generation's programs lowered so far).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from ._compiler import compile_pool, expected_compile_seconds, lowering_pool, step_seconds, tier_for
from ._program import Program
from ._routing import spread_order
from ._slots import Chunk, first_call_fits, lane_inputs, late_buckets

__all__ = ["Builder"]


class Builder:
  """Building a population's programs (a mixin of ``Population``)."""

  def prepare(self, limit: int | None = None) -> None:
    """Lowers every chunk's program that is not built yet (on this thread: the
    model, loss and optimizer of every bucket are validated before anything
    compiles), then starts compiling them in the background (see
    :func:`compile_pool`), so training the first chunk overlaps compiling the
    others. ``limit``: lower at most that many now on this thread.

    Staggered, the first program lowers here; the others lower one after
    another on a background thread (:func:`lowering_pool`) while the lanes
    train (lowering one per segment here left the devices idle: a second a
    program on the 2-core CPU, against tens of milliseconds of training a
    segment in a 10 s digits search), and each is compiled once lowered. A
    program whose chunk could not finish a trial is lowered, not compiled,
    until it could (:meth:`_first_call_fits`)."""
    t0 = time.perf_counter()
    todo, tried = [], 0
    platform = self.plan.devices[0].platform
    # Staggered, once a program is built or lowered, the others lower on a
    # background thread while the lanes train (``lowering_pool``); each is
    # taken up here once lowered.
    background = self.staggered and lowering_pool(platform) is not None and any(
        c.program.compiled or c.program.lowered or c.program._lowering is not None for c in self.chunks)
    for chunk in self._build_order():
      program = chunk.program
      if not program.compiled and id(program) not in self._building:
        if background and not program.lowered and not program.foreground:
          if program._lowering is None:
            program.lower_on(lowering_pool(platform), lane_inputs(chunk, self.slots), self.data)
          if program.lowering:
            continue
        collected = program._lowering is not None  # lowered in the background: not limited
        if not collected and limit is not None and tried >= limit:
          break
        try:
          program.wait_lowered()
          fresh = not program.lowered
          program.lower(lane_inputs(chunk, self.slots), self.data)
        except Exception as e:  # noqa: BLE001 - diagnosed stage by stage
          self.plan.diagnose(program.spec, e)
        program.start_tier = self.start_tier
        if chunk.tier is not None:  # a replay, or a resumed chunk: the tier it ran at
          program.tier = chunk.tier
        elif not any(k.startswith("run:") for k in program._compiled):  # a program built before keeps its tier
          program.tier = tier_for(self._predicted_seconds(program), program.has_convolution())
        fits = not self.staggered or self._first_call_fits(chunk)
        tried += fresh or fits  # a deferred program lowered before counts only once it compiles
        if not fits:
          continue
        self._track(program)
        todo.append(program)
    self.stats.trace_seconds += time.perf_counter() - t0
    self._lowered_now += todo
    unbuilt = any(not (c.program.compiled or c.program.lowered) for c in self.chunks)
    if not self._logged and not unbuilt:
      self._logged = True
      signature_of = {id(c.program): c.signature for c in self.chunks}
      built = self._lowered_now
      fresh = sum(signature_of.get(id(p)) not in self._signatures_seen for p in built)
      self.stats.programs_by_round.append({
          "round": len(self.stats.programs_by_round), "programs": len(signature_of), "compiled": len(built),
          "new_signatures": fresh, "new_layouts": len(built) - fresh})
      self._signatures_seen |= {c.signature for c in self.chunks}
      self._lowered_now = []
    pool = compile_pool(platform)
    if pool is not None:
      for program in todo:
        program.compile_on(pool)
    if todo and self.on_compile is not None:
      self.on_compile(self._compile_status())

  def _build_order(self) -> list[Chunk]:
    """The chunks in the order their programs are built: staggered, the
    buckets in :func:`spread_order` (the first few span the widths and
    depths, the cheapest first); else as they come. With a timeout on CPU,
    once a chunk has trained, the buckets whose trial could not finish in
    the time left (:func:`late_buckets`) come after the others."""
    if not self.staggered:
      return list(self.chunks)
    program = {c.signature: c.program for c in self.chunks}  # a bucket's cost: its last chunk's program's
    sigs = list(program)
    costs = [self._predicted_seconds(program[s], lowered=False) for s in sigs]
    left = self.time_left()
    late = set()
    if left is not None and self.plan.devices[0].platform == "cpu":
      late = late_buckets(self.chunks, self.slots, len(self.plan.devices), left,
                          {s: self._param_flops(program[s]) for s in sigs})
    order = []
    for group in ([i for i, s in enumerate(sigs) if s not in late], [i for i, s in enumerate(sigs) if s in late]):
      order += [group[k] for k in spread_order([sigs[i] for i in group], [costs[i] for i in group])]
    rank = {sigs[i]: r for r, i in enumerate(order)}
    return sorted(self.chunks, key=lambda c: rank[c.signature])

  def _first_call_fits(self, chunk: Chunk) -> bool:
    """Staggered, on CPU: a chunk that has not trained starts only if its
    first call and one lane's trial fit (:func:`first_call_fits`)."""
    left = self.time_left()
    if chunk.state is not None or left is None or self.plan.devices[0].platform != "cpu":
      return True
    return first_call_fits(chunk, self.chunks, self.slots, len(self.plan.devices), left)

  def _build_fits(self, chunk: Chunk) -> bool:
    """Staggered, with a timeout: waiting for a chunk's program to lower and
    compile leaves half the time left to train (once any chunk has trained;
    the first program is always waited for). A compile is estimated at the
    search's mean so far (2 s before any), lowering at 1 s: waiting for
    one that could not finish kept a 10 s digits search 8 s past its
    deadline (measured)."""
    left = self.time_left()
    if left is None or chunk.program.compiled or all(c.state is None for c in self.chunks):
      return True
    build = expected_compile_seconds(self.stats) + (0.0 if chunk.program.lowered else 1.0)
    return build <= left / 2

  def _predicted_seconds(self, program: Program, lowered: bool = True) -> float:
    """Estimated seconds ``program`` trains in this search: its lanes' steps to
    come (``steps_ahead``) at ~6 FLOPs per parameter and example at a CPU
    core's measured rate; with convolutions (many FLOPs per parameter), at
    least XLA's count at their rate, unless not ``lowered`` (for ordering)."""
    if self.plan.devices[0].platform != "cpu":
      return float("inf")
    counted = program.step_flops() if lowered and program.has_convolution() else None
    fast = bool(program.spec.conv_rewrites)  # convolutions with _convgrad's gradients
    seconds_per_step = step_seconds(self._param_flops(program), counted, fast) / len(self.plan.devices)
    steps = sum(c.lanes * self.steps_ahead(c) for c in self.chunks if c.program is program)
    return steps * seconds_per_step

  @staticmethod
  def _param_flops(program: Program) -> float:
    """A lane-step's FLOPs by parameter count: ~6 per parameter and example
    (0 when the model's shapes are not known yet)."""
    abstract = program.spec.abstract_state
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params)) if abstract is not None else 0
    return 6.0 * params * program.spec.batch_size

  def _compile_status(self) -> tuple[int, int]:
    done = sum(p.compiled for p, _, _ in self._building.values())
    return done, len(self._building)

  def cancel_compiles(self) -> None:
    """The search is over: background compiles not started yet are dropped."""
    for chunk in self.chunks:
      chunk.program.cancel()

  def _started(self, chunk: Chunk) -> bool:
    """Staggered: the chunk has trained before, or its program is compiled."""
    if chunk.state is not None:
      return True
    program = chunk.program
    future = program._future
    return program.compiled or (future is not None and future.done())

  def _ready(self, chunk: Chunk) -> None:
    """Waits for (or runs) a chunk's program's compile; the wait is compile wall time."""
    program = chunk.program
    tier = chunk.tier or program.tier
    if f"start:{self.start_tier}" in program._compiled and f"run:{tier}" in program._compiled:
      return
    if not self.staggered and (not program.lowered or id(program) not in self._building):
      self.prepare()
    while not program.lowered:  # staggered: in build order up to this one, not every program
      if program.lowering:  # in the background: the wait is tracing time (prepare collects it)
        t0 = time.perf_counter()
        program.join_lowering()
        self.stats.trace_seconds += time.perf_counter() - t0
      self.prepare(limit=1)
    if id(program) not in self._building:  # (staggered: lowered, not compiled, as it did not fit then)
      self._track(program)
    t0 = time.perf_counter()
    if self.on_compile is not None:
      self.on_compile(self._compile_status())
    program.wait()
    program.tier = chunk.tier or program.tier
    program.start_tier = self.start_tier
    if not program.compiled:
      program.compile()
    self.stats.compile_wall_seconds += time.perf_counter() - t0
    self._book_compiles()

  def _track(self, program: Program) -> None:
    """``program`` is compiling: its compile counters now, to book the difference (:meth:`_book_compiles`)."""
    self._building[id(program)] = (program, program.compiler.compile_seconds, program.compiler.programs_compiled)

  def _book_compiles(self) -> None:
    """Adds finished compiles (summed XLA time) to the stats."""
    for key, (program, seconds, count) in list(self._building.items()):
      if program.compiled:
        self.stats.compile_seconds += program.compiler.compile_seconds - seconds
        self.stats.programs_compiled += program.compiler.programs_compiled - count
        del self._building[key]
    if self.on_compile is not None:
      self.on_compile(self._compile_status() if self._building else None)
