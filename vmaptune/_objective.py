"""What a lane minimises and how it is scored: the two forms of a loss.

* ``loss_fn(outputs, targets)``: a function of what the model returned for
  ``x`` (any pytree: an array, ``(recon, mean, logvar)``, ...) and ``y``,
  returning one value per example, shape ``(batch,)``. vmaptune calls the
  model: ``model(x)``, ``model(*x)`` for a tuple, ``model(**x)`` for a dict.
* ``model_loss(model, batch)``: a function of the lane's model (an NNX
  module in train or eval mode; a bound Linen module) and its mini-batch, as
  Flax's NNX tutorials write it. It returns per-example values ``(batch,)``,
  a scalar, or ``(loss, aux)``. It may call the model any way it likes,
  differentiate it (PINNs), pop what the model stored (a VAE's KL term).

The two forms have keywords of their own (``loss_fn=`` / ``model_loss=``,
``metric=`` / ``model_metric=``), so they are never confused; a function
whose first argument is named like the other form's is refused with a hint.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ._trial import user_stacklevel

__all__ = ["Objective", "resolve_objective", "cross_entropy", "squared_error", "accuracy", "mean_value",
           "check_value", "check_per_example", "check_default_outputs"]

_MODEL_NAMES = ("model", "module", "net", "network", "mdl")
_OUTPUT_NAMES = ("outputs", "output", "out", "logits", "preds", "pred", "predictions", "prediction", "y_pred",
                 "y_hat", "yhat", "recon")


def _squeeze_like(out: jax.Array, y: jax.Array) -> jax.Array:
  # A regression head of shape (n, 1) against targets (n,) must be squeezed,
  # never broadcast to (n, n).
  if out.ndim == y.ndim + 1 and out.shape[-1] == 1:
    return out[..., 0]
  return out


def cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy against integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), y)


def squared_error(out: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example squared error (mean over non-example axes)."""
  d = _squeeze_like(out, y).astype(jnp.float32) - y.astype(jnp.float32)
  d = d * d
  return d.reshape(d.shape[0], -1).mean(axis=1)


def accuracy(out: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example 1.0 where ``argmax(out) == y``."""
  return (jnp.argmax(out, axis=-1) == y).astype(jnp.float32)


def check_value(v: Any, what: str, b: int, config: Any = None) -> None:
  """A model-aware loss or metric's value: ``(b,)``, a scalar, or ``(loss, aux)``
  with one of those first. Checked at trace time (shapes are static)."""
  if isinstance(v, tuple) and len(v) == 2:
    v = v[0]
  shape = getattr(v, "shape", None)
  if shape not in ((), (b,)):
    raise TypeError(f"`{what}` must return one value per example, shape ({b},), a scalar, or (loss, aux) with "
                    f"one of those first; got {shape if shape is not None else type(v).__name__} for a batch of "
                    f"{b}" + (f" (config {config!r})." if config is not None else "."))


def check_per_example(v: Any, what: str, b: int) -> None:
  """An ``(outputs, targets)`` loss or metric's value: exactly ``(b,)``."""
  if getattr(v, "shape", None) != (b,):
    raise TypeError(f"`{what}` must return one value per example, shape ({b},), got "
                    f"{getattr(v, 'shape', type(v).__name__)}; vmaptune takes the mean itself.")


def check_float_loss(v: Any, what: str) -> None:
  """A loss to differentiate: floating point (an integer loss has no
  gradient, and its lanes would train nothing)."""
  if isinstance(v, tuple) and len(v) == 2:
    v = v[0]
  dtype = getattr(v, "dtype", None)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(f"`{what}` must return a floating-point loss to differentiate, got dtype {dtype}; an integer "
                    "or boolean loss (a count of errors) has no gradient. Return e.g. a cross-entropy, or "
                    ".astype(jnp.float32) if the values are meant.")


def check_default_outputs(out: Any, y: Any, num_classes: int | None, config: Any = None) -> None:
  """The model's outputs against the default loss (cross-entropy with integer
  labels, squared error with float targets): shapes that would silently
  broadcast or miss classes are refused."""
  where = f" (config {config!r})" if config is not None else ""
  if not hasattr(out, "shape"):
    raise TypeError(f"the model returns {type(out).__name__}, not one array, so the default loss does not apply"
                    f"{where}: give loss_fn=(outputs, targets) -> per-example loss, or model_loss=.")
  b = y.shape[0]
  if num_classes is not None or jnp.issubdtype(y.dtype, jnp.integer):
    if out.ndim != 2 or out.shape[0] != b:
      raise ValueError(f"with integer labels the model must output logits of shape (batch, num_classes); "
                       f"it output {out.shape} for a batch of {b}{where}.")
    if num_classes is not None and out.shape[1] < num_classes:
      hint = (" For two classes, output 2 logits, or keep one and give loss_fn=lambda out, y: "
              "optax.sigmoid_binary_cross_entropy(out[:, 0], y.astype(out.dtype))."
              if out.shape[1] == 1 and num_classes == 2 else "")
      raise ValueError(f"the model outputs {out.shape[1]} classes but the labels go up to {num_classes - 1}{where}."
                       + hint)
  else:
    squeezed = out.shape[:-1] if out.ndim == y.ndim + 1 and out.shape[-1] == 1 else out.shape
    if tuple(squeezed) != tuple(y.shape):
      raise ValueError(f"the model outputs shape {out.shape} but the targets have shape {y.shape}: "
                       "they would broadcast. Make the output "
                       + (f"{('batch',) + tuple(y.shape[1:])}." if y.ndim > 1 else
                          "(batch,) or (batch, 1) for scalar targets."))


def mean_value(value: Any, what: str) -> jax.Array:
  """The scalar a loss or metric of either form stands for: the mean of
  per-example values, a scalar as it is, the first of ``(loss, aux)``."""
  if isinstance(value, tuple) and len(value) == 2:
    value = value[0]
  value = jnp.asarray(value)
  if value.ndim == 1:
    return jnp.mean(value.astype(jnp.float32))
  if value.ndim == 0:
    return value.astype(jnp.float32)
  raise TypeError(f"`{what}` must return one value per example, shape (batch,), a scalar, or (loss, aux); "
                  f"got shape {value.shape}.")


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a lane minimises in training and how it is scored on validation.

  Exactly one of ``loss_fn`` / ``model_loss`` is set, and at most one of
  ``metric_fn`` / ``model_metric`` (neither: the validation score is the
  model-aware loss itself, in evaluation mode).

  Attributes:
    loss_fn: ``(outputs, targets) -> per-example loss``, shape ``(batch,)``.
    metric_fn: ``(outputs, targets) -> per-example value``; the validation
      score is its mean over the validation set.
    model_loss: ``(model, batch) -> per-example values, a scalar or (loss, aux)``.
    model_metric: the same form, scored on validation batches.
    metric_name: a name for tables.
    maximize: whether a larger score is better.
  """

  loss_fn: Callable | None
  metric_fn: Callable | None
  metric_name: str
  maximize: bool
  model_loss: Callable | None = None
  model_metric: Callable | None = None
  default_loss: bool = False

  @property
  def eval_fn(self) -> Callable | None:
    """The model-aware function scoring validation batches, if any."""
    if self.metric_fn is not None:
      return None
    return self.model_metric or self.model_loss

  @property
  def calls_model(self) -> bool:
    """Whether vmaptune calls the model on ``x`` itself (an ``(outputs, targets)`` form is used)."""
    return self.loss_fn is not None or self.metric_fn is not None


def _positional(fn: Callable) -> list[inspect.Parameter] | None:
  try:
    return [p for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
  except (TypeError, ValueError):
    return None


def _check_form(fn: Callable, arg: str, model_aware: bool) -> None:
  """Refuses a function whose signature says it is of the other form."""
  params = _positional(fn)
  if params is None:
    return
  if len(params) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
    takes = "(model, batch)" if model_aware else "(outputs, targets)"
    raise TypeError(f"`{arg}` must take {takes}, got a function of {len(params)} argument(s).")
  first = params[0].name.lower() if params else ""
  if not model_aware and first in _MODEL_NAMES:
    other = "model_loss" if arg == "loss_fn" else "model_metric"
    raise TypeError(f"`{arg}` takes (outputs, targets), but {getattr(fn, '__name__', arg)}({params[0].name}, ...) "
                    f"looks like a function of the model and a batch: pass it as {other}= instead.")
  if model_aware and first in _OUTPUT_NAMES:
    other = "loss_fn" if arg == "model_loss" else "metric"
    raise TypeError(f"`{arg}` takes (model, batch), but {getattr(fn, '__name__', arg)}({params[0].name}, ...) "
                    f"looks like a function of the model's outputs and the targets: pass it as {other}= instead.")


# Names of metrics that are higher for better models.
_HIGHER_IS_BETTER = re.compile(r"(^|_)(acc|accuracy|f1|auc|roc_auc|precision|recall|r2|iou|dice|bleu|correct)(_|$)",
                               re.IGNORECASE)
_LOWER_IS_BETTER = re.compile(r"loss|err|incorrect|wrong|miss", re.IGNORECASE)


def _check_unset_direction(fn: Callable, what: str, direction: Any) -> None:
  """A callable metric is minimized unless ``direction`` says otherwise:
  one named like accuracy without it would keep the worst model."""
  name = getattr(fn, "__name__", "")
  if direction is None and _HIGHER_IS_BETTER.search(name) and not _LOWER_IS_BETTER.search(name):
    warnings.warn(
        f"`{what}` {name!r} is minimized, as every callable metric is unless `direction` is given, so the "
        "search keeps its lowest value. If higher is better, pass direction='maximize' (direction='minimize' "
        "silences this).", UserWarning, stacklevel=user_stacklevel())


def resolve_objective(task: str, loss_fn: Any, metric: Any, direction: Any, model_loss: Any = None,
                      model_metric: Any = None, paired: bool = True) -> Objective:
  """Picks the loss and metric from the task and the user's options."""
  if loss_fn is not None and model_loss is not None:
    raise ValueError("give either `loss_fn` (a function of outputs and targets) or `model_loss` "
                     "(a function of the model and a batch), not both.")
  if model_loss is not None:
    if not callable(model_loss):
      raise TypeError(f"`model_loss` must be a callable (model, batch) -> loss, got {model_loss!r}.")
    _check_form(model_loss, "model_loss", True)
    loss = None
  elif loss_fn is None:
    if task == "custom":
      raise ValueError("the targets `y` are neither class labels of shape (n,) nor one float array (they are "
                       "integers of more dimensions, or a pytree), so there is no default loss: give "
                       "loss_fn=(outputs, targets) -> per-example loss, or model_loss=(model, batch) -> loss. "
                       "(Class labels of shape (n, 1): pass y.ravel().)")
    loss = cross_entropy if task == "classification" else squared_error
  elif callable(loss_fn):
    _check_form(loss_fn, "loss_fn", False)
    loss = loss_fn
  else:
    raise TypeError(f"`loss_fn` must be a callable (outputs, targets) -> per-example loss, got {loss_fn!r}.")
  if direction not in (None, "minimize", "maximize"):
    raise ValueError(f"`direction` must be None, 'minimize' or 'maximize', got {direction!r}.")
  if model_metric is not None:
    if not callable(model_metric):
      raise TypeError(f"`model_metric` must be a callable (model, batch) -> values, got {model_metric!r}.")
    if metric != "loss":
      raise ValueError("give either `metric` or `model_metric`, not both.")
    _check_form(model_metric, "model_metric", True)
    _check_unset_direction(model_metric, "model_metric", direction)
    return Objective(loss, None, getattr(model_metric, "__name__", "metric"), direction == "maximize",
                     model_loss, model_metric)
  if isinstance(metric, str):
    if metric == "loss":
      fn, name, maximize = loss, "loss", False
    elif metric == "accuracy":
      if task != "classification":
        raise ValueError(
            "metric='accuracy' needs integer class labels as `y` in `data`, but y is "
            + ("float (a regression target)" if task == "regression" else "not one integer array")
            + (". Score with model_metric=(model, batch) -> per-example accuracy, or use metric='loss'."
               if model_loss is not None else ". Use metric='loss', or for one-hot or smoothed labels a callable: "
               "metric=lambda out, y: (out.argmax(-1) == y.argmax(-1)).astype(jnp.float32), direction='maximize'."))
      fn, name, maximize = accuracy, "accuracy", True
    else:
      raise ValueError(
          f"`metric` must be 'loss', 'accuracy' or a callable "
          f"(outputs, targets) -> per-example value, got {metric!r}.")
    if direction is not None and (direction == "maximize") != maximize:
      raise ValueError(f"metric={metric!r} is {'maximized' if maximize else 'minimized'}; drop `direction` "
                       "or use a callable metric.")
  elif callable(metric):
    _check_form(metric, "metric", False)
    _check_unset_direction(metric, "metric", direction)
    fn = metric
    name = getattr(metric, "__name__", "metric")
    maximize = direction == "maximize"
  else:
    raise TypeError(f"`metric` must be 'loss', 'accuracy' or a callable, got {metric!r}.")
  if fn is not None and not paired:
    raise ValueError("a metric of (outputs, targets) needs `data` as an (x, y) pair; with a batch pytree, "
                     "score with model_metric=(model, batch) -> values (or the default: the model_loss).")
  return Objective(loss, fn, name, maximize, model_loss, None, default_loss=loss_fn is None and model_loss is None)
