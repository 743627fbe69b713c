"""``train``: one config alone, no population (babysitting one model)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax

from . import _devices, _options
from ._lane import TrainSpec, stack_inputs
from ._plan import Plan
from ._placement import lane_params, place_data
from ._population import Slot
from ._progress import Progress
from ._space import Distribution
from ._strategy import NewTrial
from ._trial import Run

__all__ = ["train", "TrainState"]


class TrainState:
  """What a :func:`train` callback sees after each evaluation.

  >>> import numpy as np, vmaptune as vt
  >>> def halve_at_100(state):  # babysitting: halve the learning rate once
  ...   if state.step == 100:
  ...     return {"learning_rate": state.hyperparams["learning_rate"] / 2}

  Attributes:
    step: steps taken.
    score: the latest validation score.
    curve, curve_steps, train_curve: the curves so far.
    hyperparams: the optimizer's current injected hyperparameters.
    diverged: whether the run has diverged.
  """

  def __init__(self, step, score, curve, curve_steps, train_curve, hyperparams, diverged):
    self.step = step
    self.score = score
    self.curve = curve
    self.curve_steps = curve_steps
    self.train_curve = train_curve
    self.hyperparams = hyperparams
    self.diverged = diverged

  def __repr__(self) -> str:
    return f"TrainState(step={self.step}, score={self.score:.6g}, hyperparams={self.hyperparams})"


def train(
    model_fn: Callable,
    data: Any,
    config: Mapping[str, Any],
    *,
    optimizer: Any = optax.adam,
    seed: int = 0,
    num_steps: int | None = None,
    epochs: float | None = None,
    metric: str | Callable = "loss",
    direction: str | None = None,
    loss_fn: Callable | None = None,
    model_loss: Callable | None = None,
    model_metric: Callable | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    eval_every: int | None = None,
    lr_schedule: str = "inverse_time",
    precision: str | None = None,
    eval_batch_size: int | None = None,
    callback: Callable[[TrainState], Mapping[str, Any] | None] | None = None,
    schedule: Sequence[tuple[int, Mapping[str, Any]]] | None = None,
    device: Any = None,
    compilation_cache: bool | str | None = None,
    verbose: bool = True,
) -> Run:
  """Trains one config alone, no population: babysitting one model.

  The same per-lane code as :func:`search`, jitted for a single lane (no
  ``vmap``). Results match the config's lane in a search to rounding, not bit
  for bit: XLA picks other kernels for a batched program (see README); use
  ``SearchResult.retrain`` for an exact replay.

  Args:
    model_fn, data, optimizer, num_steps, epochs, metric, direction, loss_fn,
      model_loss, model_metric, val_fraction, eval_every, lr_schedule,
      precision, eval_batch_size: as in :func:`search`.
    config: one value per hyperparameter (no distributions), e.g.
      ``result.best_config``.
    seed: the trial seed (init, data order, dropout), e.g.
      ``result.best_trial.seed``.
    split_seed: the seed of the train/validation split; pass the search's
      ``seed`` to score on the search's validation set (default 0, the
      search's default).
    callback: called after every evaluation with a :class:`TrainState`; it may
      return a dict of new values for injected optimizer hyperparameters (e.g.
      ``{"learning_rate": s.hyperparams["learning_rate"] / 2}``), applied from
      the next step in the same compiled program, or ``{"stop": True}``.
    schedule: hyperparameter changes over time, ``[(step, {name: value}), ...]``
      (e.g. a PBT trial's ``trial.schedule``): from ``step`` on, the values
      apply. Steps must be multiples of ``eval_every``.
    device: the device to train on (default: the first).
    compilation_cache: as in :func:`search` (default: on).
    verbose: progress bar with the latest validation score.

  Returns:
    A :class:`Run`.

  Example:
    >>> import numpy as np, vmaptune as vt
    >>> from flax import nnx
    >>> x = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    >>> y = x.sum(axis=1)
    >>> run = vt.train(lambda c, rngs: nnx.Linear(3, 1, rngs=rngs), (x, y),
    ...                {"learning_rate": 0.05}, num_steps=200, verbose=False)
    >>> run.status, run.score < 0.05
    ('ok', True)
  """
  if not isinstance(config, Mapping):
    raise TypeError(f"`config` must be a dict of hyperparameter values, got {type(config).__name__}.")
  for k, v in config.items():
    if isinstance(v, Distribution):
      raise TypeError(f"config[{k!r}] is a distribution; vt.train takes one value per hyperparameter (use vt.search to sample).")
  _options.int_arg("split_seed", split_seed, low=0)
  c = _options.parse_common(
      model_fn, data, dict(config), optimizer, metric, direction, loss_fn,
      val_fraction, split_seed, lr_schedule, eval_every, eval_batch_size, precision, empty_ok=True,
      model_loss=model_loss, model_metric=model_metric)
  config = dict(config)
  _options.int_arg("seed", seed, low=0)
  num_steps, epochs = _options.budget_args(num_steps, epochs)
  if callback is not None and not callable(callback):
    raise TypeError(f"`callback` must be callable, got {callback!r}.")
  if not isinstance(verbose, bool):
    raise TypeError(f"`verbose` must be a bool, got {verbose!r}.")
  planned = _check_schedule(schedule, config)
  _options.check_cache_arg(compilation_cache)
  _devices.use_compilation_cache(compilation_cache)
  plan = Plan(model_fn=model_fn, routing=c.routing, dataset=c.dataset, objective=c.objective,
              custom_loss=c.custom_loss, num_steps=num_steps, epochs=epochs, eval_every=c.eval_every,
              eval_batch_size=c.eval_batch_size, precision=c.precision,
              devices=[device if device is not None else jax.local_devices()[0]], lane_batch=None)
  program = plan.single_program(c.routing.signature(config))
  spec = program.spec
  steps, eval_every, evals = plan.schedule(spec)
  if c.eval_every is None and any(at % eval_every for at in planned):
    # No eval_every given: the largest step at most the default's that reaches
    # every change (a PBT schedule changes at multiples of its `ready`, not of
    # a tenth of the run), unless it would evaluate four times as often.
    g = math.gcd(*planned)
    plan.eval_every = max(d for d in range(1, min(g, eval_every) + 1) if g % d == 0)
    if plan.eval_every * 4 < eval_every:
      raise ValueError(f"`schedule` changes at steps {sorted(planned)}, which no evaluation interval near the "
                       f"default {eval_every} reaches; pass eval_every= dividing every step of the schedule.")
    steps, eval_every, evals = plan.schedule(spec)
  for at in planned:
    if at % eval_every:
      raise ValueError(f"`schedule` step {at} is not a multiple of eval_every={eval_every}.")
  inputs = stack_inputs([seed], [{k: config[k] for k in spec.injected}], [float(config.get("lr_decay", 0.0))],
                        [steps], spec)
  try:
    state = program.init(jax.tree.map(lambda a: a[0], inputs))
  except Exception as e:  # noqa: BLE001 - diagnosed stage by stage
    plan.diagnose(spec, e)
  data = place_data(c.dataset, plan.eval_batch_size, plan.mesh)
  slot = Slot(NewTrial(0, config, seed, 0), 0, 0, 0, steps, evals)
  try:
    tier = program.tier(state, data, eval_every, steps)
  except Exception as e:  # noqa: BLE001 - a tracing error, diagnosed stage by stage
    plan.diagnose(spec, e)
  progress = Progress(c.objective.metric_name, verbose, unit="steps")
  progress.start("train", steps)
  scores, losses, at = slot.curve, slot.train_curve, slot.curve_steps
  try:
    for e in range(evals):
      try:
        state, (score, loss, step) = program.advance(state, data, eval_every, tier)
      except Exception as err:  # noqa: BLE001 - a tracing error, diagnosed stage by stage
        if e == 0:
          plan.diagnose(spec, err)
        raise
      scores.append(float(score)); losses.append(float(loss)); at.append(int(step))
      progress.advance(at[-1], scores[-1])
      if at[-1] in planned:
        state = _apply_changes(state, spec, planned[at[-1]])
      if callback is not None:
        hp = {k: float(v) for k, v in getattr(state.opt_state, "hyperparams", {}).items()} if spec.injected or spec.schedule else {}
        changes = callback(TrainState(at[-1], scores[-1], np.asarray(scores), np.asarray(at),
                                      np.asarray(losses), hp, int(state.diverged_at) >= 0))
        if changes is not None and not isinstance(changes, Mapping):
          raise TypeError(f"`callback` must return None or a dict of changes (such as {{'learning_rate': 1e-4}} "
                          f"or {{'stop': True}}), got {changes!r}.")
        if changes:
          if changes.get("stop"):
            break
          state = _apply_changes(state, spec, changes, current=True)
  finally:
    progress.close()
  slot.diverged_at = int(state.diverged_at)
  r = slot.to_trial("ok", c.objective.maximize)
  params, model_state = lane_params(jax.tree.map(lambda a: a[None], state), 0)
  return Run(config=config, seed=seed, score=r.score, curve=r.curve, curve_steps=r.curve_steps,
             train_curve=r.train_curve, status=r.status, diverged_at=r.diverged_at, steps=r.steps, params=params,
             model_state=model_state, adapter=spec.adapter, metric_name=c.objective.metric_name,
             maximize=c.objective.maximize)


def _apply_changes(state, spec: TrainSpec, changes: Mapping[str, Any], current: bool = False):
  """``changes`` applied from the next step. Under an ``lr_decay`` schedule a
  ``learning_rate`` is the base rate the schedule decays (a PBT schedule's
  values), or with ``current`` the rate in place of the last step's, which
  the callback sees in ``hyperparams``: returning it unchanged changes
  nothing, half of it halves the schedule from there on."""
  hp = dict(state.opt_state.hyperparams) if hasattr(state.opt_state, "hyperparams") else {}
  unknown = [k for k in changes if k not in hp and k not in ("stop", "lr_decay")]
  if unknown:
    raise ValueError(
        f"callback returned changes for {unknown}; only injected optimizer "
        f"hyperparameters can change: {sorted(hp)}."
    )
  for k, v in changes.items():
    value = v if k == "stop" else np.asarray(v) if isinstance(v, (numbers.Real, np.ndarray, jax.Array)) else None
    if k != "stop" and (value is None or value.ndim != 0 or value.dtype.kind not in "iuf"
                        or not np.isfinite(value) or (k in ("learning_rate", "lr_decay") and value < 0)):
      raise ValueError(f"callback changes {k!r} to {v!r}; give a finite number"
                       + (" >= 0." if k in ("learning_rate", "lr_decay") else "."))
  lr0, lr_decay = state.lr0, state.lr_decay
  for k, v in changes.items():
    if k == "stop":
      continue
    if k == "lr_decay":
      if spec.schedule is None:
        raise ValueError("changes to 'lr_decay' need lr_decay in the config from the start.")
      lr_decay = jax.device_put(np.asarray(v, np.float32), lr_decay.sharding)
      continue
    # Committed to the same device as before: an uncommitted array would
    # change the jit cache key and recompile the program.
    hp[k] = jax.device_put(np.asarray(v, hp[k].dtype), hp[k].sharding)
  if "learning_rate" in changes and spec.schedule is not None:
    base = float(changes["learning_rate"])
    if current:  # this rate in place of the last step's (which the callback saw): the schedule goes on from it
      epoch = max(int(state.step) - 1, 0) // spec.steps_per_epoch
      decay = float(lr_decay)
      base *= (1.0 + decay * epoch) if spec.schedule == "inverse_time" else math.exp(decay * epoch)
    lr0 = jax.device_put(np.asarray(base, np.float32), lr0.sharding)
  return state._replace(opt_state=state.opt_state._replace(hyperparams=hp), lr0=lr0, lr_decay=lr_decay)


def _check_schedule(schedule, config) -> dict[int, dict]:
  """``{step: changes}`` from a ``[(step, config), ...]`` schedule (the first entry
  may repeat the starting config); only changed values are kept."""
  if schedule is None:
    return {}
  try:
    entries = [(int(step), dict(values)) for step, values in schedule]
  except (TypeError, ValueError):
    raise TypeError("`schedule` must be a list of (step, {name: value}) pairs.") from None
  out, current = {}, dict(config)
  for step, values in sorted(entries, key=lambda e: e[0]):
    if step < 0:
      raise ValueError(f"`schedule` steps must be >= 0, got {step}.")
    changes = {k: v for k, v in values.items() if current.get(k) != v}
    for k in changes:
      if k not in config:
        raise ValueError(f"`schedule` changes {k!r}, which is not in `config`.")
    if step == 0 and changes:
      raise ValueError(f"`schedule` changes {sorted(changes)} at step 0; put them in `config`.")
    current.update(values)
    if changes:
      out[step] = changes
  return out
