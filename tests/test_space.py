"""Distributions, spaces, zoom regions and grids (no training)."""


import numpy as np
import pytest
from scipy import stats

import vmaptune as vt
from vmaptune import _region, _space


def _draw(d, n=4000, seed=0):
  return d.sample(np.random.default_rng(seed), n)


def test_uniform_bounds_and_uniformity():
  xs = np.asarray(_draw(vt.uniform(-2.0, 3.0)))
  assert xs.min() >= -2.0 and xs.max() <= 3.0
  # Kolmogorov-Smirnov against U(-2, 3); p > 1e-3 fails only by bad luck of 1 in 1000.
  assert stats.kstest(xs, stats.uniform(-2.0, 5.0).cdf).pvalue > 1e-3


def test_loguniform_is_uniform_in_log_space():
  xs = np.asarray(_draw(vt.loguniform(1e-4, 1e-1)))
  assert xs.min() >= 1e-4 and xs.max() <= 1e-1
  logs = np.log10(xs)
  assert stats.kstest(logs, stats.uniform(-4.0, 3.0).cdf).pvalue > 1e-3
  # As many draws per decade: ~1/3 each.
  per_decade = np.histogram(logs, bins=[-4, -3, -2, -1])[0] / len(xs)
  np.testing.assert_allclose(per_decade, 1 / 3, atol=0.03)


def test_reverse_loguniform_samples_one_minus_x_log_uniformly():
  d = vt.reverse_loguniform(0.9, 0.999)
  xs = np.asarray(_draw(d))
  assert xs.min() >= 0.9 and xs.max() <= 0.999
  logs = np.log10(1.0 - xs)  # in [-3, -1]
  assert stats.kstest(logs, stats.uniform(-3.0, 2.0).cdf).pvalue > 1e-3
  # Half the draws lie in [0.99, 0.999]: what a plain uniform would give 10%.
  assert 0.45 < np.mean(xs >= 0.99) < 0.55


def test_integer_inclusive_and_even():
  xs = np.asarray(_draw(vt.integer(1, 3), n=6000))
  assert set(xs.tolist()) == {1, 2, 3}
  counts = np.bincount(xs)[1:] / len(xs)
  np.testing.assert_allclose(counts, 1 / 3, atol=0.03)
  assert all(isinstance(v, int) for v in _draw(vt.integer(1, 3), n=5))


def test_integer_log_scale():
  xs = np.asarray(_draw(vt.integer(16, 512, log=True), n=6000))
  assert xs.min() >= 16 and xs.max() <= 512
  # log-uniform: the lower half of the log range [16, ~90] holds about half the draws.
  assert 0.45 < np.mean(xs <= 90) < 0.55


def test_choice_values_and_types():
  d = vt.choice([32, 64, 128])
  xs = _draw(d, n=3000)
  assert set(xs) == {32, 64, 128}
  assert all(type(v) is int for v in xs)
  assert vt.choice(["relu", "tanh"]).sample(np.random.default_rng(0), 3)[0] in ("relu", "tanh")


def test_sampling_is_seeded():
  d = vt.loguniform(1e-4, 1e-1)
  assert _draw(d, 10, seed=3) == _draw(d, 10, seed=3)
  assert _draw(d, 10, seed=3) != _draw(d, 10, seed=4)


def test_coord_round_trip():
  for d, x in [(vt.loguniform(1e-4, 1.0), 0.003), (vt.reverse_loguniform(0.9, 0.999), 0.95),
               (vt.uniform(0, 1), 0.25)]:
    assert d.from_coord(d.to_coord(x)) == pytest.approx(x, rel=1e-12)


def test_space_validation_accepts_constants():
  space = _space.validate_space({"lr": vt.loguniform(1e-3, 1e-1), "hidden": 64, "act": "relu",
                                 "shape": (2, 3), "fn": np.tanh, "none": None})
  assert _space.constants(space) == {"hidden": 64, "act": "relu", "shape": (2, 3), "fn": np.tanh, "none": None}
  assert list(_space.searched(space)) == ["lr"]


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: vt.uniform(1.0, 1.0), ValueError, "low.*smaller than.*high.*plain value"),
        (lambda: vt.uniform(2.0, 1.0), ValueError, "Swap"),
        (lambda: vt.uniform(float("nan"), 1.0), ValueError, "finite"),
        (lambda: vt.uniform("a", 1.0), TypeError, "real number"),
        (lambda: vt.loguniform(0.0, 1.0), ValueError, "low.*> 0"),
        (lambda: vt.loguniform(-1.0, 1.0), ValueError, "> 0"),
        (lambda: vt.loguniform(1.0, float("inf")), ValueError, "finite"),
        (lambda: vt.reverse_loguniform(0.9, 1.0), ValueError, "between 0 and 1"),
        (lambda: vt.reverse_loguniform(0.0, 0.9), ValueError, "between 0 and 1"),
        (lambda: vt.reverse_loguniform(0.99, 0.9), ValueError, "smaller"),
        (lambda: vt.integer(3, 1), ValueError, "smaller"),
        (lambda: vt.integer(1.5, 3), TypeError, "int"),
        (lambda: vt.integer(0, 3, log=True), ValueError, ">= 1"),
        (lambda: vt.choice([]), ValueError, "empty"),
        (lambda: vt.choice([1, 1]), ValueError, "duplicate"),
        (lambda: vt.choice([[1], [2]]), TypeError, "hashable"),
        (lambda: vt.choice("abc"), TypeError, "list or tuple"),
    ],
)
def test_bad_distributions(make, err, match):
  with pytest.raises(err, match=match):
    make()


@pytest.mark.parametrize(
    "space, err, match",
    [
        ({}, ValueError, "empty"),
        ([("lr", 1)], TypeError, "dict"),
        ({"lr": [1e-3, 1e-2]}, TypeError, "did you mean vt.choice"),
        ({"lr": stats.uniform(0, 1)}, TypeError, "unknown distribution"),
        ({"lr": object()}, TypeError, "unknown distribution"),
        ({1: vt.uniform(0, 1)}, TypeError, "keys"),
    ],
)
def test_bad_spaces(space, err, match):
  with pytest.raises(err, match=match):
    _space.validate_space(space)


def test_zoom_region_shrinks_and_contains_best():
  space = {"lr": vt.loguniform(1e-5, 1.0), "b1": vt.reverse_loguniform(0.5, 0.999),
           "h": vt.choice([8, 16, 32]), "n": vt.integer(1, 8)}
  rng = np.random.default_rng(0)
  configs = _region.sample_values(_space.searched(space), rng, 50, _region.Region.full(space))
  full = _region.Region.full(space)
  for r in (1, 2, 3):
    top = configs[:10]
    region = _region.zoom_region(space, top, r, shrink=0.5)
    for k in ("lr", "b1", "n"):
      lo, hi = region.numeric[k]
      flo, fhi = full.numeric[k]
      assert flo <= lo < hi <= fhi
      assert hi - lo <= 0.5**r * (fhi - flo) + 1e-9
      t = space[k].to_coord(top[0][k])
      assert lo - 1e-9 <= t <= hi + 1e-9, k  # the best config stays inside
    assert set(region.choices["h"]) == {c["h"] for c in top}
    samples = _region.sample_values(_space.searched(space), rng, 200, region)
    assert all(region.contains(space, s) for s in samples)


def test_grid_is_full_and_within_budget():
  space = {"lr": vt.loguniform(1e-4, 1e-1), "mom": vt.uniform(0.0, 0.9)}
  g = _region.grid_values(_space.searched(space), 25, _region.Region.full(space))
  assert len(g) == 25
  assert len({c["lr"] for c in g}) == 5  # a 5x5 grid tries only 5 learning rates
  g = _region.grid_values(_space.searched(space), 96, _region.Region.full(space))
  assert len(g) == 90 and len({c["lr"] for c in g}) == 10
  with pytest.raises(ValueError, match="grid"):
    _region.grid_values({"h": vt.choice(list(range(10)))}, 5, _region.Region.full({"h": vt.choice(list(range(10)))}))


def test_json_round_trip():
  for d in [vt.uniform(0, 1), vt.loguniform(1e-4, 1e-1), vt.reverse_loguniform(0.9, 0.999),
            vt.integer(1, 5, log=True), vt.choice([1, "a", None]), 3, "relu"]:
    assert _space.from_json(_space.to_json(d)) == d


def test_enqueued_values_become_the_spaces_plain_values():
  # A config read from a DataFrame or an array holds NumPy scalars; the trial's
  # config (and best_config, json-serialisable) holds the space's own values.
  import json

  from vmaptune import _sampling

  space = {"learning_rate": vt.loguniform(1e-3, 1e-1), "hidden": vt.choice([16, 32]),
           "layers": vt.integer(1, 3)}
  (got,) = _sampling.check_enqueued(space, [{"learning_rate": np.float32(0.01), "hidden": np.int64(32),
                                             "layers": np.int64(2)}])
  assert [type(got[k]) for k in ("learning_rate", "hidden", "layers")] == [float, int, int]
  assert json.loads(json.dumps(got)) == got
