"""SearchResult.recheck: the top configs re-trained with fresh seeds, in the search's programs."""

import math

import numpy as np
import optax
from flax import nnx
import pytest

import vmaptune as vt
from vmaptune import _program
from vmaptune._recheck import recheck_seeds

from _models import mlp_fn

SPACE = {"learning_rate": vt.loguniform(1e-3, 1e-1), "hidden": vt.choice([8, 16])}
STEPS = 40


@pytest.fixture(scope="module")
def data(digits_split):
  return digits_split


@pytest.fixture(scope="module")
def result(data):
  return vt.search(mlp_fn, data, SPACE, num_configs=8, num_steps=STEPS, rounds=1, seed=5, verbose=False)


def test_matches_each_config_trained_alone(result, data, monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("recheck compiled a program; the search's own should serve")

  # The best trial of each width: two programs.
  best = {t.config["hidden"]: t for t in reversed(result.ranked())}
  assert sorted(best) == [8, 16]
  monkeypatch.setattr(_program.Program, "compile", refuse)
  check = result.recheck(trials=list(best.values()), seeds=3)
  assert check.scores.shape == (2, 3) and len(check.seeds) == 3
  assert check.lane_steps >= 2 * 3 * STEPS and check.seconds > 0
  monkeypatch.undo()
  for t, row in zip(check.trials, check.scores):
    for s, score in zip(check.seeds, row):
      alone = vt.train(mlp_fn, data, t.config, num_steps=STEPS, seed=s)
      # To rounding, not bitwise: a vmapped lane's matmuls may tile differently
      # (measured: within 1e-6 here; Adam at a high learning rate can amplify it).
      np.testing.assert_allclose(score, alone.score, rtol=1e-3)


def test_ranked_by_mean_and_replays_bit_for_bit(result):
  check = result.recheck(top=5, seeds=2)
  assert list(check.mean) == sorted(check.mean)
  np.testing.assert_array_equal(check.mean, check.scores.mean(axis=1))
  assert check.best_config == check.trials[0].config == check.best_trial.config
  again = result.recheck(top=5, seeds=2)
  np.testing.assert_array_equal(again.scores, check.scores)
  assert [t.id for t in again.trials] == [t.id for t in check.trials]
  # A config's scores do not depend on which others are re-checked with it.
  one = result.recheck(trials=[check.trials[2].id], seeds=2)
  np.testing.assert_array_equal(one.scores[0], check.scores[2])


def test_seeds_are_fresh_shared_and_nested(result):
  check = result.recheck(top=2, seeds=4)
  assert check.seeds == recheck_seeds(5, 4) and recheck_seeds(5, 2) == check.seeds[:2]
  assert len(set(check.seeds)) == 4
  assert not set(check.seeds) & {t.seed for t in result.trials}  # never a trial's own seed
  assert recheck_seeds(6, 4) != check.seeds  # another search seed, other seeds
  explicit = result.recheck(trials=[check.trials[0]], seeds=check.seeds[1:3])
  np.testing.assert_array_equal(explicit.scores[0], check.scores[0, 1:3])


def test_a_diverging_config_ranks_last():
  # SGD on least squares with a huge step size blows up geometrically to inf/NaN.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 6)).astype(np.float32)
  data = (x, (x @ rng.normal(size=6)).astype(np.float32))
  linear_fn = lambda config, rngs: nnx.Linear(6, 1, rngs=rngs)
  result = vt.search(linear_fn, data, {"learning_rate": vt.choice([1e-2, 1e6])}, optimizer=optax.sgd,
                     num_configs=2, num_steps=30, rounds=1, sampler="grid", verbose=False)
  blown = next(t for t in result.trials if t.config["learning_rate"] == 1e6)
  assert blown.status == "diverged"
  check = result.recheck(trials=[blown.id, result.best_trial.id], seeds=2)
  assert check.trials[0].config["learning_rate"] == 1e-2 and math.isfinite(check.mean[0])
  assert check.mean[1] == math.inf and check.to_records()[1]["diverged"] == 2


def test_tables(result):
  check = result.recheck(top=3, seeds=2)
  df = check.to_pandas()
  assert list(df.index) == [1, 2, 3]
  assert {"trial", "learning_rate", "hidden", "mean", "std", "search_score", "diverged"} <= set(df.columns)
  assert [f"seed_{s}" for s in check.seeds] == [c for c in df.columns if c.startswith("seed_")]
  lines = check.table().splitlines()
  assert lines[0].split()[:4] == ["rank", "trial", "mean", "loss"] and len(lines) == 5
  assert repr(check).startswith(f"Recheck(3 configs x 2 seeds, best trial {check.best_trial.id}")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(top=0), ValueError, "`top` must be a positive int"),
    (dict(top=True), ValueError, "`top`"),
    (dict(seeds=0), ValueError, "`seeds` must be a positive int"),
    (dict(seeds="8"), TypeError, "`seeds` must be"),
    (dict(seeds=[1, -1]), ValueError, r"ints in \[0, 2\*\*32\)"),
    (dict(trials=[999]), ValueError, "no trial with id 999"),
    (dict(seeds=[3, 3]), ValueError, "twice"),
    (dict(trials=3), TypeError, "non-empty list"),
    (dict(trials=[1, 1]), ValueError, "twice"),
    (dict(trials=["a"]), TypeError, "Trials or trial ids"),
])
def test_bad_input_is_refused_before_training(result, kwargs, error, match, monkeypatch):
  monkeypatch.setattr(type(result._replay), "scores", lambda *a, **k: pytest.fail("trained"))
  with pytest.raises(error, match=match):
    result.recheck(**kwargs)


def test_trials_are_found_by_id_not_position(result):
  # An adaptive search's ids skip numbers (configs held back), as here.
  import copy

  gappy = copy.copy(result)
  gappy.trials = result.trials[2:]
  check = gappy.recheck(trials=[5], seeds=np.array([7, 8]))
  assert check.trials[0] is result.trials[5] and check.seeds == [7, 8]
  assert gappy.retrain(5).score == result.trials[5].score
  with pytest.raises(ValueError, match="no trial with id 1"):
    gappy.recheck(trials=[1])


def test_a_trial_of_another_search_is_refused(result, data):
  other = vt.search(mlp_fn, data, SPACE, num_configs=4, num_steps=STEPS, rounds=1, seed=6, verbose=False)
  with pytest.raises(ValueError, match="not this search's trial"):
    result.recheck(trials=[other.trials[0]])


def test_a_recheck_mid_search_leaves_the_search_as_it_was(data):
  # From a callback, the re-check shares the live population's programs and data.
  kw = dict(num_configs=8, num_steps=STEPS, rounds=3, seed=5, strategy="adaptive", verbose=False)
  plain = vt.search(mlp_fn, data, SPACE, **kw)
  checks = []
  probed = vt.search(mlp_fn, data, SPACE, callbacks=[lambda partial: checks.append(partial.recheck(top=2, seeds=2))],
                     **kw)
  assert len(checks) >= 2 and all(c.scores.shape == (2, 2) for c in checks)
  assert [(t.config, t.score) for t in probed.trials] == [(t.config, t.score) for t in plain.trials]


def test_needs_the_search_programs(result, tmp_path):
  loaded = vt.load(result.save(tmp_path / "r.vmaptune"))
  with pytest.raises(RuntimeError, match="recheck"):
    loaded.recheck()
