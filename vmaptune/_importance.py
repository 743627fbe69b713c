"""Hyperparameter importance: each hyperparameter's share of the score's variance.

The estimator is the correlation ratio η² of the score on one hyperparameter
at a time, a first-order Sobol index estimate that needs nothing but NumPy:

1. Take the hyperparameter's *sampling coordinate* (``log(x)`` for
   :func:`~vmaptune.loguniform` and ``integer(..., log=True)``,
   ``log(1 - x)`` for :func:`~vmaptune.reverse_loguniform`, ``x`` otherwise),
   so that bins are even on the scale the search sampled on.
2. Cut it into bins: every distinct value is its own bin when there are few
   (choices, small integers, grids), otherwise quantile bins, about
   ``sqrt(n)`` of them and at most 10.
3. ``η² = SS_between / SS_total``: the part of the score's variance that the
   bin means explain.
4. Subtract what chance alone gives: with ``k`` bins and ``n`` trials an
   unrelated hyperparameter has ``E[η²] = (k - 1) / (n - 1)``. Clip at 0.
5. Normalise so the shares sum to 1.

It sees main effects only (an interaction between two hyperparameters is
credited to neither), and like any variance share it is dominated by the
worst trials when scores have a heavy tail.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterable, Sequence

import numpy as np

from . import _space

__all__ = ["importance"]

#: At most this many bins per hyperparameter.
MAX_BINS = 10
#: Round 0 alone is used when it holds at least this many finite trials.
MIN_ROUND0 = 8


def select_trials(result, rounds=None) -> tuple[list, str]:
  """The finite trials importance is computed from, and a short description.

  Args:
    result: a :class:`~vmaptune.SearchResult`.
    rounds: None, a round index, or an iterable of round indices.

  Returns:
    ``(trials, description)``, e.g. ``(trials, "round 0, 24 trials")``.

  >>> from vmaptune import _importance
  >>> from vmaptune._demo import example_result
  >>> _importance.select_trials(example_result(), None)[1]
  'round 0, 40 trials'
  """
  finite = [t for t in result.trials if t.status == "ok" and math.isfinite(t.score)]
  if rounds is None and any(t.status == "stopped" for t in result.trials):
    return _at_common_step(result.trials)
  if rounds is None:
    # Round 0 is a set of independent draws over the whole space: the only
    # trials whose hyperparameters are independent of each other and of the
    # score. Zoom rounds sample where the score is already good, which
    # shrinks the very variance being attributed and correlates the
    # hyperparameters, so they are used only when round 0 is too small.
    round0 = [t for t in finite if t.round == 0]
    if len(round0) >= MIN_ROUND0:
      return round0, f"round 0, {len(round0)} trials"
    return finite, f"all rounds, {len(finite)} trials"
  if isinstance(rounds, numbers.Integral) and not isinstance(rounds, bool):
    wanted = {int(rounds)}
  else:
    try:
      wanted = set(rounds)
    except TypeError:
      raise TypeError(
          f"`rounds` must be None, a round index or a list of them, got {rounds!r}."
      ) from None
    if any(isinstance(r, bool) or not isinstance(r, numbers.Integral) for r in wanted):
      raise TypeError(f"`rounds` must hold round indices (ints), got {rounds!r}.")
    wanted = {int(r) for r in wanted}
  chosen = [t for t in finite if t.round in wanted]
  label = ", ".join(str(r) for r in sorted(wanted))
  return chosen, f"round{'s' if len(wanted) > 1 else ''} {label}, {len(chosen)} trials"


def _at_common_step(trials: Sequence) -> tuple[list, str]:
  """Every trial not diverged, scored at the last evaluation nine in ten of
  them reached (those that did not are left out). A strategy that stops
  trials early keeps final scores only for its survivors, and those sit in
  the good region (in an adaptive search of
  digits, every finished trial's learning rate lay in 0.006-0.059 of the
  searched 1e-4-0.1, so the learning rate's share came out 0): the trials it
  stopped count too, at a step where nearly all were still running."""
  alive = [t for t in trials if t.status in ("ok", "stopped")]
  last = sorted(int(np.asarray(t.curve_steps)[np.isfinite(np.asarray(t.curve, np.float64))].max(initial=-1))
                for t in alive)
  # The last step nine in ten reached (a few trials refilled just before a
  # timeout would otherwise pull every score back to their first evaluation).
  step = last[len(last) // 10] if last else -1
  scored = []
  for t in alive:
    hit = np.flatnonzero(np.asarray(t.curve_steps) == step)
    value = float(np.asarray(t.curve, np.float64)[hit[0]]) if hit.size else math.nan
    if math.isfinite(value):
      scored.append(dataclasses.replace(t, score=value))
  return scored, (f"all rounds, {len(scored)} trials at step {step} (the last step nine in ten trials reached; "
                  "some stopped early)")


def importance(result, *, rounds: int | Iterable[int] | None = None) -> dict[str, float]:
  """Each searched hyperparameter's share of the score's variance.

  The correlation ratio η² of the score on each hyperparameter's sampling
  coordinate (quantile bins, or one bin per value for choices and other
  hyperparameters with few values), minus the ``(bins - 1) / (n - 1)`` that
  an unrelated hyperparameter gets by chance, clipped at 0 and normalised so
  the shares sum to 1. Diverged and non-finite trials are left out, and so
  are constants. If no hyperparameter explains more than chance (or the
  score does not vary), every share is 0.0.

  Args:
    result: a :class:`~vmaptune.SearchResult`.
    rounds: which rounds' trials to use. None (default) uses round 0 when it
      has at least 8 finite trials, else every round: round 0's configs are
      independent uniform draws, so their variance attribution is unbiased,
      while zoom rounds sample only near the best and correlate the
      hyperparameters. When the strategy stopped trials early (adaptive,
      halving), None scores every trial at the last evaluation step nine in
      ten of them reached instead of the survivors' final scores. An int or a
      list of ints picks rounds explicitly (finished trials' final scores).

  Returns:
    ``{name: share}``, largest share first; shares are in ``[0, 1]``.

  Raises:
    ValueError: fewer than 3 finite trials to work from.

  >>> from vmaptune import _importance
  >>> from vmaptune._demo import example_result
  >>> shares = _importance.importance(example_result())
  >>> list(shares)[0], round(sum(shares.values()), 6)
  ('learning_rate', 1.0)
  """
  trials, description = select_trials(result, rounds)
  if len(trials) < 3:
    raise ValueError(
        f"importance needs at least 3 finite trials, got {len(trials)} ({description}); "
        "run more configs or pass rounds=None."
    )
  dists = _space.searched(result.space)
  scores = np.asarray([t.score for t in trials], dtype=np.float64)
  raw = {name: corrected_eta_squared(_bins(d, [t.config[name] for t in trials]), scores)
         for name, d in dists.items()}
  total = sum(raw.values())
  shares = {k: (v / total if total > 0 else 0.0) for k, v in raw.items()}
  order = {k: i for i, k in enumerate(dists)}
  return dict(sorted(shares.items(), key=lambda kv: (-kv[1], order[kv[0]])))


def corrected_eta_squared(labels: np.ndarray, scores: np.ndarray) -> float:
  """η² of ``scores`` grouped by ``labels``, less its expectation under
  independence, clipped at 0.

  Args:
    labels: integer bin of each trial, shape ``(n,)``.
    scores: shape ``(n,)``.

  >>> import numpy as np
  >>> from vmaptune import _importance
  >>> _importance.corrected_eta_squared(np.array([0, 0, 1, 1]), np.array([1.0, 1.0, 3.0, 3.0]))
  0.6666666666666667
  """
  n = len(scores)
  centred = scores - scores.mean()
  ss_total = float(centred @ centred)
  groups = np.unique(labels)
  k = len(groups)
  if n < 2 or k < 2 or ss_total <= 0.0:
    return 0.0
  ss_between = 0.0
  for g in groups:
    member = scores[labels == g]
    ss_between += len(member) * (member.mean() - scores.mean()) ** 2
  eta2 = ss_between / ss_total
  return float(max(0.0, eta2 - (k - 1) / (n - 1)))


def _bins(d: _space.Distribution, values: Sequence[Any]) -> np.ndarray:
  """Bin index of each value, shape ``(n,)``."""
  n = len(values)
  if isinstance(d, _space.Choice):
    keys = {}
    return np.asarray([keys.setdefault(_key(v), len(keys)) for v in values], dtype=np.int64)
  t = np.asarray([d.to_coord(v) for v in values], dtype=np.float64)
  distinct = np.unique(t)
  max_bins = int(min(MAX_BINS, max(2, math.isqrt(n))))
  if len(distinct) <= max_bins:
    return np.searchsorted(distinct, t)
  edges = np.quantile(t, np.linspace(0.0, 1.0, max_bins + 1)[1:-1])
  return np.searchsorted(edges, t, side="right")


def _key(v: Any):
  try:
    hash(v)
    return v
  except TypeError:
    return repr(v)
