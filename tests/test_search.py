"""End-to-end searches: API, routing, zoom, buckets, compiles, divergence, bad input."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import vmaptune as vt
from vmaptune import _program

from _models import MLP, Regressor, linen_mlp_fn, mlp_fn

LR = {"learning_rate": vt.loguniform(1e-3, 3e-2)}


def _split(data, n_val=150):
  x, y = data
  return {"train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val])}


def _val_accuracy(logits, y):
  return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == y))


def test_nnx_search_end_to_end(small_digits):
  # The space of test_trainer's mixed population: the same compiled programs.
  space = {
      "learning_rate": vt.loguniform(3e-4, 3e-3),
      "hidden": vt.choice([8, 16]),
      "batch_size": vt.choice([16, 32]),
  }
  result = vt.search(mlp_fn, small_digits, space, num_configs=8, num_steps=40, rounds=2, seed=0, verbose=False)
  assert len(result.trials) == 16
  assert [t.id for t in result.trials] == list(range(16))
  assert {t.round for t in result.trials} == {0, 1}
  best = result.best_config
  assert set(best) == set(space)
  assert type(best["learning_rate"]) is float and type(best["hidden"]) is int
  assert isinstance(result.best_score, float) and result.best_score > 0.0
  assert result.best_score == min(t.score for t in result.trials)
  assert all(t.parent is not None for t in result.trials if t.round == 1)
  assert all(len(t.curve) == 10 and t.curve_steps[-1] == 40 for t in result.trials)
  stats = result.stats
  assert stats.lane_steps == 16 * 40 and stats.programs_compiled >= 0
  assert stats.lane_steps_per_second > 0 and stats.wall_seconds >= stats.train_seconds
  df = result.to_pandas()
  assert len(df) == 16 and {"learning_rate", "hidden", "score", "round", "status", "seed"} <= set(df.columns)
  # The best model, rebuilt on the host, predicts like the best lane scored.
  model = result.best_model()
  assert isinstance(model, MLP)
  from vmaptune import _data

  val = _data.prepare_data(small_digits, val_fraction=0.2, seed=0)
  loss = optax.softmax_cross_entropy_with_integer_labels(model(val.x_val), val.y_val).mean()
  assert float(loss) == pytest.approx(result.best_score, rel=1e-5)


def test_linen_search_end_to_end(small_digits):
  data = _split(small_digits)
  result = vt.search(linen_mlp_fn, data, {**LR, "hidden": 16},
                     num_configs=4, num_steps=30, rounds=2, metric="accuracy", verbose=False)
  module, variables = result.best_model()
  x_val, y_val = data["val"]
  assert _val_accuracy(module.apply(variables, x_val), y_val) == pytest.approx(result.best_score, abs=1e-6)


def test_same_seed_same_everything(small_digits):
  kw = dict(num_configs=4, num_steps=20, rounds=2, verbose=False)
  a = vt.search(mlp_fn, small_digits, LR, seed=3, **kw)
  b = vt.search(mlp_fn, small_digits, LR, seed=3, **kw)
  c = vt.search(mlp_fn, small_digits, LR, seed=4, **kw)
  for ta, tb in zip(a.trials, b.trials):
    assert ta.config == tb.config and ta.seed == tb.seed and ta.score == tb.score
    np.testing.assert_array_equal(ta.curve, tb.curve)
  assert a.best_config == b.best_config
  assert [t.config for t in a.trials] != [t.config for t in c.trials]


def test_one_compile_per_signature():
  # A fresh closure: nothing cached from other tests.
  def model_fn(config, rngs):
    return MLP(config["hidden"], 1, rngs)

  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 64)).astype(np.float32)
  y = rng.integers(0, 10, size=200).astype(np.int32)
  space = {**LR, "hidden": 8}
  result = vt.search(model_fn, (x, y), space, num_configs=6, num_steps=10, rounds=3, verbose=False)
  assert result.stats.programs_compiled == 1  # one program, for all three rounds
  assert [r["compiled"] for r in result.stats.programs_by_round] == [1, 0, 0]
  assert result.stats.programs_by_round[0]["new_signatures"] == 1
  again = vt.search(model_fn, (x, y), space, num_configs=6, num_steps=10, rounds=2, seed=1, verbose=False)
  assert again.stats.programs_compiled == 0  # same shapes: reused across searches
  vt.clear_cache()
  fresh = vt.search(model_fn, (x, y), space, num_configs=6, num_steps=10, rounds=1, verbose=False)
  assert fresh.stats.programs_compiled == 1


def test_a_redefined_model_class_is_a_new_program():
  # A notebook re-runs the class cell: model_fn is the same function, but it
  # builds another model. The cache must not hand back the old program.
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      return self.l(x)

  def model_fn(config, rngs):
    return Net(rngs)

  rng = np.random.default_rng(0)
  data = (rng.normal(size=(100, 64)).astype(np.float32), rng.integers(0, 10, size=100).astype(np.int32))
  kw = dict(num_configs=2, num_steps=5, rounds=1, verbose=False)
  first = vt.search(model_fn, data, LR, **kw)
  assert vt.search(model_fn, data, LR, **kw).stats.programs_compiled == 0  # unchanged: cached

  class Net(nnx.Module):  # noqa: F811 - the notebook's second version
    def __init__(self, rngs):
      self.l = nnx.Linear(64, 10, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.l(x)

  second = vt.search(model_fn, data, LR, **kw)
  assert second.stats.programs_compiled == 1 and second.best_model().l.bias is None
  assert first.best_model().l.bias is not None


def test_code_reads_sees_through_a_partial():
  import functools

  from vmaptune._compiler import code_reads

  class Net:
    pass

  def build(config, rngs, width):
    return Net()

  fn = functools.partial(build, width=8)
  before = code_reads(fn)
  assert code_reads(fn) == before

  class Net:  # noqa: F811 - redefined, as a notebook cell run again
    pass

  assert code_reads(fn) != before


def test_a_callback_can_end_the_search(small_digits):
  kw = dict(num_configs=4, num_steps=10, rounds=3, strategy="zoom", verbose=False)
  seen = []
  r = vt.search(mlp_fn, small_digits, LR, callbacks=[lambda partial: seen.append(partial) or {"stop": True}], **kw)
  assert len(seen) == 1 and {t.round for t in r.trials} == {0} and len(r.trials) == 4
  r = vt.search(mlp_fn, small_digits, LR, callbacks=[lambda partial: {"stop": len(partial.regions) == 2}], **kw)
  assert {t.round for t in r.trials} == {0, 1}
  # Any other value is ignored: a logger's True (tqdm's update()), a saved report's path.
  r = vt.search(mlp_fn, small_digits, LR, callbacks=[lambda partial: True, lambda partial: "report.html"], **kw)
  assert {t.round for t in r.trials} == {0, 1, 2}


def test_max_buckets_caps_signatures(small_digits):
  space = {**LR, "hidden": vt.integer(4, 64)}
  result = vt.search(mlp_fn, small_digits, space, num_configs=6, num_steps=10, rounds=1,
                     max_buckets=2, verbose=False)
  widths = [t.config["hidden"] for t in result.trials]
  assert sorted(np.unique(widths, return_counts=True)[1]) == [3, 3]  # 2 widths, spread evenly
  assert result.stats.programs_compiled <= 2


def test_zoom_rounds_sample_inside_shrinking_regions():
  # Least squares with SGD: too small a learning rate barely moves, too large
  # diverges; the good region is a narrow band zoom must find.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 8)).astype(np.float32)
  y = (x @ rng.normal(size=8) + 0.1 * rng.normal(size=256)).astype(np.float32)
  space = {"learning_rate": vt.loguniform(1e-6, 10.0), "hidden": 8}
  result = vt.search(lambda c, rngs: Regressor(8, c["hidden"], rngs), (x, y), space,
                     optimizer=optax.sgd, num_configs=8, num_steps=60, rounds=3, seed=0, verbose=False)
  widths = [r.numeric["learning_rate"][1] - r.numeric["learning_rate"][0] for r in result.regions]
  assert widths[0] > widths[1] > widths[2]
  for t in result.trials:
    assert result.regions[t.round].contains(result.space, t.config)
  best0 = min(t.score for t in result.trials if t.round == 0 and t.status == "ok")
  best_zoom = min(t.score for t in result.trials if t.round > 0 and t.status == "ok")
  assert best_zoom < best0


def test_grid_sampler(small_digits):
  space = {"learning_rate": vt.loguniform(1e-3, 1e-1), "b1": vt.uniform(0.5, 0.9)}
  result = vt.search(mlp_fn, small_digits, space, num_configs=9, num_steps=5, rounds=1,
                     sampler="grid", verbose=False)
  assert len(result.trials) == 9
  assert len({t.config["learning_rate"] for t in result.trials}) == 3


def _linear_task(n=200, d=6, seed=2):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x, (x @ rng.normal(size=d)).astype(np.float32)


def _linear_fn(config, rngs):
  return nnx.Linear(6, 1, rngs=rngs)


def test_divergent_lane_is_isolated():
  # SGD on least squares with a huge step size blows up geometrically to inf/NaN.
  data = _linear_task()
  base = [{"learning_rate": 0.01}, {"learning_rate": 0.003}, {"learning_rate": 0.001}]
  kw = dict(optimizer=optax.sgd, num_configs=4, num_steps=30, rounds=1, verbose=False)
  space = {"learning_rate": vt.loguniform(1e-4, 1e6)}
  bad = vt.search(_linear_fn, data, space, enqueue=[{"learning_rate": 1e6}] + base, **kw)
  good = vt.search(_linear_fn, data, space, enqueue=[{"learning_rate": 1e-3}] + base, **kw)
  t0 = bad.trials[0]
  assert t0.status == "diverged" and t0.score == math.inf and t0.diverged_at is not None
  assert 0 <= t0.diverged_at < 30
  assert bad.best_trial.id != 0 and math.isfinite(bad.best_score)
  for a, b in zip(bad.trials[1:], good.trials[1:]):
    assert a.status == "ok" and a.score == b.score  # bit for bit: the NaN lane leaks nothing
    np.testing.assert_array_equal(a.curve, b.curve)
  # The frozen lane keeps its last finite parameters.
  frozen = bad.retrain(t0)
  assert frozen.status == "diverged"
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(frozen.params))


def test_accuracy_diverged_scores_minus_inf(small_digits):
  space = {"learning_rate": vt.loguniform(1e-4, 1e30)}
  r = vt.search(mlp_fn, small_digits, space, optimizer=optax.sgd, metric="accuracy",
                enqueue=[{"learning_rate": 1e30}], num_configs=4, num_steps=10, rounds=1, verbose=False)
  assert r.trials[0].status == "diverged" and r.trials[0].score == -math.inf
  assert r.best_trial.id != 0


def test_all_diverged_is_a_clear_error():
  with pytest.raises(vt.AllDivergedError, match="diverged") as info:
    vt.search(_linear_fn, _linear_task(), {"learning_rate": vt.loguniform(1e8, 1e9)}, optimizer=optax.sgd,
              num_configs=4, num_steps=10, rounds=2, verbose=False)
  assert len(info.value.trials) == 4


def test_optimizer_routing(small_digits):
  # A tiny learning rate barely moves the model; a moderate one trains it.
  tiny = vt.train(mlp_fn, small_digits, {"learning_rate": 1e-9}, num_steps=30, verbose=False)
  moderate = vt.train(mlp_fn, small_digits, {"learning_rate": 1e-2}, num_steps=30, verbose=False)
  assert abs(tiny.curve[-1] - tiny.curve[0]) < 1e-4
  assert moderate.score < tiny.score - 0.5
  # SGD's momentum, injected per lane, changes what SGD does.
  space = {"learning_rate": 0.02, "momentum": vt.reverse_loguniform(0.5, 0.95)}
  r = vt.search(mlp_fn, small_digits, space, optimizer=optax.sgd, num_configs=4, num_steps=20,
                rounds=1, verbose=False)
  assert len({t.config["momentum"] for t in r.trials}) == 4
  assert len({t.score for t in r.trials}) == 4  # same learning rate, seeds aside: momentum acts
  assert all(np.asarray(r.retrain(t).curve).std() > 0 for t in r.trials[:1])


def test_epochs_budget_gives_equal_examples(small_digits):
  space = {**LR, "batch_size": vt.choice([16, 32])}
  r = vt.search(mlp_fn, small_digits, space, epochs=1, num_configs=4, rounds=1, verbose=False)
  n_train = 600 - 120
  for t in r.trials:
    assert t.steps == n_train // t.config["batch_size"]


def test_regression_head_is_squeezed_not_broadcast():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 5)).astype(np.float32)
  y = (x.sum(axis=1) * 0.5).astype(np.float32)
  data = {"train": (x[60:], y[60:]), "val": (x[:60], y[:60])}
  r = vt.search(lambda c, rngs: Regressor(5, 16, rngs), data, LR, num_configs=4, num_steps=50,
                rounds=1, verbose=False)
  pred = np.asarray(r.best_model()(x[:60]))
  assert pred.shape == (60, 1)
  assert r.best_score == pytest.approx(float(np.mean((pred[:, 0] - y[:60]) ** 2)), rel=1e-5)


def test_callable_metric_and_direction(small_digits):
  def agree(out, y):
    return (jax.numpy.argmax(out, -1) == y).astype(jax.numpy.float32)

  data = _split(small_digits)
  high = vt.search(mlp_fn, data, LR, metric=agree, direction="maximize", num_configs=4,
                   num_steps=20, rounds=1, verbose=False)
  assert high.metric == "agree" and high.maximize
  assert high.best_score == max(t.score for t in high.trials)
  x_val, y_val = data["val"]
  assert _val_accuracy(high.best_model()(x_val), y_val) == pytest.approx(high.best_score, abs=1e-6)
  with pytest.raises(ValueError, match="direction"):
    vt.search(mlp_fn, data, LR, metric=agree, direction="up", num_configs=4, num_steps=20, verbose=False)


# --------------------------------------------------------------------------
# Bad input: a clear error, before anything compiles
# --------------------------------------------------------------------------


@pytest.fixture
def no_compile(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("compiled before validating the input")

  monkeypatch.setattr(_program.Program, "compile", refuse)


def _bad_model(config, rngs):
  raise RuntimeError("boom")


def _warmup_cosine(peak_lr):  # optax's schedule branches on its peak: it cannot take a traced one
  return optax.adam(optax.warmup_cosine_decay_schedule(0.0, peak_lr, 10, 100))


class NeedsMask(nnx.Module):
  def __init__(self, rngs):
    self.l = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x, mask):
    return self.l(x) * mask


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(space={}), ValueError, "space.*empty"),
        (dict(num_configs=0), ValueError, "num_configs"),
        (dict(num_configs=2.5), TypeError, "num_configs"),
        (dict(data=(np.zeros((10, 64), np.float32), np.zeros(9, np.int32))), ValueError, "same number"),
        (dict(data=(np.zeros((0, 64), np.float32), np.zeros(0, np.int32))), ValueError, "empty"),
        (dict(data=(np.full((10, 64), np.nan, np.float32), np.zeros(10, np.int32))), ValueError, "NaN"),
        (dict(space={**LR, "batch_size": vt.choice([16, 4096])}), ValueError, "batch_size.*4096"),
        (dict(data=(np.zeros((2, 64), np.float32), np.zeros(2, np.int32)), val_fraction=0.1), ValueError, "validation split"),
        (dict(metric="f1"), ValueError, "metric"),
        (dict(model_fn=lambda: None), TypeError, "model_fn"),
        (dict(model_fn=lambda a, b, c: None), TypeError, "model_fn"),
        (dict(model_fn=_bad_model), ValueError, r"boom.*learning_rate|model_fn raised RuntimeError"),
        (dict(model_fn=lambda c, rngs: "nope"), TypeError, "nnx.Module"),
        (dict(model_fn=lambda c, rngs: MLP(8, 1, rngs, dout=3)), ValueError, "3 classes"),
        (dict(model_fn=lambda c, rngs: NeedsMask(rngs)), TypeError, "mask"),
        (dict(optimizer="adam"), TypeError, "optimizer"),
        (dict(space={"b1": vt.uniform(0.8, 0.9)}), ValueError, "learning_rate"),
        (dict(sampler="sobel"), ValueError, "sampler"),
        (dict(num_steps=10, epochs=1), ValueError, "either"),
        (dict(keep=0.0), ValueError, "keep"),
        (dict(lr_schedule="cosine"), ValueError, "lr_schedule"),
        (dict(enqueue=[{"learning_rate": 5.0}]), ValueError, "outside"),
        (dict(metric="accuracy", data=(np.zeros((20, 64), np.float32), np.zeros(20, np.float32))), ValueError, "accuracy"),
        # A built optimizer cannot take the space's learning rate, nor a key choose the optimizer: the key would
        # reach model_fn and change nothing.
        (dict(optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))), ValueError,
         r"space\['learning_rate'\].*built optax.GradientTransformation.*factory"),
        (dict(space={**LR, "optimizer": vt.choice([optax.adam, optax.sgd])}), ValueError, r"space\['optimizer'\]"),
        (dict(space={"learning_rate": (1e-4, 1e-1)}), TypeError, r"tuple.*vt.loguniform\(0.0001, 0.1\)"),
        (dict(space={"learning_rate": "1e-3"}), TypeError, "the number 0.001"),
        (dict(loss_fn=lambda out, y: (out.argmax(-1) != y).astype(np.int32)), TypeError, "floating-point"),
        (dict(model_fn=MLP(8, 1, nnx.Rngs(0))), TypeError, r"built MLP.*lambda config, rngs"),
        (dict(space={"learning_rate": vt.uniform(-1e-2, 1e-2)}), ValueError, "negative rate"),
        (dict(checkpoint_dir=__file__), ValueError, "`checkpoint_dir` .* is a file"),
        (dict(model_fn=lambda c, rngs: MLP(8, 1, rngs, dout=1),
              data=(np.zeros((20, 64), np.float32), np.arange(20, dtype=np.int32) % 2)), ValueError,
         "sigmoid_binary_cross_entropy"),
        (dict(optimizer=_warmup_cosine, space={"peak_lr": vt.loguniform(1e-3, 1e-1)}), ValueError,
         "traced per-lane arrays.*join_schedules"),
    ],
)
def test_bad_input_raises_before_compiling(no_compile, small_digits, kwargs, err, match):
  args = dict(model_fn=mlp_fn, data=small_digits, space=LR, num_steps=5, num_configs=4, verbose=False)
  args.update(kwargs)
  with pytest.raises(err, match=match):
    vt.search(args.pop("model_fn"), args.pop("data"), args.pop("space"), **args)


def _accuracy(out, y):
  return (out.argmax(-1) == y).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # A typo (or another library's name) for an optimizer argument goes to model_fn: warned.
        (dict(space={**LR, "weight_decy": vt.loguniform(1e-5, 1e-2)}, optimizer=optax.adamw), "did you mean 'weight_decay'"),
        (dict(space={**LR, "beta1": 0.9}), "did you mean 'b1'"),
        # A callable metric is minimized unless told: one named like accuracy is warned.
        (dict(metric=lambda out, y: out[:, 0]), None),
        (dict(metric=_accuracy), "'_accuracy' is minimized"),
        (dict(lr_schedule="exponential"), "changes nothing without 'lr_decay'"),
        # Not typos: a name of its own built on an optimizer argument's; a norm's eps beside a built optimizer.
        (dict(space={**LR, "bn_momentum": 0.9, "epsilon": 1e-5}, optimizer=optax.sgd), None),
        (dict(space={"eps": vt.choice([1e-5, 1e-3])}, optimizer=optax.adam(1e-3)), "space['eps'] goes to model_fn"),
    ],
)
def test_likely_mistakes_warn_before_compiling(no_compile, small_digits, kwargs, match):
  import warnings

  with warnings.catch_warnings(record=True) as caught, pytest.raises(AssertionError, match="compiled before"):
    warnings.simplefilter("always")
    vt.search(mlp_fn, small_digits, kwargs.pop("space", LR), num_steps=5, num_configs=2, verbose=False, **kwargs)
  texts = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  assert (any(match.lower() in t.lower() for t in texts) if match else not texts), texts


def test_model_fn_error_names_the_config(no_compile, small_digits):
  def picky(config, rngs):
    if config["hidden"] == 16:
      raise ValueError("hidden=16 is not supported")
    return MLP(config["hidden"], 1, rngs)

  with pytest.raises(ValueError, match=r"'hidden': 16.*not supported|not supported.*'hidden': 16"):
    vt.search(picky, small_digits, {**LR, "hidden": 16}, num_configs=2, num_steps=5, verbose=False)


def test_a_factory_argument_with_a_tuple_default_takes_a_tuple():
  # Only numeric optimizer arguments are checked for ranges written as tuples:
  # a factory whose argument is a tuple (PyTorch's betas) gets the constant as it is.
  from vmaptune import _routing

  def adam_betas(learning_rate, betas=(0.9, 0.999)):
    return optax.adam(learning_rate, *betas)

  routing = _routing.route({"learning_rate": 1e-3, "betas": (0.9, 0.99)}, adam_betas, "inverse_time")
  assert "betas" in routing.static_opt and "learning_rate" in routing.injected
  with pytest.raises(TypeError, match=r"vt.loguniform\(0.0001, 0.1\)"):
    _routing.route({"learning_rate": (1e-4, 1e-1)}, adam_betas, "inverse_time")
