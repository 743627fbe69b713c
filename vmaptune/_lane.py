"""One lane: its inputs, its state and the pure functions that train it.

Everything here is written for a single lane and knows nothing of the lane
axis; ``_program`` vectorises it (``jax.vmap``/``lax.map``) in one place and
compiles it. A lane's numbers depend on its own inputs alone: its init, data
order and training noise derive from its trial seed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ._convgrad import fast_conv_grads
from ._model import ModelAdapter
from ._objective import (Objective, check_default_outputs, check_float_loss, check_per_example, check_value,
                         mean_value)
from ._routing import Routing

__all__ = ["LaneInputs", "LaneState", "TrainSpec", "lane_init", "lane_step", "lane_eval", "lane_check",
           "stack_inputs"]


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
  """Everything static about one bucket's program: the lanes of a bucket
  differ only in their :class:`LaneInputs`.

  Attributes:
    adapter: the model at this bucket's structural config.
    routing: where each hyperparameter goes (the optimizer factory, which
      names are injected per lane, the learning-rate schedule).
    static_opt: this bucket's non-numeric optimizer arguments,
      ``((name, value), ...)``.
    batch_size: examples per step.
    eval_batch_size: validation examples per chunk of the validation pass.
    objective: loss and metric.
    num_train, num_val: dataset sizes.
    precision: matmul precision for ``jax.default_matmul_precision``.
    num_classes: classes in the labels (classification), for the default
      loss's check of the logits; else None.
    conv_grads: differentiate convolutions as ``_convgrad`` does (on the
      CPU, where XLA's own convolution gradients are 2-16x slower, for a
      model with a parameter of 3 or more dimensions: a kernel).
    conv_rewrites: how many operations that rewrote in the training step,
      once traced (None before); 0 turns it off for later traces.
    abstract_state: one lane's state as shapes and dtypes, once checked
      (``_check.check_spec`` fills it; memory estimates read it).
  """

  adapter: ModelAdapter
  routing: Routing
  static_opt: tuple
  batch_size: int
  eval_batch_size: int
  objective: Objective
  num_train: int
  num_val: int
  precision: str | None = None
  num_classes: int | None = None
  conv_grads: bool = False
  conv_rewrites: int | None = dataclasses.field(default=None, compare=False)
  abstract_state: Any = dataclasses.field(default=None, compare=False)

  @property
  def injected(self) -> tuple:
    return self.routing.injected

  @property
  def int_injected(self) -> tuple:
    return self.routing.int_injected

  @property
  def schedule(self) -> str | None:
    return self.routing.schedule

  @property
  def steps_per_epoch(self) -> int:
    return self.num_train // self.batch_size

  def make_optimizer(self, hparams: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optax transformation with this lane's injected hyperparameters."""
    if self.routing.factory_kind == "transform":
      return self.routing.optimizer
    static = dict(self.static_opt)
    callables = tuple(k for k, v in static.items() if callable(v))
    return optax.inject_hyperparams(
        self.routing.optimizer, static_args=callables, hyperparam_dtype=jnp.float32
    )(**hparams, **static)


def stack_inputs(
    seeds: Sequence[int],
    hparams: Sequence[Mapping[str, Any]],
    lr_decay: Sequence[float],
    budgets: Sequence[int],
    spec: TrainSpec,
) -> LaneInputs:
  """Host arrays for a list of lanes, shape ``(num_lanes,)`` each.

  Hyperparameters are float32 (int32 for integer ones) whatever form the
  config holds them in: a Python float, an ``np.float32`` and a JAX scalar
  would otherwise be three jit cache entries (optax#1414).
  """
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


_FEISTEL_ROUNDS = 8


def _mix(x: jax.Array, k: jax.Array) -> jax.Array:
  """A Feistel round function: the key xored in, then murmur3's finaliser."""
  h = x ^ k
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def shuffle(seed: jax.Array, n: int) -> jax.Array:
  """A random permutation of ``range(n)`` without a sort, from two uint32 words.

  ``jax.random.permutation`` sorts random keys; on CPU that sort (once an
  epoch) measured 24% of a digits-MLP step's time and 17% of the program's
  compile time. Here an 8-round Feistel network, keyed from ``seed`` (shape
  ``(2,)``, uint32) by an integer hash, is a random bijection of
  ``[0, 2**b)`` (``2**b`` the first power of two >= ``n``): the values below
  ``n``, in order, are a permutation of ``range(n)`` (a cumsum and a scatter
  put them in place). Integer ops only, no PRNG: the training program carries
  no threefry code.

  >>> import numpy as np
  >>> p = np.asarray(shuffle(np.asarray([1, 2], np.uint32), 10))
  >>> sorted(p.tolist()) == list(range(10))
  True
  """
  bits = max(2, (n - 1).bit_length())
  left_bits, right_bits = bits // 2, bits - bits // 2
  seed = jnp.asarray(seed, jnp.uint32)
  rounds = jnp.arange(_FEISTEL_ROUNDS, dtype=jnp.uint32)
  keys = _mix(_mix(seed[0] ^ (rounds * jnp.uint32(0x9E3779B9)), seed[1]), rounds + jnp.uint32(0x632BE5AB))
  x = jnp.arange(2 ** bits, dtype=jnp.uint32)
  mask_l, mask_r = jnp.uint32(2 ** left_bits - 1), jnp.uint32(2 ** right_bits - 1)

  def two_rounds(i, lr):
    # (L, R) -> (R, L ^ F(R)) is a bijection whatever F is; two rounds bring
    # the (unequal) widths back, so a loop of pairs keeps the program small.
    left, right = lr
    left, right = right, (left ^ _mix(right, keys[2 * i])) & mask_l
    return right, (left ^ _mix(right, keys[2 * i + 1])) & mask_r

  left, right = lax.fori_loop(0, _FEISTEL_ROUNDS // 2, two_rounds, (x >> right_bits, x & mask_r))
  values = ((left << right_bits) | right).astype(jnp.int32)
  keep = values < n
  where = jnp.where(keep, jnp.cumsum(keep.astype(jnp.int32)) - 1, n)
  return jnp.zeros((n,), jnp.int32).at[where].set(values, mode="drop")


def epoch_order(data_key: jax.Array, epoch, n: int) -> jax.Array:
  """The order a lane visits its ``n`` training examples in ``epoch``: a
  shuffle keyed by the lane's data key (raw uint32 key data) and the epoch,
  hashed together. Mini-batch ``i`` of the epoch is ``order[i*B:(i+1)*B]``."""
  epoch = jnp.asarray(epoch).astype(jnp.uint32)
  words = jnp.asarray(data_key).reshape(-1)[-2:].astype(jnp.uint32)
  seed = jnp.stack([_mix(words[0], epoch * jnp.uint32(0x27D4EB2F)), _mix(words[1], epoch ^ jnp.uint32(0x165667B1))])
  return shuffle(seed, n)


def lane_perm(spec: TrainSpec, state: LaneState) -> jax.Array:
  """The permutation of the epoch ``state.step`` falls in."""
  return epoch_order(state.data_key, state.step // spec.steps_per_epoch, spec.num_train)


def scheduled_lr(spec: TrainSpec, state: LaneState) -> jax.Array:
  """The decayed learning rate of the epoch ``state.step`` falls in."""
  epoch = (state.step // spec.steps_per_epoch).astype(jnp.float32)
  if spec.schedule == "inverse_time":
    return state.lr0 / (1.0 + state.lr_decay * epoch)
  if spec.schedule == "exponential":
    return state.lr0 * jnp.exp(-state.lr_decay * epoch)
  raise ValueError(spec.schedule)


def all_finite(tree: Any) -> jax.Array:
  """Whether every inexact leaf of ``tree`` is finite (one boolean)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.ones((), bool)
  return jnp.all(jnp.stack(leaves))


def lane_loss(spec: TrainSpec, params, state: LaneState, batch):
  """Mean training loss of one mini-batch and the updated model state.

  ``batch`` is ``(x, y)`` for a loss of the outputs, the user's batch pytree
  for a model-aware loss.
  """
  key = jax.random.fold_in(_key(state.dropout_key), state.step)
  obj = spec.objective
  if obj.model_loss is not None:
    value, model_state = spec.adapter.call(params, state.model_state, lambda m: obj.model_loss(m, batch), True, key)
    check_value(value, "model_loss", spec.batch_size, spec.adapter.config)  # trace time: shapes are static
    check_float_loss(value, "model_loss")
    return mean_value(value, "model_loss"), model_state
  x, y = batch
  out, model_state = spec.adapter.apply(params, state.model_state, x, True, key)
  if obj.default_loss:
    check_default_outputs(out, y, spec.num_classes, spec.adapter.config)
  values = obj.loss_fn(out, y)
  check_per_example(values, "loss_fn", spec.batch_size)
  check_float_loss(values, "loss_fn")
  return jnp.mean(values), model_state


def lane_minibatch(spec: TrainSpec, state: LaneState, data) -> Any:
  """The lane's mini-batch for its current step, from its own permutation
  (every leaf of the data pytree, gathered the same way)."""
  i = state.step % spec.steps_per_epoch
  idx = lax.dynamic_slice_in_dim(state.perm, i * spec.batch_size, spec.batch_size)
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)


def lane_step(spec: TrainSpec, state: LaneState, data) -> tuple[LaneState, jax.Array, jax.Array]:
  """One optimisation step; a lane that goes non-finite is frozen instead.

  Returns:
    ``(state, loss, took)``: ``took`` is False where the lane was frozen or
    past its budget, and ``state`` is then the old one.
  """
  batch = lane_minibatch(spec, state, data)
  loss_fn = functools.partial(lane_loss, spec)
  if spec.conv_grads and spec.conv_rewrites != 0:
    loss_fn = fast_conv_grads(loss_fn, on_trace=lambda n: object.__setattr__(spec, "conv_rewrites", n))
  (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state, batch)
  opt_state = state.opt_state
  if spec.schedule is not None:
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = scheduled_lr(spec, state).astype(hp["learning_rate"].dtype)
    opt_state = opt_state._replace(hyperparams=hp)
  opt = spec.make_optimizer({k: opt_state.hyperparams[k] for k in spec.injected}) if spec.injected else spec.make_optimizer({})
  updates, opt_state = opt.update(grads, opt_state, state.params)
  # The optimizer state keeps its dtypes: the float32 hyperparameters would
  # promote a bfloat16 model's moments (and change the loop's carry).
  opt_state = jax.tree.map(lambda n, o: n if n.dtype == o.dtype else n.astype(o.dtype), opt_state, state.opt_state)
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


_EVAL_STREAM = 0x5EA1  # evaluation keys: apart from the training steps'


def lane_eval(spec: TrainSpec, state: LaneState, val) -> jax.Array:
  """Mean validation metric of one lane, in evaluation mode, chunk by chunk.

  ``val`` is ``(chunks, weights, rest)``: the validation pytree cut into
  chunks of equal size (the last padded, weight 0), and the examples of a
  partial last chunk unpadded (None when there is none). Per-example values
  are averaged with the weights; a metric that returns one scalar per chunk
  is averaged over whole chunks and the rest, so padding never enters it.
  """
  chunks, weights, rest = val
  obj = spec.objective
  key = jax.random.fold_in(jax.random.fold_in(_key(state.dropout_key), state.step), _EVAL_STREAM)

  def value(chunk, k):
    if obj.metric_fn is not None:
      x, y = chunk
      out, _ = spec.adapter.apply(state.params, state.model_state, x, False, k)
      values = obj.metric_fn(out, y)
      check_per_example(values, "metric", jax.tree.leaves(chunk)[0].shape[0])
      return values.astype(jnp.float32)
    v, _ = spec.adapter.call(state.params, state.model_state, lambda m: obj.eval_fn(m, chunk), False, k)
    check_value(v, "model_metric" if obj.model_metric is not None else "model_loss",
                jax.tree.leaves(chunk)[0].shape[0], spec.adapter.config)
    if isinstance(v, tuple) and len(v) == 2:  # (loss, aux)
      v = v[0]
    return jnp.asarray(v).astype(jnp.float32)

  num_chunks, size = weights.shape
  first = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), chunks)
  per_example = jax.eval_shape(value, first, key).ndim == 1

  def body(total, item):
    chunk, w, i = item
    v = value(chunk, jax.random.fold_in(key, i))
    return total + (jnp.sum(v * w) if per_example else v * size), None

  index = jnp.arange(num_chunks, dtype=jnp.int32)
  if per_example or rest is None:
    total, _ = lax.scan(body, jnp.zeros((), jnp.float32), (chunks, weights, index))
    return total / spec.num_val
  full = num_chunks - 1  # the last chunk is the padded one: its examples are in ``rest``
  head = jax.tree.map(lambda a: a[:full], (chunks, weights, index))
  total, _ = lax.scan(body, jnp.zeros((), jnp.float32), head)
  n_rest = jax.tree.leaves(rest)[0].shape[0]
  total = total + value(rest, jax.random.fold_in(key, full)) * n_rest
  return total / spec.num_val


def lane_check(state: LaneState, score: jax.Array) -> LaneState:
  """Marks a lane diverged if its parameters or validation score are non-finite."""
  bad = ~(all_finite(state.params) & jnp.isfinite(score)) & (state.diverged_at < 0)
  return state._replace(diverged_at=jnp.where(bad, state.step, state.diverged_at))
