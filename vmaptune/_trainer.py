"""The compiled program that trains a population of lanes.

Written for one lane (:func:`lane_init`, :func:`lane_step`, :func:`lane_eval`),
vectorised in one place (:func:`_group_fns`), and laid out over devices in one
place (:class:`Program`):

* lanes are sharded over a 1-D device mesh (``shard_map``; lanes never talk to
  each other, so there is no collective in the step);
* on each device, ``lane_batch`` lanes are trained together by ``jax.vmap``
  and groups of them one after another (``lax.map``);
* a call runs ``evals_per_call`` evaluation intervals, each a loop over
  ``eval_every`` steps followed by a validation pass. No host round trip per
  step. ``eval_every`` is an argument, not a constant, so budgets of any
  length share one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from . import _devices
from ._data import Dataset, Objective
from ._model import ModelAdapter

__all__ = ["TrainSpec", "LaneInputs", "LaneState", "Program", "DeviceData"]


class LaneInputs(NamedTuple):
  """What distinguishes one lane from another; every leaf has shape ``()`` per lane.

  Attributes:
    seed: the trial seed (uint32); init, data order and dropout derive from it.
    hparams: injected optimizer hyperparameters by name (float32 or int32).
    lr_decay: decay rate of the learning-rate schedule (float32).
    budget: how many steps the lane trains (int32).
  """

  seed: jax.Array
  hparams: dict
  lr_decay: jax.Array
  budget: jax.Array


class LaneState(NamedTuple):
  """One lane's training state (a leading lane axis when stacked).

  Attributes:
    params: the model's trainable parameters.
    model_state: non-parameter state (batch statistics, NNX rng counters).
    opt_state: the optimizer state, hyperparameters injected.
    lr0: the base learning rate the schedule decays from (float32).
    lr_decay: the schedule's decay rate (float32).
    step: steps taken so far (int32).
    budget: steps to take in all (int32).
    data_key: raw key data for the per-epoch data permutation.
    dropout_key: raw key data for dropout and other training noise.
    perm: this epoch's permutation of the training examples (int32).
    diverged_at: the step whose loss or parameters were non-finite, -1 if none.
  """

  params: Any
  model_state: Any
  opt_state: Any
  lr0: jax.Array
  lr_decay: jax.Array
  step: jax.Array
  budget: jax.Array
  data_key: jax.Array
  dropout_key: jax.Array
  perm: jax.Array
  diverged_at: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSpec:
  """Everything static about one bucket's program.

  Attributes:
    adapter: the model at this bucket's structural config.
    optimizer: an optax factory (hyperparameters injected) or a fixed
      ``GradientTransformation`` when ``injected`` is empty and
      ``factory_kind == "transform"``.
    factory_kind: ``"factory"`` or ``"transform"``.
    injected: names of per-lane optimizer hyperparameters.
    int_injected: the subset of ``injected`` that are integers.
    static_opt: non-numeric optimizer arguments (bools, callables, ...).
    schedule: ``None``, ``"inverse_time"`` or ``"exponential"``.
    batch_size: examples per step.
    eval_batch_size: validation examples per chunk of the validation pass.
    objective: loss and metric.
    num_train, num_val: dataset sizes.
    precision: matmul precision for ``jax.default_matmul_precision``.
  """

  adapter: ModelAdapter
  optimizer: Any
  factory_kind: str
  injected: tuple
  int_injected: tuple
  static_opt: tuple
  schedule: str | None
  batch_size: int
  eval_batch_size: int
  objective: Objective
  num_train: int
  num_val: int
  precision: str | None = None

  @property
  def steps_per_epoch(self) -> int:
    return self.num_train // self.batch_size

  def make_optimizer(self, hparams: Mapping[str, Any]) -> optax.GradientTransformation:
    if self.factory_kind == "transform":
      return self.optimizer
    static = dict(self.static_opt)
    callables = tuple(k for k, v in static.items() if callable(v))
    return optax.inject_hyperparams(
        self.optimizer, static_args=callables, hyperparam_dtype=jnp.float32
    )(**hparams, **static)


# --------------------------------------------------------------------------
# One lane
# --------------------------------------------------------------------------


def _key(raw: jax.Array) -> jax.Array:
  return jax.random.wrap_key_data(raw)


def lane_init(spec: TrainSpec, inputs: LaneInputs) -> LaneState:
  """A lane's initial state from its inputs alone."""
  key = jax.random.key(inputs.seed)
  k_model, k_data, k_dropout = jax.random.split(key, 3)
  params, model_state = spec.adapter.init(k_model)
  opt_state = spec.make_optimizer(inputs.hparams).init(params)
  if spec.schedule is not None:
    lr0 = opt_state.hyperparams["learning_rate"]
  else:
    lr0 = jnp.zeros((), jnp.float32)
  return LaneState(
      params=params,
      model_state=model_state,
      opt_state=opt_state,
      lr0=jnp.asarray(lr0, jnp.float32),
      lr_decay=jnp.asarray(inputs.lr_decay, jnp.float32),
      step=jnp.zeros((), jnp.int32),
      budget=jnp.asarray(inputs.budget, jnp.int32),
      data_key=jax.random.key_data(k_data),
      dropout_key=jax.random.key_data(k_dropout),
      perm=jnp.zeros((spec.num_train,), jnp.int32),
      diverged_at=jnp.full((), -1, jnp.int32),
  )


def lane_perm(spec: TrainSpec, state: LaneState) -> jax.Array:
  """The permutation of the epoch ``state.step`` falls in."""
  epoch = state.step // spec.steps_per_epoch
  key = jax.random.fold_in(_key(state.data_key), epoch)
  return jax.random.permutation(key, spec.num_train).astype(jnp.int32)


def _scheduled_lr(spec: TrainSpec, state: LaneState) -> jax.Array:
  epoch = (state.step // spec.steps_per_epoch).astype(jnp.float32)
  if spec.schedule == "inverse_time":
    return state.lr0 / (1.0 + state.lr_decay * epoch)
  if spec.schedule == "exponential":
    return state.lr0 * jnp.exp(-state.lr_decay * epoch)
  raise ValueError(spec.schedule)


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.ones((), bool)
  return jnp.all(jnp.stack(leaves))


def lane_loss(spec: TrainSpec, params, state: LaneState, x, y):
  """Mean training loss of one mini-batch and the updated model state."""
  key = jax.random.fold_in(_key(state.dropout_key), state.step)
  out, model_state = spec.adapter.apply(params, state.model_state, x, True, key)
  return jnp.mean(spec.objective.loss_fn(out, y)), model_state


def lane_batch(spec: TrainSpec, state: LaneState, data) -> tuple[jax.Array, jax.Array]:
  """The lane's mini-batch for its current step, from its own permutation."""
  x, y = data
  i = state.step % spec.steps_per_epoch
  idx = lax.dynamic_slice_in_dim(state.perm, i * spec.batch_size, spec.batch_size)
  return jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)


def lane_step(spec: TrainSpec, state: LaneState, data) -> tuple[LaneState, jax.Array, jax.Array]:
  """One optimisation step; a lane that goes non-finite is frozen instead.

  Returns:
    ``(state, loss, took)``: ``took`` is False where the lane was frozen or
    past its budget, and ``state`` is then the old one.
  """
  xb, yb = lane_batch(spec, state, data)
  (loss, model_state), grads = jax.value_and_grad(
      functools.partial(lane_loss, spec), has_aux=True
  )(state.params, state, xb, yb)
  opt_state = state.opt_state
  if spec.schedule is not None:
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = _scheduled_lr(spec, state).astype(hp["learning_rate"].dtype)
    opt_state = opt_state._replace(hyperparams=hp)
  opt = spec.make_optimizer({k: opt_state.hyperparams[k] for k in spec.injected}) if spec.injected else spec.make_optimizer({})
  updates, opt_state = opt.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  active = state.step < state.budget
  # Only the loss is checked every step: a reduction over all parameters
  # costs ~10% of a small step on CPU. Parameters are checked at every
  # evaluation (lane_check); a non-finite parameter makes the next loss
  # non-finite anyway, so the lane freezes at most one step late.
  ok = jnp.isfinite(loss) & (state.diverged_at < 0)
  take = ok & active
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(take, n, o), new, old)
  # Parameters and model state (batch statistics) freeze; the optimizer state
  # need not: a lane that stops taking steps (diverged, or past its budget)
  # never takes one again without a fresh init (refill) or a copied state
  # (PBT), so selecting its moments every step (2x the parameters with Adam)
  # would buy nothing.
  new_state = state._replace(
      params=keep(params, state.params),
      model_state=keep(model_state, state.model_state),
      opt_state=opt_state,
      step=state.step + active.astype(jnp.int32),
      diverged_at=jnp.where(
          active & ~ok & (state.diverged_at < 0), state.step, state.diverged_at
      ),
  )
  return new_state, loss.astype(jnp.float32), take


def lane_eval(spec: TrainSpec, state: LaneState, val) -> jax.Array:
  """Mean validation metric of one lane, in evaluation mode, chunk by chunk."""
  xv, yv, wv = val

  def body(total, chunk):
    xc, yc, wc = chunk
    out, _ = spec.adapter.apply(state.params, state.model_state, xc, False, None)
    values = spec.objective.metric_fn(out, yc).astype(jnp.float32)
    return total + jnp.sum(values * wc), None

  total, _ = lax.scan(body, jnp.zeros((), jnp.float32), (xv, yv, wv))
  return total / spec.num_val


def lane_check(state: LaneState, score: jax.Array) -> LaneState:
  """Marks a lane diverged if its parameters or validation score are non-finite."""
  bad = ~(_all_finite(state.params) & jnp.isfinite(score)) & (state.diverged_at < 0)
  return state._replace(diverged_at=jnp.where(bad, state.step, state.diverged_at))


# --------------------------------------------------------------------------
# A group of lanes: vectorised (leading axis) or a single lane
# --------------------------------------------------------------------------


def _group_fns(spec: TrainSpec, vectorized: bool):
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

  def one_step(gs: LaneState, data):
    # No conditional around the step itself (same reason): a lane past its
    # budget computes the step and keeps its old state (lane_step's select).
    return step(refresh(gs), data)

  def advance(gs: LaneState, data, val, evals: int, eval_every: jax.Array):
    def interval(gs, _):
      def body(_, carry):
        gs, loss_sum, n = carry
        gs, loss, took = one_step(gs, data)
        return gs, loss_sum + jnp.where(took, loss, 0.0), n + took.astype(jnp.int32)

      zeros = jnp.zeros(gs.step.shape, jnp.float32)
      gs, loss_sum, n = lax.fori_loop(0, eval_every, body, (gs, zeros, jnp.zeros(gs.step.shape, jnp.int32)))
      train_loss = loss_sum / jnp.maximum(n, 1).astype(jnp.float32)
      score = evaluate(gs, val)
      gs = check(gs, score)
      return gs, (score, train_loss, gs.step)

    return lax.scan(interval, gs, None, length=evals)

  return init, advance


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


class DeviceData(NamedTuple):
  """Training and validation arrays, on the devices once per search."""

  train: tuple
  val: tuple


def place_data(dataset: Dataset, eval_batch_size: int, mesh) -> DeviceData:
  """Puts the data on every device of ``mesh`` (replicated), once."""
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
  put = lambda a: put_global(a, sharding)
  train = (put(dataset.x_train), put(dataset.y_train))
  val = (put(chunked(dataset.x_val)), put(chunked(dataset.y_val)), put(weights))
  return DeviceData(train, val)


@dataclasses.dataclass
class Layout:
  """How ``num_lanes`` lanes sit on devices: ``num_lanes = D * groups * lane_batch``."""

  num_lanes: int
  num_devices: int
  lane_batch: int

  @property
  def lanes_per_device(self) -> int:
    return self.num_lanes // self.num_devices


def _compile(lowered, platform: str):
  opts = compiler_options(platform)
  try:
    return lowered.compile(compiler_options=opts) if opts else lowered.compile()
  except Exception as e:  # an XLA build that does not know an option
    if opts and "compile option" in str(e):
      return lowered.compile()
    raise


class Program:
  """One bucket's compiled training program, for a fixed lane layout.

  :meth:`fresh` initialises and trains a population in one call (one
  compiled program); :meth:`advance` continues a population from a state
  (compiled on first use, for resuming). The same inputs replay the same
  results bit for bit.
  """

  def __init__(self, spec: TrainSpec, layout: Layout, mesh, evals_per_call: int):
    self.spec = spec
    self.layout = layout
    self.mesh = mesh
    self.evals_per_call = evals_per_call
    self.compile_seconds = 0.0
    self.trace_seconds = 0.0
    self.programs_compiled = 0
    self._fresh = None
    self._advance = None
    self._refill = None
    self._exploit = None
    self.memory = None

  # The per-device functions ------------------------------------------------

  def _local_init(self, inputs: LaneInputs) -> LaneState:
    k = self.layout.lane_batch
    n = self.layout.lanes_per_device
    if k == 1:
      init, _ = _group_fns(self.spec, vectorized=False)
      return lax.map(init, inputs)
    init, _ = _group_fns(self.spec, vectorized=True)
    if k == n:
      return init(inputs)
    grouped = jax.tree.map(lambda a: a.reshape((n // k, k) + a.shape[1:]), inputs)
    out = lax.map(init, grouped)
    return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)

  def _local_advance(self, state: LaneState, train, val, eval_every):
    k = self.layout.lane_batch
    n = self.layout.lanes_per_device
    evals = self.evals_per_call
    if k == 1:
      _, advance = _group_fns(self.spec, vectorized=False)
      return lax.map(lambda s: advance(s, train, val, evals, eval_every), state)
    _, advance = _group_fns(self.spec, vectorized=True)
    if k == n:
      state, metrics = advance(state, train, val, evals, eval_every)
      return state, jax.tree.map(lambda m: m.T, metrics)
    grouped = jax.tree.map(lambda a: a.reshape((n // k, k) + a.shape[1:]), state)
    state, metrics = lax.map(lambda g: advance(g, train, val, evals, eval_every), grouped)
    state = jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), state)
    # metrics: (groups, evals, k) -> (lanes, evals)
    metrics = jax.tree.map(lambda m: jnp.swapaxes(m, 1, 2).reshape((n, evals)), metrics)
    return state, metrics

  def _local_fresh(self, inputs: LaneInputs, train, val, eval_every):
    return self._local_advance(self._local_init(inputs), train, val, eval_every)

  def _wrap(self, fn, in_specs, out_specs):
    if self.layout.num_devices == 1:
      return fn
    return _shard_map(fn, self.mesh, in_specs, out_specs)

  def _precision(self):
    if self.spec.precision is None:
      return _nullcontext()
    return jax.default_matmul_precision(self.spec.precision)

  def _jit_kw(self, donate: bool) -> dict:
    kw = {"donate_argnums": (0,)} if donate else {}
    if self.layout.num_devices > 1:
      shard = _devices.lane_sharding(self.mesh)
      kw["out_shardings"] = (shard, shard)
    return kw

  def _lower_and_compile(self, fn, args, donate: bool):
    t0 = time.perf_counter()
    with self._precision():
      lowered = jax.jit(fn, **self._jit_kw(donate)).lower(*args)
    t1 = time.perf_counter()
    compiled = _compile(lowered, self.platform)
    t2 = time.perf_counter()
    self.trace_seconds += t1 - t0
    self.compile_seconds += t2 - t1
    self.programs_compiled += 1
    return compiled

  # Compile ---------------------------------------------------------------

  def compile(self, inputs: LaneInputs, data: DeviceData) -> None:
    """Compiles the init-and-train program for these (placed) inputs."""
    lanes = P(_devices.LANE_AXIS)
    fn = self._wrap(self._local_fresh, (lanes, P(), P(), P()), (lanes, lanes))
    self._fresh = self._lower_and_compile(fn, (inputs, data.train, data.val, _scalar(1)), donate=False)
    try:
      self.memory = self._fresh.memory_analysis()
    except Exception:  # pragma: no cover - not every backend reports it
      self.memory = None

  def compile_advance(self, state: LaneState, data: DeviceData) -> None:
    """Compiles the continue-from-a-state program (for resuming)."""
    lanes = P(_devices.LANE_AXIS)
    fn = self._wrap(self._local_advance, (lanes, P(), P(), P()), (lanes, lanes))
    self._advance = self._lower_and_compile(fn, (state, data.train, data.val, _scalar(1)), donate=True)

  def _local_refill(self, state: LaneState, inputs: LaneInputs, mask):
    # Fresh lanes where ``mask``; the rest keep their state bit for bit.
    fresh = self._local_init(inputs)

    def pick(new, old):
      m = mask.reshape(mask.shape + (1,) * (old.ndim - 1))
      return jnp.where(m, new, old)

    return jax.tree.map(pick, fresh, state)

  def refill(self, state: LaneState, inputs: LaneInputs, mask: np.ndarray) -> LaneState:
    """Replaces the lanes where ``mask`` with freshly initialised ones (same program)."""
    if self._refill is None:
      lanes = P(_devices.LANE_AXIS)
      fn = self._wrap(self._local_refill, (lanes, lanes, lanes), lanes)
      kw = {"donate_argnums": (0,)}
      if self.layout.num_devices > 1:
        kw["out_shardings"] = _devices.lane_sharding(self.mesh)
      t0 = time.perf_counter()
      with self._precision():
        lowered = jax.jit(fn, **kw).lower(state, inputs, mask)
      t1 = time.perf_counter()
      self._refill = _compile(lowered, self.platform)
      self.trace_seconds += t1 - t0
      self.compile_seconds += time.perf_counter() - t1
      self.programs_compiled += 1
    return _quiet_donation(self._refill, state, inputs, mask)

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

      kw = {}
      if self.layout.num_devices > 1:
        kw["out_shardings"] = _devices.lane_sharding(self.mesh)
      t0 = time.perf_counter()
      lowered = jax.jit(fn, **kw).lower(state, source, dict(hparams), lr0, lr_decay)
      t1 = time.perf_counter()
      self._exploit = _compile(lowered, self.platform)
      self.trace_seconds += t1 - t0
      self.compile_seconds += time.perf_counter() - t1
      self.programs_compiled += 1
    return self._exploit(state, source, dict(hparams), lr0, lr_decay)

  @property
  def platform(self) -> str:
    return self.mesh.devices.flat[0].platform

  @property
  def compiled(self) -> bool:
    return self._fresh is not None

  def fresh(self, inputs: LaneInputs, data: DeviceData, eval_every: int):
    """Initialises and trains ``evals_per_call`` intervals: ``(state, metrics)``."""
    return self._fresh(inputs, data.train, data.val, _scalar(eval_every))

  def advance(self, state: LaneState, data: DeviceData, eval_every: int):
    """Trains ``evals_per_call`` more intervals from ``state``."""

    if self._advance is None:
      self.compile_advance(state, data)
    return _quiet_donation(self._advance, state, data.train, data.val, _scalar(eval_every))


class SingleProgram:
  """One lane alone, jitted without vmap: :func:`vmaptune.train`.

  ``advance`` runs one evaluation interval per call so a callback can look
  at the curve and change hyperparameters between calls.
  """

  def __init__(self, spec: TrainSpec, device):
    self.spec = spec
    self.device = device
    init, advance = _group_fns(spec, vectorized=False)
    opts = compiler_options(device.platform)
    self._init = jax.jit(init, compiler_options=opts)
    self.platform = device.platform

    def one_interval(state, train, val, eval_every):
      state, metrics = advance(state, train, val, 1, eval_every)
      return state, jax.tree.map(lambda m: m[0], metrics)

    self._advance = jax.jit(one_interval, donate_argnums=(0,), compiler_options=opts)

  def _precision(self):
    if self.spec.precision is None:
      return _nullcontext()
    return jax.default_matmul_precision(self.spec.precision)

  def init(self, inputs: LaneInputs) -> LaneState:
    with self._precision():
      return self._init(jax.device_put(inputs, self.device))

  def advance(self, state: LaneState, data: DeviceData, eval_every: int):
    import warnings

    with self._precision(), warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*donated buffers.*")
      return self._advance(state, data.train, data.val, _scalar(eval_every))


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def stack_inputs(
    seeds: Sequence[int],
    hparams: Sequence[Mapping[str, Any]],
    lr_decay: Sequence[float],
    budgets: Sequence[int],
    spec: TrainSpec,
) -> LaneInputs:
  """Host arrays for a list of lanes (float32 hyperparameters, optax#1414)."""
  hp = {}
  for name in spec.injected:
    dtype = np.int32 if name in spec.int_injected else np.float32
    hp[name] = np.asarray([h[name] for h in hparams], dtype=dtype)
  return LaneInputs(
      seed=np.asarray(seeds, dtype=np.uint32),
      hparams=hp,
      lr_decay=np.asarray(lr_decay, dtype=np.float32),
      budget=np.asarray(budgets, dtype=np.int32),
  )


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


def place_inputs(inputs: LaneInputs, mesh, num_devices: int) -> LaneInputs:
  if num_devices == 1:
    return jax.tree.map(lambda a: jax.device_put(a, mesh.devices.flat[0]), inputs)
  sharding = _devices.lane_sharding(mesh)
  return jax.tree.map(lambda a: put_global(a, sharding), inputs)


def _quiet_donation(fn, *args):
  import warnings

  with warnings.catch_warnings():
    # CPU backends may decline donation; it is an optimisation only.
    warnings.filterwarnings("ignore", message=".*donated buffers.*")
    return fn(*args)


def _scalar(v: int) -> np.ndarray:
  return np.asarray(v, np.int32)


def run_program(program: Program, inputs: LaneInputs, data: DeviceData, eval_every: int,
                num_calls: int = 1, on_call: Callable | None = None):
  """Trains a population: one fresh call, then ``num_calls - 1`` advances.

  Returns:
    ``(state, metrics)`` with metrics ``(scores, train_loss, steps)``, each of
    shape ``(num_lanes, num_calls * evals_per_call)`` as NumPy arrays.
  """
  state, metrics = program.fresh(inputs, data, eval_every)
  pending = [metrics]
  for _ in range(num_calls - 1):
    state, metrics = program.advance(state, data, eval_every)
    pending.append(metrics)
  host = []
  for i, m in enumerate(pending):
    host.append(to_host(m))
    if on_call is not None:
      on_call(i)
  scores = np.concatenate([m[0] for m in host], axis=1)
  losses = np.concatenate([m[1] for m in host], axis=1)
  steps = np.concatenate([m[2] for m in host], axis=1)
  return state, (scores, losses, steps)
