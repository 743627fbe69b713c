"""Adapters that turn a user's Flax model into pure functions of plain pytrees.

The trainer only sees, for one lane:

* ``init(key) -> (params, model_state)``;
* ``call(params, model_state, fn, train, key) -> (fn(model), model_state)``:
  ``fn`` gets the lane's model (an NNX module in train or eval mode; a bound
  Linen module whose ``__call__`` gets the mode argument) and may do anything
  with it; state the model writes in training (batch statistics, rng
  counters) comes back, variables it creates during the call (``sow``, a
  VAE's loss term) are dropped;
* ``apply(params, model_state, x, train, key)``: ``call`` with the default
  call ``model(x)``, ``model(*x)`` for a tuple, ``model(**x)`` for a dict.

Randomness: every stream a model asks for (``rngs.noise()`` in NNX,
``make_rng("lstm")`` in Linen, an argument named ``rng``/``key``/``*_rng``)
gets a key derived from ``key``, itself derived from the trial seed and the
step. NNX graph machinery stays at this boundary (``nnx.split``/``nnx.merge``).
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from ._trial import user_stacklevel

__all__ = ["ModelAdapter", "make_adapter", "model_kind"]

_MODE_ARGS = ("train", "training", "deterministic", "is_training", "is_train")
# Bool arguments under other names that read like a train/eval switch (warned: vmaptune leaves them alone).
_SWITCH_LIKE = re.compile(r"train|eval|test|infer|drop|determin|mode|stochastic|running", re.IGNORECASE)
_RNG_ARG = re.compile(r"(^|_)(rng|key|prng_key)$")

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
        f"(Flax NNX) or model_fn(config) -> nn.Module (Linen); got {model_fn!r}.")
  if isinstance(model_fn, (nnx.Module, nn.Module)):
    name = type(model_fn).__name__
    build = (f"lambda config, rngs: {name}(..., rngs=rngs)" if isinstance(model_fn, nnx.Module)
             else f"lambda config: {name}(...)")
    raise TypeError(
        f"`model_fn` is a built {name} model, but every trial builds its own from its config (and its own "
        f"random initialisation): pass a function that builds one, e.g. model_fn={build}.")
  try:
    sig = inspect.signature(model_fn)
  except (TypeError, ValueError):
    return "nnx"
  params = list(sig.parameters.values())
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return "nnx"
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  required = [p for p in positional if p.default is p.empty]
  if "rngs" in sig.parameters and len(positional) < 2 - _keyword_rngs(model_fn) and not any(
      p.kind == p.VAR_KEYWORD for p in params):
    raise TypeError(
        "`model_fn` takes rngs but no config: write model_fn(config, rngs) -> nnx.Module (config holds the "
        f"trial's model hyperparameters); got {getattr(model_fn, '__name__', 'model_fn')}{sig}.")
  if "rngs" in sig.parameters or len(required) == 2:
    return "nnx"
  if len(required) == 1 or (not required and positional):
    return "linen"
  raise TypeError(
      "`model_fn` has the wrong signature: write model_fn(config, rngs) -> "
      "nnx.Module for Flax NNX or model_fn(config) -> nn.Module for Linen; got "
      f"{getattr(model_fn, '__name__', 'model_fn')}{sig}.")


def _keyword_rngs(model_fn: Callable) -> bool:
  """Whether ``model_fn`` takes ``rngs`` keyword-only (``def model_fn(config,
  *, rngs)``, as NNX's own ``__init__(self, ..., *, rngs)``): it is then
  called ``model_fn(config, rngs=rngs)``."""
  try:  # (an nnx.Module class's own signature is its metaclass's (*args, **kwargs): read __init__'s)
    p = inspect.signature(model_fn.__init__ if isinstance(model_fn, type) else model_fn).parameters.get("rngs")
  except (TypeError, ValueError):
    return False
  return p is not None and p.kind == p.KEYWORD_ONLY


class CallSpec(NamedTuple):
  """How vmaptune calls a model on ``x``."""

  form: str            # "array": model(x); "positional": model(*x); "keyword": model(**x)
  mode_arg: str | None  # the train/eval switch, if any
  takes_rngs: bool     # NNX: ``rngs`` passed at call time
  rng_args: tuple      # arguments that take a random key


def _form(x: Any) -> str:
  if isinstance(x, Mapping):
    return "keyword"
  if isinstance(x, (tuple, list)):
    return "positional"
  return "array"


def call_spec(fn: Callable, what: str, x: Any) -> CallSpec:
  """Matches a model's ``__call__`` against the inputs ``x`` will give it;
  finds the train/eval switch and the random keys it takes; refuses the rest."""
  form = _form(x)
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return CallSpec(form, None, False, ())
  if params and params[0].name == "self":
    params = params[1:]
  var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
  var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
  named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  if form == "keyword":
    unknown = [k for k in x if k not in {p.name for p in named}]
    if unknown and not var_kw:
      raise TypeError(f"{what} takes no argument(s) {unknown}, but `x` is a dict with those keys; vmaptune "
                      f"calls model(**x). The call takes {[p.name for p in named]}.")
    inputs = {p.name for p in named if p.name in x}
  else:
    n = 1 if form == "array" else len(x)
    positional = [p for p in named if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < n and not var_pos:
      raise TypeError(f"{what} takes {len(positional)} input(s) but `x` is "
                      + ("one array" if form == "array" else f"a {type(x).__name__} of {n} arrays")
                      + f"; vmaptune calls model({'x' if form == 'array' else '*x'}).")
    if n == 0 or (not positional and not var_pos):
      raise TypeError(f"{what} takes no input; it must be called as model(x).")
    inputs = {p.name for p in positional[:n]}
  mode, rngs, rng_args = None, False, []
  for p in named:
    if p.name in inputs:
      continue
    if p.name in _MODE_ARGS and mode is None:
      mode = p.name
    elif p.name == "rngs":
      rngs = True
    elif _RNG_ARG.search(p.name):
      rng_args.append(p.name)
    elif p.name in _MODE_ARGS:  # a second switch (train beside deterministic): the first one is set
      continue
    elif isinstance(p.default, bool) and _SWITCH_LIKE.search(p.name):
      # A switch under another name stays at its default in training too:
      # a Dropout behind it would never drop.
      warnings.warn(
          f"{what} has a bool argument {p.name!r} (default {p.default}) that vmaptune leaves at its default in "
          f"training and in evaluation: it sets only an argument named {', '.join(_MODE_ARGS)} (deterministic: "
          "the opposite). If it switches dropout or batch statistics, rename it to `train`.", UserWarning,
          stacklevel=user_stacklevel())
    elif p.default is p.empty:
      raise TypeError(
          f"{what} needs an argument vmaptune cannot supply: {p.name!r}. vmaptune calls model(x) (model(*x) "
          f"for a tuple, model(**x) for a dict) and passes only {', '.join(_MODE_ARGS)} (a bool), rngs, or a "
          "random key to an argument named rng, key or *_rng; give it a default, put it in x, or write the "
          "call yourself in model_loss=(model, batch).")
  return CallSpec(form, mode, rngs, tuple(rng_args))


def _mode_kwargs(mode: str | None, train: bool) -> dict:
  if mode is None:
    return {}
  if mode == "deterministic":
    return {mode: not train}
  return {mode: train}


def _invoke(model: Callable, x: Any, spec: CallSpec, train: bool, key: jax.Array, nnx_rngs: bool) -> Any:
  """The default call of a model on ``x``, with the mode and keys it takes."""
  kwargs = _mode_kwargs(spec.mode_arg, train)
  if spec.takes_rngs and nnx_rngs:
    # The dropout stream as vmaptune always gave it; any other name falls
    # back to the default stream (nnx.Rngs), from its own key.
    kwargs["rngs"] = nnx.Rngs(jax.random.fold_in(key, 1), dropout=key)
  for i, name in enumerate(spec.rng_args):
    kwargs[name] = jax.random.fold_in(key, 16 + i)
  if spec.form == "keyword":
    return model(**x, **kwargs)
  if spec.form == "positional":
    return model(*x, **kwargs)
  return model(x, **kwargs)


def _keep_structure(old: Any, new: Any) -> Any:
  """``new``'s values in ``old``'s structure: what a call created is dropped,
  what it deleted keeps its old value."""
  if jax.tree.structure(old) == jax.tree.structure(new):
    return new
  found = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(new)[0]}
  paths, treedef = jax.tree_util.tree_flatten_with_path(old)
  return jax.tree_util.tree_unflatten(treedef, [found.get(jax.tree_util.keystr(p), leaf) for p, leaf in paths])


class ModelReturnError(TypeError):
  """model_fn returned something that is not a model."""


class ModelAdapter:
  """One structural config's model as pure functions of plain pytrees."""

  kind: str
  spec: CallSpec | None = None

  def init(self, key: jax.Array) -> tuple[Any, Any]:
    raise NotImplementedError

  def call(self, params, model_state, fn: Callable, train: bool, key) -> tuple[Any, Any]:
    raise NotImplementedError

  def apply(self, params, model_state, x, train: bool, key) -> tuple[Any, Any]:
    """The default call on ``x``: ``(outputs, model_state)``."""
    if self.spec is None:
      raise TypeError("this model is only called by model_loss / model_metric; "
                      "vmaptune has no default call for it (data is not an (x, y) pair).")
    return self.call(params, model_state, lambda m: _invoke(m, x, self.spec, train, key, self.kind == "nnx"),
                     train, key)

  def build(self, params, model_state) -> Any:
    raise NotImplementedError

  # What tests and messages read.
  mode_arg = property(lambda self: self.spec.mode_arg if self.spec else None)
  takes_rngs = property(lambda self: bool(self.spec and self.spec.takes_rngs))


def _wrap_model_error(e: Exception, config: Mapping[str, Any], doing: str) -> Exception:
  return ValueError(f"model_fn raised {type(e).__name__} while {doing} for config {dict(config)!r}: {e}")


class NNXAdapter(ModelAdapter):
  kind = "nnx"

  def __init__(self, model_fn: Callable, config: Mapping[str, Any], x_example: Any = None):
    self.model_fn = model_fn
    self.config = dict(config)
    self._keyword_rngs = _keyword_rngs(model_fn)
    try:
      abstract = nnx.eval_shape(lambda: self._make(jax.random.key(0)))
    except ModelReturnError:
      raise
    except Exception as e:
      raise _wrap_model_error(e, config, "building the model") from e
    abstract.train()
    self.graphdef_train, _, _ = nnx.split(abstract, nnx.Param, ...)
    abstract.eval()
    self.graphdef_eval, _, _ = nnx.split(abstract, nnx.Param, ...)
    if x_example is not None:
      self.spec = call_spec(type(abstract).__call__, f"{type(abstract).__name__}.__call__", x_example)

  def _make(self, key):
    k_default, k_params, k_dropout = jax.random.split(key, 3)
    rngs = nnx.Rngs(k_default, params=k_params, dropout=k_dropout)
    model = self.model_fn(self.config, rngs=rngs) if self._keyword_rngs else self.model_fn(self.config, rngs)
    if not isinstance(model, nnx.Module):
      raise ModelReturnError(
          "model_fn(config, rngs) must return an nnx.Module, got "
          f"{type(model).__name__} (for a Linen module write model_fn(config)).")
    return model

  def init(self, key):
    model = self._make(key)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return params, rest

  def call(self, params, model_state, fn, train, key):
    model = nnx.merge(self.graphdef_train if train else self.graphdef_eval, params, model_state, **_MERGE_KW)
    result = fn(model)
    if not train:
      return result, model_state
    _, _, new_state = nnx.split(model, nnx.Param, ...)
    return result, _keep_structure(model_state, new_state)

  def build(self, params, model_state):
    return nnx.merge(self.graphdef_eval, params, model_state, **_MERGE_KW)


class _Bound:
  """A bound Linen module whose calls get the train/eval argument (unless
  given), so one model-aware loss reads the same for NNX and Linen."""

  def __init__(self, module, mode_arg: str | None, train: bool):
    self._module = module
    self._mode = _mode_kwargs(mode_arg, train)

  def __call__(self, *args, **kwargs):
    return self._module(*args, **{**self._mode, **kwargs})

  def __getattr__(self, name):
    return getattr(self._module, name)


class LinenAdapter(ModelAdapter):
  kind = "linen"

  def __init__(self, model_fn: Callable, config: Mapping[str, Any], x_example: Any = None,
               init_fn: Callable | None = None, batch_example: Any = None):
    self.config = dict(config)
    try:
      module = model_fn(self.config)
    except Exception as e:
      raise _wrap_model_error(e, config, "building the model") from e
    if not isinstance(module, nn.Module):
      raise TypeError(
          "model_fn(config) must return a flax.linen Module, got "
          f"{type(module).__name__} (for NNX write model_fn(config, rngs)).")
    self.module = module
    if x_example is not None:
      self.spec = call_spec(type(module).__call__, f"{type(module).__name__}.__call__", x_example)
    self._mode_arg = self.spec.mode_arg if self.spec is not None else _find_mode(type(module).__call__)
    self.x_example = x_example
    self.init_fn = init_fn
    self.batch_example = batch_example
    try:
      variables = jax.eval_shape(self._init_variables, jax.random.key(0))
    except Exception as e:
      raise _wrap_model_error(e, config, "initialising the model") from e
    self.collections = tuple(sorted(c for c in variables if c != "params"))

  def _init_variables(self, key):
    k_params, k_dropout = jax.random.split(key)
    rngs = {"params": k_params, "dropout": k_dropout}
    zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
    if self.init_fn is not None:
      batch = zeros(self.batch_example)
      return nn.init(lambda m: self.init_fn(_Bound(m, self._mode_arg, False), batch), self.module)(rngs)
    return nn.init(lambda m: _invoke(m, zeros(self.x_example), self.spec, False, k_dropout, False),
                   self.module)(rngs)

  def init(self, key):
    variables = self._init_variables(key)
    return variables["params"], {c: variables[c] for c in self.collections}

  def call(self, params, model_state, fn, train, key):
    # 'dropout' as vmaptune always gave it in training; any other stream a
    # model asks for (make_rng("lstm")) falls back to 'params' in Flax.
    rngs = {"dropout": key, "params": jax.random.fold_in(key, 1)}
    variables = {"params": params, **model_state}
    run = lambda m: fn(_Bound(m, self._mode_arg, train))
    if train and self.collections:
      result, updates = nn.apply(run, self.module, mutable=list(self.collections))(variables, rngs=rngs)
      return result, {**model_state, **{c: updates[c] for c in self.collections if c in updates}}
    try:
      return nn.apply(run, self.module)(variables, rngs=rngs), model_state
    except flax.errors.ModifyScopeVariableError as e:
      raise TypeError(
          f"{type(self.module).__name__} changes its {', '.join(self.collections)} in evaluation too ({e}). "
          "vmaptune evaluates with the collections read-only and passes the mode only through __call__: take "
          "`train` as an argument of __call__ (not a module attribute) and write e.g. "
          "nn.BatchNorm(use_running_average=not train).") from e

  def build(self, params, model_state):
    return self.module, {"params": params, **model_state}


def _find_mode(fn: Callable) -> str | None:
  try:
    names = list(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return None
  return next((n for n in names if n in _MODE_ARGS), None)


def make_adapter(model_fn: Callable, config: Mapping[str, Any], x_example: Any = None,
                 init_fn: Callable | None = None, batch_example: Any = None) -> ModelAdapter:
  """The adapter for ``model_fn`` at one structural ``config``.

  Args:
    x_example: the inputs' shapes (a pytree of ``ShapeDtypeStruct``) when
      vmaptune calls the model itself, else None.
    init_fn, batch_example: Linen only: a model-aware loss initialises the
      module by running on an example batch.
  """
  if model_kind(model_fn) == "nnx":
    return NNXAdapter(model_fn, config, x_example)
  return LinenAdapter(model_fn, config, x_example, init_fn, batch_example)
