"""``vt.train``'s program: one lane alone, jitted without ``vmap``.

The population's per-lane functions (:func:`vmaptune._program._group_fns`
of one lane) under the same compile path and tiers as a population's
programs, one evaluation interval a call.
"""

from __future__ import annotations

from typing import Any

import jax

from ._compiler import Compiler, counted_flops, has_convolution, quiet_donation, step_seconds, tier_for
from ._lane import LaneInputs, LaneState, TrainSpec
from ._placement import DeviceData
from ._program import _group_fns, _scalar

__all__ = ["SingleProgram"]


class SingleProgram:
  """One lane alone, jitted without vmap: :func:`vmaptune.train`. :meth:`advance`
  runs one evaluation interval a call, so a callback can look at the curve and
  change hyperparameters between calls."""

  def __init__(self, spec: TrainSpec, device):
    self.spec = spec
    self.device = device
    self.compiler = Compiler(spec.precision, device.platform)
    self._init = None
    self._lowered = None  # one evaluation interval, lowered once
    self._advance: dict[str, Any] = {}  # compiled, by tier
    self._per_step = None  # tier()'s prediction

  def init(self, inputs: LaneInputs) -> LaneState:
    inputs = jax.device_put(inputs, self.device)
    if self._init is None:
      init, _ = _group_fns(self.spec, vectorized=False)
      self._init = self.compiler.build(init, (inputs,), tier="init")  # as a population's start program
    return self._init(inputs)

  def _lower(self, state: LaneState, data: DeviceData, eval_every: int):
    if self._lowered is None:
      _, advance = _group_fns(self.spec, vectorized=False)

      def one_interval(state, train, val, eval_every):
        state, metrics = advance(state, train, val, 1, eval_every)
        return state, jax.tree.map(lambda m: m[0], metrics)

      self._lowered = self.compiler.lower(one_interval, (state, data.train, data.val, _scalar(eval_every)),
                                          donate=(0,))
    return self._lowered

  def tier(self, state: LaneState, data: DeviceData, eval_every: int, steps: int) -> str:
    """:meth:`advance`'s compile tier for ``steps`` steps: on CPU by their
    predicted time (:func:`tier_for`, as a population's ``run``), else "long"."""
    if self.device.platform != "cpu":
      return "long"
    if self._per_step is None:  # a step's predicted seconds, and whether it convolves: once
      lowered, params = self._lower(state, data, eval_every), sum(a.size for a in jax.tree.leaves(state.params))
      conv = has_convolution(lowered)
      self._per_step = step_seconds(6.0 * params * self.spec.batch_size, conv and counted_flops(lowered),
                                    bool(self.spec.conv_rewrites)), conv
    seconds, conv = self._per_step
    return tier_for(steps * seconds, conv)

  def advance(self, state: LaneState, data: DeviceData, eval_every: int, tier: str = "long"):
    """One evaluation interval: ``(state, (score, train_loss, step))``."""
    if tier not in self._advance:
      self._advance[tier] = self.compiler.compile(self._lower(state, data, eval_every), tier)
    return quiet_donation(self._advance[tier], state, data.train, data.val, _scalar(eval_every))
