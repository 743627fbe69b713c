"""Convolution gradients in a form XLA's CPU backend computes fast.

Differentiating ``lax.conv_general_dilated`` gives two more convolutions: the
input gradient (the kernel flipped, its feature axes swapped) and the kernel
gradient (the input and the output gradient convolved, batch as features).
Inside a loop (a ``lax.scan`` of training steps, as every vmaptune program
is), XLA's CPU backend runs neither in its fast convolution path. For a 3 × 3
convolution of 16 to 16 channels on a batch of 64 8 × 8 images, forward and
backward took 8.5 ms a step, against 0.23 ms for the forward alone; at 64 to
64 channels 150 ms. The kernel gradient of 32 to 64 channels on 14 × 14
images took 677 ms in a loop and 16 ms outside one (Intel Xeon, 2 cores,
jax 0.10.2).

:func:`fast_conv_grads` rewrites a function so that each such convolution
keeps XLA's forward but gets a custom VJP: the input gradient is a plain
convolution with the kernel flipped and transposed explicitly, the kernel
gradient one matrix product per kernel offset between the shifted input and
the output gradient. Measured on the same steps, in a loop: 1.0 ms (16
channels), 6.5 ms (64) and 10.7 ms (the 14 × 14 kernel gradient). Outside a
loop the rewritten kernel gradient is up to 2.4 times slower than XLA's, but
vmaptune trains only in loops. The input gradient is XLA's to the bit; the kernel gradient sums
in another order (equal to rounding, about 1e-7 relative).

A max pooling whose windows tile the input (stride = window, no padding:
Flax's ``max_pool(x, (2, 2), strides=(2, 2))``) has the same trouble: XLA's
CPU gradient (``select_and_scatter``) took 3.9 ms where the pooling took
0.19 ms (64 × 16 × 16 × 32). It becomes a reshape and a max, whose gradient
goes to each window's first maximum as XLA's does: the same bits, 0.8 ms
(XLA's 9.1 ms in that run, both beside another job).

Only the CPU needs it (``TrainSpec.conv_grads``). Convolutions with feature
or batch groups or an input dilation (transposed convolutions), and pooling
windows that overlap or pad, keep XLA's own gradients. A function without
either runs unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from typing import Any, Callable

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["fast_conv_grads", "conv_grads", "conv_eqns", "supported", "pool_supported"]

_CONV = lax.conv_general_dilated_p
_MAX = lax.reduce_window_max_p


def supported(params: dict) -> bool:
  """Whether the custom gradient handles a convolution with these parameters."""
  return (params["feature_group_count"] == 1 and params["batch_group_count"] == 1
          and all(d == 1 for d in params["lhs_dilation"]))


def pool_supported(params: dict, shape: tuple) -> bool:
  """Whether a ``reduce_window_max`` with these parameters, of an input of
  ``shape``, tiles it: stride = window, no padding, no dilation."""
  win = tuple(params["window_dimensions"])
  return (win == tuple(params["window_strides"]) and any(k > 1 for k in win)
          and all(tuple(p) == (0, 0) for p in params["padding"])
          and all(d == 1 for d in params["base_dilation"]) and all(d == 1 for d in params["window_dilation"])
          and all(d >= k for d, k in zip(shape, win)))


def _rewritten(eqn) -> bool:
  return ((eqn.primitive is _CONV and supported(eqn.params))
          or (eqn.primitive is _MAX and pool_supported(eqn.params, eqn.invars[0].aval.shape)))


def conv_eqns(jaxpr) -> int:
  """How many convolutions and max poolings of ``jaxpr`` the rewrite reaches:
  supported ones at its top level or in a nested ``jit`` (those in a
  ``scan``, ``cond`` or ``checkpoint`` keep XLA's gradients)."""
  n = 0
  for eqn in jaxpr.eqns:
    inner = _inlined(eqn)
    if _rewritten(eqn):
      n += 1
    elif inner is not None:
      n += conv_eqns(inner.jaxpr)
  return n


def _inlined(eqn) -> Any:
  """The inner jaxpr of a nested ``jit`` (evaluated inline), else None."""
  if eqn.primitive.name in ("jit", "pjit", "closed_call") and isinstance(eqn.params.get("jaxpr"), jex.ClosedJaxpr):
    return eqn.params["jaxpr"]
  return None


def _eval(jaxpr, consts, args) -> list:
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    inner = _inlined(eqn)
    # The equation's name scope (``jax.named_scope``), kept in the HLO's metadata.
    scope = str(getattr(eqn.source_info, "name_stack", "") or "")
    with jax.named_scope(scope) if scope else contextlib.nullcontext():
      if _rewritten(eqn):
        outs = [(conv if eqn.primitive is _CONV else max_pool)(*invals, **eqn.params)]
      elif inner is not None and conv_eqns(inner.jaxpr):
        outs = _eval(inner.jaxpr, inner.consts, invals)
      else:
        bind_params = eqn.primitive.get_bind_params(eqn.params)
        subfuns = ()
        if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
          subfuns, bind_params = bind_params
        ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
        with ctx:
          outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
        if not eqn.primitive.multiple_results:
          outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def fast_conv_grads(fn: Callable, on_trace: Callable[[int], Any] | None = None) -> Callable:
  """``fn`` with every supported convolution's and max pooling's gradient
  computed as above.

  ``fn`` is traced once per call, to a jaxpr, which is then evaluated inside
  the caller's trace: every other operation is bound again as it was, so a
  function without a convolution computes exactly what it did.
  ``on_trace(n)`` hears how many operations each trace rewrote.
  """

  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if on_trace is not None:
      on_trace(conv_eqns(closed.jaxpr))
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


# --------------------------------------------------------------------------
# One convolution, in canonical layout: x (batch, *spatial, in), w (*window,
# in, out), y (batch, *spatial, out).
# --------------------------------------------------------------------------


def _canonical(nd: int) -> lax.ConvDimensionNumbers:
  spatial = tuple(range(1, nd + 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, nd + 1) + spatial, rhs_spec=(nd + 1, nd) + tuple(range(nd)),
                                  out_spec=(0, nd + 1) + spatial)


def conv(x, w, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
         batch_group_count, precision, preferred_element_type, **_):
  """``lax.conv_general_dilated`` with these parameters and the custom VJP."""
  del lhs_dilation, feature_group_count, batch_group_count  # 1 (``supported``)
  lhs, rhs, out = dimension_numbers
  nd = len(lhs) - 2
  xc = jnp.transpose(x, (lhs[0],) + tuple(lhs[2:]) + (lhs[1],))
  wc = jnp.transpose(w, tuple(rhs[2:]) + (rhs[1], rhs[0]))
  yc = _conv(tuple(window_strides), tuple(map(tuple, padding)), tuple(rhs_dilation), precision,
             preferred_element_type, xc, wc)
  # Canonical position of each logical output dimension (batch, feature, spatial...).
  where = (0, nd + 1) + tuple(range(1, nd + 1))
  return jnp.transpose(yc, tuple(where[logical] for logical in np.argsort(out)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _conv(strides, padding, dilation, precision, preferred, x, w):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_canonical(x.ndim - 2), precision=precision,
                                  preferred_element_type=preferred)


def _conv_fwd(strides, padding, dilation, precision, preferred, x, w):
  return _conv(strides, padding, dilation, precision, preferred, x, w), (x, w)


def _shifted(x, window, strides, padding, dilation, out_spatial) -> list:
  """The padded input's slice under each kernel offset: one array
  (batch, *out_spatial, in) per offset, offsets in row-major order."""
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in padding) + ((0, 0, 0),))
  slices = []
  for offset in itertools.product(*(range(k) for k in window)):
    start = (0,) + tuple(o * d for o, d in zip(offset, dilation)) + (0,)
    limit = ((x.shape[0],) + tuple(s + (n - 1) * st + 1 for s, n, st in zip(start[1:], out_spatial, strides))
             + (x.shape[-1],))
    slices.append(lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,)))
  return slices


def _conv_bwd(strides, padding, dilation, precision, preferred, res, dy):
  x, w = res
  nd = x.ndim - 2
  window = w.shape[:nd]
  out_spatial = dy.shape[1:-1]
  contract = tuple(range(nd + 1))  # batch and spatial
  wk = w.reshape((-1,) + w.shape[nd:])  # (offsets, in, out)
  # Kernel gradient: sum over batch and positions of shifted input × dy.
  shifted = functools.partial(_shifted, window=window, strides=strides, padding=padding, dilation=dilation,
                              out_spatial=out_spatial)
  slices, vjp = jax.vjp(shifted, x)
  dw = jnp.stack([lax.dot_general(s, dy, ((contract, contract), ((), ())), precision=precision)
                  for s in slices]).reshape(w.shape).astype(w.dtype)
  if all(s == 1 for s in strides):
    # Input gradient: dy convolved with the kernel flipped, in and out swapped.
    flipped = jnp.swapaxes(lax.rev(w, tuple(range(nd))), nd, nd + 1).astype(dy.dtype)  # as JAX's own rule
    pad = tuple((d * (k - 1) - lo, d * (k - 1) - hi) for k, d, (lo, hi) in zip(window, dilation, padding))
    dx = lax.conv_general_dilated(dy, flipped, (1,) * nd, pad, rhs_dilation=dilation,
                                  dimension_numbers=_canonical(nd), precision=precision,
                                  preferred_element_type=preferred)
  else:
    # Strided: each offset's share of dy @ w_k^T, put back where it was read.
    (dx,) = vjp([lax.dot_general(dy, wk[k], (((nd + 1,), (1,)), ((), ())), precision=precision).astype(x.dtype)
                 for k in range(wk.shape[0])])
  return dx.astype(x.dtype), dw


_conv.defvjp(_conv_fwd, _conv_bwd)


# --------------------------------------------------------------------------
# A max pooling whose windows tile the input.
# --------------------------------------------------------------------------


def max_pool(x, *, window_dimensions, **_):
  """``reduce_window_max`` of windows that tile ``x`` (``pool_supported``):
  the same values, and the gradient XLA gives, by a reshape."""
  win = tuple(window_dimensions)
  keep = tuple(d // k * k for d, k in zip(x.shape, win))
  if keep != x.shape:  # rows no window reaches (their gradient: zero, by the slice's)
    x = lax.slice(x, (0,) * x.ndim, keep)
  return _tiled_max(win, x)


def _windows(win: tuple, x):
  """``x`` as ``(*pooled shape, values of a window)``, each window row-major."""
  nd = x.ndim
  y = x.reshape(tuple(n for d, k in zip(x.shape, win) for n in (d // k, k)))
  y = y.transpose(tuple(range(0, 2 * nd, 2)) + tuple(range(1, 2 * nd, 2)))
  return y.reshape(y.shape[:nd] + (-1,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled_max(win, x):
  return _windows(win, x).max(axis=-1)


def _tiled_max_fwd(win, x):
  w = _windows(win, x)
  return w.max(axis=-1), (w, x.shape)


def _tiled_max_bwd(win, res, dy):
  w, shape = res
  nd = len(shape)
  # Each window's first maximum takes its gradient, as XLA's select_and_scatter.
  first = jnp.argmax(w, axis=-1)
  position = lax.broadcasted_iota(first.dtype, w.shape, w.ndim - 1)
  g = jnp.where(position == first[..., None], dy[..., None], jnp.zeros((), dy.dtype))
  g = g.reshape(g.shape[:nd] + win)
  g = g.transpose(tuple(i for pair in zip(range(nd), range(nd, 2 * nd)) for i in pair))
  return (g.reshape(shape).astype(w.dtype),)


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


def conv_grads(platform: str) -> bool:
  """Whether programs on ``platform`` use :func:`fast_conv_grads`: on the CPU,
  unless ``VMAPTUNE_CONV_GRADS=xla`` keeps XLA's own gradients."""
  value = os.environ.get("VMAPTUNE_CONV_GRADS", "fast").strip().lower()
  if value not in ("fast", "xla"):
    raise ValueError(f"VMAPTUNE_CONV_GRADS={value!r}: use 'fast' (the default on the CPU) or 'xla'")
  return platform == "cpu" and value == "fast"
