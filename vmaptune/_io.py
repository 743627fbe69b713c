"""Saving a :class:`~vmaptune.SearchResult` to one file and loading it back.

The file is a zip archive (any name; ``search.vmaptune`` reads well) holding:

* ``vmaptune.json``: ``format`` (``"vmaptune.SearchResult"``),
  ``format_version`` (:data:`FORMAT_VERSION`), the metric and its direction,
  the space (each entry as :func:`vmaptune._space.to_json` writes it), the
  regions, stats and options, every trial's fields but its curves, and the
  search's re-check (``recheck``: trial ids best mean first, seeds, scores;
  null without one).
  JSON has no infinity or NaN: such floats are written as
  ``{"__float__": "inf"}`` (``"-inf"``, ``"nan"``), tuples as
  ``{"__tuple__": [...]}``.
* ``arrays/*.npy``: the trials' curves (each kind concatenated over trials,
  split again by the shapes in the JSON) and the best parameters, one array
  per leaf, named in the JSON by its key path.

A zip of ``.npy`` members and a JSON index can be read without vmaptune
(``zipfile`` and ``numpy.load``) and never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import os
import zipfile
from typing import Any

import numpy as np

from . import _space
from ._codec import atomic_file, decode, encode
from ._recheck import Recheck
from ._region import Region
from ._trial import Stats, Trial

__all__ = ["save", "read", "FORMAT_VERSION"]

FORMAT = "vmaptune.SearchResult"
#: The version :func:`save` writes and :func:`load` reads.
FORMAT_VERSION = 1
_INDEX = "vmaptune.json"
_CURVES = ("curve", "curve_steps", "train_curve")


# --------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------


class _Writer:
  """Adds ``.npy`` members to an open zip archive, numbering them."""

  def __init__(self, zf: zipfile.ZipFile):
    self.zf = zf
    self.count = 0

  def add(self, array: Any, prefix: str) -> dict:
    """Writes one array; returns its JSON entry ``{"member", "dtype", ...}``."""
    entry: dict = {}
    if _is_prng_key(array):
      import jax

      entry["prng_key"] = str(array.dtype)
      array = jax.random.key_data(array)
    arr = np.asarray(array)
    if arr.dtype == object:
      raise TypeError(f"cannot save an object array ({prefix}) without pickle")
    entry["dtype"] = str(arr.dtype)
    if arr.dtype.kind == "V":
      # ml_dtypes (bfloat16, float8, int4, ...) have no .npy descriptor of
      # their own: store the bits and the dtype's name.
      arr = arr.view(f"u{arr.dtype.itemsize}")
    name = f"arrays/{prefix}{self.count}.npy"
    self.count += 1
    with self.zf.open(name, "w", force_zip64=True) as f:
      np.lib.format.write_array(f, arr, allow_pickle=False)
    entry["member"] = name
    return entry


def _is_prng_key(x: Any) -> bool:
  """A typed key array. Not an ``nnx`` ``RngKey`` Variable, which shows its
  value's dtype: it flattens to the key array."""
  import jax

  dtype = getattr(x, "dtype", None)
  if dtype is None or not isinstance(x, jax.Array):
    return False
  try:
    return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
  except Exception:  # noqa: BLE001  (not a jax dtype)
    return False


def _read(zf: zipfile.ZipFile, entry: dict) -> np.ndarray:
  with zf.open(entry["member"]) as f:
    arr = np.lib.format.read_array(io.BytesIO(f.read()), allow_pickle=False)
  dtype = entry.get("dtype")
  if dtype is not None and arr.dtype.kind != "V" and str(arr.dtype) != dtype:
    import ml_dtypes

    arr = arr.view(getattr(ml_dtypes, dtype))
  return arr


def _path_entry(k: Any) -> Any:
  """One key-path element as a JSON value: a str or an int."""
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      v = getattr(k, attr)
      break
  else:
    v = str(k)
  if isinstance(v, np.integer):
    v = int(v)
  return v if isinstance(v, (str, int)) and not isinstance(v, bool) else repr(v)


def _save_tree(writer: _Writer, tree: Any, prefix: str) -> dict:
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_prng_key)[0]
  out = []
  for path, leaf in leaves:
    keys = [_path_entry(k) for k in path]
    # nnx Variables flatten to their `.value`: drop it, a leaf is its array.
    if path and type(path[-1]).__name__ == "GetAttrKey" and keys[-1] == "value":
      keys = keys[:-1]
    entry = writer.add(leaf, prefix)
    entry["path"] = keys
    out.append(entry)
  return {"leaves": out}


def _load_tree(zf: zipfile.ZipFile, obj: dict) -> Any:
  leaves = obj["leaves"]
  if len(leaves) == 1 and not leaves[0]["path"]:
    return _read(zf, leaves[0])
  root: dict = {}
  for entry in leaves:
    node = root
    *parents, last = entry["path"]
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = _read(zf, entry)
  return root


# --------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------


def save(result, path) -> str:
  """Saves ``result`` to one file at ``path``, atomically; returns the path.

  Everything a plot, a report or an export needs is kept (trials with their
  curves, space, regions, stats, options) plus the best trial's parameters.
  The file is written under a temporary name in the same directory, synced
  to disk and renamed over ``path``, so a crash never leaves half a file.
  Missing parent directories are created.

  Args:
    result: a :class:`~vmaptune.SearchResult`.
    path: the file to write (``str`` or ``os.PathLike``).

  Returns:
    ``path`` as a string.

  >>> import os, tempfile
  >>> from vmaptune import _io
  >>> from vmaptune._demo import example_result
  >>> path = _io.save(example_result(), os.path.join(tempfile.mkdtemp(), "r.vmaptune"))
  >>> os.path.getsize(path) > 0
  True
  """
  path = os.fspath(path)
  if not isinstance(path, str):
    path = os.fsdecode(path)
  if os.path.isdir(path):
    raise IsADirectoryError(
        f"save: {path!r} is a directory; give a file name, e.g. {os.path.join(path, 'search.vmaptune')!r}."
    )
  with atomic_file(path) as f:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
      index = _write(result, _Writer(zf))
      text = json.dumps(encode(index), allow_nan=False, indent=1)
      zf.writestr(_INDEX, text, compress_type=zipfile.ZIP_DEFLATED)
  return path


def _write(result, writer: _Writer) -> dict:
  from . import __version__

  trials = []
  for t in result.trials:
    trials.append(t.to_dict(curves=False))
  curves = {}
  for kind in _CURVES:
    arrays = [np.asarray(getattr(t, kind)) for t in result.trials]
    flat = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)
    entry = writer.add(flat, f"{kind}_")
    entry["shapes"] = [list(a.shape) for a in arrays]
    curves[kind] = entry
  best_params = []
  for trial_id, pair in (getattr(result, "_best_params", None) or {}).items():
    params, model_state = pair
    best_params.append(dict(
        trial=int(trial_id),
        params=_save_tree(writer, params, "params_"),
        model_state=_save_tree(writer, model_state, "model_state_"),
    ))
  stats = result.stats
  stats = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats or {})
  return dict(
      format=FORMAT,
      format_version=FORMAT_VERSION,
      vmaptune_version=__version__,
      metric=result.metric if isinstance(result.metric, str) else str(result.metric),
      maximize=bool(result.maximize),
      space={k: _space.to_json(d) for k, d in result.space.items()},
      regions=[dict(numeric={k: [float(lo), float(hi)] for k, (lo, hi) in r.numeric.items()},
                    choices={k: [_space._jsonable(v) for v in vals] for k, vals in r.choices.items()})
               for r in result.regions],
      stats=stats,
      options=dict(result.options),
      trials=trials,
      curves=curves,
      best_params=best_params,
      recheck=_recheck_json(getattr(result, "rechecked", None)),
  )


def _recheck_json(check) -> dict | None:
  if check is None:
    return None
  return dict(trials=[int(t.id) for t in check.trials], seeds=[int(s) for s in check.seeds],
              scores=[[float(v) for v in row] for row in check.scores], lane_steps=int(check.lane_steps),
              seconds=float(check.seconds))


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------


def read(path) -> dict:
  """The parts of a result written by :func:`save`: keyword arguments of
  ``SearchResult`` (``vmaptune.load`` builds the result from them).

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: the file is not a saved vmaptune result, is damaged, or was
      written by a newer vmaptune (its ``format_version`` is unknown).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(errno.ENOENT, "no saved vmaptune result at this path", path)
  if os.path.isdir(path):
    raise IsADirectoryError(errno.EISDIR, "a saved vmaptune result is a file, this is a directory", path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path!r} is not a saved vmaptune result (not a zip archive).")
  try:
    with zipfile.ZipFile(path) as zf:
      try:
        raw = zf.read(_INDEX)
      except KeyError:
        raise ValueError(
            f"{path!r} is not a saved vmaptune result: it has no {_INDEX!r} member."
        ) from None
      try:
        index = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r}: its {_INDEX!r} is not valid JSON ({e}).") from None
      if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path!r} is not a saved vmaptune result (format {found!r}, "
                         f"expected {FORMAT!r}).")
      version = index.get("format_version")
      if version != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has format_version {version!r}; this vmaptune reads version "
            f"{FORMAT_VERSION}. Load it with the vmaptune that wrote it "
            f"({index.get('vmaptune_version', 'unknown version')}) or a newer one."
        )
      return _build(zf, decode(index))
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path!r} is damaged: {e}.") from None
  except (KeyError, TypeError, IndexError) as e:
    raise ValueError(f"{path!r} is damaged or incomplete: {type(e).__name__}: {e}.") from None


def _build(zf: zipfile.ZipFile, index: dict) -> dict:
  curves = {}
  for kind in _CURVES:
    entry = index["curves"][kind]
    flat = _read(zf, entry)
    parts, start = [], 0
    for shape in entry["shapes"]:
      size = math.prod(shape)
      parts.append(flat[start:start + size].reshape(shape))
      start += size
    curves[kind] = parts
  trials = []
  for i, t in enumerate(index["trials"]):
    trials.append(Trial.from_dict(dict(t, score=float(t["score"])), **{kind: curves[kind][i] for kind in _CURVES}))
  space = {k: _space.from_json(v) for k, v in index["space"].items()}
  regions = [
      Region(
          numeric={k: (float(lo), float(hi)) for k, (lo, hi) in r["numeric"].items()},
          choices={k: tuple(_space._from_jsonable(v) for v in vals) for k, vals in r["choices"].items()},
      )
      for r in index["regions"]
  ]
  fields = {f.name for f in dataclasses.fields(Stats)}
  stats = Stats(**{k: v for k, v in index["stats"].items() if k in fields})
  best_params = {
      int(b["trial"]): (_load_tree(zf, b["params"]), _load_tree(zf, b["model_state"]))
      for b in index["best_params"]
  }
  rechecked = None
  if index.get("recheck"):  # absent in files from before search(recheck=...)
    r = index["recheck"]
    by_id = {t.id: t for t in trials}
    rechecked = Recheck(trials=[by_id[i] for i in r["trials"]], seeds=list(r["seeds"]),
                        scores=np.asarray(r["scores"], np.float64).reshape(len(r["trials"]), len(r["seeds"])),
                        metric=index["metric"], maximize=index["maximize"], lane_steps=int(r["lane_steps"]),
                        seconds=float(r["seconds"]))
  return dict(
      trials=trials, space=space, metric=index["metric"], maximize=index["maximize"],
      regions=regions, stats=stats, best_params=best_params or None, options=index["options"],
      rechecked=rechecked,
  )
