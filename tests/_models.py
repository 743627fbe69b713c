"""Small models shared by the tests (module level, so compiled programs are reused)."""

from functools import partial

from flax import linen as nn
from flax import nnx


class MLP(nnx.Module):
  """Digits MLP: 64 -> hidden x num_layers -> 10."""

  def __init__(self, hidden: int, num_layers: int, rngs: nnx.Rngs, din: int = 64, dout: int = 10):
    self.inp = nnx.Linear(din, hidden, rngs=rngs)
    self.hidden = nnx.List([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(num_layers - 1)])
    self.out = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.inp(x))
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.out(x)


def mlp_fn(config, rngs):
  return MLP(config.get("hidden", 16), config.get("num_layers", 1), rngs)


class LinenMLP(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(self.hidden)(x)))


def linen_mlp_fn(config):
  return LinenMLP(config.get("hidden", 16))


class CNN(nnx.Module):
  """The Flax MNIST tutorial CNN, shrunk for 8x8x1 digits."""

  def __init__(self, rngs: nnx.Rngs, channels: int = 4):
    self.conv1 = nnx.Conv(1, channels, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(channels, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.1, rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(channels * 16, 16, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.1, rngs=rngs)
    self.linear2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout2(nnx.relu(self.linear1(x)))
    return self.linear2(x)


def cnn_fn(config, rngs):
  return CNN(rngs, config.get("channels", 4))


class LinenCNN(nn.Module):
  channels: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.channels, kernel_size=(3, 3))(x)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(0.1, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
    return nn.Dense(10)(x)


def linen_cnn_fn(config):
  return LinenCNN(config.get("channels", 4))


class Regressor(nnx.Module):
  def __init__(self, din, hidden, rngs):
    self.l1 = nnx.Linear(din, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.tanh(self.l1(x)))
