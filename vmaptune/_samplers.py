"""Samplers beyond plain random: quasi-random (Sobol, Halton) and batched TPE.

Every sampler draws in sampling coordinates (log for ``loguniform``,
``log(1 - x)`` for ``reverse_loguniform``, linear otherwise), so a
space-filling design is space-filling on the scale that matters, and zoom
rounds fill the zoom box the same way.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from ._region import Region
from ._space import Choice, Distribution

__all__ = ["SAMPLERS", "qmc_values", "TPEProposer"]

SAMPLERS = ("random", "grid", "sobol", "halton", "tpe")


def _from_unit(d: Distribution, u: float, region) -> Any:
  if isinstance(d, Choice):
    values = d.values if region is None else tuple(region)
    return values[min(int(u * len(values)), len(values) - 1)]
  lo, hi = d.bounds() if region is None else region
  return d.from_coord(lo + u * (hi - lo))


def qmc_values(dists: Mapping[str, Distribution], n: int, region: Region, kind: str,
               seed: Sequence[int]) -> list[dict]:
  """``n`` scrambled Sobol or Halton points over ``dists`` inside ``region``.

  Args:
    kind: ``"sobol"`` or ``"halton"`` (``scipy.stats.qmc``).
    seed: entropy for the scrambling (the search seed and round).
  """
  names = list(dists)
  if not names:
    return [{} for _ in range(n)]
  from scipy.stats import qmc

  rng = np.random.default_rng(list(seed))
  if kind == "sobol":
    engine = qmc.Sobol(d=len(names), scramble=True, seed=rng)
    with warnings.catch_warnings():
      # Sobol's balance holds for powers of two; any n is still low-discrepancy.
      warnings.filterwarnings("ignore", message=".*balance properties.*")
      points = engine.random(n)
  elif kind == "halton":
    points = qmc.Halton(d=len(names), scramble=True, seed=rng).random(n)
  else:  # pragma: no cover - checked by the caller
    raise ValueError(kind)
  return [{k: _from_unit(dists[k], float(points[i, j]), region.get(k)) for j, k in enumerate(names)}
          for i in range(n)]


class TPEProposer:
  """Whole batches of configs from Optuna's TPE, by ask-and-tell.

  Each round asks for ``num_configs`` trials at once; ``constant_liar``
  makes TPE treat the ones already asked as bad, so one batch spreads out
  instead of asking for the same point 32 times. When the round is trained,
  the asked trials are closed and the configs actually trained (after the
  bucket cap) are told with their scores.

  Numeric hyperparameters are modelled in sampling coordinates, choices as
  categories.
  """

  def __init__(self, space: Mapping[str, Any], seed: int, maximize: bool):
    try:
      import optuna
    except ImportError:
      raise ImportError(
          "sampler='tpe' needs optuna; install it with `pip install 'vmaptune[optuna]'`."
      ) from None
    self.optuna = optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    self.dists = {k: v for k, v in space.items() if isinstance(v, Distribution)}
    self.optuna_dists = {}
    for k, d in self.dists.items():
      if isinstance(d, Choice):
        self.optuna_dists[k] = optuna.distributions.CategoricalDistribution(list(range(len(d.values))))
      else:
        lo, hi = d.bounds()
        self.optuna_dists[k] = optuna.distributions.FloatDistribution(lo, hi)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True,
                                         n_startup_trials=10)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # multivariate is "experimental"
      self.study = optuna.create_study(direction="maximize" if maximize else "minimize", sampler=sampler)
    self._asked: list = []

  def ask(self, n: int, fixed: Sequence[Mapping[str, Any]] | None = None) -> list[dict]:
    """``n`` proposals; ``fixed[i]`` (if given) pins some keys of proposal ``i``."""
    out = []
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      for i in range(n):
        trial = self.study.ask(self.optuna_dists)
        self._asked.append(trial)
        config = {}
        for k, d in self.dists.items():
          v = trial.params[k]
          config[k] = d.values[int(v)] if isinstance(d, Choice) else d.from_coord(float(v))
        if fixed is not None:
          config.update(fixed[i])
        out.append(config)
    return out

  def tell(self, configs: Sequence[Mapping[str, Any]], scores: Sequence[float], ok: Sequence[bool]) -> None:
    """Records the configs actually trained and their scores."""
    optuna = self.optuna
    for trial in self._asked:
      self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    self._asked = []
    for config, score, good in zip(configs, scores, ok):
      params = {}
      for k, d in self.dists.items():
        params[k] = d.values.index(config[k]) if isinstance(d, Choice) else float(
            min(max(d.to_coord(config[k]), d.bounds()[0]), d.bounds()[1]))
      finite = good and math.isfinite(score)
      self.study.add_trial(optuna.trial.create_trial(
          params=params, distributions=self.optuna_dists,
          value=float(score) if finite else None,
          state=optuna.trial.TrialState.COMPLETE if finite else optuna.trial.TrialState.FAIL,
      ))


def discrepancy(points: np.ndarray) -> float:
  """Centred L2 discrepancy of points in the unit cube (lower is more even)."""
  from scipy.stats import qmc

  return float(qmc.discrepancy(points, method="CD"))
