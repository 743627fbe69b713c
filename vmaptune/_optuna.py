"""Exporting a search to an Optuna study, for Optuna's dashboard, plots and tools.

Each trial becomes a finished Optuna trial with the same parameters, score
and learning curve (as intermediate values), over distributions that match
the space:

============================  ===========================================
vmaptune                      Optuna
============================  ===========================================
``uniform(a, b)``             ``FloatDistribution(a, b)``
``loguniform(a, b)``          ``FloatDistribution(a, b, log=True)``
``reverse_loguniform(a, b)``  ``FloatDistribution(a, b)`` (Optuna has no
                              reverse-log scale; the study's and each
                              trial's ``sampling_scales`` user attribute
                              says ``"reverse_log"``)
``integer(a, b, log)``        ``IntDistribution(a, b, log=log)``
``choice(values)``            ``CategoricalDistribution(values)``; values
                              that are not None, bool, int, float or str
                              (tuples, functions) become their ``str``
============================  ===========================================

Stopped trials are ``TrialState.PRUNED``, valued at their last intermediate
value as Optuna values its own; diverged trials are ``TrialState.FAIL`` with
no value. Constants go to the
study's ``constants`` user attribute.
"""

from __future__ import annotations

import math
from typing import Any

from . import _space

__all__ = ["to_optuna"]

_OPTUNA_TYPES = (type(None), bool, int, float, str)


def _optuna():
  try:
    import optuna
  except ImportError:
    raise ImportError(
        "exporting to Optuna needs optuna; install it with `pip install 'vmaptune[optuna]'` "
        "(or `pip install optuna`)."
    ) from None
  return optuna


def _categorical(v: Any) -> Any:
  """A choice value as Optuna can store it: None, bool, int, float or str."""
  if isinstance(v, _OPTUNA_TYPES):
    return v
  if callable(v):
    return getattr(v, "__qualname__", None) or repr(v)
  return str(v)


def _json_value(v: Any) -> Any:
  """A value Optuna's storages accept as a user attribute (JSON)."""
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  if isinstance(v, _OPTUNA_TYPES):
    return v
  if isinstance(v, (list, tuple)):
    return [_json_value(x) for x in v]
  if isinstance(v, dict):
    return {str(k): _json_value(x) for k, x in v.items()}
  return _categorical(v)


def distribution(d: _space.Distribution):
  """The Optuna distribution matching a vmaptune one.

  >>> import vmaptune as vt
  >>> from vmaptune import _optuna
  >>> _optuna.distribution(vt.loguniform(1e-4, 1e-1))
  FloatDistribution(high=0.1, log=True, low=0.0001, step=None)
  """
  dists = _optuna().distributions
  if isinstance(d, _space.Choice):
    return dists.CategoricalDistribution([_categorical(v) for v in d.values])
  if isinstance(d, _space.Integer):
    return dists.IntDistribution(d.low, d.high, log=d.log)
  if isinstance(d, _space.LogUniform):
    return dists.FloatDistribution(d.low, d.high, log=True)
  if isinstance(d, (_space.Uniform, _space.ReverseLogUniform)):
    return dists.FloatDistribution(d.low, d.high)
  raise TypeError(f"no Optuna distribution for {d!r}.")


def to_optuna(result, storage=None, study_name: str | None = None):
  """An ``optuna.Study`` holding every trial of ``result``.

  Each trial keeps its parameters, its final score as the value and its
  validation curve as intermediate values (step -> score, non-finite
  evaluations left out); stopped trials are ``PRUNED`` (valued at their
  last intermediate value), diverged trials ``FAIL`` with no value. Trial
  user attributes: ``vmaptune_trial``, ``round``, ``lane``, ``seed``,
  ``parent``, ``status``, ``steps``,
  ``diverged_at`` and ``sampling_scales``. Study user attributes:
  ``metric``, ``constants``, ``sampling_scales``, ``vmaptune_options``.

  Args:
    result: a :class:`~vmaptune.SearchResult`.
    storage: an Optuna storage or URL (``"sqlite:///search.db"``); None keeps
      the study in memory.
    study_name: the study's name; None lets Optuna pick one.

  Returns:
    An ``optuna.Study`` with direction ``"maximize"`` or ``"minimize"`` as
    the metric.

  >>> from vmaptune import _optuna
  >>> from vmaptune._demo import example_result
  >>> study = _optuna.to_optuna(example_result())
  >>> len(study.trials), study.direction.name
  (40, 'MINIMIZE')
  """
  optuna = _optuna()
  from optuna.trial import TrialState

  dists = _space.searched(result.space)
  distributions = {k: distribution(d) for k, d in dists.items()}
  scales = {k: d.scale for k, d in dists.items()}
  converted = sorted(
      k for k, d in dists.items()
      if isinstance(d, _space.Choice) and any(not isinstance(v, _OPTUNA_TYPES) for v in d.values)
  )
  frozen = []
  for t in result.trials:
    params = {k: _categorical(t.config[k]) if isinstance(dists[k], _space.Choice) else t.config[k]
              for k in dists}
    finished = t.status == "ok" and math.isfinite(t.score)
    steps = list(getattr(t, "curve_steps", []))
    values = list(getattr(t, "curve", []))
    intermediate = {int(s): float(v) for s, v in zip(steps, values) if math.isfinite(float(v))}
    user_attrs = dict(
        vmaptune_trial=int(t.id), round=int(t.round), lane=int(t.lane), seed=int(t.seed),
        parent=None if t.parent is None else int(t.parent), status=t.status, steps=int(t.steps),
        diverged_at=None if t.diverged_at is None else int(t.diverged_at), sampling_scales=scales,
    )
    # A stopped trial is Optuna's pruned one, valued as Optuna values those:
    # its last intermediate value.
    pruned = t.status == "stopped" and bool(intermediate)
    state = TrialState.COMPLETE if finished else TrialState.PRUNED if pruned else TrialState.FAIL
    value = float(t.score) if finished else intermediate[max(intermediate)] if pruned else None
    frozen.append(optuna.trial.create_trial(
        state=state, value=value,
        params=params, distributions=distributions, user_attrs=user_attrs,
        intermediate_values=intermediate,
    ))
  study = optuna.create_study(storage=storage, study_name=study_name,
                              direction="maximize" if result.maximize else "minimize")
  study.set_user_attr("metric", str(result.metric))
  study.set_user_attr("constants", {k: _json_value(v) for k, v in _space.constants(result.space).items()})
  study.set_user_attr("sampling_scales", scales)
  study.set_user_attr("vmaptune_options", _json_value(dict(result.options)))
  if converted:
    study.set_user_attr("choices_as_str", converted)
  study.add_trials(frozen)
  return study
