"""The compiled program that trains a population of lanes, and where it runs.

``_lane`` says what one lane does; this module vectorises it once
(:func:`_group_fns`), lays the lanes out over devices once (:class:`Program`)
and compiles through one path (:meth:`Program._build`, one precision and
timing wrapper for every program kind):

* lanes are sharded over a 1-D device mesh (``shard_map``; lanes never talk
  to each other, so there is no collective in the step);
* on each device, ``lane_batch`` lanes are trained together by ``jax.vmap``
  and groups of them one after another (``lax.map``);
* one call of :meth:`Program.run` first (re)initialises the lanes its mask
  selects, then runs ``evals_per_call`` evaluation intervals, each a loop over
  ``eval_every`` steps followed by a validation pass. No host round trip per
  step. ``eval_every`` is an argument, not a constant, so budgets of any
  length share one compiled program, and starting, continuing and refilling
  a population are all the same program.

Programs are kept between searches in one registry (:func:`cached`), emptied
by :func:`clear_cache`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from . import _devices
from ._data import Dataset
from ._lane import LaneInputs, LaneState, TrainSpec, lane_check, lane_eval, lane_init, lane_perm, lane_step

__all__ = ["Program", "SingleProgram", "Layout", "DeviceData", "place_data", "cached", "clear_cache",
           "to_host", "put_global", "place_lanes", "host_leaf", "unhost"]

# --------------------------------------------------------------------------
# The registry of compiled programs (and checked specs), shared by searches
# --------------------------------------------------------------------------

_CACHE_SIZE = 64
_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()


def cached(key: tuple, build: Callable[[], Any]) -> Any:
  """The registry's entry for ``key``, built (and kept) on first use.

  A key holding an unhashable static value is not cached across searches.
  """
  try:
    found = _CACHE.get(key)
  except TypeError:
    return build()
  if found is not None:
    _CACHE.move_to_end(key)
    return found
  found = build()
  _CACHE[key] = found
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return found


def clear_cache() -> None:
  """Forgets every compiled program kept between searches in this process.

  Programs are cached by the identity of ``model_fn``, the optimizer, loss and
  metric, and by the shapes of the data, so a second search with the same
  setup compiles nothing. Clear the cache if a closure those functions read
  has changed.

  >>> import vmaptune as vt
  >>> vt.clear_cache()
  """
  _CACHE.clear()


# --------------------------------------------------------------------------
# Host <-> device
# --------------------------------------------------------------------------


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


def _is_key(a) -> bool:
  return jax.dtypes.issubdtype(getattr(a, "dtype", np.float32), jax.dtypes.prng_key)


def host_leaf(leaf) -> np.ndarray:
  """A state leaf as a host array (a typed key as its raw key data)."""
  if _is_key(leaf):
    leaf = jax.random.key_data(leaf)
  return to_host(leaf)


def unhost(array: np.ndarray, abstract):
  """Inverts :func:`host_leaf` for a leaf shaped like ``abstract``."""
  if _is_key(abstract):
    impl = getattr(abstract.dtype, "_impl", None)
    return jax.random.wrap_key_data(array, impl=impl) if impl is not None else jax.random.wrap_key_data(array)
  if tuple(array.shape) != tuple(abstract.shape):
    raise ValueError(f"array of shape {array.shape} does not fit state leaf {abstract.shape}")
  return np.asarray(array, dtype=abstract.dtype)


def place_lanes(tree, mesh) -> Any:
  """Host arrays whose leading axis is lanes, on the mesh's devices (sharded
  over them when several); typed keys are placed as key data and rewrapped."""
  devices = list(mesh.devices.flat)

  def one(h):
    if _is_key(h):
      return jax.random.wrap_key_data(one(jax.random.key_data(h)), impl=h.dtype._impl)
    if len(devices) == 1:
      return jax.device_put(h, devices[0])
    return put_global(h, _devices.lane_sharding(mesh))

  return jax.tree.map(one, tree)


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


# --------------------------------------------------------------------------
# A group of lanes: vectorised (leading axis) or a single lane
# --------------------------------------------------------------------------


def _group_fns(spec: TrainSpec, vectorized: bool):
  """``(init, advance)`` for a group of lanes (``vectorized``) or one lane."""
  if vectorized:
    step = jax.vmap(functools.partial(lane_step, spec), in_axes=(0, None))
    evaluate = jax.vmap(functools.partial(lane_eval, spec), in_axes=(0, None))
    check = jax.vmap(lane_check)
    perm = jax.vmap(functools.partial(lane_perm, spec))
    init = jax.vmap(functools.partial(lane_init, spec))
  else:
    step = functools.partial(lane_step, spec)
    evaluate = functools.partial(lane_eval, spec)
    check = lane_check
    perm = functools.partial(lane_perm, spec)
    init = functools.partial(lane_init, spec)
  spe = spec.steps_per_epoch

  def refresh(gs: LaneState) -> LaneState:
    # The predicate is one scalar for the whole group, so this stays a real
    # conditional under vmap: the sort runs once an epoch, not every step.
    # Only what the permutation needs passes through the conditional: XLA
    # copies a conditional's operands, and passing the whole state (3x the
    # parameters with Adam) cost 23% of a digits-MLP step on CPU.
    need = (gs.step % spe == 0) & (gs.step < gs.budget)

    def new_perm(step, data_key, old):
      fresh = perm(gs._replace(step=step, data_key=data_key))
      mask = need[..., None] if vectorized else need
      return jnp.where(mask, fresh, old)

    fresh = lax.cond(jnp.any(need), new_perm, lambda s, k, old: old, gs.step, gs.data_key, gs.perm)
    return gs._replace(perm=fresh)

  def advance(gs: LaneState, data, val, evals: int, eval_every: jax.Array):
    def interval(gs, _):
      def body(_, carry):
        gs, loss_sum, n = carry
        # No conditional around the step itself (same reason as above): a
        # lane past its budget computes the step and keeps its old state.
        gs, loss, took = step(refresh(gs), data)
        return gs, loss_sum + jnp.where(took, loss, 0.0), n + took.astype(jnp.int32)

      zeros = jnp.zeros(gs.step.shape, jnp.float32)
      gs, loss_sum, n = lax.fori_loop(0, eval_every, body, (gs, zeros, jnp.zeros(gs.step.shape, jnp.int32)))
      train_loss = loss_sum / jnp.maximum(n, 1).astype(jnp.float32)
      score = evaluate(gs, val)
      gs = check(gs, score)
      return gs, (score, train_loss, gs.step)

    return lax.scan(interval, gs, None, length=evals)

  return init, advance


def _start(init, state: LaneState, inputs: LaneInputs, mask, vectorized: bool) -> LaneState:
  """Fresh lanes where ``mask``; the others keep their state bit for bit."""
  if not vectorized:
    return lax.cond(mask, lambda s, i: init(i), lambda s, i: s, state, inputs)

  def pick(s, i):
    fresh = init(i)
    return jax.tree.map(lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (o.ndim - 1)), n, o), fresh, s)

  return lax.cond(jnp.any(mask), pick, lambda s, i: s, state, inputs)


# --------------------------------------------------------------------------
# Layout over devices and compiled programs
# --------------------------------------------------------------------------


def _shard_map(fn, mesh, in_specs, out_specs):
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # pragma: no cover - old jax

  return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def compiler_options(platform: str) -> dict:
  """XLA options per platform.

  On CPU, passing any option at all makes XLA build its debug options from its
  own flag defaults rather than JAX's bare proto, and a bucket's program then
  compiles 30-40% faster (digits MLP: 3.4-4.0 s -> 2.2-2.8 s) and runs as fast
  (``benchmarks/cpu_layout.py``, RESULTS.md). LLVM -O1 and -O2 measured the
  same within noise; -O1 it is.
  """
  if platform == "cpu":
    return {"xla_backend_optimization_level": 1}
  return {}


@dataclasses.dataclass(frozen=True)
class Layout:
  """How ``num_lanes`` lanes sit on devices: ``num_lanes = D * groups * lane_batch``."""

  num_lanes: int
  num_devices: int
  lane_batch: int

  @property
  def lanes_per_device(self) -> int:
    return self.num_lanes // self.num_devices


def _precision(precision: str | None):
  if precision is None:
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


def _quiet_donation(fn, *args):
  with warnings.catch_warnings():
    # CPU backends may decline donation; it is an optimisation only.
    warnings.filterwarnings("ignore", message=".*donated buffers.*")
    return fn(*args)


def _scalar(v: int) -> np.ndarray:
  return np.asarray(v, np.int32)


class _Compiler:
  """One compile path for every program kind: one precision and timing wrapper.

  Counters add up over the programs a :class:`Program` builds; the caller
  books them into the search's stats.
  """

  def __init__(self, precision: str | None, platform: str):
    self.precision = precision
    self.platform = platform
    self.trace_seconds = 0.0
    self.compile_seconds = 0.0
    self.programs_compiled = 0

  def build(self, fn, args, *, donate=(), out_shardings=None):
    kw = {"donate_argnums": donate} if donate else {}
    if out_shardings is not None:
      kw["out_shardings"] = out_shardings
    t0 = time.perf_counter()
    with _precision(self.precision):
      lowered = jax.jit(fn, **kw).lower(*args)
    t1 = time.perf_counter()
    opts = compiler_options(self.platform)
    try:
      compiled = lowered.compile(compiler_options=opts) if opts else lowered.compile()
    except Exception as e:  # an XLA build that does not know an option
      if not (opts and "compile option" in str(e)):
        raise
      compiled = lowered.compile()
    self.trace_seconds += t1 - t0
    self.compile_seconds += time.perf_counter() - t1
    self.programs_compiled += 1
    return compiled


class Program:
  """One bucket's compiled training program, for a fixed lane layout.

  :meth:`run` (re)initialises the lanes its mask selects and trains every
  lane ``evals_per_call`` evaluation intervals: starting a population is a
  run with every lane masked, continuing one a run with none, a refill a run
  with some. The same inputs replay the same results bit for bit.
  """

  def __init__(self, spec: TrainSpec, layout: Layout, mesh, evals_per_call: int):
    self.spec = spec
    self.layout = layout
    self.mesh = mesh
    self.evals_per_call = evals_per_call
    self.compiler = _Compiler(spec.precision, self.platform)
    self.memory = None
    self._run = None
    self._exploit = None

  @property
  def platform(self) -> str:
    return self.mesh.devices.flat[0].platform

  @property
  def compiled(self) -> bool:
    return self._run is not None

  # The per-device function -------------------------------------------------

  def _local_run(self, state: LaneState, inputs: LaneInputs, mask, train, val, eval_every):
    k = self.layout.lane_batch
    n = self.layout.lanes_per_device
    evals = self.evals_per_call
    vectorized = k > 1
    init, advance = _group_fns(self.spec, vectorized)

    def group(args):
      s, i, m = args
      s = _start(init, s, i, m, vectorized)
      return advance(s, train, val, evals, eval_every)

    if not vectorized:
      return lax.map(group, (state, inputs, mask))
    if k == n:
      state, metrics = group((state, inputs, mask))
      return state, jax.tree.map(lambda m: m.T, metrics)
    grouped = jax.tree.map(lambda a: a.reshape((n // k, k) + a.shape[1:]), (state, inputs, mask))
    state, metrics = lax.map(group, grouped)
    state = jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), state)
    # metrics: (groups, evals, k) -> (lanes, evals)
    metrics = jax.tree.map(lambda m: jnp.swapaxes(m, 1, 2).reshape((n, evals)), metrics)
    return state, metrics

  def _sharded(self, fn, in_specs, out_specs):
    if self.layout.num_devices == 1:
      return fn
    return _shard_map(fn, self.mesh, in_specs, out_specs)

  def _lane_shardings(self, count: int):
    if self.layout.num_devices == 1:
      return None
    shard = _devices.lane_sharding(self.mesh)
    return (shard,) * count if count > 1 else shard

  # Compile and run -----------------------------------------------------------

  def abstract_state(self, inputs: LaneInputs) -> LaneState:
    """Shapes and dtypes of the population's state (no compute)."""
    return jax.eval_shape(jax.vmap(functools.partial(lane_init, self.spec)), inputs)

  def zeros(self, inputs: LaneInputs) -> LaneState:
    """An all-zero population state on the devices: what a first :meth:`run`
    (every lane masked) starts from. Host zeros cost no compile."""
    def zero(a):
      if _is_key(a):
        return unhost(np.zeros(a.shape + (2,), np.uint32), a)
      return np.zeros(a.shape, a.dtype)

    return place_lanes(jax.tree.map(zero, self.abstract_state(inputs)), self.mesh)

  def compile(self, state: LaneState, inputs: LaneInputs, mask, data: DeviceData) -> None:
    """Compiles :meth:`run` for these (placed) arguments."""
    lanes = P(_devices.LANE_AXIS)
    fn = self._sharded(self._local_run, (lanes, lanes, lanes, P(), P(), P()), (lanes, lanes))
    self._run = self.compiler.build(fn, (state, inputs, mask, data.train, data.val, _scalar(1)), donate=(0,),
                                    out_shardings=self._lane_shardings(2))
    try:
      self.memory = self._run.memory_analysis()
    except Exception:  # pragma: no cover - not every backend reports it
      self.memory = None

  def run(self, state: LaneState, inputs: LaneInputs, mask, data: DeviceData, eval_every: int):
    """Refills the masked lanes, then trains ``evals_per_call`` intervals.

    Returns:
      ``(state, metrics)``: metrics are ``(scores, train_losses, steps)``,
      each of shape ``(num_lanes, evals_per_call)``, on the devices.
    """
    if self._run is None:
      self.compile(state, inputs, mask, data)
    return _quiet_donation(self._run, state, inputs, mask, data.train, data.val, _scalar(eval_every))

  def exploit(self, state: LaneState, source: np.ndarray, hparams: Mapping[str, np.ndarray],
              lr0: np.ndarray, lr_decay: np.ndarray) -> LaneState:
    """PBT's exploit step: lane ``i`` takes lane ``source[i]``'s parameters and
    optimizer state (a gather along the lane axis), and the given
    hyperparameters. A lane with ``source[i] == i`` changes only its
    hyperparameters. Data order and dropout keys stay the lane's own."""
    if self._exploit is None:
      def fn(state, source, hparams, lr0, lr_decay):
        take = lambda a: jnp.take(a, source, axis=0)
        opt_state = jax.tree.map(take, state.opt_state)
        if hasattr(opt_state, "hyperparams"):
          hp = dict(opt_state.hyperparams)
          hp.update({k: v.astype(hp[k].dtype) for k, v in hparams.items()})
          opt_state = opt_state._replace(hyperparams=hp)
        return state._replace(
            params=jax.tree.map(take, state.params),
            model_state=jax.tree.map(take, state.model_state),
            opt_state=opt_state,
            lr0=lr0, lr_decay=lr_decay,
            diverged_at=take(state.diverged_at),
        )

      self._exploit = self.compiler.build(fn, (state, source, dict(hparams), lr0, lr_decay),
                                          out_shardings=self._lane_shardings(1))
    return self._exploit(state, source, dict(hparams), lr0, lr_decay)


class SingleProgram:
  """One lane alone, jitted without vmap: :func:`vmaptune.train`.

  :meth:`advance` runs one evaluation interval per call so a callback can look
  at the curve and change hyperparameters between calls.
  """

  def __init__(self, spec: TrainSpec, device):
    self.spec = spec
    self.device = device
    self.compiler = _Compiler(spec.precision, device.platform)
    self._init = None
    self._advance = None

  def init(self, inputs: LaneInputs) -> LaneState:
    inputs = jax.device_put(inputs, self.device)
    if self._init is None:
      init, _ = _group_fns(self.spec, vectorized=False)
      self._init = self.compiler.build(init, (inputs,))
    return self._init(inputs)

  def advance(self, state: LaneState, data: DeviceData, eval_every: int):
    """One evaluation interval: ``(state, (score, train_loss, step))``."""
    if self._advance is None:
      _, advance = _group_fns(self.spec, vectorized=False)

      def one_interval(state, train, val, eval_every):
        state, metrics = advance(state, train, val, 1, eval_every)
        return state, jax.tree.map(lambda m: m[0], metrics)

      self._advance = self.compiler.build(one_interval, (state, data.train, data.val, _scalar(eval_every)),
                                          donate=(0,))
    return _quiet_donation(self._advance, state, data.train, data.val, _scalar(eval_every))
