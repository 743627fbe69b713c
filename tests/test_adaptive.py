"""The adaptive strategy (TPE refills + median pruning), its TPE, and strategy="auto"."""

import dataclasses
import math
import threading

import jax
import numpy as np
import optax
import pytest

import vmaptune as vt
from vmaptune import _options, _pacing, _program, _tpe
from vmaptune._adaptive import Adaptive, AdaptiveState, _percentile
from vmaptune._strategy import Clock, LaneView, NewTrial

from _models import mlp_fn

SPACE = {"learning_rate": vt.loguniform(1e-3, 3e-2), "b1": vt.reverse_loguniform(0.8, 0.99), "hidden": 16}
KW = dict(num_configs=8, num_steps=40, rounds=3, seed=0, verbose=False)


@pytest.fixture(scope="module")
def adaptive(small_digits):
  return vt.search(mlp_fn, small_digits, SPACE, strategy="adaptive", **KW)


def _same_trials(a, b):
  assert len(a.trials) == len(b.trials)
  for s, t in zip(a.trials, b.trials):
    assert (s.id, s.config, s.status, s.steps, s.seed) == (t.id, t.config, t.status, t.steps, t.seed)
    assert s.score == t.score or (math.isnan(s.score) and math.isnan(t.score))
    np.testing.assert_array_equal(s.curve, t.curve)


def _crash_then_resume(monkeypatch, small_digits, space, kw, failpoint):
  """The search crashed at ``failpoint`` (a checkpoint save), then run again from its checkpoint."""
  from vmaptune import _faults

  monkeypatch.setenv("VMAPTUNE_FAILPOINT", failpoint)
  _faults.reset()
  with pytest.raises(_faults.SimulatedCrash):
    vt.search(mlp_fn, small_digits, space, **kw)
  monkeypatch.delenv("VMAPTUNE_FAILPOINT")
  resumed = vt.search(mlp_fn, small_digits, space, **kw)
  assert resumed.stats.resumed_from
  return resumed


def test_adaptive_spends_the_zoom_budget_on_more_trials_and_stops_the_worse(adaptive):
  # 8 configs x 3 rounds x 40 steps, as zoom would train, spread over 8 lanes.
  st = adaptive.stats
  assert 0.7 * 8 * 3 * 40 <= st.lane_steps <= 8 * 3 * 40  # lanes idle only in the last trial-length
  assert st.lane_steps + st.idle_lane_steps <= 8 * 3 * 40
  assert sum(t.steps for t in adaptive.trials) == st.lane_steps  # every lane-step is on some trial's bill
  assert sum(t.seconds for t in adaptive.trials) <= st.train_seconds + 1e-6
  assert all(t.seconds > 0 for t in adaptive.trials)
  assert adaptive.to_pandas()["seconds"].sum() == pytest.approx(sum(t.seconds for t in adaptive.trials))
  assert len(adaptive.trials) > 3 * 8  # more, shorter trials than zoom's 24
  statuses = {t.status for t in adaptive.trials}
  assert {"ok", "stopped"} <= statuses
  assert all(t.steps == 40 for t in adaptive.trials if t.status == "ok")
  stopped = [t for t in adaptive.trials if t.status == "stopped"]
  assert all(t.steps < 40 and t.steps % 8 == 0 for t in stopped)  # at check steps (a fifth of a trial)
  assert adaptive.best_trial.status == "ok"
  assert adaptive.options["strategy"] == "adaptive"
  assert all(t.lane < 8 for t in adaptive.trials)


def test_adaptive_stops_only_trials_behind_the_finished_ones(adaptive):
  ok = [t for t in adaptive.trials if t.status == "ok"]
  for t in [t for t in adaptive.trials if t.status == "stopped"][:10]:
    before = [f for f in ok if f.id < t.id]  # roughly: finished earlier
    if len(before) < 5:
      continue
    at = int(t.steps)
    ref = [float(f.curve[: list(f.curve_steps).index(at) + 1].min()) for f in before]
    assert float(np.min(t.curve)) > np.percentile(ref, 50) - 1e-6 or len(before) < 10


def test_adaptive_is_deterministic_and_its_lanes_match_single_runs(adaptive, small_digits):
  again = vt.search(mlp_fn, small_digits, SPACE, strategy="adaptive", **KW)
  _same_trials(again, adaptive)
  t = adaptive.best_trial
  assert adaptive.retrain(t).score == t.score  # replays bit for bit in its own program
  alone = vt.train(mlp_fn, small_digits, t.config, seed=t.seed, num_steps=40, verbose=False)
  assert alone.score == pytest.approx(t.score, rel=2e-3)


def test_adaptive_refills_keep_their_lanes_bucket_and_concentrate(small_digits):
  space = {"learning_rate": vt.loguniform(1e-4, 1e-1), "hidden": vt.choice([8, 16])}
  r = vt.search(mlp_fn, small_digits, space, strategy=vt.Adaptive(lanes=4), num_configs=8, num_steps=20,
                rounds=6, verbose=False)
  by_lane = {}
  for t in sorted(r.trials, key=lambda t: t.id):
    by_lane.setdefault((t.bucket, t.lane), set()).add(t.config["hidden"])
  assert all(len(widths) == 1 for widths in by_lane.values())  # a lane runs its program's shape only
  assert r.stats.programs_compiled <= 2  # one per bucket, whatever the refills
  first = [math.log(t.config["learning_rate"]) for t in r.trials if t.id < 4]
  late = [math.log(t.config["learning_rate"]) for t in r.trials if t.id >= len(r.trials) // 2]
  best = math.log(r.best_trial.config["learning_rate"])
  # Model-based refills sit closer to the best learning rate than the first design does.
  assert np.median(np.abs(np.asarray(late) - best)) < np.median(np.abs(np.asarray(first) - best))


SHAPES = {"learning_rate": vt.loguniform(3e-3, 3e-2), "hidden": vt.choice([2, 32])}
SHAPES_KW = dict(num_configs=8, num_steps=20, rounds=6, seed=1, verbose=False)


@pytest.fixture(scope="module")
def moving(small_digits):
  return vt.search(mlp_fn, small_digits, SHAPES, strategy=vt.Adaptive(lanes=4), **SHAPES_KW)


def test_lanes_follow_the_proposals_to_the_better_shape(moving, small_digits):
  # Two units cannot tell ten digits apart. Pinned, half the lanes run them to the end; the
  # proposals move lanes to the 32-unit program (spare lanes of it, idle until then).
  def share(r):
    return sum(t.steps for t in r.trials if t.config["hidden"] == 32) / sum(t.steps for t in r.trials)

  pinned = vt.search(mlp_fn, small_digits, SHAPES, strategy=vt.Adaptive(lanes=4, move_lanes=False), **SHAPES_KW)
  assert share(pinned) <= 0.55
  assert share(moving) >= 0.65
  assert moving.stats.lane_steps <= 8 * 6 * 20
  assert moving.stats.programs_compiled <= 2  # a bucket's spare lanes run its program
  by_lane = {}
  for t in moving.trials:
    by_lane.setdefault((t.bucket, t.lane), set()).add(t.config["hidden"])
  assert all(len(widths) == 1 for widths in by_lane.values())
  # A trial that ran in a spare lane replays bit for bit and matches its run alone.
  late = [t for t in moving.trials if t.status == "ok" and t.config["hidden"] == 32][-1]
  assert moving.retrain(late).score == late.score
  alone = vt.train(mlp_fn, small_digits, late.config, seed=late.seed, split_seed=1, num_steps=20, verbose=False)
  assert alone.score == pytest.approx(late.score, rel=2e-3)


def test_a_search_whose_lanes_move_resumes_to_the_uninterrupted_result(moving, small_digits, tmp_path,
                                                                        monkeypatch):
  kw = dict(SHAPES_KW, strategy=vt.Adaptive(lanes=4), checkpoint_dir=tmp_path / "ckpt", checkpoint_every=40)
  resumed = _crash_then_resume(monkeypatch, small_digits, SHAPES, kw, "adaptive:saved@2=crash")
  _same_trials(resumed, moving)


def test_a_freed_lane_idles_and_its_proposal_starts_in_a_spare_lane_of_its_shape():
  from vmaptune._sampling import Drawer

  space = {"learning_rate": vt.loguniform(1e-3, 1e-1), "hidden": vt.choice([8, 16])}
  drawer = Drawer(space, sampler="random", seed=0, maximize=False, signature_keys=["hidden"], max_buckets=8,
                  capacity=lambda n: n)
  ctx = _ctx(num_steps=100, drawer=drawer, space=space, signature=lambda c: (("hidden", c["hidden"]),))

  class To16(Adaptive):  # every model-based proposal wants 16 units
    def _propose(self, ctx, state, signatures, rng, free=False, model=None):
      return [{"learning_rate": 1e-2, "hidden": 16 if free else dict(sig)["hidden"]} for sig in signatures]

  strat = To16(lanes=4)
  trials, state = strat.init(ctx)
  # Each shape gets room for all four lanes, in chunks of the largest bucket's lanes (2).
  assert strat.chunk_lanes(state) == 2 and len(trials) == 8 and strat.held(state) == [4, 5, 6, 7]
  assert sorted(state.layout[:4]) == [0, 0, 1, 1] and sorted(state.layout[4:]) == [0, 0, 1, 1]
  shape = {s: state.shapes[b]["hidden"] for s, b in enumerate(state.layout)}
  lanes = [LaneView(t.id, 0, 0, t, (("hidden", t.config["hidden"]),), 100, 1.0, False) for t in trials[:4]]
  freed = next(v.slot for v in lanes if shape[v.slot] == 8)
  decision, state = strat.next(ctx, state, lanes, [freed], [], Clock(100))
  target = min(s for s in range(4, 8) if shape[s] == 16)
  assert decision.refill[freed] is None
  assert decision.refill[target].config["hidden"] == 16 and set(decision.refill) == {freed, target}
  # A proposal for a shape with no program here is drawn again with the freed lane's shape pinned.
  class ToAbsent(To16):
    def _propose(self, ctx, state, signatures, rng, free=False, model=None):
      return [{"learning_rate": 1e-2, "hidden": 64 if free else dict(sig)["hidden"]} for sig in signatures]

  strat = ToAbsent(lanes=4)
  trials, state = strat.init(ctx)
  lanes = [LaneView(t.id, 0, 0, t, (("hidden", t.config["hidden"]),), 100, 1.0, False) for t in trials[:4]]
  decision, _ = strat.next(ctx, state, lanes, [freed], [], Clock(100))
  assert list(decision.refill) == [freed] and decision.refill[freed].config["hidden"] == 8
  pinned = To16(lanes=4, move_lanes=False)
  trials, state = pinned.init(ctx)
  assert len(trials) == 4 and pinned.chunk_lanes(state) is None and pinned.held(state) == []


def test_a_decision_fits_tpe_once_whatever_its_redraws(monkeypatch):
  # Ranking every trial and fitting the densities is the costly part of a
  # proposal: a decision fits once, and the proposals drawn again (here every
  # one: each wants a shape with no program) reuse that fit.
  from vmaptune._pacing import _BEST, _SCORE, _STATUS, _STEP
  from vmaptune._sampling import Drawer

  space = {"learning_rate": vt.loguniform(1e-3, 1e-1), "hidden": vt.choice([8, 16])}
  drawer = Drawer(space, sampler="random", seed=0, maximize=False, signature_keys=["hidden"], max_buckets=8,
                  capacity=lambda n: n)
  ctx = _ctx(num_steps=100, drawer=drawer, space=space, signature=lambda c: (("hidden", c["hidden"]),))

  class ToAbsent(Adaptive):
    def _propose(self, ctx, state, signatures, rng, free=False, model=None):
      out = super()._propose(ctx, state, signatures, rng, free, model)
      return [dict(c, hidden=64) for c in out] if free else out

  fits = []
  fit = _tpe.TPEModel.densities
  monkeypatch.setattr(_tpe.TPEModel, "densities", lambda self, *a: fits.append(1) or fit(self, *a))
  strat = ToAbsent(lanes=4, n_startup=2, random_fraction=0.0)
  trials, state = strat.init(ctx)
  for t, score in zip(trials[:4], [0.5, 0.4, 0.3, 0.2]):  # four finished trials: TPE proposes
    rec = state.trials[t.id]
    rec[_STEP], rec[_SCORE], rec[_BEST], rec[_STATUS] = 100, score, score, "ok"
  lanes = [LaneView(t.id, 0, 0, t, (("hidden", t.config["hidden"]),), 100, 1.0, False) for t in trials[:4]]
  decision, _ = strat.next(ctx, state, lanes, [0, 1, 2, 3], [], Clock(100))
  refills = [t for t in decision.refill.values() if t is not None]
  assert len(refills) == 4 and {t.config["hidden"] for t in refills} <= {8, 16}  # all drawn again
  assert len(fits) == 1


def test_adaptive_enqueued_configs_start_first(small_digits):
  enq = [{"learning_rate": 3e-3, "b1": 0.9}, {"learning_rate": 1e-2, "b1": 0.95}]
  r = vt.search(mlp_fn, small_digits, SPACE, strategy="adaptive", enqueue=enq, **KW)
  first = {t.id: t for t in r.trials if t.id < 2}
  assert first[0].config["learning_rate"] == 3e-3 and first[1].config["learning_rate"] == 1e-2


def test_adaptive_survives_diverging_configs(small_digits):
  space = {"learning_rate": vt.loguniform(1e-3, 1e30), "hidden": 16}
  r = vt.search(mlp_fn, small_digits, space, optimizer=optax.sgd, strategy="adaptive", num_configs=8,
                num_steps=20, rounds=3, verbose=False)
  assert any(t.status == "diverged" for t in r.trials)
  assert r.best_trial.status == "ok" and math.isfinite(r.best_score)


@pytest.mark.parametrize("at", [3, 9])
def test_adaptive_crashed_mid_run_resumes_to_the_uninterrupted_result(at, adaptive, small_digits, tmp_path,
                                                                      monkeypatch):
  kw = dict(KW, strategy="adaptive", checkpoint_dir=tmp_path / "ckpt", checkpoint_every=8)
  resumed = _crash_then_resume(monkeypatch, small_digits, SPACE, kw, f"adaptive:saved@{at}=crash")
  assert 0 < resumed.stats.lane_steps < adaptive.stats.lane_steps
  _same_trials(resumed, adaptive)
  for u, v in zip(jax.tree.leaves(resumed.best_params), jax.tree.leaves(adaptive.best_params)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("every", [None, 8])
def test_adaptive_with_a_timeout_checkpoints_and_resumes(every, small_digits, tmp_path, monkeypatch):
  # Default checkpoints (every trial-length) with a timeout, and checkpoints after the first segment,
  # when a chunk may not have trained yet: on resume its lanes have no score and are not "diverged".
  space = dict(SPACE, hidden=vt.choice([8, 16]))
  # 10 s: with 6 s, a slow CI run spent 4.7 s compiling and the resumed search finished no trial.
  kw = dict(num_configs=8, num_steps=40, timeout=10.0, verbose=False, checkpoint_dir=tmp_path / "ckpt",
            checkpoint_every=every)
  from vmaptune import _checkpoint

  saves = []
  save = _checkpoint.Checkpointer.save
  monkeypatch.setattr(_checkpoint.Checkpointer, "save", lambda self, *a: saves.append(1) or save(self, *a))
  r = _crash_then_resume(monkeypatch, small_digits, space, kw, "adaptive:saved@1=crash")
  assert r.best_trial.status == "ok"
  assert not [t for t in r.trials if t.status == "diverged" and t.steps == 0]
  # By default a timeout search saves at most every twentieth of it (every trial-length, a small
  # model's saves took half its time); checkpoint_every as given.
  if every is None:
    assert len(saves) <= 2 * 21, len(saves)


def test_adaptive_with_a_timeout_trains_until_the_deadline(small_digits):
  # Two buckets: with a timeout each chunk starts as soon as its own program is ready.
  space = dict(SPACE, hidden=vt.choice([8, 16]))
  r = vt.search(mlp_fn, small_digits, space, num_configs=8, num_steps=40, timeout=10.0, verbose=False)
  assert r.options["strategy"] == "adaptive"  # what "auto" picks with a timeout
  assert r.stats.wall_seconds < 10.0 + 3.0
  assert len(r.trials) > 8 and r.best_trial.status == "ok"
  assert r.stats.lane_steps > 8 * 40
  assert all(t.steps > 0 for t in r.trials)
  # Each program built in the time trains, and the lanes held at the start
  # (one per bucket trains first) all start once their program is ready. Run
  # alone in a fresh process with an empty program cache, 4.5 s pass before
  # the first step (importing SciPy's qmc 1.2 s, tracing 1.3 s, compiling
  # 2 s): with a 6 s timeout no trial finished; in the suite the programs
  # often come from the cache.
  widths = {t.config["hidden"] for t in r.trials}
  assert 8 in widths  # the cheaper program builds first
  first = {t.id for t in r.trials if t.id < 8}
  assert len(first) == 4 * len(widths)  # the Sobol design balances the widths 4 / 4


def test_spread_order_spans_widths_and_depths_first():
  from vmaptune._routing import spread_order

  sigs = [(("hidden", h), ("num_layers", n)) for h in (32, 64, 128) for n in (1, 2)]
  cost = [h * h * n for h in (32, 64, 128) for n in (1, 2)]
  order = [dict(sigs[i]) for i in spread_order(sigs, cost)]
  assert order[0] == {"hidden": 32, "num_layers": 1}  # the cheapest
  assert order[1] == {"hidden": 128, "num_layers": 2}  # the farthest from it
  assert {(d["hidden"], d["num_layers"]) for d in order[:4]} == {(32, 1), (128, 2), (32, 2), (128, 1)}
  assert sorted(spread_order(sigs, cost)) == list(range(6))
  assert spread_order([], []) == [] and spread_order(sigs[:1], [1.0]) == [0]
  # Values that do not compare (a missing key beside numbers) still order.
  assert sorted(spread_order([(("a", 1),), (("b", "x"),), ()], [3.0, 2.0, 1.0])) == [0, 1, 2]


def test_with_a_timeout_programs_build_cheapest_first_then_farthest(small_digits, monkeypatch):
  # Programs build one at a time and a short search may never train the last:
  # the cheapest first, then each time the one farthest from those before, so
  # the widest is never last (in order of appearance it was).
  # The first program lowers on the calling thread, the others on the
  # background lowering thread while the lanes train.
  space = dict(SPACE, hidden=vt.choice([7, 14, 28]))  # widths no other test builds: none cached
  lowered, threads = [], []
  lower = _program.Program.lower

  def record(self, *a, **kw):
    if not self.lowered:  # (a lowered program's lower() returns at once)
      lowered.append(self.spec.adapter.config["hidden"])
      threads.append(threading.current_thread().name)
    return lower(self, *a, **kw)

  monkeypatch.setattr(_program.Program, "lower", record)
  try:
    # 12 s: with 5 s, and once with 8 s on a slow machine (the suite took 412 s), a run with both
    # cores busy lowered only the first program before the deadline.
    vt.search(mlp_fn, small_digits, space, num_configs=6, num_steps=40, timeout=12.0, verbose=False)
  except vt.AllDivergedError:  # a slow machine may finish no trial in the time: the order is what is checked
    pass
  # A slow or busy machine may reach the deadline before lowering the last
  # program: the order is checked as far as it got (the widest is second).
  assert len(lowered) >= 2 and lowered == [7, 28, 14][:len(lowered)], lowered
  assert threads[0] == threading.current_thread().name
  assert all(name.startswith("vmaptune-lower") for name in threads[1:]), threads


def test_a_program_lowers_in_the_background_only_under_the_callers_jax_configuration():
  # JAX's configuration contexts are per thread: under one the lowering
  # thread would not see, a program is left to lower on the caller's thread.
  import concurrent.futures
  from types import SimpleNamespace as NS

  pool = concurrent.futures.ThreadPoolExecutor(1)
  calls = []
  for context in (False, True):
    fake = NS(lowered=False, _lowering=None, foreground=False,
              lower=lambda *a, **kw: calls.append(threading.current_thread().name))
    if context:  # the tests run with rank promotion "raise" (conftest): "allow" is the caller's own
      with jax.numpy_rank_promotion("allow"):
        _program.Program.lower_on(fake, pool, None, None)
    else:
      _program.Program.lower_on(fake, pool, None, None)
    _program.Program.wait_lowered(fake)
    assert fake.foreground is context and fake._lowering is None
  assert len(calls) == 1 and calls[0] != threading.current_thread().name  # only without the context, on the pool
  pool.shutdown()


def test_a_program_not_built_is_waited_for_only_if_its_build_leaves_time_to_train():
  # Staggered with a timeout: once a chunk has trained, the search waits for a
  # program to lower and compile only if that takes at most half the time left
  # (waiting for one kept a 10 s search 8 s past its deadline).
  from types import SimpleNamespace as NS

  from vmaptune._population import Population

  pop = object.__new__(Population)
  built = NS(program=NS(compiled=True, lowered=True), state=object())
  lowered = NS(program=NS(compiled=False, lowered=True), state=None)
  unlowered = NS(program=NS(compiled=False, lowered=False), state=None)
  pop.chunks = [built, lowered, unlowered]
  pop.stats = vt.Stats(compile_seconds=6.0, programs_compiled=2)  # 3 s a compile so far
  pop.time_left = lambda: 7.0
  assert pop._build_fits(built) and pop._build_fits(lowered) and not pop._build_fits(unlowered)  # 3 s, 4 s
  pop.time_left = lambda: 5.0
  assert not pop._build_fits(lowered) and pop._build_fits(built)
  pop.time_left = lambda: None  # no timeout
  assert pop._build_fits(unlowered)
  pop.time_left, pop.stats = lambda: 3.0, vt.Stats()  # nothing compiled yet: 2 s assumed
  assert not pop._build_fits(lowered)
  pop.time_left = lambda: 4.0
  assert pop._build_fits(lowered)
  built.state = None  # no chunk has trained: the first program is always waited for
  pop.time_left = lambda: 0.5
  assert pop._build_fits(unlowered)


@pytest.mark.parametrize("accelerator", [False, True])
def test_a_short_timeout_gives_up_the_worst_lanes_so_the_rest_finish_trials(accelerator):
  strat = Adaptive()
  ctx = _ctx(timeout=10.0, num_steps=100, accelerator=accelerator)
  enc = _tpe.Encoder(SPACE)
  cfg = {"learning_rate": 1e-2, "b1": 0.9, "hidden": 16}
  trials = {i: [list(enc.encode(cfg)[0]), [], 0, math.inf, math.inf, "running", {}] for i in range(8)}
  state = AdaptiveState(trials, {}, {}, 8, 8, vt.Region.full(SPACE).to_json())
  # 8 lanes in 4 chunks of 2. The best lanes: 4, 5, 7, 0; the best chunks: 2, then 3.
  scores = {0: 2.0, 1: 8.0, 2: 5.0, 3: 5.0, 4: 1.0, 5: 1.5, 6: 9.0, 7: 1.8}
  lanes = [LaneView(i, i // 2, i % 2, NewTrial(i, cfg, i, 0), (), 10, scores[i], False) for i in range(8)]
  # 50 population steps left = half a trial-length per lane at this pace; keeping half the lanes doubles
  # the pace, and 4 lanes with a trial-length each is what fits. On CPU single lanes go (an idle lane
  # costs nothing there), on accelerators whole chunks.
  gone = [0, 1, 2, 3] if accelerator else [1, 2, 3, 6]
  # One short decision is not a pace (a chunk's first call can look 20x slower): the second one acts.
  ended, state = strat.stop(ctx, state, lanes, Clock(10, remaining=50, left=9.0))
  assert state.retired == [] and ended == [] and state.short == 1
  ended, state = strat.stop(ctx, state, lanes, Clock(10, remaining=50, left=9.0))
  assert state.retired == gone and len(state.retired) == 4
  assert sorted(slot for slot, _ in ended) == gone
  assert all(f["status"] == "stopped" for _, f in ended)
  decision, state = strat.next(ctx, state, lanes, [slot for slot, _ in ended], [],
                               Clock(10, remaining=50, left=9.0))
  assert dict(decision.refill) == {s: None for s in gone}  # given-up lanes idle: not run
  kept = [v for v in lanes if v.slot not in gone]
  # The pace doubled: enough time now, nothing more given up.
  # (Idle lanes are not in the views: the given-up lanes must not count as lanes still to come.)
  ended, state = strat.stop(ctx, state, kept, Clock(20, remaining=100, left=8.0))
  assert state.retired == gone and ended == []
  # In the second half of the time, never: running trials are left to finish.
  ended, state = strat.stop(ctx, state, kept, Clock(30, remaining=120, left=4.0))
  assert state.retired == gone and ended == []
  # Chunks 2 and 3 still compiling. On accelerators nothing is judged before every chunk trains. On CPU
  # the pace per lane counts the lanes to come: 100 * 4 / 8 = half a trial-length each, so half the
  # lanes go, untrained ones first; lanes of chunks that never trained idle from the start, unreported.
  trials = {i: [list(enc.encode(cfg)[0]), [], 0, math.inf, math.inf, "running", {}] for i in range(8)}
  state = AdaptiveState(trials, {}, {}, 8, 8, state.region)
  pending = lanes[:4] + [v._replace(steps=0, score=math.nan, started=False) for v in lanes[4:]]
  for _ in range(2):
    ended, state = strat.stop(ctx, state, pending, Clock(10, remaining=100, left=9.0))
  assert ended == []
  assert state.retired == (None if accelerator else [4, 5, 6, 7])
  decision, state = strat.next(ctx, state, pending, [], [], Clock(10, remaining=100, left=9.0))
  assert dict(decision.refill) == ({} if accelerator else {s: None for s in (4, 5, 6, 7)})
  assert not decision.done
  assert [state.trials[i][5] for i in range(4, 8)] == ["running" if accelerator else "unused"] * 4
  state = AdaptiveState(trials, {}, {}, 8, 8, state.region)
  # A chunk compiled too late for a trial to finish never starts: its lanes idle, their trials unreported.
  ended, state = strat.stop(ctx, state, pending, Clock(10, remaining=50, left=3.0))
  decision, state = strat.next(ctx, state, pending, [slot for slot, _ in ended], [],
                               Clock(10, remaining=50, left=3.0))
  assert {s: t for s, t in decision.refill.items() if s >= 4} == {s: None for s in (4, 5, 6, 7)}
  assert [state.trials[i][5] for i in range(4, 8)] == ["unused"] * 4
  # Enough time: nothing is given up.
  state = AdaptiveState(dict(trials), {}, {}, 8, 8, state.region)
  ended, state = strat.stop(ctx, state, lanes, Clock(10, remaining=5000, left=9.0))
  assert state.retired == [] and ended == []


@pytest.mark.parametrize("accelerator", [False, True])
def test_with_a_timeout_on_cpu_one_lane_per_bucket_starts_and_the_rest_as_the_pace_allows(accelerator):
  from vmaptune._sampling import Drawer

  space = dict(SPACE, hidden=vt.choice([8, 16]))
  drawer = Drawer(space, sampler="random", seed=0, maximize=False, signature_keys=["hidden"], max_buckets=8,
                  capacity=lambda n: n)
  sig = lambda c: (("hidden", c["hidden"]),)
  ctx = _ctx(space=space, timeout=10.0, num_steps=100, accelerator=accelerator, drawer=drawer, signature=sig)
  strat = Adaptive(move_lanes=False)  # held lanes alone (spare lanes: the moving tests)
  trials, state = strat.init(ctx)
  assert len(trials) == 8
  if accelerator:  # more lanes cost little more there: all start
    assert strat.held(state) == [] and state.held is None
    return
  held = strat.held(state)
  started = [t for t in trials if t.id not in held]
  assert sorted(t.config["hidden"] for t in started) == [8, 16]  # one per bucket
  assert len(held) == 6
  # Held lanes start bucket by bucket in turn.
  assert [trials[s].config["hidden"] for s in held[:2]] in ([8, 16], [16, 8])
  lanes = [LaneView(t.id, 0, i, t, sig(t.config), 20, 1.0, False) for i, t in enumerate(started)]
  # Nothing fits yet (no new trial could finish at this pace): the lanes stay held, not given up.
  decision, state = strat.next(ctx, state, lanes, [], [], Clock(20, remaining=90, left=9.0))
  assert dict(decision.refill) == {} and strat.held(state) == held and not state.retired
  # At the pace of the 2 lanes trained, the population steps left give 4 lanes START_TRIALS trial-lengths
  # and two segments (of 20 steps) each: 2 more start.
  need = _pacing.START_TRIALS * 100 + 2 * 20
  decision, state = strat.next(ctx, state, lanes, [], [], Clock(20, remaining=2 * need, left=9.0))
  assert list(decision.refill) == held[:2]
  for slot, t in decision.refill.items():
    assert (t.id, t.config, t.seed, t.round) == (slot, trials[slot].config, trials[slot].seed, 0)
  assert strat.held(state) == held[2:] and not decision.done
  # At the pace of 4 lanes, room for 4 lanes only: nothing starts (a faster pace later starts the rest).
  lanes += [LaneView(s, 0, 2 + k, t, sig(t.config), 0, 1.0, False) for k, (s, t) in enumerate(decision.refill.items())]
  decision, state = strat.next(ctx, state, lanes, [], [], Clock(40, remaining=need + 10, left=8.0))
  assert dict(decision.refill) == {}
  decision, state = strat.next(ctx, state, lanes, [], [], Clock(40, remaining=10**5, left=8.0))
  assert list(decision.refill) == held[2:] and state.held == []
  # Once half the time left at the first pace has passed, lanes still held are given up, unreported.
  _, state = strat.init(ctx)
  decision, state = strat.next(ctx, state, lanes[:2], [], [], Clock(20, remaining=90, left=9.0))
  assert dict(decision.refill) == {} and state.paced_left == 9.0
  decision, state = strat.next(ctx, state, lanes[:2], [], [], Clock(60, remaining=10**5, left=4.0))
  assert dict(decision.refill) == {} and state.held == [] and state.retired == sorted(held)
  assert [state.trials[s][5] for s in held] == ["unused"] * 6
  # A first pace after half the timeout (a slow first compile) still starts the lanes that fit.
  _, state = strat.init(ctx)
  decision, state = strat.next(ctx, state, lanes[:2], [], [], Clock(60, remaining=10**5, left=4.0))
  assert list(decision.refill) == held and state.held == [] and not state.retired
  # A CPU search resumed on an accelerator starts every held lane at once.
  _, state = strat.init(ctx)
  gpu = dataclasses.replace(ctx, accelerator=True)
  decision, state = strat.next(gpu, state, lanes[:2], [], [], Clock(20, remaining=10**5, left=9.0))
  assert list(decision.refill) == held and state.held == []


def test_with_a_timeout_on_cpu_a_proposal_moves_only_to_a_measured_shape_whose_trial_fits():
  from vmaptune._sampling import Drawer

  space = {"learning_rate": vt.loguniform(1e-3, 1e-1), "hidden": vt.choice([8, 16])}
  drawer = Drawer(space, sampler="random", seed=0, maximize=False, signature_keys=["hidden"], max_buckets=8,
                  capacity=lambda n: n)
  sig = lambda c: (("hidden", c["hidden"]),)
  ctx = _ctx(num_steps=100, drawer=drawer, space=space, signature=sig, timeout=10.0)

  class To16(Adaptive):  # every model-based proposal wants 16 units
    def _propose(self, ctx, state, signatures, rng, free=False, model=None):
      return [{"learning_rate": 1e-2, "hidden": 16 if free else dict(sig)["hidden"]} for sig in signatures]

  strat = To16(lanes=4)
  trials, state0 = strat.init(ctx)
  held = [i for i, *_ in state0.held]
  assert len(held) == 2 and strat.held(state0) == held + [4, 5, 6, 7]  # held lanes, then spare ones
  shape = {s: state0.shapes[b]["hidden"] for s, b in enumerate(state0.layout)}
  narrow, wide = (next(t for t in trials[:4] if t.id not in held and t.config["hidden"] == w) for w in (8, 16))
  view = lambda t, seconds, started=True: LaneView(t.id, 0, 0, t, sig(t.config), 100 if t is narrow else 20,
                                                   1.0, False, started, seconds)
  # The wide shape measured and time to spare: the narrow lane's trial ended, its proposal starts in the
  # lowest spare slot of 16 units (never a held one), and the freed lane idles.
  state = state0._replace(trials=dict(state0.trials), held=list(state0.held))
  decision, _ = strat.next(ctx, state, [view(narrow, 1e-4), view(wide, 3e-4)], [narrow.id], [],
                           Clock(100, remaining=10**5, left=9.0))
  target = min(s for s in range(4, 8) if shape[s] == 16)
  assert decision.refill[narrow.id] is None and decision.refill[target].config["hidden"] == 16
  # Its program not trained yet (no cost measured), or its trial too slow for the time left: the proposal
  # is drawn again with the freed lane's shape, in the freed lane's bucket.
  for lanes, clock in (([view(narrow, 1e-4), view(wide, math.nan, started=False)], Clock(100, remaining=10**5, left=9.0)),
                       ([view(narrow, 1e-4), view(wide, 0.2)], Clock(100, remaining=10**5, left=9.0))):
    state = state0._replace(trials=dict(state0.trials), held=list(state0.held))
    decision, _ = strat.next(ctx, state, lanes, [narrow.id], [], clock)
    new = {s: t for s, t in decision.refill.items() if t is not None and t.id >= len(trials)}  # not held ones
    assert [t.config["hidden"] for t in new.values()] == [8]
    assert shape[next(iter(new))] == 8 and not set(new) & set(held)


def test_on_cpu_held_lanes_start_at_their_buckets_measured_cost():
  from vmaptune._sampling import Drawer

  space = dict(SPACE, hidden=vt.choice([8, 16]))
  drawer = Drawer(space, sampler="random", seed=0, maximize=False, signature_keys=["hidden"], max_buckets=8,
                  capacity=lambda n: n)
  sig = lambda c: (("hidden", c["hidden"]),)
  ctx = _ctx(space=space, timeout=10.0, num_steps=100, drawer=drawer, signature=sig)
  strat = Adaptive()
  trials, state0 = strat.init(ctx)
  held = strat.held(state0)
  first = {}  # the first held lane of each bucket
  for slot in held:
    first.setdefault(trials[slot].config["hidden"], trials[slot])
  started = [t for t in trials if t.id not in held]
  seconds = {8: 0.001, 16: 0.003}  # a lane of the wide bucket costs 3x (mean 0.002: weights 0.5 and 1.5)
  view = lambda t, started=True: LaneView(t.id, 0, 0, t, sig(t.config), 20, 1.0, False, started,
                                          seconds[t.config["hidden"]] if started else math.nan)
  need = _pacing.START_TRIALS * 100 + 2 * 20  # a trial-length and two segments
  # The wide bucket's program has not trained yet: its held lanes wait for their cost, the narrow ones
  # start (at most doubling the population: 2 lanes live, 2 start).
  narrow = next(t for t in started if t.config["hidden"] == 8)
  wide = next(t for t in started if t.config["hidden"] == 16)
  lanes = [view(narrow), view(wide, started=False)]
  decision, state = strat.next(ctx, state0, lanes, [], [], Clock(20, remaining=10**5, left=9.0))
  assert [trials[s].config["hidden"] for s in decision.refill] == [8, 8]
  assert sorted(strat.held(state)) == sorted(set(held) - set(decision.refill))
  # Both measured. The time left fits lanes worth 3 of mean cost (2 live: 0.5 + 1.5): one more narrow
  # lane (0.5) fits, a wide one (1.5) does not; lanes start in turn, so a wide one first blocks the rest.
  lanes = [view(narrow), view(wide)]
  _, state = strat.init(ctx)
  decision, state = strat.next(ctx, state, lanes, [], [], Clock(20, remaining=int(1.5 * need) + 1, left=9.0))
  expect = [first[8].id] if trials[held[0]].config["hidden"] == 8 else []
  assert list(decision.refill) == expect
  # Counted evenly (no measurements), 3 lanes' worth would start one lane whichever its bucket.
  even = [v._replace(step_seconds=math.nan) for v in lanes]
  _, state = strat.init(ctx)
  decision, state = strat.next(ctx, state, even, [], [], Clock(20, remaining=int(1.5 * need) + 1, left=9.0))
  assert list(decision.refill) == held[:1]


def test_near_the_deadline_on_cpu_each_lane_is_charged_its_own_cost():
  strat = Adaptive()
  ctx = _ctx(timeout=10.0, num_steps=100)
  enc = _tpe.Encoder(SPACE)
  cfg = {"learning_rate": 1e-2, "b1": 0.9, "hidden": 16}
  fresh = lambda: AdaptiveState({i: [list(enc.encode(cfg)[0]), [], 0, math.inf, math.inf, "running", {}]
                                 for i in range(2)}, {}, {}, 2, 2, vt.Region.full(SPACE).to_json(), retired=[])
  # Two lanes at step 40, 60 steps to go; the best (lane 0) costs 9x the other. 50 population steps
  # fit in the 2 s left, so both cannot finish (1.2x the time left); the best that can, within a
  # margin of 1.6 s, go on. Charged its own cost lane 0 alone needs 1.08x the time left: it stops,
  # and the cheap lane 1 finishes. Charged evenly (no measurements), lane 0 would be kept instead.
  lanes = [LaneView(i, 0, i, NewTrial(i, cfg, i, 0), (), 40, [1.0, 2.0][i], False, True, [0.009, 0.001][i])
           for i in range(2)]
  ended, _ = strat.stop(ctx, fresh(), lanes, Clock(60, remaining=50, left=2.0))
  assert ended == [(0, {"status": "stopped"})]
  even = [v._replace(step_seconds=math.nan) for v in lanes]
  ended, _ = strat.stop(ctx, fresh(), even, Clock(60, remaining=50, left=2.0))
  assert ended == [(1, {"status": "stopped"})]


def test_on_cpu_a_trial_that_cannot_finish_even_alone_stops_and_its_lane_idles():
  # Only finished trials count. In a 40 s digits-CNN search a 32-channel two-layer trial (70 ms a
  # step) ran 200 of its 500 steps, 14 s in which every other lane waited for it each segment.
  strat = Adaptive()
  ctx = _ctx(timeout=60.0, num_steps=500)
  enc = _tpe.Encoder(SPACE)
  cfg = {"learning_rate": 1e-2, "b1": 0.9, "hidden": 16}
  fresh = lambda finished={500: [3.0]}: AdaptiveState(
      {i: [list(enc.encode(cfg)[0]), [], 0, math.inf, math.inf, "running", {}] for i in range(2)}, finished, {},
      2, 2, vt.Region.full(SPACE).to_json(), retired=[])
  # Lane 0 (the best so far) needs 400 steps at 0.1 s: 40 s, alone, with 30 s left; lane 1 0.4 s.
  lanes = [LaneView(i, i, 0, NewTrial(i, cfg, i, 0), (("i", i),), 100, [1.0, 2.0][i], False, True,
                    [0.1, 0.001][i]) for i in range(2)]
  clock = Clock(100, remaining=10_000, left=30.0)
  ended, state = strat.stop(ctx, fresh(), lanes, clock)
  assert ended == [(0, {"status": "stopped"})]
  decision, _ = strat.next(ctx, state, lanes, [0], [], clock)
  assert decision.refill == {0: None} and not decision.done  # a new trial there could not finish either
  # With 45 s left it can finish: it trains on. Unmeasured, nothing is judged.
  assert strat.stop(ctx, fresh(), lanes, clock._replace(left=45.0))[0] == []
  unmeasured = [v._replace(step_seconds=math.nan) for v in lanes]
  assert strat.stop(ctx, fresh(), unmeasured, clock)[0] == []
  # Before any trial has finished, none is given up (a search with none fails; a first call is slow).
  assert strat.stop(ctx, fresh({}), lanes, clock)[0] == []


@pytest.mark.parametrize("devices, started", [(1, 0), (2, 1), (4, 1)])
def test_on_cpu_lanes_on_other_devices_train_at_once(devices, started):
  # One lane per bucket trains; the time left fits one more trial-length (and two segments) at its
  # pace. On one device a second lane would halve every lane's pace: nothing more starts. With more
  # devices, lanes on the others train at the same time: one more starts (the population at most
  # doubles per decision).
  from vmaptune._sampling import Drawer

  drawer = Drawer(SPACE, sampler="random", seed=0, maximize=False, signature_keys=[], max_buckets=8,
                  capacity=lambda n: n)
  ctx = _ctx(timeout=10.0, num_steps=100, drawer=drawer, devices=devices)
  strat = Adaptive()
  trials, state = strat.init(ctx)
  held = strat.held(state)
  first = [t for t in trials if t.id not in held]
  assert len(first) == 1
  lanes = [LaneView(t.id, 0, 0, t, (), 20, 1.0, False, True, 0.001) for t in first]
  need = _pacing.START_TRIALS * 100 + 2 * 20
  decision, state = strat.next(ctx, state, lanes, [], [], Clock(20, remaining=need, left=9.0))
  assert list(decision.refill) == held[:started]


def test_a_lanes_training_time_is_charged_by_its_chunks_measured_time(small_digits):
  # A wide three-layer MLP beside a four-unit one: each chunk's call is timed on its own, so a wide
  # lane's seconds per step are several times a narrow lane's (split evenly, they would be equal).
  # 256 units: 7x measured on the 2-core Intel CPU, in 3 s (1,024 units: 9x, in 12 s).
  # Lanes pinned to their shapes: moved, a lane left alone among idle ones pays for their compute.
  space = dict(SPACE, hidden=vt.choice([4, 256]), num_layers=3)
  r = vt.search(mlp_fn, small_digits, space, strategy=vt.Adaptive(move_lanes=False), num_configs=8, num_steps=40,
                rounds=2, seed=0, verbose=False)
  per_step = {}
  for h in (4, 256):
    ts = [t for t in r.trials if t.config["hidden"] == h and t.steps > 0]
    per_step[h] = sum(t.seconds for t in ts) / sum(t.steps for t in ts)
  assert per_step[256] > 2 * per_step[4]  # measured: 6.8-11x (evenly split: 1x)
  assert sum(t.seconds for t in r.trials) <= r.stats.train_seconds + 1e-6


# --------------------------------------------------------------------------
# The pruner and the TPE on their own (host only)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("remaining, kept", [(45, [1, 2]), (10, [])])
def test_near_the_deadline_on_cpu_the_best_running_trials_finish_the_rest_stop(remaining, kept):
  strat = Adaptive()
  ctx = _ctx(timeout=10.0, num_steps=100)
  enc = _tpe.Encoder(SPACE)
  cfg = {"learning_rate": 1e-2, "b1": 0.9, "hidden": 16}
  trials = {i: [list(enc.encode(cfg)[0]), [], 0, math.inf, math.inf, "running", {}] for i in range(4)}
  state = AdaptiveState(trials, {}, {}, 4, 4, vt.Region.full(SPACE).to_json(), retired=[])
  # 4 lanes at step 40, 60 steps to go each; by best score lanes 1, 2, 0, 3. 45 population steps (180
  # lane-steps) fit in the 2 s left: two trials' 120 lane-steps fit within the margin; with 10, none.
  lanes = [LaneView(i, 0, i, NewTrial(i, cfg, i, 0), (), 40, [3.0, 1.0, 2.0, 4.0][i], False) for i in range(4)]
  ended, state = strat.stop(ctx, state, lanes, Clock(60, remaining=remaining, left=2.0))
  assert sorted(s for s, _ in ended) == [s for s in range(4) if s not in kept]
  assert all(f["status"] == "stopped" for _, f in ended)
  decision, state = strat.next(ctx, state, lanes, [s for s, _ in ended], [], Clock(60, remaining=remaining, left=2.0))
  assert decision.done == (not kept)
  assert all(t is None for t in decision.refill.values())  # no new trial could finish: freed lanes idle


def _ctx(**kw):
  from vmaptune._strategy import Context

  base = dict(space=SPACE, num_configs=8, rounds=3, timeout=None, num_steps=100, seed=0, sampler="random",
              keep=0.25, shrink=0.5, eval_every=None, checkpoint_every=None, maximize=False, enqueue=(),
              drawer=None, signature=lambda c: (), steps_for=lambda s: 100, eval_every_for=lambda s: 10)
  base.update(kw)
  return Context(**base)


def test_pruner_compares_with_finished_trials_at_the_same_step():
  strat = Adaptive(min_finished=3)
  ctx = _ctx()
  enc = _tpe.Encoder(SPACE)
  cfg = {"learning_rate": 1e-2, "b1": 0.9, "hidden": 16}
  record = lambda: [list(enc.encode(cfg)[0]), [], 0, math.inf, math.inf, "running", {}]
  state = AdaptiveState({i: record() for i in range(6)}, {20: [1.0, 2.0, 3.0]}, {}, 6, 6,
                        vt.Region.full(SPACE).to_json())
  view = lambda i, steps, score: LaneView(i, 0, i, NewTrial(i, cfg, i, 0), (), steps, score, False)
  # At step 20 (a check step: a fifth of 100), 2.5 is worse than the finished trials' median 2; 1.5 is not.
  ended, state = strat.stop(ctx, state, [view(3, 20, 2.5), view(4, 20, 1.5)], Clock(20))
  assert ended == [(3, {"status": "stopped"})]
  # A trial compares its best so far: trial 4 was at 1.5, so 9.0 at step 40 is judged as 1.5.
  state.finished_at[40] = [1.0, 2.0, 3.0]
  ended, state = strat.stop(ctx, state, [view(4, 40, 9.0)], Clock(40))
  assert ended == []
  # No check between check steps, and no stop when no new trial could finish before the deadline.
  ended, state = strat.stop(ctx, state, [view(5, 30, 9.0)], Clock(30))
  assert ended == []
  timed = dataclasses.replace(ctx, timeout=60.0)
  state.finished_at[60] = [1.0, 2.0, 3.0]
  ended, state = strat.stop(timed, state, [view(5, 60, 9.0)], Clock(60, remaining=50))
  assert ended == []
  # A finished trial's best-so-far at each check step joins the reference.
  state = AdaptiveState({0: record()}, {}, {}, 1, 1, state.region)
  for steps in range(10, 101, 10):
    ended, state = strat.stop(ctx, state, [view(0, steps, 10.0 - steps / 20)], Clock(steps))
  assert ended == [(0, {"status": "ok"})]
  assert state.finished_at[20] == [9.0] and state.finished_at[100] == [5.0]
  assert state.trials[0][5] == "ok"


def test_the_pruners_percentile_is_numpys_bit_for_bit():
  rng = np.random.default_rng(0)
  for n in (1, 2, 3, 4, 10, 57):
    scores = sorted(rng.normal(size=n).tolist())
    for q in (10.0, 33.3, 50.0, 75.0):
      assert _percentile(scores, q) == float(np.percentile(scores, q))


def test_tpe_proposals_concentrate_on_the_good_region_and_keep_pins():
  space = {"x": vt.uniform(0.0, 1.0), "y": vt.loguniform(1e-4, 1.0), "w": vt.choice([8, 16, 32])}
  enc = _tpe.Encoder(space)
  rng = np.random.default_rng(0)
  U, C = enc.random(rng, 300)
  loss = (U[:, 0] - 0.3) ** 2 + 0.01 * U[:, 1] + 0.5 * (C[:, 0] != 2)  # y barely matters
  order = np.argsort(loss)
  model = _tpe.TPEModel()
  good, bad = model.fit(enc, U[order], C[order])
  free_u, free_c = np.full(2, np.nan), np.full(1, -1)
  props = [model.propose(rng, good, bad, free_u, free_c) for _ in range(60)]
  pu = np.asarray([p[0] for p in props])
  assert abs(np.median(pu[:, 0]) - 0.3) < 0.05  # no pull towards the edges of the range
  assert np.mean(np.abs(pu[:, 0] - 0.3) < 0.1) > 0.7
  assert np.mean([p[1][0] == 2 for p in props]) > 0.8
  pin_u, pin_c = enc.pins({"x": 0.9, "y": 1e-2, "w": 8}, {"w"})
  for _ in range(10):
    u, c = model.propose(rng, good, bad, pin_u, pin_c)
    assert c[0] == 0 and 0.0 <= u.min() and u.max() <= 1.0
  config = enc.decode(*model.propose(rng, good, bad, free_u, free_c))
  assert set(config) == {"x", "y", "w"} and 1e-4 <= config["y"] <= 1.0


def test_tpe_densities_are_normalised_on_the_unit_cube():
  space = {"x": vt.uniform(0.0, 1.0)}
  enc = _tpe.Encoder(space)
  U = np.asarray([[0.0], [0.02], [0.5]])
  kde = _tpe._KDE(U, np.zeros((3, 0), np.int64), [], 0.03, 0.2)
  grid = np.linspace(0, 1, 20001)[:, None]
  mass = np.exp(kde.logpdf(grid, np.zeros((len(grid), 0), np.int64))).mean()
  assert mass == pytest.approx(1.0, abs=1e-3)  # kernels at the edge keep their mass inside
  assert enc.numeric == ["x"]


def test_tpe_bad_group_is_capped_evenly_in_rank_and_still_ranks_proposals():
  # A timed search on a CPU observes thousands of trials: the bad density
  # keeps max_bad of them, from the first after the good group to the worst.
  space = {"x": vt.uniform(0.0, 1.0), "w": vt.choice([8, 16])}
  enc = _tpe.Encoder(space)
  rng = np.random.default_rng(1)
  U, C = enc.random(rng, 2000)
  loss = (U[:, 0] - 0.7) ** 2
  order = np.argsort(loss)
  U, C = U[order], C[order]
  model = _tpe.TPEModel()
  assert model.max_bad == 250
  good, bad = model.fit(enc, U, C)
  assert good.n == model.max_good and bad.n == model.max_bad
  np.testing.assert_array_equal(bad.U[0], U[good.n])
  np.testing.assert_array_equal(bad.U[-1], U[-1])
  assert np.all(np.diff((bad.U[:, 0] - 0.7) ** 2) >= 0)  # still in rank order
  _, full = dataclasses.replace(model, max_bad=10_000).fit(enc, U, C)
  assert full.n == 2000 - good.n
  props = np.asarray([model.propose(rng, good, bad, np.full(1, np.nan), np.full(1, -1))[0][0] for _ in range(40)])
  assert np.mean(np.abs(props - 0.7) < 0.1) > 0.8


def test_tpe_logpdf_is_the_mixture_of_its_kernels():
  # Each component: truncated Gaussians on the numeric coordinates times a
  # kernel on each choice; plus the uniform prior; all weighted equally.
  from scipy.stats import truncnorm

  space = {"x": vt.uniform(0.0, 1.0), "y": vt.uniform(0.0, 1.0), "w": vt.choice([8, 16, 32]), "d": vt.choice([1, 2])}
  enc = _tpe.Encoder(space)
  rng = np.random.default_rng(3)
  U, C = enc.random(rng, 7)
  kde = _tpe._KDE(U, C, enc.sizes, 0.03, 0.2)
  u, c = enc.random(rng, 5)
  want = []
  for p, q in zip(u, c):
    comps = [np.prod([truncnorm.pdf(p[j], -U[i, j] / kde.bw[j], (1 - U[i, j]) / kde.bw[j], U[i, j], kde.bw[j])
                      for j in range(2)])
             * np.prod([0.8 if q[j] == C[i, j] else 0.2 / (s - 1) for j, s in enumerate(enc.sizes)])
             for i in range(7)]
    want.append(np.log((sum(comps) + 1 / 6) / 8))
  np.testing.assert_allclose(kde.logpdf(u, c), want, rtol=1e-10)
  # No trials: the uniform prior alone; no choices: the unit cube's volume 1.
  empty = _tpe._KDE(U[:0], C[:0], enc.sizes, 0.03, 0.2)
  np.testing.assert_allclose(empty.logpdf(u, c), np.full(5, -np.log(6)))
  plain = _tpe._KDE(U, C[:, :0], [], 0.03, 0.2)
  assert np.all(np.isfinite(plain.logpdf(u, c[:, :0])))


def test_tpe_proposals_with_the_same_pins_draw_their_candidates_at_once(monkeypatch):
  # Refills that follow the proposals pin nothing: one draw of every
  # proposal's candidates, not one per proposal (then most of a 40 s search's
  # host time). Differently pinned proposals keep their own pins.
  space = {"x": vt.uniform(0.0, 1.0), "w": vt.choice([8, 16, 32])}
  enc = _tpe.Encoder(space)
  rng = np.random.default_rng(0)
  U, C = enc.random(rng, 100)
  order = np.argsort((U[:, 0] - 0.3) ** 2 + 0.5 * (C[:, 0] != 1))
  model = _tpe.TPEModel()
  good, bad = model.fit(enc, U[order], C[order])
  sizes, drawn = [], []
  sample = _tpe._KDE.sample

  def record(self, rng, m, *a):
    sizes.append(m)
    drawn.append(sample(self, rng, m, *a))
    return drawn[-1]

  monkeypatch.setattr(_tpe._KDE, "sample", record)
  free = (np.full(1, np.nan), np.full(1, -1))
  pinned = enc.pins({"x": 0.5, "w": 32}, {"w"})
  pins = [free, pinned, free, free, pinned, free]
  out = model.propose_many(rng, good, bad, pins)
  assert sizes == [4 * 24, 2 * 24]  # groups in order of first appearance
  assert [int(c[0]) for _, c in out[1::3]] == [2, 2]  # the pinned ones keep w = 32
  # Each proposal is the best by l / g of its own 24 candidates.
  blocks = {0: 0, 2: 1, 3: 2, 5: 3, 1: 0, 4: 1}
  for i, (u, c) in enumerate(out):
    cu, cc = drawn[0 if i in (0, 2, 3, 5) else 1]
    bu, bc = cu[blocks[i] * 24:(blocks[i] + 1) * 24], cc[blocks[i] * 24:(blocks[i] + 1) * 24]
    best = int(np.argmax(good.logpdf(bu, bc) - bad.logpdf(bu, bc)))
    np.testing.assert_array_equal(u, bu[best])
    np.testing.assert_array_equal(c, bc[best])
  free_out = [out[i] for i in (0, 2, 3, 5)]
  assert np.mean([c[0] == 1 for _, c in free_out]) >= 0.5 and len({float(u[0]) for u, _ in free_out}) == 4
  assert model.propose_many(rng, good, bad, []) == []


def test_a_decisions_densities_are_those_of_every_trial_ranked():
  # _model ranks by (diverged, deeper first, score) and gathers only the
  # trials the densities keep: the same densities as fitting all of them.
  from vmaptune._pacing import _SCORE, _STATUS, _STEP
  from vmaptune._sampling import Drawer

  space = {"learning_rate": vt.loguniform(1e-3, 1e-1), "hidden": vt.choice([8, 16])}
  drawer = Drawer(space, sampler="random", seed=0, maximize=False, signature_keys=["hidden"], max_buckets=8,
                  capacity=lambda n: n)
  ctx = _ctx(num_steps=100, drawer=drawer, space=space, signature=lambda c: (("hidden", c["hidden"]),))
  strat = Adaptive(lanes=4, n_startup=2, tpe=_tpe.TPEModel(max_good=5, max_bad=20))
  _, state = strat.init(ctx)
  rng = np.random.default_rng(5)
  enc = _tpe.Encoder(space)
  for i in range(300):
    u, c = enc.random(rng, 1)
    rec = [list(u[0]), list(c[0]), int(rng.choice([20, 60, 100])), float(rng.normal()), 0.0, "ok", {}]
    if i % 37 == 0:
      rec[_SCORE], rec[_STATUS] = math.inf, "diverged"
    rec[_SCORE] = round(rec[_SCORE], 1)  # ties: kept in the trials' order
    state.trials[1000 + i] = rec
  observed = [r for r in state.trials.values() if r[_STEP] > 0]
  ranked = sorted(observed, key=lambda r: (r[_STATUS] == "diverged", -r[_STEP], r[_SCORE]))
  good, bad = strat.tpe.fit(enc, np.asarray([r[0] for r in ranked]), np.asarray([r[1] for r in ranked]))
  _, (good2, bad2) = strat._model(ctx, state)
  for a, b in ((good, good2), (bad, bad2)):
    np.testing.assert_array_equal(a.U, b.U)
    np.testing.assert_array_equal(a.C, b.C)


def test_auto_picks_adaptive_for_big_or_timed_searches_and_zoom_otherwise():
  auto = _options.auto_strategy
  assert isinstance(auto("random", 64, 3, 500, None), vt.Adaptive)
  assert isinstance(auto("random", 8, 2, 500, None), vt.Zoom)
  assert isinstance(auto("random", 8, 2, 500, 30.0), vt.Adaptive)
  assert isinstance(auto("grid", 64, 3, 500, None), vt.Zoom)
  assert isinstance(auto("random", 64, 3, None, None), vt.Zoom)  # an epochs budget
  assert isinstance(auto("random", 64, 3, 10, None), vt.Zoom)  # too short to stop early
  assert isinstance(auto("random", 96, 1, 500, None), vt.Zoom)  # one batch of random configs, as asked


def test_auto_is_the_default_and_small_searches_stay_zoom(small_digits):
  r = vt.search(mlp_fn, small_digits, SPACE, num_configs=4, num_steps=20, rounds=2, verbose=False)
  assert r.options["strategy"] == "zoom" and len(r.trials) == 8


def test_adaptive_validation(small_digits):
  with pytest.raises(ValueError, match="lanes"):
    vt.Adaptive(lanes=0)
  with pytest.raises(ValueError, match="percentile"):
    vt.Adaptive(percentile=100)
  with pytest.raises(TypeError, match="TPEModel"):
    vt.Adaptive(tpe={"gamma": 0.1})
  with pytest.raises(ValueError, match="n_startup"):
    vt.Adaptive(n_startup=0)
  for bad in ({"gamma": 0.0}, {"gamma": 2.0}, {"cat_bw": 1.0}, {"min_bw": 0}, {"max_good": 0}, {"n_candidates": 2.5},
              {"max_bad": True}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      _tpe.TPEModel(**bad)
  with pytest.raises(ValueError, match="epochs"):
    vt.search(mlp_fn, small_digits, SPACE, strategy="adaptive", **dict(KW, num_steps=None, epochs=1))
  with pytest.raises(ValueError, match="grid"):
    vt.search(mlp_fn, small_digits, SPACE, strategy="adaptive", sampler="grid", **KW)


def test_a_program_whose_first_call_would_not_fit_does_not_start():
  # With a timeout on CPU, a chunk that has not trained starts only if its first call, predicted
  # from the trained chunk nearest in FLOPs (its pace scaled by FLOPs), fits in half the time
  # left (a 32-channel CNN once ran 9 s past a 10 s budget), and a trial in all of it (only
  # finished trials count: a 40 s CNN search spent 9 s on one that could not finish).
  from types import SimpleNamespace as NS

  from vmaptune._population import Population

  def chunk(flops, state=None, step_seconds=math.nan, members=(0,)):
    return NS(program=NS(step_flops=lambda: flops), state=state, step_seconds=step_seconds,
              members=list(members), cadence=NS(steps_per_call=100, budget=500))

  pop = object.__new__(Population)
  pop.plan = NS(devices=[NS(platform="cpu")])
  pop.slots = [NS(idle=False)]
  trained = chunk(1e6, state=object(), step_seconds=1e-3)  # 1 ms a step
  wide = chunk(50e6)  # predicted 50 ms a step: 5 s a call, 25 s a trial
  pop.chunks = [trained, wide]
  pop.time_left = lambda: 30.0
  assert pop._first_call_fits(wide) and pop._first_call_fits(trained)
  pop.time_left = lambda: 20.0  # the call fits in half of it, the trial does not
  assert not pop._first_call_fits(wide) and pop._first_call_fits(trained)
  pop.time_left = lambda: 8.0  # neither fits
  assert not pop._first_call_fits(wide)
  # A trained chunk nearer in FLOPs predicts instead: 30 ms a step at 40 MFLOPs, 37.5 ms at 50.
  near = chunk(40e6, state=object(), step_seconds=30e-3)
  pop.chunks, pop.time_left = [trained, near, wide], lambda: 20.0
  assert pop._first_call_fits(wide)
  pop.chunks, pop.time_left = [trained, wide], lambda: 10.0
  pop.time_left = lambda: None  # no timeout
  assert pop._first_call_fits(wide)
  pop.time_left = lambda: 10.0
  pop.chunks = [wide]  # nothing measured yet: no prediction, it starts
  assert pop._first_call_fits(wide)
  pop.chunks, pop.plan = [trained, wide], NS(devices=[NS(platform="gpu")])  # accelerators: cost barely varies
  assert pop._first_call_fits(wide)


def test_with_a_timeout_on_cpu_shapes_whose_trial_could_not_finish_build_last():
  # Before lowering, a bucket's pace is predicted from the trained convolutional chunk nearest in
  # FLOPs by parameter count, scaled by them: a trial predicted past the time left builds after
  # the others (a 40 s CNN search lowered a shape that never fitted second, the best shape last).
  from types import SimpleNamespace as NS

  from vmaptune._population import Population
  from vmaptune._slots import late_buckets

  sig = lambda w, d: (("hidden", w), ("layers", d))
  flops = {sig(8, 1): 1e6, sig(32, 1): 4e6, sig(8, 2): 5e6, sig(32, 2): 60e6}

  def chunk(s, state=None, step_seconds=math.nan, members=(0,), conv=True):
    return NS(signature=s, program=NS(s=s, has_convolution=lambda: conv), state=state, step_seconds=step_seconds,
              members=list(members), cadence=NS(steps_per_call=100, budget=500))

  slots = [NS(idle=False) for _ in range(3)]
  trained = chunk(sig(8, 1), state=object(), step_seconds=1e-3, members=(0, 1, 2))  # 3 lanes, 2 devices
  chunks = [trained] + [chunk(s) for s in flops if s != sig(8, 1)]
  # A lane alone on a device: 2 ms a step at 1 MFLOP, so 32 x 2 takes 120 ms: 60 s a trial.
  assert late_buckets(chunks, slots, 2, 30.0, flops) == {sig(32, 2)}
  assert late_buckets(chunks, slots, 2, 3.5, flops) == {sig(32, 1), sig(8, 2), sig(32, 2)}
  assert late_buckets(chunks, slots, 2, 100.0, flops) == set()
  assert late_buckets(chunks[1:], slots, 2, 1.0, flops) == set()  # nothing trained: no prediction
  mlp = chunk(sig(8, 1), state=object(), step_seconds=1e-3, members=(0, 1, 2), conv=False)
  assert late_buckets([mlp] + chunks[1:], slots, 2, 1.0, flops) == set()  # no convolution: no prediction
  # The build order: the cheapest first, then the farthest, among the shapes that could finish.
  pop = object.__new__(Population)
  pop.plan = NS(devices=[NS(platform="cpu")] * 2)
  pop.slots, pop.chunks, pop.staggered = slots, chunks, True
  pop._param_flops = lambda program: flops[program.s]
  pop._predicted_seconds = lambda program, lowered=True: flops[program.s]
  order = lambda: [c.signature for c in pop._build_order()]
  pop.time_left = lambda: None  # no timeout: nothing is late
  assert order() == [sig(8, 1), sig(32, 2), sig(32, 1), sig(8, 2)]
  pop.time_left = lambda: 30.0
  assert order() == [sig(8, 1), sig(32, 1), sig(8, 2), sig(32, 2)]


def test_on_cpu_lanes_of_chunks_not_trained_do_not_keep_a_freed_lane_from_a_new_trial():
  # A lane whose chunk has not trained (its program compiling, or never to
  # start) costs nothing yet: charged as training, five of them kept a 10 s
  # CNN search's only trained lane idle, and the search ended 3 s early.
  from types import SimpleNamespace as NS

  strat = Adaptive()
  cfg = {"learning_rate": 1e-2, "b1": 0.9, "hidden": 16}
  ctx = _ctx(timeout=8.0, num_steps=100, signature=lambda c: (("hidden", c["hidden"]),),
             drawer=NS(refill=lambda sig, region, rng: dict(cfg)))
  enc = _tpe.Encoder(SPACE)
  trials = {i: [list(enc.encode(cfg)[0]), [], 0, math.inf, math.inf, "running", {}] for i in range(6)}
  trials[0][2:6] = [100, 1.0, 1.0, "ok"]
  state = AdaptiveState(trials, {}, {}, 6, 6, vt.Region.full(SPACE).to_json(), retired=[])
  lanes = [LaneView(0, 0, 0, NewTrial(0, cfg, 0, 0), (("hidden", 16),), 100, 1.0, False, True, 1e-3)]
  lanes += [LaneView(i, i, 0, NewTrial(i, cfg, i, 0), (("hidden", 16 + i),), 0, math.nan, False, False)
            for i in range(1, 6)]
  # 300 population steps fit at the last segment's pace (one lane): a 100-step trial fits beside
  # the lanes that train; charged with the five that do not, it would not (300 / 6 < 100).
  decision, state = strat.next(ctx, state, lanes, [0], [], Clock(100, remaining=300, left=5.0))
  assert isinstance(decision.refill[0], NewTrial) and not decision.done


@pytest.mark.parametrize("strategy", ["zoom", "pbt"])
def test_a_round_that_runs_past_the_timeout_is_warned(small_digits, strategy, monkeypatch):
  # Zoom and PBT train a round to its end: past a short timeout, they say by
  # how much. (The search's own end reads a clock 5 s on: a fast machine
  # may overrun by less than the 0.5 s that warns.)
  import time
  import types

  from vmaptune import _search

  calls = []
  clock = lambda: time.perf_counter() + 5.0 * bool(calls.append(1) or len(calls) > 1)
  monkeypatch.setattr(_search, "time", types.SimpleNamespace(perf_counter=clock))
  kw = dict(KW, num_steps=40, timeout=0.01, rounds=1, strategy=strategy)
  with pytest.warns(RuntimeWarning, match=rf"ended \d+\.\d s past its timeout of 0.01 s: strategy '{strategy}'"):
    vt.search(mlp_fn, small_digits, SPACE, **kw)


@pytest.mark.parametrize("strategy", ["adaptive", "halving"])
def test_a_timeout_that_ends_before_any_trial_finishes_still_returns_one(small_digits, strategy, monkeypatch):
  # As Optuna finishes the trial it is in: the trial that got furthest is
  # trained on to its end, and the search says by how much it overran.
  from vmaptune import _replay

  stopped, finish = [], _replay.Replay.finish
  monkeypatch.setattr(_replay.Replay, "finish", lambda self, trial, *a: stopped.append(trial) or finish(self, trial, *a))
  kw = dict(KW, num_steps=400, timeout=0.01, strategy=strategy)
  with pytest.warns(RuntimeWarning, match=r"ran out before any trial finished .*; trial \d+ was trained on to its end"):
    r = vt.search(mlp_fn, small_digits, SPACE, **kw)
  best = r.best_trial
  assert best.status == "ok" and best.steps == 400 and list(best.curve_steps)[-1] == 400
  assert [t.status for t in r.trials].count("ok") == 1 and r.rechecked is None
  assert r.retrain().score == r.best_score  # it replays exactly, as any trial
  assert r.best_model() is not None
  # A replay trains the trial's lane alone (the others idle: skipped on a CPU),
  # with the numbers of a replay beside copies of it.
  alone, copies = vt.Stats(), vt.Stats()
  run = r._replay.run(best, r.metric, r.maximize, alone)
  assert alone.lane_steps == 400 and alone.idle_lane_steps > 0
  assert r._replay.run(best, r.metric, r.maximize, copies, alone=False).score == run.score == best.score
  assert copies.lane_steps > 400
  # It went on from where the search stopped it: its first evaluations are the search's.
  (before,) = stopped
  assert before.id == best.id and before.status == "stopped" and 0 < before.steps < 400
  n = len(before.curve)
  np.testing.assert_array_equal(best.curve[:n], before.curve)
  np.testing.assert_array_equal(best.curve_steps[:n], before.curve_steps)


def test_restarting_strategies_compile_start_at_level_one_and_replay_with_it(small_digits, compile_tiers):
  # The adaptive strategy restarts lanes at every decision (hundreds of start
  # calls a search), so its start program compiles at level 1 ("restarts":
  # 2-5x faster calls); zoom starts its lanes once a round and keeps level 0
  # ("init"). A replay uses the start its trial ran with, bit for bit.
  tiers = compile_tiers
  space = {"learning_rate": vt.loguniform(1e-3, 3e-2), "hidden": 19}  # a width no other test builds
  kw = dict(num_configs=4, num_steps=20, seed=3, verbose=False, recheck=None)
  adaptive = vt.search(mlp_fn, small_digits, space, strategy=vt.Adaptive(lanes=2), rounds=4, **kw)
  assert "restarts" in tiers and "init" not in tiers
  assert {ref.start_tier for ref in adaptive._replay.population.refs.values()} == {"restarts"}
  del tiers[:]
  for trial in (adaptive.best_trial, adaptive.trials[-1]):
    run = adaptive.retrain(trial)
    assert run.score == trial.score
    np.testing.assert_array_equal(run.curve, trial.curve)
  assert "init" not in tiers  # the replay did not build another start
  zoom = vt.search(mlp_fn, small_digits, space, strategy="zoom", rounds=1, **kw)
  assert "init" in tiers and "restarts" not in tiers
  assert zoom.retrain().score == zoom.best_trial.score
