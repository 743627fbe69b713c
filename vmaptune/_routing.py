"""Where each hyperparameter goes: the optimizer, the trainer, or the model.

* Keys that are keyword arguments of the ``optimizer`` factory go to the
  optimizer: numeric ones are injected per lane (``optax.inject_hyperparams``,
  traced, no recompiles), others (bools, strings, callables) are static.
* ``batch_size`` and ``lr_decay`` are read by the trainer.
* Everything else goes to ``model_fn`` as plain Python values.

A config's *signature* is everything static about it: model keys, static
optimizer keys and the batch size. Lanes with one signature share a compiled
program (a bucket).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
import warnings
from typing import Any, Callable, Mapping, Sequence


from ._space import Choice, Distribution, Integer
from ._trial import user_stacklevel

__all__ = ["Routing", "route", "spread_order", "TRAINER_KEYS", "DEFAULT_BATCH_SIZE"]

TRAINER_KEYS = ("batch_size", "lr_decay")
DEFAULT_BATCH_SIZE = 64
SCHEDULES = ("inverse_time", "exponential")
# Space keys that name an optimizer's hyperparameter (optax's own argument
# names): with a built GradientTransformation nothing can inject them, so they
# go to ``model_fn`` (``learning_rate`` refused, the others warned: a model may
# read a norm's ``eps``).
OPTIMIZER_KEYS = ("learning_rate", "b1", "b2", "eps", "weight_decay")


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_numeric(value: Any) -> bool:
  if isinstance(value, Choice):
    return all(_is_number(v) for v in value.values)
  if isinstance(value, Distribution):
    return True
  return _is_number(value)


def _is_int_valued(value: Any) -> bool:
  if isinstance(value, Integer):
    return True
  if isinstance(value, Choice):
    return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value.values)
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Routing:
  """The split of a space's keys between optimizer, trainer and model.

  Attributes:
    optimizer: the optax factory, or a fixed ``GradientTransformation``.
    factory_kind: ``"factory"`` or ``"transform"``.
    injected: optimizer keys injected per lane (numeric).
    int_injected: the integer-valued subset of ``injected``.
    static_opt: optimizer keys passed statically (part of the signature).
    model_keys: keys handed to ``model_fn``.
    schedule: the learning-rate schedule applied with ``lr_decay``, or None.
  """

  optimizer: Any
  factory_kind: str
  injected: tuple
  int_injected: tuple
  static_opt: tuple
  model_keys: tuple
  schedule: str | None

  @property
  def signature_keys(self) -> tuple:
    return tuple(sorted(self.model_keys + self.static_opt + ("batch_size",)))

  def signature(self, config: Mapping[str, Any]) -> tuple:
    """The static part of ``config``: lanes with equal signatures share a program."""
    return tuple((k, config[k]) for k in self.signature_keys if k in config)

  def model_config(self, config: Mapping[str, Any]) -> dict:
    return {k: config[k] for k in self.model_keys}

  def static_opt_values(self, config: Mapping[str, Any]) -> tuple:
    return tuple((k, config[k]) for k in self.static_opt)


# Other libraries' names for optax's arguments.
_ALIASES = {"lr": "learning_rate", "beta1": "b1", "beta2": "b2", "wd": "weight_decay"}


def _warn_near_miss(key: str, params: Mapping[str, Any], optimizer: Any) -> None:
  """A space key that goes to ``model_fn`` but reads like one of the
  optimizer factory's arguments: a typo would search nothing, silently."""
  if not params:
    return
  match = _ALIASES.get(key) if _ALIASES.get(key) in params else None
  # A typo: one or two letters off, not a name of its own built on the argument's (bn_momentum).
  typos = [m for m in difflib.get_close_matches(key, list(params), n=1, cutoff=0.8)
           if abs(len(m) - len(key)) <= 2 and m not in key.split("_")]
  match = match or next(iter(typos), None)
  if match is not None:
    name = getattr(optimizer, "__name__", "the optimizer")
    warnings.warn(f"space[{key!r}] goes to model_fn: {name} takes no argument {key!r}. Did you mean {match!r}? "
                  "(A key the model does not read changes nothing, and its values each build a program.)",
                  UserWarning, stacklevel=user_stacklevel())


def _lowest(value: Any) -> float:
  """A numeric space entry's lowest value."""
  return value.low if hasattr(value, "low") else (min(value.values) if isinstance(value, Choice) else value)


def _check_optimizer_constant(key: str, value: Any) -> None:
  """An optimizer argument given as a range or a number in a string: the
  factory would get the tuple or the string itself."""
  if isinstance(value, tuple) and len(value) == 2 and all(_is_number(v) for v in value):
    raise TypeError(
        f"space[{key!r}] is the constant tuple {value!r}, which the optimizer would get as it is. For a range "
        f"to search, write vt.loguniform{value!r} (or vt.uniform{value!r}).")
  if isinstance(value, str):
    try:
      number = float(value)
    except ValueError:
      return
    raise TypeError(f"space[{key!r}] is the string {value!r}; give the number {number!r}.")


def _optimizer_params(optimizer: Callable) -> dict[str, inspect.Parameter]:
  try:
    sig = inspect.signature(optimizer)
  except (TypeError, ValueError):
    raise TypeError(
        f"`optimizer` {optimizer!r} has no inspectable signature; pass an "
        "optax factory such as optax.adam or a GradientTransformation."
    ) from None
  return {
      k: p for k, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
  }


def route(space: Mapping[str, Any], optimizer: Any, lr_schedule: str) -> Routing:
  """Decides where each key of ``space`` goes; validates the optimizer."""
  if lr_schedule not in SCHEDULES:
    raise ValueError(f"`lr_schedule` must be one of {SCHEDULES}, got {lr_schedule!r}.")
  is_transform = hasattr(optimizer, "init") and hasattr(optimizer, "update") and not inspect.isfunction(optimizer)
  if not is_transform and not callable(optimizer):
    raise TypeError(
        "`optimizer` must be an optax factory (optax.adam, optax.sgd, ...) or "
        f"an optax.GradientTransformation, got {optimizer!r}."
    )
  injected, ints, static, model = [], [], [], []
  if is_transform:
    fixed = [k for k in OPTIMIZER_KEYS if k in space]
    advice = ("Pass the factory (optimizer=optax.adam, not optax.adam(1e-3)), or a function of the "
              "hyperparameters, e.g. optimizer=lambda learning_rate: optax.chain(optax.clip_by_global_norm(1.0), "
              "optax.adamw(learning_rate)).")
    if "learning_rate" in fixed:  # no model reads a learning rate: refused
      raise ValueError(
          "space['learning_rate']: `optimizer` is a built optax.GradientTransformation, so nothing can set its "
          "learning rate: the key would go to model_fn and every trial would train at the same rate. " + advice)
    if fixed:  # a model may read these (a norm's eps): warned
      warnings.warn(f"space[{fixed[0]!r}] goes to model_fn: `optimizer` is a built optax.GradientTransformation, "
                    f"so the optimizer's own {fixed[0]} is fixed. If it was meant for the optimizer: " + advice,
                    UserWarning, stacklevel=user_stacklevel())
    params = {}
  else:
    params = _optimizer_params(optimizer)
  if "optimizer" in space and "optimizer" not in params:
    raise ValueError(
        "space['optimizer']: a key of the space reaches the optimizer only as one of its factory's arguments, "
        "so this one would go to model_fn and every trial would train with `optimizer`. To search over "
        "optimizers, give a factory that picks one, e.g. optimizer=lambda learning_rate, kind: "
        "{'adam': optax.adam, 'sgd': optax.sgd}[kind](learning_rate) with 'kind': vt.choice(['adam', 'sgd']) "
        "in the space.")
  for k, v in space.items():
    if k in TRAINER_KEYS:
      continue
    if k in params:
      if k == "learning_rate" or isinstance(params[k].default, numbers.Real):  # (a tuple default takes tuples)
        _check_optimizer_constant(k, v)
      if k == "learning_rate" and _is_numeric(v) and _lowest(v) < 0:
        raise ValueError(f"space['learning_rate'] reaches {_lowest(v)!r}: a negative rate climbs the loss. Give a "
                         "positive range, e.g. vt.loguniform(1e-4, 1e-1).")
      if _is_numeric(v):
        injected.append(k)
        if _is_int_valued(v) and isinstance(params[k].default, numbers.Integral) and not isinstance(params[k].default, bool):
          ints.append(k)
      else:
        static.append(k)
    else:
      model.append(k)
      _warn_near_miss(k, params, optimizer)
  if not is_transform:
    missing = [k for k, p in params.items() if p.default is p.empty and k not in space]
    if missing:
      name = getattr(optimizer, "__name__", repr(optimizer))
      raise ValueError(
          f"`optimizer` {name} needs {missing} but the space does not set "
          f"{'it' if len(missing) == 1 else 'them'}; add e.g. "
          f"{missing[0]!r}: vt.loguniform(1e-4, 1e-1) to the space, or bind "
          "it with functools.partial."
      )
  schedule = None
  if lr_schedule != SCHEDULES[0] and "lr_decay" not in space:
    warnings.warn(f"lr_schedule={lr_schedule!r} changes nothing without 'lr_decay' in the space (the rate it "
                  "decays by); add e.g. 'lr_decay': vt.uniform(0.0, 1.0).", UserWarning, stacklevel=user_stacklevel())
  if "lr_decay" in space:
    d = space["lr_decay"]
    if not _is_numeric(d):
      raise TypeError(f"space['lr_decay'] must be numeric, got {d!r}.")
    low = _lowest(d)
    if low < 0:
      raise ValueError(f"space['lr_decay'] must be >= 0 (a decay rate), got a lower end of {low!r}.")
    if is_transform or "learning_rate" not in params:
      raise ValueError(
          "space['lr_decay'] needs an optimizer factory with a `learning_rate` "
          "argument to decay (such as optax.adam or optax.sgd)."
      )
    lr_default = params["learning_rate"].default
    if "learning_rate" not in space and not _is_number(lr_default):
      raise ValueError("space['lr_decay'] needs a numeric learning rate to decay.")
    if "learning_rate" in space and not _is_numeric(space["learning_rate"]):
      raise ValueError("space['lr_decay'] cannot decay a learning-rate schedule; give a number.")
    schedule = lr_schedule
  if "batch_size" in space:
    b = space["batch_size"]
    values = b.values if isinstance(b, Choice) else ((b.low, b.high) if isinstance(b, Integer) else (b,))
    if isinstance(b, Distribution) and not isinstance(b, (Choice, Integer)):
      raise TypeError(f"space['batch_size'] must be an int, vt.integer or vt.choice of ints, got {b!r}.")
    for v in values:
      if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"space['batch_size'] values must be positive ints, got {v!r}.")
  return Routing(
      optimizer=optimizer,
      factory_kind="transform" if is_transform else "factory",
      injected=tuple(sorted(injected)),
      int_injected=tuple(sorted(ints)),
      static_opt=tuple(sorted(static)),
      model_keys=tuple(sorted(model)),
      schedule=schedule,
  )


def max_batch_size(space: Mapping[str, Any]) -> int | None:
  b = space.get("batch_size")
  if b is None:
    return None
  if isinstance(b, Choice):
    return max(b.values)
  if isinstance(b, Integer):
    return b.high
  return int(b)


def spread_order(signatures: Sequence[tuple], cost: Sequence[float]) -> list[int]:
  """Indices of ``signatures`` in an order whose first few span their values:
  the cheapest first, then each time the one farthest from those before it
  (each key's values by rank, scaled to [0, 1]; ties to the cheaper).

  Programs compile one at a time, and with a short timeout the last ones may
  never train. In the order of first appearance (smallest widths first, as
  the first lanes' design draws them) the widest models, often the best,
  came last: in a 10 s digits search the 128-unit programs never trained.

  >>> spread_order([(("hidden", 32),), (("hidden", 64),), (("hidden", 128),)], [1, 2, 4])
  [0, 2, 1]
  """
  n = len(signatures)
  keys = sorted({k for sig in signatures for k, _ in sig})
  coords = [[0.0] * len(keys) for _ in range(n)]
  for a, key in enumerate(keys):
    values = [dict(sig).get(key) for sig in signatures]
    try:
      distinct = sorted(set(values))
    except TypeError:  # values that do not compare (None beside numbers, callables)
      distinct = sorted(set(values), key=repr)
    for i, v in enumerate(values):
      coords[i][a] = distinct.index(v) / max(1, len(distinct) - 1)
  order = [min(range(n), key=lambda i: (cost[i], i))] if n else []
  while len(order) < n:
    far = lambda i: min(math.dist(coords[i], coords[j]) for j in order)
    order.append(max((i for i in range(n) if i not in order), key=lambda i: (far(i), -cost[i], -i)))
  return order
