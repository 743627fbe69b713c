"""Real models: BatchNorm, Dropout, Linen and NNX, images, call signatures."""

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import vmaptune as vt
from vmaptune import _model

from _models import CNN, cnn_fn, linen_cnn_fn

SPACE = {"learning_rate": vt.loguniform(1e-3, 1e-2)}


@pytest.fixture(scope="module")
def images(digits):
  x, y = digits
  x = x[:500].reshape(-1, 8, 8, 1)
  return {"train": (x[100:], y[100:500]), "val": (x[:100], y[:100])}


def _accuracy(logits, y):
  return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def _batch_stats(tree):
  return [np.asarray(a) for a in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def nnx_cnn_result(images):
  return vt.search(cnn_fn, images, SPACE, num_configs=4, num_steps=30, rounds=1, metric="accuracy",
                   verbose=False)


def test_nnx_cnn_searches_end_to_end(nnx_cnn_result, images):
  result = nnx_cnn_result
  assert all(t.status == "ok" for t in result.trials)
  model = result.best_model()
  assert isinstance(model, CNN)
  # In evaluation mode: running averages, no dropout; deterministic.
  assert model.batch_norm1.use_running_average and model.dropout1.deterministic
  x_val, y_val = images["val"]
  first, second = np.asarray(model(x_val)), np.asarray(model(x_val))
  np.testing.assert_array_equal(first, second)
  assert _accuracy(first, y_val) == pytest.approx(result.best_score, abs=1e-6)


def test_nnx_cnn_batch_stats_are_per_lane_and_eval_is_deterministic(nnx_cnn_result):
  a, b = nnx_cnn_result.trials[:2]
  ra, rb = nnx_cnn_result.retrain(a), nnx_cnn_result.retrain(b)
  stats_a = nnx.state(ra.model(), nnx.BatchStat)
  stats_b = nnx.state(rb.model(), nnx.BatchStat)
  assert any(not np.array_equal(x, y) for x, y in zip(_batch_stats(stats_a), _batch_stats(stats_b)))
  # Running statistics moved away from their initial values (mean 0, var 1).
  assert any(np.abs(x).max() > 0 for x in _batch_stats(nnx.state(ra.model(), nnx.BatchStat)))
  assert ra.score == a.score and nnx_cnn_result.retrain(a).score == a.score


def test_a_convolution_is_not_compiled_at_the_quick_tier(images, monkeypatch):
  # Predicted from its parameters, a CNN's training looked a thousand times
  # shorter than it was, so it compiled without XLA's optimisations and
  # trained 8-13x slower (a 16-channel digits CNN: 100 s instead of 9 s).
  from vmaptune import _building, _compiler

  assert _compiler.tier_for(0.01) == "quick"
  assert _compiler.tier_for(0.01, convolution=True) == "short"
  monkeypatch.delenv("VMAPTUNE_COMPILE_TIER", raising=False)
  chosen = []

  def tier_for(seconds, *args, **kw):
    chosen.append((seconds, _compiler.tier_for(seconds, *args, **kw)))
    return chosen[-1][1]

  monkeypatch.setattr(_building, "tier_for", tier_for)
  vt.search(lambda c, rngs: CNN(rngs, 16), images, SPACE, num_configs=2, num_steps=10, rounds=1,
            verbose=False, compilation_cache=False)
  # 20 lane-steps of a 16-channel CNN: XLA counts about 2e7 FLOPs a lane-step,
  # predicted at 20 GFLOP/s a core with the CPU's convolution gradients (from
  # its parameters alone: under a millisecond).
  assert chosen and all(tier != "quick" for _, tier in chosen)
  assert all(seconds > 0.005 for seconds, _ in chosen)


def test_linen_cnn_searches_end_to_end(images):
  result = vt.search(linen_cnn_fn, images, SPACE, num_configs=4, num_steps=30, rounds=1,
                     metric="accuracy", verbose=False)
  module, variables = result.best_model()
  assert set(variables) == {"params", "batch_stats"}
  x_val, y_val = images["val"]
  out = module.apply(variables, x_val, train=False)
  assert _accuracy(out, y_val) == pytest.approx(result.best_score, abs=1e-6)
  a, b = (result.retrain(t) for t in result.trials[:2])
  assert any(not np.array_equal(x, y) for x, y in
             zip(_batch_stats(a.model_state["batch_stats"]), _batch_stats(b.model_state["batch_stats"])))


class DropoutMLP(nnx.Module):
  """The newer NNX tutorial style: dropout draws from ``rngs`` passed at call time."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 32, rngs=rngs)
    self.drop = nnx.Dropout(0.5)
    self.l2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    return self.l2(self.drop(nnx.relu(self.l1(x)), rngs=rngs))


class DeterministicLinen(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.Dropout(0.5, deterministic=deterministic)(nn.relu(nn.Dense(32)(x)))
    return nn.Dense(10)(x)


def test_call_time_rngs_and_deterministic_flag(small_digits):
  r2 = vt.train(lambda c: DeterministicLinen(), small_digits, {"learning_rate": 3e-3}, num_steps=20,
                verbose=False)
  assert r2.status == "ok"
  # Dropout is on in training: two seeds with the same init would differ;
  # here check the switch was found and passed.
  adapter = _model.make_adapter(lambda c: DeterministicLinen(), {}, jax.ShapeDtypeStruct((1, 64), np.float32))
  assert adapter.mode_arg == "deterministic"
  adapter = _model.make_adapter(lambda c, rngs: DropoutMLP(rngs), {}, jax.ShapeDtypeStruct((1, 64), np.float32))
  assert adapter.takes_rngs


def test_dropout_draws_per_lane_streams(small_digits):
  # Two trials with the same learning rate differ only through their seeds:
  # init, data order and dropout stream.
  space = {"learning_rate": vt.loguniform(3e-3, 3e-3 * (1 + 1e-9))}
  r = vt.search(lambda c, rngs: DropoutMLP(rngs), small_digits, space, num_configs=4, num_steps=10,
                rounds=1, verbose=False)
  assert len({t.seed for t in r.trials}) == 4 and len({t.score for t in r.trials}) == 4
  assert all(t.status == "ok" for t in r.trials)  # dropout drew from the rngs passed at call time


class NeedsTwo(nn.Module):
  @nn.compact
  def __call__(self, x, mask):
    return nn.Dense(10)(x) * mask


def test_linen_model_needing_other_arguments_is_refused(small_digits):
  with pytest.raises(TypeError, match="'mask'"):
    vt.search(lambda c: NeedsTwo(), small_digits, SPACE, num_configs=2, num_steps=5, verbose=False)


def test_linen_model_fn_returning_nnx_is_refused(small_digits):
  with pytest.raises(TypeError, match="linen Module"):
    vt.search(lambda c: nnx.Linear(64, 10, rngs=nnx.Rngs(0)), small_digits, SPACE, num_configs=2,
              num_steps=5, verbose=False)


class IsTrainLinen(nn.Module):
  @nn.compact
  def __call__(self, x, is_train: bool = False):
    x = nn.Dropout(0.5, deterministic=not is_train)(nn.relu(nn.Dense(32)(x)))
    return nn.Dense(10)(x)


class OtherSwitchLinen(nn.Module):
  @nn.compact
  def __call__(self, x, use_dropout: bool = False):
    x = nn.Dropout(0.5, deterministic=not use_dropout)(nn.relu(nn.Dense(32)(x)))
    return nn.Dense(10)(x)


def test_train_switches_are_found_or_warned():
  # `is_train` is a train switch too; a bool argument under another name stays
  # at its default in training as well (its Dropout would never drop): warned.
  example = jax.ShapeDtypeStruct((1, 64), np.float32)
  assert _model.make_adapter(lambda c: IsTrainLinen(), {}, example).mode_arg == "is_train"
  with pytest.warns(UserWarning, match=r"'use_dropout'.*rename it to `train`"):
    adapter = _model.make_adapter(lambda c: OtherSwitchLinen(), {}, example)
  assert adapter.mode_arg is None


class AttributeBatchNorm(nn.Module):
  """The train flag as a module attribute: BatchNorm writes its statistics in evaluation too."""

  train: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=not self.train)(nn.Dense(16)(x))
    return nn.Dense(10)(nn.relu(x))


def test_batch_statistics_written_in_evaluation_get_a_hint(no_compile, small_digits):
  with pytest.raises(TypeError, match=r"batch_stats in evaluation.*argument of __call__"):
    vt.search(lambda c: AttributeBatchNorm(), small_digits, SPACE, num_configs=2, num_steps=5, verbose=False)


def test_a_bfloat16_model_trains_and_keeps_its_dtypes(small_digits):
  # The injected hyperparameters are float32; the optimizer's moments stay in
  # the parameters' bfloat16 (they promoted, and the loop's carry changed type).
  import jax.numpy as jnp

  fn = lambda c, rngs: nnx.Linear(64, 10, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=rngs)
  r = vt.search(fn, small_digits, SPACE, num_configs=2, num_steps=10, rounds=1, verbose=False)
  assert all(t.status == "ok" and np.isfinite(t.score) for t in r.trials)
  assert r.best_model().kernel[...].dtype == jnp.bfloat16


class KeywordRngs(nnx.Module):
  """NNX's own style: ``rngs`` keyword-only."""

  def __init__(self, config, *, rngs):
    self.l = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.l(x)


def test_model_fn_with_keyword_only_rngs(small_digits):
  # def model_fn(config, *, rngs) and a Module class taking (config, *, rngs)
  # are called with rngs= (positionally they raised TypeError).
  def model_fn(config, *, rngs):
    return KeywordRngs(config, rngs=rngs)

  for fn in (model_fn, KeywordRngs):
    r = vt.search(fn, small_digits, SPACE, num_configs=2, num_steps=5, rounds=1, verbose=False)
    assert all(t.status == "ok" for t in r.trials) and isinstance(r.best_model(), KeywordRngs)
  with pytest.raises(TypeError, match="takes rngs but no config"):
    vt.search(lambda *, rngs: KeywordRngs({}, rngs=rngs), small_digits, SPACE, num_configs=2, num_steps=5,
              verbose=False)
