"""Adapters that turn a user's Flax model into pure init/apply functions.

The trainer only sees ``init(key) -> (params, model_state)`` and
``apply(params, model_state, x, train, key) -> (outputs, model_state)`` on one
lane's plain pytrees. NNX graph machinery stays at this boundary
(``nnx.split``/``nnx.merge``); inside, everything is plain pytrees.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

__all__ = ["ModelAdapter", "make_adapter", "model_kind"]

_MODE_ARGS = ("train", "training", "deterministic", "is_training")

# Flax >= 0.12 reuses the Variables of the states given to ``nnx.merge``;
# inside jax.grad those belong to an outer trace and cannot be mutated
# (a Dropout's RngCount). ``copy=True`` makes fresh ones.
try:
  _MERGE_KW = {"copy": True} if "copy" in inspect.signature(nnx.merge).parameters else {}
except (TypeError, ValueError):  # pragma: no cover
  _MERGE_KW = {}


def model_kind(model_fn: Any) -> str:
  """``"nnx"`` for ``model_fn(config, rngs)``, ``"linen"`` for ``model_fn(config)``."""
  if not callable(model_fn):
    raise TypeError(
        "`model_fn` must be a callable: model_fn(config, rngs) -> nnx.Module "
        f"(Flax NNX) or model_fn(config) -> nn.Module (Linen); got {model_fn!r}."
    )
  try:
    sig = inspect.signature(model_fn)
  except (TypeError, ValueError):
    return "nnx"
  params = list(sig.parameters.values())
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return "nnx"
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  required = [p for p in positional if p.default is p.empty]
  if "rngs" in sig.parameters or len(required) == 2:
    return "nnx"
  if len(required) == 1 or (not required and positional):
    return "linen"
  raise TypeError(
      "`model_fn` has the wrong signature: write model_fn(config, rngs) -> "
      "nnx.Module for Flax NNX or model_fn(config) -> nn.Module for Linen; got "
      f"{getattr(model_fn, '__name__', 'model_fn')}{sig}."
  )


def _call_args(fn: Callable, what: str) -> tuple[str | None, bool]:
  """Finds the train/eval switch and whether ``rngs`` is taken; refuses the rest."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return None, False
  params = list(sig.parameters.values())
  if params and params[0].name == "self":
    params = params[1:]
  if not params:
    raise TypeError(f"{what} takes no input; it must be called as model(x).")
  mode, rngs = None, False
  for p in params[1:]:
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    if p.name in _MODE_ARGS and mode is None:
      mode = p.name
    elif p.name == "rngs":
      rngs = True
    elif p.default is p.empty:
      raise TypeError(
          f"{what} needs an argument vmaptune cannot supply: {p.name!r}. "
          f"vmaptune calls model(x) and passes only {', '.join(_MODE_ARGS)} "
          "(a bool) or rngs; give it a default."
      )
  return mode, rngs


def _mode_kwargs(mode: str | None, train: bool) -> dict:
  if mode is None:
    return {}
  if mode == "deterministic":
    return {mode: not train}
  return {mode: train}


class _BadReturn(TypeError):
  """model_fn returned something that is not a model."""


class ModelAdapter:
  """One structural config's model as pure functions of plain pytrees."""

  kind: str

  def init(self, key: jax.Array) -> tuple[Any, Any]:
    raise NotImplementedError

  def apply(self, params, model_state, x, train: bool, key) -> tuple[jax.Array, Any]:
    raise NotImplementedError

  def build(self, params, model_state) -> Any:
    raise NotImplementedError


def _wrap_model_error(e: Exception, config: Mapping[str, Any], doing: str) -> Exception:
  return ValueError(
      f"model_fn raised {type(e).__name__} while {doing} for config "
      f"{dict(config)!r}: {e}"
  )


class NNXAdapter(ModelAdapter):
  kind = "nnx"

  def __init__(self, model_fn: Callable, config: Mapping[str, Any]):
    self.model_fn = model_fn
    self.config = dict(config)

    def make():
      return self._make(jax.random.key(0))

    try:
      abstract = nnx.eval_shape(make)
    except _BadReturn:
      raise
    except Exception as e:
      raise _wrap_model_error(e, config, "building the model") from e
    abstract.train()
    self.graphdef_train, _, _ = nnx.split(abstract, nnx.Param, ...)
    abstract.eval()
    self.graphdef_eval, _, _ = nnx.split(abstract, nnx.Param, ...)
    self.mode_arg, self.takes_rngs = _call_args(
        type(abstract).__call__, f"{type(abstract).__name__}.__call__"
    )

  def _make(self, key):
    k_default, k_params, k_dropout = jax.random.split(key, 3)
    rngs = nnx.Rngs(k_default, params=k_params, dropout=k_dropout)
    model = self.model_fn(self.config, rngs)
    if not isinstance(model, nnx.Module):
      raise _BadReturn(
          "model_fn(config, rngs) must return an nnx.Module, got "
          f"{type(model).__name__} (for a Linen module write model_fn(config))."
      )
    return model

  def init(self, key):
    model = self._make(key)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return params, rest

  def apply(self, params, model_state, x, train, key):
    model = nnx.merge(self.graphdef_train if train else self.graphdef_eval, params, model_state, **_MERGE_KW)
    kwargs = _mode_kwargs(self.mode_arg, train)
    if self.takes_rngs and train:
      kwargs["rngs"] = nnx.Rngs(dropout=key)
    out = model(x, **kwargs)
    if train:
      _, _, model_state = nnx.split(model, nnx.Param, ...)
    return out, model_state

  def build(self, params, model_state):
    return nnx.merge(self.graphdef_eval, params, model_state, **_MERGE_KW)


class LinenAdapter(ModelAdapter):
  kind = "linen"

  def __init__(self, model_fn: Callable, config: Mapping[str, Any], x_example: jax.ShapeDtypeStruct):
    self.config = dict(config)
    try:
      module = model_fn(self.config)
    except Exception as e:
      raise _wrap_model_error(e, config, "building the model") from e
    if not isinstance(module, nn.Module):
      raise TypeError(
          "model_fn(config) must return a flax.linen Module, got "
          f"{type(module).__name__} (for NNX write model_fn(config, rngs))."
      )
    self.module = module
    self.mode_arg, _ = _call_args(type(module).__call__, f"{type(module).__name__}.__call__")
    self.x_example = x_example
    try:
      variables = jax.eval_shape(self._init_variables, jax.random.key(0))
    except Exception as e:
      raise _wrap_model_error(e, config, "initialising the model") from e
    self.collections = tuple(sorted(c for c in variables if c != "params"))

  def _init_variables(self, key):
    k_params, k_dropout = jax.random.split(key)
    x = jnp.zeros(self.x_example.shape, self.x_example.dtype)
    return self.module.init(
        {"params": k_params, "dropout": k_dropout}, x, **_mode_kwargs(self.mode_arg, False)
    )

  def init(self, key):
    variables = self._init_variables(key)
    return variables["params"], {c: variables[c] for c in self.collections}

  def apply(self, params, model_state, x, train, key):
    kwargs = _mode_kwargs(self.mode_arg, train)
    rngs = {"dropout": key} if train else {}
    variables = {"params": params, **model_state}
    if train and self.collections:
      out, updates = self.module.apply(
          variables, x, rngs=rngs, mutable=list(self.collections), **kwargs
      )
      return out, {**model_state, **updates}
    return self.module.apply(variables, x, rngs=rngs, **kwargs), model_state

  def build(self, params, model_state):
    return self.module, {"params": params, **model_state}


def make_adapter(
    model_fn: Callable, config: Mapping[str, Any], x_example: jax.ShapeDtypeStruct
) -> ModelAdapter:
  """The adapter for ``model_fn`` at one structural ``config``."""
  if model_kind(model_fn) == "nnx":
    return NNXAdapter(model_fn, config)
  return LinenAdapter(model_fn, config, x_example)
