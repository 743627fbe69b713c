"""Lane equivalence: a lane's numbers depend on its own config and seed alone.

(1) ``retrain`` replays a trial bit for bit; (2) a config gives identical
results in populations of different sizes and neighbours; (3) against a plain
single run (``vt.train``, no vmap) gradients and first steps agree to
rounding and whole runs at moderate learning rates agree closely. Not
bitwise in general: XLA picks other kernels for a batched matmul than for a
single one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vmaptune as vt
from vmaptune import _data, _lane, _model, _objective, _routing

from _models import mlp_fn

MIXED = {
    "learning_rate": vt.loguniform(3e-4, 3e-3),
    "hidden": vt.choice([8, 16]),
    "batch_size": vt.choice([16, 32]),
}
STEPS = 40


@pytest.fixture(scope="module")
def mixed_population(small_digits):
  return vt.search(mlp_fn, small_digits, MIXED, num_configs=16, num_steps=STEPS, rounds=1,
                   seed=5, verbose=False)


def _leaves(tree):
  return [np.asarray(a) for a in jax.tree.leaves(tree)]


def test_population_has_mixed_buckets(mixed_population):
  sigs = {(t.config["hidden"], t.config["batch_size"]) for t in mixed_population.trials}
  assert len(sigs) == 4


def test_retrain_replays_bit_for_bit(mixed_population):
  best = mixed_population.best_trial
  run = mixed_population.retrain()
  assert run.score == best.score
  np.testing.assert_array_equal(run.curve, best.curve)
  np.testing.assert_array_equal(run.train_curve, best.train_curve)
  model = mixed_population.best_model()
  from flax import nnx

  for a, b in zip(_leaves(nnx.state(model, nnx.Param)), _leaves(run.params)):
    np.testing.assert_array_equal(a, b)
  for trial in mixed_population.trials[:: 5]:
    again = mixed_population.retrain(trial)
    assert again.score == trial.score and again.config == trial.config


@pytest.mark.parametrize("lane_batch", [None, 2])
def test_lanes_do_not_leak_across_population_sizes(small_digits, lane_batch):
  # The same configs (same positions, so the same trial seeds) among 4 lanes
  # and among 16, with other neighbours and another program shape.
  space = {"learning_rate": vt.loguniform(3e-4, 3e-3), "hidden": 16, "batch_size": 32}
  fixed = [{"learning_rate": 1e-3}, {"learning_rate": 2e-3}]
  kw = dict(num_steps=STEPS, rounds=1, seed=1, lane_batch=lane_batch, enqueue=fixed, verbose=False)
  small = vt.search(mlp_fn, small_digits, space, num_configs=4, **kw)
  large = vt.search(mlp_fn, small_digits, space, num_configs=16, **kw)
  for a, b in zip(small.trials[:2], large.trials[:2]):
    assert a.config == b.config and a.seed == b.seed
    assert a.score == b.score
    np.testing.assert_array_equal(a.curve, b.curve)


@pytest.mark.parametrize("lane_batch", [None])
def test_lanes_do_not_leak_across_neighbours(small_digits, lane_batch):
  fixed = [{"learning_rate": 1e-3, "hidden": 16, "batch_size": 32}]
  kw = dict(num_configs=8, num_steps=STEPS, rounds=1, lane_batch=lane_batch, enqueue=fixed, verbose=False)
  a = vt.search(mlp_fn, small_digits, MIXED, seed=11, **kw)
  b = vt.search(mlp_fn, small_digits, MIXED, seed=11, **{**kw, "enqueue": fixed})
  c = vt.search(mlp_fn, small_digits, {**MIXED, "learning_rate": vt.loguniform(1e-3, 3e-2)}, seed=11,
                **kw)
  assert a.trials[0].score == b.trials[0].score  # replays
  # c's other lanes have other learning rates; trial 0 must not notice.
  assert [t.config for t in a.trials[1:]] != [t.config for t in c.trials[1:]]
  assert a.trials[0].score == c.trials[0].score
  np.testing.assert_array_equal(a.trials[0].curve, c.trials[0].curve)


# --------------------------------------------------------------------------
# (3) Against a single run
# --------------------------------------------------------------------------


def _spec(small_digits, hidden=16, batch=32):
  ds = _data.prepare_data(small_digits, val_fraction=0.2, seed=0)
  obj = _objective.resolve_objective(ds.task, None, "loss", None)
  adapter = _model.make_adapter(mlp_fn, {"hidden": hidden}, jax.ShapeDtypeStruct((1, 64), np.float32))
  routing = _routing.route({"learning_rate": 1e-3}, optax.adam, "inverse_time")
  spec = _lane.TrainSpec(adapter=adapter, routing=routing, static_opt=(), batch_size=batch, eval_batch_size=512,
                         objective=obj, num_train=ds.num_train, num_val=ds.num_val)
  return spec, ds


@pytest.mark.slow  # its path: test_first_steps_match_a_single_run (a step's parameters, lanes against single runs)
def test_batched_gradients_match_single_lane_gradients(small_digits):
  spec, ds = _spec(small_digits)
  n = 4
  inputs = _lane.stack_inputs(range(n), [{"learning_rate": 1e-3}] * n, [0.0] * n, [10] * n, spec)
  data = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))

  def grads(state):
    state = state._replace(perm=_lane.lane_perm(spec, state))
    batch = _lane.lane_minibatch(spec, state, data)
    return jax.grad(lambda p: _lane.lane_loss(spec, p, state, batch)[0])(state.params)

  init = functools.partial(_lane.lane_init, spec)
  batched = jax.jit(jax.vmap(lambda i: grads(init(i))))(inputs)
  one = jax.jit(lambda i: grads(init(i)))
  for lane in range(n):
    single = one(jax.tree.map(lambda a: a[lane], inputs))
    for g_b, g_s in zip(_leaves(batched), _leaves(single)):
      np.testing.assert_allclose(g_b[lane], g_s, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lane_batch", [None, 2])
def test_first_steps_match_a_single_run(small_digits, lane_batch):
  space = {"learning_rate": vt.loguniform(3e-4, 3e-3), "hidden": 16, "batch_size": 32}
  result = vt.search(mlp_fn, small_digits, space, num_configs=4, num_steps=1, eval_every=1, rounds=1,
                     lane_batch=lane_batch, verbose=False)
  for trial in result.trials[:2]:
    alone = vt.train(mlp_fn, small_digits, trial.config, seed=trial.seed, num_steps=1, eval_every=1,
                     verbose=False)
    lane = result.retrain(trial)
    assert alone.score == pytest.approx(trial.score, rel=1e-5)
    for a, b in zip(_leaves(alone.params), _leaves(lane.params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lane_batch", [None, 2])
def test_whole_runs_at_moderate_learning_rate_agree(small_digits, lane_batch):
  space = {"learning_rate": vt.loguniform(3e-4, 1e-3), "hidden": 16, "batch_size": 32}
  result = vt.search(mlp_fn, small_digits, space, num_configs=4, num_steps=STEPS, rounds=1,
                     lane_batch=lane_batch, verbose=False)
  for trial in result.trials[:2]:
    alone = vt.train(mlp_fn, small_digits, trial.config, seed=trial.seed, num_steps=STEPS, verbose=False)
    np.testing.assert_allclose(alone.curve, trial.curve, rtol=1e-4)
    lane = result.retrain(trial)
    for a, b in zip(_leaves(alone.params), _leaves(lane.params)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------
# (4) Lanes without steps left cost nothing on the per-lane path
# --------------------------------------------------------------------------


def test_start_compiles_on_its_own_thread_beside_run(small_digits, monkeypatch):
  # The start program (0.6-0.8 s at XLA level 0 on the 2-core CPU) does not
  # wait for the training program's compile, nor it for start's.
  import threading

  from vmaptune import _compiler, _devices, _placement, _program

  spec, ds = _spec(small_digits, hidden=11)
  mesh = _devices.make_mesh(jax.devices())
  n = len(jax.devices())
  program = _program.Program(spec, _program.Layout(n, n, 1), mesh, evals_per_call=1)
  data = _placement.place_data(ds, 512, mesh)
  inputs = _placement.place_lanes(_lane.stack_inputs(range(n), [{"learning_rate": 1e-3}] * n, [0.0] * n,
                                                     [4] * n, spec), mesh)
  threads = {}
  compile = _compiler.Compiler.compile

  def record(self, lowered, tier="long"):
    threads[tier] = threading.current_thread().name
    return compile(self, lowered, tier)

  monkeypatch.setattr(_compiler.Compiler, "compile", record)
  program.lower(inputs, data)
  program.tier = "short"
  program.compile()
  assert threads == {"init": "vmaptune-start_0", "short": threading.current_thread().name}
  assert program.compiled and program.compiler.programs_compiled == 1
  # Without background compiles (VMAPTUNE_COMPILE_THREADS=0), both compile in line.
  monkeypatch.setenv("VMAPTUNE_COMPILE_THREADS", "0")
  inline = _program.Program(spec, _program.Layout(n, n, 1), mesh, evals_per_call=1)
  inline.lower(inputs, data)
  inline.tier = "short"
  inline.compile()
  assert set(threads.values()) == {threading.current_thread().name} and inline.compiled
  state = program.start(program.zeros(inputs), inputs, _placement.place_lanes(np.ones(n, bool), mesh), data)
  _, (scores, _, steps) = program.run(state, data, 4)
  assert np.isfinite(np.asarray(scores)).all() and (np.asarray(steps) == 4).all()


@pytest.mark.parametrize("lane_batch", [1, 2])
def test_a_restart_resets_the_masked_lanes_alone(small_digits, lane_batch):
  # A refill: the masked lanes get bit for bit the state a first start gives
  # them, the others keep theirs (one lane at a time, or vmapped groups).
  from vmaptune import _devices, _placement, _program

  spec, ds = _spec(small_digits)
  mesh = _devices.make_mesh(jax.devices())
  program = _program.Program(spec, _program.Layout(8, len(jax.devices()), lane_batch), mesh, evals_per_call=1)
  data = _placement.place_data(ds, 512, mesh)
  host = _lane.stack_inputs(range(8), [{"learning_rate": 1e-3}] * 8, [0.0] * 8, [10] * 8, spec)
  inputs = _placement.place_lanes(host, mesh)
  every = _placement.place_lanes(np.ones(8, bool), mesh)
  fresh = jax.device_get(program.start(program.zeros(inputs), inputs, every, data))
  alone = jax.device_get(jax.jit(jax.vmap(functools.partial(_lane.lane_init, spec)))(host))
  for f, r in zip(_leaves(fresh), _leaves(alone)):  # each lane from its own inputs
    np.testing.assert_allclose(f, r, rtol=1e-6)
  trained, _ = program.run(program.start(program.zeros(inputs), inputs, every, data), data, 5)
  before = jax.device_get(trained)
  mask = np.array([0, 1, 0, 0, 1, 1, 0, 1], bool)
  after = jax.device_get(program.start(trained, inputs, _placement.place_lanes(mask, mesh), data))
  for f, b, a in zip(_leaves(fresh), _leaves(before), _leaves(after)):
    np.testing.assert_array_equal(a[mask], f[mask])
    np.testing.assert_array_equal(a[~mask], b[~mask])
  assert not all(np.array_equal(f, b) for f, b in zip(_leaves(fresh), _leaves(before)))  # it had trained


def test_a_background_lowering_counts_flops_off_the_calling_thread(small_digits, monkeypatch):
  # XLA's FLOP count (50-130 ms a program: it converts the module to HLO) and
  # the convolution check are taken on the lowering thread, before the program
  # shows as lowered; the training thread then reads them without converting.
  import concurrent.futures
  import threading

  from vmaptune import _compiler, _devices, _placement, _program

  spec, ds = _spec(small_digits, hidden=13)
  mesh = _devices.make_mesh(jax.devices())
  n = len(jax.devices())
  data = _placement.place_data(ds, 512, mesh)
  inputs = _lane.stack_inputs(range(n), [{"learning_rate": 1e-3}] * n, [0.0] * n, [4] * n, spec)
  counted = []
  count = _compiler.counted_flops

  def record(lowered):
    counted.append(threading.current_thread().name)
    return count(lowered)

  monkeypatch.setattr(_program, "counted_flops", record)
  program = _program.Program(spec, _program.Layout(n, n, 1), mesh, evals_per_call=1)
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lowering") as pool:
    program.lower_on(pool, inputs, data)
    program.wait_lowered()
  assert program.lowered and counted == ["lowering_0"]
  flops, conv = program.step_flops(), program.has_convolution()
  assert counted == ["lowering_0"] and flops > 0 and conv is False
  # Lowered (and compiled) on the calling thread, a program counts only when
  # asked (a search without a timeout never asks), and the same.
  alone = _program.Program(spec, _program.Layout(n, n, 1), mesh, evals_per_call=1)
  alone._ready("quick", inputs, data)
  assert alone.compiled and counted == ["lowering_0"]
  assert alone.step_flops() == flops and counted[-1] == threading.current_thread().name


def test_lanes_without_steps_left_are_skipped_and_kept_bit_for_bit(small_digits):
  # Held, idle and finished lanes (budget reached) neither train nor run a
  # validation pass: their state comes back bit for bit and their scores are
  # NaN. The busy lanes' numbers do not depend on which neighbours idle.
  from vmaptune import _devices, _placement, _program

  spec, ds = _spec(small_digits)
  mesh = _devices.make_mesh(jax.devices())
  program = _program.Program(spec, _program.Layout(8, len(jax.devices()), 1), mesh, evals_per_call=2)
  data = _placement.place_data(ds, 512, mesh)

  def run(budgets):
    inputs = _placement.place_lanes(_lane.stack_inputs(range(8), [{"learning_rate": 1e-3}] * 8, [0.0] * 8,
                                                       budgets, spec), mesh)
    state = program.start(program.zeros(inputs), inputs, _placement.place_lanes(np.ones(8, bool), mesh), data)
    before = jax.device_get(state)
    after, (scores, losses, steps) = program.run(state, data, 5)
    return before, jax.device_get(after), np.asarray(scores), np.asarray(steps)

  busy = np.array([10, 0, 10, 0, 0, 10, 0, 5])
  before, after, scores, steps = run(busy)
  assert program.step_flops() > 0  # XLA's count, what a timeout search scales a measured pace by
  idle = busy == 0
  assert np.isnan(scores[idle]).all() and np.isfinite(scores[~idle]).all()
  np.testing.assert_array_equal(steps[idle], 0)
  np.testing.assert_array_equal(steps[~idle][:, -1], busy[~idle])
  for a, b in zip(_leaves(before), _leaves(after)):
    np.testing.assert_array_equal(a[idle], b[idle])
  _, every, all_scores, _ = run(np.array([10, 10, 10, 10, 10, 10, 10, 5]))
  np.testing.assert_array_equal(scores[~idle], all_scores[~idle])
  for a, b in zip(_leaves(after), _leaves(every)):
    np.testing.assert_array_equal(a[~idle], b[~idle])
