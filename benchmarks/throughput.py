"""Throughput: the same N configs trained five ways, lane-steps per second.

Model: MLP 64-128-128-10 (Flax NNX) on digits, batch 64, Adam with learning
rate log-uniform in [1e-4, 1e-2] and β1 reverse-log-uniform in [0.8, 0.999];
every config has its own init and data order. Peers:

  (a)  a Python loop over a jitted Adam step, one config after another;
       mini-batches gathered on the host from a per-epoch NumPy permutation;
  (b)  one jitted ``lax.scan`` over all steps per config (init, steps and the
       final validation pass in one program; hyperparameters traced through
       ``optax.inject_hyperparams``, so no recompiles), one config after
       another;
  (b2) (b) dealt round-robin over all devices by hand (``device_put`` to
       device i % D, dispatch everything, then block);
  (c)  Optuna ``RandomSampler``, N sequential trials of (b) (the same configs,
       enqueued);
  (d)  ``vmaptune.search(rounds=1, num_configs=N, enqueue=<the same N configs>)``.

Each peer and N runs in a fresh subprocess (clean compile time and peak RSS).
(a), (b), (b2), (c) are timed after a warm-up run of one config (the first
call, which compiles); (d) is called twice, cold and warm (its program is then
cached), and reports ``stats.lane_steps_per_second`` (training time only) and
whole-call wall time. Every number sits next to its ceiling: FLOPs per
lane-step from XLA's cost analysis and a measured large-matmul rate.

    PYTHONPATH=. python benchmarks/throughput.py [--quick] [--gpu] [--check] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (imports vmaptune first)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import vmaptune as vt  # noqa: E402

SIZES = (64, 128, 128, 10)
BATCH = 64
LR = (1e-4, 1e-2)
B1 = (0.8, 0.999)
PEERS = ("b", "d", "b2", "a", "c")  # run order within one N: the reference first
PEER_NAMES = {
    "a": "(a) Python loop, jitted step",
    "b": "(b) jitted scan per config",
    "b2": "(b2) (b) round-robin over devices",
    "c": "(c) Optuna RandomSampler + (b)",
    "d": "(d) vmaptune.search",
}


def space():
  return {"learning_rate": vt.loguniform(*LR), "b1": vt.reverse_loguniform(*B1), "batch_size": BATCH}


# --------------------------------------------------------------------------
# Child processes: one peer at one N
# --------------------------------------------------------------------------


def _setup(task):
  data, source = C.digits()
  configs = C.sample_configs(task["n"], seed=1234, lr=LR, b1=B1)
  f = C.Functional(SIZES, "classification", BATCH, len(data["train"][0]))
  return data, source, configs, f


def _timed_configs(task, configs):
  k = task.get("max_seq") or len(configs)
  return configs[:k]


def child_a(task):
  data, source, configs, f = _setup(task)
  steps = task["steps"]
  xt, yt = data["train"]
  dev = jax.devices()[0]
  xv, yv = (jax.device_put(a, dev) for a in data["val"])
  init = jax.jit(f.init_state)
  step = jax.jit(f.step)
  val = jax.jit(f.val_loss)
  n, b, spe = f.num_train, f.batch_size, f.steps_per_epoch

  def run(i, cfg):
    params, opt_state = init(jax.random.key(i), np.float32(cfg["learning_rate"]), np.float32(cfg["b1"]))
    rng = np.random.default_rng(i)
    for s in range(steps):
      j = s % spe
      if j == 0:
        perm = rng.permutation(n)
      idx = perm[j * b:(j + 1) * b]
      params, opt_state, _ = step(params, opt_state, xt[idx], yt[idx])
    return float(val(params, xv, yv))

  return _time_sequential(run, task, configs, steps, source)


def _seq_result(first, seconds, k, steps, scores, source):
  per_config = seconds / k
  return {
      "first_call_s": first,
      "compile_s": max(0.0, first - per_config),
      "timed_s": seconds,
      "configs_timed": k,
      "lane_steps_per_s": k * steps / seconds,
      "median_score": float(np.median(scores)),
      "data": source,
  }


def _scan_fn(f, steps):
  return jax.jit(f.scan_train(steps))


def child_b(task):
  data, source, configs, f = _setup(task)
  steps = task["steps"]
  dev = jax.devices()[0]
  arrays = [jax.device_put(a, dev) for a in (*data["train"], *data["val"])]
  train = _scan_fn(f, steps)

  def run(i, cfg):
    score, _ = train(np.uint32(i), np.float32(cfg["learning_rate"]), np.float32(cfg["b1"]), *arrays)
    return float(score)

  return _time_sequential(run, task, configs, steps, source)


def child_b2(task):
  data, source, configs, f = _setup(task)
  steps = task["steps"]
  devs = jax.devices()
  d = len(devs)
  placed = [[jax.device_put(a, dv) for a in (*data["train"], *data["val"])] for dv in devs]
  train = _scan_fn(f, steps)

  def launch(i, cfg):
    dv = devs[i % d]
    put = lambda v: jax.device_put(v, dv)
    return train(put(np.uint32(i)), put(np.float32(cfg["learning_rate"])), put(np.float32(cfg["b1"])),
                 *placed[i % d])

  # Warm-up: one config per device (a program per device: committed inputs
  # on another device are another jit cache entry).
  t0 = time.perf_counter()
  jax.block_until_ready([launch(j, configs[j % len(configs)]) for j in range(d)])
  first = time.perf_counter() - t0
  timed = _timed_configs(task, configs)
  t0 = time.perf_counter()
  outs = [launch(i, c) for i, c in enumerate(timed)]
  jax.block_until_ready(outs)
  seconds = time.perf_counter() - t0
  scores = [float(o[0]) for o in outs]
  out = _seq_result(first, seconds, len(timed), steps, scores, source)
  out["compile_s"] = max(0.0, first - seconds / len(timed) * d)  # d runs overlapped in the warm-up
  out["devices_used"] = d
  return out


def child_c(task):
  optuna = C.optional("optuna")
  if optuna is None:
    return {"skipped": "optuna is not installed"}
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  data, source, configs, f = _setup(task)
  steps = task["steps"]
  dev = jax.devices()[0]
  arrays = [jax.device_put(a, dev) for a in (*data["train"], *data["val"])]
  train = _scan_fn(f, steps)

  def objective(trial):
    lr = trial.suggest_float("learning_rate", LR[0], LR[1], log=True)
    om = trial.suggest_float("one_minus_b1", 1 - B1[1], 1 - B1[0], log=True)
    score, _ = train(np.uint32(trial.number), np.float32(lr), np.float32(1.0 - om), *arrays)
    return float(score)

  t0 = time.perf_counter()
  float(train(np.uint32(0), np.float32(configs[0]["learning_rate"]), np.float32(configs[0]["b1"]), *arrays)[0])
  first = time.perf_counter() - t0
  timed = _timed_configs(task, configs)
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="minimize")
  for c in timed:
    study.enqueue_trial({"learning_rate": c["learning_rate"], "one_minus_b1": 1.0 - c["b1"]})
  t0 = time.perf_counter()
  study.optimize(objective, n_trials=len(timed))
  seconds = time.perf_counter() - t0
  scores = [t.value for t in study.trials]
  out = _seq_result(first, seconds, len(timed), steps, scores, source)
  out["optuna"] = optuna.__version__
  return out


def _time_sequential(run, task, configs, steps, source):
  """One config first (it compiles), then the timed configs one after another."""
  t0 = time.perf_counter()
  run(0, configs[0])
  first = time.perf_counter() - t0
  timed = _timed_configs(task, configs)
  t0 = time.perf_counter()
  scores = [run(i, c) for i, c in enumerate(timed)]
  return _seq_result(first, time.perf_counter() - t0, len(timed), steps, scores, source)


def child_d(task):
  data, source, configs, f = _setup(task)
  steps = task["steps"]
  model_fn = C.model_fn_for(SIZES[0], SIZES[-1], SIZES[1])
  calls = []
  for label in ["cold"] + ["warm"] * task.get("repeats", 1):
    t0 = time.perf_counter()
    result = vt.search(model_fn, data, space(), optimizer=optax.adam, rounds=1, num_configs=task["n"],
                       num_steps=steps, eval_every=max(1, steps // task.get("d_evals", 1)),
                       enqueue=configs, seed=0, precision=task.get("precision"), verbose=False)
    wall = time.perf_counter() - t0
    s = result.stats
    calls.append({
        "call": label,
        "wall_s": wall,
        "train_s": s.train_seconds,
        "compile_s": s.compile_seconds,
        "trace_s": s.trace_seconds,
        "programs_compiled": s.programs_compiled,
        "lane_steps": s.lane_steps,
        "stats_lane_steps_per_s": s.lane_steps_per_second,
        "wall_lane_steps_per_s": s.lane_steps / wall,
        "overhead": (wall - s.train_seconds) / s.train_seconds if s.train_seconds > 0 else None,
        "num_devices": s.num_devices,
        "lane_batch": s.lane_batch,
        "padded_lanes": s.padded_lanes,
    })
  scores = [t.score for t in result.trials]
  cold, warm = calls[0], calls[1:]
  # The warm calls' median (the program is cached: no compile).
  med = lambda k: float(np.median([c[k] for c in warm]))
  summary = dict(warm[0], call=f"warm (median of {len(warm)})",
                 **{k: med(k) for k in ("wall_s", "train_s", "stats_lane_steps_per_s", "wall_lane_steps_per_s")})
  summary["overhead"] = (summary["wall_s"] - summary["train_s"]) / summary["train_s"]
  return {
      "first_call_s": cold["wall_s"],
      "compile_s": cold["compile_s"] + cold["trace_s"],
      "lane_steps_per_s": summary["stats_lane_steps_per_s"],
      "calls": [cold, summary],
      "all_calls": calls,
      "configs_timed": task["n"],
      "median_score": float(np.median(scores)),
      "devices_used": summary["num_devices"],
      "data": source,
  }


def child_limits(task):
  out = C.limits(task["matmul_n"], task["copy_bytes"], task["both_precisions"])
  out["step"] = C.step_flops(SIZES, "classification", BATCH)
  return out


def child_check(task):
  """Lane equivalence: retrain is bit-exact; vt.train agrees to rounding."""
  data, source = C.digits()
  model_fn = C.model_fn_for(SIZES[0], SIZES[-1], SIZES[1])
  steps, n = task["steps"], task["configs"]
  eval_every = max(1, steps // 10)
  out = {"precision_probe": C.precision_probe(), "data": source, "runs": []}
  for precision in task["precisions"]:
    t0 = time.perf_counter()
    result = vt.search(model_fn, data, space(), optimizer=optax.adam, rounds=1, num_configs=n,
                       num_steps=steps, eval_every=eval_every, seed=0, precision=precision,
                       lane_batch=task.get("lane_batch"), verbose=False)
    search_s = time.perf_counter() - t0
    trials = sorted(result.trials, key=lambda t: t.id)
    k = min(task["retrain"], len(trials))
    pick = [trials[int(i)] for i in np.unique(np.linspace(0, len(trials) - 1, k).round().astype(int))]
    bit_equal = 0
    for t in pick:
      r = result.retrain(t)
      same = (r.score == t.score or (np.isinf(r.score) and np.isinf(t.score))) and np.array_equal(
          r.curve, t.curve, equal_nan=True)
      bit_equal += bool(same)
    rel = []
    for t in trials:
      run = vt.train(model_fn, data, t.config, seed=t.seed, num_steps=steps, eval_every=eval_every,
                     precision=precision, verbose=False)
      d = abs(run.score - t.score) / max(abs(t.score), 1e-12) if np.isfinite(run.score) and np.isfinite(t.score) else float("inf")
      rel.append((t.config["learning_rate"], d))
    moderate = [d for lr, d in rel if lr < 1e-3]
    out["runs"].append({
        "precision": precision or "default",
        "lane_batch": result.stats.lane_batch,
        "configs": n,
        "steps": steps,
        "search_s": search_s,
        "retrained": len(pick),
        "retrain_bit_equal": bit_equal,
        "moderate_lanes": len(moderate),
        "max_rel_diff_lr_lt_1e-3": max(moderate) if moderate else None,
        "max_rel_diff_all": max(d for _, d in rel),
        "median_rel_diff_all": float(np.median([d for _, d in rel])),
    })
  return out


HANDLERS = {"a": child_a, "b": child_b, "b2": child_b2, "c": child_c, "d": child_d,
            "limits": child_limits, "check": child_check}


# --------------------------------------------------------------------------
# The parent: settings, scheduling, tables
# --------------------------------------------------------------------------


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="N in 8, 32 and fewer steps (under 3 min on 2 CPU cores)")
  p.add_argument("--gpu", action="store_true", help="GPU settings: N up to 4096, 8192 matmul, both precisions")
  p.add_argument("--out", default=C.default_out("throughput"), help="JSON output path")
  p.add_argument("--ns", default=None, help="comma-separated N values (overrides the mode's list)")
  p.add_argument("--steps", type=int, default=None, help="steps per config (default 500; --quick 200)")
  p.add_argument("--peers", default=",".join(PEERS), help="which of a,b,b2,c,d to run")
  p.add_argument("--max-n-slow", type=int, default=None,
                 help="largest N for (a) and (c) (default: all on CPU, 32 on GPU)")
  p.add_argument("--max-seq", type=int, default=None,
                 help="time at most this many configs of a sequential peer (b, b2) and report its rate "
                      "(default: all on CPU, 64 on GPU)")
  p.add_argument("--matmul-n", type=int, default=None, help="matmul size for the FLOP/s ceiling (2048 CPU, 8192 GPU)")
  p.add_argument("--copy-mb", type=int, default=None, help="array size for the copy bandwidth (128 CPU, 2048 GPU)")
  p.add_argument("--precision", default=None, help="vmaptune.search(precision=...) for (d)")
  p.add_argument("--repeats", type=int, default=None, help="warm calls of (d), median reported (default 3; --quick 2)")
  p.add_argument("--d-evals", type=int, default=1,
                 help="validation passes per trial in (d) (default 1: the same single pass (b) makes; "
                      "vmaptune's own default is 10, for learning curves)")
  p.add_argument("--check", action="store_true", help="also run the lane-equivalence check")
  p.add_argument("--check-only", action="store_true", help="run only the lane-equivalence check")
  p.add_argument("--check-steps", type=int, default=None, help="steps for the check (default: --steps)")
  p.add_argument("--check-retrain", type=int, default=None, help="trials to retrain (default 4 CPU, 16 GPU)")
  p.add_argument("--check-lane-batch", type=int, default=None,
                 help="lane_batch for the check's search (default vmaptune's: 1 on CPU, all lanes on GPU); "
                      "e.g. 8 on CPU vectorises lanes as a GPU does")
  p.add_argument("--budget-s", type=float, default=None, help="start no new run after this many seconds")
  p.add_argument("--child-timeout", type=float, default=600.0, help="seconds per subprocess")
  p.add_argument("--without", default="", help="treat these packages as missing, e.g. sklearn,optuna")
  return p.parse_args(argv)


def settings(args) -> dict:
  gpu = args.gpu
  if args.ns:
    ns = [int(v) for v in args.ns.split(",") if v]
  elif args.quick:
    ns = [8, 32]
  elif gpu:
    ns = [1, 32, 256, 1024, 4096]
  else:
    ns = [1, 8, 32, 128]
  steps = args.steps or (200 if args.quick else 500)
  return {
      "ns": ns,
      "steps": steps,
      "peers": [p for p in args.peers.split(",") if p],
      "max_n_slow": args.max_n_slow if args.max_n_slow is not None else (32 if gpu else None),
      "max_seq": args.max_seq if args.max_seq is not None else (64 if gpu else None),
      "matmul_n": args.matmul_n or (8192 if gpu else 2048),
      "copy_bytes": (args.copy_mb << 20) if args.copy_mb else ((2 << 30) if gpu else (128 << 20)),
      "both_precisions": gpu,
      "repeats": args.repeats or (2 if args.quick else 3),
      "d_evals": args.d_evals,
      "check_steps": args.check_steps or steps,
      "check_retrain": args.check_retrain or (16 if gpu else 4),
      "check_precisions": [None, "highest"] if gpu else [None],
  }


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if C.child_main(argv, HANDLERS):
    return 0
  args = parse_args(argv)
  C.orchestrator_only()  # the children run the benchmarks; leave them the GPU memory
  C.pretend_missing(args.without.split(","))
  s = settings(args)
  script = os.path.abspath(__file__)
  t_start = time.perf_counter()
  record = C.header()
  record.update(benchmark="throughput", mode="gpu" if args.gpu else ("quick" if args.quick else "full"),
                settings=s, notes=[], runs=[], summary=[])
  notes = record["notes"]
  plat = record["machine"]["platform"]
  if args.gpu and plat != "gpu":
    notes.append(f"--gpu settings ran on {plat}: a rehearsal, not GPU numbers")
  num_devices = record["machine"]["num_devices"]
  if not args.check_only:
    _peer_notes(notes, s, num_devices, plat)

  def over_budget():
    return args.budget_s is not None and time.perf_counter() - t_start > args.budget_s

  _run(args, s, record, script, t_start, over_budget, num_devices)
  return 0


def _peer_notes(notes, s, num_devices, plat):
  notes.append(
      f"importing vmaptune gave JAX {num_devices} {plat} device(s); (a), (b) and (c) use device 0 only, "
      f"(b2) and (d) use all {num_devices}")
  if s["steps"] != 500:
    notes.append(f"{s['steps']} steps per config (the full benchmark uses 500)")
  d_evals = s.get("d_evals", 1)
  notes.append("(a) is un-donated and feeds host mini-batches each step; (b), (b2), (c) end with one validation "
               f"pass; (d) runs {d_evals} per trial (one every {max(1, s['steps'] // d_evals)} steps), inside its "
               "training time (--d-evals; vmaptune's default of 10 evaluations costs about 5% on this model)")
  notes.append("(c) enqueues the same N configs, so RandomSampler draws nothing itself: the cost measured is "
               "Optuna's trial bookkeeping around (b)")
  notes.append("(a), (b), (b2), (c): lane-steps/s over all N configs after a warm-up run (the first call, which "
               "compiles); compile s = first call - one steady config. (d): the median of "
               f"{s['repeats']} warm calls' stats.lane_steps_per_second (the program cached); compile s = "
               "stats.compile_seconds + trace_seconds of the cold call")


def _run(args, s, record, script, t_start, over_budget, num_devices):
  notes = record["notes"]
  print(f"throughput: {record['machine']['description']}; {s['steps']} steps; N in {s['ns']}", flush=True)
  lim = None
  if not args.check_only:
    lim = C.run_child(script, {"kind": "limits", "matmul_n": s["matmul_n"], "copy_bytes": s["copy_bytes"],
                               "both_precisions": s["both_precisions"]}, args.child_timeout)
    record["limits"] = lim
    if "error" in lim:
      print(f"limits failed: {lim['error']}", flush=True)
      lim = None
    else:
      print(f"limits: {lim['step']['xla_flops'] / 1e6:.2f} MFLOP per lane-step (XLA), "
            f"matmul {s['matmul_n']}: {lim['matmul_flops_1dev'] / 1e9:,.1f} GFLOP/s on 1 device, "
            f"{lim['matmul_flops_all'] / 1e9:,.1f} on all {lim['num_devices']}; default precision is "
            f"{lim['precision']['default_is']} ({time.perf_counter() - t_start:.0f} s)", flush=True)

  if args.check or args.check_only:  # before the throughput runs: it matters more than the slow peers
    record["check"] = C.run_child(script, {"kind": "check", "configs": 16, "steps": s["check_steps"],
                                           "retrain": s["check_retrain"], "lane_batch": args.check_lane_batch,
                                           "precisions": s["check_precisions"]}, args.child_timeout)
    chk = record["check"]
    C.write_json(args.out, record)
    print("check: " + (chk.get("error") or "; ".join(
        f"[{r['precision']}] retrain bit-equal {r['retrain_bit_equal']}/{r['retrained']}, vt.train max rel diff "
        f"{C.fmt(r['max_rel_diff_lr_lt_1e-3'])} (lr<1e-3)" for r in chk.get("runs", []))) +
          f"  [{time.perf_counter() - t_start:.0f} s]", flush=True)

  if not args.check_only:
    measured = {}  # (peer, configs timed) -> result: a capped sequential peer is measured once
    # Peer by peer, the reference (b) and vmaptune (d) first, so that a time
    # budget cuts the slow peers, not the numbers that matter most.
    for peer in [p for p in PEERS if p in s["peers"]]:
      for n in s["ns"]:
        row = {"n": n, "peer": peer, "steps": s["steps"]}
        if peer in ("a", "c") and s["max_n_slow"] is not None and n > s["max_n_slow"]:
          row["skipped"] = f"N > {s['max_n_slow']}: too slow sequentially"
        elif peer == "b2" and num_devices == 1:
          row["skipped"] = "one device: (b2) is (b)"
        elif peer == "c" and C.optional("optuna") is None:
          row["skipped"] = "optuna is not installed"
        elif over_budget():
          row["skipped"] = "time budget spent"
        else:
          cap = s["max_seq"] if peer in ("b", "b2") else None
          key = (peer, min(n, cap) if cap else n)
          if key in measured:
            # The same configs again (the first `cap`): a sequential rate does not depend on N.
            row.update({k: v for k, v in measured[key].items() if k != "n"}, reused_from_n=measured[key]["n"])
          else:
            task = {"kind": peer, "n": n, "steps": s["steps"], "precision": args.precision,
                    "repeats": s["repeats"], "max_seq": cap, "d_evals": s["d_evals"]}
            row.update(C.run_child(script, task, args.child_timeout))
            if "error" not in row:
              measured[key] = dict(row)
        record["runs"].append(row)
        _print_progress(row, t_start)
        C.write_json(args.out, record)  # partial results survive a timeout

  order = {p: i for i, p in enumerate(("a", "b", "b2", "c", "d"))}
  record["runs"].sort(key=lambda r: (r["n"], order[r["peer"]]))
  tables = render(record, lim)
  record["elapsed_s"] = time.perf_counter() - t_start
  print()
  print(tables)
  for n_ in notes:
    print(f"note: {n_}")
  print(f"\nwrote {C.write_json(args.out, record)} ({record['elapsed_s']:.0f} s)")


def _print_progress(row, t_start):
  if "skipped" in row:
    msg = f"skipped ({row['skipped']})"
  elif "error" in row:
    msg = f"ERROR {row['error']}"
  else:
    msg = f"{row['lane_steps_per_s']:,.0f} lane-steps/s, first call {row['first_call_s']:.1f} s"
  print(f"  N={row['n']:>5} {PEER_NAMES[row['peer']]:<36} {msg}  [{time.perf_counter() - t_start:.0f} s]",
        flush=True)


def render(record, lim) -> str:
  """The tables, and one-line summaries stored in the JSON."""
  out = []
  runs = record["runs"]
  ref = {r["n"]: r["lane_steps_per_s"] for r in runs if r["peer"] == "b" and "lane_steps_per_s" in r}
  flops = lim["step"]["xla_flops"] if lim else None
  rows = []
  for r in runs:
    row = {"n": r["n"], "peer": PEER_NAMES[r["peer"]]}
    if "skipped" in r:
      row["lsps"] = f"skipped: {r['skipped']}"
    elif "error" in r:
      row["lsps"] = "error (see JSON)"
    else:
      lsps = r["lane_steps_per_s"]
      row.update(lsps=lsps, first=r["first_call_s"], compile=r["compile_s"], rss=r.get("peak_rss_mb"),
                 dev_mb=r.get("device_peak_mb"))
      if r["n"] in ref:
        row["ratio"] = lsps / ref[r["n"]]
      if r.get("configs_timed") and r["configs_timed"] < r["n"]:
        row["peer"] += f" [{r['configs_timed']} configs timed]"
      if flops:
        row["gflops"] = lsps * flops / 1e9
        ceiling = lim["matmul_flops_all"] if r.get("devices_used", 1) > 1 else lim["matmul_flops_1dev"]
        row["pct"] = 100.0 * lsps * flops / ceiling
      if r["peer"] == "d":
        record["summary"].append(f"N={r['n']}: vmaptune {lsps:,.0f} lane-steps/s"
                                 + (f" = {row['ratio']:.2f}x (b)" if "ratio" in row else ""))
    rows.append(row)
  cols = [("n", "N"), ("peer", "peer"), ("lsps", "lane-steps/s"), ("ratio", "x (b)"),
          ("gflops", "GFLOP/s"), ("pct", "% matmul peak"), ("first", "first call s"),
          ("compile", "compile s"), ("rss", "peak RSS MB")]
  if any(r.get("dev_mb") for r in rows):
    cols.append(("dev_mb", "peak device MB"))
  if runs:
    out.append(C.table(rows, cols))
  if lim:
    st = lim["step"]
    line = (f"ceilings: {st['xla_flops'] / 1e6:.2f} MFLOP per lane-step (XLA cost analysis; matmuls alone "
            f"{st['analytic_matmul_flops'] / 1e6:.2f}), {st['params']:,} parameters; {lim['matmul_n']}^2 float32 "
            f"matmul {lim['matmul_flops_1dev'] / 1e9:,.1f} GFLOP/s on one device, "
            f"{lim['matmul_flops_all'] / 1e9:,.1f} on all {lim['num_devices']} at once")
    if "matmul_flops_1dev_highest" in lim:
      line += f" (default precision; HIGHEST: {lim['matmul_flops_1dev_highest'] / 1e9:,.1f} on one device)"
    line += (f"; copy {lim['copy_bytes_per_s_all'] / 1e9:,.1f} GB/s; default float32 matmul runs as "
             f"{lim['precision']['default_is']}. % matmul peak is against one device for (a), (b), (c) "
             "and all devices for (b2), (d).")
    out.append(line)
    record["summary"].append(line)
  drows = []
  for r in runs:
    if r["peer"] != "d" or "calls" not in r:
      continue
    for c in r["calls"]:
      drows.append({"n": r["n"], "call": c["call"], "wall": c["wall_s"], "train": c["train_s"],
                    "compile": c["compile_s"] + c["trace_s"], "programs": c["programs_compiled"],
                    "overhead": c["overhead"], "stats": c["stats_lane_steps_per_s"],
                    "wall_lsps": c["wall_lane_steps_per_s"], "layout": f"{c['num_devices']}x{c['lane_batch']}"})
  if drows:
    out.append("\n(d) vmaptune.search, whole call: overhead = (wall - train) / train")
    out.append(C.table(drows, [("n", "N"), ("call", "call"), ("wall", "wall s"), ("train", "train s"),
                               ("compile", "compile+trace s"), ("programs", "programs"),
                               ("overhead", "overhead"), ("stats", "stats lane-steps/s"),
                               ("wall_lsps", "wall lane-steps/s"), ("layout", "devices x lane_batch")]))
  chk = record.get("check")
  if chk:
    out.append("\nlane equivalence (16 configs): retrain must be bit-exact; vt.train agrees to rounding")
    if "runs" in chk:
      pp = chk["precision_probe"]
      out.append(C.table(chk["runs"], [("precision", "precision"), ("lane_batch", "lane_batch"), ("steps", "steps"),
                                        ("retrained", "retrained"), ("retrain_bit_equal", "bit-equal"),
                                        ("moderate_lanes", "lanes lr<1e-3"),
                                        ("max_rel_diff_lr_lt_1e-3", "max rel diff lr<1e-3"),
                                        ("max_rel_diff_all", "max rel diff all"),
                                        ("median_rel_diff_all", "median rel diff all")]))
      out.append(f"default float32 matmul precision: {pp['default_is']} (relative error vs float64: "
                 f"default {pp['default_rel_error']:.2g}, HIGHEST {pp['highest_rel_error']:.2g})")
      for run in chk["runs"]:
        record["summary"].append(
            f"check [{run['precision']}]: retrain bit-equal {run['retrain_bit_equal']}/{run['retrained']}, "
            f"vt.train max rel diff {C.fmt(run['max_rel_diff_lr_lt_1e-3'])} (lr<1e-3), "
            f"{C.fmt(run['max_rel_diff_all'])} (all); default matmul {pp['default_is']}")
    else:
      out.append(f"check failed or skipped: {chk.get('error') or chk.get('skipped')}")
      record["summary"].append(f"check: {chk.get('error') or chk.get('skipped')}")
  return "\n".join(out)


if __name__ == "__main__":
  sys.exit(main())
