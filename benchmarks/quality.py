"""Search quality at equal budget: the best validation score 96 trials find.

Every method gets the same number of trials (96) and every trial the same
number of steps, on the same train/validation split (``data={"train": ...,
"val": ...}``); a trial's score is its validation score at the end of its
budget, as vmaptune measures it. Methods:

  * ``vmaptune zoom``:   ``search(rounds=3, num_configs=32)`` (random, then two zoom rounds);
  * ``vmaptune random``: ``search(rounds=1, num_configs=96)``;
  * ``vmaptune grid``:   ``search(sampler="grid", num_configs=96)`` (the largest full grid <= 96);
  * ``optuna TPE``:      96 sequential Optuna trials (``TPESampler(seed)``), each trained by
    ``vmaptune.train`` (one config alone, no vmap, one compiled program per
    width reused across trials) and scored by its ``Run.score``: the final
    validation score, exactly what a vmaptune lane reports.

Tasks (scikit-learn's bundled data; synthetic data of the same shapes where
scikit-learn is missing):

  * digits:   MLP 64-h-h-10 classifier; score: validation cross-entropy (lower is better);
  * diabetes: MLP 10-h-h-1 regressor, x and y standardised with the training
    split's statistics; score: validation MSE in standardised units.

Space: learning rate log-uniform [1e-4, 1e-1], β1 reverse-log-uniform
[0.8, 0.999], hidden width h in {32, 64, 128}, lr_decay uniform [0, 1]
(inverse-time per epoch), batch 64, Adam.

    PYTHONPATH=. python benchmarks/quality.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (imports vmaptune first)

import numpy as np  # noqa: E402
import optax  # noqa: E402

import vmaptune as vt  # noqa: E402

TASKS = {
    "digits": {"load": C.digits, "in": 64, "out": 10, "score": "validation cross-entropy"},
    "diabetes": {"load": C.diabetes, "in": 10, "out": 1, "score": "validation MSE (standardised y)"},
}
METHODS = ("zoom", "random", "grid", "tpe")
METHOD_NAMES = {"zoom": "vmaptune zoom 3x{third}", "random": "vmaptune random {budget}",
                "grid": "vmaptune grid <={budget}", "tpe": "optuna TPE {budget} + vt.train"}


def method_name(method: str, budget: int) -> str:
  return METHOD_NAMES[method].format(budget=budget, third=budget // 3)
LR = (1e-4, 1e-1)
B1 = (0.8, 0.999)
WIDTHS = (32, 64, 128)
DECAY = (0.0, 1.0)
BATCH = 64


def space():
  return {"learning_rate": vt.loguniform(*LR), "b1": vt.reverse_loguniform(*B1), "hidden": vt.choice(list(WIDTHS)),
          "lr_decay": vt.uniform(*DECAY), "batch_size": BATCH}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="2 seeds, 100 steps (under 3 min on 2 CPU cores)")
  p.add_argument("--gpu", action="store_true", help="accepted for symmetry; the settings are the same")
  p.add_argument("--out", default=C.default_out("quality"), help="JSON output path")
  p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5; --quick 2)")
  p.add_argument("--steps", type=int, default=None, help="steps per trial (default 500; --quick 100)")
  p.add_argument("--budget", type=int, default=96, help="trials per method (default 96; zoom: 3 rounds of budget/3)")
  p.add_argument("--tasks", default="digits,diabetes")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--without", default="", help="treat these packages as missing, e.g. sklearn,optuna")
  return p.parse_args(argv)


def run_vmaptune(method, model_fn, data, steps, budget, seed):
  kw = dict(optimizer=optax.adam, num_steps=steps, seed=seed, metric="loss", verbose=False)
  if method == "zoom":
    kw.update(rounds=3, num_configs=budget // 3, strategy="zoom")
  elif method == "random":
    kw.update(rounds=1, num_configs=budget)
  else:
    kw.update(rounds=1, num_configs=budget, sampler="grid")
  t0 = time.perf_counter()
  result = vt.search(model_fn, data, space(), **kw)
  wall = time.perf_counter() - t0
  s = result.stats
  return {"best": result.best_score, "wall_s": wall, "trials": len(result.trials),
          "diverged": sum(t.status != "ok" for t in result.trials), "best_config": result.best_config,
          "train_s": s.train_seconds, "compile_s": s.compile_seconds + s.trace_seconds,
          "programs_compiled": s.programs_compiled}


def run_tpe(optuna, model_fn, data, steps, budget, seed):
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  train_s = [0.0]
  diverged = [0]

  def objective(trial):
    config = {
        "learning_rate": trial.suggest_float("learning_rate", LR[0], LR[1], log=True),
        "b1": 1.0 - trial.suggest_float("one_minus_b1", 1 - B1[1], 1 - B1[0], log=True),
        "hidden": trial.suggest_categorical("hidden", list(WIDTHS)),
        "lr_decay": trial.suggest_float("lr_decay", *DECAY),
        "batch_size": BATCH,
    }
    t0 = time.perf_counter()
    run = vt.train(model_fn, data, config, optimizer=optax.adam, seed=seed * 100_003 + trial.number,
                   num_steps=steps, metric="loss", verbose=False)
    train_s[0] += time.perf_counter() - t0
    if run.status != "ok":
      diverged[0] += 1
    return run.score  # +inf when diverged, as in vmaptune

  study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize")
  t0 = time.perf_counter()
  study.optimize(objective, n_trials=budget)
  wall = time.perf_counter() - t0
  best = study.best_trial
  cfg = dict(best.params)
  cfg["b1"] = 1.0 - cfg.pop("one_minus_b1")
  return {"best": float(best.value), "wall_s": wall, "trials": len(study.trials), "diverged": diverged[0],
          "best_config": cfg, "train_s": train_s[0], "compile_s": None, "programs_compiled": None}


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  C.pretend_missing(args.without.split(","))
  t_start = time.perf_counter()
  seeds = args.seeds or (2 if args.quick else 5)
  steps = args.steps or (100 if args.quick else 500)
  tasks = [t for t in args.tasks.split(",") if t]
  methods = [m for m in args.methods.split(",") if m]
  optuna = C.optional("optuna")
  record = C.header()
  record.update(benchmark="quality", mode="quick" if args.quick else "full",
                settings={"seeds": seeds, "steps": steps, "budget": args.budget, "tasks": tasks, "methods": methods,
                          "space": {"learning_rate": f"loguniform{LR}", "b1": f"reverse_loguniform{B1}",
                                    "hidden": list(WIDTHS), "lr_decay": f"uniform{DECAY}", "batch_size": BATCH}},
                notes=[], runs=[], summary=[])
  notes = record["notes"]
  if "tpe" in methods and optuna is None:
    notes.append("optuna is not installed: TPE skipped")
  print(f"quality: {record['machine']['description']}; {seeds} seeds, {steps} steps/trial, "
        f"{args.budget} trials/method", flush=True)
  rows = []
  for task in tasks:
    spec = TASKS[task]
    data, source = spec["load"]()
    model_fn = C.model_fn_for(spec["in"], spec["out"], WIDTHS[-1])
    print(f"{task}: {source}; score = {spec['score']}", flush=True)
    for method in methods:
      if method == "tpe" and optuna is None:
        rows.append({"task": task, "method": method_name(method, args.budget), "best": "skipped: optuna missing"})
        continue
      results = []
      for seed in range(seeds):
        if method == "tpe":
          r = run_tpe(optuna, model_fn, data, steps, args.budget, seed)
        else:
          r = run_vmaptune(method, model_fn, data, steps, args.budget, seed)
        r.update(task=task, method=method, seed=seed, data=source)
        record["runs"].append(r)
        results.append(r)
        C.write_json(args.out, record)  # partial results survive a timeout
        print(f"  {method_name(method, args.budget):<26} seed {seed}: best {r['best']:.5g}, {r['trials']} trials "
              f"({r['diverged']} diverged), {r['wall_s']:.1f} s  [{time.perf_counter() - t_start:.0f} s]",
              flush=True)
      best = np.asarray([r["best"] for r in results], np.float64)
      walls = [r["wall_s"] for r in results]
      q25, q75 = np.percentile(best, [25, 75])
      row = {"task": task, "method": method_name(method, args.budget), "median": float(np.median(best)),
             "min": float(best.min()), "max": float(best.max()), "iqr": f"{C.fmt(q25, 4)}-{C.fmt(q75, 4)}",
             "trials": results[0]["trials"], "diverged": float(np.median([r["diverged"] for r in results])),
             "wall_first": walls[0], "wall_later": float(np.median(walls[1:])) if len(walls) > 1 else None}
      rows.append(row)
      record["summary"].append(
          f"{task} / {method_name(method, args.budget)}: median best {row['median']:.4g} "
          f"[{row['min']:.4g}, {row['max']:.4g}], wall {row['wall_first']:.1f} s first, "
          f"{C.fmt(row['wall_later'])} s median later")
  cols = [("task", "task"), ("method", "method"), ("trials", "trials"), ("median", "median best"),
          ("min", "min"), ("max", "max"), ("iqr", "IQR"), ("diverged", "diverged (median)"),
          ("wall_first", "wall s, seed 0"), ("wall_later", "wall s, median of later seeds")]
  record["elapsed_s"] = time.perf_counter() - t_start
  notes.append("best = the lowest final validation score among the method's trials (lower is better); "
               f"median, min-max and IQR over {seeds} seeds")
  notes.append("wall s, seed 0 includes compiling; later seeds reuse the programs compiled in this process "
               "(vmaptune caches them by model and data shapes; vt.train likewise)")
  if any(r["trials"] != args.budget for r in record["runs"]):
    notes.append("grid: the largest full grid with at most the budget's points")
  print()
  print(C.table(rows, [c for c in cols]))
  return C.finish(args.out, record, notes)


if __name__ == "__main__":
  sys.exit(main())
