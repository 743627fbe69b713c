"""Strategies inside the population: halving with refill, PBT, quasi-random, TPE."""

import math

import jax
import numpy as np
import optax
import pytest

import vmaptune as vt
from vmaptune import _data, _lane, _model, _objective, _placement, _program, _routing, _samplers, _region

from _models import mlp_fn

SPACE = {"learning_rate": vt.loguniform(1e-3, 3e-2), "b1": vt.reverse_loguniform(0.8, 0.99), "hidden": 16}
KW = dict(num_configs=8, num_steps=36, rounds=2, seed=0, verbose=False)


@pytest.fixture(scope="module")
def halving(small_digits):
  return vt.search(mlp_fn, small_digits, SPACE, strategy="halving", **KW)


@pytest.fixture(scope="module")
def pbt(small_digits):
  return vt.search(mlp_fn, small_digits, SPACE, strategy=vt.PBT(ready=18), **KW)


def _score_at(trial, step):
  return trial.curve[list(trial.curve_steps).index(step)]


def test_halving_refills_keep_the_lane_count_and_compile_once(halving):
  # 8 lanes over 4 devices, 2 rounds x 36 steps, rungs at 4, 12 and 36 steps.
  assert len(halving.trials) > 8  # stopped lanes were refilled with new configs
  assert all(t.lane < 8 for t in halving.trials)
  assert halving.stats.programs_compiled <= 3  # fresh, advance, refill: never again
  assert halving.stats.lane_steps == 8 * 72  # no lane sat idle
  statuses = {t.status for t in halving.trials}
  assert statuses <= {"ok", "stopped", "diverged"} and "stopped" in statuses and "ok" in statuses
  assert all(t.status != "ok" or t.steps == 36 for t in halving.trials)
  assert halving.best_trial.status == "ok"


def test_halving_stops_the_worse_lanes(halving):
  cohort = [t for t in halving.trials if t.id < 8]
  stopped = [_score_at(t, 4) for t in cohort if t.rung == 0 and t.status == "stopped"]
  promoted = [_score_at(t, 4) for t in cohort if t.steps > 4]
  assert len(promoted) == 8 // 3 and len(stopped) == 8 - len(promoted)
  assert max(promoted) <= min(stopped)  # loss: lower is better


def test_halving_refills_come_from_the_zoom_region(halving):
  refilled = [t for t in halving.trials if t.id >= 8]
  assert any(t.round >= 1 for t in refilled)
  for t in refilled:
    assert halving.regions[t.round].contains(halving.space, t.config)
  width = lambda r: np.subtract(*r.numeric["learning_rate"][::-1])
  assert width(halving.regions[1]) < width(halving.regions[0])


def test_halving_lane_that_was_never_stopped_matches_a_single_run(halving, small_digits):
  finished = [t for t in halving.trials if t.id < 8 and t.status == "ok"]
  assert finished
  t = finished[0]
  alone = vt.train(mlp_fn, small_digits, t.config, seed=t.seed, num_steps=36, eval_every=4, verbose=False)
  np.testing.assert_allclose(alone.curve, t.curve, rtol=1e-4)
  assert halving.retrain(t).score == t.score
  # Refilled trials (initialised inside the refill program) replay too,
  # stopped ones to the step they were stopped at.
  for t in [t for t in halving.trials if t.id >= 8][:3]:
    again = halving.retrain(t)
    assert again.score == t.score and again.steps == t.steps


def test_pbt_records_schedules_and_perturbs_within_bounds(pbt):
  assert len(pbt.trials) == 8 and pbt.stats.lane_steps == 8 * 72
  changed = [t for t in pbt.trials if len(t.schedule) > 1]
  assert changed  # the bottom quarter exploited a top lane at each ready point
  for t in pbt.trials:
    assert t.schedule[0][0] == 0 and t.schedule[-1][1] == t.config
    for step, config in t.schedule:
      assert step % 18 == 0
      assert 1e-3 <= config["learning_rate"] <= 3e-2 and 0.8 <= config["b1"] <= 0.99
      assert config["hidden"] == 16
  with pytest.raises(ValueError, match="schedule"):
    pbt.retrain()


def test_strategy_results_save_and_load(pbt, halving, tmp_path):
  for result in (pbt, halving):
    loaded = vt.load(result.save(tmp_path / f"{id(result)}.vmaptune"))
    assert [t.schedule for t in loaded.trials] == [t.schedule for t in result.trials]
    assert [t.rung for t in loaded.trials] == [t.rung for t in result.trials]
    assert loaded.options["strategy"] == result.options["strategy"]


def test_pbt_lane_never_copied_matches_a_single_run(pbt, small_digits):
  untouched = [t for t in pbt.trials if len(t.schedule) == 1]
  assert untouched
  t = untouched[0]
  alone = vt.train(mlp_fn, small_digits, t.config, seed=t.seed, num_steps=72, eval_every=18, verbose=False)
  np.testing.assert_allclose(alone.curve, t.curve, rtol=1e-4)


def test_pbt_schedule_replays_with_train(pbt, small_digits):
  best = max((t for t in pbt.trials if len(t.schedule) > 1), key=lambda t: len(t.schedule))
  seen = []
  vt.train(mlp_fn, small_digits, best.schedule[0][1], seed=best.seed, num_steps=72, eval_every=18,
           schedule=best.schedule, verbose=False,
           callback=lambda s: seen.append((s.step, s.hyperparams["learning_rate"])))
  planned = {step: c["learning_rate"] for step, c in best.schedule}
  for step, lr in seen:
    if step in planned and step < 72:
      assert lr == pytest.approx(planned[step], rel=1e-6)
  # Without eval_every (a tenth of the run, 7 steps), the run evaluates often
  # enough to reach every change (PBT's are at multiples of 18).
  run = vt.train(mlp_fn, small_digits, best.schedule[0][1], seed=best.seed, num_steps=72,
                 schedule=best.schedule, verbose=False)
  assert set(planned) - {0} <= set(run.curve_steps.tolist()) and run.curve_steps[-1] == 72
  assert np.all(np.diff(run.curve_steps) == 6)  # 6 divides PBT's 18 and is at most the default 7
  with pytest.raises(ValueError, match=r"schedule.*pass eval_every="):  # steps 18 and 37 share no interval
    vt.train(mlp_fn, small_digits, best.schedule[0][1], num_steps=72, verbose=False,
             schedule=[(0, best.schedule[0][1]), (18, {"learning_rate": 1e-3}), (37, {"learning_rate": 2e-3})])


def test_pbt_exploit_copies_parameters_and_optimizer_state_exactly(small_digits):
  ds = _data.prepare_data(small_digits, val_fraction=0.2, seed=0)
  obj = _objective.resolve_objective(ds.task, None, "loss", None)
  routing = _routing.route({"learning_rate": 1e-2}, optax.adam, "inverse_time")
  spec = _lane.TrainSpec(adapter=_model.make_adapter(mlp_fn, {"hidden": 8}, jax.ShapeDtypeStruct((1, 64), np.float32)), routing=routing, static_opt=(),
                         batch_size=32, eval_batch_size=512, objective=obj, num_train=ds.num_train,
                         num_val=ds.num_val)
  from vmaptune import _devices

  mesh = _devices.make_mesh(jax.devices())
  program = _program.Program(spec, _program.Layout(4, 4, 1), mesh, evals_per_call=1)
  data = _placement.place_data(ds, 512, mesh)
  inputs = _placement.place_lanes(_lane.stack_inputs(range(4), [{"learning_rate": 1e-2}] * 4, [0.0] * 4,
                                                   [10] * 4, spec), mesh)
  mask = _placement.place_lanes(np.ones(4, bool), mesh)
  state = program.start(program.zeros(inputs), inputs, mask, data)
  state, _ = program.run(state, data, 5)
  before = jax.device_get(state)
  source = np.array([0, 0, 2, 2], np.int32)  # lane 1 takes lane 0, lane 3 takes lane 2
  new_lr = np.array([1e-2, 5e-3, 1e-2, 2e-2], np.float32)
  after = jax.device_get(program.exploit(state, source, {"learning_rate": new_lr},
                                         np.zeros(4, np.float32), np.zeros(4, np.float32)))
  for a, b in zip(jax.tree.leaves((after.params, after.opt_state.inner_state)),
                  jax.tree.leaves((before.params, before.opt_state.inner_state))):
    np.testing.assert_array_equal(a[1], b[0])
    np.testing.assert_array_equal(a[3], b[2])
    np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(after.opt_state.hyperparams["learning_rate"], new_lr)
  np.testing.assert_array_equal(after.data_key, before.data_key)  # own data order


def test_pbt_never_copies_from_a_diverged_lane(small_digits):
  space = {"learning_rate": vt.loguniform(1e-3, 1e30), "hidden": 16}
  r = vt.search(mlp_fn, small_digits, space, optimizer=optax.sgd, strategy=vt.PBT(ready=18), num_configs=4,
                num_steps=36, rounds=1, enqueue=[{"learning_rate": 1e30}] + [{"learning_rate": 1e-2}] * 3,
                verbose=False)
  search_exploits = [t for t in r.trials if t.id == 0][0]
  # Lane 0 diverged at once, was overwritten at the first ready point by a
  # healthy lane, and ends healthy; nobody copied it.
  assert len(search_exploits.schedule) >= 2 and search_exploits.parent != 0
  assert search_exploits.status == "ok" and math.isfinite(search_exploits.score)
  assert all(t.parent != 0 for t in r.trials)


@pytest.mark.parametrize("strategy", ["halving", "pbt"])
def test_strategies_are_deterministic(small_digits, strategy, halving, pbt):
  again = vt.search(mlp_fn, small_digits, SPACE, strategy=strategy if strategy == "halving" else vt.PBT(ready=18),
                    **KW)
  first = halving if strategy == "halving" else pbt
  assert [(t.config, t.seed, t.score, t.status) for t in again.trials] == \
         [(t.config, t.seed, t.score, t.status) for t in first.trials]


@pytest.mark.parametrize("kind", ["sobol", "halton"])
def test_quasi_random_points_are_more_even_than_random(kind):
  space = {"a": vt.uniform(0, 1), "b": vt.loguniform(1e-4, 1.0), "c": vt.reverse_loguniform(0.5, 0.999)}
  region = vt.Region.full(space)
  unit = lambda cs: np.asarray([_region.coords(space, c, list(space)) for c in cs])
  qmc = [_samplers.discrepancy(unit(_samplers.qmc_values(space, 64, region, kind, (s, 0)))) for s in range(5)]
  rnd = [_samplers.discrepancy(unit(_region.sample_values(space, np.random.default_rng(s), 64, region)))
         for s in range(5)]
  assert np.median(qmc) < 0.5 * np.median(rnd)
  assert _samplers.qmc_values(space, 8, region, kind, (1, 0)) == _samplers.qmc_values(space, 8, region, kind, (1, 0))


def test_sobol_search_samples_zoom_rounds_inside_the_region(small_digits):
  r = vt.search(mlp_fn, small_digits, SPACE, sampler="sobol", num_configs=8, num_steps=20, rounds=2,
                verbose=False)
  assert len(r.trials) == 16
  assert all(r.regions[t.round].contains(r.space, t.config) for t in r.trials)


def test_tpe_proposes_a_full_batch(small_digits):
  pytest.importorskip("optuna")
  r = vt.search(mlp_fn, small_digits, SPACE, sampler="tpe", num_configs=8, num_steps=20, rounds=2,
                verbose=False)
  assert len(r.trials) == 16 and len({t.config["learning_rate"] for t in r.trials}) == 16
  again = vt.search(mlp_fn, small_digits, SPACE, sampler="tpe", num_configs=8, num_steps=20, rounds=2,
                    verbose=False)
  assert [t.config for t in again.trials] == [t.config for t in r.trials]


def test_strategy_validation(small_digits):
  with pytest.raises(ValueError, match="strategy"):
    vt.search(mlp_fn, small_digits, SPACE, strategy="asha", **KW)
  with pytest.raises(ValueError, match="eta"):
    vt.Halving(eta=1)
  with pytest.raises(ValueError, match="fraction"):
    vt.PBT(fraction=0.9)
  with pytest.raises(ValueError, match="grid"):
    vt.search(mlp_fn, small_digits, SPACE, strategy="pbt", sampler="grid", **KW)
  with pytest.raises(ValueError, match="epochs"):
    vt.search(mlp_fn, small_digits, SPACE, strategy="halving", **dict(KW, num_steps=None, epochs=1))


def _same_trials(a, b):
  assert len(a.trials) == len(b.trials)
  for s, t in zip(a.trials, b.trials):
    assert (s.id, s.config, s.status, s.steps, s.rung, s.parent, s.schedule) == \
           (t.id, t.config, t.status, t.steps, t.rung, t.parent, t.schedule)
    assert s.score == t.score or (math.isnan(s.score) and math.isnan(t.score))
    np.testing.assert_array_equal(s.curve, t.curve)
    np.testing.assert_array_equal(s.train_curve, t.train_curve)


# Halving's 2nd checkpoint (12 steps each) comes before any zoom region or
# finished trial, its 4th after both; PBT's 2nd is after its first exploit.
@pytest.mark.parametrize("name,at", [("halving", 2), ("halving", 4), ("pbt", 2)])
def test_strategy_crashed_mid_run_resumes_to_the_uninterrupted_result(name, at, small_digits, tmp_path,
                                                                      monkeypatch, request):
  from vmaptune import _faults

  straight = request.getfixturevalue(name)
  kw = dict(KW, strategy="halving" if name == "halving" else vt.PBT(ready=18),
            checkpoint_dir=tmp_path / "ckpt", checkpoint_every=12)
  seen = []
  monkeypatch.setenv("VMAPTUNE_FAILPOINT", f"{name}:saved@{at}=crash")
  _faults.reset()
  with pytest.raises(_faults.SimulatedCrash):  # dies right after its 2nd checkpoint
    vt.search(mlp_fn, small_digits, SPACE, **kw)
  monkeypatch.delenv("VMAPTUNE_FAILPOINT")
  resumed = vt.search(mlp_fn, small_digits, SPACE, callbacks=[seen.append], **kw)
  assert resumed.stats.resumed_from
  # Only the population time after the checkpoint is trained again.
  assert 0 < resumed.stats.lane_steps < straight.stats.lane_steps
  _same_trials(resumed, straight)
  assert resumed.best_trial.id == straight.best_trial.id
  for u, v in zip(jax.tree.leaves(resumed.best_params), jax.tree.leaves(straight.best_params)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert seen and len(seen[-1].trials) == len(straight.trials)
  again = vt.search(mlp_fn, small_digits, SPACE, **kw)  # finished: nothing left to train
  assert again.stats.lane_steps == 0
  _same_trials(again, straight)
  for u, v in zip(jax.tree.leaves(again.best_params), jax.tree.leaves(straight.best_params)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  with pytest.raises(vt.CheckpointMismatch, match="strategy"):
    vt.search(mlp_fn, small_digits, SPACE, **dict(kw, strategy="pbt" if name == "halving" else "halving"))


def test_ctrl_c_in_halving_returns_finished_trials_and_a_rerun_completes(small_digits, halving, tmp_path):
  def interrupt(result):
    raise KeyboardInterrupt

  kw = dict(KW, strategy="halving", checkpoint_dir=tmp_path / "ckpt")
  with pytest.warns(RuntimeWarning, match="interrupted"):
    partial = vt.search(mlp_fn, small_digits, SPACE, callbacks=[interrupt], **kw)
  assert partial.interrupted and 0 < len(partial.trials) < len(halving.trials)
  assert {t.status for t in partial.trials} <= {"ok", "stopped", "diverged"}
  assert partial.best_trial.status == "ok" and partial.best_model() is not None
  finished = vt.search(mlp_fn, small_digits, SPACE, **kw)  # the saved population trains on
  assert not finished.interrupted and finished.stats.resumed_from
  _same_trials(finished, halving)


def test_halving_with_tpe_refills_keep_their_bucket_and_replay(small_digits):
  pytest.importorskip("optuna")
  space = dict(SPACE, hidden=vt.choice([8, 16]))
  kw = dict(KW, strategy="halving", sampler="tpe")
  r = vt.search(mlp_fn, small_digits, space, **kw)
  assert r.stats.lane_steps == 8 * 72 and r.stats.programs_compiled <= 6  # 2 buckets x 3 programs
  refilled = [t for t in r.trials if t.id >= 8]
  assert len(refilled) > 8
  width = {}
  for t in r.trials:  # a refill keeps the bucket (width) of the lane it refills
    assert width.setdefault(t.bucket, t.config["hidden"]) == t.config["hidden"]
    assert 1e-3 <= t.config["learning_rate"] <= 3e-2 and 0.8 <= t.config["b1"] <= 0.99
  random = vt.search(mlp_fn, small_digits, space, **dict(kw, sampler="random"))
  assert [t.config for t in refilled] != [t.config for t in random.trials if t.id >= 8]
  again = vt.search(mlp_fn, small_digits, space, **kw)
  assert [(t.config, t.score) for t in again.trials] == [(t.config, t.score) for t in r.trials]
