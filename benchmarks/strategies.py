"""Strategies and samplers at equal lane-steps, against Optuna TPE with median pruning.

Every vmaptune method spends the same budget, ``rounds * num_configs *
num_steps`` lane-steps (3 x 32 x S), on the same train/validation split and the
same space and model as ``quality.py``; ``result.stats.lane_steps`` is read back
to confirm it. Methods:

  * ``zoom``:      random sampling + zoom, ``search(rounds=3, num_configs=32, strategy="zoom")``;
  * ``adaptive``:  the default search at this size, ``strategy="adaptive"`` (what ``"auto"`` picks):
                   TPE refills + median pruning on 10 lanes, then (``recheck="auto"``) its top 4
                   configs re-trained with 4 fresh seeds, those 16 trial-lengths taken out of the 96;
                   it keeps the best mean (``--adaptive min_finished=10`` passes settings to
                   ``vt.Adaptive``);
  * ``adaptive_norc``: the same without the re-check (``recheck=None``: all 96 trial-lengths
                   searched, the best score kept; the default before the re-check);
  * ``adaptive_rc``: the same lanes with ``recheck=(TOP, SEEDS)`` (``--recheck``, default 4,4);
  * ``halving``:   successive halving with refill, ``strategy=vt.Halving(eta=3, min_fraction=1/9)``
                   (rungs at S/9, S/3, S; 32 lanes for 3*S steps of global time);
  * ``pbt``:       population based training, ``strategy=vt.PBT(ready=S // 4)``
                   (32 lanes for 3*S steps; exploit/explore every S/4 steps);
  * ``sobol``:     scrambled Sobol + zoom, ``sampler="sobol"``;
  * ``tpe``:       batched TPE + zoom, ``sampler="tpe"`` (each round's batch proposed by Optuna's TPE);
  * ``halving_tpe``: halving with refill whose refills TPE proposes (BOHB-style),
                   ``strategy=vt.Halving(eta=3, min_fraction=1/9), sampler="tpe"``;
  * ``optuna``:    Optuna ``TPESampler(seed)`` + ``MedianPruner()`` (Optuna's defaults), 96
                   sequential trials of at most S steps, each trained by ``vmaptune.train`` with a
                   ``callback`` that calls ``trial.report`` / ``trial.should_prune`` every S/9 steps
                   and returns ``{"stop": True}`` when pruned; the lane-steps actually trained are
                   counted (pruning leaves part of the budget unspent);
  * ``optuna_eq``: the same, but trials keep coming until the next one could overrun the vmaptune
                   budget: Optuna at (almost exactly) equal lane-steps.

Score, the same for every method: the best *completed* trial's final validation
score (zoom/sobol/tpe: every trial completes; halving: ``result.best_trial``,
which ranks only trials that finished the full S steps; PBT: the best lane's
final score; Optuna: the best COMPLETE trial, pruned trials excluded).

Each run keeps a trace of (seconds, lane-steps, best completed so far): vmaptune's
at each search callback (zoom: each round; the adaptive strategy and halving:
each trial-length of population time), Optuna's after each trial. The JSON holds
every trace (best so far against lane-steps and wall time); the second table
gives the median best so far at a quarter, a half and all of the budget. With
``optuna_eq`` in the run, each vmaptune method's row counts the seeds on which
its best is lower than Optuna's at equal lane-steps (paired: same seed), with
the sign test's p.

The best score is the minimum over a search's completed trials, each one draw of
initialisation and data order scored on a small validation split, so it rewards
completing many near-copies of a good config as much as finding a better one.
``--retrain K`` (default 8) therefore also trains each run's best config alone
with K fresh seeds, the same for every method, and reports the mean: what the
config a method found is worth when trained again.

Wall time: with ``--cache fresh`` (the default of a full run) each method's
first seed starts from an empty program cache (``vt.clear_cache()``: it pays
its own compiles, "cold"); later seeds reuse the programs compiled in this
process ("warm"). ``--cache shared`` (the default of ``--quick``, which took
95-125 s on an Intel Xeon and 210 s on an AMD EPYC, 2 cores each: compiling is
most of it) never clears it, so a method's first seed compiles only what
earlier methods left uncompiled (Sobol
and batched TPE reuse zoom's programs, PBT halving's segment programs, the
equal-budget Optuna run the other's): there only the warm times compare.

Host-side overhead of halving and PBT: their decisions run on the host between
compiled segments. ``result.stats`` splits the wall time: ``train_seconds`` is
the time inside compiled calls (dispatch until the metrics are on the host),
``host_seconds`` the rest outside tracing and compiling; ``segments`` counts
the decision points. Per segment the script reports both.
The time the same lane-steps take at the zoom search's training rate is shown
as the floor a strategy decided inside one program could approach. A sweep
over the population size (``--sweep 32,256,1024``: diabetes, one width, S =
36; the default of a full run, off in ``--quick``) shows how that host work
grows with the number of lanes, as on an accelerator.

Tasks as in ``quality.py``: digits (validation cross-entropy) and diabetes
(validation MSE, standardised y); ``--tasks breast_cancer`` adds scikit-learn's
breast cancer (569 x 30, binary, standardised x, validation cross-entropy).

    PYTHONPATH=. python benchmarks/strategies.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (imports vmaptune first)
import quality as Q  # noqa: E402  (tasks, space, model: the same as quality.py)

import numpy as np  # noqa: E402
import optax  # noqa: E402

import vmaptune as vt  # noqa: E402

METHODS = ("zoom", "adaptive", "adaptive_norc", "adaptive_rc", "halving", "pbt", "sobol", "tpe", "halving_tpe", "optuna", "optuna_eq")
VMAPTUNE_METHODS = ("zoom", "adaptive", "adaptive_norc", "adaptive_rc", "halving", "pbt", "sobol", "tpe", "halving_tpe")
OPTUNA_METHODS = ("optuna", "optuna_eq")
# quality.py's tasks, and a binary classification (not in the default --tasks)
TASKS = {**Q.TASKS, "breast_cancer": {"load": C.breast_cancer, "in": 30, "out": 2,
                                      "score": "validation cross-entropy"}}
NEEDS_OPTUNA = ("tpe", "halving_tpe", "optuna", "optuna_eq")
STRATEGIES = ("adaptive", "adaptive_norc", "adaptive_rc", "halving", "pbt", "halving_tpe")  # decided on the host between segments


def method_name(method: str, rounds: int, num_configs: int, steps: int, adaptive: dict | None = None,
                recheck: tuple = (4, 4)) -> str:
  adaptive = adaptive or {}
  trials = rounds * num_configs
  top, seeds = recheck
  return {
      "adaptive_rc": f"vt adaptive, {trials - top * seeds} lengths + recheck=({top}, {seeds})"
                     + "".join(f", {k}={v}" for k, v in adaptive.items()),
      "zoom": f"vt random + zoom {rounds}x{num_configs}",
      "adaptive": "vt adaptive (TPE + median), default recheck" + "".join(f", {k}={v}" for k, v in adaptive.items()),
      "adaptive_norc": "vt adaptive, recheck=None" + "".join(f", {k}={v}" for k, v in adaptive.items()),
      "halving": f"vt halving eta3 1/9, {num_configs} lanes",
      "pbt": f"vt PBT ready {steps // 4}, {num_configs} lanes",
      "sobol": f"vt Sobol + zoom {rounds}x{num_configs}",
      "tpe": f"vt batched TPE {rounds}x{num_configs}",
      "halving_tpe": f"vt halving + TPE refills, {num_configs} lanes",
      "optuna": f"optuna TPE + median, {trials} trials",
      "optuna_eq": "optuna TPE + median, = lane-steps",
  }[method]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="2 seeds, 72 steps per trial (2-4 min on 2 CPU cores)")
  p.add_argument("--out", default=C.default_out("strategies"), help="JSON output path")
  p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5; --quick 2)")
  p.add_argument("--first-seed", type=int, default=0,
                 help="seeds run from here (a held-out set of seeds checks a setting chosen on others)")
  p.add_argument("--steps", type=int, default=None,
                 help="S, steps per trial, a multiple of 36 (default 540; --quick 72)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--num-configs", type=int, default=32)
  p.add_argument("--cache", choices=("fresh", "shared"), default=None,
                 help="fresh: clear the program cache before each method (default); shared: never (--quick)")
  p.add_argument("--sweep", default=None,
                 help="population sizes for the host-overhead sweep (default 32,256,1024; --quick: none)")
  p.add_argument("--tasks", default="digits,diabetes", help=f"comma-separated, from {tuple(TASKS)}")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--without", default="", help="treat these packages as missing, e.g. optuna")
  p.add_argument("--retrain", type=int, default=None, metavar="K",
                 help="re-train each run's best config with K fresh seeds (the same for every method) and report "
                      "their mean: the config's expected score without the luck of the seed its search drew "
                      "(default 8; --quick 2; 0 skips)")
  p.add_argument("--recheck", default="4,4", metavar="TOP,SEEDS",
                 help="adaptive_rc: search(recheck=(TOP, SEEDS)): re-check the TOP configs with SEEDS fresh seeds and "
                      "keep the best mean; the search gets the budget less TOP * SEEDS trial-lengths (default 4,4)")
  p.add_argument("--adaptive", default="", metavar="KEY=VALUE,...",
                 help="settings of the adaptive method's vt.Adaptive, e.g. min_finished=10 (default: its defaults)")
  args = p.parse_args(argv)
  try:
    args.adaptive = {k.strip(): float(v) if "." in v else int(v)
                     for k, v in (kv.split("=") for kv in args.adaptive.split(",") if kv)}
    vt.Adaptive(**args.adaptive)
  except (ValueError, TypeError) as e:
    p.error(f"--adaptive: {e}")
  try:
    args.recheck = tuple(int(v) for v in args.recheck.split(","))
    if len(args.recheck) != 2 or min(args.recheck) < 1 or args.recheck[0] * args.recheck[1] >= args.rounds * args.num_configs:
      raise ValueError
  except ValueError:
    p.error(f"--recheck must be TOP,SEEDS, positive ints with TOP * SEEDS < rounds * num_configs, got {args.recheck}")
  if args.retrain is not None and args.retrain < 0:
    p.error(f"--retrain must be 0 or more, got {args.retrain}")
  args.retrain = (2 if args.quick else 8) if args.retrain is None else args.retrain
  args.seeds = args.seeds or (2 if args.quick else 5)
  args.steps = args.steps or (72 if args.quick else 540)
  args.cache = args.cache or ("shared" if args.quick else "fresh")
  if args.sweep is None:
    args.sweep = "" if args.quick else "32,256,1024"
  args.sweep = [int(n) for n in args.sweep.split(",") if n]
  if args.steps % 36:
    # S/9 (halving's first rung and Optuna's report interval) and S/4 (PBT's
    # `ready`, which must divide rounds * S) must be whole numbers of steps.
    p.error(f"--steps must be a multiple of 36 (S/9 and S/4 whole), got {args.steps}")
  return args


# --------------------------------------------------------------------------
# Where a strategy's time goes
# --------------------------------------------------------------------------


def stats_split(stats) -> dict:
  """Where a search's time went, from its ``result.stats``: time inside
  compiled calls (dispatch to metrics on the host, device time included) and
  host time (wall minus tracing, compiling and those calls), per segment."""
  segments = stats.segments or None
  return {"segments": segments, "device_s": stats.train_seconds, "host_s": stats.host_seconds,
          "host_per_segment_s": stats.host_seconds / segments if segments else None,
          "device_per_segment_s": stats.train_seconds / segments if segments else None}


# --------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------


def run_vmaptune(method, model_fn, data, args, seed):
  kw = dict(optimizer=optax.adam, num_steps=args.steps, rounds=args.rounds, num_configs=args.num_configs,
            seed=seed, metric="loss", verbose=False)
  if method in ("halving", "halving_tpe"):
    kw["strategy"] = vt.Halving(eta=3, min_fraction=1 / 9)
    if method == "halving_tpe":
      kw["sampler"] = "tpe"
  elif method == "pbt":
    kw["strategy"] = vt.PBT(ready=args.steps // 4)
  elif method in ("sobol", "tpe"):
    kw.update(sampler=method, strategy="zoom")
  elif method in ("adaptive", "adaptive_norc", "adaptive_rc"):
    # adaptive: as search's defaults (recheck="auto": (4, 4) at 96 trial-lengths, out of the budget);
    # adaptive_norc: no re-check; adaptive_rc: recheck=(TOP, SEEDS) from --recheck.
    kw["strategy"] = vt.Adaptive(**args.adaptive) if args.adaptive else "adaptive"
    if method != "adaptive":
      kw["recheck"] = None if method == "adaptive_norc" else tuple(args.recheck)
  else:
    kw["strategy"] = "zoom"
  trace = []  # (seconds, lane-steps, best completed so far) at each callback: best-so-far curves
  t0 = time.perf_counter()

  def track(partial):
    ok = [t.score for t in partial.trials if t.status == "ok" and math.isfinite(t.score)]
    trace.append([time.perf_counter() - t0, int(partial.stats.lane_steps), min(ok) if ok else math.inf])

  result = vt.search(model_fn, data, Q.space(), callbacks=[track], **kw)
  s = result.stats
  # "best": the best single score found (the measure), whichever trial the search keeps;
  # ranks only "ok" trials: for halving, those that finished all S steps.
  best = result.ranked()[0]
  kept = result.best_trial  # the re-check's best mean when the search re-checked, else the same trial
  recheck, check = None, result.rechecked
  if check is not None:
    recheck = {"trials": [t.id for t in check.trials], "mean": check.mean.tolist(), "lane_steps": check.lane_steps,
               "seconds": check.seconds, "picked_search_best": kept.id == best.id,
               "scores": np.asarray(check.scores, float).tolist()}
  wall = time.perf_counter() - t0
  out = {"best": float(best.score), "kept": float(kept.score), "wall_s": wall, "lane_steps": int(s.lane_steps),
         "recheck": recheck, "best_config": result.best_config,
         "trials": len(result.trials), "completed": sum(t.status == "ok" for t in result.trials),
         "stopped": sum(t.status == "stopped" for t in result.trials),
         "diverged": sum(t.status == "diverged" for t in result.trials),
         "best_steps": int(best.steps),
         "train_s": s.train_seconds, "compile_s": s.compile_seconds, "trace_s": s.trace_seconds,
         "programs_compiled": s.programs_compiled, "trace": trace + [[wall, int(s.lane_steps), float(best.score)]]}
  if method in STRATEGIES:
    out.update(stats_split(s))
  return out


def run_optuna(optuna, method, model_fn, data, args, seed):
  """Sequential Optuna trials with TPE and median pruning, trained by vt.train."""
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  steps, report_every = args.steps, args.steps // 9
  budget = args.rounds * args.num_configs * args.steps
  tally = {"lane_steps": 0, "train_s": 0.0, "diverged": 0, "pruned": 0}

  def objective(trial):
    config = {
        "learning_rate": trial.suggest_float("learning_rate", Q.LR[0], Q.LR[1], log=True),
        "b1": 1.0 - trial.suggest_float("one_minus_b1", 1 - Q.B1[1], 1 - Q.B1[0], log=True),
        "hidden": trial.suggest_categorical("hidden", list(Q.WIDTHS)),
        "lr_decay": trial.suggest_float("lr_decay", *Q.DECAY),
        "batch_size": Q.BATCH,
    }
    verdict = {"pruned": False}

    def callback(state):
      if state.diverged or not math.isfinite(state.score):
        return {"stop": True}  # no point training a frozen lane on
      trial.report(float(state.score), int(state.step))
      if trial.should_prune():
        verdict["pruned"] = True
        return {"stop": True}
      return None

    t0 = time.perf_counter()
    run = vt.train(model_fn, data, config, optimizer=optax.adam, seed=seed * 100_003 + trial.number,
                   num_steps=steps, eval_every=report_every, metric="loss", verbose=False, callback=callback)
    tally["train_s"] += time.perf_counter() - t0
    tally["lane_steps"] += run.steps
    if run.status != "ok" or not math.isfinite(run.score):
      tally["diverged"] += 1
      return math.inf  # as vmaptune scores a diverged trial; never the best
    if verdict["pruned"]:
      tally["pruned"] += 1
      raise optuna.TrialPruned()
    return run.score

  trace = []  # (seconds, lane-steps, best completed so far) after each trial

  def track(_study, trial):
    best = trace[-1][2] if trace else math.inf
    if trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value):
      best = min(best, trial.value)
    trace.append([time.perf_counter() - t0, tally["lane_steps"], best])

  def stop_at_budget(study, _trial):
    if budget - tally["lane_steps"] < steps:  # the next trial could overrun the budget
      study.stop()

  study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed),
                              pruner=optuna.pruners.MedianPruner(), direction="minimize")
  t0 = time.perf_counter()
  if method == "optuna":
    study.optimize(objective, n_trials=args.rounds * args.num_configs, callbacks=[track])
  else:
    study.optimize(objective, n_trials=100 * args.rounds * args.num_configs, callbacks=[track, stop_at_budget])
  wall = time.perf_counter() - t0
  complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
  finite = [t for t in complete if t.value is not None and math.isfinite(t.value)]
  best = min(finite, key=lambda t: t.value) if finite else None
  cfg = None
  if best is not None:
    cfg = dict(best.params)
    cfg["b1"] = 1.0 - cfg.pop("one_minus_b1")
  return {"best": float(best.value) if best else math.inf, "wall_s": wall, "lane_steps": tally["lane_steps"],
          "trials": len(study.trials), "completed": len(complete) - tally["diverged"], "stopped": tally["pruned"],
          "diverged": tally["diverged"], "best_config": cfg, "best_steps": steps if best else None,
          "train_s": tally["train_s"], "optuna_s": wall - tally["train_s"], "compile_s": None, "trace_s": None,
          "programs_compiled": None, "trace": trace}


# --------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------


def _median(values):
  values = [v for v in values if v is not None]
  return float(np.median(values)) if values else None


FRACTIONS = (0.25, 0.5, 1.0)  # of the lane-step budget, for the best-so-far columns


RETRAIN_SEED = 10_000  # fresh seeds 10,000 + k: none of the searches' trial seeds is reused


def retrain(model_fn, data, results, args, cache):
  """Each run's ``retrained``: the mean final validation score of its best
  config trained alone (``vt.train``) with ``args.retrain`` fresh seeds.

  A search's best score is the minimum over its completed trials, each one
  draw of initialisation and data order, on a validation split of a few
  hundred examples: on diabetes (88 validation rows) the same config scores
  0.47 to 0.54 across seeds, while the methods' medians differ by 0.006. So a
  search that completes more near-copies of a good config reports a lower
  best without having found a better config; the re-trained mean measures
  the config. ``cache``: {config JSON: mean}, shared across methods (the
  same config gets the same seeds)."""
  for r in results:
    if r["method"] == "pbt":  # its best lane's hyperparameters changed mid-run: no one config to re-train
      r["retrained"] = None
      continue
    cfg = r.get("best_config")
    if cfg is None:  # no completed trial
      r["retrained"] = math.inf
      continue
    key = json.dumps(cfg, sort_keys=True)
    if key not in cache:
      config = {**cfg, "batch_size": Q.BATCH}
      scores = [vt.train(model_fn, data, config, optimizer=optax.adam, seed=RETRAIN_SEED + k, num_steps=args.steps,
                         metric="loss", verbose=False).score for k in range(args.retrain)]
      cache[key] = float(np.mean(scores))  # inf if any seed diverged
    r["retrained"] = cache[key]


def summarize(task, method, name, results, budget):
  best = np.asarray([r["best"] for r in results], np.float64)
  so_far = {f"at_{f:g}": float(np.median([C.best_at(r["trace"], lane_steps=f * budget) for r in results])) for f in FRACTIONS}
  walls = [r["wall_s"] for r in results]
  lane_steps = [r["lane_steps"] for r in results]
  return {"task": task, "method": method, "name": name, "median": float(np.median(best)),
          "min": float(best.min()), "max": float(best.max()),
          "lane_steps": int(np.median(lane_steps)), "lane_steps_min": int(min(lane_steps)),
          "lane_steps_max": int(max(lane_steps)), "budget_share": float(np.median(lane_steps)) / budget,
          "wall_median": float(np.median(walls)), "wall_seed0": walls[0],
          "wall_warm": _median(walls[1:]), "trials": _median([r["trials"] for r in results]),
          "completed": _median([r["completed"] for r in results]),
          "diverged": _median([r["diverged"] for r in results]), **so_far,
          "retrained": _median([r.get("retrained") for r in results])}


def overhead_row(task, method, name, results, zoom_rate, zoom_host):
  """Host overhead per segment, from the warm seeds (all seeds if only one).

  ``zoom_rate`` (lane-steps/s) and ``zoom_host`` (s: wall - train - compile)
  come from the warm zoom searches of the same task: the training rate of one
  call per round, and the host work every search does (sampling, placing
  data, building the result) whatever its strategy."""
  rs = results[1:] or results
  pick = lambda k: _median([r.get(k) for r in rs])
  lane_steps = pick("lane_steps")
  floor = lane_steps / zoom_rate if zoom_rate else None
  segments, host = pick("segments"), pick("host_s")
  beyond = (host - zoom_host) / segments if host is not None and zoom_host is not None and segments else None
  return {"task": task, "method": method, "name": name, "seeds": len(rs), "segments": pick("segments"),
          "wall": pick("wall_s"), "compile": _median([(r["compile_s"] or 0) + (r["trace_s"] or 0) for r in rs]),
          "train_stats": pick("train_s"), "device": pick("device_s"),
          "host": pick("host_s"),
          "host_seg_ms": _ms(pick("host_per_segment_s")), "device_seg_ms": _ms(pick("device_per_segment_s")),
          "zoom_rate_floor": floor,
          "zoom_host": zoom_host, "host_seg_beyond_zoom_ms": _ms(beyond),
          "host_share": (pick("host_s") / (pick("wall_s") - pick("compile_s") - pick("trace_s"))
                         if pick("host_s") is not None else None),
          "wall_over_floor": (pick("wall_s") - pick("compile_s") - pick("trace_s")) / floor if floor else None}


def _ms(v):
  return None if v is None else 1e3 * v


def goal_verdicts(rows, tasks, whens):
  """Per task: which vmaptune methods beat each Optuna variant's median best
  in a fraction of its wall time: ``"warm"`` (median of the seeds after the
  first) and/or ``"cold"`` (the first seed, each method compiling its own
  programs)."""
  out = []
  for task in tasks:
    by = {r["method"]: r for r in rows if r["task"] == task and "median" in r}
    vt_rows = [by[m] for m in VMAPTUNE_METHODS if m in by]
    for ref_key in OPTUNA_METHODS:
      ref = by.get(ref_key)
      if ref is None:
        continue
      for when in whens:
        ref_wall = ref["wall_warm"] if when == "warm" else ref["wall_seed0"]
        winners, better = [], []
        for r in vt_rows:
          wall = r["wall_warm"] if when == "warm" else r["wall_seed0"]
          if r["median"] < ref["median"]:
            better.append(r["method"])
            if wall < ref_wall:
              winners.append({"method": r["method"], "name": r["name"], "median": r["median"],
                              "wall": wall, "wall_fraction": wall / ref_wall})
        out.append({"task": task, "reference": ref_key, "reference_name": ref["name"], "wall": when,
                    "reference_median": ref["median"], "reference_wall": ref_wall, "holds": bool(winners),
                    "winners": winners, "better_score_any_wall": better})
  return out


SWEEP_STEPS = 36


def run_sweep(args, record, t_start):
  """Host and device time per segment of halving and PBT as the population
  grows: diabetes, one width (32: one bucket, one program), S = 36 steps.
  Each size runs twice (seed 0 compiles); the second run is reported."""
  data, source = C.diabetes()
  model_fn = C.model_fn_for(10, 1, 32)
  space = {k: v for k, v in Q.space().items() if k != "hidden"}
  strategies = {"halving": vt.Halving(eta=3, min_fraction=1 / 9), "pbt": vt.PBT(ready=SWEEP_STEPS // 4)}
  rows = []
  print(f"\nsweep: {source}, MLP 10-32-32-1 (one bucket), S = {SWEEP_STEPS}, 3 rounds; "
        f"lanes {args.sweep}", flush=True)
  for n in args.sweep:
    for method, strategy in strategies.items():
      for seed in (0, 1):
        t0 = time.perf_counter()
        result = vt.search(model_fn, data, space, optimizer=optax.adam, num_configs=n, num_steps=SWEEP_STEPS,
                           rounds=3, seed=seed, strategy=strategy, verbose=False)
        wall = time.perf_counter() - t0
      s = result.stats
      compile_s = s.compile_wall_seconds + s.trace_seconds
      split = stats_split(s)
      row = {"lanes": n, "method": method, "wall": wall, "compile": compile_s, "train_stats": s.train_seconds,
             "lane_steps": s.lane_steps, "trials": len(result.trials), "segments": split["segments"],
             "device": split["device_s"], "host": split["host_s"],
             "host_seg_ms": _ms(split["host_per_segment_s"]), "device_seg_ms": _ms(split["device_per_segment_s"]),
             "host_share": split["host_s"] / max(1e-9, wall - compile_s)}
      rows.append(row)
      record["sweep"].append(row)
      C.write_json(args.out, record)
      print(f"  {method:<8} {n:>5} lanes: wall {wall:.2f} s, host {C.fmt(row.get('host'))} s over "
            f"{row['segments']} segments, {row['trials']} trials  [{time.perf_counter() - t_start:.0f} s]",
            flush=True)
  return rows


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  C.pretend_missing(args.without.split(","))
  t_start = time.perf_counter()
  tasks = [t for t in args.tasks.split(",") if t]
  unknown_tasks = [t for t in tasks if t not in TASKS]
  if unknown_tasks:
    raise SystemExit(f"unknown tasks {unknown_tasks}; choose from {tuple(TASKS)}")
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
  optuna = C.optional("optuna")
  budget = args.rounds * args.num_configs * args.steps
  names = {m: method_name(m, args.rounds, args.num_configs, args.steps, args.adaptive, args.recheck) for m in METHODS}
  record = C.header()
  record.update(
      benchmark="strategies", mode="quick" if args.quick else "full",
      settings={"seeds": args.seeds, "first_seed": args.first_seed, "steps": args.steps, "rounds": args.rounds, "num_configs": args.num_configs,
                "budget_lane_steps": budget, "adaptive": args.adaptive, "tasks": tasks, "methods": methods, "method_names": names,
                "halving": {"eta": 3, "min_fraction": 1 / 9, "rungs": [args.steps // 9, args.steps // 3, args.steps]},
                "pbt": {"ready": args.steps // 4, "fraction": 0.25, "resample_probability": 0.25},
                "optuna": {"sampler": "TPESampler(seed)", "pruner": "MedianPruner() (n_startup_trials=5, "
                           "n_warmup_steps=0, interval_steps=1)", "report_every": args.steps // 9},
                "space": {"learning_rate": f"loguniform{Q.LR}", "b1": f"reverse_loguniform{Q.B1}",
                          "hidden": list(Q.WIDTHS), "lr_decay": f"uniform{Q.DECAY}", "batch_size": Q.BATCH}},
      goal="at least one vmaptune strategy beats Optuna TPE + median pruning on every task at a fraction "
           "of its wall time",
      notes=[], runs=[], rows=[], overhead=[], verdicts=[], sweep=[], summary=[])
  notes = record["notes"]
  if optuna is None:
    skipped = [m for m in methods if m in NEEDS_OPTUNA]
    if skipped:
      notes.append(f"optuna is not installed: {', '.join(skipped)} skipped")
    methods = [m for m in methods if m not in NEEDS_OPTUNA]
  print(f"strategies: {record['machine']['description']}; {args.seeds} seeds, S = {args.steps} steps, "
        f"budget {args.rounds} x {args.num_configs} x {args.steps} = {budget:,} lane-steps per search", flush=True)
  rows, overhead = [], []
  for task in tasks:
    spec = TASKS[task]
    data, source = spec["load"]()
    model_fn = C.model_fn_for(spec["in"], spec["out"], Q.WIDTHS[-1])
    print(f"{task}: {source}; score = best completed trial's final {spec['score']}", flush=True)
    per_method = {}
    for method in methods:
      results = []
      for k, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
        if k == 0 and args.cache == "fresh":
          vt.clear_cache()  # each method's first seed pays its own compiles
        if method in OPTUNA_METHODS:
          r = run_optuna(optuna, method, model_fn, data, args, seed)
        else:
          r = run_vmaptune(method, model_fn, data, args, seed)
        r.update(task=task, method=method, name=names[method], seed=seed, data=source,
                 cold=k == 0 and args.cache == "fresh")
        record["runs"].append(r)
        results.append(r)
        C.write_json(args.out, record)  # partial results survive a timeout
        extra = f", {r['segments']} segments" if r.get("segments") else ""
        print(f"  {names[method]:<36} seed {seed}: best {r['best']:.5g}, {r['lane_steps']:,} lane-steps, "
              f"{r['trials']} trials ({r['completed']} completed, {r['diverged']} diverged){extra}, "
              f"{r['wall_s']:.1f} s  [{time.perf_counter() - t_start:.0f} s]", flush=True)
      per_method[method] = results
      row = summarize(task, method, names[method], results, budget)
      rows.append(row)
      record["rows"].append(row)
      record["summary"].append(
          f"{task} / {names[method]}: median best {row['median']:.4g} [{row['min']:.4g}, {row['max']:.4g}], "
          f"{row['lane_steps']:,} lane-steps, wall {row['wall_seed0']:.1f} s seed 0, "
          f"{C.fmt(row['wall_warm'])} s warm")
    if args.retrain:
      t0, cache = time.perf_counter(), {}
      for row in rows:
        if row["task"] == task:
          retrain(model_fn, data, per_method[row["method"]], args, cache)
          row["retrained"] = _median([r["retrained"] for r in per_method[row["method"]]])
      print(f"  re-trained {len(cache)} best configs with {args.retrain} fresh seeds each "
            f"[{time.perf_counter() - t0:.0f} s]", flush=True)
      C.write_json(args.out, record)
    optuna_eq = per_method.get("optuna_eq", ())
    for row in rows:  # paired by seed against Optuna at equal lane-steps (same split, same seed)
      if row["task"] == task and row["method"] in VMAPTUNE_METHODS and optuna_eq:
        for key, column in (("best", "paired_wins"), ("retrained", "retrained_wins")):
          mine = {r["seed"]: r.get(key) for r in per_method[row["method"]]}
          ref = {r["seed"]: r.get(key) for r in optuna_eq}
          if None not in mine.values() and None not in ref.values():  # retrained: not with --retrain 0, nor PBT
            row[column] = C.paired_wins(mine, ref)
    zoom = per_method.get("zoom")
    zoom_rate = zoom_host = None
    if zoom:
      warm = zoom[1:] or zoom
      zoom_rate = _median([r["lane_steps"] / r["train_s"] for r in warm if r["train_s"] > 0])
      zoom_host = _median([r["wall_s"] - r["train_s"] - r["compile_s"] - r["trace_s"] for r in warm])
    for method in STRATEGIES:
      if method in per_method:
        o = overhead_row(task, method, names[method], per_method[method], zoom_rate, zoom_host)
        overhead.append(o)
        record["overhead"].append(o)
        record["summary"].append(
            f"{task} / {method}: {C.fmt(o['segments'])} segments, host {C.fmt(o['host_seg_ms'])} ms/segment, "
            f"in compiled calls {C.fmt(o['device_seg_ms'])} "
            f"ms/segment; (wall - compile) / zoom-rate floor {C.fmt(o['wall_over_floor'])}")
  sweep = run_sweep(args, record, t_start) if args.sweep else []
  whens = (("warm",) if args.seeds > 1 else ()) + (("cold",) if args.cache == "fresh" else ())
  record["verdicts"] = goal_verdicts(rows, tasks, whens)
  record["elapsed_s"] = time.perf_counter() - t_start

  print()
  cols = [("task", "task"), ("name", "method"), ("lane_steps", "lane-steps"), ("budget_share", "x budget"),
          ("median", "median best"), ("min", "min"), ("max", "max"), ("paired_wins", "lower than Optuna ="),
          ("retrained", f"best config re-trained ({args.retrain} seeds)"), ("retrained_wins", "re-trained lower"),
          ("completed", "completed trials"),
          ("wall_median", "wall s median"), ("wall_seed0", "wall s seed 0"), ("wall_warm", "wall s warm")]
  print(C.table(rows, cols))
  print("\nBest so far (median over seeds) once a quarter, a half and all of the lane-step budget was trained:\n")
  print(C.table(rows, [("task", "task"), ("name", "method")]
                + [(f"at_{f:g}", f"{f:g} x budget") for f in FRACTIONS]))
  adaptive = ("adaptive", "adaptive_norc", "adaptive_rc")  # train at most the budget (the re-check's lanes included)
  unequal = [r for r in record["runs"] if r["method"] in VMAPTUNE_METHODS
             and (r["lane_steps"] > budget if r["method"] in adaptive else r["lane_steps"] != budget)]
  for method in adaptive:
    shares = [r["lane_steps"] / budget for r in record["runs"] if r["method"] == method]
    if shares:
      notes.append(f"{method} trains at most the budget: {min(shares):.0%}-{max(shares):.0%} of it here (lanes whose "
                   "trial ends in the last trial-length of population time idle rather than start what cannot finish)")
  if unequal:
    notes.append("UNEQUAL BUDGET: " + "; ".join(f"{r['task']}/{r['method']} seed {r['seed']}: {r['lane_steps']:,}"
                                                 for r in unequal))
  else:
    notes.append(f"every vmaptune search trained exactly {budget:,} lane-steps, the adaptive ones at most that "
                 "(result.stats.lane_steps)")
  notes.append("best = the best completed trial's final validation score (lower is better); median and "
               f"min-max over {args.seeds} seed(s); lane-steps: median over seeds (Optuna's vary with pruning); "
               "lower than Optuna =: seeds on which the method's best is lower than optuna_eq's (same seed), and "
               "the two-sided sign test's p (ties left out); "
               f"best config re-trained: median over seeds of the mean final score of each run's best config "
               f"trained alone with {args.retrain} fresh seeds (the same for every method; 0: not run; not for "
               "PBT, whose best lane changed hyperparameters mid-run), and "
               "re-trained lower: the same pairing on that mean; "
               "best so far: from each run's trace (vmaptune: at each search callback, about once a "
               "trial-length of population time; zoom and batched TPE: after each round, a third of the budget; PBT: at "
               "the end; Optuna: after each trial), inf before the first trace point with a completed trial")
  if args.cache == "fresh":
    notes.append("wall s seed 0: cold, from an empty program cache (each method compiles its own programs); "
                 "warm: median of later seeds, programs cached in this process; median: over all seeds")
  else:
    notes.append("wall s seed 0: --cache shared, so it includes only the compiles earlier methods left undone "
                 "(order-dependent; no cold verdict); warm: median of later seeds; median: over all seeds")

  if overhead:
    print("\nHalving/PBT time per segment (warm seeds, medians), from result.stats: in compiled calls = "
          "stats.train_seconds, host = stats.host_seconds:\n")
    ocols = [("task", "task"), ("method", "strategy"), ("segments", "segments"), ("wall", "wall s"),
             ("device", "in compiled calls s"), ("host", "host s"),
             ("device_seg_ms", "device ms/seg"), ("host_seg_ms", "host ms/seg"), ("zoom_host", "zoom search host s"),
             ("host_seg_beyond_zoom_ms", "host ms/seg beyond zoom's"), ("host_share", "host share"),
             ("zoom_rate_floor", "same lane-steps at zoom rate s"), ("wall_over_floor", "(wall-compile)/floor")]
    print(C.table(overhead, ocols))
    notes.append("strategy segments: halving 3*S/(S/9) = 27, PBT 3*S/(S/4) = 12; each is one compiled call per "
                 "bucket (3 widths here) plus a fetch of its metrics. host share = host / (wall - compile); "
                 "floor = the same lane-steps at the warm zoom search's stats.lane_steps_per_second; "
                 "zoom search host = its wall - train - compile (sampling, data placement, result: every "
                 "search pays it), and host ms/seg beyond zoom's = (host - that) / segments")

  if sweep:
    print(f"\nHost overhead as the population grows (diabetes, one width, S = {SWEEP_STEPS}; the second of two "
          "runs, programs cached):\n")
    print(C.table(sweep, [("method", "strategy"), ("lanes", "lanes"), ("trials", "trials"),
                          ("segments", "segments"), ("wall", "wall s"), ("device", "in compiled calls s"),
                          ("host", "host s"), ("device_seg_ms", "device ms/seg"), ("host_seg_ms", "host ms/seg"),
                          ("host_share", "host share")]))
    for r in sweep:
      record["summary"].append(f"sweep {r['method']} {r['lanes']} lanes: host {C.fmt(r.get('host_seg_ms'))} "
                               f"ms/segment, device {C.fmt(r.get('device_seg_ms'))} ms/segment, "
                               f"host share {C.fmt(r.get('host_share'))}")
  elif args.quick:
    notes.append("no population sweep in --quick (add --sweep 32,256,1024)")

  print(f"\nGoal: {record['goal']}.")
  if not record["verdicts"]:
    why = ("optuna is missing" if optuna is None else "no Optuna method ran" if not any(
        m in OPTUNA_METHODS for m in methods) else "one seed and --cache shared give no comparable wall time")
    print(f"  no verdict: {why}")
    record["summary"].append(f"goal: no verdict ({why})")
  for v in record["verdicts"]:
    label = (f"{v['task']} vs {v['reference_name']} ({v['wall']}, {v['reference_median']:.4g} in "
             f"{v['reference_wall']:.1f} s)")
    if v["holds"]:
      how = ", ".join(f"{w['name']} ({w['median']:.4g}, {w['wall_fraction']:.2f}x the wall time)" for w in v["winners"])
      print(f"  HOLDS  {label}: {how}")
    else:
      why = ("no vmaptune method reached a better median score" if not v["better_score_any_wall"]
             else f"better scores ({', '.join(v['better_score_any_wall'])}) but not in less wall time")
      print(f"  FAILS  {label}: {why}")
    record["summary"].append(f"goal {'HOLDS' if v['holds'] else 'FAILS'}: {label}"
                             + (": " + ", ".join(w["method"] for w in v["winners"]) if v["holds"] else ""))
  for ref in OPTUNA_METHODS:
    for when in whens:
      vs = [v for v in record["verdicts"] if v["reference"] == ref and v["wall"] == when]
      if vs:
        every = all(v["holds"] for v in vs)
        line = (f"vs {names[ref]} ({when} wall times): the goal {'holds' if every else 'does NOT hold'} on every "
                f"task" + ("" if every else " (fails on " + ", ".join(v["task"] for v in vs if not v["holds"]) + ")"))
        print("  => " + line)
        record["summary"].append(line)
  return C.finish(args.out, record, notes)


if __name__ == "__main__":
  sys.exit(main())
