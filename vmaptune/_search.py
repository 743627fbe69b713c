"""``search`` and ``train``: the entry points, their validation and the round loop."""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
import numbers
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax

from . import _checkpoint, _devices, _faults, _space
from ._data import Dataset, Objective, prepare_data, resolve_objective
from ._model import ModelAdapter, make_adapter, model_kind
from ._progress import Progress
from ._result import AllDivergedError, Run, SearchResult, Stats, Trial, rank_trials
from ._routing import DEFAULT_BATCH_SIZE, Routing, max_batch_size, route
from ._space import Choice, Distribution, Integer, Region
from ._trainer import (
    DeviceData,
    LaneInputs,
    Layout,
    Program,
    SingleProgram,
    TrainSpec,
    lane_init,
    lane_step,
    place_data,
    place_inputs,
    put_global,
    stack_inputs,
    to_host,
)

__all__ = ["search", "train", "clear_cache"]

DEFAULT_NUM_STEPS = 1000
DEFAULT_NUM_EVALS = 10
DEFAULT_EVAL_BATCH = 512
_CACHE_SIZE = 64
_PROGRAMS: "collections.OrderedDict[tuple, Program]" = collections.OrderedDict()


def _remember(key: tuple, program) -> None:
  _PROGRAMS[key] = program
  while len(_PROGRAMS) > _CACHE_SIZE:
    _PROGRAMS.popitem(last=False)


def clear_cache() -> None:
  """Forgets every compiled program kept between searches in this process.

  Programs are cached by the identity of ``model_fn``, the optimizer, loss and
  metric, and by the shapes of the data, so a second search with the same
  setup compiles nothing. Clear the cache if a closure those functions read
  has changed.

  >>> import vmaptune as vt
  >>> vt.clear_cache()
  """
  _PROGRAMS.clear()


# --------------------------------------------------------------------------
# Argument checks (all before anything is traced or compiled)
# --------------------------------------------------------------------------


def _int_arg(name: str, value: Any, low: int = 1, allow_none: bool = False) -> int | None:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}.")
  if value < low:
    raise ValueError(f"`{name}` must be >= {low}, got {value}.")
  return int(value)


def _budget(num_steps, epochs) -> tuple[int | None, float | None]:
  if num_steps is not None and epochs is not None:
    raise ValueError("give either `num_steps` or `epochs`, not both.")
  if epochs is not None:
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or not epochs > 0 or not math.isfinite(epochs):
      raise ValueError(f"`epochs` must be a positive number, got {epochs!r}.")
    return None, float(epochs)
  if num_steps is None:
    num_steps = DEFAULT_NUM_STEPS
  return _int_arg("num_steps", num_steps), None


def _check_precision(precision):
  allowed = (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
  if precision not in allowed:
    raise ValueError(f"`precision` must be one of {allowed}, got {precision!r}.")
  return precision


def _check_common(model_fn, data, space, optimizer, metric, direction, loss_fn, val_fraction, seed,
                  lr_schedule, eval_every, eval_batch_size, precision, empty_ok=False):
  kind = model_kind(model_fn)
  space = _space.validate_space(space) if (space or not empty_ok) else {}
  routing = route(space, optimizer, lr_schedule)
  _int_arg("seed", seed, low=0)
  eval_every = _int_arg("eval_every", eval_every, allow_none=True)
  eval_batch_size = _int_arg("eval_batch_size", eval_batch_size, allow_none=True)
  _check_precision(precision)
  dataset = prepare_data(data, val_fraction=val_fraction, seed=seed)
  objective = resolve_objective(dataset.task, loss_fn, metric, direction)
  top = max_batch_size(space)
  if top is not None and top > dataset.num_train:
    raise ValueError(
        f"space['batch_size'] reaches {top}, larger than the {dataset.num_train} "
        "training examples; lower it or pass more data."
    )
  return kind, space, routing, dataset, objective


# --------------------------------------------------------------------------
# Specs and programs
# --------------------------------------------------------------------------


def _num_classes(dataset: Dataset) -> int:
  return int(max(dataset.y_train.max(), dataset.y_val.max())) + 1


def check_spec(spec: TrainSpec, dataset: Dataset, objective: Objective, custom_loss: bool) -> None:
  """Traces one lane abstractly to catch model and shape errors before compiling."""
  b = spec.batch_size
  x_abs = jax.ShapeDtypeStruct((b,) + dataset.x_train.shape[1:], dataset.x_train.dtype)
  y_abs = jax.ShapeDtypeStruct((b,) + dataset.y_train.shape[1:], dataset.y_train.dtype)
  config = spec.adapter.config
  key = jax.random.key(0)
  try:
    params, model_state = jax.eval_shape(spec.adapter.init, key)
  except (TypeError, ValueError) as e:
    if "model_fn" in str(e):
      raise
    raise ValueError(f"model_fn raised {type(e).__name__} while initialising config {config!r}: {e}") from e
  except Exception as e:
    raise ValueError(f"model_fn raised {type(e).__name__} while initialising config {config!r}: {e}") from e
  try:
    out = jax.eval_shape(lambda p, s, x: spec.adapter.apply(p, s, x, True, key)[0], params, model_state, x_abs)
  except Exception as e:
    raise ValueError(
        f"the model for config {config!r} failed on a batch of shape {x_abs.shape} "
        f"({x_abs.dtype}): {type(e).__name__}: {e}"
    ) from e
  if not hasattr(out, "shape"):
    raise TypeError(f"the model must return one array, got {type(out).__name__} for config {config!r}.")
  if not custom_loss:
    if dataset.task == "classification":
      k = _num_classes(dataset)
      if out.ndim != 2 or out.shape[0] != b:
        raise ValueError(
            f"with integer labels the model must output logits of shape (batch, num_classes); "
            f"it output {out.shape} for a batch of {b} (config {config!r})."
        )
      if out.shape[1] < k:
        raise ValueError(
            f"the model outputs {out.shape[1]} classes but the labels go up to {k - 1} "
            f"(config {config!r})."
        )
    else:
      squeezed = out.shape[:-1] if out.ndim == y_abs.ndim + 1 and out.shape[-1] == 1 else out.shape
      if tuple(squeezed) != tuple(y_abs.shape):
        raise ValueError(
            f"the model outputs shape {out.shape} but the targets have shape {y_abs.shape}: "
            "they would broadcast. Make the output (batch,) or (batch, 1) for scalar targets."
        )
  for fn, arg in ((objective.loss_fn, "loss_fn"), (objective.metric_fn, "metric")):
    try:
      v = jax.eval_shape(fn, out, y_abs)
    except Exception as e:
      raise ValueError(f"`{arg}` failed on outputs {out.shape} and targets {y_abs.shape}: {e}") from e
    if getattr(v, "shape", None) != (b,):
      raise TypeError(
          f"`{arg}` must return one value per example, shape ({b},), got "
          f"{getattr(v, 'shape', v)}; vmaptune takes the mean itself."
      )
  inputs = LaneInputs(
      seed=jax.ShapeDtypeStruct((), np.uint32),
      hparams={k: jax.ShapeDtypeStruct((), np.int32 if k in spec.int_injected else np.float32) for k in spec.injected},
      lr_decay=jax.ShapeDtypeStruct((), np.float32),
      budget=jax.ShapeDtypeStruct((), np.int32),
  )
  try:
    state = jax.eval_shape(lambda i: lane_init(spec, i), inputs)
    train = (jax.ShapeDtypeStruct(dataset.x_train.shape, dataset.x_train.dtype),
             jax.ShapeDtypeStruct(dataset.y_train.shape, dataset.y_train.dtype))
    jax.eval_shape(lambda s, d: lane_step(spec, s, d), state, train)
    # Kept for memory estimates: building an NNX model costs ~75 ms a trace.
    object.__setattr__(spec, "abstract_state", state)
  except Exception as e:
    name = getattr(spec.optimizer, "__name__", repr(spec.optimizer))
    raise ValueError(
        f"training step failed to build with optimizer {name} and injected "
        f"hyperparameters {list(spec.injected)} (config {config!r}): {type(e).__name__}: {e}"
    ) from e


class _Context:
  """What one search (or one single run) shares: data, routing, programs."""

  def __init__(self, *, model_fn, routing: Routing, dataset: Dataset, objective: Objective,
               custom_loss: bool, num_steps, epochs, eval_every, eval_batch_size, precision,
               devices, lane_batch, stats: Stats, memory_budget=None, checkpoint_every=None):
    self.model_fn = model_fn
    self.routing = routing
    self.dataset = dataset
    self.objective = objective
    self.custom_loss = custom_loss
    self.num_steps = num_steps
    self.epochs = epochs
    self.eval_every = eval_every
    self.eval_batch_size = min(eval_batch_size or DEFAULT_EVAL_BATCH, dataset.num_val)
    self.precision = precision
    self.devices = _devices.lane_devices(devices)
    self.mesh = _devices.make_mesh(self.devices)
    self.lane_batch = lane_batch
    self.stats = stats
    self.stats.num_devices = len(self.devices)
    self._data: DeviceData | None = None
    self._specs: dict[tuple, TrainSpec] = {}
    self.programs: dict[tuple, Program] = {}
    self.trial_program: dict[int, tuple] = {}
    self.chunk_lanes: dict[tuple, int] = {}
    self.checkpoint_every = checkpoint_every
    self.segment_evals: int | None = None
    self.memory_budget = _devices.memory_budget(memory_budget, self.devices)
    x = dataset.x_train
    self.x_example = jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)

  @property
  def data(self) -> DeviceData:
    if self._data is None:
      self._data = place_data(self.dataset, self.eval_batch_size, self.mesh)
    return self._data

  # Budgets -------------------------------------------------------------

  def batch_size(self, signature: tuple) -> int:
    b = dict(signature).get("batch_size")
    return int(b) if b is not None else min(DEFAULT_BATCH_SIZE, self.dataset.num_train)

  def steps_for(self, batch_size: int) -> int:
    if self.epochs is None:
      return self.num_steps
    return max(1, int(round(self.epochs * (self.dataset.num_train // batch_size))))

  def eval_every_for(self, steps: int) -> int:
    if self.eval_every is not None:
      return min(self.eval_every, steps)
    return max(1, -(-steps // DEFAULT_NUM_EVALS))

  # Specs and programs --------------------------------------------------

  def spec_for(self, signature: tuple) -> TrainSpec:
    """The (validated) static description of a bucket; traces, never compiles.

    Checked specs are kept between calls in this process (like programs), so a
    loop of ``vt.train`` calls does not trace the model again each time.
    """
    if signature in self._specs:
      return self._specs[signature]
    gkey = self._cache_key(signature, "spec")
    try:
      cached = _PROGRAMS.get(gkey)
    except TypeError:
      gkey, cached = None, None
    if cached is not None:
      self._specs[signature] = cached
      return cached
    config = dict(signature)
    batch = self.batch_size(signature)
    adapter = make_adapter(self.model_fn, self.routing.model_config(config), self.x_example)
    spec = TrainSpec(
        adapter=adapter,
        optimizer=self.routing.optimizer,
        factory_kind=self.routing.factory_kind,
        injected=self.routing.injected,
        int_injected=self.routing.int_injected,
        static_opt=self.routing.static_opt_values(config),
        schedule=self.routing.schedule,
        batch_size=batch,
        eval_batch_size=self.eval_batch_size,
        objective=self.objective,
        num_train=self.dataset.num_train,
        num_val=self.dataset.num_val,
        precision=self.precision,
    )
    check_spec(spec, self.dataset, self.objective, self.custom_loss)
    self._specs[signature] = spec
    if gkey is not None:
      _remember(gkey, spec)
    return spec

  def layout(self, num_lanes: int) -> Layout:
    d = len(self.devices)
    k = self.lane_batch
    if k is None:
      # One lane at a time per CPU core beats a batched matmul there
      # (benchmarks/RESULTS.md); accelerators take all their lanes at once.
      k = 1 if self.devices[0].platform == "cpu" else max(1, num_lanes // d)
    return Layout(num_lanes, d, k)

  def padded_lanes(self, n: int) -> int:
    d = len(self.devices)
    unit = d * (self.lane_batch or 1)
    return max(unit, -(-n // unit) * unit)

  def schedule(self, spec: TrainSpec) -> tuple[int, int, int]:
    """``(steps, eval_every, evals)`` of a bucket's trials."""
    steps = self.steps_for(spec.batch_size)
    eval_every = self.eval_every_for(steps)
    return steps, eval_every, -(-steps // eval_every)

  def program_for(self, signature: tuple, num_lanes: int, evals_per_call: int | None = None) -> tuple[tuple, Program]:
    """The (possibly not yet compiled) program of a bucket at a lane count."""
    spec = self.spec_for(signature)
    layout = self.layout(num_lanes)
    if evals_per_call is None:
      evals_per_call = self.schedule(spec)[2]
    key = (signature, num_lanes, layout.lane_batch, evals_per_call)
    if key in self.programs:
      return key, self.programs[key]
    gkey = self._cache_key(signature, num_lanes, layout.lane_batch, evals_per_call)
    try:
      program = _PROGRAMS.get(gkey)
    except TypeError:  # an unhashable static value: no cross-search caching
      gkey, program = None, None
    if program is None:
      program = Program(spec, layout, self.mesh, evals_per_call=evals_per_call)
      if gkey is not None:
        _remember(gkey, program)
    elif gkey is not None:
      _PROGRAMS.move_to_end(gkey)
    self.programs[key] = program
    return key, program

  # Memory --------------------------------------------------------------

  def state_bytes(self, spec: TrainSpec) -> int:
    """Bytes of one lane's training state (params, optimizer, permutation)."""
    state = getattr(spec, "abstract_state", None)
    if state is None:
      inputs = stack_inputs([0], [{k: 0 for k in spec.injected}], [0.0], [1], spec)
      inputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), inputs)
      state = jax.eval_shape(lambda i: lane_init(spec, i), inputs)

    def nbytes(a) -> int:
      if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return int(np.prod(a.shape)) * 8
      return int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize

    return sum(nbytes(a) for a in jax.tree.leaves(state))

  def data_bytes(self) -> int:
    d = self.dataset
    return int(sum(a.nbytes for a in (d.x_train, d.y_train, d.x_val, d.y_val)))

  def fit_lanes(self, signature: tuple, wanted: int) -> int:
    """The most lanes (≤ ``wanted``) a bucket's program may hold within the budget.

    A first guess from the lane's state size (the state, its gradients and
    optimizer temporaries: 3x), checked against the compiled program's own
    memory analysis in :meth:`compile_within_budget`.
    """
    if signature in self.chunk_lanes:
      return min(wanted, self.chunk_lanes[signature])
    lanes = wanted
    if self.memory_budget is not None:
      spec = self.spec_for(signature)
      per_lane = 3 * self.state_bytes(spec)
      room = self.memory_budget - self.data_bytes()
      per_device = max(1, int(room // max(per_lane, 1)))
      unit = self.layout(wanted).lane_batch if self.lane_batch else 1
      d = len(self.devices)
      lanes = min(wanted, max(d * unit, (per_device // unit) * unit * d))
    self.chunk_lanes[signature] = lanes
    return lanes

  def shrink(self, signature: tuple, lanes: int, why: str) -> int:
    """Halves a bucket's lane count after running out of memory."""
    unit = len(self.devices) * (self.lane_batch or 1)
    if lanes <= unit:
      spec = self.spec_for(signature)
      need = self.state_bytes(spec)
      avail = self.memory_budget
      raise OutOfMemoryError(
          f"even {lanes} lane(s) ({lanes // len(self.devices)} per device) of bucket "
          f"{dict(signature)} do not fit: one lane needs {_human(need)} of state (parameters, "
          f"optimizer, data order) plus activations, and every device holds {_human(self.data_bytes())} "
          "of data; "
          + (f"the budget is {_human(avail)} per device" if avail else "the device ran out")
          + f" ({why}). Use a smaller model or batch, or more device memory."
      )
    smaller = max(unit, (lanes // 2) // unit * unit)
    self.chunk_lanes[signature] = smaller
    return smaller

  def compile_within_budget(self, key: tuple, program: Program, inputs: LaneInputs) -> None:
    """Compiles; if the compiled program's peak exceeds the budget, raises OOM."""
    placed = place_inputs(inputs, self.mesh, len(self.devices))
    before = (program.compile_seconds, program.trace_seconds, program.programs_compiled)
    program.compile(placed, self.data)
    self.stats.compile_seconds += program.compile_seconds - before[0]
    self.stats.trace_seconds += program.trace_seconds - before[1]
    self.stats.programs_compiled += program.programs_compiled - before[2]

  def check_budget(self, program: Program) -> None:
    """Raises an out-of-memory error if the compiled program's peak exceeds the budget."""
    peak = _peak_bytes(program.memory)
    if self.memory_budget is not None and peak is not None and peak > self.memory_budget:
      raise _faults.InjectedOutOfMemory(
          f"RESOURCE_EXHAUSTED: the compiled program needs {_human(peak)} per device, "
          f"over the budget of {_human(self.memory_budget)}"
      )

  def _cache_key(self, signature: tuple, *layout) -> tuple:
    return (
        self.model_fn, self.routing, self.objective.loss_fn, self.objective.metric_fn,
        self.dataset.x_train.shape, self.dataset.x_train.dtype.str, self.dataset.y_train.shape,
        self.dataset.y_train.dtype.str, self.dataset.x_val.shape, self.dataset.task,
        _num_classes(self.dataset) if self.dataset.task == "classification" else None,
        self.eval_batch_size, self.precision, tuple(d.id for d in self.devices), signature,
    ) + layout

  def single_program(self, signature: tuple) -> SingleProgram:
    """A one-lane program (vt.train), cached like population programs."""
    spec = self.spec_for(signature)
    gkey = self._cache_key(signature, "single")
    try:
      program = _PROGRAMS.get(gkey)
    except TypeError:
      gkey, program = None, None
    if program is None:
      program = SingleProgram(spec, self.devices[0])
      if gkey is not None:
        _remember(gkey, program)
    return program

  def inputs(self, spec: TrainSpec, configs: Sequence[Mapping[str, Any]], seeds: Sequence[int], num_lanes: int,
             budget: int | None = None) -> LaneInputs:
    steps = self.steps_for(spec.batch_size) if budget is None else budget
    pad = num_lanes - len(configs)
    configs = list(configs) + [configs[0]] * pad
    seeds = list(seeds) + [seeds[0]] * pad
    return stack_inputs(
        seeds,
        [{k: c[k] for k in spec.injected} for c in configs],
        [float(c.get("lr_decay", 0.0)) for c in configs],
        [steps] * num_lanes,
        spec,
    )

  def run(self, key: tuple, program: Program, inputs: LaneInputs, on_call=None):
    """Compiles if needed and trains a population in one call (all evaluations)."""
    return self.run_segments(key, program, inputs, None, None)[:2]

  def run_segments(self, key, program: Program, inputs: LaneInputs, resume, on_segment,
                   steps: int | None = None):
    """Trains a population call by call, ``program.evals_per_call`` evaluations each.

    Args:
      resume: None, or ``(state, metrics_so_far, calls_done)`` to continue.
      on_segment: called as ``on_segment(state, metrics_so_far, calls_done)``
        after every call but the last (for checkpoints).

    Returns:
      ``(state, metrics)`` with metrics trimmed to the bucket's evaluations.
    """
    spec = program.spec
    _, eval_every, evals = self.schedule(spec)
    if steps is not None:
      evals = -(-steps // eval_every)
    calls = -(-evals // program.evals_per_call)
    if not program.compiled:
      self.compile_within_budget(key, program, inputs)
    self.check_budget(program)
    t0 = time.perf_counter()
    _faults.failpoint("execute")
    if resume is None:
      placed = place_inputs(inputs, self.mesh, len(self.devices))
      state, m = program.fresh(placed, self.data, eval_every)
      done, pending = 1, [to_host(m)]
    else:
      state, pending, done = resume
      pending = list(pending)
    while True:
      if done < calls and on_segment is not None:
        self.stats.train_seconds += time.perf_counter() - t0
        on_segment(state, pending, done)
        t0 = time.perf_counter()
      if done >= calls:
        break
      _faults.failpoint("execute")
      state, m = program.advance(state, self.data, eval_every)
      pending.append(to_host(m))
      done += 1
    metrics = tuple(np.concatenate([m[j] for m in pending], axis=1)[:, :evals] for j in range(3))
    jax.block_until_ready(state)
    self.stats.train_seconds += time.perf_counter() - t0
    return state, metrics

  def evals_per_call(self, spec: TrainSpec) -> int:
    """Evaluations per compiled call: all of them, a checkpoint interval's, or
    a strategy's segment."""
    _, eval_every, evals = self.schedule(spec)
    if self.segment_evals is not None:
      return self.segment_evals
    if self.checkpoint_every is None:
      return evals
    return max(1, min(evals, self.checkpoint_every // eval_every))

  def adapter_for(self, trial: Trial) -> ModelAdapter:
    sig, _ = self.trial_program[trial.id]
    return self.spec_for(sig).adapter

  def replay(self, trial: Trial, metric: str, maximize: bool) -> Run:
    sig, lanes = self.trial_program[trial.id]
    key, program = self.program_for(sig, lanes, self.evals_per_call(self.spec_for(sig)))
    n = program.layout.num_lanes
    inputs = self.inputs(program.spec, [trial.config] * n, [trial.seed] * n, n, budget=trial.steps)
    state, metrics = self.run_segments(key, program, inputs, None, None, steps=trial.steps)
    return _run_from_lane(trial.config, trial.seed, state, metrics, trial.lane, program.spec, metric, maximize)


class OutOfMemoryError(MemoryError):
  """Not even one lane per device fits in device memory (or the budget).

  >>> import vmaptune as vt
  >>> issubclass(vt.OutOfMemoryError, MemoryError)
  True
  """


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"  # pragma: no cover


def _peak_bytes(memory) -> int | None:
  if memory is None:
    return None
  peak = getattr(memory, "peak_memory_in_bytes", None)
  if peak:
    return int(peak)
  total = sum(getattr(memory, a, 0) or 0 for a in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                    "output_size_in_bytes"))
  return int(total - (getattr(memory, "alias_size_in_bytes", 0) or 0)) or None


def _lane_result(diverged: np.ndarray, metrics, lane: int, maximize: bool):
  """A lane's trial fields from the host copies of its metrics and divergence step."""
  scores, losses, steps = metrics
  diverged_at = int(diverged[lane])
  curve = scores[lane]
  final = float(curve[-1])
  status = "ok"
  if diverged_at >= 0 or not math.isfinite(final):
    status = "diverged"
    final = -math.inf if maximize else math.inf
    if diverged_at < 0:
      diverged_at = int(steps[lane, -1])
  return dict(
      score=final,
      status=status,
      diverged_at=diverged_at if status == "diverged" else None,
      curve=curve.copy(),
      curve_steps=steps[lane].copy(),
      train_curve=losses[lane].copy(),
      steps=int(steps[lane, -1]),
  )


def _lane_params(state, lane: int):
  take = lambda a: a[lane]
  if jax.process_count() > 1:  # gather the lane to every process, as host arrays
    params, model_state = jax.tree.map(take, (state.params, state.model_state))
    return _unhost_tree(to_host(_key_data_tree(params)), params), _unhost_tree(
        to_host(_key_data_tree(model_state)), model_state)
  return jax.device_get(jax.tree.map(take, state.params)), jax.tree.map(take, state.model_state)


def _key_data_tree(tree):
  return jax.tree.map(lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                      else a, tree)


def _unhost_tree(host, like):
  return jax.tree.map(lambda h, a: _unhost(h, a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                      else h, host, like)


def _run_from_lane(config, seed, state, metrics, lane, spec: TrainSpec, metric, maximize) -> Run:
  r = _lane_result(to_host(state.diverged_at), metrics, lane, maximize)
  params, model_state = _lane_params(state, lane)
  return Run(config=config, seed=seed, params=params, model_state=model_state, adapter=spec.adapter,
             metric_name=metric, maximize=maximize, **r)


# --------------------------------------------------------------------------
# Sampling a round
# --------------------------------------------------------------------------


def _finite_values(d: Distribution, region) -> list | None:
  if isinstance(d, Choice):
    return list(d.values if region is None else region)
  if isinstance(d, Integer):
    lo, hi = d.bounds() if region is None else region
    a, b = d.from_coord(lo + 1e-9), d.from_coord(hi - 1e-9)
    if b - a > 10_000:
      return None
    return list(range(a, b + 1))
  return None


def _draw_signatures(dists: Mapping[str, Distribution], region: Region, rng, k: int) -> list[dict]:
  """Up to ``k`` distinct values of the structural keys, drawn at random."""
  if not dists:
    return [{}]
  finite = {name: _finite_values(d, region.get(name)) for name, d in dists.items()}
  if all(v is not None for v in finite.values()):
    size = math.prod(len(v) for v in finite.values())
    if size <= k:
      import itertools

      names = list(dists)
      return [dict(zip(names, combo)) for combo in itertools.product(*(finite[n] for n in names))]
  out, seen = [], set()
  for _ in range(50 * k):
    cand = _space.sample_values(dists, rng, 1, region)[0]
    sig = tuple(cand.items())
    if sig not in seen:
      seen.add(sig)
      out.append(cand)
      if len(out) == k:
        break
  return out


def _cap_signatures(configs: list[dict], keys: Sequence[str], cap: int) -> list[dict]:
  """Keeps at most ``cap`` distinct values of ``keys``: lanes proposing others
  take the most proposed ones in turn (each a compiled program)."""
  if not keys:
    return configs
  sig = lambda c: tuple(c[k] for k in keys)
  counts = collections.Counter(sig(c) for c in configs)
  if len(counts) <= cap:
    return configs
  kept = [s for s, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:cap]]
  out, j = [], 0
  for c in configs:
    if sig(c) not in kept:
      c = dict(c, **dict(zip(keys, kept[j % cap])))
      j += 1
    out.append(c)
  return out


def _lane_counts(k: int, n: int, lanes_per_program: int) -> list[int]:
  """Spreads ``n`` lanes over ``k`` signatures in whole programs where possible."""
  chunks = max(k, -(-n // lanes_per_program))
  per = [chunks // k + (1 if j < chunks % k else 0) for j in range(k)]
  counts = [min(n * c // chunks, c * lanes_per_program) for c in per]
  j = 0
  while sum(counts) < n:
    if counts[j % k] < per[j % k] * lanes_per_program:
      counts[j % k] += 1
    j += 1
  for j in range(k):  # every signature drawn gets at least one lane
    if counts[j] == 0:
      donor = int(np.argmax(counts))
      counts[donor] -= 1
      counts[j] = 1
  return counts


def nearest_finder(space, top: Sequence[Trial]) -> Callable[[Mapping[str, Any]], int | None]:
  """``config -> id`` of the closest of the ``top`` trials: squared distance in
  sampling coordinates plus one per differing choice; ties go to the lower id.

  Choice values (hashable) become integer codes, so each query is one
  vectorised comparison against all of ``top``, not a Python loop.
  """
  if not top:
    return lambda config: None
  dists = _space.searched(space)
  numeric = [k for k, d in dists.items() if not isinstance(d, Choice)]
  cats = [k for k, d in dists.items() if isinstance(d, Choice)]
  points = np.asarray([_space.coords(space, t.config, numeric) for t in top], np.float64).reshape(len(top), -1)
  codes: dict[str, dict] = {k: {} for k in cats}
  labels = np.asarray([[codes[k].setdefault(t.config[k], len(codes[k])) for k in cats] for t in top],
                      np.int64).reshape(len(top), len(cats))
  ids = np.asarray([t.id for t in top])

  def nearest(config: Mapping[str, Any]) -> int:
    x = _space.coords(space, config, numeric)
    d = np.sum((points - x) ** 2, axis=1)
    d += np.sum(labels != np.asarray([codes[k].get(config[k], -1) for k in cats], np.int64), axis=1)
    return int(ids[np.lexsort((ids, d))[0]])

  return nearest


def _nearest(space, configs, top: Sequence[Trial]) -> list[int]:
  """For each config, the id of the closest top trial (sampling coordinates)."""
  find = nearest_finder(space, top)
  return [find(c) for c in configs]


# --------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------


def trial_seed(seed: int, round_index: int, position: int) -> int:
  """The seed of the trial at ``position`` in round ``round_index``.

  Derived from the position alone (not from how many configs the round has),
  so a config keeps its seed, and its numbers, in a population of any size.
  """
  state = np.random.SeedSequence([seed, round_index, position, 0x7A11]).generate_state(1)
  return int(state[0] & 0x7FFFFFFF)


def check_enqueued(space: Mapping[str, Any], enqueue: Any) -> list[dict]:
  """Validates configs to train first (as Optuna's ``enqueue_trial``)."""
  if enqueue is None:
    return []
  if isinstance(enqueue, Mapping) or not isinstance(enqueue, Sequence):
    raise TypeError("`enqueue` must be a list of config dicts.")
  out = []
  for j, c in enumerate(enqueue):
    if not isinstance(c, Mapping):
      raise TypeError(f"enqueue[{j}] must be a dict, got {type(c).__name__}.")
    searched = _space.searched(space)
    missing = [k for k in searched if k not in c]
    extra = [k for k in c if k not in space]
    if missing or extra:
      raise ValueError(f"enqueue[{j}] must set exactly the searched keys; missing {missing}, unknown {extra}.")
    full = {}
    for k, v in space.items():
      if k not in searched:
        if k in c and c[k] != v:
          raise ValueError(f"enqueue[{j}][{k!r}]={c[k]!r} differs from the space's constant {v!r}.")
        full[k] = v
        continue
      d = searched[k]
      val = c[k]
      if isinstance(d, Choice):
        if val not in d.values:
          raise ValueError(f"enqueue[{j}][{k!r}]={val!r} is not one of {list(d.values)}.")
      else:
        if isinstance(val, bool) or not isinstance(val, numbers.Real) or not math.isfinite(val):
          raise ValueError(f"enqueue[{j}][{k!r}] must be a finite number, got {val!r}.")
        # A value rounded to float32 may land a hair outside: clip within 1e-6.
        slack = 1e-6 * max(abs(d.low), abs(d.high), 1e-30)
        if not d.low - slack <= val <= d.high + slack:
          raise ValueError(f"enqueue[{j}][{k!r}]={val!r} is outside [{d.low}, {d.high}].")
        val = int(val) if isinstance(d, Integer) else float(min(max(val, d.low), d.high))
      full[k] = val
    out.append(full)
  return out


class _Search:
  def __init__(self, ctx: _Context, space, *, num_configs, rounds, seed, sampler, keep, shrink,
               max_buckets, verbose, enqueue=(), checkpoint_dir=None, checkpoint_every=None,
               overwrite=False, fingerprint=None):
    self.ctx = ctx
    self.space = space
    self.num_configs = num_configs
    self.rounds = rounds
    self.seed = seed
    self.sampler = sampler
    self.keep = keep
    self.shrink = shrink
    self.max_buckets = max_buckets
    self.enqueue = list(enqueue)
    self.maximize = ctx.objective.maximize
    self.trials: list[Trial] = []
    self.regions: list[Region] = []
    self.best_params: dict[int, tuple] = {}
    self.lanes_per_program: int | None = None
    self.progress = Progress(rounds, ctx.objective.metric_name, verbose and jax.process_index() == 0)
    self.checkpointer = _checkpoint.Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    self.checkpoint_every = checkpoint_every
    self.overwrite = overwrite
    self.fingerprint = fingerprint or {}
    self._resume_arrays: dict = {}

  # Sampling -------------------------------------------------------------

  def _rng(self, r: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, r, stream])

  def _region(self, r: int) -> Region:
    if r == 0 or self.sampler == "tpe":  # TPE models the whole space itself
      return Region.full(self.space)
    top = self._top()
    return _space.zoom_region(self.space, [t.config for t in top], r, self.shrink)

  def _top(self) -> list[Trial]:
    ranked = rank_trials(self.trials, self.maximize)
    if not ranked:
      raise AllDivergedError(
          f"all {len(self.trials)} trials diverged, so there is nothing to zoom "
          "in on; lower the learning-rate range or check the data.",
          self.trials,
      )
    if isinstance(self.keep, float):
      n = max(2, int(round(self.keep * self.num_configs)))
    else:
      n = self.keep
    return ranked[:n]

  def _sample(self, r: int, region: Region) -> list[dict]:
    rng = self._rng(r, 0)
    dists = _space.searched(self.space)
    sig_keys = set(self.ctx.routing.signature_keys)
    if self.sampler == "grid":
      configs = _space.grid_values(dists, self.num_configs, region)
      return [_space.complete(self.space, c) for c in configs]
    structural = {k: d for k, d in dists.items() if k in sig_keys}
    rest = {k: d for k, d in dists.items() if k not in sig_keys}
    if self.sampler == "tpe":
      from ._samplers import TPEProposer

      # A fresh sampler seeded by (seed, round) and rebuilt from the history:
      # round r's proposals depend on the finished trials alone (resumable).
      proposer = TPEProposer(self.space, seed=int(trial_seed(self.seed, r, 0x7E)), maximize=self.maximize)
      proposer.tell([t.config for t in self.trials], [t.score for t in self.trials],
                    [t.status == "ok" for t in self.trials])
      proposals = proposer.ask(self.num_configs)
      proposals = _cap_signatures(proposals, list(structural), min(self.max_buckets, self.num_configs))
      if self.lanes_per_program is None:
        k = len({tuple(c[n] for n in structural) for c in proposals})
        self.lanes_per_program = self.ctx.padded_lanes(-(-self.num_configs // k))
      return [_space.complete(self.space, c) for c in proposals]
    sigs = _draw_signatures(structural, region, rng, min(self.max_buckets, self.num_configs))
    if self.lanes_per_program is None:
      self.lanes_per_program = self.ctx.padded_lanes(-(-self.num_configs // len(sigs)))
    counts = _lane_counts(len(sigs), self.num_configs, self.lanes_per_program)
    lane_sigs = [s for s, c in zip(sigs, counts) for _ in range(c)]
    if self.sampler in ("sobol", "halton"):
      from ._samplers import qmc_values

      values = qmc_values(rest, self.num_configs, region, self.sampler, (self.seed, r))
    else:
      values = _space.sample_values(rest, rng, self.num_configs, region)
    return [_space.complete(self.space, lane_sigs[i], values[i]) for i in range(self.num_configs)]

  # Running --------------------------------------------------------------

  def _buckets(self, configs: Sequence[dict]) -> "collections.OrderedDict[tuple, list[int]]":
    buckets: collections.OrderedDict = collections.OrderedDict()
    for i, c in enumerate(configs):
      buckets.setdefault(self.ctx.routing.signature(c), []).append(i)
    return buckets

  def _best_score(self) -> float | None:
    return self._best_score_of(self.trials)

  def _best_score_of(self, trials: Sequence[Trial]) -> float | None:
    ranked = rank_trials(trials, self.maximize)
    return ranked[0].score if ranked else None

  def _round_setup(self, r: int):
    """Everything about round ``r`` that is decided before training, deterministically."""
    region = self._region(r)
    configs = self._sample(r, region)
    if r == 0 and self.enqueue:
      configs[: len(self.enqueue)] = [dict(c) for c in self.enqueue[: len(configs)]]
    parents = _nearest(self.space, configs, self._top()) if r > 0 else [None] * len(configs)
    seeds = [trial_seed(self.seed, r, i) for i in range(len(configs))]
    buckets = self._buckets(configs)
    if self.lanes_per_program is None:  # grid: the largest bucket sets it
      self.lanes_per_program = self.ctx.padded_lanes(max(len(v) for v in buckets.values()))
    for sig in buckets:  # validate every bucket before compiling any
      self.ctx.spec_for(sig)
    return region, configs, parents, seeds, buckets

  def _chunks(self, buckets) -> list[tuple[tuple, list[int], int]]:
    """The round's work: ``(signature, member positions, program lanes)`` each."""
    out = []
    for sig, members in buckets.items():
      lanes = self.ctx.fit_lanes(sig, self.lanes_per_program)
      for start in range(0, len(members), lanes):
        out.append((sig, members[start:start + lanes], lanes))
    return out

  def run_round(self, r: int, resume: dict | None = None) -> list[Trial]:
    ctx = self.ctx
    region, configs, parents, seeds, buckets = self._round_setup(r)
    total = sum(ctx.steps_for(ctx.batch_size(s)) * len(v) for s, v in buckets.items())
    self.progress.start_round(r, total)
    base_id = len(self.trials)
    sig_index = {sig: j for j, sig in enumerate(buckets)}
    new: dict[int, Trial] = dict(resume["done"]) if resume else {}
    inflight = resume.get("inflight") if resume else None
    queue = [c for c in self._chunks(buckets) if not all(i in new for i in c[1])]
    while queue:
      sig, chunk, lanes = queue.pop(0)
      spec = ctx.spec_for(sig)
      key, program = ctx.program_for(sig, lanes, ctx.evals_per_call(spec))
      inputs = ctx.inputs(spec, [configs[i] for i in chunk], [seeds[i] for i in chunk], lanes)
      restart = None
      if inflight is not None and inflight["members"] == list(chunk) and inflight["lanes"] == lanes:
        restart = self._restore_inflight(inflight, spec, inputs, lanes)
      inflight = None

      def save_segment(state, pending, done, _chunk=chunk, _lanes=lanes, _spec=spec):
        self._checkpoint(r, new, {"members": list(_chunk), "lanes": _lanes, "calls": done,
                                  "signature": sig}, state, pending)
        _faults.failpoint(f"round{r}:mid")

      try:
        state, metrics = ctx.run_segments(key, program, inputs, restart,
                                          save_segment if self.checkpointer else None)
      except Exception as e:  # noqa: BLE001 - only out-of-memory is handled here
        if not _faults.is_out_of_memory(e):
          raise
        smaller = ctx.shrink(sig, lanes, str(e).splitlines()[0][:200])
        warnings.warn(
            f"vmaptune: out of memory with {lanes} lanes of bucket {dict(sig)}; retrying "
            f"with {smaller} lanes per program.", RuntimeWarning, stacklevel=2)
        queue = [(sig, chunk[j:j + smaller], smaller) for j in range(0, len(chunk), smaller)] + queue
        continue
      ctx.stats.padded_lanes += lanes - len(chunk)
      best_here = None
      diverged = to_host(state.diverged_at)  # one read for the whole chunk
      for lane, i in enumerate(chunk):
        res = _lane_result(diverged, metrics, lane, self.maximize)
        t = Trial(id=base_id + i, config=configs[i], round=r, lane=lane, seed=seeds[i],
                  parent=parents[i], bucket=sig_index[sig], **res)
        new[i] = t
        ctx.trial_program[t.id] = (sig, lanes)
        # Steps trained in this process (a resumed chunk had some already).
        before = int(restart[1][-1][2][lane, -1]) if restart is not None else 0
        ctx.stats.lane_steps += t.steps - before
        if t.status == "ok" and math.isfinite(t.score) and (
            best_here is None or _better(t, best_here, self.maximize)):
          best_here = t
      current = self._best_trial_so_far(list(new.values()))
      if best_here is not None and current is best_here:
        self.best_params = {best_here.id: _lane_params(state, best_here.lane)}
      self.progress.advance(ctx.steps_for(spec.batch_size) * len(chunk), self._best_of(new))
      if self.checkpointer and queue:
        self._checkpoint(r, new, None, None, None)
    round_trials = [new[i] for i in range(len(configs))]
    self.trials.extend(round_trials)
    self.regions.append(region)
    self.progress.end_round(self._best_score())
    if self.checkpointer:
      self._checkpoint(r + 1, {}, None, None, None)
    return round_trials

  def _best_trial_so_far(self, extra: Sequence[Trial]) -> Trial | None:
    ranked = rank_trials(list(self.trials) + list(extra), self.maximize)
    return ranked[0] if ranked else None

  def _best_of(self, new: Mapping[int, Trial]) -> float | None:
    t = self._best_trial_so_far(list(new.values()))
    return t.score if t else None

  # Checkpoints --------------------------------------------------------------

  def _acquire_checkpoint(self, first: Mapping[str, Any]) -> None:
    """Completes the fingerprint and takes the directory's lock.

    The model's structure at round 0's first signature joins the
    fingerprint: a changed architecture is a different search even under the
    same function name.
    """
    self.fingerprint = dict(self.fingerprint, model_structure=model_digest(
        self.ctx.spec_for(self.ctx.routing.signature(first))))
    self.checkpointer.acquire()

  def _checkpoint(self, r: int, done: Mapping[int, Trial], inflight, state, pending) -> None:
    """Commits the search as it stands: finished rounds, this round's finished
    chunks and, inside a chunk, the population's state."""
    arrays = {}
    meta = {
        "fingerprint": self.fingerprint,
        "round": r,
        "trials": [_trial_to_dict(t) for t in self.trials],
        "regions": [g.to_json() for g in self.regions],
        "lanes_per_program": self.lanes_per_program,
        "chunk_lanes": list(self.ctx.chunk_lanes.items()),
        "done": [[i, _trial_to_dict(t)] for i, t in done.items()],
        "trial_program": [[tid, list(v)] for tid, v in self.ctx.trial_program.items()],
        "inflight": None,
        "best": None,
    }
    if inflight is not None:
      leaves = jax.tree.leaves(state)
      for j, leaf in enumerate(leaves):
        arrays[f"state/{j}"] = _host(leaf)
      for j, m in enumerate(pending):
        for q in range(3):
          arrays[f"metrics/{j}/{q}"] = np.asarray(m[q])
      meta["inflight"] = dict(inflight, leaves=len(leaves), segments=len(pending))
    self._save_best(meta, arrays)
    self.checkpointer.save(meta, arrays)

  def _restore_inflight(self, inflight, spec: TrainSpec, inputs: LaneInputs, lanes: int):
    """The saved population state of an unfinished chunk, placed on the devices."""
    leaves, treedef = jax.tree.flatten(abstract_population(spec, inputs))
    saved = self._resume_arrays
    if len(leaves) != inflight["leaves"]:
      return None
    state = self._place_state(treedef, [_unhost(saved[f"state/{j}"], a) for j, a in enumerate(leaves)])
    pending = [tuple(saved[f"metrics/{j}/{q}"] for q in range(3)) for j in range(inflight["segments"])]
    return state, pending, inflight["calls"]

  def _place_lanes(self, host):
    """An array whose leading axis is lanes, on the devices (sharded over them when several)."""
    if len(self.ctx.devices) == 1:
      return jax.device_put(host, self.ctx.devices[0])
    return put_global(host, _devices.lane_sharding(self.ctx.mesh))

  def _place_state(self, treedef, host: list):
    """A population state from its host leaves (typed keys included), placed on the devices."""
    return jax.tree.unflatten(treedef, [
        jax.random.wrap_key_data(self._place_lanes(jax.random.key_data(h)), impl=h.dtype._impl)
        if jax.dtypes.issubdtype(getattr(h, "dtype", np.float32), jax.dtypes.prng_key) else self._place_lanes(h)
        for h in host])

  def _revive(self, config: Mapping[str, Any]) -> dict:
    return _checkpoint.revive_config(self.space, config)

  def _revive_trial(self, d: Mapping[str, Any]) -> Trial:
    """A trial read back from a checkpoint, its configs the space's own values."""
    d = dict(d, config=self._revive(d["config"]))
    if d.get("schedule") is not None:
      d["schedule"] = [(int(step), self._revive(c)) for step, c in d["schedule"]]
    return _trial_from_dict(d)

  def _restore_programs(self, meta: dict) -> None:
    """Which program ran each trial, and each bucket's lane count (as saved: a
    rerun with less free memory still resumes the same layout)."""
    self.ctx.chunk_lanes.update({self._revive_sig(sig): v for sig, v in meta["chunk_lanes"]})
    self.ctx.trial_program.update({int(tid): (self._revive_sig(sig), lanes)
                                   for tid, (sig, lanes) in meta.get("trial_program", [])})

  def _revive_sig(self, sig) -> tuple:
    return tuple(self._revive(dict(sig)).items())

  def _save_best(self, meta: dict, arrays: dict) -> None:
    """Adds the best trial's parameters (kept apart from any lane) to a checkpoint."""
    meta["best"] = None
    if self.best_params:
      (tid, (params, model_state)), = self.best_params.items()
      for j, leaf in enumerate(jax.tree.leaves((params, model_state))):
        arrays[f"best/{j}"] = _host(leaf)
      meta["best"] = {"trial": tid, "leaves": len(jax.tree.leaves((params, model_state)))}

  def _restore_best(self, meta: dict, arrays: dict, trials: Sequence[Trial]) -> None:
    if not meta.get("best"):
      return
    tid = meta["best"]["trial"]
    best = next(t for t in trials if t.id == tid)
    spec = self.ctx.spec_for(self.ctx.routing.signature(best.config))
    inputs = self.ctx.inputs(spec, [best.config], [best.seed], 1)
    abstract = jax.eval_shape(lambda i: lane_init(spec, i), jax.tree.map(lambda a: a[0], inputs))
    leaves, treedef = jax.tree.flatten((abstract.params, abstract.model_state))
    host = [_unhost(arrays[f"best/{j}"], a) for j, a in enumerate(leaves)]
    self.best_params = {tid: jax.tree.unflatten(treedef, host)}

  def _restore(self, meta: dict, arrays: dict) -> tuple[int, dict | None]:
    """Loads a checkpoint's finished work; returns ``(round, resume)``."""
    self.trials = [self._revive_trial(d) for d in meta["trials"]]
    self.regions = [Region.from_json(g) for g in meta["regions"]]
    self.lanes_per_program = meta["lanes_per_program"]
    self._restore_programs(meta)
    self._resume_arrays = arrays
    done = {int(i): self._revive_trial(d) for i, d in meta["done"]}
    self._restore_best(meta, arrays, self.trials + list(done.values()))
    resume = {"done": done, "inflight": meta["inflight"]}
    return int(meta["round"]), resume

  def _load_checkpoint(self) -> tuple[dict, dict] | None:
    """The directory's newest checkpoint of *this* call, as ``(meta, arrays)``.

    A checkpoint of a different call is refused (:class:`CheckpointMismatch`
    listing the differences) unless ``overwrite=True``, which clears it.
    """
    found = self.checkpointer.load()
    if found is not None:
      meta, _ = found
      diff = _checkpoint.fingerprint_diff(meta["fingerprint"], self.fingerprint)
      if diff and not self.overwrite:
        raise _checkpoint.CheckpointMismatch(
            f"checkpoint_dir {self.checkpointer.directory} holds a different search; "
            "refusing to mix results. Differences: " + "; ".join(diff)
            + ". Pass overwrite=True to start afresh, or use another directory.")
      if diff:
        self.checkpointer.clear()
        found = None
      else:
        self.ctx.stats.resumed_from = self.checkpointer.directory
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("vmaptune:checkpoint-loaded")
    return found

  # The loop ----------------------------------------------------------------

  def snapshot(self, t_start: float, interrupted: bool = False) -> SearchResult:
    """A SearchResult of the rounds finished so far."""
    self.ctx.stats.wall_seconds = time.perf_counter() - t_start
    self.ctx.stats.lane_batch = self.ctx.layout(self.lanes_per_program or 1).lane_batch
    result = SearchResult(
        trials=list(self.trials), space=self.space, metric=self.ctx.objective.metric_name,
        maximize=self.maximize, regions=list(self.regions), stats=self.ctx.stats, context=self.ctx,
        best_params=dict(self.best_params),
        options=dict(num_configs=self.num_configs, rounds=self.rounds, seed=self.seed,
                     sampler=self.sampler, keep=self.keep, shrink=self.shrink,
                     max_buckets=self.max_buckets),
    )
    result.interrupted = interrupted
    return result

  def run(self, t_start: float, callbacks: Sequence[Callable] = ()) -> SearchResult:
    start_round, resume = 0, None
    if self.checkpointer is not None:
      first = self._sample(0, Region.full(self.space))[0] if not self.enqueue else dict(self.enqueue[0])
      self.lanes_per_program = None  # sampled again when the search runs
      self._acquire_checkpoint(first)
    try:
      if self.checkpointer is not None:
        found = self._load_checkpoint()
        if found is not None:
          start_round, resume = self._restore(*found)
      interrupted = False
      try:
        for r in range(start_round, self.rounds):
          self.run_round(r, resume if r == start_round else None)
          resume = None
          for fn in callbacks:
            fn(self.snapshot(t_start))
      except KeyboardInterrupt:
        if not self.trials:
          raise
        interrupted = True
        warnings.warn(
            f"vmaptune: interrupted; returning the {len(self.regions)} finished round(s)"
            + (f" (saved in {self.checkpointer.directory})" if self.checkpointer else ""),
            RuntimeWarning, stacklevel=2)
    finally:
      self.progress.close()
      if self.checkpointer is not None:
        self.checkpointer.release()
    if not rank_trials(self.trials, self.maximize):
      raise AllDivergedError(
          f"all {len(self.trials)} trials diverged; lower the learning-rate range or check the data.",
          self.trials,
      )
    return self.snapshot(t_start, interrupted)


def _host(leaf) -> np.ndarray:
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return to_host(leaf)


def _unhost(array: np.ndarray, abstract):
  if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
    impl = getattr(abstract.dtype, "_impl", None)
    return jax.random.wrap_key_data(array, impl=impl) if impl is not None else jax.random.wrap_key_data(array)
  if tuple(array.shape) != tuple(abstract.shape):
    raise _checkpoint.CheckpointError(
        f"checkpoint array of shape {array.shape} does not fit state leaf {abstract.shape}")
  return np.asarray(array, dtype=abstract.dtype)


_TRIAL_FIELDS = tuple(f.name for f in dataclasses.fields(Trial))


def abstract_population(spec: TrainSpec, inputs: LaneInputs):
  """Shapes and dtypes of a population's state (``lane_init`` over the lanes), no compute."""
  return jax.eval_shape(jax.vmap(lambda i: lane_init(spec, i)), inputs)


def _trial_to_dict(t: Trial) -> dict:
  d = {k: getattr(t, k) for k in _TRIAL_FIELDS}
  for k in ("curve", "curve_steps", "train_curve"):
    d[k] = np.asarray(d[k])
  return d


def _trial_from_dict(d: Mapping[str, Any]) -> Trial:
  return Trial(**{k: d[k] for k in _TRIAL_FIELDS if k in d})


def _better(a: Trial, b: Trial, maximize: bool) -> bool:
  if a.score == b.score:
    return a.id < b.id
  return a.score > b.score if maximize else a.score < b.score


def search(
    model_fn: Callable,
    data: Any,
    space: Mapping[str, Any],
    *,
    optimizer: Any = optax.adam,
    num_configs: int = 64,
    num_steps: int | None = None,
    epochs: float | None = None,
    rounds: int = 3,
    seed: int = 0,
    sampler: str = "random",
    metric: str | Callable = "loss",
    direction: str | None = None,
    loss_fn: Callable | None = None,
    val_fraction: float = 0.2,
    eval_every: int | None = None,
    keep: float | int = 0.25,
    shrink: float = 0.5,
    max_buckets: int = 8,
    lr_schedule: str = "inverse_time",
    devices: Any = None,
    lane_batch: int | None = None,
    precision: str | None = None,
    eval_batch_size: int | None = None,
    enqueue: Sequence[Mapping[str, Any]] | None = None,
    callbacks: Sequence[Callable[[SearchResult], Any]] = (),
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    overwrite: bool = False,
    memory_budget: int | str | None = None,
    strategy: Any = "zoom",
    verbose: bool = True,
) -> SearchResult:
  """Trains ``num_configs`` sampled configs at once, then zooms in, ``rounds`` times.

  Every config of a round trains in the same compiled program: the lanes of a
  bucket (configs that share their static hyperparameters) are stacked along a
  lane axis, sharded over the devices, and stepped by a ``lax.scan`` with no
  host round trip per step. Round 0 samples the whole space; each later round
  samples ``num_configs`` new configs in a region around the best trials so
  far, in sampling coordinates, shrinking by ``shrink`` per round.

  Args:
    model_fn: ``model_fn(config, rngs) -> nnx.Module`` (Flax NNX) or
      ``model_fn(config) -> nn.Module`` (Linen). ``config`` holds the model's
      hyperparameters as plain Python values.
    data: ``(x, y)`` (split with ``val_fraction``, deterministically from
      ``seed``) or ``{"train": (x, y), "val": (x, y)}``. Integer ``y`` means
      classification (cross-entropy), float ``y`` regression (squared error).
    space: name -> distribution (:func:`uniform`, :func:`loguniform`,
      :func:`reverse_loguniform`, :func:`integer`, :func:`choice`) or constant.
      Arguments of ``optimizer`` go to the optimizer, ``batch_size`` and
      ``lr_decay`` to the trainer, the rest to ``model_fn``.
    optimizer: an optax factory (default ``optax.adam``); its numeric
      arguments are injected per lane, so their values cost no recompilation.
    num_configs: configs per round.
    num_steps: steps per trial (default 1000). Every lane takes the same
      number of steps, so every lane of a round costs the same and finishes
      together; larger batches then see more examples.
    epochs: instead of ``num_steps``, passes over the training data per
      trial: the same examples for every lane (batch 32 takes four times the
      steps of batch 128).
    rounds: 1 coarse round plus ``rounds - 1`` zoom rounds.
    seed: the search seed. The same seed gives the same configs, scores and best.
    sampler: ``"random"`` (default), ``"sobol"`` or ``"halton"`` (scrambled
      quasi-random points on each hyperparameter's sampling scale), ``"grid"``
      (the largest full grid of at most ``num_configs`` points; for
      comparison; zoom strategy only) or ``"tpe"`` (Optuna's TPE proposes each
      zoom round's whole batch; with ``strategy="halving"`` it proposes the
      refills, BOHB-style; needs the ``optuna`` extra).
    metric: ``"loss"`` (default, minimized), ``"accuracy"`` (maximized) or a
      callable ``(outputs, targets) -> per-example values``, averaged.
    direction: ``"minimize"`` or ``"maximize"`` for a callable metric.
    loss_fn: ``(outputs, targets) -> per-example loss``; default cross-entropy
      for integer labels, squared error for float targets.
    val_fraction: held-out share when ``data`` is ``(x, y)``.
    eval_every: steps between validation passes (default: 10 per trial).
    keep: how many of the best trials so far a zoom region is drawn around: a
      fraction of ``num_configs`` (default 0.25) or a count.
    shrink: the zoom region's largest width is ``shrink ** round`` of the full
      range in each sampling coordinate (default 0.5).
    max_buckets: the most distinct static signatures (compiled programs) per
      round (default 8). Model hyperparameters drawn from continuous or wide
      ranges are drawn this many times per round and the lanes are spread
      evenly over them.
    lr_schedule: how ``lr_decay`` decays the learning rate per epoch:
      ``"inverse_time"`` (α0 / (1 + decay·epoch), default) or
      ``"exponential"`` (α0·exp(−decay·epoch)).
    devices: devices to shard lanes over: None (all), a count, or a list.
    lane_batch: lanes vectorised together per device (default: 1 on CPU,
      all of a device's lanes on accelerators).
    precision: matmul precision (``jax.default_matmul_precision``): None
      keeps JAX's default (TF32 on recent NVIDIA GPUs), ``"highest"`` is
      true float32.
    eval_batch_size: validation examples per chunk (default 512).
    enqueue: configs to train first in round 0 (a known baseline, say), as
      Optuna's ``enqueue_trial``; each sets every searched key.
    callbacks: functions called after each round with a :class:`SearchResult`
      of the rounds so far (to log to whatever you use). With halving: after
      each ``num_steps`` of population time, with the trials finished so far;
      with PBT, whose lanes all finish at the end: once, at the end.
    checkpoint_dir: a directory to save the search in, atomically, after each
      round (and every ``checkpoint_every`` steps inside one; with halving or
      PBT, every ``checkpoint_every`` steps of population time, default
      ``num_steps``). Calling
      ``search`` again with the same arguments resumes where it stopped and
      gives the same result as an uninterrupted run; a different call is
      refused (:class:`CheckpointMismatch`) unless ``overwrite=True``.
    checkpoint_every: steps between checkpoints inside a round (rounded to
      whole evaluation intervals). Default: only at round ends.
    overwrite: start afresh even if ``checkpoint_dir`` holds another search.
    strategy: how rounds are spent (all at equal total lane-steps,
      ``rounds * num_configs * num_steps``): ``"zoom"`` (default: rounds of
      ``num_configs`` fresh configs, each zooming in), ``"halving"`` or
      :class:`Halving` (successive halving with refill: lanes that fall
      behind at a rung are stopped and refilled with new configs from the
      zoom region), ``"pbt"`` or :class:`PBT` (population based training:
      bad lanes copy a good lane's weights and optimizer state and perturb
      its hyperparameters). See the README.
    memory_budget: bytes per device for a population (int, or "512MB",
      "2GB"); default: 90% of an accelerator's free memory, half the host's
      available memory on CPU. Buckets that do not fit run in chunks; if XLA
      still runs out of memory the chunk is halved and retried, down to one
      lane per device.
    verbose: show a progress bar on a terminal (a line per round otherwise).

  Returns:
    A :class:`SearchResult`.

  Example:
    >>> import numpy as np, optax, vmaptune as vt
    >>> from flax import nnx
    >>> x = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> def model_fn(config, rngs):
    ...   return nnx.Linear(4, 2, rngs=rngs)
    >>> result = vt.search(model_fn, (x, y), {"learning_rate": vt.loguniform(1e-3, 1e-1)},
    ...                    num_configs=4, num_steps=20, rounds=2, verbose=False)
    >>> len(result.trials)
    8
  """
  t_start = time.perf_counter()
  kind, space, routing, dataset, objective = _check_common(
      model_fn, data, space, optimizer, metric, direction, loss_fn, val_fraction, seed,
      lr_schedule, eval_every, eval_batch_size, precision)
  num_configs = _int_arg("num_configs", num_configs)
  rounds = _int_arg("rounds", rounds)
  max_buckets = _int_arg("max_buckets", max_buckets)
  lane_batch = _int_arg("lane_batch", lane_batch, allow_none=True)
  num_steps, epochs = _budget(num_steps, epochs)
  from ._samplers import SAMPLERS

  if sampler not in SAMPLERS:
    raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}.")
  if sampler == "tpe":
    try:
      import optuna  # noqa: F401
    except ImportError:
      raise ImportError("sampler='tpe' needs optuna; install it with `pip install 'vmaptune[optuna]'`.") from None
  if isinstance(keep, bool) or not isinstance(keep, (int, float)):
    raise TypeError(f"`keep` must be a fraction in (0, 1] or a count >= 1, got {keep!r}.")
  if isinstance(keep, float) and not 0.0 < keep <= 1.0:
    raise ValueError(f"`keep` as a fraction must lie in (0, 1], got {keep!r}.")
  if isinstance(keep, int) and keep < 1:
    raise ValueError(f"`keep` as a count must be >= 1, got {keep!r}.")
  if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0.0 < shrink <= 1.0:
    raise ValueError(f"`shrink` must lie in (0, 1], got {shrink!r}.")
  if not isinstance(verbose, bool):
    raise TypeError(f"`verbose` must be a bool, got {verbose!r}.")
  if callable(callbacks) or not all(callable(f) for f in callbacks):
    raise TypeError("`callbacks` must be a list of functions taking a SearchResult.")
  enqueue = check_enqueued(space, enqueue)
  if len(enqueue) > num_configs:
    raise ValueError(f"`enqueue` holds {len(enqueue)} configs, more than num_configs={num_configs}.")
  if not _space.searched(space) and rounds > 1:
    raise ValueError("`space` holds only constants; nothing to search. Use vt.train for one config.")
  checkpoint_every = _int_arg("checkpoint_every", checkpoint_every, allow_none=True)
  if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, bytes)) and not hasattr(checkpoint_dir, "__fspath__"):
    raise TypeError(f"`checkpoint_dir` must be a path, got {checkpoint_dir!r}.")
  if checkpoint_every is not None and checkpoint_dir is None:
    raise ValueError("`checkpoint_every` needs a `checkpoint_dir` to write to.")
  if not isinstance(overwrite, bool):
    raise TypeError(f"`overwrite` must be a bool, got {overwrite!r}.")
  if memory_budget is not None:
    _devices._parse_bytes(memory_budget)
  strategy = _check_strategy(strategy, sampler)
  stats = Stats()
  ctx = _Context(model_fn=model_fn, routing=routing, dataset=dataset, objective=objective,
                 custom_loss=loss_fn is not None, num_steps=num_steps, epochs=epochs,
                 eval_every=eval_every, eval_batch_size=eval_batch_size, precision=precision,
                 devices=devices, lane_batch=lane_batch, stats=stats, memory_budget=memory_budget,
                 checkpoint_every=checkpoint_every)
  fingerprint = None
  if checkpoint_dir is not None:
    fingerprint = _fingerprint(
        space=space, dataset=dataset, model_fn=model_fn, optimizer=optimizer, num_configs=num_configs,
        num_steps=num_steps, epochs=epochs, rounds=rounds, seed=seed, sampler=sampler, metric=metric,
        direction=direction, loss_fn=loss_fn, val_fraction=val_fraction, eval_every=eval_every,
        keep=keep, shrink=shrink, max_buckets=max_buckets, lr_schedule=lr_schedule,
        lane_batch=lane_batch, precision=precision, eval_batch_size=eval_batch_size,
        enqueue=enqueue, checkpoint_every=checkpoint_every, num_devices=len(ctx.devices),
        **({} if strategy == "zoom" else {"strategy": repr(strategy)}))
  cls = _Search
  if isinstance(strategy, (Halving, PBT)):
    from . import _strategies

    cls = _strategies.HalvingSearch if isinstance(strategy, Halving) else _strategies.PBTSearch
  runner = cls(ctx, space, num_configs=num_configs, rounds=rounds, seed=seed, sampler=sampler,
               keep=keep, shrink=float(shrink), max_buckets=max_buckets, verbose=verbose,
               enqueue=enqueue, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
               overwrite=overwrite, fingerprint=fingerprint)
  if isinstance(strategy, Halving):
    runner.configure(strategy.eta, strategy.min_fraction)
  elif isinstance(strategy, PBT):
    runner.configure(strategy.ready, strategy.fraction, strategy.resample_probability)
  return runner.run(t_start, callbacks)


@dataclasses.dataclass(frozen=True)
class Halving:
  """Successive halving with refill (``search(..., strategy=Halving(...))``).

  Rungs sit at ``min_fraction``, ``min_fraction * eta``, ... and 1 of
  ``num_steps``; a trial reaching a rung continues only if it is in the top
  ``1/eta`` of the trials that reached that rung so far (asynchronous
  successive halving, as Optuna's ``SuccessiveHalvingPruner`` and Ray Tune's
  ASHA), and a stopped lane is refilled at once with a new config.

  >>> import vmaptune as vt
  >>> vt.Halving(eta=3, min_fraction=1 / 9)
  Halving(eta=3, min_fraction=0.1111111111111111)
  """

  eta: int = 3
  min_fraction: float = 1 / 9

  def __post_init__(self):
    if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
      raise ValueError(f"Halving: `eta` must be an int >= 2, got {self.eta!r}.")
    if not isinstance(self.min_fraction, (int, float)) or not 0 < self.min_fraction < 1:
      raise ValueError(f"Halving: `min_fraction` must lie in (0, 1), got {self.min_fraction!r}.")


@dataclasses.dataclass(frozen=True)
class PBT:
  """Population based training (``search(..., strategy=PBT(...))``).

  Every ``ready`` steps (default ``num_steps // 4``), the worst ``fraction``
  of each bucket's lanes copies the parameters and optimizer state of a
  random lane from the best ``fraction`` of the same bucket, then perturbs
  each continuous hyperparameter by ×0.8 or ×1.2 on its own scale (clipped
  to the space), or redraws it with probability ``resample_probability``.

  >>> import vmaptune as vt
  >>> vt.PBT(ready=100, fraction=0.25)
  PBT(ready=100, fraction=0.25, resample_probability=0.25)
  """

  ready: int | None = None
  fraction: float = 0.25
  resample_probability: float = 0.25

  def __post_init__(self):
    if self.ready is not None and (isinstance(self.ready, bool) or not isinstance(self.ready, int) or self.ready < 1):
      raise ValueError(f"PBT: `ready` must be a positive int (steps) or None, got {self.ready!r}.")
    if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 0.5:
      raise ValueError(f"PBT: `fraction` must lie in (0, 0.5], got {self.fraction!r}.")
    if not isinstance(self.resample_probability, (int, float)) or not 0 <= self.resample_probability <= 1:
      raise ValueError(f"PBT: `resample_probability` must lie in [0, 1], got {self.resample_probability!r}.")


def _check_strategy(strategy: Any, sampler: str):
  if isinstance(strategy, str):
    if strategy == "zoom":
      return "zoom"
    if strategy == "halving":
      strategy = Halving()
    elif strategy == "pbt":
      strategy = PBT()
    else:
      raise ValueError(f"`strategy` must be 'zoom', 'halving', 'pbt', vt.Halving(...) or vt.PBT(...), got {strategy!r}.")
  if not isinstance(strategy, (Halving, PBT)):
    raise TypeError(f"`strategy` must be 'zoom', 'halving', 'pbt', vt.Halving(...) or vt.PBT(...), got {strategy!r}.")
  if sampler == "grid" or (sampler == "tpe" and isinstance(strategy, PBT)):
    raise ValueError(f"sampler={sampler!r} does not work with strategy={strategy!r}: grid needs "
                     "strategy='zoom' (its rounds are batches); 'tpe' works with 'zoom' and 'halving'. "
                     "PBT draws its population with 'random', 'sobol' or 'halton'.")
  return strategy


def _name(fn: Any) -> Any:
  if fn is None or isinstance(fn, str):
    return fn
  import functools

  if isinstance(fn, functools.partial):
    return f"partial({_name(fn.func)}, {sorted((k, repr(v)) for k, v in fn.keywords.items())})"
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _source_digest(fn: Any) -> str:
  """A digest of a function's source (or, without source, its bytecode)."""
  import hashlib
  import inspect

  try:
    text = inspect.getsource(fn)
  except (OSError, TypeError):
    code = getattr(fn, "__code__", None)
    text = repr((code.co_code, code.co_consts)) if code is not None else repr(fn)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_digest(spec: TrainSpec) -> str:
  """The model's parameter and state structure (shapes, dtypes) at one signature."""
  import hashlib

  shapes = jax.eval_shape(spec.adapter.init, jax.random.key(0))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  text = ";".join(f"{jax.tree_util.keystr(p)}:{a.shape}:{a.dtype}" for p, a in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint(*, space, dataset, model_fn, optimizer, loss_fn, metric, enqueue, **options) -> dict:
  """What identifies a search call, for refusing to resume a different one."""
  fp = {k: v for k, v in options.items()}
  fp["space"] = {k: _space.to_json(v) for k, v in space.items()}
  fp["data"] = f"{dataset.fingerprint()} train{dataset.x_train.shape}/{dataset.x_train.dtype} " \
               f"val{dataset.x_val.shape} y/{dataset.y_train.dtype}"
  fp["model_fn"] = _name(model_fn)
  fp["model_source"] = _source_digest(model_fn)
  fp["optimizer"] = _name(optimizer)
  fp["loss_fn"] = _name(loss_fn)
  fp["metric"] = _name(metric)
  fp["enqueue"] = [sorted(c.items()) for c in enqueue]
  return _checkpoint.loads(_checkpoint.dumps(fp))


# --------------------------------------------------------------------------
# One config alone
# --------------------------------------------------------------------------


class TrainState:
  """What a :func:`train` callback sees after each evaluation.

  >>> import numpy as np, vmaptune as vt
  >>> def halve_at_100(state):  # babysitting: halve the learning rate once
  ...   if state.step == 100:
  ...     return {"learning_rate": state.hyperparams["learning_rate"] / 2}

  Attributes:
    step: steps taken.
    score: the latest validation score.
    curve, curve_steps, train_curve: the curves so far.
    hyperparams: the optimizer's current injected hyperparameters.
    diverged: whether the run has diverged.
  """

  def __init__(self, step, score, curve, curve_steps, train_curve, hyperparams, diverged):
    self.step = step
    self.score = score
    self.curve = curve
    self.curve_steps = curve_steps
    self.train_curve = train_curve
    self.hyperparams = hyperparams
    self.diverged = diverged

  def __repr__(self) -> str:
    return f"TrainState(step={self.step}, score={self.score:.6g}, hyperparams={self.hyperparams})"


def train(
    model_fn: Callable,
    data: Any,
    config: Mapping[str, Any],
    *,
    optimizer: Any = optax.adam,
    seed: int = 0,
    num_steps: int | None = None,
    epochs: float | None = None,
    metric: str | Callable = "loss",
    direction: str | None = None,
    loss_fn: Callable | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    eval_every: int | None = None,
    lr_schedule: str = "inverse_time",
    precision: str | None = None,
    eval_batch_size: int | None = None,
    callback: Callable[[TrainState], Mapping[str, Any] | None] | None = None,
    schedule: Sequence[tuple[int, Mapping[str, Any]]] | None = None,
    device: Any = None,
    verbose: bool = True,
) -> Run:
  """Trains one config alone, no population: babysitting one model.

  The same per-lane code as :func:`search`, jitted for a single lane (no
  ``vmap``). Results match the config's lane in a search to rounding, not bit
  for bit: XLA picks other kernels for a batched program (see README); use
  ``SearchResult.retrain`` for an exact replay.

  Args:
    model_fn, data, optimizer, num_steps, epochs, metric, direction, loss_fn,
      val_fraction, eval_every, lr_schedule, precision, eval_batch_size: as in
      :func:`search`.
    config: one value per hyperparameter (no distributions), e.g.
      ``result.best_config``.
    seed: the trial seed (init, data order, dropout), e.g.
      ``result.best_trial.seed``.
    split_seed: the seed of the train/validation split; pass the search's
      ``seed`` to score on the search's validation set (default 0, the
      search's default).
    callback: called after every evaluation with a :class:`TrainState`; it may
      return a dict of new values for injected optimizer hyperparameters (e.g.
      ``{"learning_rate": s.hyperparams["learning_rate"] / 2}``), applied from
      the next step in the same compiled program, or ``{"stop": True}``.
    schedule: hyperparameter changes over time, ``[(step, {name: value}), ...]``
      (e.g. a PBT trial's ``trial.schedule``): from ``step`` on, the values
      apply. Steps must be multiples of ``eval_every``.
    device: the device to train on (default: the first).
    verbose: progress bar with the latest validation score.

  Returns:
    A :class:`Run`.

  Example:
    >>> import numpy as np, vmaptune as vt
    >>> from flax import nnx
    >>> x = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    >>> y = x.sum(axis=1)
    >>> run = vt.train(lambda c, rngs: nnx.Linear(3, 1, rngs=rngs), (x, y),
    ...                {"learning_rate": 0.05}, num_steps=200, verbose=False)
    >>> run.status, run.score < 0.05
    ('ok', True)
  """
  if not isinstance(config, Mapping):
    raise TypeError(f"`config` must be a dict of hyperparameter values, got {type(config).__name__}.")
  for k, v in config.items():
    if isinstance(v, Distribution):
      raise TypeError(f"config[{k!r}] is a distribution; vt.train takes one value per hyperparameter (use vt.search to sample).")
  _int_arg("split_seed", split_seed, low=0)
  kind, space, routing, dataset, objective = _check_common(
      model_fn, data, dict(config), optimizer, metric, direction, loss_fn,
      val_fraction, split_seed, lr_schedule, eval_every, eval_batch_size, precision, empty_ok=True)
  space = dict(config)
  _int_arg("seed", seed, low=0)
  num_steps, epochs = _budget(num_steps, epochs)
  if callback is not None and not callable(callback):
    raise TypeError(f"`callback` must be callable, got {callback!r}.")
  planned = _check_schedule(schedule, config)
  devices = [device] if device is not None else None
  stats = Stats()
  ctx = _Context(model_fn=model_fn, routing=routing, dataset=dataset, objective=objective,
                 custom_loss=loss_fn is not None, num_steps=num_steps, epochs=epochs,
                 eval_every=eval_every, eval_batch_size=eval_batch_size, precision=precision,
                 devices=devices or [jax.local_devices()[0]], lane_batch=None, stats=stats)
  sig = routing.signature(space)
  program = ctx.single_program(sig)
  spec = program.spec
  steps, eval_every, evals = ctx.schedule(spec)
  for at in planned:
    if at % eval_every:
      raise ValueError(f"`schedule` step {at} is not a multiple of eval_every={eval_every}.")
  inputs = ctx.inputs(spec, [space], [seed], 1)
  inputs = jax.tree.map(lambda a: a[0], inputs)
  state = program.init(inputs)
  scores, losses, at = [], [], []
  progress = Progress(1, objective.metric_name, verbose, unit="steps")
  progress.start_round(0, steps, label="train")
  try:
    for e in range(evals):
      state, (score, loss, step) = program.advance(state, ctx.data, eval_every)
      scores.append(float(score)); losses.append(float(loss)); at.append(int(step))
      progress.advance(at[-1] - (at[-2] if len(at) > 1 else 0), scores[-1])
      if at[-1] in planned:
        state = _apply_changes(state, spec, planned[at[-1]])
      if callback is not None:
        hp = {k: float(v) for k, v in getattr(state.opt_state, "hyperparams", {}).items()} if spec.injected or spec.schedule else {}
        changes = callback(TrainState(at[-1], scores[-1], np.asarray(scores), np.asarray(at),
                                      np.asarray(losses), hp, int(state.diverged_at) >= 0))
        if changes:
          if changes.get("stop"):
            break
          state = _apply_changes(state, spec, changes)
  finally:
    progress.close()
  metrics = (np.asarray([scores]), np.asarray([losses]), np.asarray([at]))
  stacked = jax.tree.map(lambda a: a[None], state)
  return _run_from_lane(space, seed, stacked, metrics, 0, spec, objective.metric_name, objective.maximize)


def _apply_changes(state, spec: TrainSpec, changes: Mapping[str, Any]):
  hp = dict(state.opt_state.hyperparams) if hasattr(state.opt_state, "hyperparams") else {}
  unknown = [k for k in changes if k not in hp and k not in ("stop", "lr_decay")]
  if unknown:
    raise ValueError(
        f"callback returned changes for {unknown}; only injected optimizer "
        f"hyperparameters can change: {sorted(hp)}."
    )
  lr0, lr_decay = state.lr0, state.lr_decay
  for k, v in changes.items():
    if k == "stop":
      continue
    if k == "lr_decay":
      if spec.schedule is None:
        raise ValueError("changes to 'lr_decay' need lr_decay in the config from the start.")
      lr_decay = jax.device_put(np.asarray(v, np.float32), lr_decay.sharding)
      continue
    # Committed to the same device as before: an uncommitted array would
    # change the jit cache key and recompile the program.
    hp[k] = jax.device_put(np.asarray(v, hp[k].dtype), hp[k].sharding)
    if k == "learning_rate" and spec.schedule is not None:
      lr0 = jax.device_put(np.asarray(v, np.float32), lr0.sharding)
  return state._replace(opt_state=state.opt_state._replace(hyperparams=hp), lr0=lr0, lr_decay=lr_decay)


def _check_schedule(schedule, config) -> dict[int, dict]:
  """``{step: changes}`` from a ``[(step, config), ...]`` schedule (the first entry
  may repeat the starting config); only changed values are kept."""
  if schedule is None:
    return {}
  try:
    entries = [(int(step), dict(values)) for step, values in schedule]
  except (TypeError, ValueError):
    raise TypeError("`schedule` must be a list of (step, {name: value}) pairs.") from None
  out, current = {}, dict(config)
  for step, values in sorted(entries, key=lambda e: e[0]):
    if step < 0:
      raise ValueError(f"`schedule` steps must be >= 0, got {step}.")
    changes = {k: v for k, v in values.items() if current.get(k) != v}
    for k in changes:
      if k not in config:
        raise ValueError(f"`schedule` changes {k!r}, which is not in `config`.")
    if step == 0 and changes:
      raise ValueError(f"`schedule` changes {sorted(changes)} at step 0; put them in `config`.")
    current.update(values)
    if changes:
      out[step] = changes
  return out
