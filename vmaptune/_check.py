"""Validation by abstract tracing: errors in the model, loss or optimizer are
reported with the config that caused them, before anything compiles."""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from ._data import Dataset
from ._lane import LaneInputs, TrainSpec, lane_init, lane_step
from ._objective import check_default_outputs, check_float_loss, check_per_example, check_value

__all__ = ["check_spec", "diagnose", "model_digest"]


def _abstract(tree, size: int | None = None):
  """Shapes of a data pytree, the leading axis replaced by ``size`` (or dropped)."""
  lead = () if size is None else (size,)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(lead + a.shape[1:], a.dtype), tree)


def _shapes(tree) -> str:
  return str(jax.tree.map(lambda a: tuple(a.shape), tree))


def check_spec(spec: TrainSpec, dataset: Dataset, custom_loss: bool) -> None:
  """Traces one lane abstractly, stage by stage, to name what failed.

  The training program validates itself as it is traced (the shape checks of
  ``_objective`` run inside it), so on the usual path nothing here runs. When
  tracing a program raises, this traces each stage on its own (init, the
  model's call, the loss and metric, the optimizer step) so the error names
  the stage and the config that caused it, not a line deep inside JAX.
  """
  objective = spec.objective
  b = spec.batch_size
  e = min(spec.eval_batch_size, dataset.num_val)
  config = spec.adapter.config
  key = jax.random.key(0)
  try:
    params, model_state = jax.eval_shape(spec.adapter.init, key)
  except Exception as err:
    if isinstance(err, (TypeError, ValueError)) and "model_fn" in str(err):
      raise
    raise ValueError(f"model_fn raised {type(err).__name__} while initialising config {config!r}: {err}") from err
  batch = _abstract(dataset.train, b)
  if objective.calls_model:
    x_abs, y_abs = batch
    try:
      out = jax.eval_shape(lambda p, s, x: spec.adapter.apply(p, s, x, True, key)[0], params, model_state, x_abs)
    except Exception as err:
      raise ValueError(f"the model for config {config!r} failed on inputs of shape {_shapes(x_abs)}: "
                       f"{type(err).__name__}: {err}") from err
    if objective.default_loss:
      check_default_outputs(out, y_abs, dataset.num_classes, config)
    for fn, arg in ((objective.loss_fn, "loss_fn"), (objective.metric_fn, "metric")):
      if fn is None:
        continue
      try:
        v = jax.eval_shape(fn, out, y_abs)
      except Exception as err:
        raise ValueError(f"`{arg}` failed on outputs {_shapes(out)} and targets {_shapes(y_abs)}: "
                         f"{type(err).__name__}: {err}") from err
      check_per_example(v, arg, b)
      if arg == "loss_fn":
        check_float_loss(v, arg)
  checks = []
  if objective.model_loss is not None:
    checks.append((objective.model_loss, "model_loss", True, batch, b))
  if objective.eval_fn is not None:
    name = "model_metric" if objective.model_metric is not None else "model_loss"
    checks.append((objective.eval_fn, name, False, _abstract(dataset.val, e), e))
  for fn, what, train, example, n in checks:
    try:
      v = jax.eval_shape(lambda p, s, d: spec.adapter.call(p, s, lambda m: fn(m, d), train, key)[0],
                         params, model_state, example)
    except Exception as err:
      raise ValueError(f"`{what}` failed on a batch of shapes {_shapes(example)} with the model "
                       f"{'in training' if train else 'in evaluation'} mode (config {config!r}): "
                       f"{type(err).__name__}: {err}") from err
    check_value(v, what, n, config)
    if train:
      check_float_loss(v, what)
  inputs = LaneInputs(
      seed=jax.ShapeDtypeStruct((), np.uint32),
      hparams={k: jax.ShapeDtypeStruct((), np.int32 if k in spec.int_injected else np.float32) for k in spec.injected},
      lr_decay=jax.ShapeDtypeStruct((), np.float32),
      budget=jax.ShapeDtypeStruct((), np.int32),
  )
  name = getattr(spec.routing.optimizer, "__name__", repr(spec.routing.optimizer))
  try:
    state = jax.eval_shape(lambda i: lane_init(spec, i), inputs)
  except Exception as err:
    traced = isinstance(err, jax.errors.ConcretizationTypeError)  # TracerBoolConversionError is one
    hint = (" The injected hyperparameters are traced per-lane arrays, not Python numbers: code that branches on"
            " one or needs it as an int (some optax schedules, e.g. warmup_cosine_decay_schedule with a searched"
            " peak) cannot take it. Build the schedule from parts that do (optax.join_schedules of"
            " linear_schedule and cosine_decay_schedule), or make the value a constant or a vt.choice of"
            " non-numeric options." if traced else "")
    raise ValueError(f"optimizer {name} failed to initialise with injected hyperparameters {list(spec.injected)} "
                     f"(config {config!r}): {type(err).__name__}: {err}{hint}") from err
  try:
    jax.eval_shape(lambda s, d: lane_step(spec, s, d), state, _abstract(dataset.train, dataset.num_train))
  except Exception as err:
    raise ValueError(
        f"the training step failed to build (the gradient of the loss, then optimizer {name} with injected "
        f"hyperparameters {list(spec.injected)}; config {config!r}): {type(err).__name__}: {err}") from err
  del state


def model_digest(spec) -> str:
  """The model's parameter and state structure (shapes, dtypes) at one signature."""
  shapes = jax.eval_shape(spec.adapter.init, jax.random.key(0))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  text = ";".join(f"{jax.tree_util.keystr(p)}:{a.shape}:{a.dtype}" for p, a in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def diagnose(spec: TrainSpec, dataset: Dataset, custom_loss: bool, error: BaseException) -> None:
  """Raises the clearest error for ``error``, raised while tracing ``spec``'s
  programs: the stage-by-stage one of :func:`check_spec` if it finds one,
  else ``error`` itself."""
  check_spec(spec, dataset, custom_loss)
  raise error
