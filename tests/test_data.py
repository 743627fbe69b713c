"""Pytree data: multi-input models, dict inputs, tuple outputs, per-leaf checks and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vmaptune as vt
from vmaptune import _data

LR = {"learning_rate": vt.loguniform(1e-3, 3e-2)}
KW = dict(num_configs=4, num_steps=20, rounds=1, seed=0, verbose=False)

rng = np.random.default_rng(0)
CAT = rng.integers(0, 5, size=(240, 2)).astype(np.int32)
CONT = rng.normal(size=(240, 3)).astype(np.float32)
TARGET = (CONT.sum(1) + 0.5 * CAT[:, 0]).astype(np.float32)


class Tabular(nnx.Module):
  """Categorical embeddings beside continuous features: two inputs."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(5, 4, rngs=rngs)
    self.head = nnx.Linear(2 * 4 + 3, 1, rngs=rngs)

  def __call__(self, x_cat, x_cont):
    e = self.embed(x_cat).reshape(x_cat.shape[0], -1)
    return self.head(jnp.concatenate([e, x_cont], axis=-1))


def tabular_fn(config, rngs):
  return Tabular(rngs)


def test_tuple_and_dict_inputs_are_the_same_search():
  as_tuple = vt.search(tabular_fn, ((CAT, CONT), TARGET), LR, **KW)
  as_dict = vt.search(tabular_fn, ({"x_cat": CAT, "x_cont": CONT}, TARGET), LR, **KW)
  assert [t.score for t in as_tuple.trials] == [t.score for t in as_dict.trials]
  assert all(t.status == "ok" for t in as_tuple.trials)
  assert as_tuple.retrain().score == as_tuple.best_score
  model = as_tuple.best_model()
  val = _data.prepare_data(((CAT, CONT), TARGET), val_fraction=0.2, seed=0)
  (c, x), y = val.val
  mse = float(np.mean((np.asarray(model(c, x))[:, 0] - y) ** 2))
  assert mse == pytest.approx(as_tuple.best_score, rel=1e-5)


def test_split_is_per_leaf_and_deterministic():
  ds = _data.prepare_data(((CAT, CONT), TARGET), val_fraction=0.25, seed=3)
  assert ds.num_train == 180 and ds.num_val == 60 and ds.task == "regression"
  (c, x), y = ds.train
  # Rows stay together across leaves: the target is a function of both inputs.
  np.testing.assert_allclose(y, x.sum(1) + 0.5 * c[:, 0], rtol=1e-6)
  again = _data.prepare_data(((CAT, CONT), TARGET), val_fraction=0.25, seed=3)
  for a, b in zip(jax.tree.leaves(ds.train), jax.tree.leaves(again.train)):
    np.testing.assert_array_equal(a, b)


def test_python_lists_are_arrays():
  # x.tolist() and y.tolist() are the arrays they came from (a tree of their
  # numbers would be scalar leaves without an example axis); a list of arrays
  # stays several inputs.
  x = CONT.astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  want = _data.prepare_data((x, y), val_fraction=0.25, seed=3)
  for data in ((x.tolist(), y), (x, y.tolist()), [x.tolist(), y.tolist()]):
    got = _data.prepare_data(data, val_fraction=0.25, seed=3)
    assert got.task == "classification"
    for a, b in zip(jax.tree.leaves((want.train, want.val)), jax.tree.leaves((got.train, got.val))):
      np.testing.assert_array_equal(a, b)
  two = _data.prepare_data(([x, x[:, :1]], y), val_fraction=0.25, seed=3)
  assert [a.shape[1] for a in two.train[0]] == [x.shape[1], 1]


class TwoHeads(nnx.Module):
  def __init__(self, rngs):
    self.body = nnx.Linear(64, 16, rngs=rngs)
    self.cls = nnx.Linear(16, 10, rngs=rngs)
    self.aux = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.body(x))
    return self.cls(h), self.aux(h)[:, 0]


def test_tuple_outputs_and_pytree_targets_reach_the_loss_unchanged(small_digits):
  x, y = small_digits
  targets = {"label": y, "mean": x.mean(axis=1)}

  def loss_fn(outputs, targets):
    logits, mean = outputs
    ce = -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), targets["label"]]
    return ce + (mean - targets["mean"]) ** 2

  def label_accuracy(outputs, targets):
    return (jnp.argmax(outputs[0], -1) == targets["label"]).astype(jnp.float32)

  r = vt.search(lambda c, rngs: TwoHeads(rngs), (x, targets), LR, loss_fn=loss_fn, metric=label_accuracy,
                direction="maximize", **KW)
  assert r.maximize and all(0.0 <= t.score <= 1.0 for t in r.trials)
  assert r.retrain().score == r.best_score


def test_scalar_metric_is_exact_over_a_partial_last_chunk(small_digits):
  # 120 validation examples in chunks of 7: 17 whole chunks and 1 example
  # left over. A metric returning one scalar per chunk must be weighted by
  # the examples it covers, never see padding, and equal the per-example form.
  data = {"train": (small_digits[0][120:], small_digits[1][120:]), "val": (small_digits[0][:120], small_digits[1][:120])}

  def per_example(model, batch):
    x, y = batch
    return -jax.nn.log_softmax(model(x))[jnp.arange(y.shape[0]), y]

  def scalar(model, batch):
    return jnp.mean(per_example(model, batch))

  from _models import mlp_fn

  kw = dict(model_loss=per_example, num_steps=10, eval_batch_size=7, verbose=False)
  a = vt.train(mlp_fn, data, {"learning_rate": 3e-3, "hidden": 8}, **kw)
  b = vt.train(mlp_fn, data, {"learning_rate": 3e-3, "hidden": 8}, model_metric=scalar, **kw)
  np.testing.assert_allclose(a.curve, b.curve, rtol=1e-5)


BAD = [
    (dict(data=((CAT, CONT[:200]), TARGET)), ValueError, r"same number of examples.*x\[1\] has 200"),
    (dict(data=(({"x_cat": CAT, "x_cont": np.array(["a"] * 240)}), TARGET)), TypeError, r"x\['x_cont'\].*numbers"),
    (dict(data=(({"x_cat": CAT, "x_cont": np.where(CONT > 2, np.nan, CONT)}), TARGET)), ValueError,
     r"x\['x_cont'\] holds NaN"),
    (dict(data=((CAT, CONT, CONT), TARGET)), TypeError, r"takes 2 input\(s\) but `x` is a tuple of 3"),
    (dict(data=({"x_cat": CAT, "cont": CONT}, TARGET)), TypeError, r"no argument\(s\) \['cont'\]"),
    (dict(data={"x_cat": CAT, "x_cont": CONT, "y": TARGET}), ValueError, r"model_loss="),
    (dict(data=((CAT, CONT), {"a": TARGET, "b": TARGET})), ValueError, "no default loss"),
    (dict(data=((CAT, CONT), {"a": CAT[:, 0], "b": TARGET}), metric="accuracy",
          loss_fn=lambda out, t: (out[:, 0] - t["b"]) ** 2), ValueError, "accuracy"),
    (dict(model_fn=lambda c, rngs: TwoHeads(rngs), data=(np.zeros((240, 64), np.float32), TARGET)), TypeError,
     "returns tuple, not one array"),
    (dict(data=((CAT[:0], CONT[:0]), TARGET[:0])), ValueError, "empty"),
]


@pytest.mark.parametrize("kwargs, err, match", BAD)
def test_bad_pytree_data_is_a_clear_error_before_compiling(no_compile, kwargs, err, match):
  args = dict(model_fn=tabular_fn, data=((CAT, CONT), TARGET), space=LR, num_steps=5, num_configs=2, verbose=False)
  args.update(kwargs)
  with pytest.raises(err, match=match):
    vt.search(args.pop("model_fn"), args.pop("data"), args.pop("space"), **args)


class PerStep(nnx.Module):
  def __init__(self, rngs):
    self.l = nnx.Linear(3, 5, rngs=rngs)

  def __call__(self, x):
    return self.l(x)  # (batch, time, classes)


def test_integer_targets_per_time_step_take_a_loss_of_their_own():
  # Per-token labels (n, T) are class indices too, but not (n,): no default loss, and no refusal either.
  x = rng.normal(size=(120, 4, 3)).astype(np.float32)
  y = (x.sum(-1) > 0).astype(np.int32) * 2  # (n, 4), values in {0, 2}
  import optax

  def per_token(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean(-1)

  r = vt.search(lambda c, rngs: PerStep(rngs), (x, y), LR, loss_fn=per_token, **KW)
  assert all(t.status == "ok" for t in r.trials)
  with pytest.raises(ValueError, match="no default loss"):
    vt.search(lambda c, rngs: PerStep(rngs), (x, y), LR, **KW)
