"""Real training code, written the way its authors write it, handed to vmaptune unchanged.

Each model and loss below imitates a Flax example or tutorial (the NNX toy
VAE, the Linen VAE and seq2seq examples, the NNX basics MLP and the NNX MNIST
tutorial's loss) or a common
pattern (a PINN, a tabular model with embeddings), shrunk to run in seconds:
pytree data, multi-input models, tuple outputs, model-aware losses that pop
variables or differentiate the model w.r.t. its inputs, and rng streams of any
name. One example is checked against a plain optax loop written here.
"""

import itertools
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax import random

import vmaptune as vt
from vmaptune import _lane


def _finite_ok(result):
  for t in result.trials:
    assert t.status == "ok", t
    assert np.isfinite(t.score) and np.all(np.isfinite(t.curve)) and np.all(np.isfinite(t.train_curve)), t


# ---------------------------------------------------------------------------
# 1. NNX VAE, as flax/examples/nnx_toy_examples/05_vae.py writes it: the
#    encoder stores its KL term as a `Loss` variable and draws from
#    `self.rngs.noise()`; the train-step loss pops the `Loss` variables.
# ---------------------------------------------------------------------------


class Loss(nnx.Variable):
  pass


class Encoder(nnx.Module):
  def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
    self.linear_mean = nnx.Linear(dmid, dout, rngs=rngs)
    self.linear_std = nnx.Linear(dmid, dout, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))  # flatten
    x = self.linear1(x)
    x = jax.nn.relu(x)

    mean = self.linear_mean(x)
    std = jnp.exp(self.linear_std(x))

    self.kl_loss = Loss(
        jnp.mean(
            0.5 * jnp.mean(-jnp.log(std**2) - 1.0 + std**2 + mean**2, axis=-1)
        )
    )
    key = self.rngs.noise()
    z = mean + std * jax.random.normal(key, mean.shape)
    return z


class Decoder(nnx.Module):
  def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
    self.linear2 = nnx.Linear(dmid, dout, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    z = self.linear1(z)
    z = jax.nn.relu(z)
    logits = self.linear2(z)
    return logits


class VAE(nnx.Module):
  def __init__(
      self,
      din: int,
      hidden_size: int,
      latent_size: int,
      output_shape: tp.Sequence[int],
      *,
      rngs: nnx.Rngs,
  ):
    self.output_shape = output_shape
    self.encoder = Encoder(din, hidden_size, latent_size, rngs=rngs)
    self.decoder = Decoder(
        latent_size, hidden_size, int(np.prod(output_shape)), rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    z = self.encoder(x)
    logits = self.decoder(z)
    logits = jnp.reshape(logits, (-1, *self.output_shape))
    return logits

  def generate(self, z):
    logits = self.decoder(z)
    logits = jnp.reshape(logits, (-1, *self.output_shape))
    return nnx.sigmoid(logits)


def nnx_vae_fn(config, rngs):
  return VAE(din=64, hidden_size=config["hidden_size"], latent_size=config["latent_size"],
             output_shape=(8, 8), rngs=rngs)


def nnx_vae_loss(model: VAE, x: jax.Array):
  """The toy example's train-step loss, verbatim."""
  logits = model(x)
  losses = nnx.pop(model, Loss)
  kl_loss = sum(jax.tree_util.tree_leaves(losses), 0.0)
  reconstruction_loss = jnp.mean(
      optax.sigmoid_binary_cross_entropy(logits, x)
  )
  loss = reconstruction_loss + 0.1 * kl_loss
  return loss


VAE_STEPS = 30
VAE_SPACE = {"learning_rate": vt.loguniform(3e-3, 3e-2), "hidden_size": 16, "latent_size": 4, "batch_size": 50}
VAE_PINNED = {"learning_rate": 1e-2}


@pytest.fixture(scope="module")
def binary_images(small_digits):
  """Binarized 8x8 digits as images, (n, 8, 8), split by hand: a single-array batch."""
  x, _ = small_digits
  images = (x.reshape(-1, 8, 8) > 0.5).astype(np.float32)
  return {"train": images[100:], "val": images[:100]}


@pytest.fixture(scope="module")
def nnx_vae_result(binary_images):
  # Lane 0 holds a pinned config (reused by the lane-equivalence test); lanes
  # 1 and 2 hold one config twice, so they differ only in their trial seed.
  same = {"learning_rate": 5e-3}
  return vt.search(nnx_vae_fn, binary_images, VAE_SPACE, model_loss=nnx_vae_loss, num_configs=4,
                   num_steps=VAE_STEPS, rounds=1, seed=7, enqueue=[VAE_PINNED, same, same], verbose=False)


def test_nnx_vae_trains_and_replays(nnx_vae_result):
  result = nnx_vae_result
  _finite_ok(result)
  assert len(result.trials) == 4
  for t in result.trials:
    # The ELBO-style loss falls on held-out images for every learning rate.
    assert t.curve[-1] < 0.9 * t.curve[0], t
    assert t.train_curve[-1] < t.train_curve[0], t
  best = result.best_trial
  assert best.score == min(t.score for t in result.trials)
  run = result.retrain(best)
  assert run.score == best.score
  np.testing.assert_array_equal(run.curve, best.curve)
  np.testing.assert_array_equal(run.train_curve, best.train_curve)


def test_nnx_vae_noise_stream_is_per_lane_and_advances(nnx_vae_result, binary_images):
  result = nnx_vae_result
  a, b = result.trials[1], result.trials[2]
  assert a.config == b.config and a.seed != b.seed
  assert a.score != b.score and not np.array_equal(a.curve, b.curve)

  # `rngs.noise()` falls back to the default stream of the Rngs given to
  # model_fn: one draw per training step, kept in the lane's state.
  model_a, model_b = result.retrain(a).model(), result.retrain(b).model()
  assert int(model_a.encoder.rngs.default.count[...]) == VAE_STEPS
  assert int(model_b.encoder.rngs.default.count[...]) == VAE_STEPS
  key_a = jax.random.key_data(model_a.encoder.rngs.default.key[...])
  key_b = jax.random.key_data(model_b.encoder.rngs.default.key[...])
  assert not np.array_equal(np.asarray(key_a), np.asarray(key_b))

  # The trained model, as the user gets it: its own loss on the validation
  # images reproduces the search's score (the noise drawn at the same count),
  # and the next draw of the noise stream changes it: the noise matters.
  best = result.best_model()
  assert isinstance(best, VAE)
  assert not nnx.state(best, Loss)  # the popped KL variable was not kept
  x_val = binary_images["val"]
  vae_loss = nnx.jit(nnx_vae_loss)
  first = float(vae_loss(best, x_val))
  assert first == pytest.approx(result.best_score, rel=1e-5)
  second = float(vae_loss(best, x_val))
  assert int(best.encoder.rngs.default.count[...]) == VAE_STEPS + 2
  assert abs(second - first) > 1e-4
  assert best.generate(jnp.zeros((3, 4))).shape == (3, 8, 8)


# 7. Lane equivalence for the model-aware VAE: a config's numbers depend on
#    its config and seed alone, not on the population's size or neighbours.
def test_nnx_vae_lane_equivalence(nnx_vae_result, binary_images):
  small = nnx_vae_result
  wide_space = {**VAE_SPACE, "learning_rate": vt.loguniform(1e-3, 1e-1)}
  large = vt.search(nnx_vae_fn, binary_images, wide_space, model_loss=nnx_vae_loss, num_configs=8,
                    num_steps=VAE_STEPS, rounds=1, seed=7, enqueue=[VAE_PINNED], verbose=False)
  a, b = small.trials[0], large.trials[0]
  assert a.config == b.config and a.config["learning_rate"] == VAE_PINNED["learning_rate"]
  assert a.seed == b.seed
  neighbours = lambda r: {t.config["learning_rate"] for t in r.trials[1:]}
  assert not neighbours(small) & neighbours(large)
  assert a.score == b.score
  np.testing.assert_array_equal(a.curve, b.curve)
  np.testing.assert_array_equal(a.train_curve, b.train_curve)

  # A single run (no vmap) of the same config and seed: the same to rounding.
  run = vt.train(nnx_vae_fn, binary_images, a.config, model_loss=nnx_vae_loss, seed=a.seed,
                 num_steps=VAE_STEPS, verbose=False)
  assert run.status == "ok"
  np.testing.assert_array_equal(run.curve_steps, a.curve_steps)
  np.testing.assert_allclose(run.curve, a.curve, rtol=1e-4)
  np.testing.assert_allclose(run.train_curve, a.train_curve, rtol=1e-4)


# ---------------------------------------------------------------------------
# 2. Linen VAE, as flax/examples/vae writes it: the model returns
#    (recon_x, mean, logvar) and takes the reparameterisation key as `z_rng`.
#    (Widths shrunk: 500 -> 32 hidden units, 784 -> 64 pixels.)
# ---------------------------------------------------------------------------


class LinenEncoder(nn.Module):
  """VAE Encoder."""

  latents: int
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden, name='fc1')(x)
    x = nn.relu(x)
    mean_x = nn.Dense(self.latents, name='fc2_mean')(x)
    logvar_x = nn.Dense(self.latents, name='fc2_logvar')(x)
    return mean_x, logvar_x


class LinenDecoder(nn.Module):
  """VAE Decoder."""

  hidden: int = 32
  pixels: int = 64

  @nn.compact
  def __call__(self, z):
    z = nn.Dense(self.hidden, name='fc1')(z)
    z = nn.relu(z)
    z = nn.Dense(self.pixels, name='fc2')(z)
    return z


class LinenVAE(nn.Module):
  """Full VAE model."""

  latents: int = 20

  def setup(self):
    self.encoder = LinenEncoder(self.latents)
    self.decoder = LinenDecoder()

  def __call__(self, x, z_rng):
    mean, logvar = self.encoder(x)
    z = reparameterize(z_rng, mean, logvar)
    recon_x = self.decoder(z)
    return recon_x, mean, logvar

  def generate(self, z):
    return nn.sigmoid(self.decoder(z))


def reparameterize(rng, mean, logvar):
  std = jnp.exp(0.5 * logvar)
  eps = random.normal(rng, logvar.shape)
  return mean + eps * std


@jax.vmap
def kl_divergence(mean, logvar):
  return -0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar))


@jax.vmap
def binary_cross_entropy_with_logits(logits, labels):
  logits = nn.log_sigmoid(logits)
  return -jnp.sum(labels * logits + (1. - labels) * jnp.log(-jnp.expm1(logits)))


def linen_vae_fn(config):
  return LinenVAE(latents=config["latents"])


def vae_elbo(outputs, targets):
  """Per-example negative ELBO of the model's (recon_x, mean, logvar)."""
  recon_x, mean, logvar = outputs
  return binary_cross_entropy_with_logits(recon_x, targets) + kl_divergence(mean, logvar)


def linen_vae_model_loss(model, batch):
  """The example's train-step loss, the key drawn from the model's own rng."""
  recon_x, mean, logvar = model(batch, model.make_rng("noise"))
  bce_loss = binary_cross_entropy_with_logits(recon_x, batch).mean()
  kld_loss = kl_divergence(mean, logvar).mean()
  loss = bce_loss + kld_loss
  return loss, recon_x


LINEN_VAE_STEPS = 30


@pytest.fixture(scope="module")
def flat_binary_images(binary_images):
  return {k: v.reshape(-1, 64) for k, v in binary_images.items()}


@pytest.fixture(scope="module")
def linen_vae_result(flat_binary_images):
  data = {k: (v, v) for k, v in flat_binary_images.items()}
  return vt.search(linen_vae_fn, data, {"learning_rate": vt.loguniform(2e-3, 1e-2), "latents": 4,
                                        "batch_size": 50},
                   loss_fn=vae_elbo, num_configs=4, num_steps=LINEN_VAE_STEPS, rounds=1, seed=3, verbose=False)


def test_linen_vae_with_tuple_outputs_and_z_rng(linen_vae_result, flat_binary_images):
  result = linen_vae_result
  _finite_ok(result)
  for t in result.trials:
    assert t.curve[-1] < 0.9 * t.curve[0], t
  best = result.best_trial
  assert result.retrain(best).score == best.score
  # The trained model, as flax/examples/vae evaluates it.
  module, variables = result.best_model()
  assert set(variables) == {"params"}
  x_val = flat_binary_images["val"]
  elbo = float(jax.jit(lambda v, x: vae_elbo(module.apply(v, x, random.key(0)), x).mean())(variables, x_val))
  # Another draw of the noise than the search's: close, not equal.
  assert elbo == pytest.approx(best.score, rel=0.05)
  assert module.apply(variables, jnp.zeros((2, 4)), method=LinenVAE.generate).shape == (2, 64)


def test_linen_vae_with_a_model_aware_loss(linen_vae_result, flat_binary_images):
  best = linen_vae_result.best_trial
  # The same config and seed (same init, same mini-batches), the loss written
  # as a train step writes it: only the noise keys differ from the lane's.
  run = vt.train(linen_vae_fn, flat_binary_images, best.config, model_loss=linen_vae_model_loss, seed=best.seed,
                 num_steps=LINEN_VAE_STEPS, verbose=False)
  assert run.status == "ok" and np.all(np.isfinite(run.curve))
  assert run.curve[-1] < 0.9 * run.curve[0]
  np.testing.assert_allclose(run.curve, best.curve, rtol=0.05)
  # The trained model with the user's own loss, applied the plain Flax way.
  module, variables = run.model()
  x_val = flat_binary_images["val"]
  loss, recon_x = jax.jit(lambda v, x: nn.apply(linen_vae_model_loss, module)(v, x, rngs={"noise": random.key(0)}))(
      variables, x_val)
  assert recon_x.shape == x_val.shape
  assert float(loss) == pytest.approx(run.score, rel=0.05)


# ---------------------------------------------------------------------------
# 3. Linen seq2seq, as flax/examples/seq2seq writes it: an LSTM encoder and a
#    teacher-forced LSTM decoder whose cell samples with make_rng('lstm');
#    the model returns (logits, predictions). Task: reverse 4 digits.
# ---------------------------------------------------------------------------

Array = jax.Array
LSTMCarry = tuple[Array, Array]


class DecoderLSTMCell(nn.RNNCellBase):
  """DecoderLSTM Module wrapped in a lifted scan transform."""

  features: int
  teacher_force: bool
  vocab_size: int

  @nn.compact
  def __call__(
      self, carry: tuple[LSTMCarry, Array], x: Array
  ) -> tuple[tuple[LSTMCarry, Array], tuple[Array, Array]]:
    """Applies the DecoderLSTM model."""
    lstm_state, last_prediction = carry
    if not self.teacher_force:
      x = last_prediction
    lstm_state, y = nn.LSTMCell(self.features)(lstm_state, x)
    logits = nn.Dense(features=self.vocab_size)(y)
    # Sample the predicted token using a categorical distribution over the
    # logits.
    categorical_rng = self.make_rng('lstm')
    predicted_token = jax.random.categorical(categorical_rng, logits)
    # Convert to one-hot encoding.
    prediction = jax.nn.one_hot(
        predicted_token, self.vocab_size, dtype=jnp.float32
    )

    return (lstm_state, prediction), (logits, prediction)

  @property
  def num_feature_axes(self) -> int:
    return 1


class Seq2seq(nn.Module):
  """Sequence-to-sequence class using encoder/decoder architecture."""

  teacher_force: bool
  hidden_size: int
  vocab_size: int
  eos_id: int = 1

  @nn.compact
  def __call__(
      self, encoder_inputs: Array, decoder_inputs: Array
  ) -> tuple[Array, Array]:
    """Applies the seq2seq model."""
    # Encode inputs.
    encoder = nn.RNN(
        nn.LSTMCell(self.hidden_size), return_carry=True, name='encoder'
    )
    decoder = nn.RNN(
        DecoderLSTMCell(
            decoder_inputs.shape[-1], self.teacher_force, self.vocab_size
        ),
        split_rngs={'params': False, 'lstm': True},
        name='decoder',
    )

    seq_lengths = self.get_seq_lengths(encoder_inputs)

    encoder_state, _ = encoder(encoder_inputs, seq_lengths=seq_lengths)
    logits, predictions = decoder(
        decoder_inputs[:, :-1],
        initial_carry=(encoder_state, decoder_inputs[:, 0]),
    )

    return logits, predictions

  def get_seq_lengths(self, inputs: Array) -> Array:
    """Get segmentation mask for inputs."""
    # undo one-hot encoding
    inputs = jnp.argmax(inputs, axis=-1)
    # calculate sequence lengths
    seq_lengths = jnp.argmax(inputs == self.eos_id, axis=-1)

    return seq_lengths


GO, EOS, VOCAB, SEQ_LEN = 0, 1, 6, 4  # tokens 2..5 are the digits


def reversal_task(n, seed):
  """x = (encoder_inputs, decoder_inputs), y = the reversed digits, all one-hot
  as in the example: the decoder reads GO t0 t1 t2 (teacher forcing) and
  predicts t0 t1 t2 t3."""
  rng = np.random.default_rng(seed)
  digits = rng.integers(2, VOCAB, size=(n, SEQ_LEN))
  targets = digits[:, ::-1]
  query = np.concatenate([digits, np.full((n, 1), EOS)], axis=1)         # d0 d1 d2 d3 EOS
  answer = np.concatenate([np.full((n, 1), GO), targets], axis=1)        # GO t0 t1 t2 t3
  one_hot = lambda a: np.eye(VOCAB, dtype=np.float32)[a]
  return (one_hot(query), one_hot(answer)), one_hot(answer)[:, 1:]


def seq2seq_fn(config):
  return Seq2seq(teacher_force=True, hidden_size=config["hidden_size"], vocab_size=VOCAB, eos_id=EOS)


def sequence_cross_entropy(outputs, labels):
  """Per-example cross-entropy, averaged over the sequence (one-hot labels)."""
  logits, _ = outputs
  return -jnp.mean(jnp.sum(nn.log_softmax(logits) * labels, axis=-1), axis=-1)


def sequence_accuracy(outputs, labels):
  # Computes sequence accuracy, which is the same as the accuracy during
  # inference, since teacher forcing is irrelevant when all output are correct.
  logits, _ = outputs
  token_accuracy = jnp.argmax(logits, -1) == jnp.argmax(labels, -1)
  return jnp.all(token_accuracy, axis=-1).astype(jnp.float32)


def test_linen_seq2seq_reverses_digits():
  (query, answer), labels = reversal_task(600, seed=0)
  data = {"train": ((query[:500], answer[:500]), labels[:500]),
          "val": ((query[500:], answer[500:]), labels[500:])}
  space = {"learning_rate": vt.loguniform(2e-2, 6e-2), "hidden_size": 12, "batch_size": 50}
  result = vt.search(seq2seq_fn, data, space, loss_fn=sequence_cross_entropy, metric=sequence_accuracy,
                     direction="maximize", num_configs=4, num_steps=40, rounds=1, seed=0, verbose=False)
  _finite_ok(result)
  assert result.maximize and result.metric == "sequence_accuracy"
  best = result.best_trial
  assert best.score == max(t.score for t in result.trials)
  # Chance is (1/4)**4 < 0.004 per sequence.
  assert best.score > 0.25
  assert all(t.train_curve[-1] < 0.7 * t.train_curve[0] for t in result.trials)
  # The trained model scored with the example's own apply and an 'lstm' key
  # (the teacher-forced logits do not depend on it): the search's score.
  module, variables = result.best_model()
  (q_val, a_val), y_val = data["val"]
  logits, predictions = jax.jit(lambda v, q, a: module.apply(v, q, a, rngs={"lstm": random.key(1)}))(
      variables, q_val, a_val)
  assert logits.shape == (100, SEQ_LEN, VOCAB) and predictions.shape == (100, SEQ_LEN, VOCAB)
  accuracy = float(jnp.mean(sequence_accuracy((logits, predictions), y_val)))
  assert accuracy == pytest.approx(best.score, abs=1e-6)


# ---------------------------------------------------------------------------
# 4. A PINN (NNX MLP u(x, t)) for the heat equation u_t = u_xx on [0, pi] x
#    [0, 1], u(x, 0) = sin x, u(0, t) = u(pi, t) = 0; exact u = exp(-t) sin x.
# ---------------------------------------------------------------------------


class PINN(nnx.Module):
  def __init__(self, width: int, depth: int, *, rngs: nnx.Rngs):
    sizes = [2] + [width] * depth + [1]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

  def __call__(self, x, t):
    h = jnp.stack([x, t], axis=-1)
    for layer in self.layers[:-1]:
      h = jnp.tanh(layer(h))
    return self.layers[-1](h)[..., 0]


def pinn_fn(config, rngs):
  return PINN(config["width"], config["depth"], rngs=rngs)


def exact_solution(x, t):
  return jnp.exp(-t) * jnp.sin(x)


def heat_residual(model, x, t):
  u = lambda x, t: model(x, t)  # scalar (x, t) -> scalar u
  u_t = jax.vmap(jax.grad(u, argnums=1))(x, t)
  u_xx = jax.vmap(jax.jacfwd(jax.grad(u, argnums=0), argnums=0))(x, t)
  return u_t - u_xx


def pinn_loss(model, batch):
  """Per collocation point: PDE residual, initial and boundary conditions."""
  residual = heat_residual(model, batch["x"], batch["t"])
  x0, tb = batch["x0"], batch["tb"]
  initial = model(x0, jnp.zeros_like(x0)) - jnp.sin(x0)
  left = model(jnp.zeros_like(tb), tb)
  right = model(jnp.full_like(tb, jnp.pi), tb)
  return residual**2 + initial**2 + left**2 + right**2


def relative_l2_error(model, batch):
  # One scalar per validation chunk (vmaptune weighs chunks by their size);
  # the 200 validation points here fit in one chunk.
  u = model(batch["x"], batch["t"])
  exact = exact_solution(batch["x"], batch["t"])
  return jnp.linalg.norm(u - exact) / jnp.linalg.norm(exact)


def collocation_points(n, seed):
  rng = np.random.default_rng(seed)
  uniform = lambda high: rng.uniform(0.0, high, size=n).astype(np.float32)
  return {"x": uniform(np.pi), "t": uniform(1.0), "x0": uniform(np.pi), "tb": uniform(1.0)}


def test_pinn_heat_equation():
  data = {"train": collocation_points(256, seed=0), "val": collocation_points(200, seed=1)}
  space = {"learning_rate": vt.loguniform(5e-3, 2e-2), "width": 16, "depth": 2, "batch_size": 64}
  result = vt.search(pinn_fn, data, space, model_loss=pinn_loss, model_metric=relative_l2_error,
                     num_configs=4, num_steps=40, rounds=1, seed=0, verbose=False)
  _finite_ok(result)
  assert result.metric == "relative_l2_error" and not result.maximize
  for t in result.trials:
    # Training drives the residual + boundary loss down, and the solution
    # towards the exact one.
    assert t.train_curve[-1] < 0.5 * t.train_curve[0], t
    assert t.curve[-1] < t.curve[0], t
  best = result.best_trial
  assert best.score < 0.5
  # The trained model, as the user gets it, scores the same.
  model = result.best_model()
  assert float(nnx.jit(relative_l2_error)(model, data["val"])) == pytest.approx(best.score, rel=1e-5)


# ---------------------------------------------------------------------------
# 5. A tabular model: categorical embeddings and continuous features,
#    `__call__(self, x_cat, x_cont)`, a regression target.
# ---------------------------------------------------------------------------

CARDINALITIES = (5, 3)


class TabularModel(nnx.Module):
  def __init__(self, cardinalities, num_continuous: int, embed_dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.embeddings = nnx.List([nnx.Embed(n, embed_dim, rngs=rngs) for n in cardinalities])
    self.hidden = nnx.Linear(len(cardinalities) * embed_dim + num_continuous, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x_cat, x_cont):
    embedded = [embed(x_cat[:, i]) for i, embed in enumerate(self.embeddings)]
    h = jnp.concatenate([*embedded, x_cont], axis=-1)
    return self.head(nnx.relu(self.hidden(h)))


def tabular_fn(config, rngs):
  return TabularModel(CARDINALITIES, 3, config["embed_dim"], config["hidden"], rngs=rngs)


@pytest.fixture(scope="module")
def tabular_data():
  rng = np.random.default_rng(0)
  n = 600
  x_cat = np.stack([rng.integers(0, c, size=n) for c in CARDINALITIES], axis=1).astype(np.int32)
  x_cont = rng.normal(size=(n, 3)).astype(np.float32)
  effects = [rng.normal(size=c) for c in CARDINALITIES]
  y = (effects[0][x_cat[:, 0]] + effects[1][x_cat[:, 1]] + x_cont @ np.array([1.0, -0.5, 0.25])
       + 0.1 * rng.normal(size=n)).astype(np.float32)
  return x_cat, x_cont, y


def test_tabular_embeddings_tuple_and_dict_inputs(tabular_data):
  x_cat, x_cont, y = tabular_data
  space = {"learning_rate": vt.loguniform(3e-3, 3e-2), "embed_dim": 3, "hidden": 16, "batch_size": 32}
  kw = {"num_configs": 4, "num_steps": 40, "rounds": 1, "seed": 2, "verbose": False}
  positional = vt.search(tabular_fn, ((x_cat, x_cont), y), space, **kw)
  keyword = vt.search(tabular_fn, ({"x_cat": x_cat, "x_cont": x_cont}, y), space, **kw)
  _finite_ok(positional)
  for a, b in zip(positional.trials, keyword.trials):
    assert a.config == b.config and a.seed == b.seed
    assert a.score == b.score
    np.testing.assert_array_equal(a.curve, b.curve)
  # Better than predicting the mean (the same random split for both).
  assert positional.best_score < 0.5 * float(np.var(y))
  model = keyword.best_model()
  assert isinstance(model, TabularModel) and model(x_cat[:7], x_cont[:7]).shape == (7, 1)


# ---------------------------------------------------------------------------
# 6. The Flax NNX basics MLP (Linear, BatchNorm, Dropout holding its rngs)
#    trained with the NNX MNIST tutorial's loss of the model and a dict batch,
#    returning (loss, logits), against the tutorial's own training loop
#    written here with plain optax: same init, mini-batches and steps.
# ---------------------------------------------------------------------------


class MLP(nnx.Module):
  def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs):
    # No bias before BatchNorm: it would get a gradient of pure rounding noise,
    # which Adam scales up to lr-sized steps, and the running mean follows it;
    # two correct implementations would then disagree by ~1e-3 in evaluation.
    self.linear1 = nnx.Linear(din, dmid, use_bias=False, rngs=rngs)
    self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
    self.bn = nnx.BatchNorm(dmid, rngs=rngs)
    self.linear2 = nnx.Linear(dmid, dout, rngs=rngs)

  def __call__(self, x: jax.Array):
    x = nnx.gelu(self.dropout(self.bn(self.linear1(x))))
    return self.linear2(x)


def mlp_model_fn(config, rngs):
  return MLP(64, config["dmid"], 10, rngs=rngs)


def loss_fn(model: MLP, batch):
  logits = model(batch['image'])
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits=logits, labels=batch['label']
  ).mean()
  return loss, logits


def reference_run(config, data, seed, num_steps, eval_every):
  """The tutorial's training loop, seeded and batched as a vmaptune lane."""
  key = jax.random.key(seed)
  k_model, k_data, _ = jax.random.split(key, 3)
  k_default, k_params, k_drop = jax.random.split(k_model, 3)
  model = nnx.jit(lambda rngs: mlp_model_fn(config, rngs))(nnx.Rngs(k_default, params=k_params, dropout=k_drop))
  tx = optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float32)(learning_rate=config["learning_rate"])
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, _logits), grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def eval_step(model, batch):
    loss, _ = loss_fn(model, batch)
    return loss

  train, val = data["train"], data["val"]
  n_train = len(train["label"])
  batch_size = config["batch_size"]
  steps_per_epoch = n_train // batch_size
  scores, losses, interval = [], [], []
  for step in range(num_steps):
    epoch = step // steps_per_epoch
    perm = _lane.epoch_order(jax.random.key_data(k_data), epoch, n_train)  # vmaptune's data order
    start = (step % steps_per_epoch) * batch_size
    idx = np.asarray(perm[start:start + batch_size])
    model.train()
    interval.append(float(train_step(model, optimizer, {k: v[idx] for k, v in train.items()})))
    if (step + 1) % eval_every == 0:
      model.eval()
      scores.append(float(eval_step(model, val)))
      losses.append(np.mean(interval))
      interval = []
  return np.asarray(scores), np.asarray(losses), model


def test_nnx_tutorial_loss_matches_a_plain_optax_loop(digits):
  x, y = digits
  data = {"train": {"image": x[100:400], "label": y[100:400]},
          "val": {"image": x[:100], "label": y[:100]}}
  config = {"learning_rate": 1e-2, "batch_size": 32, "dmid": 32}
  seed, num_steps, eval_every = 11, 24, 8  # 300 // 32 = 9 steps per epoch: three epochs
  run = vt.train(mlp_model_fn, data, config, model_loss=loss_fn, seed=seed, num_steps=num_steps,
                 eval_every=eval_every, verbose=False)
  assert run.status == "ok"
  scores, losses, model = reference_run(config, data, seed, num_steps, eval_every)
  np.testing.assert_array_equal(run.curve_steps, [8, 16, 24])
  assert run.curve[-1] < 0.8 * run.curve[0]
  np.testing.assert_allclose(run.curve, scores, rtol=1e-5)
  np.testing.assert_allclose(run.train_curve, losses, rtol=1e-5)
  # The same weights and batch statistics, the same dropout stream position.
  ours = run.model()
  for kind in (nnx.Param, nnx.BatchStat):
    for a, b in zip(jax.tree.leaves(nnx.state(ours, kind)), jax.tree.leaves(nnx.state(model, kind))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert int(ours.dropout.rngs.count[...]) == int(model.dropout.rngs.count[...]) == num_steps
