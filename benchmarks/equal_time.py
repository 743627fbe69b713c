"""The best model per second: vmaptune against Optuna TPE + median pruning, in equal wall time.

Every contender runs in a fresh process with the same wall-clock budget
(``--budgets 40,10`` seconds) on the same train/validation split (split seed
= run seed), the same space, model and steps per trial (S = 500), and is
scored the same way: the best *completed* trial's final validation loss.

Contenders:

  * ``optuna``: ``optuna.create_study(sampler=TPESampler(seed), pruner=MedianPruner())``
    and ``study.optimize(objective, timeout=T)``. Each trial trains a plain
    jitted ``lax.scan`` of 100 steps at a time (one compiled program per
    model shape, learning rate, β1 and decay passed as arrays so new values
    never recompile), reports the validation loss after each chunk and stops
    when ``trial.should_prune()``; the lane-steps it trains are counted.
  * ``auto``: ``vt.search(model_fn, data, space, num_steps=S, timeout=T)`` with
    every other argument at its default (``strategy="auto"``, which picks
    the adaptive strategy: TPE refills and median pruning over ``num_configs``
    = 64 lanes; ``recheck="auto"``: its top 4 configs re-trained with 4 fresh
    seeds in the time it held back for them, keeping the best mean).
  * ``auto_norc``: the same with ``recheck=None`` (the default before the
    re-check: it keeps its best score's trial).
  * ``zoom`` / ``halving``: the same call with ``strategy="zoom"`` /
    ``strategy="halving"`` (``--methods``), for the record.

vmaptune's persistent compilation cache points at an empty folder in every
run: each search pays its own compiles, as a user's first run does. A trace
of (seconds, lane-steps, best so far) is kept for every run (Optuna: after
each trial; vmaptune: at each callback, once per trial-length of population
time), so the JSON holds best-so-far against wall time and lane-steps, and
each run's best config (``best_config``) for re-training it with other seeds
(a search's best score is the luckiest of its trials' draws: see
``strategies.py --retrain``).

Tasks (scikit-learn's bundled data):

  * ``digits``: 8x8 digit images as 64 features, MLP, validation cross-entropy;
  * ``diabetes``: regression, standardised x and y, MLP, validation MSE;
  * ``breast_cancer``: binary classification, standardised x, MLP, cross-entropy;
  * ``digits_cnn``: the digit images as 8x8x1 images, a small CNN (``hidden``
    channels, ``num_layers`` 3x3 convolutions, global average pool, linear);
  * ``digits_cnn16`` (not in the default ``--tasks``): the same CNN with its
    shape fixed at 16 channels and 2 convolutions, as when a user tunes the
    optimizer of one model; learning rate, β1 and decay are searched.

Space: learning rate log-uniform [1e-4, 1e-1], β1 reverse-log-uniform
[0.8, 0.999], hidden in {32, 64, 128} (CNN: channels {8, 16, 32}),
num_layers in {1, 2}, lr_decay uniform [0, 0.5] (inverse time per epoch),
batch 64, Adam.

    PYTHONPATH=. python benchmarks/equal_time.py [--quick] [--budgets 40,10] [--seeds 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

T_PROCESS = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (imports vmaptune first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

import vmaptune as vt  # noqa: E402

S = 500
CHUNK = 100
BATCH = 64
TASKS = ("digits", "diabetes", "breast_cancer", "digits_cnn")
EXTRA_TASKS = ("digits_cnn16",)
METHODS = ("optuna", "auto", "auto_norc", "zoom", "halving")
OUTPUTS = {"digits": 10, "diabetes": 1, "breast_cancer": 2, "digits_cnn": 10, "digits_cnn16": 10}
WIDTHS = {"digits_cnn": (8, 16, 32)}
FIXED = {"digits_cnn16": {"hidden": 16, "num_layers": 2}}  # the model's shape, not searched


# --------------------------------------------------------------------------
# Tasks: data, model, space
# --------------------------------------------------------------------------


def load(task: str, seed: int) -> dict:
  """``{"train": (x, y), "val": (x, y)}`` split by ``seed``."""
  from sklearn import datasets

  if task in ("digits", "digits_cnn", "digits_cnn16"):
    x, y = datasets.load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    if task.startswith("digits_cnn"):
      x = x.reshape(-1, 8, 8, 1)
    (xt, yt), (xv, yv) = C._split(x, y, 0.2, seed)
    return {"train": (xt, yt), "val": (xv, yv)}
  if task == "breast_cancer":
    data, _ = C.breast_cancer(0.2, seed)
    return data
  if task == "diabetes":
    data, _ = C.diabetes(0.2, seed)
    return data
  raise ValueError(f"unknown task {task!r}; choose from {TASKS + EXTRA_TASKS}")


class MLP(nnx.Module):
  def __init__(self, din, hidden, num_layers, dout, rngs):
    self.layers = nnx.List([nnx.Linear(din if i == 0 else hidden, hidden, rngs=rngs) for i in range(num_layers)])
    self.out = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.out(x)


class CNN(nnx.Module):
  def __init__(self, channels, num_layers, dout, rngs):
    self.convs = nnx.List([nnx.Conv(1 if i == 0 else channels, channels, (3, 3), rngs=rngs)
                           for i in range(num_layers)])
    self.out = nnx.Linear(channels, dout, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.out(x.mean(axis=(1, 2)))


def model_fn_for(task: str, data: dict):
  dout = OUTPUTS[task]
  din = data["train"][0].shape[-1]

  def model_fn(config, rngs):
    if task.startswith("digits_cnn"):
      return CNN(int(config["hidden"]), int(config["num_layers"]), dout, rngs)
    return MLP(din, int(config["hidden"]), int(config["num_layers"]), dout, rngs)

  return model_fn


def space(task: str) -> dict:
  return {
      "learning_rate": vt.loguniform(1e-4, 1e-1),
      "b1": vt.reverse_loguniform(0.8, 0.999),
      "hidden": vt.choice(list(WIDTHS.get(task, (32, 64, 128)))),
      "num_layers": vt.integer(1, 2),
      "lr_decay": vt.uniform(0.0, 0.5),
      "batch_size": BATCH,
      **FIXED.get(task, {}),
  }


# --------------------------------------------------------------------------
# The contenders (each in its own process)
# --------------------------------------------------------------------------


def _loss(task):
  if task == "diabetes":
    return lambda out, y: (out[:, 0] - y) ** 2
  return lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out, y)


class Trainer:
  """One model shape's plain JAX training: a jitted init and a jitted scan of
  ``CHUNK`` Adam steps (hyperparameters as arrays: no recompiles)."""

  def __init__(self, task, model_fn, config, data):
    self.model_fn, self.config = model_fn, config
    x, y = (jnp.asarray(a) for a in data["train"])
    xv, yv = (jnp.asarray(a) for a in data["val"])
    n = x.shape[0]
    spe = n // BATCH
    loss = _loss(task)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_fn(config, nnx.Rngs(0))))
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b1=0.9)

    def init(key, b1):
      _, params = nnx.split(model_fn(config, nnx.Rngs(key)))
      state = opt.init(params)
      state.hyperparams["b1"] = b1
      return params, state

    def batch_loss(params, xb, yb):
      return jnp.mean(loss(nnx.merge(graphdef, params)(xb), yb))

    def chunk(params, opt_state, key, step0, lr0, decay):
      order = lambda step: jax.random.permutation(jax.random.fold_in(key, step // spe), n)

      def body(carry, step):
        params, opt_state, perm = carry
        perm = lax.cond(step % spe == 0, order, lambda _: perm, step)  # a new order once per epoch
        epoch = step // spe
        idx = lax.dynamic_slice_in_dim(perm, (step % spe) * BATCH, BATCH)
        value, grads = jax.value_and_grad(batch_loss)(params, x[idx], y[idx])
        opt_state.hyperparams["learning_rate"] = lr0 / (1.0 + decay * epoch.astype(jnp.float32))
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, perm), value

      carry = (params, opt_state, order(step0))
      (params, opt_state, _), _ = lax.scan(body, carry, step0 + jnp.arange(CHUNK))
      return params, opt_state, batch_loss(params, xv, yv)

    self.init = jax.jit(init)
    self.chunk = jax.jit(chunk)


def run_optuna(task: dict) -> dict:
  import optuna

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  name, seed, budget = task["task"], task["seed"], task["budget"]
  data = load(name, seed)
  model_fn = model_fn_for(name, data)
  widths = WIDTHS.get(name, (32, 64, 128))
  trainers: dict = {}
  tally = {"lane_steps": 0, "best": math.inf, "best_config": None, "trials": 0, "completed": 0, "diverged": 0}
  trace = []

  fixed = FIXED.get(name)

  def objective(trial):
    config = {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True),
        "b1": 1.0 - trial.suggest_float("one_minus_b1", 1 - 0.999, 1 - 0.8, log=True),
        "hidden": fixed["hidden"] if fixed else trial.suggest_categorical("hidden", list(widths)),
        "num_layers": fixed["num_layers"] if fixed else trial.suggest_int("num_layers", 1, 2),
        "lr_decay": trial.suggest_float("lr_decay", 0.0, 0.5),
    }
    shape = (config["hidden"], config["num_layers"])
    if shape not in trainers:
      trainers[shape] = Trainer(name, model_fn, config, data)
    tr = trainers[shape]
    k_init, k_data = jax.random.split(jax.random.key(seed * 100_003 + trial.number))
    params, opt_state = tr.init(k_init, jnp.float32(config["b1"]))
    lr, decay = jnp.float32(config["learning_rate"]), jnp.float32(config["lr_decay"])
    tally["trials"] += 1
    value = math.inf
    for step in range(0, S, CHUNK):
      params, opt_state, val = tr.chunk(params, opt_state, k_data, jnp.int32(step), lr, decay)
      value = float(val)
      tally["lane_steps"] += CHUNK
      if not math.isfinite(value):
        tally["diverged"] += 1
        return math.inf
      trial.report(value, step + CHUNK)
      if step + CHUNK < S and trial.should_prune():
        raise optuna.TrialPruned()
    tally["completed"] += 1
    if value < tally["best"]:
      tally["best"], tally["best_config"] = value, config
    trace.append([time.perf_counter() - t0, tally["lane_steps"], tally["best"]])
    return value

  t0 = time.perf_counter()
  study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), pruner=optuna.pruners.MedianPruner())
  study.optimize(objective, timeout=budget)
  wall = time.perf_counter() - t0
  return {"best": tally["best"], "lane_steps": tally["lane_steps"], "trials": tally["trials"],
          "completed": tally["completed"], "diverged": tally["diverged"], "call_s": wall, "best_config": tally["best_config"],
          "process_to_end_s": time.perf_counter() - T_PROCESS, "trace": trace}


def run_vmaptune(task: dict) -> dict:
  name, seed, budget, method = task["task"], task["seed"], task["budget"], task["method"]
  data = load(name, seed)
  trace = []
  t0 = time.perf_counter()

  def callback(result):
    ok = [t.score for t in result.trials if t.status == "ok" and math.isfinite(t.score)]
    trace.append([time.perf_counter() - t0, result.stats.lane_steps, min(ok) if ok else math.inf])

  extra = {"recheck": None} if method == "auto_norc" else {}
  result = vt.search(model_fn_for(name, data), data, space(name), num_steps=S, seed=seed, timeout=budget,
                     strategy=method if method in ("zoom", "halving") else "auto", callbacks=[callback],
                     verbose=False, **extra)
  wall = time.perf_counter() - t0
  st = result.stats
  ok = [t.score for t in result.trials if t.status == "ok" and math.isfinite(t.score)]
  callback(result)
  return {"best": min(ok) if ok else math.inf, "lane_steps": st.lane_steps, "trials": len(result.trials),
          "completed": len(ok), "diverged": sum(t.status == "diverged" for t in result.trials),
          "strategy": result.options.get("strategy"), "call_s": wall, "best_config": result.best_config if ok else None,
          "kept": result.best_score if ok else math.inf,
          "recheck": None if result.rechecked is None else {
              "size": list(result.rechecked.scores.shape), "seconds": result.rechecked.seconds,
              "kept_best_score": result.best_trial.id == result.ranked()[0].id},
          "process_to_end_s": time.perf_counter() - T_PROCESS, "trace": trace,
          "phases": {"trace_s": st.trace_seconds, "compile_wall_s": st.compile_wall_seconds,
                     "train_s": st.train_seconds, "host_s": st.host_seconds, "segments": st.segments}}


HANDLERS = {"optuna": run_optuna, "vmaptune": run_vmaptune}


# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="digits only, 1 seed, a 10 s budget (about 1 minute)")
  p.add_argument("--budgets", default=None, help="comma-separated seconds (default 40,10)")
  p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 5)")
  p.add_argument("--first-seed", type=int, default=0)
  p.add_argument("--tasks", default=None, help=f"comma-separated, from {TASKS}")
  p.add_argument("--methods", default="optuna,auto", help=f"comma-separated, from {METHODS}")
  p.add_argument("--out", default=C.default_out("equal_time"), help="JSON output path")
  p.add_argument("--retrain", type=int, default=0, metavar="K",
                 help="re-train each run's kept config (vmaptune: result.best_config; Optuna: its best trial's) "
                      "alone with K fresh seeds (vt.train, seeds 10,000+k, the run's split) and report the mean: "
                      "the config's worth without the luck of its search's draw (default 0: not run)")
  p.add_argument("--summarize", metavar="JSON", default=None,
                 help="print the tables of an earlier run's JSON (and rewrite its rows) instead of running")
  args = p.parse_args(argv)
  if args.quick:
    args.budgets = args.budgets or "10"
    args.seeds = args.seeds or 1
    args.tasks = args.tasks or "digits"
  args.budgets = [float(b) for b in (args.budgets or "40,10").split(",")]
  args.seeds = args.seeds or 5
  args.tasks = (args.tasks or ",".join(TASKS)).split(",")
  args.methods = args.methods.split(",")
  for m in args.methods:
    if m not in METHODS:
      raise SystemExit(f"unknown method {m!r}; choose from {METHODS}")
  return args


def within(run: dict) -> float:
  """The run's best among trials finished within its budget: Optuna does not
  interrupt a trial at its ``timeout`` (a slow model's can end well past it),
  so its trace is cut at the budget; vmaptune's final best counts when its
  call ended within 2% of the budget (its trace has a point once per
  trial-length of population time only), else its trace is cut too."""
  budget = run["budget"]
  if run["method"] != "optuna" and run["call_s"] <= 1.02 * budget:
    return run["best"]
  return C.best_at(run["trace"], seconds=budget)


def retrain(record: dict, k: int) -> None:
  """Each run's kept config trained alone with ``k`` fresh seeds: its mean
  final validation score (``inf`` if a seed diverged) as ``run["retrained"]``."""
  record["settings"]["retrain"] = k
  cache = {}
  for r in record["runs"]:
    if "error" in r or not r.get("best_config"):
      continue
    config = {"batch_size": BATCH, **FIXED.get(r["task"], {}), **r["best_config"]}
    key = (r["task"], r["seed"], repr(sorted(config.items())))
    if key not in cache:
      data = load(r["task"], r["seed"])
      model_fn = model_fn_for(r["task"], data)
      cache[key] = float(np.mean([vt.train(model_fn, data, config, optimizer=optax.adam, seed=10_000 + j,
                                           num_steps=S, verbose=False).score for j in range(k)]))
    r["retrained"] = cache[key]
  print(f"re-trained {len(cache)} kept configs with {k} fresh seeds each", flush=True)


def summarize(record: dict) -> None:
  """The rows (medians over seeds, paired wins against Optuna) and their tables."""
  runs = [r for r in record["runs"] if "error" not in r]
  record["rows"] = []
  for budget in record["settings"]["budgets_s"]:
    for name in record["settings"]["tasks"]:
      cell = [r for r in runs if r["budget"] == budget and r["task"] == name]
      ref = {r["seed"]: r for r in cell if r["method"] == "optuna"}
      for method in record["settings"]["methods"]:
        ok = [r for r in cell if r["method"] == method]
        if not ok:
          continue
        bests = [r["best"] for r in ok]
        inside = [within(r) for r in ok]
        wins = C.paired_wins({r["seed"]: r["best"] for r in ok}, {s: r["best"] for s, r in ref.items()})
        wins_inside = C.paired_wins({r["seed"]: within(r) for r in ok}, {s: within(r) for s, r in ref.items()})
        row = {"budget_s": budget, "task": name, "method": method, "median": float(np.median(bests)),
               "min": min(bests), "max": max(bests), "lane_steps": float(np.median([r["lane_steps"] for r in ok])),
               "trials": float(np.median([r["trials"] for r in ok])),
               "completed": float(np.median([r["completed"] for r in ok])),
               "max_call_s": max(r["call_s"] for r in ok),
               "beats_optuna": "-" if method == "optuna" else wins,
               "median_within": float(np.median(inside)),
               "beats_optuna_within": "-" if method == "optuna" else wins_inside,
               "seeds": len(ok)}
        if all(r.get("retrained") is not None for r in ok + list(ref.values())):
          row["retrained"] = float(np.median([r["retrained"] for r in ok]))
          row["retrained_beats_optuna"] = "-" if method == "optuna" else C.paired_wins(
              {r["seed"]: r["retrained"] for r in ok}, {s: r["retrained"] for s, r in ref.items()})
        record["rows"].append(row)
  print()
  print(C.table(record["rows"], [("budget_s", "budget s"), ("task", "task"), ("method", "method"),
                                 ("median", "median best"), ("min", "min"), ("max", "max"),
                                 ("lane_steps", "lane-steps"), ("trials", "trials"), ("completed", "completed"),
                                 ("max_call_s", "longest call s"), ("beats_optuna", "beats Optuna (paired)"),
                                 ("median_within", "median best within budget"),
                                 ("beats_optuna_within", "beats Optuna within budget"),
                                 ("retrained", "kept config re-trained"),
                                 ("retrained_beats_optuna", "re-trained beats Optuna")]))
  record["notes"][:] = [
      "best = the best completed trial's final validation loss (lower is better); median, min and max over "
      "seeds; lane-steps and trials: medians; 'beats Optuna': seeds where the method's best is lower than "
      "Optuna's on the same split, and the two-sided sign test's p (ties left out: both 0 on a split the model "
      "separates perfectly)",
      "within budget: only trials that finished within the budget count (Optuna does not interrupt a trial "
      "at its timeout; 'longest call s' shows how far past it a run went)",
      "kept config re-trained (--retrain K): the median over seeds of the mean final validation loss of the "
      "config each run keeps (vmaptune: result.best_config, the re-check's best mean when it re-checked; "
      "Optuna: its best trial's), trained alone with K fresh seeds on the run's split; paired against Optuna's"]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if C.child_main(argv, HANDLERS):
    return 0
  args = parse_args(argv)
  if args.summarize:
    import json

    with open(args.summarize) as f:
      record = json.load(f)
    summarize(record)
    return C.finish(args.summarize, record, record["notes"])
  t_start = time.perf_counter()
  record = C.header()
  record.update(benchmark="equal_time", settings={
      "budgets_s": args.budgets, "seeds": args.seeds, "first_seed": args.first_seed, "tasks": args.tasks,
      "methods": args.methods, "steps_per_trial": S, "optuna_chunk": CHUNK, "batch": BATCH},
      runs=[], rows=[], notes=[])
  print(f"equal_time: {record['machine']['description']}; budgets {args.budgets} s, {args.seeds} seeds, "
        f"S = {S}", flush=True)
  for budget in args.budgets:
    for name in args.tasks:
      for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method in args.methods:
          kind = "optuna" if method == "optuna" else "vmaptune"
          with tempfile.TemporaryDirectory() as cache:
            os.environ["VMAPTUNE_CACHE_DIR"] = cache  # every run compiles from scratch
            r = C.run_child(__file__, {"kind": kind, "task": name, "seed": seed, "budget": budget,
                                       "method": method}, timeout=budget * 3 + 120)
          r.update(task=name, seed=seed, budget=budget, method=method)
          record["runs"].append(r)
          C.write_json(args.out, record)
          if "error" in r:
            print(f"  {budget:g}s {name} seed {seed} {method}: ERROR {r['error']}", flush=True)
            continue
          print(f"  {budget:g}s {name:<13} seed {seed} {method:<8} best {r['best']:.4f}  "
                f"{r['lane_steps']:>9,} lane-steps  {r['trials']:>5} trials ({r['completed']} completed)  "
                f"call {r['call_s']:.1f} s, process {r['process_seconds']:.1f} s  "
                f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
  if args.retrain:
    retrain(record, args.retrain)
  record["elapsed_s"] = time.perf_counter() - t_start
  summarize(record)
  return C.finish(args.out, record, record["notes"])


if __name__ == "__main__":
  sys.exit(main())
