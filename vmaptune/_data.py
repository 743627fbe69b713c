"""Datasets: pytrees of arrays with one leading example axis, and their split.

``data`` is ``(x, y)``, where ``x`` and ``y`` are each an array or any nested
tuple, list or dict of arrays sharing the leading example axis, or
``{"train": ..., "val": ...}`` with one of those each. With a model-aware loss
(``model_loss=``) ``data`` may be any such pytree, a *batch* (a dict of arrays
as in the Flax NNX tutorials; no ``y`` needed). Every check (numbers only, the
same number of examples in every leaf, no NaN) and every operation (split,
shuffle, mini-batches, evaluation chunks) works leaf by leaf.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
from typing import Any, Mapping

import jax
import numpy as np

__all__ = ["Dataset", "prepare_data", "num_examples", "leaf_paths"]


def _is_number_list(v: Any) -> bool:
  """A (nested) list of plain numbers: an array written as a list."""
  if isinstance(v, (tuple, list)):
    return all(_is_number_list(e) for e in v)
  return isinstance(v, (numbers.Number, np.generic))


def _tree(value: Any) -> Any:
  """``value`` as a pytree whose leaves are arrays (or array-likes).

  A dict or a tuple/list holding arrays is a container (its items become a
  model's keyword or positional inputs); a list of plain numbers is an array.
  """
  if isinstance(value, Mapping):
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
      raise TypeError(f"`data`: dict keys must be strings (they become keyword arguments), got {bad[0]!r}.")
    return {k: _tree(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)) and not _is_number_list(value):
    items = [_tree(v) for v in value]
    if isinstance(value, tuple):
      return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return items
  if isinstance(value, (tuple, list)):  # numbers: one array (a tree of them would be scalar leaves)
    return np.asarray(value)
  return value


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
  """``(path, leaf)`` of every leaf, the path as ``x['cat']`` or ``x[0]``."""
  return [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _canon(arr: np.ndarray) -> np.ndarray:
  # Float features of any width become float32 (the parameters' dtype);
  # integers (token ids, class labels) int32; booleans int32.
  if arr.dtype.kind in "iub":
    return arr.astype(np.int32)
  return arr.astype(np.float32)


def _as_leaf(value: Any, where: str) -> np.ndarray:
  try:
    arr = np.asarray(value)
  except Exception as e:  # pragma: no cover - exotic array-likes
    raise TypeError(f"`data`: {where} could not be turned into an array: {e}") from None
  if arr.dtype == object:
    raise TypeError(f"`data`: {where} must be a numeric array, got dtype=object (ragged lists, or "
                    "objects that are not arrays).")
  if arr.ndim == 0:
    raise ValueError(f"`data`: {where} must have a leading example axis, got a scalar.")
  if arr.dtype.kind not in "iufb" and arr.dtype.name != "bfloat16":
    raise TypeError(f"`data`: {where} must hold numbers, got dtype={arr.dtype}.")
  if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
    bad = ~np.isfinite(arr.astype(np.float32))
    if bad.any():
      i = int(np.argwhere(bad)[0][0])
      raise ValueError(f"`data`: {where} holds NaN or inf (first at example {i}). "
                       "Clean or impute the data before searching.")
  return _canon(arr)


def _arrays(tree: Any, name: str) -> Any:
  """Every leaf checked and canonicalised; one example count for all leaves."""
  tree = _tree(tree)
  paths = leaf_paths(tree)
  if not paths:
    raise ValueError(f"`data`: {name} holds no arrays.")
  leaves = [_as_leaf(leaf, f"{name}{path}") for path, leaf in paths]
  sizes = {f"{name}{path}": leaf.shape[0] for (path, _), leaf in zip(paths, leaves)}
  if len(set(sizes.values())) > 1:
    listed = ", ".join(f"{k} has {v}" for k, v in sizes.items())
    raise ValueError(f"`data`: every array must have the same number of examples (leading axis); {listed}.")
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def num_examples(tree: Any) -> int:
  return int(jax.tree.leaves(tree)[0].shape[0])


def _take(tree: Any, idx: np.ndarray) -> Any:
  return jax.tree.map(lambda a: a[idx], tree)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train/validation split: two pytrees of host NumPy arrays.

  Attributes:
    train, val: the splits; with ``paired`` each is ``(x, y)``.
    task: ``"classification"`` (``y`` is one integer array), ``"regression"``
      (``y`` is one float array) or ``"custom"`` (anything else: a loss must
      be given).
    paired: the data was given as ``(x, y)``.
  """

  train: Any
  val: Any
  task: str
  paired: bool = True

  @property
  def num_train(self) -> int:
    return num_examples(self.train)

  @property
  def num_val(self) -> int:
    return num_examples(self.val)

  # The (x, y) view of paired data.
  x_train = property(lambda self: self.train[0])
  y_train = property(lambda self: self.train[1])
  x_val = property(lambda self: self.val[0])
  y_val = property(lambda self: self.val[1])

  @property
  def num_classes(self) -> int | None:
    """Classes seen in the labels (classification), else None."""
    if self.task != "classification":
      return None
    return int(max(self.y_train.max(), self.y_val.max())) + 1

  @property
  def nbytes(self) -> int:
    return int(sum(a.nbytes for a in jax.tree.leaves((self.train, self.val))))

  def signature(self) -> tuple:
    """Structure, shapes and dtypes of both splits (a cache key)."""
    def one(tree):
      return (str(jax.tree.structure(tree)),) + tuple((p, a.shape, a.dtype.str) for p, a in leaf_paths(tree))

    return one(self.train), one(self.val), self.task, self.paired, self.num_classes

  def describe(self) -> str:
    """Shapes and dtypes, for the checkpoint fingerprint and messages."""
    if self.paired and isinstance(self.x_train, np.ndarray) and isinstance(self.y_train, np.ndarray):
      return f"train{self.x_train.shape}/{self.x_train.dtype} val{self.x_val.shape} y/{self.y_train.dtype}"
    return "; ".join(f"train{p} {a.shape} {a.dtype}" for p, a in leaf_paths(self.train)) + \
        f"; {self.num_val} validation examples"

  def fingerprint(self) -> str:
    """A digest of shapes, dtypes and contents (for checkpoints and caches)."""
    h = hashlib.sha256()
    for a in jax.tree.leaves((self.train, self.val)):
      h.update(str((a.shape, a.dtype.str)).encode())
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _pair(value: Any, where: str) -> tuple:
  if not isinstance(value, (tuple, list)) or len(value) != 2:
    raise TypeError(f"`{where}` must be an (x, y) pair, got {type(value).__name__}"
                    + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else "")
                    + "; with a loss of the model and a batch, pass model_loss= (then any batch pytree works).")
  return tuple(value)


def _split_parts(data: Any, paired: bool, name: str) -> Any:
  if paired:
    x, y = _pair(data, name)
    return (_arrays(x, f"{name} x" if name != "data" else "x"), _arrays(y, f"{name} y" if name != "data" else "y"))
  return _arrays(data, name if name != "data" else "batch")


def prepare_data(data: Any, *, val_fraction: float, seed: int, model_aware: bool = False) -> Dataset:
  """Validates ``data`` and splits it into train and validation sets.

  Args:
    data: ``(x, y)`` (``x`` and ``y`` arrays or pytrees of arrays), split
      with ``val_fraction`` (shuffled deterministically from ``seed``), or
      ``{"train": ..., "val": ...}``. With ``model_aware``, any pytree batch.
    val_fraction: share of examples held out when ``data`` is not split.
    seed: the search seed; the split depends on it alone.
    model_aware: the loss is a function of the model and a batch, so
      ``data`` need not be an ``(x, y)`` pair.

  Returns:
    A :class:`Dataset`.
  """
  split = isinstance(data, Mapping) and set(data) == {"train", "val"}
  if isinstance(data, Mapping) and not split and not model_aware:
    raise ValueError(
        "`data` as a dict must have exactly the keys 'train' and 'val', each an (x, y) pair; got keys "
        f"{sorted(map(str, data))}. (A dict batch such as {{'image': ..., 'label': ...}} needs a loss of the "
        "model and the batch: model_loss=.)")
  first = data["train"] if split else data
  paired = isinstance(first, (tuple, list)) and len(first) == 2
  if not model_aware and not paired:
    _pair(first, "data['train']" if split else "data")
  if split:
    train = _split_parts(data["train"], paired, "data['train']")
    val = _split_parts(data["val"], paired, "data['val']")
    if jax.tree.structure(train) != jax.tree.structure(val):
      raise ValueError(f"`data`: train and val must have the same structure, got {jax.tree.structure(train)} "
                       f"and {jax.tree.structure(val)}.")
    for (p, a), (_, b) in zip(leaf_paths(train), leaf_paths(val)):
      if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
        raise ValueError(f"`data`: train and val examples must have the same shape and kind, got {p}: "
                         f"{a.shape[1:]} {a.dtype} vs {b.shape[1:]} {b.dtype}.")
  else:
    whole = _split_parts(data, paired, "data")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
      raise TypeError(f"`val_fraction` must be a float in (0, 1), got {val_fraction!r}.")
    if not 0.0 < val_fraction < 1.0:
      raise ValueError(f"`val_fraction` must lie strictly between 0 and 1, got {val_fraction!r}.")
    n = num_examples(whole)
    if paired and num_examples(whole[0]) != num_examples(whole[1]):
      raise ValueError(f"`data`: x and y must have the same number of examples (leading axis), got "
                       f"len(x)={num_examples(whole[0])} and len(y)={num_examples(whole[1])}.")
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
      raise ValueError(
          f"`data`: with {n} examples and val_fraction={val_fraction} the "
          f"{'validation' if n_val < 1 else 'training'} split would be empty; "
          "pass more data, another val_fraction, or {'train': ..., 'val': ...}.")
    # The split's stream is separate from the config sampler's (Stream.SPLIT).
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    train, val = _take(whole, perm[n_val:]), _take(whole, perm[:n_val])
  for name, part in (("train", train), ("val", val)):
    if paired and num_examples(part[0]) != num_examples(part[1]):
      raise ValueError(f"`data`: {name} x and y must have the same number of examples (leading axis), got "
                       f"len(x)={num_examples(part[0])} and len(y)={num_examples(part[1])}.")
    if num_examples(part) == 0:
      raise ValueError(f"`data`: {name} is empty (0 examples).")
  # One integer array of shape (n,) is class labels, one float array values;
  # anything else (per-token labels (n, T), a pytree) needs a loss of its own.
  task = "custom"
  if paired and isinstance(train[1], np.ndarray):
    if train[1].dtype.kind != "i":
      task = "regression"
    elif train[1].ndim == 1:
      task = "classification"
  if task == "classification" and (train[1].min() < 0 or val[1].min() < 0):
    raise ValueError("`data`: integer class labels must be >= 0.")
  return Dataset(train, val, task, paired)
