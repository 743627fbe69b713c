"""``search``: the entry point. It checks every argument, builds the plan,
the strategy's context and the population, and hands them to the one loop."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import optax

from . import _devices, _loop, _options
from ._adaptive import Adaptive
from ._checkpoint import Checkpointer
from ._codec import space_objects
from ._plan import Plan
from ._population import Population
from ._result import SearchResult
from ._sampling import Drawer
from ._space import Choice, Distribution
from ._strategy import Context
from ._trial import Stats, user_stacklevel

__all__ = ["search"]


def search(
    model_fn: Callable,
    data: Any,
    space: Mapping[str, Any],
    *,
    optimizer: Any = optax.adam,
    num_configs: int = 64,
    num_steps: int | None = None,
    epochs: float | None = None,
    rounds: int = 3,
    seed: int = 0,
    sampler: str = "random",
    metric: str | Callable = "loss",
    direction: str | None = None,
    loss_fn: Callable | None = None,
    model_loss: Callable | None = None,
    model_metric: Callable | None = None,
    val_fraction: float = 0.2,
    eval_every: int | None = None,
    keep: float | int = 0.25,
    shrink: float = 0.5,
    max_buckets: int = 8,
    lr_schedule: str = "inverse_time",
    devices: Any = None,
    lane_batch: int | None = None,
    precision: str | None = None,
    eval_batch_size: int | None = None,
    enqueue: Sequence[Mapping[str, Any]] | None = None,
    callbacks: Sequence[Callable[[SearchResult], Any]] = (),
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    overwrite: bool = False,
    memory_budget: int | str | None = None,
    strategy: Any = "auto",
    timeout: float | None = None,
    compilation_cache: bool | str | None = None,
    recheck: Any = "auto",
    verbose: bool = True,
) -> SearchResult:
  """Searches ``space`` by training many configs at once in compiled programs.

  Configs train side by side as *lanes*: the lanes of a bucket (configs that
  share their static hyperparameters) are stacked along a lane axis, sharded
  over the devices, and stepped by a ``lax.scan`` with no host round trip per
  step. How the budget is spent is the ``strategy``'s: for small searches
  (the default below 80 trial-lengths) ``num_configs`` sampled configs train
  at once, then ``rounds - 1`` more rounds sample in a region around the best
  so far, in sampling coordinates, shrinking by ``shrink`` per round (coarse
  to fine); for larger searches, and with a ``timeout``, the adaptive
  strategy runs many more, mostly shorter, trials on a few lanes: a Sobol
  design first, then configs proposed by TPE from every trial so far, and
  trials behind the finished ones stop early.

  Args:
    model_fn: ``model_fn(config, rngs) -> nnx.Module`` (Flax NNX) or
      ``model_fn(config) -> nn.Module`` (Linen). ``config`` holds the model's
      hyperparameters as plain Python values.
    data: ``(x, y)`` (split with ``val_fraction``, deterministically from
      ``seed``) or ``{"train": (x, y), "val": (x, y)}``. ``x`` and ``y`` are
      arrays or any nested tuples, lists or dicts of arrays sharing one
      leading example axis; the model is called as ``model(x)``,
      ``model(*x)`` for a tuple, ``model(**x)`` for a dict. One integer
      ``y`` means classification (cross-entropy), one float ``y`` regression
      (squared error); other targets need ``loss_fn``. With ``model_loss``,
      any pytree batch.
    space: name -> distribution (:func:`uniform`, :func:`loguniform`,
      :func:`reverse_loguniform`, :func:`integer`, :func:`choice`) or constant.
      Arguments of ``optimizer`` go to the optimizer, ``batch_size`` and
      ``lr_decay`` to the trainer, the rest to ``model_fn``.
    optimizer: an optax factory (default ``optax.adam``); its numeric
      arguments are injected per lane, so their values cost no recompilation.
    num_configs: configs per round.
    num_steps: steps per trial (default 1000). Every lane takes the same
      number of steps, so every lane of a round costs the same and finishes
      together; larger batches then see more examples.
    epochs: instead of ``num_steps``, passes over the training data per
      trial: the same examples for every lane (batch 32 takes four times the
      steps of batch 128).
    rounds: 1 coarse round plus ``rounds - 1`` zoom rounds.
    seed: the search seed. The same seed gives the same configs, scores and best.
    sampler: ``"random"`` (default), ``"sobol"`` or ``"halton"`` (scrambled
      quasi-random points on each hyperparameter's sampling scale), ``"grid"``
      (the largest full grid of at most ``num_configs`` points; for
      comparison; zoom strategy only) or ``"tpe"`` (Optuna's TPE proposes each
      zoom round's whole batch; with ``strategy="halving"`` it proposes the
      refills, BOHB-style; needs the ``optuna`` extra).
    metric: ``"loss"`` (default, minimized: the validation loss),
      ``"accuracy"`` (maximized) or a callable ``(outputs, targets) ->
      per-example values``, averaged over the validation set.
    direction: ``"minimize"`` or ``"maximize"`` for a callable metric.
    loss_fn: ``(outputs, targets) -> per-example loss``, where ``outputs`` is
      whatever the model returns (any pytree) for ``x`` and ``targets`` is
      ``y``; default cross-entropy for integer labels, squared error for
      float targets.
    model_loss: instead of ``loss_fn``, a loss of the model and the lane's
      mini-batch, ``(model, batch) -> per-example values, a scalar or (loss,
      aux)``, as Flax's NNX tutorials write it: ``model`` is the lane's NNX
      module in training mode (a bound Linen module, its ``__call__`` given
      the train flag), ``batch`` the mini-batch of ``data`` (then any pytree
      with a leading example axis: a dict of arrays works, no ``y`` needed).
      State the model writes is kept (batch statistics, rng counters);
      variables it creates during the call are dropped after it.
    model_metric: the same form, scored on validation batches with the model
      in evaluation mode (default with ``model_loss``: ``model_loss`` itself).
    val_fraction: held-out share when ``data`` is ``(x, y)``.
    eval_every: steps between validation passes (default: 10 per trial).
    keep: how many of the best trials so far a zoom region is drawn around: a
      fraction of ``num_configs`` (default 0.25) or a count.
    shrink: the zoom region's largest width is ``shrink ** round`` of the full
      range in each sampling coordinate (default 0.5).
    max_buckets: the most distinct static signatures (compiled programs) per
      round (default 8). Model hyperparameters drawn from continuous or wide
      ranges are drawn this many times per round and the lanes are spread
      evenly over them.
    lr_schedule: how ``lr_decay`` decays the learning rate per epoch:
      ``"inverse_time"`` (α0 / (1 + decay·epoch), default) or
      ``"exponential"`` (α0·exp(−decay·epoch)).
    devices: devices to shard lanes over: None (all), a count, or a list.
    lane_batch: lanes vectorised together per device (default: 1 on CPU,
      all of a device's lanes on accelerators).
    precision: matmul precision (``jax.default_matmul_precision``): None
      keeps JAX's default (TF32 on recent NVIDIA GPUs), ``"highest"`` is
      true float32.
    eval_batch_size: validation examples per chunk (default 512).
    enqueue: configs to train first in round 0 (a known baseline, say), as
      Optuna's ``enqueue_trial``; each sets every searched key.
    callbacks: functions called after each round with a :class:`SearchResult`
      of the rounds so far (to log to whatever you use). With halving: after
      each ``num_steps`` of population time, with the trials finished so far;
      with PBT, whose lanes all finish at the end: once, at the end.
    checkpoint_dir: a directory to save the search in, atomically, after each
      round (and every ``checkpoint_every`` steps inside one; with halving or
      PBT, every ``checkpoint_every`` steps of population time, default
      ``num_steps``). Calling
      ``search`` again with the same arguments resumes where it stopped and
      gives the same result as an uninterrupted run; a different call is
      refused (:class:`CheckpointMismatch`) unless ``overwrite=True``.
    checkpoint_every: steps between checkpoints inside a round (rounded to
      whole evaluation intervals). Default: only at round ends.
    overwrite: start afresh even if ``checkpoint_dir`` holds another search.
    strategy: how the budget is spent (all at equal total lane-steps,
      ``rounds * num_configs * num_steps``): ``"auto"`` (the default) picks
      ``"adaptive"`` with a ``timeout``, or with ``rounds >= 2`` and a budget
      of 80 trial-lengths or more (``num_configs * rounds >= 80``), given a
      ``num_steps`` budget of at least 20 steps and any sampler but grid,
      and ``"zoom"`` otherwise (``rounds=1``: one batch of random configs);
      ``"adaptive"`` or :class:`Adaptive` (TPE refills and median pruning:
      a few lanes run many trials one after another, those behind the
      finished ones at the same step stop, each freed lane takes a config
      proposed from every trial so far); ``"zoom"`` or :class:`Zoom`
      (rounds of ``num_configs`` fresh configs, each zooming in),
      ``"halving"`` or
      :class:`Halving` (successive halving with refill: lanes that fall
      behind at a rung are stopped and refilled with new configs from the
      zoom region), ``"pbt"`` or :class:`PBT` (population based training:
      bad lanes copy a good lane's weights and optimizer state and perturb
      its hyperparameters). See the README.
    memory_budget: bytes per device for a population (int, or "512MB",
      "2GB"); default: 90% of an accelerator's free memory, half the host's
      available memory on CPU. Buckets that do not fit run in chunks; if XLA
      still runs out of memory the chunk is halved and retried, down to one
      lane per device.
    timeout: seconds for the whole search, as Optuna's
      ``study.optimize(timeout=)`` and Ray Tune's ``time_budget_s``: the search
      goes on (more zoom rounds, halving refills, PBT generations) until the
      time is spent, never starting a round or a trial it cannot finish by its
      own estimate, and returns the best found. ``num_configs`` and ``rounds``
      then size each round (a zoom round's depth stops growing at ``rounds -
      1``), not the whole search. A resumed search gets what is left of its
      budget. How many rounds fit depends on the machine; every trial still
      replays exactly. If the time runs out before any trial has finished
      (compiling took it), the trial that got furthest trains on to its end,
      as Optuna finishes the trial it is in, and a ``RuntimeWarning`` says
      how far past the timeout the search ended.
    compilation_cache: keep compiled programs on disk so that running the
      same script again compiles nothing: None (default) turns JAX's
      persistent cache on in ``$VMAPTUNE_CACHE_DIR`` or
      ``~/.cache/vmaptune/xla`` unless ``VMAPTUNE_COMPILATION_CACHE=0``; a
      path puts it there; False leaves JAX alone. A cache configured in JAX
      is never overridden (see :func:`enable_compilation_cache`).
    recheck: after the search, train its ``top`` configs again with
      ``seeds`` fresh seeds each and keep the one with the best mean
      (:meth:`SearchResult.recheck`): a pair ``(top, seeds)``, True for
      ``(4, 4)``, None or False for none. ``"auto"`` (default) re-checks
      ``(4, 4)`` in an adaptive search with a ``timeout`` or a budget of 96
      trial-lengths or more, and nothing otherwise. Without a timeout the
      adaptive strategy takes the ``top * seeds`` trial-lengths out of its
      budget (after zoom or halving they come on top); with one, the search
      holds back the re-check's time, estimated from the best trials' own
      measured time (at most a sixth of the timeout), starts the largest
      re-check that fits in what is left (fewer seeds, then fewer configs,
      down to 2 x 2; none if that does not fit) and, if that was cut, grows
      it towards ``(top, seeds)`` at its own measured pace while the next
      seed or config fits before the timeout. The re-check is then
      ``result.rechecked``, and ``best_trial``, ``best_config``,
      ``best_score`` and ``best_model()`` are its best mean's trial (its own
      search run and score), not the single luckiest score.
    verbose: show a progress bar on a terminal (a line per round otherwise).

  Returns:
    A :class:`SearchResult`.

  Example:
    >>> import numpy as np, optax, vmaptune as vt
    >>> from flax import nnx
    >>> x = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> def model_fn(config, rngs):
    ...   return nnx.Linear(4, 2, rngs=rngs)
    >>> result = vt.search(model_fn, (x, y), {"learning_rate": vt.loguniform(1e-3, 1e-1)},
    ...                    num_configs=4, num_steps=20, rounds=2, verbose=False)
    >>> len(result.trials)
    8
  """
  t_start = time.perf_counter()
  opts = _options.parse_search(
      model_fn, data, space, optimizer=optimizer, num_configs=num_configs, num_steps=num_steps, epochs=epochs,
      rounds=rounds, seed=seed, sampler=sampler, metric=metric, direction=direction, loss_fn=loss_fn,
      model_loss=model_loss, model_metric=model_metric,
      val_fraction=val_fraction, eval_every=eval_every, keep=keep, shrink=shrink, max_buckets=max_buckets,
      lr_schedule=lr_schedule, devices=devices, lane_batch=lane_batch, precision=precision,
      eval_batch_size=eval_batch_size, enqueue=enqueue, callbacks=callbacks, checkpoint_dir=checkpoint_dir,
      checkpoint_every=checkpoint_every, overwrite=overwrite, memory_budget=memory_budget, strategy=strategy,
      timeout=timeout, compilation_cache=compilation_cache, verbose=verbose, recheck=recheck)
  _devices.use_compilation_cache(compilation_cache)
  c = opts.common
  stats = Stats(num_devices=len(opts.devices))
  plan = Plan(model_fn=c.model_fn, routing=c.routing, dataset=c.dataset, objective=c.objective,
              custom_loss=c.custom_loss, num_steps=opts.num_steps, epochs=opts.epochs, eval_every=c.eval_every,
              eval_batch_size=c.eval_batch_size, precision=c.precision, devices=opts.devices,
              lane_batch=opts.lane_batch, memory_budget=opts.memory_budget)
  drawer = Drawer(c.space, sampler=opts.sampler, seed=opts.seed, maximize=c.objective.maximize,
                  signature_keys=c.routing.signature_keys, max_buckets=opts.max_buckets, capacity=plan.capacity)
  ctx = Context(space=c.space, num_configs=opts.num_configs, rounds=opts.rounds, timeout=opts.timeout,
                num_steps=opts.num_steps,
                seed=opts.seed, sampler=opts.sampler, keep=opts.keep, shrink=opts.shrink, eval_every=c.eval_every,
                checkpoint_every=opts.checkpoint_every, maximize=c.objective.maximize, enqueue=opts.enqueue,
                drawer=drawer, signature=c.routing.signature,
                steps_for=plan.trial_steps, eval_every_for=plan.eval_every_for,
                accelerator=opts.devices[0].platform != "cpu", devices=len(opts.devices),
                reserve=opts.recheck[0] * opts.recheck[1] if opts.recheck and isinstance(opts.strategy, Adaptive)
                else 0)
  strategy = opts.strategy
  strategy.check(ctx)
  population = Population(plan, lambda sig: strategy.cadence(ctx, sig), stats, plan.capacity)
  checkpointer = None
  if opts.checkpoint_dir is not None:
    checkpointer = Checkpointer(opts.checkpoint_dir, space_objects(_space_values(c.space)))
  result = _loop.run(
      t_start=t_start, ctx=ctx, strategy=strategy, plan=plan, population=population, stats=stats,
      checkpointer=checkpointer, fingerprint=_options.fingerprint(opts) if checkpointer else None,
      overwrite=opts.overwrite, callbacks=opts.callbacks, verbose=opts.verbose,
      metric=c.objective.metric_name, timeout=opts.timeout,
      options=dict(num_configs=opts.num_configs, rounds=opts.rounds, seed=opts.seed, sampler=opts.sampler,
                   keep=opts.keep, shrink=opts.shrink, max_buckets=opts.max_buckets, strategy=strategy.name,
                   timeout=opts.timeout), recheck=opts.recheck)
  over = time.perf_counter() - t_start - (opts.timeout if opts.timeout is not None else math.inf)
  if not getattr(strategy, "asynchronous", False) and over > max(0.5, 0.1 * (opts.timeout or 0)):  # others: _finish_one
    warnings.warn(f"vmaptune: the search ended {over:.1f} s past its timeout of {opts.timeout:g} s: strategy "
                  f"{strategy.name!r} trains a round to its end (its first round, and compiling, set the least "
                  "it takes; strategy='adaptive' fits its trials to the time).", RuntimeWarning,
                  stacklevel=user_stacklevel())
  return result


def _space_values(space):
  """Every value a config can hold that is not drawn from a range: choices and constants."""
  for d in space.values():
    if isinstance(d, Choice):
      yield from d.values
    elif not isinstance(d, Distribution):
      yield d
