"""Importance (vmaptune/_importance.py): η² shares on objectives with known answers.

No training: results are built by hand from configs drawn at random and a
score that is a known function of them.
"""

import math

import numpy as np
import pytest

import vmaptune as vt
from vmaptune import _importance
from vmaptune import SearchResult, Stats, Trial
from vmaptune import Region


def _trial(i, config, score, round_=0, status="ok"):
  return Trial(id=i, config=config, score=score, round=round_, lane=i, status=status, seed=i,
               curve=np.asarray([score], np.float32), curve_steps=np.asarray([10]),
               train_curve=np.asarray([score], np.float32), steps=10)


def _result(trials, space, maximize=False):
  return SearchResult(trials=trials, space=space, metric="loss", maximize=maximize,
                      regions=[Region.full(space)], stats=Stats())


SPACE = {
    "learning_rate": vt.loguniform(1e-5, 1e-1),
    "b1": vt.reverse_loguniform(0.5, 0.999),
    "activation": vt.choice(["relu", "gelu", "tanh"]),
    "batch_size": 64,  # a constant: never in the shares
}


def _synthetic(n=300, seed=0, round_=0, start=0):
  """Score: a parabola in log10(lr) (dominant), a weak slope in log(1 - b1),
  nothing from the activation, plus a little noise."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    cfg = {k: d.sample(rng, 1)[0] for k, d in SPACE.items() if isinstance(d, vt.Distribution)}
    cfg["batch_size"] = 64
    score = (math.log10(cfg["learning_rate"]) + 3.0) ** 2 + 0.3 * math.log1p(-cfg["b1"]) / math.log(10)
    out.append(_trial(start + i, cfg, score + 0.05 * rng.normal(), round_))
  return out


def test_known_ranking_and_irrelevant_share_is_small():
  shares = _importance.importance(_result(_synthetic(), SPACE))
  assert list(shares) == ["learning_rate", "b1", "activation"]
  assert shares["learning_rate"] > 0.8
  assert shares["activation"] < 0.02  # irrelevant: chance-corrected to about 0
  assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-12)
  assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in shares.values())


def test_method_delegates_and_constants_are_left_out():
  r = _result(_synthetic(60), SPACE)
  assert r.importance() == _importance.importance(r)
  assert "batch_size" not in r.importance()


def test_diverged_and_nonfinite_trials_are_excluded():
  trials = _synthetic(100)
  base = _importance.importance(_result(trials, SPACE))
  bad = [_trial(100, dict(trials[0].config), math.inf, status="diverged"),
         _trial(101, dict(trials[1].config), math.nan)]
  assert _importance.importance(_result(trials + bad, SPACE)) == base


def test_default_uses_round_zero_when_it_has_enough_trials():
  round0 = _synthetic(40, seed=1)
  # Zoom-round trials that would contradict round 0 if they were used.
  zoom = [_trial(40 + i, dict(t.config, activation="relu"), 10.0 if i % 2 else 0.0, round_=1)
          for i, t in enumerate(_synthetic(40, seed=2))]
  r = _result(round0 + zoom, SPACE)
  assert _importance.importance(r) == _importance.importance(r, rounds=0)
  assert _importance.importance(r) != _importance.importance(r, rounds=[0, 1])
  assert _importance.select_trials(r, None)[1] == "round 0, 40 trials"
  # Fewer than 8 finite round-0 trials: every round is used.
  small = _result(round0[:5] + zoom, SPACE)
  assert _importance.select_trials(small, None)[1] == "all rounds, 45 trials"


def test_errors():
  with pytest.raises(ValueError, match="at least 3 finite trials, got 2"):
    _importance.importance(_result(_synthetic(2), SPACE))
  with pytest.raises(ValueError, match="at least 3 finite"):
    _importance.importance(_result(_synthetic(20), SPACE), rounds=5)
  with pytest.raises(TypeError, match="rounds"):
    _importance.importance(_result(_synthetic(20), SPACE), rounds="0")


def test_constant_score_gives_zero_shares():
  trials = [_trial(t.id, t.config, 1.0) for t in _synthetic(30)]
  shares = _importance.importance(_result(trials, SPACE))
  assert set(shares.values()) == {0.0}


def test_repeated_values_are_their_own_bins():
  """A grid repeats values: every distinct value is a bin, ties never split."""
  space = {"lr": vt.loguniform(1e-4, 1e-1), "width": vt.integer(1, 4)}
  trials, i = [], 0
  for lr in (1e-4, 1e-3, 1e-2, 1e-1):
    for width in (1, 2, 3, 4):
      trials.append(_trial(i, {"lr": lr, "width": width}, abs(math.log10(lr) + 2.5)))
      i += 1
  shares = _importance.importance(_result(trials, space))
  assert shares == {"lr": 1.0, "width": 0.0}


def test_bias_correction_removes_chance():
  """Pure noise: raw η² is about (k-1)/(n-1); corrected, about 0."""
  rng = np.random.default_rng(0)
  values = [_importance.corrected_eta_squared(rng.integers(0, 10, 100), rng.normal(size=100))
            for _ in range(200)]
  assert np.mean(values) < 0.03


def test_a_search_that_stopped_trials_counts_them_at_a_common_step():
  # The pruner stops the bad learning rates at step 10; the survivors (good
  # rates) end at scores the rate no longer explains. Their final scores
  # alone credit the learning rate with nothing; every trial at step 10 gives
  # it the lead.
  rng = np.random.default_rng(0)
  trials = []
  for i in range(120):
    cfg = {k: d.sample(rng, 1)[0] for k, d in SPACE.items() if isinstance(d, vt.Distribution)}
    cfg["batch_size"] = 64
    early = (math.log10(cfg["learning_rate"]) + 3.0) ** 2 + 0.05 * rng.normal()
    survives = early < 0.5
    final = 0.1 * rng.normal() + (0.5 if cfg["activation"] == "tanh" else 0.0)
    curve = np.asarray([early, final] if survives else [early, np.nan], np.float32)
    trials.append(Trial(id=i, config=cfg, score=final if survives else early, round=0, lane=i % 8,
                        status="ok" if survives else "stopped", seed=i, curve=curve,
                        curve_steps=np.asarray([10, 20]), train_curve=curve, steps=20 if survives else 10))
  for i in range(120, 123):  # refilled just before the end: evaluated once, at step 5; left out
    cfg = dict(trials[0].config)
    trials.append(Trial(id=i, config=cfg, score=1.0, round=0, lane=0, status="stopped", seed=i,
                        curve=np.asarray([1.0], np.float32), curve_steps=np.asarray([5]),
                        train_curve=np.asarray([1.0], np.float32), steps=5))
  r = _result(trials, SPACE)
  chosen, description = _importance.select_trials(r, None)
  assert len(chosen) == 120 and "step 10" in description
  assert [t.score for t in chosen] == pytest.approx([float(t.curve[0]) for t in trials[:120]])
  assert list(_importance.importance(r))[0] == "learning_rate"
  survivors = _importance.importance(r, rounds=0)  # the finished trials' final scores
  assert list(survivors)[0] == "activation"
