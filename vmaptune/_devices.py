"""Which devices the lane axis is sharded over, and using every CPU core.

One XLA CPU device runs these small programs on one core (measured: pinning a
single-device run to one core changed nothing), so on a
CPU host vmaptune asks JAX for one CPU device per core. That only works before
JAX initialises its backends; :func:`configure_cpu_devices` runs when
``vmaptune`` is imported and :func:`warn_if_cpu_underused` explains the
fallback when it was too late.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._trial import user_stacklevel

__all__ = ["configure_cpu_devices", "lane_devices", "make_mesh", "LANE_AXIS"]

LANE_AXIS = "lanes"
_state = {"configured": None, "reason": None, "warned": False}


def available_cores() -> int:
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # pragma: no cover - not Linux
    return max(1, os.cpu_count() or 1)


def _user_chose_cpu_devices() -> bool:
  flags = os.environ.get("XLA_FLAGS", "")
  return (
      "xla_force_host_platform_device_count" in flags
      or "JAX_NUM_CPU_DEVICES" in os.environ
      or jax.config.jax_num_cpu_devices != -1
  )


def configure_cpu_devices() -> None:
  """Gives JAX one CPU device per core, if nobody chose a count already.

  Set ``VMAPTUNE_CPU_DEVICES=N`` to pick another count, or ``0`` to leave
  JAX's configuration alone.
  """
  wanted = os.environ.get("VMAPTUNE_CPU_DEVICES")
  if wanted == "0":
    _state["reason"] = "VMAPTUNE_CPU_DEVICES=0"
    return
  if _user_chose_cpu_devices() and wanted is None:
    _state["reason"] = "user-configured"
    return
  n = int(wanted) if wanted else available_cores()
  if n <= 1:
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
    _state["configured"] = n
  except RuntimeError:
    # JAX already initialised its backends (an array was created before
    # vmaptune was imported): the count can no longer change.
    _state["reason"] = "late"


def warn_if_cpu_underused(devices: Sequence[Any]) -> None:
  """Says once why a CPU search uses fewer devices than there are cores."""
  if _state["warned"] or not devices or devices[0].platform != "cpu":
    return
  cores = available_cores()
  if len(devices) >= cores or _state["reason"] in ("user-configured", "VMAPTUNE_CPU_DEVICES=0"):
    return
  _state["warned"] = True
  warnings.warn(
      f"vmaptune is using {len(devices)} CPU device(s) on a machine with "
      f"{cores} cores, so the search runs on {len(devices)} core(s). JAX was "
      "initialised before vmaptune could ask for one device per core: import "
      "vmaptune before running any JAX operation, or set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={cores} before "
      "starting Python.",
      RuntimeWarning,
      stacklevel=3,
  )


def lane_devices(devices: Any = None) -> list:
  """The devices to shard lanes over: all of the default backend's by default."""
  if devices is None:
    found = list(jax.devices())
    warn_if_cpu_underused(found)
    return found
  if isinstance(devices, int) and not isinstance(devices, bool):
    found = list(jax.devices())
    if not 1 <= devices <= len(found):
      raise ValueError(
          f"`devices` must be between 1 and the {len(found)} visible devices, got {devices}."
      )
    return found[:devices]
  try:
    found = list(devices)
  except TypeError:
    raise TypeError(
        f"`devices` must be None, an int or a list of jax devices, got {devices!r}."
    ) from None
  if not found or not all(hasattr(d, "platform") for d in found):
    raise TypeError(f"`devices` must be a non-empty list of jax devices, got {devices!r}.")
  return found


def make_mesh(devices: Sequence[Any]) -> Mesh:
  """A 1-D mesh over ``devices`` with the lane axis in Auto mode.

  ``jax.make_mesh`` now defaults to Explicit axes, under which a vmapped
  permutation fails with ``ShardingTypeError ... reshape``; build the Mesh
  directly with Auto axes.
  """
  import numpy as np

  kwargs = {}
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    kwargs["axis_types"] = (axis_type.Auto,)
  return Mesh(np.asarray(devices), (LANE_AXIS,), **kwargs)


def lane_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(LANE_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def enable_compilation_cache(path: str | None = None) -> str:
  """Keeps compiled programs on disk, so a repeated search skips XLA.

  Sets JAX's persistent compilation cache (``jax_compilation_cache_dir``) if
  it is not set yet (a cache the user configured in JAX is never changed),
  and caches programs however quickly they compiled. It is process-wide:
  other JAX programs of the process are cached there too. ``search`` and
  ``train`` call it by default (``compilation_cache=``).

  Args:
    path: the folder; default ``$VMAPTUNE_CACHE_DIR``, or
      ``$XDG_CACHE_HOME/vmaptune/xla`` (``~/.cache/vmaptune/xla``).

  Returns:
    The folder in use.

  >>> import vmaptune as vt
  >>> vt.enable_compilation_cache("/tmp/vmaptune-xla")  # doctest: +SKIP
  '/tmp/vmaptune-xla'
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if path is None:
    path = os.environ.get("VMAPTUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vmaptune", "xla")
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path


_OFF = ("0", "false", "off", "no", "none", "")


def use_compilation_cache(setting) -> str | None:
  """What ``search(compilation_cache=)`` does: the cache folder in use, or None.

  None (the default) turns the on-disk cache on, in the default folder,
  unless ``VMAPTUNE_COMPILATION_CACHE`` is ``0`` (or ``off``, ``false``) or
  names a folder; True turns it on in the default folder, a path in that
  folder, False leaves JAX alone. A folder that cannot be created is warned
  about once and the search runs without a cache.
  """
  if setting is None:
    env = os.environ.get("VMAPTUNE_COMPILATION_CACHE")
    if env is not None:
      setting = False if env.strip().lower() in _OFF else env
    else:
      setting = True
  if setting is False:
    return None
  current = jax.config.jax_compilation_cache_dir
  if current and setting is not True and os.path.realpath(os.fspath(setting)) != os.path.realpath(current):
    key = ("cache_elsewhere", current, os.fspath(setting))
    if not _state.get(key):  # JAX's cache folder is the process's: set once, by the first user
      _state[key] = True
      warnings.warn(f"vmaptune: compilation_cache={os.fspath(setting)!r} is not used: this process already "
                    f"caches compiled programs in {current!r} (JAX's jax_compilation_cache_dir is set once per "
                    "process). Start a new process to use another folder.", RuntimeWarning,
                    stacklevel=user_stacklevel())
  try:
    return enable_compilation_cache(None if setting is True else setting)
  except OSError as e:
    if not _state.get("cache_warned"):
      _state["cache_warned"] = True
      warnings.warn(f"vmaptune: no on-disk compilation cache ({e}); every run compiles afresh. "
                    "Set VMAPTUNE_CACHE_DIR to a writable folder, or compilation_cache=False.",
                    RuntimeWarning, stacklevel=user_stacklevel())
    return None


def parse_bytes(value) -> int:
  if isinstance(value, bool):
    raise TypeError(f"`memory_budget` must be bytes (int) or a string like '2GB', got {value!r}.")
  if isinstance(value, (int, float)):
    if not value > 0:
      raise ValueError(f"`memory_budget` must be positive, got {value!r}.")
    return int(value)
  if isinstance(value, str):
    text = value.strip().upper().replace("IB", "B")
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    for unit, scale in units.items():
      if text.endswith(unit):
        try:
          number = float(text[: -len(unit)])
        except ValueError:
          break
        if number > 0:
          return int(number * scale)
        break
  raise ValueError(f"`memory_budget` must be bytes (int) or a string like '512MB' or '2GB', got {value!r}.")


def memory_budget(value, devices) -> int | None:
  """Bytes each device may use for a population: the user's, or what is free.

  Accelerators report their free memory; 90% of it is the default budget.
  On CPU the budget is half the host's available memory split over the
  devices (they share it).
  """
  if value is not None:
    return parse_bytes(value)
  try:
    stats = devices[0].memory_stats()
  except Exception:  # pragma: no cover - backends without the call
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(0.9 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024 // 2 // max(1, len(devices))
  except OSError:  # pragma: no cover - not Linux
    pass
  return None
