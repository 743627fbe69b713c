"""Scenario 7: property-based fuzzing of spaces and data (hypothesis, derandomized).

Invalid input raises ValueError or TypeError before anything compiles; valid
input samples inside its bounds, gives exactly the trials asked for (no padding
lane in the results) and the same configs for the same seed.
"""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmaptune as vt
from vmaptune import _data

from _models import mlp_fn

FUZZ = settings(derandomize=True, max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
bound = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                  st.sampled_from([0.0, -1.0, 1.0, 1e-8, 0.5, 0.999, 1e6]))


def _expected_valid(kind, low, high):
  if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
    return False
  if kind == "loguniform":
    return low > 0
  if kind == "reverse_loguniform":
    return 0 < low < 1 and 0 < high < 1
  return True


@FUZZ
@given(kind=st.sampled_from(["uniform", "loguniform", "reverse_loguniform"]), low=bound, high=bound,
       seed=st.integers(0, 2**31 - 1))
def test_float_distributions(kind, low, high, seed):
  make = getattr(vt, kind)
  if not _expected_valid(kind, low, high):
    with pytest.raises((ValueError, TypeError)):
      make(low, high)
    return
  d = make(low, high)
  xs = d.sample(np.random.default_rng(seed), 50)
  assert all(low <= x <= high for x in xs)
  assert xs == d.sample(np.random.default_rng(seed), 50)


@FUZZ
@given(low=st.integers(-50, 50), high=st.integers(-50, 50), log=st.booleans(), seed=st.integers(0, 1000))
def test_integer_distribution(low, high, log, seed):
  if not low < high or (log and low < 1):
    with pytest.raises(ValueError):
      vt.integer(low, high, log=log)
    return
  xs = vt.integer(low, high, log=log).sample(np.random.default_rng(seed), 100)
  assert all(low <= x <= high and isinstance(x, int) for x in xs)


@FUZZ
@given(values=st.lists(st.integers(-10**6, 10**6), min_size=0, max_size=3000))
def test_choice_lists(values):
  if not values:
    with pytest.raises(ValueError, match="empty"):
      vt.choice(values)
  elif len(set(values)) < len(values):
    with pytest.raises(ValueError, match="duplicate"):
      vt.choice(values)
  else:
    d = vt.choice(values)
    assert set(d.sample(np.random.default_rng(0), 20)) <= set(values)


feature_dtypes = st.sampled_from([np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int32, np.uint8])


@FUZZ
@given(n_x=st.integers(0, 12), n_y=st.integers(0, 12), dtype=feature_dtypes, nan=st.booleans(),
       val_fraction=st.sampled_from([0.2, 0.5, 0.0, 1.0]))
def test_data(n_x, n_y, dtype, nan, val_fraction):
  x = np.ones((n_x, 3), np.float32)
  if nan and n_x and np.issubdtype(np.dtype(dtype), np.floating) or (nan and n_x and dtype is ml_dtypes.bfloat16):
    x[0, 0] = np.nan
  x = x.astype(dtype)
  y = np.zeros(n_y, np.int32)
  n_val = int(round(n_x * val_fraction))
  has_nan = bool(np.isnan(x.astype(np.float32)).any()) if n_x else False
  valid = (n_x == n_y and n_x > 0 and not has_nan and 0 < val_fraction < 1 and 1 <= n_val <= n_x - 1)
  if not valid:
    with pytest.raises((ValueError, TypeError)):
      _data.prepare_data((x, y), val_fraction=val_fraction, seed=0)
    return
  ds = _data.prepare_data((x, y), val_fraction=val_fraction, seed=0)
  assert ds.num_train + ds.num_val == n_x
  assert ds.x_train.dtype in (np.float32, np.int32)


bad_args = st.sampled_from([
    dict(num_configs=0), dict(num_configs=-3), dict(num_configs=True), dict(rounds=0), dict(num_steps=0),
    dict(epochs=-1.0), dict(seed=-1), dict(eval_every=0), dict(keep=1.5), dict(shrink=0.0),
    dict(max_buckets=0), dict(lane_batch=0), dict(val_fraction=1.0), dict(sampler="lhs"),
    dict(metric="f1"), dict(direction="up"), dict(precision="double"), dict(memory_budget="lots"),
    dict(strategy="hyperband"), dict(checkpoint_every=10), dict(callbacks=[1]), dict(enqueue=[{}]),
    dict(space={"learning_rate": vt.loguniform(1e-3, 1e-2), "batch_size": vt.choice([0, 8])}),
    dict(space={"learning_rate": [1e-3, 1e-2]}),
])


@settings(derandomize=True, max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the refusal must persist
@given(first=bad_args, second=bad_args)
def test_invalid_search_arguments_raise_before_compiling(small_digits, no_compile, first, second):
  args = dict(num_configs=4, num_steps=5, verbose=False)
  args.update(second)
  args.update(first)
  space = args.pop("space", {"learning_rate": vt.loguniform(1e-3, 1e-2)})
  with pytest.raises((ValueError, TypeError)):
    vt.search(mlp_fn, small_digits, space, **args)


@pytest.mark.parametrize("num_configs", [1, 5, 7])
def test_exact_trial_count_without_padding(small_digits, num_configs):
  # 1, a prime, and counts that are not multiples of the 4 devices.
  space = {"learning_rate": vt.loguniform(1e-3, 1e-2)}
  r = vt.search(mlp_fn, small_digits, space, num_configs=num_configs, num_steps=5, rounds=2, verbose=False)
  assert len(r.trials) == 2 * num_configs
  assert sorted(t.id for t in r.trials) == list(range(2 * num_configs))
  assert r.stats.lane_steps == 2 * num_configs * 5
  again = vt.search(mlp_fn, small_digits, space, num_configs=num_configs, num_steps=5, rounds=2, verbose=False)
  assert [t.config for t in again.trials] == [t.config for t in r.trials]


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.int32])
def test_feature_dtypes_search(small_digits, dtype):
  x, y = small_digits
  x = (x * 16).astype(dtype) if dtype is np.int32 else x.astype(dtype)
  r = vt.search(mlp_fn, (x, y), {"learning_rate": vt.loguniform(1e-3, 1e-2)}, num_configs=4, num_steps=5,
                rounds=1, verbose=False)
  assert len(r.trials) == 4 and all(t.status == "ok" for t in r.trials)
