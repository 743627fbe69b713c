"""Where arrays live: host <-> devices, lane-sharded states and replicated data."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from . import _devices
from ._data import Dataset

__all__ = ["put_global", "to_host", "host_leaf", "unhost", "place_lanes", "DeviceData", "place_data",
           "abstract", "is_key", "lane_params"]



def put_global(a: np.ndarray, sharding) -> jax.Array:
  """Places a host array (the same on every process) with ``sharding``.

  Single-process this is ``jax.device_put``; under ``jax.distributed`` each
  process materialises only the shards of its own devices.
  """
  if jax.process_count() == 1:
    return jax.device_put(a, sharding)
  a = np.asarray(a)
  return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def to_host(tree: Any) -> Any:
  """NumPy copies of (possibly multi-process) arrays: the same on every process."""
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)

  return jax.tree.map(one, tree)


def is_key(a) -> bool:
  return jax.dtypes.issubdtype(getattr(a, "dtype", np.float32), jax.dtypes.prng_key)


def host_leaf(leaf) -> np.ndarray:
  """A state leaf as a host array (a typed key as its raw key data)."""
  if is_key(leaf):
    leaf = jax.random.key_data(leaf)
  return to_host(leaf)


def unhost(array: np.ndarray, abstract):
  """Inverts :func:`host_leaf` for a leaf shaped like ``abstract``."""
  if is_key(abstract):
    impl = getattr(abstract.dtype, "_impl", None)
    return jax.random.wrap_key_data(array, impl=impl) if impl is not None else jax.random.wrap_key_data(array)
  if tuple(array.shape) != tuple(abstract.shape):
    raise ValueError(f"array of shape {array.shape} does not fit state leaf {abstract.shape}")
  return np.asarray(array, dtype=abstract.dtype)


def place_lanes(tree, mesh) -> Any:
  """Host arrays whose leading axis is lanes, on the mesh's devices (sharded
  over them when several); typed keys are placed as key data and rewrapped."""
  devices = list(mesh.devices.flat)
  target = devices[0] if len(devices) == 1 else _devices.lane_sharding(mesh)
  leaves, treedef = jax.tree.flatten(tree)
  keys = [is_key(h) for h in leaves]
  raw = [jax.random.key_data(h) if k else h for h, k in zip(leaves, keys)]
  if jax.process_count() == 1:
    placed = jax.device_put(raw, target)  # one batched transfer: a call per leaf cost ~0.45 ms each
  else:
    placed = [put_global(h, target) for h in raw]
  placed = [jax.random.wrap_key_data(p, impl=h.dtype._impl) if k else p for p, h, k in zip(placed, leaves, keys)]
  return jax.tree.unflatten(treedef, placed)


class DeviceData(NamedTuple):
  """Training and validation arrays, on the devices once per search."""

  train: tuple
  val: tuple


def place_data(dataset: Dataset, eval_batch_size: int, mesh) -> DeviceData:
  """Puts the data on every device of ``mesh`` (replicated), once.

  The validation pytree is cut into chunks of ``eval_batch_size`` examples;
  the last chunk is padded, and a weight of 0 keeps the padding out of a
  per-example score. The examples of a partial last chunk are also kept
  unpadded (``rest``), for metrics that return one scalar per chunk.
  """
  n_val = dataset.num_val
  e = min(eval_batch_size, n_val)
  chunks = -(-n_val // e)
  pad = chunks * e - n_val

  def chunked(a):
    if pad:
      a = np.concatenate([a, np.repeat(a[:1], pad, axis=0)], axis=0)
    return a.reshape((chunks, e) + a.shape[1:])

  weights = np.concatenate([np.ones(n_val, np.float32), np.zeros(pad, np.float32)]).reshape(chunks, e)
  sharding = _devices.replicated(mesh)
  put = lambda tree: jax.tree.map(lambda a: put_global(a, sharding), tree)
  rest = put(jax.tree.map(lambda a: a[(chunks - 1) * e:], dataset.val)) if pad else None
  return DeviceData(put(dataset.train), (put(jax.tree.map(chunked, dataset.val)), put(weights), rest))


def abstract(tree, sharding):
  """``ShapeDtypeStruct``s of a host or abstract tree, placed like the real arguments."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def lane_params(state, lane: int):
  """``(params, model_state)`` of one lane of a population state, on the host."""
  take = lambda a: a[lane]
  if jax.process_count() > 1:  # gather the lane to every process, as host arrays
    params, model_state = jax.tree.map(take, (state.params, state.model_state))
    rehost = lambda tree: jax.tree.map(lambda h, a: unhost(h, a) if jax.dtypes.issubdtype(
        a.dtype, jax.dtypes.prng_key) else h, jax.tree.map(host_leaf, tree), tree)
    return rehost(params), rehost(model_state)
  return jax.tree.map(lambda a: _host_lane(a, lane), state.params), jax.tree.map(take, state.model_state)


def _host_lane(a, lane: int) -> np.ndarray:
  """Lane ``lane`` of a lane-sharded array, copied from the device that holds
  it. Indexing the device array instead compiles a gather per leaf shape: on
  the 2-core CPU, with a background compile running, a search's first
  finished trial took a second to copy (measured), time its pace counted."""
  for shard in a.addressable_shards:
    rows = shard.index[0] if shard.index else slice(None)
    start, stop, _ = rows.indices(a.shape[0])
    if start <= lane < stop:
      return np.asarray(shard.data)[lane - start]
  return np.asarray(jax.device_get(a[lane]))  # pragma: no cover - a lane on no local device
