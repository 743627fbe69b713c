"""Scenario 5: NaN/inf storms.

0, 1, half, all-but-one and all lanes diverge, at the first step, mid-round
and just before a checkpoint. Healthy lanes are bit-identical to a run without
the bad ones; bad lanes carry the step they diverged at; NaN is never best;
all lanes diverging is a clear error.

Inf policy: a lane whose training loss is NaN or ±inf, or whose parameters or
validation score are, is diverged: frozen at its last finite step, scored
+inf (-inf when maximizing), never best, never a zoom or PBT source.
"""

import math

import numpy as np
import optax
import pytest
from flax import nnx

import vmaptune as vt

rng = np.random.default_rng(2)
X = rng.normal(size=(200, 6)).astype(np.float32)
Y = (X @ rng.normal(size=6)).astype(np.float32)
SPACE = {"learning_rate": vt.loguniform(1e-4, 1e31)}
# SGD on least squares: 1e30 blows up in the first step, 3.0 near step 23,
# 2.3 near step 28, just before the checkpoint after 30 steps.
BAD = {"first": 1e30, "mid": 3.0, "before_checkpoint": 2.3}
GOOD = [0.5, 0.3, 0.1, 0.05, 0.2, 0.4, 0.15, 0.02]


def _linear(config, rngs):
  return nnx.Linear(6, 1, rngs=rngs)


def _run(lrs, **kw):
  return vt.search(_linear, (X, Y), SPACE, optimizer=optax.sgd, num_configs=len(lrs), num_steps=60,
                   eval_every=10, rounds=1, enqueue=[{"learning_rate": lr} for lr in lrs], verbose=False, **kw)


@pytest.fixture(scope="module")
def healthy():
  return _run(GOOD)


@pytest.mark.parametrize("bad_lanes", [0, 1, 4, 7])
@pytest.mark.parametrize("when", ["first", "mid", "before_checkpoint"])
def test_storm(healthy, bad_lanes, when):
  lrs = [BAD[when]] * bad_lanes + GOOD[bad_lanes:]
  r = _run(lrs)
  for t, ref in zip(r.trials, healthy.trials):
    if t.id < bad_lanes:
      assert t.status == "diverged" and t.score == math.inf
      lo, hi = {"first": (0, 2), "mid": (15, 30), "before_checkpoint": (20, 30)}[when]
      assert lo <= t.diverged_at <= hi
    else:  # bit for bit the same as in the population without bad lanes
      assert t.status == "ok" and t.score == ref.score
      np.testing.assert_array_equal(t.curve, ref.curve)
  assert r.best_trial.id >= bad_lanes and math.isfinite(r.best_score)


def test_all_lanes_diverging_is_a_clear_error():
  with pytest.raises(vt.AllDivergedError, match="all 8 trials diverged") as info:
    _run([BAD["first"]] * 4 + [BAD["mid"]] * 4)
  assert all(t.status == "diverged" for t in info.value.trials)


def test_divergence_just_before_a_checkpoint_survives_resume(tmp_path, monkeypatch):
  from vmaptune import _faults

  lrs = [BAD["before_checkpoint"]] + GOOD[1:]
  straight = _run(lrs, checkpoint_dir=tmp_path / "a", checkpoint_every=30)
  monkeypatch.setenv("VMAPTUNE_FAILPOINT", "round0:mid=crash")
  _faults.reset()
  with pytest.raises(_faults.SimulatedCrash):
    _run(lrs, checkpoint_dir=tmp_path / "b", checkpoint_every=30)
  monkeypatch.delenv("VMAPTUNE_FAILPOINT")
  resumed = _run(lrs, checkpoint_dir=tmp_path / "b", checkpoint_every=30)
  assert resumed.stats.resumed_from
  for a, b in zip(resumed.trials, straight.trials):
    assert (a.status, a.score, a.diverged_at) == (b.status, b.score, b.diverged_at)


def test_nan_in_a_metric_never_wins():
  def flaky(out, y):  # NaN for every example: a broken metric, not a diverged lane
    return (out[:, 0] - y) * np.float32(np.nan)

  with pytest.raises(vt.AllDivergedError):
    vt.search(_linear, (X, Y), {"learning_rate": vt.loguniform(1e-3, 1e-2)}, optimizer=optax.sgd,
              metric=flaky, num_configs=4, num_steps=10, rounds=1, verbose=False)
