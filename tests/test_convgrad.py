"""Convolution gradients in the CPU's fast form (``_convgrad``): equal to
XLA's own to rounding, used by a CPU search's training step, refused settings
named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import vmaptune as vt
from vmaptune import _convgrad
from vmaptune._convgrad import conv_eqns, fast_conv_grads

from _models import CNN

CASES = {
    "nhwc same": dict(x=(4, 8, 8, 3), w=(3, 3, 3, 5), dn=("NHWC", "HWIO", "NHWC"), strides=(1, 1), pad="SAME",
                      dil=(1, 1)),
    "strided": dict(x=(4, 9, 9, 3), w=(3, 3, 3, 5), dn=("NHWC", "HWIO", "NHWC"), strides=(2, 2), pad="SAME",
                    dil=(1, 1)),
    "dilated valid": dict(x=(4, 9, 9, 3), w=(3, 3, 3, 5), dn=("NHWC", "HWIO", "NHWC"), strides=(1, 1), pad="VALID",
                          dil=(2, 2)),
    "uneven": dict(x=(4, 10, 11, 3), w=(3, 2, 3, 5), dn=("NHWC", "HWIO", "NHWC"), strides=(2, 3),
                   pad=((2, 0), (1, 3)), dil=(2, 1)),
    "nchw": dict(x=(4, 3, 8, 8), w=(5, 3, 3, 3), dn=("NCHW", "OIHW", "NCHW"), strides=(1, 1), pad="SAME",
                 dil=(1, 1)),
    "1d": dict(x=(4, 12, 3), w=(5, 3, 6), dn=("NWC", "WIO", "NWC"), strides=(1,), pad="SAME", dil=(1,)),
    "3d": dict(x=(2, 5, 5, 5, 2), w=(3, 3, 3, 2, 4), dn=("NDHWC", "DHWIO", "NDHWC"), strides=(1, 2, 1),
               pad="SAME", dil=(1, 1, 1)),
    "negative pad, other out layout": dict(x=(4, 8, 8, 3), w=(3, 3, 3, 5), dn=("NHWC", "HWIO", "NCHW"),
                                           strides=(1, 1), pad=((-1, 2), (0, 0)), dil=(1, 1)),
}


def _loss_of(case):
  def loss(x, w):
    y = lax.conv_general_dilated(x, w, case["strides"], case["pad"], rhs_dilation=case["dil"],
                                 dimension_numbers=case["dn"])
    return jnp.sum(jnp.tanh(y) ** 2)

  return loss


def _inputs(case, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(case["x"]), jnp.float32),
          jnp.asarray(0.3 * rng.standard_normal(case["w"]), jnp.float32))


def test_mixed_precision_convolutions_differentiate():
  # bf16 inputs accumulating in float32 (nnx.Conv(..., dtype=bfloat16,
  # preferred_element_type=float32)): the cotangents keep the inputs' dtypes.
  x, w = (a.astype(jnp.bfloat16) for a in _inputs(CASES["nhwc same"]))
  for strides in ((1, 1), (2, 2)):
    def loss(x, w, strides=strides):
      y = lax.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   preferred_element_type=jnp.float32)
      return jnp.sum(jnp.tanh(y) ** 2)

    got = jax.grad(fast_conv_grads(loss), (0, 1))(x, w)
    want = jax.grad(loss, (0, 1))(x, w)
    for g, r in zip(got, want):
      assert g.dtype == r.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=0.05,
                                 atol=0.02 * float(jnp.abs(r.astype(jnp.float32)).max()))


POOLS = {  # (input shape, window = strides): windows that tile the input, or leave a remainder
    "2x2": ((4, 8, 8, 3), (1, 2, 2, 1)),
    "2x2, odd sizes": ((4, 9, 7, 3), (1, 2, 2, 1)),
    "3x3": ((4, 9, 9, 3), (1, 3, 3, 1)),
    "1d": ((5, 12, 3), (1, 4, 1)),
    "3d": ((2, 4, 6, 6, 2), (1, 2, 3, 2, 1)),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_max_pooling_gradients_are_xlas_bit_for_bit(name):
  shape, win = POOLS[name]
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  x = jnp.maximum(x, 0.0)  # after a ReLU: windows of tied zeros, where the first takes the gradient

  def loss(x):
    return jnp.sum(jnp.sin(lax.reduce_window(x, -jnp.inf, lax.max, win, win, "VALID")))

  assert conv_eqns(jax.make_jaxpr(loss)(x).jaxpr) == 1
  want = jax.jit(jax.value_and_grad(loss))(x)
  got = jax.jit(jax.value_and_grad(fast_conv_grads(loss)))(x)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_overlapping_or_padded_max_pooling_keeps_xlas_gradient():
  x = jnp.ones((2, 7, 7, 3))  # "SAME" pads a 2 x 2 window by one row and column here
  for pool in (lambda x: nnx.max_pool(x, (3, 3), strides=(1, 1)), lambda x: nnx.max_pool(x, (2, 2), (2, 2), "SAME"),
               lambda x: nnx.avg_pool(x, (2, 2), (2, 2))):
    f = lambda x, pool=pool: jnp.sum(pool(x))
    assert conv_eqns(jax.make_jaxpr(f)(x).jaxpr) == 0
  assert conv_eqns(jax.make_jaxpr(lambda x: jnp.sum(nnx.max_pool(x, (2, 2), (2, 2))))(x).jaxpr) == 1


def _conv_specs(jaxpr):
  return [e.params["dimension_numbers"].lhs_spec for e in jaxpr.eqns if e.primitive is lax.conv_general_dilated_p]


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_equal_xlas_to_rounding(name):
  case = CASES[name]
  loss = _loss_of(case)
  x, w = _inputs(case)
  want = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
  got = jax.jit(jax.value_and_grad(fast_conv_grads(loss), (0, 1)))(x, w)
  assert float(got[0]) == float(want[0])  # XLA's own forward
  for g, r in zip(got[1], want[1]):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6 * float(jnp.abs(r).max()))
  # Under a lane axis too (jax.vmap of the custom gradient).
  xs, ws = jnp.stack([x, 0.5 * x]), jnp.stack([w, 2.0 * w])
  got_v = jax.vmap(jax.grad(fast_conv_grads(loss), (0, 1)))(xs, ws)
  want_v = jax.vmap(jax.grad(loss, (0, 1)))(xs, ws)
  for g, r in zip(got_v, want_v):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6 * float(jnp.abs(r).max()))


def test_the_gradient_has_no_batch_as_feature_convolution():
  # What makes XLA's CPU gradient slow: the kernel gradient is a convolution
  # with batch and features swapped. The rewritten gradient has only
  # convolutions in the forward's layout (batch first, features last) and
  # computes the kernel gradient with matrix products.
  case = CASES["nhwc same"]
  loss = _loss_of(case)
  x, w = _inputs(case)
  canonical = (0, 3, 1, 2)
  xla = _conv_specs(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w).jaxpr)
  assert any(spec != canonical for spec in xla)
  fast = jax.make_jaxpr(jax.grad(fast_conv_grads(loss), (0, 1)))(x, w).jaxpr

  def specs(jaxpr):  # the custom VJP's rules sit in nested jaxprs
    out = _conv_specs(jaxpr)
    for eqn in jaxpr.eqns:
      for v in eqn.params.values():
        inner = getattr(v, "jaxpr", v)
        if hasattr(inner, "eqns"):
          out += specs(inner)
    return out

  assert specs(fast) and all(spec == canonical for spec in specs(fast))


def test_functions_without_a_reachable_convolution_run_unchanged():
  def mlp(x, w):
    return jnp.sum(jnp.tanh(x @ w))

  x, w = jnp.ones((4, 3)), jnp.ones((3, 2))
  assert str(jax.make_jaxpr(fast_conv_grads(mlp))(x, w)) == str(jax.make_jaxpr(mlp)(x, w))
  # Grouped (depthwise) and transposed convolutions keep XLA's gradients.
  xi = jnp.ones((2, 6, 6, 4))
  grouped = lambda x, w: jnp.sum(lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=4,
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")))
  transposed = lambda x, w: jnp.sum(lax.conv_transpose(x, w, (2, 2), "SAME",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC")))
  for f, wi in [(grouped, jnp.ones((3, 3, 1, 4))), (transposed, jnp.ones((3, 3, 4, 2)))]:
    assert conv_eqns(jax.make_jaxpr(f)(xi, wi).jaxpr) == 0
    assert str(jax.make_jaxpr(jax.grad(fast_conv_grads(f)))(xi, wi)) == str(jax.make_jaxpr(jax.grad(f))(xi, wi))
  # A convolution inside a nested jit is reached (evaluated inline).
  case = CASES["nhwc same"]
  nested = jax.jit(_loss_of(case))
  assert conv_eqns(jax.make_jaxpr(lambda x, w: nested(x, w))(*_inputs(case)).jaxpr) == 1


@pytest.fixture(scope="module")
def images(digits):
  x, y = digits
  return x[:400].reshape(-1, 8, 8, 1), y[:400]


def test_a_cpu_search_trains_convolutions_with_the_fast_gradient(images, monkeypatch):
  calls = []
  conv = _convgrad.conv

  def counted(*args, **kw):
    calls.append(kw["dimension_numbers"])
    return conv(*args, **kw)

  monkeypatch.setattr(_convgrad, "conv", counted)
  config = {"learning_rate": 3e-3}
  fast = vt.train(lambda c, rngs: CNN(rngs, 8), images, config, seed=3, num_steps=12, verbose=False)
  assert calls  # the training step went through the rewrite
  calls.clear()
  monkeypatch.setenv("VMAPTUNE_CONV_GRADS", "xla")
  xla = vt.train(lambda c, rngs: CNN(rngs, 8), images, config, seed=3, num_steps=12, verbose=False)
  assert not calls
  # The same training to rounding: only the kernel gradient's summation order differs.
  np.testing.assert_allclose(fast.train_curve, xla.train_curve, rtol=1e-4)
  assert fast.score == pytest.approx(xla.score, rel=1e-3)


def test_a_bad_conv_grads_setting_is_refused_before_compiling(images, monkeypatch, no_compile):
  monkeypatch.setenv("VMAPTUNE_CONV_GRADS", "fastest")
  with pytest.raises(ValueError, match="VMAPTUNE_CONV_GRADS='fastest'.*'fast'.*'xla'"):
    vt.search(lambda c, rngs: CNN(rngs, 4), images, {"learning_rate": vt.loguniform(1e-3, 1e-2)},
              num_configs=2, num_steps=5, rounds=1, verbose=False)


def test_a_model_of_dense_layers_is_traced_as_it_is(small_digits, monkeypatch):
  # No parameter with 3 or more dimensions (no kernel): the step is not
  # rewritten at all, and trains bit for bit as with XLA's gradients.
  from vmaptune import _lane

  from _models import mlp_fn

  wrapped = []
  monkeypatch.setattr(_lane, "fast_conv_grads", lambda fn: wrapped.append(fn) or fast_conv_grads(fn))
  config = {"learning_rate": 1e-2, "hidden": 16}
  fast = vt.train(mlp_fn, small_digits, config, seed=1, num_steps=30, verbose=False)
  assert not wrapped
  monkeypatch.setenv("VMAPTUNE_CONV_GRADS", "xla")
  xla = vt.train(mlp_fn, small_digits, config, seed=1, num_steps=30, verbose=False)
  np.testing.assert_array_equal(fast.train_curve, xla.train_curve)
  np.testing.assert_array_equal(fast.curve, xla.curve)


class Depthwise(nnx.Module):
  """A model whose only convolution is grouped (depthwise): nothing to rewrite."""

  def __init__(self, rngs):
    self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)
    self.out = nnx.Linear(4, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(self.depthwise(jnp.tile(x, (1, 1, 1, 4))).mean(axis=(1, 2)))


def test_the_step_records_what_it_rewrote_and_its_prediction_follows(images, monkeypatch):
  # The speed prediction counts a convolution at the rewritten gradients'
  # rate only where the step's convolutions were rewritten.
  from vmaptune import _compiler, _plan

  specs = {}
  real_new_spec = _plan.Plan._new_spec

  def new_spec(self, signature):
    spec = real_new_spec(self, signature)
    specs[self.model_fn] = spec
    return spec

  monkeypatch.setattr(_plan.Plan, "_new_spec", new_spec)
  cnn = lambda c, rngs: CNN(rngs, 4)
  depthwise = lambda c, rngs: Depthwise(rngs)
  for fn in (cnn, depthwise):
    vt.train(fn, images, {"learning_rate": 1e-3}, num_steps=4, verbose=False)
  assert specs[cnn].conv_grads and specs[cnn].conv_rewrites == 1
  assert specs[depthwise].conv_grads and specs[depthwise].conv_rewrites == 0
  assert _compiler.step_seconds(0.0, 1e9, fast_conv=True) < _compiler.step_seconds(0.0, 1e9)
