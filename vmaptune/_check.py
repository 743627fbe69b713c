"""Validation by abstract tracing: errors in the model, loss or optimizer are
reported with the config that caused them, before anything compiles."""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from ._data import Dataset
from ._lane import LaneInputs, TrainSpec, lane_init, lane_step

__all__ = ["check_spec", "model_digest"]


def check_spec(spec: TrainSpec, dataset: Dataset, custom_loss: bool) -> None:
  """Traces one lane abstractly to catch model and shape errors before compiling.

  Each stage is traced on its own (init, the model's call, the loss and
  metric, the optimizer step) so an error names the stage and the config that
  caused it, not a line deep inside XLA. On success the lane's abstract state
  is kept on the spec for memory estimates.
  """
  objective = spec.objective
  b = spec.batch_size
  x_abs = jax.ShapeDtypeStruct((b,) + dataset.x_train.shape[1:], dataset.x_train.dtype)
  y_abs = jax.ShapeDtypeStruct((b,) + dataset.y_train.shape[1:], dataset.y_train.dtype)
  config = spec.adapter.config
  key = jax.random.key(0)
  try:
    params, model_state = jax.eval_shape(spec.adapter.init, key)
  except (TypeError, ValueError) as e:
    if "model_fn" in str(e):
      raise
    raise ValueError(f"model_fn raised {type(e).__name__} while initialising config {config!r}: {e}") from e
  except Exception as e:
    raise ValueError(f"model_fn raised {type(e).__name__} while initialising config {config!r}: {e}") from e
  try:
    out = jax.eval_shape(lambda p, s, x: spec.adapter.apply(p, s, x, True, key)[0], params, model_state, x_abs)
  except Exception as e:
    raise ValueError(
        f"the model for config {config!r} failed on a batch of shape {x_abs.shape} "
        f"({x_abs.dtype}): {type(e).__name__}: {e}"
    ) from e
  if not hasattr(out, "shape"):
    raise TypeError(f"the model must return one array, got {type(out).__name__} for config {config!r}.")
  if not custom_loss:
    if dataset.task == "classification":
      k = dataset.num_classes
      if out.ndim != 2 or out.shape[0] != b:
        raise ValueError(
            f"with integer labels the model must output logits of shape (batch, num_classes); "
            f"it output {out.shape} for a batch of {b} (config {config!r})."
        )
      if out.shape[1] < k:
        raise ValueError(
            f"the model outputs {out.shape[1]} classes but the labels go up to {k - 1} "
            f"(config {config!r})."
        )
    else:
      squeezed = out.shape[:-1] if out.ndim == y_abs.ndim + 1 and out.shape[-1] == 1 else out.shape
      if tuple(squeezed) != tuple(y_abs.shape):
        raise ValueError(
            f"the model outputs shape {out.shape} but the targets have shape {y_abs.shape}: "
            "they would broadcast. Make the output (batch,) or (batch, 1) for scalar targets."
        )
  for fn, arg in ((objective.loss_fn, "loss_fn"), (objective.metric_fn, "metric")):
    try:
      v = jax.eval_shape(fn, out, y_abs)
    except Exception as e:
      raise ValueError(f"`{arg}` failed on outputs {out.shape} and targets {y_abs.shape}: {e}") from e
    if getattr(v, "shape", None) != (b,):
      raise TypeError(
          f"`{arg}` must return one value per example, shape ({b},), got "
          f"{getattr(v, 'shape', v)}; vmaptune takes the mean itself."
      )
  inputs = LaneInputs(
      seed=jax.ShapeDtypeStruct((), np.uint32),
      hparams={k: jax.ShapeDtypeStruct((), np.int32 if k in spec.int_injected else np.float32) for k in spec.injected},
      lr_decay=jax.ShapeDtypeStruct((), np.float32),
      budget=jax.ShapeDtypeStruct((), np.int32),
  )
  try:
    state = jax.eval_shape(lambda i: lane_init(spec, i), inputs)
    train = (jax.ShapeDtypeStruct(dataset.x_train.shape, dataset.x_train.dtype),
             jax.ShapeDtypeStruct(dataset.y_train.shape, dataset.y_train.dtype))
    jax.eval_shape(lambda s, d: lane_step(spec, s, d), state, train)
    # Kept for memory estimates: building an NNX model costs ~75 ms a trace.
    object.__setattr__(spec, "abstract_state", state)
  except Exception as e:
    name = getattr(spec.routing.optimizer, "__name__", repr(spec.routing.optimizer))
    raise ValueError(
        f"training step failed to build with optimizer {name} and injected "
        f"hyperparameters {list(spec.injected)} (config {config!r}): {type(e).__name__}: {e}"
    ) from e


def model_digest(spec) -> str:
  """The model's parameter and state structure (shapes, dtypes) at one signature."""
  shapes = jax.eval_shape(spec.adapter.init, jax.random.key(0))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  text = ";".join(f"{jax.tree_util.keystr(p)}:{a.shape}:{a.dtype}" for p, a in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
