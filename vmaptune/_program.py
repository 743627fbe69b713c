"""The compiled program that trains a population of lanes, and where it runs.

``_lane`` says what one lane does; this module vectorises it once
(:func:`_group_fns`), lays the lanes out over devices once (:class:`Program`)
and compiles through one path (``_compiler.Compiler``, one precision and
timing wrapper for every program kind):

* lanes are sharded over a 1-D device mesh (``shard_map``; lanes never talk
  to each other, so there is no collective in the step);
* on each device, ``lane_batch`` lanes are trained together by ``jax.vmap``
  and groups of them one after another (``lax.map``);
* :meth:`Program.start` (re)initialises the lanes a mask selects;
  :meth:`Program.run` runs ``evals_per_call`` evaluation intervals, each a
  loop over ``eval_every`` steps followed by a validation pass. No host round
  trip per step. ``eval_every`` is an argument, not a constant, so budgets of
  any length share one compiled program, and starting, continuing and
  refilling a population are the same two programs.

Programs are kept between searches in one registry (``_compiler.cached``),
emptied by ``vt.clear_cache``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from . import _devices
from ._compiler import Compiler, counted_flops, has_convolution, quiet_donation, start_pool
from ._lane import LaneInputs, LaneState, TrainSpec, lane_check, lane_eval, lane_init, lane_perm, lane_step
from ._placement import DeviceData, abstract, is_key, place_lanes, unhost

__all__ = ["Program", "Layout"]


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
    def train(gs):
      def body(_, carry):
        gs, loss_sum, n = carry
        # No conditional around the step itself (same reason as above): a
        # lane past its budget computes the step and keeps its old state.
        gs, loss, took = step(refresh(gs), data)
        return gs, loss_sum + jnp.where(took, loss, 0.0), n + took.astype(jnp.int32)

      zeros = jnp.zeros(gs.step.shape, jnp.float32)
      return lax.fori_loop(0, eval_every, body, (gs, zeros, jnp.zeros(gs.step.shape, jnp.int32)))

    def interval(gs, _):
      if vectorized:
        gs, loss_sum, n = train(gs)
      else:
        # One lane: an interval that starts past the lane's budget (a lane
        # that finishes during a call) skips its steps by a real conditional
        # (one copy of its state per interval, not per step); a lane with no
        # steps left when a call starts is not run at all (_busy_lanes). The
        # evaluation stays outside: inside a conditional XLA may compile it
        # differently per program, and a lane's scores must not depend on
        # its neighbours' count.
        skip = lambda gs: (gs, jnp.float32(0.0), jnp.int32(0))
        gs, loss_sum, n = lax.cond(gs.step < gs.budget, train, skip, gs)
      train_loss = loss_sum / jnp.maximum(n, 1).astype(jnp.float32)
      score = evaluate(gs, val)
      gs = check(gs, score)
      return gs, (score, train_loss, gs.step)

    return lax.scan(interval, gs, None, length=evals)

  return init, advance


def _busy_lanes(advance, state: LaneState, evals: int):
  """``advance`` over one device's lanes one at a time, only those with steps
  left when the call starts (``step < budget``).

  A lane without steps left (idle, held back or finished) would only repeat
  its last validation pass, whose result nobody reads; on CPU with a few
  lanes training among many held ones, those passes cost more than the
  training. The loop's trip count is the busy lanes' (a traced value, so one
  program serves every count) and its body is the same whichever lanes are
  busy, so a lane's numbers do not depend on its neighbours. A skipped lane
  keeps its state bit for bit; its metrics are NaN scores, zero losses and
  its step.
  """
  busy = state.step < state.budget
  n = busy.shape[0]
  metrics = (jnp.full((n, evals), jnp.nan, jnp.float32), jnp.zeros((n, evals), jnp.float32),
             jnp.broadcast_to(state.step[:, None], (n, evals)))

  def body(i, carry):
    state, metrics = carry
    lane, out = advance(_lane(state, i))
    return _put(state, lane, i), _put(metrics, out, i)

  return _for_lanes(busy, body, (state, metrics))


def _fresh_lanes(init, state: LaneState, inputs: LaneInputs, mask) -> LaneState:
  """``init`` (of one lane) for the lanes ``mask`` selects alone, each
  written in place: no work on the others. (A conditional in a loop over
  every lane compiled 13-32% slower and restarted one lane of 12 in twice
  the time on the 2-core CPU.)"""
  return _for_lanes(mask, lambda i, state: _put(state, init(_lane(inputs, i)), i), state)


def _for_lanes(selected, body, carry):
  """``carry = body(i, carry)`` for each lane ``i`` that ``selected`` picks,
  in lane order. The trip count is traced: one program serves every count."""
  order = jnp.argsort(jnp.logical_not(selected), stable=True)  # selected lanes first, in lane order
  return lax.fori_loop(0, jnp.sum(selected.astype(jnp.int32)), lambda j, c: body(order[j], c), carry)


def _lane(tree, i):
  """Lane ``i`` of ``tree`` (a lane axis leads)."""
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _put(tree, lane, i):
  """``tree`` with lane ``i`` replaced by ``lane``, in place."""
  return jax.tree.map(lambda a, b: lax.dynamic_update_index_in_dim(a, b, i, 0), tree, lane)


def _start(init, state: LaneState, inputs: LaneInputs, mask) -> LaneState:
  """Fresh lanes where ``mask`` (a lane axis leads); the others keep their state bit for bit."""
  fresh = init(inputs)
  return jax.tree.map(lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (o.ndim - 1)), n, o), fresh, state)


# --------------------------------------------------------------------------
# Layout over devices and compiled programs
# --------------------------------------------------------------------------


def _trace_context():
  """JAX's configuration as it affects tracing, on this thread (None if this
  JAX does not say)."""
  try:
    from jax._src import config  # noqa: PLC0415

    return config.trace_context()
  except Exception:  # noqa: BLE001 - a JAX without it: lower on the caller's thread
    return None


def _shard_map(fn, mesh, in_specs, out_specs):
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # pragma: no cover - old jax

  return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How ``num_lanes`` lanes sit on devices: ``num_lanes = D * groups * lane_batch``."""

  num_lanes: int
  num_devices: int
  lane_batch: int

  @property
  def lanes_per_device(self) -> int:
    return self.num_lanes // self.num_devices


def _scalar(v: int) -> np.ndarray:
  return np.asarray(v, np.int32)


class Program:
  """One bucket's compiled training programs, for a fixed lane layout.

  Two programs: :meth:`start` (re)initialises the lanes a mask selects and
  leaves the others bit for bit (compiled with the cheapest options: it runs
  once per trial), and :meth:`run` trains every lane ``evals_per_call``
  evaluation intervals (compiled at the tier its predicted training time
  calls for, :func:`tier_for`). Starting a population is a start of every
  lane then a run, continuing one a run, a refill a start of some lanes then
  a run. The same inputs at the same tier replay the same results bit for
  bit.

  Building takes two steps: :meth:`lower` (trace and lower, on the calling
  thread) and :meth:`compile` (XLA), which :meth:`compile_on` hands to a
  thread pool.
  """

  def __init__(self, spec: TrainSpec, layout: Layout, mesh, evals_per_call: int):
    self.spec = spec
    self.layout = layout
    self.mesh = mesh
    self.evals_per_call = evals_per_call
    self.compiler = Compiler(spec.precision, self.platform)
    self.memory = None
    #: The tier the next compile of :meth:`run` uses (set before compiling).
    self.tier = "long"
    #: The tier of :meth:`start` (``_compiler.START_TIERS``): "init" where a
    #: population starts its lanes once a round, "restarts" where its
    #: strategy restarts lanes at every decision (set before compiling).
    self.start_tier = "init"
    self._lowered: dict[str, Any] = {}   # "start", "run": jax Lowered
    self._compiled: dict[str, Any] = {}  # "start:<start_tier>", "run:<tier>": executables
    self._future = None
    self._lowering = None  # a background lower(): lower_on()
    #: Lowers on the calling thread only (see :meth:`lower_on`).
    self.foreground = False
    self._exploit = None
    self._flops: Any = ...  # step_flops(), once asked
    self._conv: bool | None = None  # has_convolution(), once asked

  @property
  def platform(self) -> str:
    return self.mesh.devices.flat[0].platform

  # The per-device functions -------------------------------------------------

  def _per_device(self, fn, trees):
    """``fn`` over this device's lanes in vmapped groups of ``lane_batch``
    (> 1: one lane at a time, the callers loop themselves); ``trees`` lead
    with the lane axis."""
    k, n = self.layout.lane_batch, self.layout.lanes_per_device
    if k == n:
      return fn(trees)
    grouped = jax.tree.map(lambda a: a.reshape((n // k, k) + a.shape[1:]), trees)
    return lax.map(fn, grouped)

  def _local_start(self, state: LaneState, inputs: LaneInputs, mask):
    k, n = self.layout.lane_batch, self.layout.lanes_per_device
    init, _ = _group_fns(self.spec, vectorized=k > 1)
    if k == 1:
      return _fresh_lanes(init, state, inputs, mask)
    out = self._per_device(lambda a: _start(init, *a), (state, inputs, mask))
    if k == n:
      return out
    return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)

  def _local_run(self, state: LaneState, train, val, eval_every):
    k, n = self.layout.lane_batch, self.layout.lanes_per_device
    evals = self.evals_per_call
    _, advance = _group_fns(self.spec, vectorized=k > 1)
    if k == 1:
      return _busy_lanes(lambda s: advance(s, train, val, evals, eval_every), state, evals)
    state, metrics = self._per_device(lambda s: advance(s, train, val, evals, eval_every), state)
    if k == n:
      return state, jax.tree.map(lambda m: m.T, metrics)
    state = jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), state)
    # metrics: (groups, evals, k) -> (lanes, evals)
    return state, jax.tree.map(lambda m: jnp.swapaxes(m, 1, 2).reshape((n, evals)), metrics)

  def _sharded(self, fn, in_specs, out_specs):
    if self.layout.num_devices == 1:
      return fn
    return _shard_map(fn, self.mesh, in_specs, out_specs)

  def _lane_shardings(self, count: int):
    if self.layout.num_devices == 1:
      return None
    shard = _devices.lane_sharding(self.mesh)
    return (shard,) * count if count > 1 else shard

  def _lane_sharding(self):
    if self.layout.num_devices == 1:
      return jax.sharding.SingleDeviceSharding(self.mesh.devices.flat[0])
    return _devices.lane_sharding(self.mesh)

  # Build -------------------------------------------------------------------

  def abstract_state(self, inputs: LaneInputs) -> LaneState:
    """Shapes and dtypes of the population's state (no compute): the spec's
    one-lane state with a lane axis in front."""
    one = self.spec.abstract_state
    if one is None:
      return jax.eval_shape(jax.vmap(functools.partial(lane_init, self.spec)), inputs)
    n = jax.tree.leaves(inputs)[0].shape[0]
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + a.shape, a.dtype), one)

  def zeros(self, inputs: LaneInputs) -> LaneState:
    """An all-zero population state on the devices: what a first :meth:`start`
    (every lane masked) starts from. Host zeros cost no compile."""
    def zero(a):
      if is_key(a):
        return unhost(np.zeros(a.shape + (2,), np.uint32), a)
      return np.zeros(a.shape, a.dtype)

    return place_lanes(jax.tree.map(zero, self.abstract_state(inputs)), self.mesh)

  @property
  def compiled(self) -> bool:
    """Whether :meth:`start` at ``start_tier`` and :meth:`run` at ``tier`` are ready."""
    return f"start:{self.start_tier}" in self._compiled and f"run:{self.tier}" in self._compiled

  @property
  def lowered(self) -> bool:
    return "run" in self._lowered

  def has_convolution(self) -> bool:
    """Whether :meth:`run`, once lowered, holds a convolution (False before)."""
    if self._conv is None and self.lowered:
      self._conv = has_convolution(self._lowered["run"])
    return bool(self._conv)

  def step_flops(self) -> float | None:
    """XLA's FLOP count of :meth:`run` (a lane-step and a validation batch) once lowered, or None."""
    if self._flops is ... and self.lowered:
      self._flops = counted_flops(self._lowered["run"])
    return None if self._flops is ... else self._flops

  def lower(self, inputs: LaneInputs, data: DeviceData, *, count: bool = False) -> None:
    """Traces and lowers :meth:`start` and :meth:`run` for inputs shaped like
    ``inputs`` (host arrays or shapes): every error of the model, loss and
    optimizer surfaces here, before XLA compiles anything.

    With ``count`` (the background lowering of :meth:`lower_on`), it also
    takes XLA's FLOP count and the convolution check of :meth:`run` before
    :attr:`lowered` turns true: they take 50-130 ms a program (the count
    converts the module to HLO), which a timeout search would otherwise spend
    on its training thread for every program (0.35-0.8 s of a 10 s search of
    six MLP shapes, measured)."""
    if self.lowered:
      return
    lanes = P(_devices.LANE_AXIS)
    shard = self._lane_sharding()
    inputs = abstract(inputs, shard)
    state = abstract(self.abstract_state(inputs), shard)
    mask = jax.ShapeDtypeStruct((self.layout.num_lanes,), np.bool_, sharding=shard)
    start = self._sharded(self._local_start, (lanes, lanes, lanes), lanes)
    run = self._sharded(self._local_run, (lanes, P(), P(), P()), (lanes, lanes))
    self._lowered["start"] = self.compiler.lower(start, (state, inputs, mask), donate=(0,),
                                                 out_shardings=self._lane_shardings(1))
    lowered = self.compiler.lower(run, (state, data.train, data.val, jax.ShapeDtypeStruct((), np.int32)),
                                  donate=(0,), out_shardings=self._lane_shardings(2))
    if count:
      self._flops, self._conv = counted_flops(lowered), has_convolution(lowered)
    self._lowered["run"] = lowered

  def compile(self) -> None:
    """XLA-compiles :meth:`start` at ``start_tier`` and :meth:`run` at ``tier`` (releases the GIL: thread-safe)."""
    start = None
    skey = f"start:{self.start_tier}"
    if skey not in self._compiled:
      pool = start_pool(self.platform)  # beside run's compile (None: in line)
      if pool is None:
        self._compiled[skey] = self.compiler.compile(self._lowered["start"], self.start_tier)
      else:
        start = pool.submit(self.compiler.compile, self._lowered["start"], self.start_tier)
    key = f"run:{self.tier}"
    try:
      if key not in self._compiled:
        compiled = self.compiler.compile(self._lowered["run"], self.tier)
        try:
          self.memory = compiled.memory_analysis()
        except Exception:  # pragma: no cover - not every backend reports it
          self.memory = None
        self._compiled[key] = compiled
    finally:
      if start is not None:
        self._compiled[skey] = start.result()

  def compile_on(self, pool) -> None:
    """Compiles on ``pool`` (a ``concurrent.futures`` executor) in the background."""
    if not self.compiled and self._future is None:
      self._future = pool.submit(self.compile)

  def lower_on(self, pool, inputs: LaneInputs, data: DeviceData) -> None:
    """Lowers on ``pool`` (a one-thread executor) in the background;
    :meth:`wait_lowered` collects it (and raises its error).

    JAX's configuration contexts (``with jax.numpy_rank_promotion(...)``,
    x64, matmul precision) are per thread: if the thread that lowers does
    not see the caller's, the program is left to lower on the caller's
    thread (:attr:`foreground`)."""
    if self.lowered or self._lowering is not None or self.foreground:
      return
    context = _trace_context()
    if context is None:
      self.foreground = True
      return

    def lower():
      if _trace_context() != context:
        self.foreground = True
        return
      self.lower(inputs, data, count=True)

    self._lowering = pool.submit(lower)

  @property
  def lowering(self) -> bool:
    """A background lowering is pending or running."""
    return self._lowering is not None and not self._lowering.done()

  def join_lowering(self) -> None:
    """Blocks until a background lowering has ended; its outcome stays for
    :meth:`wait_lowered`."""
    if self._lowering is not None:
      concurrent.futures.wait([self._lowering])

  def wait_lowered(self) -> None:
    """Blocks until a background lowering is done (raises its error)."""
    future, self._lowering = self._lowering, None
    if future is not None:
      future.result()

  def cancel(self) -> None:
    """Drops a background compile or lowering that has not started (it runs again when needed)."""
    for name in ("_future", "_lowering"):
      future = getattr(self, name)
      if future is not None and future.cancel():
        setattr(self, name, None)

  def wait(self) -> None:
    """Blocks until a background compile is done (raises its error)."""
    future, self._future = self._future, None
    if future is not None:
      future.result()

  def _ready(self, tier: str, inputs, data) -> None:
    self.wait()
    self.tier = tier
    if not self.compiled:
      self.wait_lowered()
      self.lower(inputs, data)
      self.compile()

  # Run ---------------------------------------------------------------------

  def start(self, state: LaneState, inputs: LaneInputs, mask, data: DeviceData,
            tier: str | None = None) -> LaneState:
    """Fresh lanes where ``mask`` (placed bools), the others untouched, with
    the program of ``tier`` (default: the current ``start_tier``)."""
    key = f"start:{tier or self.start_tier}"
    if key not in self._compiled:
      self.wait()
      self.start_tier = tier or self.start_tier
      self._ready(self.tier, inputs, data)
    return quiet_donation(self._compiled[key], state, inputs, mask)

  def run(self, state: LaneState, data: DeviceData, eval_every: int, tier: str | None = None):
    """Trains ``evals_per_call`` intervals, with the program of ``tier``
    (default: the current one).

    Returns:
      ``(state, metrics)``: metrics are ``(scores, train_losses, steps)``,
      each of shape ``(num_lanes, evals_per_call)``, on the devices.
    """
    key = f"run:{tier or self.tier}"
    if key not in self._compiled:
      self.wait()
      self.tier = tier or self.tier
      self.compile()
    return quiet_donation(self._compiled[key], state, data.train, data.val, _scalar(eval_every))

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
