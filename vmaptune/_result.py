"""What a search and a single run give back: plain host data plus small methods."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from . import _space

__all__ = ["Trial", "Run", "Stats", "SearchResult", "AllDivergedError"]


def _optional(module: str, extra: str):
  import importlib

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

  def __repr__(self) -> str:
    cfg = ", ".join(f"{k}={_fmt(v)}" for k, v in self.config.items())
    return f"Trial(id={self.id}, round={self.round}, score={self.score:.6g}, status={self.status!r}, {cfg})"


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return repr(v)


@dataclasses.dataclass
class Stats:
  """Where a search's time went.

  >>> import vmaptune as vt
  >>> vt.Stats(lane_steps=1000, train_seconds=0.5).lane_steps_per_second
  2000.0

  Attributes:
    wall_seconds: the whole call.
    compile_seconds: XLA compilation.
    trace_seconds: tracing and lowering to XLA.
    train_seconds: executing the compiled programs (training and validation).
    programs_compiled: XLA programs compiled (one per bucket signature and lane layout).
    lane_steps: optimisation steps over all real lanes (no padding).
    lane_steps_per_second: ``lane_steps / train_seconds``.
    padded_lanes: dummy lanes added to fill device layouts (never reported).
    num_devices: devices the lanes were sharded over.
    lane_batch: lanes vectorised together on one device.
    resumed_from: the checkpoint directory this search resumed from, if any.
  """

  wall_seconds: float = 0.0
  compile_seconds: float = 0.0
  trace_seconds: float = 0.0
  train_seconds: float = 0.0
  programs_compiled: int = 0
  lane_steps: int = 0
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

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["lane_steps_per_second"] = self.lane_steps_per_second
    d["overhead_seconds"] = self.overhead_seconds
    return d

  def __repr__(self) -> str:
    return (
        f"Stats(wall={self.wall_seconds:.2f}s, compile={self.compile_seconds:.2f}s, "
        f"train={self.train_seconds:.2f}s, programs={self.programs_compiled}, "
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


def is_better(a: float, b: float, maximize: bool) -> bool:
  return a > b if maximize else a < b


def rank_trials(trials: Sequence[Trial], maximize: bool) -> list[Trial]:
  """Healthy trials best first; NaN and diverged trials never rank."""
  ok = [t for t in trials if t.status == "ok" and math.isfinite(t.score)]
  return sorted(ok, key=lambda t: (-t.score if maximize else t.score, t.id))


class SearchResult:
  """The outcome of :func:`vmaptune.search`.

  Attributes:
    trials: every trial, in order of creation.
    space: the search space as given.
    metric: the metric's name; ``maximize`` says its direction.
    regions: the region each round sampled (sampling coordinates), a list of
      :class:`Region`, one per round.
    stats: :class:`Stats`.

  Example (every method on one small search):

    >>> import numpy as np, vmaptune as vt
    >>> from flax import nnx
    >>> x = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> result = vt.search(lambda c, rngs: nnx.Linear(4, 2, rngs=rngs), (x, y),
    ...                    {"learning_rate": vt.loguniform(1e-3, 1e-1)},
    ...                    num_configs=4, num_steps=20, rounds=2, verbose=False)
    >>> best = result.best_trial
    >>> result.best_score == best.score == result.ranked()[0].score == result.top(1)[0].score
    True
    >>> result.retrain(best).score == best.score          # exact replay
    True
    >>> type(result.best_model()).__name__                # the trained model, evaluation mode
    'Linear'
    >>> len(result.to_records()), len(result.to_pandas())
    (8, 8)
    >>> result.table(2).splitlines()[0].split()[:4]
    ['rank', 'trial', 'round', 'loss']
    >>> list(result.importance())                         # needs 3+ healthy trials
    ['learning_rate']
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> os.path.basename(result.report(d)), len(vt.load(result.save(os.path.join(d, "r.vmaptune"))).trials)
    ('report.html', 8)
  """

  def __init__(self, *, trials, space, metric, maximize, regions, stats, context=None,
               best_params=None, options=None):
    self.trials: list[Trial] = list(trials)
    self.space = dict(space)
    self.metric = metric
    self.maximize = bool(maximize)
    self.regions = list(regions)
    self.stats: Stats = stats
    self.options = dict(options or {})
    self._context = context
    self._best_params = best_params
    #: True when Ctrl-C stopped the search: the result holds the finished rounds.
    self.interrupted = False

  # Best -------------------------------------------------------------------

  def ranked(self) -> list[Trial]:
    """Healthy trials, best first."""
    return rank_trials(self.trials, self.maximize)

  @property
  def best_trial(self) -> Trial:
    ranked = self.ranked()
    if not ranked:
      raise AllDivergedError("every trial diverged; there is no best trial", self.trials)
    return ranked[0]

  @property
  def best_config(self) -> dict:
    return dict(self.best_trial.config)

  @property
  def best_score(self) -> float:
    return float(self.best_trial.score)

  def top(self, n: int = 5) -> list[Trial]:
    return self.ranked()[:n]

  # Models -------------------------------------------------------------------

  def _require_context(self, what: str):
    if self._context is None:
      raise RuntimeError(
          f"{what} needs the search's compiled programs and data, which a "
          "loaded result does not have; run vt.train with the trial's config and seed."
      )
    return self._context

  def best_model(self):
    """The best trial's trained model, in evaluation mode.

    Returns an ``nnx.Module`` for NNX models and ``(module, variables)`` for
    Linen models.
    """
    ctx = self._require_context("best_model()")
    best = self.best_trial
    params, model_state = self._best_params[best.id]
    return ctx.adapter_for(best).build(params, model_state)

  def retrain(self, trial: Trial | int | None = None) -> Run:
    """Replays a trial exactly as the search ran it: same score, bit for bit.

    The trial runs in the same compiled program, at the same lane position,
    with every other lane a copy of it, so nothing but its own inputs can
    change its numbers (see the lane-equivalence notes in the README).

    Args:
      trial: a :class:`Trial`, a trial id, or None for the best trial.
    """
    ctx = self._require_context("retrain()")
    if self.options.get("strategy") == "pbt":
      raise ValueError(
          "PBT lanes copied other lanes' weights mid-run, so there is no single run to replay; "
          "replay the winning hyperparameter schedule with "
          "vt.train(..., config=trial.schedule[0][1], seed=trial.seed, schedule=trial.schedule).")
    if trial is None:
      trial = self.best_trial
    elif isinstance(trial, (int, np.integer)) and not isinstance(trial, bool):
      trial = self.trials[int(trial)]
    elif not isinstance(trial, Trial):
      raise TypeError(f"`trial` must be a Trial, a trial id or None, got {trial!r}.")
    return ctx.replay(trial, self.metric, self.maximize)

  @property
  def best_params(self):
    """The best trial's ``(params, model_state)`` as host arrays, or None."""
    if not self._best_params:
      return None
    try:
      return self._best_params[self.best_trial.id]
    except KeyError:
      return next(iter(self._best_params.values()))

  # Seeing and sharing (implemented in their own modules) ------------------

  def importance(self, **kwargs) -> dict:
    """Each hyperparameter's share of the score's variance; see
    :func:`vmaptune._importance.importance`."""
    from ._importance import importance

    return importance(self, **kwargs)

  def report(self, path, **kwargs) -> str:
    """Writes one self-contained HTML page (plots inlined, top trials, best
    config) and returns its path; see :func:`vmaptune._report.write_report`."""
    from ._report import write_report

    return write_report(self, path, **kwargs)

  def save(self, path) -> str:
    """Saves trials, curves, space, regions and the best parameters; load
    with :func:`vmaptune.load`."""
    from ._io import save

    return save(self, path)

  def to_optuna(self, storage=None, study_name: str | None = None):
    """An ``optuna.Study`` holding every trial (needs optuna)."""
    from ._optuna import to_optuna

    return to_optuna(self, storage=storage, study_name=study_name)

  # Tables -------------------------------------------------------------------

  def to_records(self) -> list[dict]:
    names = list(self.space)
    rows = []
    for t in self.trials:
      row = {"trial": t.id, "round": t.round}
      row.update({k: t.config.get(k) for k in names})
      row.update(score=t.score, status=t.status, seed=t.seed, steps=t.steps,
                 diverged_at=t.diverged_at, parent=t.parent, lane=t.lane)
      rows.append(row)
    return rows

  def to_pandas(self):
    """One row per trial: a column per hyperparameter, then score, round,
    status, seed and the rest. Needs pandas."""
    pd = _optional("pandas", "pandas")
    return pd.DataFrame.from_records(self.to_records()).set_index("trial")

  def table(self, n: int = 5) -> str:
    """The top ``n`` trials as a fixed-width text table."""
    top = self.top(n)
    names = [k for k, v in self.space.items() if isinstance(v, _space.Distribution)]
    head = ["rank", "trial", "round", self.metric] + names
    rows = [
        [str(i + 1), str(t.id), str(t.round), f"{t.score:.5g}"] + [_fmt(t.config[k]) for k in names]
        for i, t in enumerate(top)
    ]
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])

  def __repr__(self) -> str:
    ok = sum(t.status == "ok" for t in self.trials)
    try:
      best = f"best {self.metric}={self.best_score:.6g}"
    except AllDivergedError:
      best = "no healthy trial"
    return f"SearchResult({len(self.trials)} trials, {ok} ok, {best}, rounds={len(self.regions)})"
