"""The two forms of a loss and a metric, model-aware state and rng streams, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import vmaptune as vt

from _models import mlp_fn

LR = {"learning_rate": vt.loguniform(1e-3, 1e-2)}
KW = dict(num_configs=4, num_steps=20, rounds=1, seed=0, verbose=False)


def ce(model, batch):
  """An NNX-tutorial loss: the model and a dict batch in, (loss, logits) out."""
  logits = model(batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, logits


def batch_of(data):
  x, y = data
  return {"image": x, "label": y}


class Norm(nnx.Module):
  """BatchNorm statistics (written in training) and a sown intermediate."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.l2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    h = self.bn(self.l1(x))
    self.sow(nnx.Intermediate, "hidden_norm", jnp.mean(h ** 2))
    return self.l2(nnx.relu(h))


@pytest.mark.filterwarnings(r"ignore:Using .Module.sow\(\). outside")
def test_model_aware_loss_with_a_dict_batch_and_state(small_digits):
  r = vt.search(lambda c, rngs: Norm(rngs), batch_of(small_digits), LR, model_loss=ce, **KW)
  assert all(t.status == "ok" for t in r.trials) and r.metric == "loss"
  # BatchNorm statistics were written per lane in training; the sown value never reached the state.
  model = r.best_model()
  assert np.abs(np.asarray(model.bn.mean[...])).max() > 0
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))
  again = r.retrain()
  assert again.score == r.best_score
  np.testing.assert_array_equal(again.curve, r.best_trial.curve)


def test_model_metric_and_direction(small_digits):
  def accuracy(model, batch):
    return (jnp.argmax(model(batch["image"]), -1) == batch["label"]).astype(jnp.float32)

  r = vt.search(mlp_fn, batch_of(small_digits), {**LR, "hidden": 16}, model_loss=ce, model_metric=accuracy,
                direction="maximize", **KW)
  assert r.maximize and r.metric == "accuracy" and 0.0 < r.best_score <= 1.0
  assert r.best_score == max(t.score for t in r.trials)


def test_a_model_aware_loss_may_differentiate_the_model(small_digits):
  # A gradient penalty (as a PINN's residual): jax.grad of the model's output
  # with respect to its input, inside the loss.
  def penalised(model, batch):
    x, y = batch
    logits = model(x)
    slope = jax.vmap(jax.grad(lambda xi: model(xi[None])[0].sum()))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y) + 1e-3 * jnp.sum(slope ** 2, axis=1)

  r = vt.search(mlp_fn, small_digits, {**LR, "hidden": 8}, model_loss=penalised, **KW)
  assert all(np.isfinite(t.score) for t in r.trials)
  assert r.best_trial.curve[-1] < r.best_trial.curve[0]


class Noisy(nnx.Module):
  """Draws from a stream it names itself (``rngs.noise()``), in training and evaluation."""

  def __init__(self, rngs):
    self.l = nnx.Linear(64, 10, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x):
    return self.l(x) + 0.1 * jax.random.normal(self.rngs.noise(), (x.shape[0], 10))


def test_named_rng_streams_are_per_lane_per_step_and_replay(small_digits):
  space = {"learning_rate": vt.loguniform(3e-3, 3e-3 * (1 + 1e-9))}
  r = vt.search(lambda c, rngs: Noisy(rngs), small_digits, space, **KW)
  assert len({t.score for t in r.trials}) == 4  # one learning rate: only the seeds differ
  assert r.retrain(r.trials[2]).score == r.trials[2].score
  alone = vt.train(lambda c, rngs: Noisy(rngs), small_digits, r.trials[1].config, seed=r.trials[1].seed,
                   num_steps=20, verbose=False)
  np.testing.assert_allclose(alone.curve, r.trials[1].curve, rtol=1e-4)


class LinenNoisy(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(10)(nn.relu(x)) + 0.1 * jax.random.normal(self.make_rng("lstm"), (x.shape[0], 10))


def test_linen_model_aware_loss_gets_a_bound_module_with_the_train_flag(small_digits):
  def loss(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y)

  r = vt.search(lambda c: LinenNoisy(), small_digits, LR, model_loss=loss, **KW)
  assert all(t.status == "ok" for t in r.trials) and len({t.score for t in r.trials}) == 4
  module, variables = r.best_model()
  assert np.abs(np.asarray(jax.tree.leaves(variables["batch_stats"])[0])).max() > 0
  assert r.retrain().score == r.best_score
  # The (outputs, targets) form of the same model: make_rng works there too.
  r2 = vt.search(lambda c: LinenNoisy(), small_digits, LR, **KW)
  assert all(t.status == "ok" for t in r2.trials)


def _wrong_shape(model, batch):
  return model(batch[0])  # (B, 10), not (B,)


def _raises(model, batch):
  raise KeyError("image")


def outputs_first(outputs, targets):
  return (outputs - targets) ** 2


def model_first(model, batch):
  return jnp.zeros(batch[0].shape[0])


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(loss_fn=model_first), TypeError, r"looks like a function of the model.*model_loss="),
        (dict(model_loss=outputs_first), TypeError, r"looks like a function of the model's outputs.*loss_fn="),
        (dict(loss_fn=outputs_first, model_loss=model_first), ValueError, "not both"),
        (dict(model_loss=model_first, model_metric=model_first, metric="accuracy"), ValueError, "not both"),
        (dict(model_loss=_wrong_shape), TypeError, r"`model_loss` must return one value per example.*\(32, 10\)"),
        (dict(model_loss=_raises), ValueError, r"`model_loss` failed .*KeyError"),
        (dict(model_loss=model_first, metric=lambda out, y: out, data="dict"), ValueError, r"\(x, y\) pair"),
        (dict(model_loss=model_first, model_metric=lambda m: 0.0), TypeError, r"model_metric.*\(model, batch\)"),
        (dict(model_loss="ce"), TypeError, "model_loss"),
    ],
)
def test_the_wrong_form_is_a_clear_error_before_compiling(no_compile, small_digits, kwargs, err, match):
  data = batch_of(small_digits) if kwargs.pop("data", None) == "dict" else small_digits
  with pytest.raises(err, match=match):
    vt.search(mlp_fn, data, {**LR, "hidden": 8, "batch_size": 32}, num_configs=2, num_steps=5, verbose=False,
              **kwargs)


def test_model_aware_loss_through_strategies_checkpoints_and_divergence(small_digits, tmp_path, monkeypatch):
  from vmaptune import _faults

  def loss(model, batch):  # NaN-safe: a diverged lane must freeze, not poison the others
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["image"]), batch["label"])

  space = {"learning_rate": vt.loguniform(1e-3, 1e-1), "hidden": 8}
  kw = dict(model_loss=loss, optimizer=optax.sgd, num_configs=4, num_steps=36, rounds=2, seed=1, verbose=False)
  data = batch_of(small_digits)
  # Divergence: one lane with an absurd step size freezes; the others are untouched, bit for bit.
  bad = vt.search(mlp_fn, data, {"learning_rate": vt.loguniform(1e-3, 1e31), "hidden": 8}, model_loss=loss,
                  optimizer=optax.sgd, num_configs=4, num_steps=10, rounds=1, verbose=False,
                  enqueue=[{"learning_rate": 1e30}, {"learning_rate": 1e-2}])
  good = vt.search(mlp_fn, data, {"learning_rate": vt.loguniform(1e-3, 1e31), "hidden": 8}, model_loss=loss,
                   optimizer=optax.sgd, num_configs=4, num_steps=10, rounds=1, verbose=False,
                   enqueue=[{"learning_rate": 1e-3}, {"learning_rate": 1e-2}])
  assert bad.trials[0].status == "diverged" and bad.trials[1].score == good.trials[1].score
  # Halving with a checkpoint, crashed after its second save, resumes to the same trials.
  straight = vt.search(mlp_fn, data, space, strategy="halving", checkpoint_dir=tmp_path / "a", **kw)
  monkeypatch.setenv("VMAPTUNE_FAILPOINT", "halving:saved@2=crash")
  _faults.reset()
  with pytest.raises(_faults.SimulatedCrash):
    vt.search(mlp_fn, data, space, strategy="halving", checkpoint_dir=tmp_path / "b", **kw)
  monkeypatch.delenv("VMAPTUNE_FAILPOINT")
  resumed = vt.search(mlp_fn, data, space, strategy="halving", checkpoint_dir=tmp_path / "b", **kw)
  assert resumed.stats.resumed_from
  assert [(t.id, t.score, t.status) for t in resumed.trials] == [(t.id, t.score, t.status) for t in straight.trials]
  # PBT, save and load.
  pbt = vt.search(mlp_fn, data, space, strategy=vt.PBT(ready=18), **kw)
  loaded = vt.load(pbt.save(tmp_path / "pbt.vmaptune"))
  assert [t.score for t in loaded.trials] == [t.score for t in pbt.trials]
