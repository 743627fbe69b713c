"""Validation by abstract tracing: errors in the model, loss or optimizer are
reported with the config that caused them, before anything compiles."""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from ._data import Dataset
from ._lane import LaneInputs, TrainSpec, lane_init, lane_step

__all__ = ["check_spec", "model_digest"]


def _abstract(tree, size: int | None = None):
  """Shapes of a data pytree, the leading axis replaced by ``size`` (or dropped)."""
  lead = () if size is None else (size,)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(lead + a.shape[1:], a.dtype), tree)


def _shapes(tree) -> str:
  return str(jax.tree.map(lambda a: tuple(a.shape), tree))


def _check_value(v, what: str, b: int, config) -> None:
  """A model-aware loss or metric: per-example ``(b,)``, a scalar, or ``(loss, aux)``."""
  if isinstance(v, tuple) and len(v) == 2:
    v = v[0]
  shape = getattr(v, "shape", None)
  if shape not in ((), (b,)):
    raise TypeError(f"`{what}` must return one value per example, shape ({b},), a scalar, or (loss, aux) with "
                    f"one of those first; got {shape if shape is not None else type(v).__name__} for a batch of "
                    f"{b} (config {config!r}).")


def _check_default_loss(out, y_abs, dataset: Dataset, b: int, config) -> None:
  if not hasattr(out, "shape"):
    raise TypeError(f"the model returns {type(out).__name__}, not one array, so the default loss does not apply "
                    f"(config {config!r}): give loss_fn=(outputs, targets) -> per-example loss, or model_loss=.")
  if dataset.task == "classification":
    k = dataset.num_classes
    if out.ndim != 2 or out.shape[0] != b:
      raise ValueError(
          f"with integer labels the model must output logits of shape (batch, num_classes); "
          f"it output {out.shape} for a batch of {b} (config {config!r}).")
    if out.shape[1] < k:
      raise ValueError(f"the model outputs {out.shape[1]} classes but the labels go up to {k - 1} (config {config!r}).")
  else:
    squeezed = out.shape[:-1] if out.ndim == y_abs.ndim + 1 and out.shape[-1] == 1 else out.shape
    if tuple(squeezed) != tuple(y_abs.shape):
      raise ValueError(
          f"the model outputs shape {out.shape} but the targets have shape {y_abs.shape}: "
          "they would broadcast. Make the output (batch,) or (batch, 1) for scalar targets.")


def check_spec(spec: TrainSpec, dataset: Dataset, custom_loss: bool) -> None:
  """Traces one lane abstractly to catch model and shape errors before compiling.

  Each stage is traced on its own (init, the model's call, the loss and
  metric, the optimizer step) so an error names the stage and the config that
  caused it, not a line deep inside XLA. On success the lane's abstract state
  is kept on the spec for memory estimates.
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
    if not custom_loss and objective.model_loss is None:
      _check_default_loss(out, y_abs, dataset, b, config)
    for fn, arg in ((objective.loss_fn, "loss_fn"), (objective.metric_fn, "metric")):
      if fn is None:
        continue
      try:
        v = jax.eval_shape(fn, out, y_abs)
      except Exception as err:
        raise ValueError(f"`{arg}` failed on outputs {_shapes(out)} and targets {_shapes(y_abs)}: "
                         f"{type(err).__name__}: {err}") from err
      if getattr(v, "shape", None) != (b,):
        raise TypeError(f"`{arg}` must return one value per example, shape ({b},), got "
                        f"{getattr(v, 'shape', type(v).__name__)}; vmaptune takes the mean itself.")
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
    _check_value(v, what, n, config)
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
    raise ValueError(f"optimizer {name} failed to initialise with injected hyperparameters {list(spec.injected)} "
                     f"(config {config!r}): {type(err).__name__}: {err}") from err
  try:
    jax.eval_shape(lambda s, d: lane_step(spec, s, d), state, _abstract(dataset.train, dataset.num_train))
  except Exception as err:
    raise ValueError(
        f"the training step failed to build (the gradient of the loss, then optimizer {name} with injected "
        f"hyperparameters {list(spec.injected)}; config {config!r}): {type(err).__name__}: {err}") from err
  # Kept for memory estimates: building an NNX model costs ~75 ms a trace.
  object.__setattr__(spec, "abstract_state", state)


def model_digest(spec) -> str:
  """The model's parameter and state structure (shapes, dtypes) at one signature."""
  shapes = jax.eval_shape(spec.adapter.init, jax.random.key(0))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  text = ";".join(f"{jax.tree_util.keystr(p)}:{a.shape}:{a.dtype}" for p, a in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
