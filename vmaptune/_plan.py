"""The plan of a search: buckets, their programs, lane layouts and memory.

Host only. A *bucket* is the set of configs that share a static signature
(model keys, static optimizer values, batch size) and so one
:class:`~vmaptune._lane.TrainSpec`; a bucket's lanes run in one or more
*chunks* of ``lanes`` lanes each, all of one compiled :class:`Program`.
:class:`Plan` decides the spec of a signature (validating it before anything
compiles), each bucket's step budget and evaluation cadence, how many lanes a
program holds within the memory budget, and hands out programs from the
registry shared by searches.
"""

from __future__ import annotations

import jax
import numpy as np

from . import _devices, _faults
from ._check import diagnose
from ._data import Dataset
from ._objective import Objective
from ._lane import LaneInputs, TrainSpec, lane_init, stack_inputs
from ._model import make_adapter
from ._compiler import cached, code_reads
from ._convgrad import conv_grads
from ._program import Layout, Program
from ._single import SingleProgram
from ._routing import DEFAULT_BATCH_SIZE, Routing

__all__ = ["Plan", "OutOfMemoryError", "DEFAULT_NUM_EVALS", "DEFAULT_EVAL_BATCH"]

DEFAULT_NUM_EVALS = 10
DEFAULT_EVAL_BATCH = 512


class OutOfMemoryError(MemoryError):
  """Not even one lane per device fits in device memory (or the budget).

  >>> import vmaptune as vt
  >>> issubclass(vt.OutOfMemoryError, MemoryError)
  True
  """


def human_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"  # pragma: no cover


def peak_bytes(memory) -> int | None:
  """A compiled program's peak memory per device, from its memory analysis."""
  if memory is None:
    return None
  peak = getattr(memory, "peak_memory_in_bytes", None)
  if peak:
    return int(peak)
  total = sum(getattr(memory, a, 0) or 0 for a in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                    "output_size_in_bytes"))
  return int(total - (getattr(memory, "alias_size_in_bytes", 0) or 0)) or None


class Plan:
  """What one search (or one single run) decides before training anything.

  Args:
    model_fn, routing, dataset, objective: the search's model, key routing,
      data and loss/metric.
    custom_loss: whether the user gave ``loss_fn`` (shape checks relax).
    num_steps, epochs: the budget (one of them is None).
    eval_every: steps between evaluations, or None for ``DEFAULT_NUM_EVALS``
      per trial.
    eval_batch_size, precision: as in :func:`vmaptune.search`.
    devices: the devices to shard lanes over.
    lane_batch: lanes vectorised together per device, or None for the
      platform's default.
    memory_budget: bytes per device, or None for what is free.
  """

  def __init__(self, *, model_fn, routing: Routing, dataset: Dataset, objective: Objective, custom_loss: bool,
               num_steps, epochs, eval_every, eval_batch_size, precision, devices, lane_batch,
               memory_budget=None):
    self.model_fn = model_fn
    self._model_reads = code_reads(model_fn)  # a redefined model class is another program
    self.routing = routing
    self.dataset = dataset
    self.objective = objective
    self.custom_loss = custom_loss
    self.num_steps = num_steps
    self.epochs = epochs
    self.eval_every = eval_every
    self.eval_batch_size = min(eval_batch_size or DEFAULT_EVAL_BATCH, dataset.num_val)
    self.precision = precision
    self.devices = list(devices)
    self.mesh = _devices.make_mesh(self.devices)
    self.lane_batch = lane_batch
    self.memory_budget = _devices.memory_budget(memory_budget, self.devices)
    #: Lanes per program of the search, fixed by the first :meth:`capacity`.
    self.lanes_per_program: int | None = None
    #: Lanes per program of each bucket that had to be cut to fit memory.
    self.chunk_lanes: dict[tuple, int] = {}
    self._specs: dict[tuple, TrainSpec] = {}
    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype), dataset.train)
    #: What the model is called on, when vmaptune calls it (an (x, y) pair and a loss or metric of outputs).
    self.x_example = example[0] if dataset.paired and objective.calls_model else None
    self.batch_example = example

  # Budgets -------------------------------------------------------------

  def batch_size(self, signature: tuple) -> int:
    b = dict(signature).get("batch_size")
    return int(b) if b is not None else min(DEFAULT_BATCH_SIZE, self.dataset.num_train)

  def steps_for(self, batch_size: int) -> int:
    """A trial's steps: ``num_steps``, or ``epochs`` worth of batches."""
    if self.epochs is None:
      return self.num_steps
    return max(1, int(round(self.epochs * (self.dataset.num_train // batch_size))))

  def trial_steps(self, signature: tuple) -> int:
    """The steps of a trial of bucket ``signature`` (its batch size's :meth:`steps_for`)."""
    return self.steps_for(self.batch_size(signature))

  def eval_every_for(self, steps: int) -> int:
    if self.eval_every is not None:
      return min(self.eval_every, steps)
    return max(1, -(-steps // DEFAULT_NUM_EVALS))

  def schedule(self, spec: TrainSpec) -> tuple[int, int, int]:
    """``(steps, eval_every, evals)`` of a bucket's trials."""
    steps = self.steps_for(spec.batch_size)
    eval_every = self.eval_every_for(steps)
    return steps, eval_every, -(-steps // eval_every)

  # Specs and programs --------------------------------------------------

  def _cache_key(self, signature: tuple, *layout) -> tuple:
    o = self.objective
    return (
        self.model_fn, self._model_reads, self.routing, o.loss_fn, o.metric_fn, o.model_loss, o.model_metric,
        self.dataset.signature(),
        self.eval_batch_size, self.precision, tuple(x.id for x in self.devices),
        conv_grads(self.devices[0].platform), signature,
    ) + layout

  def spec(self, signature: tuple) -> TrainSpec:
    """The (validated) static description of a bucket; traces, never compiles.

    Checked specs are kept between calls in this process (like programs), so
    a loop of ``vt.train`` calls does not trace the model again each time.
    """
    if signature not in self._specs:
      self._specs[signature] = cached(self._cache_key(signature, "spec"), lambda: self._new_spec(signature))
    return self._specs[signature]

  def _new_spec(self, signature: tuple) -> TrainSpec:
    config = dict(signature)
    spec = TrainSpec(
        adapter=make_adapter(self.model_fn, self.routing.model_config(config), self.x_example,
                             self.objective.model_loss, self.batch_example),
        routing=self.routing,
        static_opt=self.routing.static_opt_values(config),
        batch_size=self.batch_size(signature),
        eval_batch_size=self.eval_batch_size,
        objective=self.objective,
        num_train=self.dataset.num_train,
        num_val=self.dataset.num_val,
        precision=self.precision,
        num_classes=self.dataset.num_classes,
    )
    # One lane's state as shapes (memory estimates, the programs' arguments);
    # every other check happens as the programs are traced.
    inputs = LaneInputs(
        seed=jax.ShapeDtypeStruct((), np.uint32),
        hparams={k: jax.ShapeDtypeStruct((), np.int32 if k in spec.int_injected else np.float32)
                 for k in spec.injected},
        lr_decay=jax.ShapeDtypeStruct((), np.float32), budget=jax.ShapeDtypeStruct((), np.int32))
    try:
      state = jax.eval_shape(lambda i: lane_init(spec, i), inputs)
    except Exception as e:  # noqa: BLE001 - diagnosed stage by stage
      self.diagnose(spec, e)
    object.__setattr__(spec, "abstract_state", state)
    # The CPU's convolution gradients where a parameter could be a kernel
    # (3-D or more); a model of dense layers alone is traced as it is.
    kernels = any(a.ndim >= 3 for a in jax.tree.leaves(state.params))
    object.__setattr__(spec, "conv_grads", kernels and conv_grads(self.devices[0].platform))
    return spec

  def diagnose(self, spec: TrainSpec, error: BaseException) -> None:
    """Re-raises ``error`` (raised tracing ``spec``) as the clearest error:
    stage by stage, naming the config."""
    diagnose(spec, self.dataset, self.custom_loss, error)

  def layout(self, num_lanes: int) -> Layout:
    d = len(self.devices)
    k = self.lane_batch
    if k is None:
      # One lane at a time per CPU core beats a batched matmul there
      # (benchmarks/RESULTS.md); accelerators take all their lanes at once.
      k = 1 if self.devices[0].platform == "cpu" else max(1, num_lanes // d)
    return Layout(num_lanes, d, k)

  def padded_lanes(self, n: int) -> int:
    """``n`` rounded up to a whole number of lane groups on every device."""
    unit = len(self.devices) * (self.lane_batch or 1)
    return max(unit, -(-n // unit) * unit)

  def capacity(self, wanted: int) -> int:
    """Lanes per program: ``wanted`` padded to the devices the first time,
    then fixed, so later rounds and refills reuse the same programs."""
    if self.lanes_per_program is None:
      self.lanes_per_program = self.padded_lanes(wanted)
    return self.lanes_per_program

  def program(self, signature: tuple, num_lanes: int, evals_per_call: int) -> Program:
    """The (possibly not yet compiled) program of a bucket at a lane count."""
    spec = self.spec(signature)
    layout = self.layout(num_lanes)
    key = self._cache_key(signature, num_lanes, layout.lane_batch, evals_per_call)
    return cached(key, lambda: Program(spec, layout, self.mesh, evals_per_call))

  def single_program(self, signature: tuple) -> SingleProgram:
    """A one-lane program (vt.train), cached like population programs."""
    spec = self.spec(signature)
    return cached(self._cache_key(signature, "single"), lambda: SingleProgram(spec, self.devices[0]))

  # Memory --------------------------------------------------------------

  def state_bytes(self, spec: TrainSpec) -> int:
    """Bytes of one lane's training state (params, optimizer, permutation)."""
    state = spec.abstract_state
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
    return self.dataset.nbytes

  def fit_lanes(self, signature: tuple, wanted: int) -> int:
    """The most lanes (≤ ``wanted``) a bucket's program may hold within the budget.

    A first guess from the lane's state size (the state, its gradients and
    optimizer temporaries: 3x), checked against the compiled program's own
    memory analysis (:meth:`check_budget`).
    """
    if signature in self.chunk_lanes:
      return min(wanted, self.chunk_lanes[signature])
    lanes = wanted
    if self.memory_budget is not None:
      per_lane = 3 * self.state_bytes(self.spec(signature))
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
      need = self.state_bytes(self.spec(signature))
      avail = self.memory_budget
      raise OutOfMemoryError(
          f"even {lanes} lane(s) ({lanes // len(self.devices)} per device) of bucket "
          f"{dict(signature)} do not fit: one lane needs {human_bytes(need)} of state (parameters, "
          f"optimizer, data order) plus activations, and every device holds {human_bytes(self.data_bytes())} "
          "of data; "
          + (f"the budget is {human_bytes(avail)} per device" if avail else "the device ran out")
          + f" ({why}). Use a smaller model or batch, or more device memory."
      )
    smaller = max(unit, (lanes // 2) // unit * unit)
    self.chunk_lanes[signature] = smaller
    return smaller

  def check_budget(self, program: Program) -> None:
    """Raises an out-of-memory error if the compiled program's peak exceeds the budget."""
    peak = peak_bytes(program.memory)
    if self.memory_budget is not None and peak is not None and peak > self.memory_budget:
      raise _faults.InjectedOutOfMemory(
          f"RESOURCE_EXHAUSTED: the compiled program needs {human_bytes(peak)} per device, "
          f"over the budget of {human_bytes(self.memory_budget)}"
      )
