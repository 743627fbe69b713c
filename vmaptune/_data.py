"""Datasets, their train/validation split, and the loss and metric functions."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["Dataset", "prepare_data", "Objective", "resolve_objective"]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train/validation split as host NumPy arrays.

  Attributes:
    x_train, y_train: training examples; the leading axis is the example axis.
    x_val, y_val: validation examples.
    task: ``"classification"`` (integer labels) or ``"regression"``.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  task: str

  @property
  def num_train(self) -> int:
    return int(self.x_train.shape[0])

  @property
  def num_val(self) -> int:
    return int(self.x_val.shape[0])

  @property
  def num_classes(self) -> int | None:
    """Classes seen in the labels (classification), else None."""
    if self.task != "classification":
      return None
    return int(max(self.y_train.max(), self.y_val.max())) + 1

  def fingerprint(self) -> str:
    """A digest of shapes, dtypes and contents (for checkpoints and caches)."""
    h = hashlib.sha256()
    for a in (self.x_train, self.y_train, self.x_val, self.y_val):
      h.update(str((a.shape, a.dtype.str)).encode())
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _as_array(value: Any, name: str) -> np.ndarray:
  try:
    arr = np.asarray(value)
  except Exception as e:  # pragma: no cover - exotic array-likes
    raise TypeError(f"`data`: {name} could not be turned into an array: {e}") from None
  if arr.dtype == object:
    raise TypeError(f"`data`: {name} must be a numeric array, got dtype=object.")
  if arr.ndim == 0:
    raise ValueError(f"`data`: {name} must have a leading example axis, got a scalar.")
  if arr.dtype.kind == "b":
    arr = arr.astype(np.int32)
  if arr.dtype.kind not in "iuf" and arr.dtype.name != "bfloat16":
    raise TypeError(f"`data`: {name} must hold numbers, got dtype={arr.dtype}.")
  return arr


def _check_pair(x: np.ndarray, y: np.ndarray, where: str) -> None:
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f"`data`: {where} x and y must have the same number of examples "
        f"(leading axis), got len(x)={x.shape[0]} and len(y)={y.shape[0]}."
    )
  if x.shape[0] == 0:
    raise ValueError(f"`data`: {where} is empty (0 examples).")
  for name, a in (("x", x), ("y", y)):
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
      bad = ~np.isfinite(a.astype(np.float32))
      if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise ValueError(
            f"`data`: {where} {name} holds NaN or inf (first at example {i}). "
            "Clean or impute the data before searching."
        )


def _canon_x(x: np.ndarray) -> np.ndarray:
  # Float features of any width become float32 (the parameters' dtype);
  # integer features stay integers (token ids for an Embed layer).
  if x.dtype.kind in "iu":
    return x.astype(np.int32)
  return x.astype(np.float32)


def _canon_y(y: np.ndarray) -> np.ndarray:
  if y.dtype.kind in "iu":
    return y.astype(np.int32)
  return y.astype(np.float32)


def prepare_data(data: Any, *, val_fraction: float, seed: int) -> Dataset:
  """Validates ``data`` and splits it into train and validation sets.

  Args:
    data: ``(x, y)``, split into train and validation with ``val_fraction``
      (shuffled deterministically from ``seed``), or
      ``{"train": (x, y), "val": (x, y)}``.
    val_fraction: share of examples held out when ``data`` is ``(x, y)``.
    seed: the search seed; the split depends on it alone.

  Returns:
    A :class:`Dataset`.
  """
  if isinstance(data, Mapping):
    missing = {"train", "val"} - set(data)
    extra = set(data) - {"train", "val"}
    if missing or extra:
      raise ValueError(
          "`data` as a dict must have exactly the keys 'train' and 'val', "
          f"each an (x, y) pair; got keys {sorted(map(str, data))}."
      )
    parts = {}
    for split in ("train", "val"):
      pair = data[split]
      if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"`data['{split}']` must be an (x, y) pair.")
      x, y = _as_array(pair[0], f"{split} x"), _as_array(pair[1], f"{split} y")
      _check_pair(x, y, split)
      parts[split] = (_canon_x(x), _canon_y(y))
    (xt, yt), (xv, yv) = parts["train"], parts["val"]
    if xt.shape[1:] != xv.shape[1:] or yt.shape[1:] != yv.shape[1:]:
      raise ValueError(
          "`data`: train and val examples must have the same shape, got "
          f"x {xt.shape[1:]} vs {xv.shape[1:]}, y {yt.shape[1:]} vs {yv.shape[1:]}."
      )
    if xt.dtype != xv.dtype or yt.dtype != yv.dtype:
      raise TypeError(
          "`data`: train and val must have the same kinds of dtype, got "
          f"x {xt.dtype} vs {xv.dtype}, y {yt.dtype} vs {yv.dtype}."
      )
  else:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
      raise TypeError(
          "`data` must be an (x, y) pair or {'train': (x, y), 'val': (x, y)}, "
          f"got {type(data).__name__}."
      )
    x, y = _as_array(data[0], "x"), _as_array(data[1], "y")
    _check_pair(x, y, "")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
      raise TypeError(f"`val_fraction` must be a float in (0, 1), got {val_fraction!r}.")
    if not 0.0 < val_fraction < 1.0:
      raise ValueError(f"`val_fraction` must lie strictly between 0 and 1, got {val_fraction!r}.")
    n = x.shape[0]
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
      raise ValueError(
          f"`data`: with {n} examples and val_fraction={val_fraction} the "
          f"{'validation' if n_val < 1 else 'training'} split would be empty; "
          "pass more data, another val_fraction, or {'train': ..., 'val': ...}."
      )
    # The split's stream is separate from the config sampler's.
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    iv, it = perm[:n_val], perm[n_val:]
    x, y = _canon_x(x), _canon_y(y)
    xt, yt, xv, yv = x[it], y[it], x[iv], y[iv]
  task = "classification" if yt.dtype.kind == "i" else "regression"
  if task == "classification" and (yt.ndim != 1 or yv.ndim != 1):
    raise ValueError(
        f"`data`: integer labels must have shape (n,), got {yt.shape}; "
        "one-hot labels should be passed as class indices."
    )
  if task == "classification" and (yt.min() < 0 or yv.min() < 0):
    raise ValueError("`data`: integer class labels must be >= 0.")
  return Dataset(xt, yt, xv, yv, task)


# --------------------------------------------------------------------------
# Loss and metric
# --------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a lane minimises in training and how it is scored on validation.

  Attributes:
    loss_fn: ``(outputs, targets) -> per-example loss``, shape ``(batch,)``.
    metric_fn: ``(outputs, targets) -> per-example value``; the validation
      score is its mean over the validation set.
    metric_name: a name for tables.
    maximize: whether a larger score is better.
  """

  loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
  metric_fn: Callable[[jax.Array, jax.Array], jax.Array]
  metric_name: str
  maximize: bool


def resolve_objective(task: str, loss_fn: Any, metric: Any, direction: Any) -> Objective:
  """Picks the loss and metric from the task and the user's options."""
  if loss_fn is None:
    loss = cross_entropy if task == "classification" else squared_error
  elif callable(loss_fn):
    loss = loss_fn
  else:
    raise TypeError(f"`loss_fn` must be a callable (outputs, targets) -> per-example loss, got {loss_fn!r}.")
  if direction not in (None, "minimize", "maximize"):
    raise ValueError(f"`direction` must be None, 'minimize' or 'maximize', got {direction!r}.")
  if isinstance(metric, str):
    if metric == "loss":
      fn, name, maximize = loss, "loss", False
    elif metric == "accuracy":
      if task != "classification":
        raise ValueError(
            "metric='accuracy' needs integer class labels in `data`, but y is "
            "float (a regression target). Use metric='loss'."
        )
      fn, name, maximize = accuracy, "accuracy", True
    else:
      raise ValueError(
          f"`metric` must be 'loss', 'accuracy' or a callable "
          f"(outputs, targets) -> per-example value, got {metric!r}."
      )
    if direction is not None and (direction == "maximize") != maximize:
      raise ValueError(f"metric={metric!r} is {'maximized' if maximize else 'minimized'}; drop `direction` or use a callable metric.")
  elif callable(metric):
    fn = metric
    name = getattr(metric, "__name__", "metric")
    maximize = direction == "maximize"
  else:
    raise TypeError(f"`metric` must be 'loss', 'accuracy' or a callable, got {metric!r}.")
  for f, arg in ((loss, "loss_fn"), (fn, "metric")):
    try:
      params = [
          p for p in inspect.signature(f).parameters.values()
          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
      ]
    except (TypeError, ValueError):
      continue
    if len(params) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
      raise TypeError(f"`{arg}` must take (outputs, targets), got a function of {len(params)} argument(s).")
  return Objective(loss, fn, name, maximize)
