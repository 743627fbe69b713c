"""Re-checking the best configs with fresh seeds, in the search's own programs.

A search scores each config by one run, and its best score is the minimum of
many noisy draws: on a small validation split it picks a config whose seed was
lucky about as often as a config that is better. (Measured on scikit-learn's
diabetes, 88 validation rows: one search's best config scored 0.4325 and
scored 0.471-0.544 re-trained with 16 other seeds; another search's best,
0.4691, scored 0.459-0.542: the same worth, a 0.037 gap from the seeds.)

:func:`recheck` trains the top configs again with fresh seeds, all of them in
the compiled programs the search already has (no compile on the way), on the
search's own validation split, and ranks them by the mean over the seeds.
Every config gets the same seeds, so configs of one shape share their
initialisation and data order and their comparison is paired.

``search(recheck="auto")`` runs one at the end of an adaptive search
(:func:`settle`), out of the search's own budget: with a ``timeout`` the
loop holds back the estimated time (:func:`reserve`) and runs what fits
(:func:`fit`).
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
import time
from typing import Sequence

import numpy as np

from ._sampling import Stream, trial_seed
from ._trial import Trial, fmt, optional, text_table

__all__ = ["Recheck", "recheck", "recheck_seeds", "settle"]


def recheck_seeds(search_seed: int, n: int) -> list[int]:
  """The ``n`` seeds a re-check trains with: drawn from their own stream, so
  they are the same for every config and every ``top``, and ``n`` seeds are
  the first ``n`` of any more."""
  return [trial_seed(search_seed, Stream.RECHECK, k) for k in range(n)]


@dataclasses.dataclass
class Recheck:
  """The top configs of a search trained again with fresh seeds
  (:meth:`SearchResult.recheck`, or ``result.rechecked`` when the search
  ran one itself).

  Attributes:
    trials: the search's trials whose configs were re-checked, best mean first.
    seeds: the seeds every config trained with; ``vt.train(..., seed=s,
      split_seed=<the search's seed>)`` trains one alone.
    scores: final validation scores, shape ``(len(trials), len(seeds))``,
      in the order of ``trials``; ``+inf`` (``-inf`` when maximizing) where
      that seed diverged.
    metric, maximize: as on the search's result.
    lane_steps: training steps spent, summed over lanes (padding lanes too).
    seconds: wall time of the re-check.

  The mean ranks: a config that diverges on any seed has an infinite mean
  and ranks after every config that never did.
  """

  trials: list
  seeds: list
  scores: np.ndarray
  metric: str
  maximize: bool
  lane_steps: int
  seconds: float

  @property
  def mean(self) -> np.ndarray:
    """Each config's mean score over the seeds, shape ``(len(trials),)``."""
    return self.scores.mean(axis=1)

  @property
  def std(self) -> np.ndarray:
    """Each config's standard deviation over the seeds (NaN if one diverged)."""
    with np.errstate(invalid="ignore"):
      return self.scores.std(axis=1, ddof=1) if self.scores.shape[1] > 1 else np.zeros(len(self.trials))

  @property
  def best_trial(self) -> Trial:
    """The search trial whose config has the best mean."""
    return self.trials[0]

  @property
  def best_config(self) -> dict:
    return dict(self.trials[0].config)

  def to_records(self) -> list[dict]:
    rows = []
    for rank, (t, scores, mean, std) in enumerate(zip(self.trials, self.scores, self.mean, self.std)):
      row = {"rank": rank + 1, "trial": t.id}
      row.update(t.config)
      row.update(mean=float(mean), std=float(std), search_score=t.score,
                 diverged=int(np.sum(~np.isfinite(scores))))
      row.update({f"seed_{s}": float(v) for s, v in zip(self.seeds, scores)})
      rows.append(row)
    return rows

  def to_pandas(self):
    """One row per config, best mean first: its hyperparameters, mean, std,
    the score it had in the search and one column per seed. Needs pandas."""
    pd = optional("pandas", "pandas")
    return pd.DataFrame.from_records(self.to_records()).set_index("rank")

  def table(self) -> str:
    """The configs as a fixed-width text table, best mean first."""
    names = sorted({k for t in self.trials for k in t.config})
    head = ["rank", "trial", f"mean {self.metric}", "std", "search", "diverged"] + names
    rows = [[str(r["rank"]), str(r["trial"]), f"{r['mean']:.5g}", f"{r['std']:.2g}", f"{r['search_score']:.5g}",
             str(r["diverged"])] + [fmt(r.get(k)) for k in names] for r in self.to_records()]
    return text_table(head, rows)

  def __repr__(self) -> str:
    return (f"Recheck({len(self.trials)} configs x {len(self.seeds)} seeds, best trial {self.best_trial.id}: "
            f"mean {self.metric}={self.mean[0]:.6g})")


def _check(result, top, seeds, trials) -> tuple[list[Trial], list[int]]:
  """The trials and seeds to re-check, or a clear error before anything runs."""
  if result.options.get("strategy") == "pbt":
    raise ValueError("recheck() needs each trial to be one config trained from scratch; PBT lanes changed "
                     "hyperparameters mid-run. Re-train a schedule with vt.train(..., schedule=trial.schedule).")
  if trials is None:
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1:
      raise ValueError(f"`top` must be a positive int (the best trials to re-check), got {top!r}.")
    chosen = result.top(int(top))
    if not chosen:
      raise ValueError("recheck() found no healthy trial to re-check: every trial diverged or stopped early.")
  else:
    if isinstance(trials, np.ndarray):
      trials = trials.tolist()
    if isinstance(trials, (Trial, numbers.Integral)) or not isinstance(trials, Sequence) or not trials:
      raise TypeError(f"`trials` must be a non-empty list of Trials or trial ids, got {trials!r}.")
    chosen = []
    for t in trials:
      if isinstance(t, bool) or not isinstance(t, (Trial, numbers.Integral)):
        raise TypeError(f"`trials` must hold Trials or trial ids, got {t!r}.")
      chosen.append(result._own_trial(t, "trials"))
    if len({t.id for t in chosen}) < len(chosen):
      raise ValueError(f"`trials` names a trial twice: {[t.id for t in chosen]}.")
  if isinstance(seeds, np.ndarray):
    seeds = seeds.tolist()
  if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
    if seeds < 1:
      raise ValueError(f"`seeds` must be a positive int (how many fresh seeds) or a list of seeds, got {seeds}.")
    seed_list = recheck_seeds(int(result.options.get("seed", 0)), int(seeds))
  elif isinstance(seeds, Sequence) and not isinstance(seeds, str) and len(seeds) > 0:
    seed_list = []
    for s in seeds:
      if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < 2**32:
        raise ValueError(f"`seeds` must hold ints in [0, 2**32), got {s!r}.")
      seed_list.append(int(s))
    if len(set(seed_list)) < len(seed_list):
      raise ValueError(f"`seeds` names a seed twice: {seed_list}.")
  else:
    raise TypeError(f"`seeds` must be a positive int or a non-empty list of ints, got {seeds!r}.")
  return chosen, seed_list


def recheck(result, replay, *, top: int = 5, seeds: int | Sequence[int] = 8,
            trials: Sequence[Trial | int] | None = None, stats=None, grow: tuple[int, int] | None = None,
            deadline: float | None = None, batched: bool = False) -> Recheck:
  """See :meth:`SearchResult.recheck`; ``stats``, if given, counts its time
  and lane-steps (the search's own, for the re-check ``search`` runs).

  With ``grow=(top, seeds)`` (``seeds`` a count) and a ``deadline`` (on the
  ``time.perf_counter()`` clock), the re-check then grows towards that size
  while it has time, at its own measured pace: one more seed for every
  config at a time, then one more config with every seed (the order in
  which :func:`sizes` cuts them). A step is estimated at the pairs' mean
  time so far (a new config's scaled by its ``Trial.seconds`` against the
  mean of the configs timed so far), or where a program's lanes run
  together (``batched``: accelerators) at the first step's time.
  """
  chosen, seed_list = _check(result, top, seeds, trials)
  t0 = time.perf_counter()
  # A diverged lane's score is already -inf/+inf (Slot.to_trial): it ranks last.
  scores, lane_steps = replay.scores(chosen, seed_list, result.maximize, stats)
  if grow is not None and deadline is not None:
    more = recheck_seeds(int(result.options.get("seed", 0)), grow[1])[len(seed_list):]
    ids = {t.id for t in chosen}
    extra = [t for t in result.top(grow[0]) if t.id not in ids]
    first = time.perf_counter() - t0
    while more or extra:
      pairs = len(chosen) if more else len(seed_list)
      step = first if batched else pairs * (time.perf_counter() - t0) / scores.size
      if not more and not batched:  # a config not timed yet: at its own cost against those timed
        step *= _relative_cost(extra[0], chosen)
      if time.perf_counter() + step > deadline:
        break
      if more:
        seed_list = seed_list + [more.pop(0)]
        column, n = replay.scores(chosen, seed_list[-1:], result.maximize, stats)
        scores = np.hstack([scores, column])
      else:
        chosen = chosen + [extra.pop(0)]
        row, n = replay.scores(chosen[-1:], seed_list, result.maximize, stats)
        scores = np.vstack([scores, row])
      lane_steps += n
  mean = scores.mean(axis=1)
  # Best mean first; ties keep the search's order.
  order = sorted(range(len(chosen)), key=lambda i: (-mean[i] if result.maximize else mean[i], i))
  return Recheck(trials=[chosen[i] for i in order], seeds=seed_list, scores=scores[order], metric=result.metric,
                 maximize=result.maximize, lane_steps=lane_steps, seconds=time.perf_counter() - t0)


def _relative_cost(trial: Trial, timed: Sequence[Trial]) -> float:
  """``trial``'s measured time (``Trial.seconds``) over the mean of the
  ``timed`` trials': a config of a costlier shape costs more a pair than the
  pairs timed so far (1 where a time is missing)."""
  mean = sum(float(t.seconds or 0.0) for t in timed) / len(timed)
  own = float(trial.seconds or 0.0)
  return own / mean if own > 0 and mean > 0 else 1.0


#: With a ``timeout``, a re-check's time is estimated from its configs' own
#: trials (``Trial.seconds``, their measured share of the training time, per
#: seed) times this margin; the search holds that much of the time back. The
#: estimate is rough: over 14 searches (4 tasks, 10 s and 40 s, 2-core CPU)
#: the re-check took 0.41-1.57 of it without the margin (median 0.69), as a
#: trial's share is measured while the host works and, with several CPU
#: devices, while other programs run beside it. So a re-check cut to the time
#: left grows back towards its full size at its own measured pace
#: (:func:`recheck`).
MARGIN = 1.5
#: ... but never more than this share of the timeout: a size that does not fit
#: is cut (fewer seeds, then fewer configs, down to 2 x 2) or dropped.
MAX_SHARE = 1 / 6


def sizes(top: int, seeds: int) -> list[tuple[int, int]]:
  """``(top, seeds)`` and the smaller re-checks tried when it does not fit in
  the time: fewer seeds first (down to 2), then fewer configs (down to 2)."""
  out = [(top, seeds)]
  out += [(top, s) for s in range(seeds - 1, 1, -1)]
  out += [(k, min(seeds, 2)) for k in range(top - 1, 1, -1)]
  return out


def estimate(trials: Sequence[Trial], seeds: int, width=None) -> float:
  """Seconds to re-check ``trials`` with ``seeds`` seeds, from their own time.

  A trial's ``seconds`` is its share of its program's calls. Where idle lanes
  are skipped (CPU) the re-check costs its pairs' shares; where a program's
  lanes run together (``width(trial)`` gives ``(program, lanes)``), each
  program runs whole: its pairs rounded up to its width, each lane a share.
  """
  total, programs = 0.0, {}
  for t in trials:
    share = float(t.seconds or 0.0)
    key = width(t) if width is not None else None
    if key is None:
      total += seeds * share
    else:
      programs.setdefault(key, []).append(share)
  for (_, lanes), shares in programs.items():
    total += -(-len(shares) * seeds // lanes) * lanes * (sum(shares) / len(shares))
  return MARGIN * total


def fit(trials: Sequence[Trial], top: int, seeds: int, seconds: float, width=None) -> tuple[int, int] | None:
  """The largest of :func:`sizes` whose estimate fits in ``seconds``, or None
  (also with fewer than two trials: nothing to choose between)."""
  if len(trials) < 2:
    return None
  for k, s in sizes(top, seeds):
    if estimate(trials[:k], s, width) <= seconds:
      return min(k, len(trials)), s
  return None


def reserve(kept: Sequence[Trial], top: int, seeds: int, timeout: float, width=None) -> float:
  """Seconds a search with a ``timeout`` holds back for its re-check: the
  estimate of the largest size that fits in ``MAX_SHARE`` of the timeout, for
  the best trials so far (0 before two finished)."""
  size = fit(kept, top, seeds, timeout * MAX_SHARE, width)
  return estimate(kept[:size[0]], size[1], width) if size else 0.0


def settle(result, size: tuple[int, int] | None, *, requested: tuple[int, int], t_start: float,
           verbose: bool, deadline: float | None = None, batched: bool = False) -> None:
  """The re-check ``search(recheck=...)`` runs at its end, of ``size``
  (``(top, seeds)``; None: it did not fit in the time left; with a
  ``deadline`` it then grows towards ``requested`` while it has time): it sets
  ``result.rechecked`` (so ``best_trial`` is the best mean's trial) and keeps
  that trial's trained parameters for ``best_model()`` and ``save``."""
  if size is not None and len(result.top(2)) < 2:
    size = None  # one healthy trial: nothing to choose between
  if size is None:
    if verbose:
      print(f"vmaptune: no re-check (asked: the top {requested[0]} with {requested[1]} fresh seeds each): "
            "no time left for it, or fewer than two healthy trials; keeping the best score's trial",
            file=sys.stderr, flush=True)
    return
  top, seeds = size
  check = recheck(result, result._replay, top=top, seeds=seeds, stats=result.stats, grow=requested,
                  deadline=deadline, batched=batched)
  result.rechecked = check
  pick = result.best_trial
  kept = dict(result._best_params or {})
  if pick.id not in kept:  # a resumed search kept only its best trial's parameters: replay the pick exactly
    run = result._replay.run(pick, result.metric, result.maximize, result.stats)
    kept[pick.id] = (run.params, run.model_state)
  result._best_params = {pick.id: kept[pick.id]}
  result.stats.wall_seconds = time.perf_counter() - t_start
  if verbose:
    luckiest = result.ranked()[0]
    if not np.isfinite(check.mean[0]):
      why = "every config re-checked diverged on a seed, so the search's best score"
    elif pick.id == luckiest.id:
      why = f"mean {result.metric} {check.mean[0]:.5g}, also the search's best score"
    else:
      why = (f"mean {result.metric} {check.mean[0]:.5g}, not trial {luckiest.id} of the search's best score "
             f"{luckiest.score:.5g}")
    print(f"vmaptune: re-checked the top {len(check.trials)} configs with {len(check.seeds)} fresh seeds each "
          f"({check.seconds:.1f} s): keeping trial {pick.id} ({why})", file=sys.stderr, flush=True)
