"""Every argument of ``search`` and ``train``, checked at the door.

:func:`parse_search` turns the keyword arguments into one frozen
:class:`SearchOptions` (data split, routing and objective resolved), raising
``TypeError``/``ValueError`` that name the argument before anything is traced
or compiled. The checkpoint fingerprint is built from it. The registry of
strategies lives here too: ``strategy="name"`` looks the class up in
:data:`STRATEGIES`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
import numbers
import os
from typing import Any, Callable


from . import _devices, _space
from ._codec import dumps, loads, qualname
from ._data import Dataset, prepare_data
from ._objective import Objective, resolve_objective
from ._adaptive import Adaptive
from ._halving import Halving
from ._model import model_kind
from ._pbt import PBT
from ._routing import Routing, max_batch_size, route
from ._sampling import check_enqueued
from ._zoom import Zoom

__all__ = ["SearchOptions", "parse_search", "parse_common", "STRATEGIES", "int_arg", "budget_args",
           "fingerprint", "SAMPLERS"]

#: ``strategy="name"`` -> its class. A new strategy is one module and one line here.
STRATEGIES = {cls.name: cls for cls in (Zoom, Halving, PBT, Adaptive)}
SAMPLERS = ("random", "grid", "sobol", "halton", "tpe")
DEFAULT_NUM_STEPS = 1000
_PRECISIONS = (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def int_arg(name: str, value: Any, low: int = 1, allow_none: bool = False) -> int | None:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}.")
  if value < low:
    raise ValueError(f"`{name}` must be >= {low}, got {value}.")
  return int(value)


def budget_args(num_steps, epochs) -> tuple[int | None, float | None]:
  """``(num_steps, epochs)``, exactly one of them set."""
  if num_steps is not None and epochs is not None:
    raise ValueError("give either `num_steps` or `epochs`, not both.")
  if epochs is not None:
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or not epochs > 0 or not math.isfinite(epochs):
      raise ValueError(f"`epochs` must be a positive number, got {epochs!r}.")
    return None, float(epochs)
  if num_steps is None:
    num_steps = DEFAULT_NUM_STEPS
  return int_arg("num_steps", num_steps), None


@dataclasses.dataclass(frozen=True)
class Common:
  """What ``search`` and ``train`` share, resolved."""

  model_fn: Callable
  space: dict
  routing: Routing
  dataset: Dataset
  objective: Objective
  custom_loss: bool
  eval_every: int | None
  eval_batch_size: int | None
  precision: str | None


def check_cache_arg(compilation_cache) -> None:
  if compilation_cache is not None and not isinstance(compilation_cache, (bool, str)) \
      and not hasattr(compilation_cache, "__fspath__"):
    raise TypeError(f"`compilation_cache` must be None (the default: on), True, False or a folder, "
                    f"got {compilation_cache!r}.")


def parse_common(model_fn, data, space, optimizer, metric, direction, loss_fn, val_fraction, seed,
                 lr_schedule, eval_every, eval_batch_size, precision, empty_ok=False, model_loss=None,
                 model_metric=None) -> Common:
  model_kind(model_fn)
  space = _space.validate_space(space) if (space or not empty_ok) else {}
  routing = route(space, optimizer, lr_schedule)
  int_arg("seed", seed, low=0)
  eval_every = int_arg("eval_every", eval_every, allow_none=True)
  eval_batch_size = int_arg("eval_batch_size", eval_batch_size, allow_none=True)
  if precision not in _PRECISIONS:
    raise ValueError(f"`precision` must be one of {_PRECISIONS}, got {precision!r}.")
  model_aware = model_loss is not None
  if model_loss is not None and not callable(model_loss):
    raise TypeError(f"`model_loss` must be a callable (model, batch) -> loss, got {model_loss!r}.")
  dataset = prepare_data(data, val_fraction=val_fraction, seed=seed, model_aware=model_aware)
  objective = resolve_objective(dataset.task, loss_fn, metric, direction, model_loss, model_metric,
                                paired=dataset.paired)
  top = max_batch_size(space)
  if top is not None and top > dataset.num_train:
    raise ValueError(
        f"space['batch_size'] reaches {top}, larger than the {dataset.num_train} "
        "training examples; lower it or pass more data."
    )
  return Common(model_fn, space, routing, dataset, objective, loss_fn is not None, eval_every, eval_batch_size,
                precision)


@dataclasses.dataclass(frozen=True)
class SearchOptions:
  """Every argument of :func:`vmaptune.search`, checked and resolved."""

  common: Common
  optimizer: Any
  num_configs: int
  num_steps: int | None
  epochs: float | None
  rounds: int
  seed: int
  sampler: str
  metric: Any
  direction: str | None
  loss_fn: Any
  val_fraction: float
  keep: float | int
  shrink: float
  max_buckets: int
  lr_schedule: str
  devices: list
  lane_batch: int | None
  enqueue: list
  callbacks: tuple
  checkpoint_dir: Any
  checkpoint_every: int | None
  overwrite: bool
  memory_budget: int | None
  strategy: Any
  timeout: float | None
  verbose: bool
  recheck: tuple[int, int] | None = None


#: ``strategy="auto"`` picks the adaptive strategy from this many trial-lengths
#: of budget (``num_configs * rounds``) on: below it a model has too few
#: trials to learn from and zoom's coarse-to-fine rounds do as well.
AUTO_MIN_TRIALS = 80


def auto_strategy(sampler: str, num_configs: int, rounds: int, num_steps: int | None, timeout: float | None):
  """What ``strategy="auto"`` runs: :class:`Adaptive` (TPE refills and median
  pruning) with a ``timeout``, or with two rounds or more and a budget of
  ``AUTO_MIN_TRIALS`` trial-lengths or more (``num_configs * rounds``), given
  a ``num_steps`` budget of at least 20 steps and a sampler other than
  ``"grid"``; :class:`Zoom` otherwise (``rounds=1`` is one batch of random
  configs, as asked)."""
  if sampler == "grid" or num_steps is None or num_steps < 20:
    return Zoom()
  if timeout is not None or (rounds >= 2 and num_configs * rounds >= AUTO_MIN_TRIALS):
    return Adaptive()
  return Zoom()


#: ``recheck="auto"``: an adaptive search with a ``timeout``, or with a budget
#: of ``AUTO_RECHECK_MIN_TRIALS`` trial-lengths or more, re-checks its top 4
#: configs with 4 fresh seeds, taken out of its budget (16 trial-lengths, a
#: sixth of 96; with a timeout, their estimated time, cut to fit a sixth).
#: Measured at 96 trial-lengths on three scikit-learn tasks, 20-40 seeds
#: each: the config it keeps, re-trained with 8 other seeds, had a lower median
#: than the plain search's best config on every task (significantly on two;
#: digits even, 10 of 20 seeds lower).
AUTO_RECHECK = (4, 4)
AUTO_RECHECK_MIN_TRIALS = 96


def resolve_recheck(recheck: Any, strategy: Any, num_configs: int, rounds: int,
                    timeout: float | None) -> tuple[int, int] | None:
  """``search``'s ``recheck``: ``(top, seeds)`` or None (no re-check)."""
  if isinstance(recheck, str):
    if recheck != "auto":
      raise ValueError(f"`recheck` must be 'auto', True, False/None or a pair (top, seeds), got {recheck!r}.")
    auto = isinstance(strategy, Adaptive) and (timeout is not None
                                               or num_configs * rounds >= AUTO_RECHECK_MIN_TRIALS)
    return AUTO_RECHECK if auto else None
  if recheck is None or recheck is False:
    return None
  if recheck is True:
    recheck = AUTO_RECHECK
  if (not isinstance(recheck, (tuple, list)) or len(recheck) != 2
      or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in recheck)):
    raise TypeError(f"`recheck` must be 'auto', True, False/None or a pair of ints (top, seeds), got {recheck!r}.")
  top, seeds = (int(v) for v in recheck)
  if top < 1 or seeds < 1:
    raise ValueError(f"`recheck`: top and seeds must be positive, got {recheck!r}.")
  if isinstance(strategy, PBT):
    raise ValueError("`recheck` needs each trial to be one config trained from scratch; PBT lanes change "
                     "hyperparameters mid-run. Pass recheck=None with strategy='pbt'.")
  if isinstance(strategy, Adaptive) and timeout is None and top * seeds >= num_configs * rounds:
    raise ValueError(f"`recheck`={recheck!r} re-trains {top * seeds} trial-lengths, the whole adaptive budget of "
                     f"num_configs * rounds = {num_configs * rounds}; re-check fewer (a sixth is typical).")
  return top, seeds


def _check_strategy(strategy: Any, sampler: str, num_configs: int = 64, rounds: int = 3,
                    num_steps: int | None = 1000, timeout: float | None = None):
  names = ", ".join(repr(n) for n in ("auto",) + tuple(STRATEGIES))
  classes = ", ".join(f"vt.{cls.__name__}(...)" for cls in STRATEGIES.values())
  if strategy == "auto":
    strategy = auto_strategy(sampler, num_configs, rounds, num_steps, timeout)
  if isinstance(strategy, str):
    if strategy not in STRATEGIES:
      raise ValueError(f"`strategy` must be one of {names} or {classes}, got {strategy!r}.")
    strategy = STRATEGIES[strategy]()
  if not isinstance(strategy, tuple(STRATEGIES.values())):
    raise TypeError(f"`strategy` must be one of {names} or {classes}, got {strategy!r}.")
  if sampler == "grid" and not isinstance(strategy, Zoom) or (sampler == "tpe" and isinstance(strategy, PBT)):
    raise ValueError(f"sampler={sampler!r} does not work with strategy={strategy!r}: grid needs "
                     "strategy='zoom' (its rounds are batches); 'tpe' works with 'zoom', 'halving' and 'adaptive'. "
                     "PBT draws its population with 'random', 'sobol' or 'halton'.")
  return strategy


def parse_search(model_fn, data, space, *, optimizer, num_configs, num_steps, epochs, rounds, seed, sampler,
                 metric, direction, loss_fn, model_loss, model_metric, val_fraction, eval_every, keep, shrink,
                 max_buckets, lr_schedule,
                 devices, lane_batch, precision, eval_batch_size, enqueue, callbacks, checkpoint_dir,
                 checkpoint_every, overwrite, memory_budget, strategy, verbose, timeout=None,
                 compilation_cache=None, recheck="auto") -> SearchOptions:
  """Checks every argument of ``search``; raises before anything is traced."""
  common = parse_common(model_fn, data, space, optimizer, metric, direction, loss_fn, val_fraction, seed,
                        lr_schedule, eval_every, eval_batch_size, precision, model_loss=model_loss,
                        model_metric=model_metric)
  space = common.space
  num_configs = int_arg("num_configs", num_configs)
  rounds = int_arg("rounds", rounds)
  max_buckets = int_arg("max_buckets", max_buckets)
  lane_batch = int_arg("lane_batch", lane_batch, allow_none=True)
  num_steps, epochs = budget_args(num_steps, epochs)
  if sampler not in SAMPLERS:
    raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}.")
  if sampler == "tpe":
    try:
      import optuna  # noqa: F401
    except ImportError:
      raise ImportError("sampler='tpe' needs optuna; install it with `pip install 'vmaptune[optuna]'`.") from None
  if isinstance(keep, bool) or not isinstance(keep, (int, float)):
    raise TypeError(f"`keep` must be a fraction in (0, 1] or a count >= 1, got {keep!r}.")
  if isinstance(keep, float) and not 0.0 < keep <= 1.0:
    raise ValueError(f"`keep` as a fraction must lie in (0, 1], got {keep!r}.")
  if isinstance(keep, int) and keep < 1:
    raise ValueError(f"`keep` as a count must be >= 1, got {keep!r}.")
  if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0.0 < shrink <= 1.0:
    raise ValueError(f"`shrink` must lie in (0, 1], got {shrink!r}.")
  if not isinstance(verbose, bool):
    raise TypeError(f"`verbose` must be a bool, got {verbose!r}.")
  if callable(callbacks) or not all(callable(f) for f in callbacks):
    raise TypeError("`callbacks` must be a list of functions taking a SearchResult.")
  enqueue = check_enqueued(space, enqueue)
  if len(enqueue) > num_configs:
    raise ValueError(f"`enqueue` holds {len(enqueue)} configs, more than num_configs={num_configs}.")
  if not _space.searched(space) and rounds > 1:
    raise ValueError("`space` holds only constants; nothing to search. Use vt.train for one config.")
  checkpoint_every = int_arg("checkpoint_every", checkpoint_every, allow_none=True)
  if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, bytes)) and not hasattr(checkpoint_dir, "__fspath__"):
    raise TypeError(f"`checkpoint_dir` must be a path, got {checkpoint_dir!r}.")
  if checkpoint_dir is not None and os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
    raise ValueError(f"`checkpoint_dir` {os.fsdecode(checkpoint_dir)!r} is a file; give a folder (created if missing).")
  if checkpoint_every is not None and checkpoint_dir is None:
    raise ValueError("`checkpoint_every` needs a `checkpoint_dir` to write to.")
  if not isinstance(overwrite, bool):
    raise TypeError(f"`overwrite` must be a bool, got {overwrite!r}.")
  if memory_budget is not None:
    _devices.parse_bytes(memory_budget)
  check_cache_arg(compilation_cache)
  if timeout is not None:
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not math.isfinite(timeout) \
        or timeout <= 0:
      raise ValueError(f"`timeout` must be a positive number of seconds or None, got {timeout!r}.")
    timeout = float(timeout)
  strategy = _check_strategy(strategy, sampler, num_configs, rounds, num_steps, timeout)
  recheck = resolve_recheck(recheck, strategy, num_configs, rounds, timeout)
  return SearchOptions(
      common=common, optimizer=optimizer, num_configs=num_configs, num_steps=num_steps, epochs=epochs,
      rounds=rounds, seed=seed, sampler=sampler, metric=metric, direction=direction, loss_fn=loss_fn,
      val_fraction=val_fraction, keep=keep, shrink=float(shrink), max_buckets=max_buckets,
      lr_schedule=lr_schedule, devices=_devices.lane_devices(devices), lane_batch=lane_batch, enqueue=enqueue,
      callbacks=tuple(callbacks), checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
      overwrite=overwrite, memory_budget=memory_budget, strategy=strategy, timeout=timeout, verbose=verbose,
      recheck=recheck)


# --------------------------------------------------------------------------
# The fingerprint: what identifies a search call, for refusing another's checkpoint
# --------------------------------------------------------------------------


def _name(fn: Any) -> Any:
  if fn is None or isinstance(fn, str):
    return fn
  if isinstance(fn, functools.partial):
    return f"partial({_name(fn.func)}, {sorted((k, repr(v)) for k, v in fn.keywords.items())})"
  return qualname(fn) if callable(fn) else repr(fn)


def _source_digest(fn: Any) -> str:
  """A digest of a function's source (or, without source, its bytecode)."""
  try:
    text = inspect.getsource(fn)
  except (OSError, TypeError):
    code = getattr(fn, "__code__", None)
    text = repr((code.co_code, code.co_consts)) if code is not None else repr(fn)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(opts: SearchOptions) -> dict:
  """What identifies a search call: a different one must not resume this one's checkpoint."""
  c = opts.common
  d = c.dataset
  fp = dict(
      num_configs=opts.num_configs, num_steps=opts.num_steps, epochs=opts.epochs, rounds=opts.rounds,
      seed=opts.seed, sampler=opts.sampler, direction=opts.direction, val_fraction=opts.val_fraction,
      eval_every=c.eval_every, keep=opts.keep, shrink=opts.shrink, max_buckets=opts.max_buckets,
      lr_schedule=opts.lr_schedule, lane_batch=opts.lane_batch, precision=c.precision,
      eval_batch_size=c.eval_batch_size, checkpoint_every=opts.checkpoint_every,
      num_devices=len(opts.devices), strategy=repr(opts.strategy), timeout=opts.timeout,
  )
  fp["space"] = {k: _space.to_json(v) for k, v in c.space.items()}
  fp["data"] = f"{d.fingerprint()} {d.describe()}"
  fp["model_fn"] = _name(c.model_fn)
  fp["model_source"] = _source_digest(c.model_fn)
  fp["optimizer"] = _name(opts.optimizer)
  fp["loss_fn"] = _name(opts.loss_fn)
  fp["metric"] = _name(opts.metric)
  if c.objective.model_loss is not None or c.objective.model_metric is not None:
    fp["model_loss"] = _name(c.objective.model_loss)
    fp["model_metric"] = _name(c.objective.model_metric)
  fp["enqueue"] = [sorted(x.items()) for x in opts.enqueue]
  if opts.recheck is not None:  # it shapes an adaptive search's budget
    fp["recheck"] = list(opts.recheck)
  return loads(dumps(fp))
