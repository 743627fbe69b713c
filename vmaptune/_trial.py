"""Plain records of a search: a trial, a single run, where the time went.

The bottom of the results layer: ``_io``, ``_importance``, ``_report``,
``plot`` and ``_optuna`` work on these and on anything shaped like a
:class:`~vmaptune.SearchResult` (``trials``, ``space``, ``metric``,
``maximize``, ``regions``); ``_result`` builds the result object on top of
all of them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
from typing import Any, Sequence

import numpy as np

__all__ = ["Trial", "Run", "Stats", "AllDivergedError", "rank_trials", "better", "fmt", "text_table", "optional",
           "unfinished", "rounds_text", "user_stacklevel", "callback_stops"]


def optional(module: str, extra: str):
  """Imports an optional dependency, or says which extra installs it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(
        f"this feature needs {module}; install it with "
        f"`pip install 'vmaptune[{extra}]'` (or `pip install {module}`)."
    ) from None


@dataclasses.dataclass
class Trial:
  """One configuration trained in a search (see :class:`SearchResult` for an example).

  Attributes:
    id: unique within the search, in order of creation.
    config: the hyperparameters, as plain Python values.
    score: validation score at the end of the budget; ``+inf`` (``-inf`` when
      maximizing) if the trial diverged.
    round: 0 for the coarse round, then 1, 2, ... for zoom rounds.
    lane: the trial's position in its program's population.
    status: ``"ok"``, ``"diverged"``, or ``"stopped"`` (halted early by a
      strategy, or still running when the budget ran out).
    seed: the trial seed; init, data order and dropout derive from it alone.
    curve: validation score at each evaluation, shape ``(num_evals,)``.
    curve_steps: the step of each evaluation, shape ``(num_evals,)``.
    train_curve: mean training loss over each evaluation interval.
    diverged_at: the step at which the loss or parameters went non-finite.
    parent: the id of the trial this one was zoomed from (None in round 0);
      with ``strategy="pbt"``, the last trial whose weights it copied.
    steps: steps trained.
    bucket: index of the trial's static signature within its round.
    rung: with ``strategy="halving"``, the highest rung the trial reached
      (0 for the first); None otherwise.
    schedule: with ``strategy="pbt"``, the lane's hyperparameters over time:
      a list of ``(step, config)``, the first at step 0. Replay it with
      ``vt.train(..., schedule=trial.schedule)``.
    seconds: the training wall time charged to the trial: each compiled
      call's measured time split evenly over the lanes of its program (a
      lane costs the same whatever its trial; a wide program's lanes more
      than a narrow one's). With ``steps`` (its lane-steps) it is what the
      strategy spent on it; ``result.stats.idle_lane_steps`` is the rest.
  """

  id: int
  config: dict
  score: float
  round: int
  lane: int
  status: str
  seed: int
  curve: np.ndarray
  curve_steps: np.ndarray
  train_curve: np.ndarray
  diverged_at: int | None = None
  parent: int | None = None
  steps: int = 0
  bucket: int = 0
  rung: int | None = None
  schedule: list | None = None
  seconds: float = 0.0

  CURVES = ("curve", "curve_steps", "train_curve")

  def to_dict(self, curves: bool = True) -> dict:
    """The trial's fields as plain values (``curves=False``: all but the
    curves): the one serialiser, for checkpoints and saved results."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if curves or f.name not in self.CURVES}
    d["config"] = dict(self.config)
    d["score"] = float(self.score)
    if self.schedule is not None:
      d["schedule"] = [(int(step), dict(c)) for step, c in self.schedule]
    for k in self.CURVES:
      if k in d:
        d[k] = np.asarray(d[k])
    return d

  @classmethod
  def from_dict(cls, d: dict, **curves) -> "Trial":
    """Inverts :meth:`to_dict` (curves from ``d`` or given apart)."""
    d = {**{k: v for k, v in d.items() if k in _TRIAL_FIELDS}, **curves}
    if d.get("schedule") is not None:
      d["schedule"] = [tuple(e) for e in d["schedule"]]
    return cls(**d)

  def __repr__(self) -> str:
    cfg = ", ".join(f"{k}={fmt(v)}" for k, v in self.config.items())
    return f"Trial(id={self.id}, round={self.round}, score={self.score:.6g}, status={self.status!r}, {cfg})"


_TRIAL_FIELDS = frozenset(f.name for f in dataclasses.fields(Trial))


def fmt(v: Any) -> str:
  """A config value for tables: floats to 4 significant digits."""
  if isinstance(v, float):
    return f"{v:.4g}"
  return repr(v)


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Right-aligned fixed-width columns: the header, a rule, then the rows."""
  widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(head)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


@dataclasses.dataclass
class Stats:
  """Where a search's time went: its wall time split into phases that do not
  overlap (``trace``, ``compile_wall``, ``train``, ``host``), plus counts.

  >>> import vmaptune as vt
  >>> s = vt.Stats(wall_seconds=2.0, trace_seconds=0.2, compile_seconds=1.0, compile_wall_seconds=1.0,
  ...              train_seconds=0.5, lane_steps=1000)
  >>> s.lane_steps_per_second, round(s.host_seconds, 6)
  (2000.0, 0.3)

  Attributes:
    wall_seconds: the whole call.
    trace_seconds: tracing and lowering programs to XLA on the calling thread,
      or waiting for the background thread that lowers them (with a
      ``timeout``, programs after the first lower there while lanes train:
      that part overlaps training and is not counted).
    compile_seconds: XLA compilation, summed over programs.
    compile_wall_seconds: wall time the search spent waiting for XLA
      compilation (less than ``compile_seconds`` when programs compile
      concurrently).
    train_seconds: from dispatching compiled calls until their results are
      on the host (training and validation, device time included).
    checkpoint_seconds: writing checkpoints (part of the host time).
    programs_compiled: XLA programs compiled (a bucket's training program per
      signature and lane layout; PBT's copy program).
    programs_by_round: for each population started (round 0, each zoom
      round, each program the re-check runs in), ``{"round", "programs", "compiled", "new_signatures",
      "new_layouts"}``: how many programs it ran, how many had to be compiled
      and why (a signature not seen before in the search, or a seen one at a
      new lane layout); the rest came from the cache.
    segments: times the search stopped training to decide (zoom: rounds;
      halving and PBT: segments of population time).
    lane_steps: optimisation steps over all real lanes (no padding).
    idle_lane_steps: steps the programs ran on lanes with no trial: padding
      lanes and lanes left idle near the end of a budget (a vmapped lane costs
      the same busy or not; with ``lane_batch=1`` an idle lane is skipped).
    lane_steps_per_second: ``lane_steps / train_seconds``.
    host_seconds: the rest of the wall time: validation, sampling, decisions,
      bookkeeping, checkpoints, results.
    padded_lanes: dummy lanes added to fill device layouts (never reported).
    num_devices: devices the lanes were sharded over.
    lane_batch: lanes vectorised together on one device.
    resumed_from: the checkpoint directory this search resumed from, if any.
  """

  wall_seconds: float = 0.0
  compile_seconds: float = 0.0
  trace_seconds: float = 0.0
  train_seconds: float = 0.0
  compile_wall_seconds: float = 0.0
  checkpoint_seconds: float = 0.0
  programs_compiled: int = 0
  programs_by_round: list = dataclasses.field(default_factory=list)
  segments: int = 0
  lane_steps: int = 0
  idle_lane_steps: int = 0
  padded_lanes: int = 0
  num_devices: int = 1
  lane_batch: int = 1
  resumed_from: str | None = None

  @property
  def lane_steps_per_second(self) -> float:
    return self.lane_steps / self.train_seconds if self.train_seconds > 0 else 0.0

  @property
  def overhead_seconds(self) -> float:
    """Everything but training: compiles, sampling, zoom, host work."""
    return max(0.0, self.wall_seconds - self.train_seconds)

  @property
  def host_seconds(self) -> float:
    """Wall time outside tracing, compiling and training."""
    return max(0.0, self.wall_seconds - self.trace_seconds - self.compile_wall_seconds - self.train_seconds)

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["lane_steps_per_second"] = self.lane_steps_per_second
    d["overhead_seconds"] = self.overhead_seconds
    d["host_seconds"] = self.host_seconds
    return d

  def __repr__(self) -> str:
    return (
        f"Stats(wall={self.wall_seconds:.2f}s, trace={self.trace_seconds:.2f}s, "
        f"compile={self.compile_seconds:.2f}s (wall {self.compile_wall_seconds:.2f}s), "
        f"train={self.train_seconds:.2f}s, host={self.host_seconds:.2f}s, programs={self.programs_compiled}, "
        f"lane_steps/s={self.lane_steps_per_second:,.0f}, devices={self.num_devices})"
    )


class Run:
  """One configuration trained alone (:func:`vmaptune.train`) or replayed.

  See :func:`vmaptune.train` for an example; ``run.model()`` rebuilds the
  trained model.

  Attributes:
    config: the hyperparameters.
    seed: the trial seed.
    score: final validation score (``±inf`` if diverged).
    curve, curve_steps, train_curve: as in :class:`Trial`.
    status: ``"ok"`` or ``"diverged"``.
    diverged_at: step of divergence or None.
    steps: steps trained.
    params: the trained parameters (a pytree of jax arrays).
    model_state: non-parameter state (batch statistics, ...).
  """

  def __init__(self, *, config, seed, score, curve, curve_steps, train_curve, status,
               diverged_at, steps, params, model_state, adapter, metric_name, maximize):
    self.config = dict(config)
    self.seed = int(seed)
    self.score = float(score)
    self.curve = np.asarray(curve)
    self.curve_steps = np.asarray(curve_steps)
    self.train_curve = np.asarray(train_curve)
    self.status = status
    self.diverged_at = diverged_at
    self.steps = int(steps)
    self.params = params
    self.model_state = model_state
    self.metric_name = metric_name
    self.maximize = maximize
    self._adapter = adapter

  def model(self):
    """The trained model in evaluation mode: an ``nnx.Module`` (NNX) or
    ``(module, variables)`` (Linen)."""
    return self._adapter.build(self.params, self.model_state)

  def __repr__(self) -> str:
    return f"Run(score={self.score:.6g}, status={self.status!r}, steps={self.steps}, seed={self.seed})"


class AllDivergedError(RuntimeError):
  """Every trial of a search diverged; ``.trials`` holds them for inspection.

  >>> import vmaptune as vt
  >>> vt.AllDivergedError("all 4 trials diverged", trials=[]).trials
  []
  """

  def __init__(self, message: str, trials: Sequence[Trial]):
    super().__init__(message)
    self.trials = list(trials)


def better(a: Trial, b: Trial, maximize: bool) -> bool:
  """Whether trial ``a`` ranks above ``b``: a better score, ties to the lower id."""
  if a.score == b.score:
    return a.id < b.id
  return a.score > b.score if maximize else a.score < b.score


def rank_trials(trials: Sequence[Trial], maximize: bool) -> list[Trial]:
  """Healthy trials best first; NaN and diverged trials never rank."""
  ok = [t for t in trials if t.status == "ok" and math.isfinite(t.score)]
  return sorted(ok, key=lambda t: (-t.score if maximize else t.score, t.id))


def unfinished(trials: Sequence[Trial]) -> str:
  """What the trials without a final score were: stopped early (pruned by
  the strategy) or diverged, with their counts."""
  stopped = sum(t.status == "stopped" for t in trials)
  return ", ".join(([f"stopped early ({stopped})"] if stopped else [])
                   + ([f"diverged ({len(trials) - stopped})"] if len(trials) > stopped else []))


def rounds_text(result) -> str:
  """Zoom's rounds, or the strategy that refilled lanes as it went (its
  trials' ``round`` is not a zoom round)."""
  strategy = result.options.get("strategy", "zoom")
  return f"{len(result.regions)} round(s)" if strategy == "zoom" else f"strategy {strategy}"


def user_stacklevel() -> int:
  """The ``stacklevel`` that points a warning raised by its caller at the
  first frame outside vmaptune: the user's line."""
  here = os.path.dirname(os.path.abspath(__file__))
  frame, level = sys._getframe(1), 1
  while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
    frame, level = frame.f_back, level + 1
  return level


def callback_stops(returned: Any) -> bool:
  """Whether a search callback's return value ends the search: a dict with a
  true ``"stop"``, as :func:`vmaptune.train`'s callback. Any other value is
  ignored (a logger's ``True`` or a path must not end a search)."""
  return isinstance(returned, dict) and bool(returned.get("stop"))
