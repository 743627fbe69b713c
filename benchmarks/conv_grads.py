"""Convolution gradients on a CPU: XLA's own against vmaptune's (``_convgrad``).

For each shape of ``equal_time.py``'s digits CNN (8, 16, 32 channels x 1, 2
convolutions; batch 64 of 8x8x1 images, Adam), and for the common MNIST CNN
with max pooling (28x28x1), one plain jitted ``lax.scan`` of 100 training
steps (10 for the MNIST CNN), compiled at XLA's defaults: with JAX's own
gradients, and with ``_convgrad.fast_conv_grads`` around the loss (for the
MNIST CNN also with its max poolings left to XLA). Prints the time a step (best of ``--repeats`` calls), the compile
time, XLA's FLOP count of a step and the rate it implies, and how far the
first step's gradients of the two differ (largest difference over a leaf's
largest magnitude).

    PYTHONPATH=. python benchmarks/conv_grads.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (imports vmaptune first)
import equal_time as E  # noqa: E402  (the task's model)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

from vmaptune._convgrad import fast_conv_grads  # noqa: E402

SHAPES = [(8, 1), (8, 2), (16, 1), (16, 2), (32, 1), (32, 2)]
STEPS = 100
POOLED_STEPS = 10  # XLA's own gradients take most of a second a step there


class PooledCNN(nnx.Module):
  """Two 3x3 convolutions (32, 64 channels), each followed by a ReLU and a
  2x2 max pooling, then two dense layers: the common MNIST CNN, for 28x28x1
  images."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.dense = nnx.Linear(7 * 7 * 64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    return self.out(nnx.relu(self.dense(x.reshape(x.shape[0], -1))))


def measure(channels: int, layers: int, repeats: int) -> dict:
  """``equal_time.py``'s digits CNN: batch 64 of 8x8x1."""
  model = E.CNN(channels, layers, 10, nnx.Rngs(0))
  return {"channels": channels, "layers": layers, **_time(model, (64, 8, 8, 1), repeats, False, STEPS)}


def measure_pooled(repeats: int) -> dict:
  """:class:`PooledCNN`, batch 64 of 28x28x1; also with its max poolings
  left to XLA (convolutions alone rewritten)."""
  return {"channels": "32, 64 + max pool", "layers": 2, **_time(PooledCNN(nnx.Rngs(0)), (64, 28, 28, 1), repeats,
                                                                True, POOLED_STEPS)}


def _time(model, shape, repeats: int, conv_only: bool, steps: int) -> dict:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random(shape, np.float32))
  y = jnp.asarray(rng.integers(0, 10, shape[0]).astype(np.int32))
  graphdef, params = nnx.split(model)
  opt = optax.adam(1e-3)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

  variants = [("xla", loss), ("fast", fast_conv_grads(loss))]
  if conv_only:
    variants.append(("convs", _convs_only(loss)))
  row = {}
  grads = {}
  for name, fn in variants:
    def step(p, s, fn=fn):
      u, s = opt.update(jax.grad(fn)(p), s, p)
      return optax.apply_updates(p, u), s

    def run(p, s, step=step):
      return lax.scan(lambda c, _: (step(*c), None), (p, s), None, length=steps)[0]

    state = opt.init(params)
    row[f"{name}_mflop"] = float(jax.jit(step).lower(params, state).cost_analysis()["flops"]) / 1e6
    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(params, state).compile()
    row[f"{name}_compile_s"] = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, state))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, state))
      times.append((time.perf_counter() - t0) / steps)
    row[f"{name}_ms"] = 1e3 * min(times)
    row[f"{name}_gflops"] = row[f"{name}_mflop"] / row[f"{name}_ms"]  # MFLOP per ms
    grads[name] = jax.jit(jax.grad(fn))(params)
  row["speedup"] = row["xla_ms"] / row["fast_ms"]
  if conv_only:
    row["convs_speedup"] = row["xla_ms"] / row["convs_ms"]
  row["max_rel_diff"] = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                            for a, b in zip(jax.tree.leaves(grads["fast"]), jax.tree.leaves(grads["xla"])))
  return row


def _convs_only(loss):
  """``fast_conv_grads(loss)`` with max poolings left to XLA."""
  from vmaptune import _convgrad

  def fn(p):
    real = _convgrad.pool_supported
    _convgrad.pool_supported = lambda params, shape: False  # while tracing only
    try:
      return fast_conv_grads(loss)(p)
    finally:
      _convgrad.pool_supported = real

  return fn


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="two shapes, 3 calls each")
  p.add_argument("--repeats", type=int, default=None, help="timed calls a variant (default 7; --quick 3)")
  p.add_argument("--out", default=C.default_out("conv_grads"))
  args = p.parse_args(argv)
  repeats = args.repeats or (3 if args.quick else 7)
  shapes = [(8, 1), (16, 2)] if args.quick else SHAPES
  t_start = time.perf_counter()
  rows = [measure(c, n, repeats) for c, n in shapes] + [measure_pooled(repeats)]
  print(f"\nCNN training steps, {C.header()['machine']['description']}; best of {repeats} calls "
        f"of {STEPS} steps ({POOLED_STEPS} for the max-pooling CNN)\n")
  print(C.table(rows, [("channels", "channels"), ("layers", "convs"), ("xla_ms", "XLA ms/step"),
                       ("fast_ms", "vmaptune ms/step"), ("speedup", "speed-up"),
                       ("convs_ms", "convolutions alone ms/step"), ("convs_speedup", "their speed-up"), ("xla_compile_s", "XLA compile s"),
                       ("fast_compile_s", "vmaptune compile s"), ("fast_mflop", "MFLOP/step"),
                       ("xla_gflops", "XLA GFLOP/s"), ("fast_gflops", "vmaptune GFLOP/s"),
                       ("max_rel_diff", "gradient diff")]))
  record = {**C.header(), "repeats": repeats, "steps": STEPS, "pooled_steps": POOLED_STEPS, "rows": rows,
            "elapsed_s": time.perf_counter() - t_start}
  return C.finish(args.out, record, ["gradient diff: the first step's gradients, largest difference over the "
                                     "leaf's largest magnitude (XLA's as the reference)"])


if __name__ == "__main__":
  sys.exit(main())
