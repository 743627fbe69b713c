"""Atomic, verified, locked checkpoints of a search.

Layout of ``checkpoint_dir``::

  LOCK                 pid and host of the process that owns the directory
  LATEST               name of the newest committed checkpoint (atomically replaced)
  ckpt-000012/         one committed checkpoint
    meta.json          the search loop's state: fingerprint, trials, strategy state, lanes
    arrays.npz         the population's device state, best parameters
    MANIFEST.json      format version and SHA-256 of each member

A checkpoint is written into ``ckpt-000012.tmp-<pid>``, every file flushed and
fsynced, the directory renamed, the parent fsynced, then ``LATEST`` replaced.
A crash at any point leaves the previous checkpoint intact; leftover ``.tmp``
directories are ignored and removed by the next save. Loading verifies every
checksum and falls back to the newest good checkpoint with a warning; when
none is good it raises :class:`CheckpointError` naming the files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import warnings
from typing import Any, Mapping

import numpy as np

from . import _faults
from ._codec import dumps, fsync_dir, loads, write_file
from ._trial import user_stacklevel

__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatch", "FORMAT_VERSION", "dumps", "loads",
           "fingerprint_diff"]

#: Version 2 (one format for every strategy: the loop's state, see _loop.py)
#: replaced version 1 (separate zoom and halving/PBT formats) on 2026-11-29.
FORMAT_VERSION = 2
_KEEP = 2


class CheckpointError(RuntimeError):
  """A checkpoint directory cannot be used (corrupt, locked, wrong version).

  >>> import vmaptune as vt
  >>> issubclass(vt.CheckpointError, RuntimeError)
  True
  """


class CheckpointMismatch(ValueError):
  """The checkpoint was written by a different search call.

  >>> import vmaptune as vt
  >>> issubclass(vt.CheckpointMismatch, ValueError)
  True
  """


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # pragma: no cover - someone else's process
    return True
  return True


class Checkpointer:
  """Owns one checkpoint directory for the duration of a search."""

  def __init__(self, directory: str, objects: Mapping[str, Any] | None = None):
    """``objects``: how stored function names map back to objects (see
    :func:`vmaptune._codec.space_objects`)."""
    self.directory = os.path.abspath(os.fspath(directory))
    self.objects = dict(objects or {})
    self._locked = False
    self._seq = 0

  # Lock --------------------------------------------------------------------

  @staticmethod
  def _writer() -> bool:
    """Under jax.distributed only process 0 writes (one commit per checkpoint)."""
    import jax

    return jax.process_index() == 0

  def acquire(self) -> None:
    """Takes the directory, or fails fast naming the live holder."""
    if not self._writer():
      return
    os.makedirs(self.directory, exist_ok=True)
    lock = os.path.join(self.directory, "LOCK")
    me = f"{os.getpid()} {socket.gethostname()}\n".encode()
    for _ in range(2):
      try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          with open(lock, "rb") as f:
            text = f.read().decode(errors="replace").split()
          pid, host = int(text[0]), text[1] if len(text) > 1 else ""
        except (OSError, ValueError, IndexError):
          pid, host = -1, ""
        if pid > 0 and host == socket.gethostname() and _pid_alive(pid) and pid != os.getpid():
          raise CheckpointError(
              f"checkpoint directory {self.directory} is in use by process {pid} "
              f"on {host}; wait for it to finish, or stop it."
          ) from None
        if pid > 0 and host and host != socket.gethostname():
          raise CheckpointError(
              f"checkpoint directory {self.directory} is locked by process {pid} on "
              f"another host ({host}); remove {lock} if that process is gone."
          ) from None
        # A stale lock (its process is dead): take over.
        try:
          os.remove(lock)
        except FileNotFoundError:
          pass
        continue
      try:
        os.write(fd, me)
        os.fsync(fd)
      finally:
        os.close(fd)
      self._locked = True
      return
    raise CheckpointError(f"could not lock {lock}")  # pragma: no cover

  def release(self) -> None:
    if self._locked:
      try:
        os.remove(os.path.join(self.directory, "LOCK"))
      except FileNotFoundError:
        pass
      self._locked = False

  # Reading -----------------------------------------------------------------

  def _committed(self) -> list[str]:
    try:
      names = os.listdir(self.directory)
    except FileNotFoundError:
      return []
    return sorted(n for n in names if n.startswith("ckpt-") and ".tmp" not in n)

  def _read_one(self, name: str) -> tuple[dict, dict]:
    path = os.path.join(self.directory, name)
    manifest_path = os.path.join(path, "MANIFEST.json")
    try:
      with open(manifest_path, "rb") as f:
        manifest = json.loads(f.read().decode())
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
      older = isinstance(version, int) and version < FORMAT_VERSION
      raise CheckpointError(
          f"{manifest_path}: checkpoint format version {version!r}, this vmaptune reads "
          f"version {FORMAT_VERSION}; "
          + ("it was written by an older vmaptune (0.1, before the one search loop): finish that search "
             "with the vmaptune that wrote it, or pass overwrite=True to start afresh."
             if older else "resume with the vmaptune that wrote it or pass overwrite=True.")
      )
    files = manifest.get("files", {})
    if set(files) != {"meta.json", "arrays.npz"}:
      raise CheckpointError(f"{manifest_path}: manifest lists {sorted(files)}, expected meta.json and arrays.npz")
    blobs = {}
    for member, digest in files.items():
      member_path = os.path.join(path, member)
      try:
        with open(member_path, "rb") as f:
          blob = f.read()
      except OSError as e:
        raise CheckpointError(f"{member_path}: missing or unreadable ({e.strerror})") from None
      if hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(f"{member_path}: checksum mismatch (truncated or corrupted)")
      blobs[member] = blob
    meta = loads(blobs["meta.json"], self.objects)
    with np.load(io.BytesIO(blobs["arrays.npz"]), allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    return meta, arrays

  def load(self) -> tuple[dict, dict] | None:
    """The newest good checkpoint as ``(meta, arrays)``, or None if there is none.

    A corrupt newest checkpoint is skipped with a warning; if checkpoints
    exist but none is good, raises :class:`CheckpointError` naming them.
    """
    names = self._committed()
    latest = None
    try:
      with open(os.path.join(self.directory, "LATEST"), "rb") as f:
        latest = f.read().decode().strip() or None
    except OSError:
      pass
    if latest in names:
      # A checkpoint newer than LATEST was renamed but never published.
      names = [n for n in names if n <= latest]
    errors = []
    for name in reversed(names):
      try:
        out = self._read_one(name)
      except CheckpointError as e:
        errors.append(str(e))
        if "format version" in str(e):
          raise
        continue
      if errors:
        warnings.warn(
            "vmaptune: skipped corrupt checkpoint(s), resuming from "
            f"{os.path.join(self.directory, name)}: " + "; ".join(errors),
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
      self._seq = int(name.split("-")[1])
      return out
    if errors:
      raise CheckpointError("no usable checkpoint in " + self.directory + ": " + "; ".join(errors))
    return None

  # Writing -----------------------------------------------------------------

  def save(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """Commits a new checkpoint atomically; returns its path."""
    self._seq += 1
    if not self._writer():
      return os.path.join(self.directory, f"ckpt-{self._seq:06d}")
    name = f"ckpt-{self._seq:06d}"
    final = os.path.join(self.directory, name)
    tmp = f"{final}.tmp-{os.getpid()}"
    self._clean_leftovers()
    try:
      if os.path.exists(final):  # a renamed but unpublished leftover: replace it
        shutil.rmtree(final)
      os.makedirs(tmp)
      meta_blob = dumps(dict(meta))
      buf = io.BytesIO()
      np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
      arrays_blob = buf.getvalue()
      write_file(os.path.join(tmp, "meta.json"), meta_blob)
      write_file(os.path.join(tmp, "arrays.npz"), arrays_blob)
      manifest = {
          "format_version": FORMAT_VERSION,
          "files": {
              "meta.json": hashlib.sha256(meta_blob).hexdigest(),
              "arrays.npz": hashlib.sha256(arrays_blob).hexdigest(),
          },
      }
      write_file(os.path.join(tmp, "MANIFEST.json"), json.dumps(manifest).encode())
      fsync_dir(tmp)
      _faults.failpoint("checkpoint:after-temp-write")
      os.replace(tmp, final)
      fsync_dir(self.directory)
      _faults.failpoint("checkpoint:after-rename")
      _faults.failpoint("checkpoint:before-latest")
      latest_tmp = os.path.join(self.directory, f"LATEST.tmp-{os.getpid()}")
      write_file(latest_tmp, (name + "\n").encode())
      os.replace(latest_tmp, os.path.join(self.directory, "LATEST"))
      fsync_dir(self.directory)
    except OSError as e:
      self._seq -= 1
      shutil.rmtree(tmp, ignore_errors=True)
      raise OSError(e.errno, f"could not write checkpoint {final}: {e.strerror}", e.filename) from e
    self._prune()
    return final

  def _clean_leftovers(self) -> None:
    for n in os.listdir(self.directory):
      if ".tmp-" in n:
        p = os.path.join(self.directory, n)
        if os.path.isdir(p):
          shutil.rmtree(p, ignore_errors=True)
        else:
          try:
            os.remove(p)
          except OSError:
            pass

  def _prune(self) -> None:
    names = self._committed()
    for n in names[:-_KEEP]:
      shutil.rmtree(os.path.join(self.directory, n), ignore_errors=True)

  def clear(self) -> None:
    """Removes every checkpoint (``overwrite=True``)."""
    self._seq = 0
    if not self._writer():
      return
    for n in os.listdir(self.directory) if os.path.isdir(self.directory) else []:
      if n == "LOCK":
        continue
      p = os.path.join(self.directory, n)
      if os.path.isdir(p):
        shutil.rmtree(p, ignore_errors=True)
      else:
        os.remove(p)
    self._seq = 0


def fingerprint_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between two fingerprints."""
  out = []
  for k in sorted(set(stored) | set(current)):
    a, b = stored.get(k, "<absent>"), current.get(k, "<absent>")
    if a != b:
      out.append(f"{k}: checkpoint has {a!r}, this call has {b!r}")
  if any(d.startswith("data:") for d in out) and any(d.startswith("seed:") for d in out):
    out.append("(the train/validation split follows `seed`, so a new seed changes the data too)")
  return out
