"""The records of a population: a slot (a lane and the trial it runs), a
chunk (lanes of one compiled program) and the program a trial ran in.

Plain host records; :mod:`~vmaptune._population` moves their device state.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from ._lane import LaneInputs, stack_inputs
from ._program import Program
from ._strategy import Cadence, NewTrial
from ._trial import Trial

__all__ = ["ProgramRef", "Slot", "Chunk", "lane_inputs", "spread_lanes", "first_call_fits", "late_buckets"]


class ProgramRef(NamedTuple):
  """Which program a trial ran in (and at which compile tiers: its ``run``'s
  and its ``start``'s), so it can be replayed exactly."""

  signature: tuple
  lanes: int
  evals_per_call: int
  eval_every: int
  tier: str = "long"
  start_tier: str = "init"


@dataclasses.dataclass
class Slot:
  """A lane and the trial it runs.

  Attributes:
    trial: the trial (its config changes when PBT perturbs it).
    chunk, lane: where it runs.
    bucket: index of its signature in its generation.
    budget: the trial's step budget; ``evals`` its evaluations in all.
    curve, curve_steps, train_curve: evaluations so far.
    diverged_at: the step its loss or parameters went non-finite, -1 if not.
    idle: the lane runs no trial (re-initialised with a budget of 0 steps).
  """

  trial: NewTrial
  chunk: int
  lane: int
  bucket: int
  budget: int
  evals: int
  curve: list = dataclasses.field(default_factory=list)
  curve_steps: list = dataclasses.field(default_factory=list)
  train_curve: list = dataclasses.field(default_factory=list)
  diverged_at: int = -1
  idle: bool = False
  seconds: float = 0.0

  @property
  def steps(self) -> int:
    return int(self.curve_steps[-1]) if self.curve_steps else 0

  def restart(self, trial: NewTrial | None) -> None:
    """A new trial in this lane, or none (``idle``: it keeps the old one's config)."""
    self.idle = trial is None
    if trial is not None:
      self.trial = trial
    self.curve, self.curve_steps, self.train_curve = [], [], []
    self.diverged_at = -1
    self.seconds = 0.0

  def to_trial(self, status: str, maximize: bool, **extra) -> Trial:
    """The lane's trial as it stands: the one lane -> trial builder."""
    t = self.trial
    curve = np.asarray(self.curve, np.float32)
    score = float(curve[-1]) if len(curve) else math.nan
    diverged_at = self.diverged_at if self.diverged_at >= 0 else None
    if status != "diverged" and (diverged_at is not None or not math.isfinite(score)):
      status = "diverged"
    if status == "diverged":
      score = -math.inf if maximize else math.inf
      if diverged_at is None:
        diverged_at = self.steps
    config = extra.pop("config", t.config)
    return Trial(id=t.id, config=dict(config), score=score, round=t.round, lane=self.lane, status=status,
                 seed=t.seed, curve=curve, curve_steps=np.asarray(self.curve_steps, np.int32),
                 train_curve=np.asarray(self.train_curve, np.float32),
                 diverged_at=diverged_at if status == "diverged" else None, parent=t.parent,
                 steps=self.steps, bucket=self.bucket, seconds=self.seconds, **extra)


@dataclasses.dataclass
class Chunk:
  """``lanes`` lanes of one program and the slots they run (``members``, in
  lane order; lanes past them are padding, never reported).

  Attributes:
    calls: compiled calls run since its trials started (sequential) .
    fresh: lanes to (re)initialise at the next call.
    state: the lanes' device state, or None before the first call and after
      the chunk's trials are done (sequential).
    done: its trials are finished (sequential).
    step_seconds: seconds per step of each lane that trained in its last
      call (the call's time over its busy lanes; NaN before the first).
  """

  signature: tuple
  program: Program
  lanes: int
  members: list
  cadence: Cadence
  calls: int = 0
  fresh: np.ndarray | None = None
  state: Any = None
  done: bool = False
  tier: str | None = None
  step_seconds: float = math.nan

  @property
  def calls_needed(self) -> int:
    evals = -(-self.cadence.budget // self.cadence.eval_every)
    return -(-evals // self.cadence.evals_per_call)


def lane_inputs(chunk: Chunk, slots: Sequence[Slot]) -> LaneInputs:
  """Host inputs of a chunk's lanes (padding lanes copy the first)."""
  spec = chunk.program.spec
  trials = [slots[i].trial for i in chunk.members]
  trials += [trials[0]] * (chunk.lanes - len(trials))
  budgets = [0 if slots[i].idle else slots[i].budget for i in chunk.members]
  budgets += [0] * (chunk.lanes - len(budgets))  # padding idles (one lane at a time: skipped, free)
  return stack_inputs(
      [t.seed for t in trials],
      [{k: t.config[k] for k in spec.injected} for t in trials],
      [float(t.config.get("lr_decay", 0.0)) for t in trials],
      budgets,
      spec,
  )


def spread_lanes(members: int, lanes: int, devices: int, first: int = 0) -> list[int]:
  """The lanes a chunk's ``members`` take, in the order they were given:
  alternating between the devices (each holds ``lanes // devices``
  consecutive lanes), from device ``first % devices``. Members still fill
  lanes ``0 .. members - 1`` (padding comes last).

  Lanes that start one by one (the adaptive strategy with a timeout on CPU
  starts a few and adds more) then spread over the devices: in lane order,
  a chunk's first half would all train on the first device while the
  others idle.

  >>> spread_lanes(5, 6, 2)
  [0, 3, 1, 4, 2]
  """
  per = max(1, lanes // devices)
  blocks = [list(range(d * per, min((d + 1) * per, members))) for d in range(devices)]
  k = first % devices
  blocks = blocks[k:] + blocks[:k]
  return [lane for turn in itertools.zip_longest(*blocks) for lane in turn if lane is not None]


def first_call_fits(chunk: Chunk, chunks: Sequence[Chunk], slots: Sequence[Slot], devices: int, left: float) -> bool:
  """Whether ``chunk``, not trained yet, should start with ``left`` seconds
  to go, on CPU: its first call must take at most half of them (a 32-channel
  CNN ready at 5.7 s of a 10 s search once ran its first call for 9 s) and
  one lane's trial at most all of them (only finished trials count: a 40 s
  CNN search spent 9 s on one that could not finish).

  The pace is a lane's seconds a step on its device (a chunk's lanes share
  the devices), scaled by XLA's FLOP counts from the trained chunk nearest in
  FLOPs: from an 8-channel CNN, 32 and 16 channels were predicted at 103 and
  27 ms a step (measured: 75 and 25). Nothing trained yet: it starts.
  """
  pace = _pace(chunks, slots, devices, lambda c: c.program.step_flops(), chunk.program.step_flops())
  if pace is None:
    return True
  return (pace * chunk.cadence.steps_per_call * -(-_busy(chunk, slots) // devices) <= left / 2
          and pace * chunk.cadence.budget <= left)


def late_buckets(chunks: Sequence[Chunk], slots: Sequence[Slot], devices: int, left: float,
                 flops: dict) -> set:
  """The buckets whose one lane's trial would not finish in ``left`` seconds,
  on CPU, before their programs are lowered: ``flops`` maps each bucket's
  signature to a lane-step's FLOPs estimated from its parameter count, and
  the pace is the trained chunk's nearest in that estimate, scaled by it (as
  :func:`first_call_fits` does with XLA's counts once lowered). Their
  programs are built after the others'. Nothing trained yet: none.

  Only programs with convolutions predict: there a lane-step's cost follows
  its parameters, while a small MLP's lanes cost mostly fixed overheads
  (from a digits MLP's first call, parameters predicted one bucket's trial
  past the 6.9 s left of a search that trained 69,000 lane-steps in 10 s).

  In a 40 s digits-CNN search the build order put two 32-channel
  convolutions (a trial alone about 35 s) second: its program lowered for
  2 s beside the training and never started, and the shapes after it came
  seconds later. From an 8-channel one-convolution CNN, parameters predict
  it at 58x the cost a lane-step (measured: 42x).
  """
  cost = lambda c: flops.get(c.signature) if c.program.has_convolution() else None
  budget = {c.signature: c.cadence.budget for c in chunks}
  late = set()
  for sig, f in flops.items():
    pace = _pace(chunks, slots, devices, cost, f)
    if pace is not None and pace * budget[sig] > left:
      late.add(sig)
  return late


def _busy(chunk: Chunk, slots: Sequence[Slot]) -> int:
  return sum(not slots[i].idle for i in chunk.members)


def _pace(chunks: Sequence[Chunk], slots: Sequence[Slot], devices: int, cost, of) -> float | None:
  """A lane's predicted seconds a step on its device (a chunk's lanes share
  the devices) for a lane-step costing ``of``: the measured pace of the
  trained chunk nearest in ``cost`` (a chunk's lane-step cost, falsy if
  unknown), scaled by the ratio; None if there is none (or ``of`` is
  unknown)."""
  paces = [(abs(math.log(of / ref)), c.step_seconds * min(devices, max(1, _busy(c, slots))) * of / ref)
           for c in chunks if c.state is not None and math.isfinite(c.step_seconds) and of and (ref := cost(c))]
  return min(paces)[1] if paces else None
