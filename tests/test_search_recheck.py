"""search(recheck=...): the search re-checks its top configs and keeps the best mean."""

import numpy as np
import jax
import pytest

import vmaptune as vt
from vmaptune import _faults, _options, _program, _recheck

from _models import mlp_fn

# The same space and trial length as test_recheck.py's.
from test_recheck import SPACE, STEPS

# 8 x 3 = 24 trial-lengths on 4 lanes; the re-check takes 3 x 2 = 6 of them.
KW = dict(num_configs=8, num_steps=STEPS, rounds=3, seed=3, strategy=vt.Adaptive(lanes=4), verbose=False)


@pytest.fixture(scope="module")
def data(digits_split):
  return digits_split


@pytest.fixture(scope="module")
def result(data):
  return vt.search(mlp_fn, data, SPACE, recheck=(3, 2), **KW)


def test_keeps_the_best_mean(result):
  check = result.rechecked
  assert isinstance(check, vt.Recheck) and check.scores.shape == (3, 2)
  assert sorted(t.id for t in check.trials) == sorted(t.id for t in result.top(3))
  assert list(check.mean) == sorted(check.mean)
  pick = check.trials[0]
  assert result.best_trial is next(t for t in result.trials if t.id == pick.id)
  assert result.best_config == pick.config and result.best_score == pick.score
  assert "re-checked: trial" in repr(result)
  lines = result.table(5).splitlines()
  assert lines[0].split()[:5] == ["rank", "trial", "round", "loss", "mean"]
  marked = [line.split() for line in lines[2:] if line.split()[0].endswith("*")]
  assert len(marked) == 1 and int(marked[0][1]) == pick.id and float(marked[0][4]) == pytest.approx(check.mean[0], rel=1e-4)  # 5 digits
  # The same re-check asked of the result afterwards: the same numbers, bit for bit.
  again = result.recheck(top=3, seeds=2)
  np.testing.assert_array_equal(again.scores, check.scores)
  # The kept trial's parameters are its own run's, bit for bit.
  run = result.retrain(pick)
  assert run.score == pick.score
  params, _ = result.best_params
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(run.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Its time and lane-steps are the search's.
  assert result.stats.lane_steps >= check.lane_steps > 0
  assert result.stats.wall_seconds > check.seconds > 0


def test_the_rechecks_lengths_come_out_of_the_adaptive_budget(result, data):
  # 24 trial-lengths less the re-check's 6 searches exactly as a search of 18.
  shorter = vt.search(mlp_fn, data, SPACE, recheck=None, **dict(KW, num_configs=6))
  assert [(t.id, t.config, t.seed, t.score, t.steps) for t in result.trials] == \
      [(t.id, t.config, t.seed, t.score, t.steps) for t in shorter.trials]
  assert shorter.rechecked is None and shorter.best_trial is shorter.ranked()[0]
  # Its lane-steps count in the search's stats: 6 trial-lengths, and padding lanes as idle.
  assert result.stats.lane_steps == shorter.stats.lane_steps + 3 * 2 * STEPS
  spent = lambda r: r.stats.lane_steps + r.stats.idle_lane_steps
  assert spent(result) == spent(shorter) + result.rechecked.lane_steps


def test_the_kept_trial_need_not_be_the_best_score(result, data):
  # This search (seed 3) keeps another trial than its best score's: the
  # re-check's point. best_model() is the kept trial's own trained model.
  r = result
  assert r.best_trial.id != r.ranked()[0].id
  assert r.best_score == r.best_trial.score > r.ranked()[0].score
  run = r.retrain(r.best_trial)
  x = data["val"][0][:16]
  np.testing.assert_array_equal(np.asarray(r.best_model()(x)), np.asarray(run.model()(x)))


def test_auto_rechecks_large_adaptive_searches_only():
  adaptive, zoom = vt.Adaptive(), vt.Zoom()
  assert _options.resolve_recheck("auto", adaptive, 32, 3, None) == (4, 4)
  assert _options.resolve_recheck("auto", adaptive, 64, 3, None) == (4, 4)
  assert _options.resolve_recheck("auto", adaptive, 31, 3, None) is None   # 93 trial-lengths
  assert _options.resolve_recheck("auto", adaptive, 8, 1, 40.0) == (4, 4)  # a timeout: sized to the time
  assert _options.resolve_recheck((6, 4), adaptive, 8, 3, 40.0) == (6, 4)  # no budget of trial-lengths
  assert _options.resolve_recheck("auto", zoom, 64, 3, None) is None
  assert _options.resolve_recheck(True, zoom, 8, 1, None) == (4, 4)       # after zoom: on top
  assert _options.resolve_recheck(None, adaptive, 64, 3, None) is None
  assert _options.resolve_recheck(False, adaptive, 64, 3, None) is None
  # A default search of 96 trial-lengths re-checking end to end: the README's block runs one.


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(recheck="yes"), ValueError, "`recheck` must be 'auto'"),
    (dict(recheck=(0, 2)), ValueError, "top and seeds must be positive"),
    (dict(recheck=(2,)), TypeError, "pair of ints"),
    (dict(recheck=(2, 1.5)), TypeError, "pair of ints"),
    (dict(recheck=(6, 4)), ValueError, "the whole adaptive budget"),
    (dict(recheck=(2, 2), strategy="pbt"), ValueError, "PBT"),
])
def test_bad_recheck_is_refused_before_compiling(data, kwargs, error, match, monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("compiled before refusing the argument")

  monkeypatch.setattr(_program.Program, "compile", refuse)
  with pytest.raises(error, match=match):
    vt.search(mlp_fn, data, SPACE, **dict(KW, **kwargs))


def test_save_and_load_keep_the_recheck(result, tmp_path):
  loaded = vt.load(result.save(tmp_path / "r.vmaptune"))
  assert loaded.best_trial.id == result.best_trial.id and loaded.best_score == result.best_score
  assert [t.id for t in loaded.rechecked.trials] == [t.id for t in result.rechecked.trials]
  np.testing.assert_array_equal(loaded.rechecked.scores, result.rechecked.scores)
  assert loaded.rechecked.seeds == result.rechecked.seeds
  assert loaded.rechecked.lane_steps == result.rechecked.lane_steps
  params, _ = result.best_params
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.best_params[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_resumed_search_rechecks_as_the_uninterrupted_one(result, data, tmp_path, monkeypatch):
  kw = dict(KW, recheck=(3, 2), checkpoint_dir=tmp_path / "ckpt", checkpoint_every=STEPS // 5)
  monkeypatch.setenv("VMAPTUNE_FAILPOINT", "adaptive:saved@4=crash")
  _faults.reset()
  with pytest.raises(_faults.SimulatedCrash):
    vt.search(mlp_fn, data, SPACE, **kw)
  monkeypatch.delenv("VMAPTUNE_FAILPOINT")
  _faults.reset()
  resumed = vt.search(mlp_fn, data, SPACE, **kw)
  assert resumed.stats.resumed_from
  assert [t.score for t in resumed.trials] == [t.score for t in result.trials]
  np.testing.assert_array_equal(resumed.rechecked.scores, result.rechecked.scores)
  assert resumed.best_trial.id == result.best_trial.id
  # Only the best score's parameters survive a checkpoint: the kept trial's are replayed, exactly.
  for a, b in zip(jax.tree.leaves(resumed.best_params[0]), jax.tree.leaves(result.best_params[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_verbose_says_what_it_kept(data, capsys):
  vt.search(mlp_fn, data, SPACE, recheck=(2, 2), **dict(KW, verbose=True))
  err = capsys.readouterr().err
  assert "re-checked the top 2 configs with 2 fresh seeds each" in err and "keeping trial" in err


def _trial(i, seconds):
  return vt.Trial(id=i, config={"learning_rate": 0.01}, score=1.0 + i, round=0, lane=i, status="ok", seed=i,
                  curve=np.asarray([1.0]), curve_steps=np.asarray([10]), train_curve=np.asarray([1.0]), steps=10,
                  seconds=seconds)


def test_with_a_timeout_the_recheck_is_cut_to_the_time_left():
  assert _recheck.sizes(4, 4) == [(4, 4), (4, 3), (4, 2), (3, 2), (2, 2)]
  trials = [_trial(i, 1.0) for i in range(4)]  # 1 s a trial: 4 x 4 is 16 s, times the margin
  m = _recheck.MARGIN
  assert _recheck.fit(trials, 4, 4, 16 * m) == (4, 4)
  assert _recheck.fit(trials, 4, 4, 16 * m - 0.1) == (4, 3)
  assert _recheck.fit(trials, 4, 4, 6 * m) == (3, 2)
  assert _recheck.fit(trials, 4, 4, 4 * m - 0.1) is None
  assert _recheck.fit(trials[:2], 4, 4, 8 * m) == (2, 4)   # fewer trials than asked
  assert _recheck.fit([], 4, 4, 100.0) is None
  assert _recheck.fit(trials[:1], 4, 4, 100.0) is None   # one trial: nothing to choose between
  # Where a program's lanes run together (accelerators), it runs whole: 16 pairs in a 32-lane program
  # cost 32 lanes' shares, in 8-lane programs 16.
  assert _recheck.estimate(trials, 4, lambda t: ("program", 32)) == 32 * m
  assert _recheck.estimate(trials, 4, lambda t: ("program", 8)) == 16 * m
  assert _recheck.estimate(trials, 4) == 16 * m                          # CPU: idle lanes cost nothing
  # What a search holds back: the estimate of the size that fits a sixth of the timeout.
  assert _recheck.reserve(trials, 4, 4, 6 * 16 * m) == 16 * m
  assert _recheck.reserve(trials, 4, 4, 6 * 8 * m) == 8 * m      # (4, 2)
  assert _recheck.reserve(trials, 4, 4, 6 * 7 * m) == 6 * m      # (3, 2)
  assert _recheck.reserve(trials, 4, 4, 1.0) == 0.0              # not even 2 x 2: none
  assert _recheck.reserve([], 4, 4, 60.0) == 0.0


class _Clock:
  """A replay that takes a trial's ``seconds`` of a fake clock a pair and
  scores a pair by its trial and seed alone, whatever else it trains with."""

  def __init__(self, trials):
    self.now, self.calls, self.trials = 0.0, [], trials
    self.options, self.maximize, self.metric = {"seed": 0}, False, "loss"

  def top(self, k):
    return self.trials[:k]

  def perf_counter(self):
    return self.now

  def scores(self, trials, seeds, maximize, stats=None):
    self.calls.append(([t.id for t in trials], list(seeds)))
    self.now += sum(t.seconds for t in trials) * len(seeds)
    return np.array([[t.score + (s % 97) / 1000 for s in seeds] for t in trials]), 10 * len(trials) * len(seeds)


@pytest.mark.parametrize("batched, deadline, shape, costly", [
    (False, 13.0, (3, 4), 1.0),   # 4 s, then a seed for 2 configs (2 s) twice, a config with 4 seeds (4 s); 4 more: over
    (False, 5.0, (2, 2), 1.0),    # the next seed would end at 6 s
    (False, 9.5, (2, 4), 1.0),    # a seed ends at 6 s, another at 8 s; a config would end at 12 s
    (True, 9.5, (2, 3), 1.0),     # each step estimated at the first's 4 s: at 6 s, 6 + 4 is over
    (False, 1e9, (4, 4), 1.0),    # it stops at the size asked for
    (False, 13.0, (2, 4), 3.0),   # the third config costs 3 s a pair: 4 seeds would end at 20 s, not 12 s
    (False, 21.0, (3, 4), 3.0),   # ... which fits here; the fourth would end at 32 s
])
def test_a_recheck_with_a_deadline_grows_at_its_measured_pace(monkeypatch, batched, deadline, shape, costly):
  fake = _Clock([_trial(i, costly if i >= 2 else 1.0) for i in range(6)])
  monkeypatch.setattr(_recheck.time, "perf_counter", fake.perf_counter)
  check = _recheck.recheck(fake, fake, top=2, seeds=2, grow=(4, 4), deadline=deadline, batched=batched)
  assert check.scores.shape == shape
  seeds = _recheck.recheck_seeds(0, 4)
  assert check.seeds == seeds[:shape[1]]                      # the first seeds of any more
  assert fake.calls[0] == ([0, 1], seeds[:2])
  assert all(len(ids) == 1 or len(ss) == 1 for ids, ss in fake.calls[1:])  # one seed or one config a step
  assert check.lane_steps == 10 * shape[0] * shape[1]
  want = {t.id: [t.score + (s % 97) / 1000 for s in check.seeds] for t in fake.trials}
  assert [list(row) for row in check.scores] == [want[t.id] for t in check.trials]
  assert list(check.mean) == sorted(check.mean) and {t.id for t in check.trials} == set(range(shape[0]))


def test_a_grown_recheck_scores_as_one_of_its_size(result):
  grown = _recheck.recheck(result, result._replay, top=2, seeds=1, grow=(3, 2), deadline=float("inf"))
  whole = result.recheck(top=3, seeds=2)
  assert [t.id for t in grown.trials] == [t.id for t in whole.trials] and grown.seeds == whole.seeds
  np.testing.assert_array_equal(grown.scores, whole.scores)
  assert grown.lane_steps >= whole.lane_steps  # more calls, more padding lanes


def test_a_search_with_a_timeout_rechecks_what_fits(data):
  r = vt.search(mlp_fn, data, SPACE, num_configs=8, num_steps=STEPS, seed=1, timeout=8.0, verbose=False)
  assert r.options["strategy"] == "adaptive"
  assert r.stats.wall_seconds < 8.0 + 3.0  # the re-check's time was held back (slack as for any timeout)
  check = r.rechecked
  assert check is not None and check.scores.shape[0] >= 2 and check.scores.shape[1] >= 2
  assert r.best_trial.id == check.trials[0].id or not np.isfinite(check.mean[0])


def test_ctrl_c_during_the_recheck_returns_the_search(data, monkeypatch):
  def interrupt(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(_recheck, "recheck", interrupt)
  with pytest.warns(RuntimeWarning, match="interrupted during the re-check"):
    r = vt.search(mlp_fn, data, SPACE, recheck=(3, 2), **KW)
  assert r.rechecked is None and r.interrupted and r.best_trial is r.ranked()[0]
  assert r.best_model() is not None and r.best_params is not None  # the best score's parameters were kept
