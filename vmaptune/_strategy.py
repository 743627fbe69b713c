"""The interface every search strategy implements, and the registry of them.

A strategy makes host-only decisions; it never touches device arrays. The one
driver (``_loop``) runs a population (``_population``) and, between segments
of training, asks the strategy two questions:

1. :meth:`Strategy.stop`: which lanes' trials end now, and with which status
   (``"ok"``, ``"stopped"``, ``"diverged"``) and extra fields;
2. :meth:`Strategy.next`: what the population does next: refill lanes with new
   trials, copy lanes into others (PBT's exploit), start a new generation
   (a zoom round), or nothing (done).

A strategy's state is a ``NamedTuple`` of plain values (numbers, strings,
tuples, lists, dicts, configs), so a checkpoint is that state serialised, the
same for every strategy. Adding a strategy is one new module with a frozen
dataclass implementing :class:`Strategy`, and one line in the registry
(``_options.STRATEGIES``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Protocol, Sequence

from ._region import Region
from ._sampling import Drawer
from ._trial import AllDivergedError, Trial, rank_trials

__all__ = ["NewTrial", "LaneView", "Cadence", "Clock", "Decision", "Context", "Strategy", "top_trials"]


class NewTrial(NamedTuple):
  """A trial to start in a lane.

  Attributes:
    id: unique within the search, in order of creation.
    config: the whole config (every key of the space).
    seed: the trial seed: init, data order and dropout derive from it alone.
    round: the round (zoom) or the round of population time it started in.
    parent: the trial it was drawn near (zoom, halving) or copied (PBT).
  """

  id: int
  config: dict
  seed: int
  round: int
  parent: int | None = None


class LaneView(NamedTuple):
  """What a strategy sees of one lane after a segment.

  Attributes:
    slot: the lane's index in the population (stable for its lifetime).
    chunk, lane: the program chunk it runs in and its position there.
    trial: the trial it runs.
    signature: the static part of the config (its program).
    steps: steps the trial has taken.
    score: its latest validation score (NaN before any evaluation).
    diverged: whether its loss, parameters or score went non-finite.
    started: False for a lane whose chunk has not trained yet (with a
      timeout, asynchronous strategies start chunks as their programs
      compile): it has no score; a strategy may only drop it (refill None).
    step_seconds: the measured seconds per step of a busy lane of its chunk
      in the last segment (NaN when unknown): on CPU, where lanes of
      different programs cost differently (a wide convolution several times
      a narrow one), what the lane costs.
  """

  slot: int
  chunk: int
  lane: int
  trial: NewTrial
  signature: tuple
  steps: int
  score: float
  diverged: bool
  started: bool = True
  step_seconds: float = math.nan


class Cadence(NamedTuple):
  """How a bucket's lanes train: steps between evaluations, evaluations per
  compiled call (a segment), and a trial's step budget."""

  eval_every: int
  evals_per_call: int
  budget: int

  @property
  def steps_per_call(self) -> int:
    """Steps every lane of the bucket runs in one compiled call (a segment)."""
    return self.eval_every * self.evals_per_call


class Clock(NamedTuple):
  """Population time at a decision point.

  Attributes:
    elapsed: steps every lane could have trained so far.
    remaining: with a ``timeout``, the population steps that still fit before
      the deadline by the loop's estimate (None: no timeout, or no estimate
      yet). A strategy never starts work it cannot finish by this estimate.
    left: with a ``timeout``, the seconds to the deadline (None without one).
  """

  elapsed: int
  remaining: int | None = None
  left: float | None = None

  def fits(self, steps: int) -> bool:
    """Whether ``steps`` more population steps fit in the time left."""
    return self.remaining is None or self.remaining >= steps


class Decision(NamedTuple):
  """What the population does after a segment.

  Attributes:
    refill: ``{slot: NewTrial}``: a fresh trial in that lane (the lane's
      program: the config keeps the lane's signature), or None: the lane
      idles (no time left for a whole trial).
    exploit: ``{slot: (source_slot, config)}``: the lane takes the source
      lane's parameters and optimizer state (same chunk) and trains on with
      ``config``'s hyperparameters (PBT).
    generation: a new population replacing every lane (a zoom round).
    report: call the callbacks with the trials finished so far.
    done: the search is over.
  """

  refill: Mapping[int, NewTrial] = {}
  exploit: Mapping[int, tuple[int, dict]] = {}
  generation: Sequence[NewTrial] | None = None
  report: bool = False
  done: bool = False


@dataclasses.dataclass(frozen=True)
class Context:
  """What a strategy knows of the search: its options and how to draw configs.

  Attributes:
    space: the validated space.
    num_configs, rounds, num_steps, seed, sampler, keep, shrink: as given to
      :func:`vmaptune.search` (``num_steps`` is None with an ``epochs`` budget).
    timeout: the search's time budget in seconds, or None. With one,
      ``rounds`` sizes a round (a zoom round's depth, a halving round of
      population time) and the search goes on until the time is spent.
    eval_every: the user's ``eval_every`` or None.
    checkpoint_every: the user's ``checkpoint_every`` or None.
    maximize: the metric's direction.
    enqueue: configs to train first.
    drawer: draws batches and refills with the search's sampler.
    signature: ``config -> signature`` (the static part deciding its program).
    steps_for: ``signature -> steps`` of a trial's budget (``num_steps`` or
      ``epochs`` worth of its batch size).
    eval_every_for: ``steps -> eval_every`` (default: 10 evaluations a trial).
    accelerator: the search runs on GPUs or TPUs (where more lanes cost
      little more wall time), not on CPUs.
    devices: the devices the lanes are sharded over (on CPU, the lanes of
      different devices train at once).
    reserve: trial-lengths of the budget held back for the re-check after
      the search (``search(recheck=...)``); the adaptive strategy trains
      ``num_configs * rounds - reserve`` trial-lengths.
  """

  space: Mapping[str, Any]
  num_configs: int
  rounds: int
  timeout: float | None
  num_steps: int | None
  seed: int
  sampler: str
  keep: float | int
  shrink: float
  eval_every: int | None
  checkpoint_every: int | None
  maximize: bool
  enqueue: Sequence[dict]
  drawer: Drawer
  signature: Callable[[Mapping[str, Any]], tuple]
  steps_for: Callable[[tuple], int]
  eval_every_for: Callable[[int], int]
  accelerator: bool = False
  devices: int = 1
  reserve: int = 0

  def keep_count(self) -> int:
    """How many of the best trials a zoom region is drawn around."""
    if isinstance(self.keep, float):
      return max(2, int(round(self.keep * self.num_configs)))
    return self.keep


def top_trials(ctx: Context, history: Sequence[Trial]) -> list[Trial]:
  """The best ``keep`` trials so far; every trial diverging is an error."""
  ranked = rank_trials(history, ctx.maximize)
  if not ranked:
    raise AllDivergedError(
        f"all {len(history)} trials diverged, so there is nothing to zoom "
        "in on; lower the learning-rate range or check the data.",
        history,
    )
  return ranked[: ctx.keep_count()]


class Strategy(Protocol):
  """The interface of a search strategy (see the module docstring).

  Attributes:
    name: the ``strategy=`` string that selects it.
    sequential: True when each chunk of the population trains to the end of
      its trials before the next starts (zoom: a chunk's state is freed when
      it finishes, so memory chunking bounds memory); False when every chunk
      advances one segment at a time, in lockstep (halving, PBT).
    asynchronous: (optional, default False) each trial goes at its own pace
      (adaptive, halving): with a timeout, chunks start training as soon as
      their programs are compiled, and the strategy sees only the lanes of
      chunks that have started.
  """

  name: ClassVar[str]
  sequential: ClassVar[bool]

  def check(self, ctx: Context) -> None:
    """Raises ValueError for options this strategy cannot run with."""

  def cadence(self, ctx: Context, signature: tuple) -> Cadence:
    """How a bucket's lanes train (same for every bucket when not sequential)."""

  def total_steps(self, ctx: Context) -> int | None:
    """Population time of the whole search (None: unknown, or a timeout)."""

  def init(self, ctx: Context) -> tuple[list[NewTrial], Any]:
    """The first population's trials and the strategy's state."""

  def stop(self, ctx: Context, state: Any, lanes: Sequence[LaneView], clock: Clock
           ) -> tuple[list[tuple[int, dict]], Any]:
    """``[(slot, fields)]``: the trials that end now (``fields`` holds
    ``status`` and any extra ``Trial`` fields), in the order they end."""

  def next(self, ctx: Context, state: Any, lanes: Sequence[LaneView], ended: Sequence[int],
           history: Sequence[Trial], clock: Clock) -> tuple[Decision, Any]:
    """What comes next; ``ended`` are the slots :meth:`stop` just ended and
    ``history`` every finished trial (including those)."""

  def regions(self, state: Any) -> list[Region]:
    """The regions sampled so far, one per finished round."""

  def state_type(self) -> type:
    """The NamedTuple class of the state (to rebuild it from a checkpoint)."""

  # Optional: ``held(state) -> [slot]``, lanes of the first population that
  # start idle (no steps trained, not in the views; on CPU an idle lane in a
  # running chunk is skipped, so it costs nothing) until a later decision
  # refills them with their trial (the adaptive strategy on CPU with a timeout),
  # or with a trial of their program's shape (its spare lanes without one).
  # Optional: ``chunk_lanes(state) -> int | None``, the lanes a program of the
  # first population wants (None: its largest bucket's trials); a bucket with
  # more trials takes several chunks of one program.

