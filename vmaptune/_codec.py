"""One JSON codec and one way to write a file atomically.

Checkpoints (``_checkpoint``) and saved results (``_io``) both store Python
values as JSON and both must survive a crash mid-write; they share this code.

JSON has no infinity, NaN or tuple, and only string keys. Those are encoded
reversibly as one-key objects: ``{"__float__": "inf"}``, ``{"__tuple__": [...]}``,
``{"__dict__": [[key, value], ...]}`` (a dict with a non-string key),
``{"__array__": [...], "dtype": "<f4"}``. A function is stored by name,
``{"__callable__": "module.qualname"}``, and comes back as that name unless the
decoder is given the objects to map names back to (``objects``, see
:func:`space_objects`); anything else is stored as ``{"__repr__": ...}`` and
comes back the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["encode", "decode", "space_objects", "dumps", "loads", "qualname", "write_file", "fsync_dir", "atomic_file"]

_MARKERS = ("__float__", "__tuple__", "__dict__", "__callable__", "__repr__")


def qualname(fn: Any) -> str:
  """``module.qualname`` of a function: how a callable value is stored."""
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def encode(obj: Any) -> Any:
  """A JSON-able form of ``obj``; :func:`decode` inverts it."""
  if isinstance(obj, np.generic):
    obj = obj.item()
  if obj is None or isinstance(obj, (bool, int, str)):
    return obj
  if isinstance(obj, float):
    if math.isfinite(obj):
      return obj
    return {"__float__": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
  if isinstance(obj, tuple):
    return {"__tuple__": [encode(v) for v in obj]}
  if isinstance(obj, list):
    return [encode(v) for v in obj]
  if isinstance(obj, Mapping):
    if all(isinstance(k, str) for k in obj) and not (len(obj) in (1, 2) and set(obj) & set(_MARKERS + ("__array__",))):
      return {k: encode(v) for k, v in obj.items()}
    return {"__dict__": [[encode(k), encode(v)] for k, v in obj.items()]}
  if isinstance(obj, np.ndarray):
    return {"__array__": [encode(v) for v in obj.tolist()], "dtype": obj.dtype.str}
  if callable(obj):
    return {"__callable__": qualname(obj)}
  return {"__repr__": repr(obj)}


def space_objects(values: Any) -> dict[str, Any]:
  """The table :func:`decode` maps stored names back with: every value among
  ``values`` that JSON cannot hold (a function, an arbitrary object), keyed by
  the name or repr :func:`encode` stores it as."""
  out = {}
  for v in values:
    if v is None or isinstance(v, (bool, int, float, str, tuple, list, dict, np.generic, np.ndarray)):
      continue
    out[qualname(v) if callable(v) else repr(v)] = v
  return out


def decode(obj: Any, objects: Mapping[str, Any] | None = None) -> Any:
  """Inverts :func:`encode`. ``objects`` maps stored function names and reprs
  back to the objects (the space's own functions, say); others stay strings."""
  callables = objects
  if isinstance(obj, list):
    return [decode(v, callables) for v in obj]
  if not isinstance(obj, dict):
    return obj
  if len(obj) == 1:
    (k, v), = obj.items()
    if k == "__float__" and v in ("inf", "-inf", "nan"):
      return float(v)
    if k == "__tuple__" and isinstance(v, list):
      return tuple(decode(x, callables) for x in v)
    if k == "__dict__" and isinstance(v, list):
      return {decode(a, callables): decode(b, callables) for a, b in v}
    if k == "__callable__" and isinstance(v, str):
      return (callables or {}).get(v, v)
    if k == "__repr__" and isinstance(v, str):
      return (callables or {}).get(v, v)
  if set(obj) == {"__array__", "dtype"}:
    return np.asarray(decode(obj["__array__"], callables), dtype=np.dtype(obj["dtype"]))
  return {k: decode(v, callables) for k, v in obj.items()}


def dumps(obj: Any) -> bytes:
  return json.dumps(encode(obj), allow_nan=False).encode()


def loads(data: bytes, objects: Mapping[str, Any] | None = None) -> Any:
  return decode(json.loads(data.decode()), objects)


def write_file(path: str, data: bytes) -> None:
  """Writes and fsyncs ``path``. Errors (ENOSPC, EFBIG) surface at write,
  flush or fsync and are raised, never swallowed."""
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
  """Makes a rename inside ``path`` durable (where directories can be opened)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:  # pragma: no cover - platforms without directory fds
    return
  try:
    os.fsync(fd)
  except OSError:  # pragma: no cover
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[Any]:
  """A binary file object whose contents replace ``path`` only if the block
  finishes: written under a temporary name in the same directory, flushed,
  fsynced and renamed, then the directory fsynced. A crash leaves either the
  old file or the new one, never half of it."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  fsync_dir(parent)
