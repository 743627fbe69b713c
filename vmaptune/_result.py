"""What a search gives back: plain host data plus small methods.

The top of the results layer: :class:`SearchResult` delegates to ``_io``,
``_importance``, ``_report`` and ``_optuna``, which know only the plain
records of ``_trial`` and the space; none of them imports this module.
"""

from __future__ import annotations

import numpy as np

from . import _importance, _io, _optuna, _recheck, _report, _space
from ._trial import AllDivergedError, Run, Stats, Trial, fmt, optional, rank_trials, text_table

__all__ = ["SearchResult", "load"]


class SearchResult:
  """The outcome of :func:`vmaptune.search`.

  Attributes:
    trials: every trial, in order of creation.
    space: the search space as given.
    metric: the metric's name; ``maximize`` says its direction.
    regions: the region each round sampled (sampling coordinates), a list of
      :class:`Region`, one per round.
    stats: :class:`Stats` (the re-check's time and lane-steps included).
    rechecked: the :class:`Recheck` the search ran at its end (see
      ``search(recheck=...)``), or None; ``best_trial`` then follows its
      best mean.

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
    >>> check = result.recheck(top=3, seeds=4)           # the top 3, each with 4 fresh seeds
    >>> check.scores.shape, bool(check.mean[0] <= check.mean[-1])   # best mean first
    ((3, 4), True)
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

  def __init__(self, *, trials, space, metric, maximize, regions, stats, replay=None,
               best_params=None, options=None, rechecked=None):
    self.trials: list[Trial] = list(trials)
    self.space = dict(space)
    self.metric = metric
    self.maximize = bool(maximize)
    self.regions = list(regions)
    self.stats: Stats = stats
    self.options = dict(options or {})
    # What best_model() and retrain() need: the search's programs and data
    # (None for a loaded result); see _replay.Replay.
    self._replay = replay
    self._best_params = best_params
    #: True when Ctrl-C stopped the search: the result holds the finished rounds.
    self.interrupted = False
    #: The re-check the search ran (``search(recheck=...)``), a
    #: :class:`vmaptune.Recheck`, or None.
    self.rechecked: "_recheck.Recheck | None" = rechecked

  # Best -------------------------------------------------------------------

  def ranked(self) -> list[Trial]:
    """Healthy trials, best first."""
    return rank_trials(self.trials, self.maximize)

  @property
  def best_trial(self) -> Trial:
    """The trial to keep: the best score, or, when the search re-checked its
    top configs (``rechecked``), the trial whose config had the best mean
    over the fresh seeds (the best score again if every config re-checked
    diverged on at least one seed)."""
    ranked = self.ranked()
    if not ranked:
      raise AllDivergedError("every trial diverged; there is no best trial", self.trials)
    check = self.rechecked
    if check is not None and np.isfinite(check.mean[0]):
      return next((t for t in self.trials if t.id == check.best_trial.id), ranked[0])
    return ranked[0]

  @property
  def best_config(self) -> dict:
    return dict(self.best_trial.config)

  @property
  def best_score(self) -> float:
    """``best_trial``'s score in the search (one run; see ``rechecked`` for
    the means)."""
    return float(self.best_trial.score)

  def top(self, n: int = 5) -> list[Trial]:
    return self.ranked()[:n]

  # Models -------------------------------------------------------------------

  def _require_replay(self, what: str):
    if self._replay is None:
      raise RuntimeError(
          f"{what} needs the search's compiled programs and data, which a "
          "loaded result does not have; run vt.train with the trial's config and seed."
      )
    return self._replay

  def best_model(self):
    """The best trial's trained model, in evaluation mode.

    Returns an ``nnx.Module`` for NNX models and ``(module, variables)`` for
    Linen models.
    """
    replay = self._require_replay("best_model()")
    best = self.best_trial
    params, model_state = self._best_params[best.id]
    return replay.model(best, params, model_state)

  def retrain(self, trial: Trial | int | None = None) -> Run:
    """Replays a trial exactly as the search ran it: same score, bit for bit.

    The trial runs in the same compiled program, at the same lane position,
    every other lane idle (on a CPU skipped: it costs one lane's training),
    so nothing but its own inputs can change its numbers (see the
    lane-equivalence notes in the README).

    Args:
      trial: a :class:`Trial`, a trial id, or None for the best trial.
    """
    replay = self._require_replay("retrain()")
    if self.options.get("strategy") == "pbt":
      raise ValueError(
          "PBT lanes copied other lanes' weights mid-run, so there is no single run to replay; "
          "replay the winning hyperparameter schedule with "
          "vt.train(..., config=trial.schedule[0][1], seed=trial.seed, schedule=trial.schedule).")
    if trial is None:
      trial = self.best_trial
    elif isinstance(trial, bool) or not isinstance(trial, (Trial, int, np.integer)):
      raise TypeError(f"`trial` must be a Trial, a trial id or None, got {trial!r}.")
    else:
      trial = self._own_trial(trial, "trial")
    return replay.run(trial, self.metric, self.maximize)

  def _own_trial(self, trial: Trial | int, argument: str) -> Trial:
    """This search's trial with that id (ids can skip numbers: an adaptive
    search's held configs, a resumed one), or a ValueError naming ``argument``."""
    tid = trial.id if isinstance(trial, Trial) else int(trial)
    found = next((t for t in self.trials if t.id == tid), None)
    if found is None:
      raise ValueError(f"`{argument}`: this search has no trial with id {tid} "
                       f"(its ids: {self.trials[0].id if self.trials else '-'} to "
                       f"{max((t.id for t in self.trials), default='-')}, see result.trials).")
    if isinstance(trial, Trial) and (trial.config != found.config or trial.seed != found.seed):
      raise ValueError(f"`{argument}`: trial {tid} is not this search's trial {tid} (another config or seed); "
                       "pass a trial of this result, or its id.")
    return found

  def recheck(self, top: int = 5, seeds: int | list[int] = 8, *, trials=None) -> "_recheck.Recheck":
    """Trains the best configs again with fresh seeds and ranks them by the mean.

    A search scores each config by one run, so its best score is the
    minimum of many noisy draws and often a lucky seed. This re-trains the
    ``top`` configs (or ``trials``) from scratch with every seed, all in the
    compiled programs the search already has and on its validation split,
    and ranks them by their mean score: the config to deploy is
    ``result.recheck().best_config``. Each config gets the same seeds, so
    configs of one shape are compared on the same initialisation and data
    order. It costs ``top * seeds`` full trials of lane-steps, run a
    program's width of lanes at a time (rounded up to whole programs per
    shape), and no compile while the search's programs are still in the
    process's cache.

    Args:
      top: how many of the best healthy trials to re-check.
      seeds: how many fresh seeds (drawn from the search's seed on a stream
        of their own, not the trials', the same for every config), or a list
        of seeds.
      trials: re-check these instead of the top: Trials or trial ids.

    Returns:
      A :class:`vmaptune.Recheck`: ``trials`` best mean first,
      ``scores`` (one row per config, one column per seed), ``mean``,
      ``std``, ``best_config``, ``table()`` and ``to_pandas()``.

    See the class's example.
    """
    replay = self._require_replay("recheck()")
    return _recheck.recheck(self, replay, top=top, seeds=seeds, trials=trials)

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
    return _importance.importance(self, **kwargs)

  def report(self, path, **kwargs) -> str:
    """Writes one self-contained HTML page (plots inlined, top trials, best
    config) and returns its path; see :func:`vmaptune._report.write_report`."""
    return _report.write_report(self, path, **kwargs)

  def save(self, path) -> str:
    """Saves trials, curves, space, regions and the best parameters; load
    with :func:`vmaptune.load`."""
    return _io.save(self, path)

  def to_optuna(self, storage=None, study_name: str | None = None):
    """An ``optuna.Study`` holding every trial (needs optuna)."""
    return _optuna.to_optuna(self, storage=storage, study_name=study_name)

  # Tables -------------------------------------------------------------------

  def to_records(self) -> list[dict]:
    names = list(self.space)
    rows = []
    for t in self.trials:
      row = {"trial": t.id, "round": t.round}
      row.update({k: t.config.get(k) for k in names})
      row.update(score=t.score, status=t.status, seed=t.seed, steps=t.steps, seconds=t.seconds,
                 diverged_at=t.diverged_at, parent=t.parent, lane=t.lane)
      rows.append(row)
    return rows

  def to_pandas(self):
    """One row per trial: a column per hyperparameter, then score, round,
    status, seed and the rest. Needs pandas."""
    pd = optional("pandas", "pandas")
    return pd.DataFrame.from_records(self.to_records()).set_index("trial")

  def table(self, n: int = 5) -> str:
    """The top ``n`` trials by score as a fixed-width text table; after the
    search's re-check, a column of the re-checked trials' mean scores, and
    the kept trial (``best_trial``) marked ``*`` by its rank."""
    top = self.top(n)
    names = [k for k, v in self.space.items() if isinstance(v, _space.Distribution)]
    head = ["rank", "trial", "round", self.metric] + names
    rows = [
        [str(i + 1), str(t.id), str(t.round), f"{t.score:.5g}"] + [fmt(t.config[k]) for k in names]
        for i, t in enumerate(top)
    ]
    if self.rechecked is not None:
      means = {t.id: m for t, m in zip(self.rechecked.trials, self.rechecked.mean)}
      kept = self.best_trial.id
      head.insert(4, f"mean {self.metric}")
      for t, row in zip(top, rows):
        row.insert(4, f"{means[t.id]:.5g}" if t.id in means else "")
        row[0] += "*" if t.id == kept else ""
    return text_table(head, rows)

  def __repr__(self) -> str:
    ok = sum(t.status == "ok" for t in self.trials)
    try:
      best = f"best {self.metric}={self.best_score:.6g}"
    except AllDivergedError:
      best = "no healthy trial"
    if self.rechecked is not None:
      best += f" (re-checked: trial {self.best_trial.id})"
    return f"SearchResult({len(self.trials)} trials, {ok} ok, {best}, rounds={len(self.regions)})"


def load(path) -> SearchResult:
  """Loads a :class:`SearchResult` written by ``result.save(path)``.

  The loaded result plots, reports, ranks and exports to Optuna like the
  original. It has no compiled programs or data, so ``best_model()`` and
  ``retrain()`` raise; train the best config again with :func:`vmaptune.train`
  and ``result.best_trial.seed``. ``result.best_params`` is
  ``(params, model_state)`` as nested dicts of NumPy arrays keyed by the
  original key path (ints for list positions), not an ``nnx.State``; JAX
  random keys come back as their raw ``uint32`` key data. Space constants
  that were functions come back as their qualified names (strings), in the
  space and in every trial's config alike. The file format is described in
  ``vmaptune/_io.py``.

  Args:
    path: a file written by :meth:`SearchResult.save`.

  Returns:
    A :class:`SearchResult`.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: the file is not a saved vmaptune result, is damaged, or was
      written by a newer vmaptune (its ``format_version`` is unknown).

  >>> import os, tempfile
  >>> import vmaptune as vt
  >>> from vmaptune._demo import example_result
  >>> result = example_result()  # any SearchResult, e.g. from vt.search(...)
  >>> path = result.save(os.path.join(tempfile.mkdtemp(), "search.vmaptune"))
  >>> loaded = vt.load(path)
  >>> loaded.best_config == result.best_config, len(loaded.trials)
  (True, 40)
  """
  parts = _io.read(path)
  return SearchResult(replay=None, **parts)
