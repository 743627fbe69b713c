"""Time to result from a fresh process: vmaptune against hand-written loops.

The workload a user runs first: the classic space (learning rate log-uniform,
1-β1 log-uniform, hidden in {32, 64, 128}, layers in {1, 2}, lr decay), 48
configs x 3 rounds x 400 steps of Adam on scikit-learn's digits, six model
shapes. Every contender runs in a fresh process, and its wall time is taken
from outside, from the process's start to its scores (Python start-up and
imports included):

  * ``vmaptune``: ``vt.search(..., strategy="zoom")``: zoom rounds (every trial
    trains its whole budget, so the hand loops train the same configs), no disk cache;
  * ``hand, one core``: the 144 configs vmaptune trained, each by a plain
    ``jax.jit`` of one ``lax.scan`` over its steps (per-epoch permutation,
    inverse-time lr decay, final validation loss), one after another in one
    process: one compile per shape (6);
  * ``hand, N cores``: the same configs split by shape over one process per
    core, started together (each process compiles its shapes);
  * ``... warm``: the same, with the on-disk compilation cache filled by an
    identical earlier run (vmaptune's own default cache; JAX's persistent
    cache for the hand-written loops).

And the demo as a user types it (``python -m vmaptune demo --quiet``), cold
(empty cache folder) and warm (the same folder again): its wall time and the
breakdown it prints.

    PYTHONPATH=. python benchmarks/cold_start.py [--quick] [--reps N] [--no-demo] [--out PATH]

Without scikit-learn (the GPU machine) the data is synthetic, digits-shaped,
and the demo is skipped; on a GPU the split contender's processes share the
card without preallocating its memory.

Prints a table and writes JSON (benchmarks/out/cold_start.json by default).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MARK = "@@COLD@@ "
SPLIT_SEED = 0


def _digits():
  """``(x, y, source)``: scikit-learn's digits scaled to [0, 1], or, where
  scikit-learn is missing (the GPU machine; ``VMAPTUNE_BENCH_WITHOUT=sklearn``
  to rehearse), synthetic data of the same shape: 1797 x 64 pixels in
  [0, 1], 10 classes around random centres (NumPy only, so a contender's
  imports stay its own)."""
  import numpy as np

  if "sklearn" not in os.environ.get("VMAPTUNE_BENCH_WITHOUT", "").split(","):
    try:
      from sklearn.datasets import load_digits
    except ImportError:
      pass
    else:
      x, y = load_digits(return_X_y=True)
      return (x / 16.0).astype(np.float32), y.astype(np.int32), "scikit-learn digits"
  rng = np.random.default_rng(1234)
  centres = rng.random((10, 64))
  y = rng.integers(0, 10, 1797).astype(np.int32)
  x = np.clip(centres[y] + 1.0 * rng.normal(size=(1797, 64)), 0.0, 1.0).astype(np.float32)
  return x, y, "synthetic digits-shaped (1797 x 64, 10 classes; scikit-learn missing)"


def _digits_split():
  """Digits scaled to [0, 1], a fixed 80/20 split (the same for every contender)."""
  import numpy as np

  x, y, _ = _digits()
  perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
  n_val = int(round(0.2 * len(x)))
  iv, it = perm[:n_val], perm[n_val:]
  return (x[it], y[it]), (x[iv], y[iv])


# --------------------------------------------------------------------------
# Children (each in a fresh process; only what each contender needs is imported)
# --------------------------------------------------------------------------


def child_vmaptune(task: dict) -> dict:
  import vmaptune as vt
  from vmaptune import _demo

  train, val = _digits_split()
  cache = task.get("cache") or False
  r = vt.search(_demo.demo_model_fn, {"train": train, "val": val}, _demo.demo_space(),
                num_configs=task["configs"], num_steps=task["steps"], rounds=task["rounds"], seed=task["seed"],
                strategy="zoom", compilation_cache=cache, verbose=False)
  return {"best": r.best_score, "trials": len(r.trials), "stats": r.stats.as_dict(),
          "configs": [dict(t.config, seed=t.seed) for t in r.trials]}


def _hand_trainer(hidden: int, layers: int, steps: int, num_train: int, batch: int = 64):
  """A plain jitted scan for one config of one shape: what one would write by hand."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.inp = nnx.Linear(64, hidden, rngs=rngs)
      self.hidden = nnx.List([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(layers - 1)])
      self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.inp(x))
      for layer in self.hidden:
        x = nnx.relu(layer(x))
      return self.out(x)

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: MLP(nnx.Rngs(0))))
  spe = num_train // batch
  opt = optax.inject_hyperparams(optax.adam)

  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, params)(x), y).mean()

  def train(seed, lr, b1, decay, x, y, xv, yv):
    k_init, k_data = jax.random.split(jax.random.key(seed))
    _, params = nnx.split(MLP(nnx.Rngs(k_init)))
    opt_state = opt(learning_rate=lr, b1=b1).init(params)

    def body(carry, step):
      params, opt_state, perm = carry
      epoch = step // spe
      perm = jax.lax.cond(step % spe == 0,
                          lambda p: jax.random.permutation(jax.random.fold_in(k_data, epoch), num_train),
                          lambda p: p, perm)
      idx = jax.lax.dynamic_slice_in_dim(perm, (step % spe) * batch, batch)
      grads = jax.grad(loss_fn)(params, x[idx], y[idx])
      opt_state.hyperparams["learning_rate"] = lr / (1.0 + decay * epoch)
      updates, opt_state = opt(learning_rate=opt_state.hyperparams["learning_rate"], b1=b1).update(
          grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, perm), None

    carry = (params, opt_state, jnp.zeros((num_train,), jnp.int32))
    (params, _, _), _ = jax.lax.scan(body, carry, jnp.arange(steps))
    return loss_fn(params, xv, yv)

  return jax.jit(train)


def child_hand(task: dict) -> dict:
  import jax

  if task.get("cache"):
    jax.config.update("jax_compilation_cache_dir", task["cache"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  import numpy as np

  (x, y), (xv, yv) = _digits_split()
  trainers, scores = {}, []
  for c in task["configs"]:
    shape = (c["hidden"], c["num_layers"])
    if shape not in trainers:
      trainers[shape] = _hand_trainer(*shape, task["steps"], len(x))
    args = (np.uint32(c["seed"]), np.float32(c["learning_rate"]), np.float32(c["b1"]),
            np.float32(c["lr_decay"]), x, y, xv, yv)
    scores.append(float(trainers[shape](*args)))
  finite = [s for s in scores if np.isfinite(s)]
  return {"best": min(finite) if finite else None, "trials": len(scores), "shapes": len(trainers)}


def _child_main() -> None:
  task = json.loads(sys.argv[2])
  out = {"vmaptune": child_vmaptune, "hand": child_hand}[task["kind"]](task)
  print(MARK + json.dumps(out), flush=True)


# --------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  for k in ("JAX_COMPILATION_CACHE_DIR", "VMAPTUNE_COMPILATION_CACHE"):
    env.pop(k, None)
  return env


def _start(task: dict, share: bool = False) -> subprocess.Popen:
  env = _env()
  if share:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(task)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _finish(proc: subprocess.Popen, t0: float) -> dict:
  out, err = proc.communicate(timeout=1800)
  wall = time.perf_counter() - t0
  for line in reversed(out.splitlines()):
    if line.startswith(MARK):
      return dict(json.loads(line[len(MARK):]), wall=wall)
  raise RuntimeError(f"child failed ({proc.returncode}): {err[-2000:]}")


def run_one(task: dict) -> dict:
  t0 = time.perf_counter()
  return _finish(_start(task), t0)


def run_split(task: dict, processes: int) -> dict:
  """The configs dealt by shape to one process per core, started together
  (on a GPU they share the card: none preallocates its memory)."""
  shapes = sorted({(c["hidden"], c["num_layers"]) for c in task["configs"]},
                  key=lambda s: -s[0] * s[1])  # biggest first, dealt round-robin
  groups = [[] for _ in range(processes)]
  for k, shape in enumerate(shapes):
    groups[k % processes] += [c for c in task["configs"] if (c["hidden"], c["num_layers"]) == shape]
  t0 = time.perf_counter()
  procs = [_start(dict(task, configs=g), share=True) for g in groups if g]
  outs = [_finish(p, t0) for p in procs]
  best = [o["best"] for o in outs if o["best"] is not None]
  return {"best": min(best) if best else None, "trials": sum(o["trials"] for o in outs), "wall": max(
      o["wall"] for o in outs), "processes": len(procs)}


_DEMO_LINE = re.compile(r"Wall time: ([\d.]+)s: training ([\d.]+)s .*compiling ([\d.]+)s \((\d+) programs, "
                        r"([\d.]+)s of XLA time\), tracing ([\d.]+)s, host ([\d.]+)s")


def run_demo(cache: str, args) -> dict:
  env = _env()
  env["VMAPTUNE_CACHE_DIR"] = cache
  cmd = [sys.executable, "-m", "vmaptune", "demo", "--quiet"]
  if args.quick:
    cmd += ["--configs", "16", "--rounds", "2", "--steps", "200"]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
  wall = time.perf_counter() - t0
  m = _DEMO_LINE.search(proc.stdout)
  if proc.returncode != 0 or m is None:
    raise RuntimeError(f"demo failed ({proc.returncode}): {proc.stderr[-2000:]}")
  search, train, compile_wall, programs, xla, trace, host = (float(v) for v in m.groups())
  return {"wall": wall, "search": search, "train": train, "compile_wall": compile_wall, "programs": int(programs),
          "xla": xla, "trace": trace, "host": host}


def main(argv=None) -> int:
  import argparse

  sys.path.insert(0, HERE)
  import _common as C

  C.orchestrator_only()  # children need the GPU's memory, not this parent
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="16 configs x 2 rounds x 200 steps")
  p.add_argument("--reps", type=int, default=None, help="repetitions of each contender (default 3; --quick 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=C.default_out("cold_start"))
  p.add_argument("--no-demo", action="store_true",
                 help="skip the demo runs (skipped anyway without scikit-learn, which the demo needs)")
  args = p.parse_args(argv)
  data_source = _digits()[2]
  demo = not args.no_demo and data_source.startswith("scikit-learn")
  reps = args.reps or (1 if args.quick else 3)
  work = dict(configs=16, rounds=2, steps=200) if args.quick else dict(configs=48, rounds=3, steps=400)
  cores = C.usable_cores()
  record = {**C.header(), "workload": work, "reps": reps, "data": data_source, "runs": []}
  t_start = time.perf_counter()
  rows = {}

  def note(name, out):
    rows.setdefault(name, []).append(out)
    record["runs"].append(dict(out, contender=name, configs=None))
    print(f"  {name:<26} wall {out['wall']:6.1f} s  best {C.fmt(out.get('best'))}", flush=True)
    C.write_json(args.out, record)

  base = dict(kind="vmaptune", seed=args.seed, **work)
  for rep in range(reps):
    cold = run_one(base)
    note("vmaptune cold", cold)
    hand = dict(kind="hand", steps=work["steps"], configs=cold["configs"])
    note("hand, one core cold", run_one(hand))
    note(f"hand, {cores} cores cold", run_split(hand, cores))
    with tempfile.TemporaryDirectory() as vt_cache, tempfile.TemporaryDirectory() as jax_cache:
      run_one(dict(base, cache=vt_cache))
      note("vmaptune warm", run_one(dict(base, cache=vt_cache)))
      run_one(dict(hand, cache=jax_cache))
      note("hand, one core warm", run_one(dict(hand, cache=jax_cache)))
      note(f"hand, {cores} cores warm", run_split(dict(hand, cache=jax_cache), cores))
    if demo:
      with tempfile.TemporaryDirectory() as demo_cache:
        note("demo cold", run_demo(demo_cache, args))
        note("demo warm", run_demo(demo_cache, args))

  def median(name, key="wall"):
    vals = sorted(r[key] for r in rows[name] if r.get(key) is not None)
    return vals[len(vals) // 2] if vals else None

  summary = []
  for when in ("cold", "warm"):
    hands = [f"hand, one core {when}", f"hand, {cores} cores {when}"]
    best_hand = min(hands, key=lambda n: median(n))

    for name in [f"vmaptune {when}"] + hands:
      summary.append({"contender": name, "wall": median(name), "vs_best_hand": median(name) / median(best_hand),
                      "best": median(name, "best")})
  demos = ("demo cold", "demo warm") if demo else ()
  for name in demos:
    summary.append({"contender": name, "wall": median(name), "best": None, "vs_best_hand": None})
  print(f"\nCold start, {work['configs']} configs x {work['rounds']} rounds x {work['steps']} steps, {data_source}, "
        f"classic space (6 shapes); medians of {reps}; wall = process start to scores\n")
  print(C.table(summary, [("contender", "contender"), ("wall", "wall s"), ("vs_best_hand", "x best hand"),
                          ("best", "best val loss")]))
  phases = []
  for name in ("vmaptune cold", "vmaptune warm"):
    s = rows[name][len(rows[name]) // 2]["stats"]
    wall = rows[name][len(rows[name]) // 2]["wall"]
    phases.append({"run": name, "process": wall, "search": s["wall_seconds"], "import+data": wall - s["wall_seconds"],
                   "trace": s["trace_seconds"], "compile wall": s["compile_wall_seconds"],
                   "compile xla": s["compile_seconds"], "train": s["train_seconds"], "host": s["host_seconds"],
                   "programs": s["programs_compiled"]})
  for name in demos:
    d = rows[name][len(rows[name]) // 2]
    phases.append({"run": name, "process": d["wall"], "search": d["search"], "import+data": d["wall"] - d["search"],
                   "trace": d["trace"], "compile wall": d["compile_wall"], "compile xla": d["xla"],
                   "train": d["train"], "host": d["host"], "programs": d["programs"]})
  print("\nWhere vmaptune's wall time went (seconds; the search's phases do not overlap)\n")
  print(C.table(phases, [("run", "run"), ("process", "process"), ("import+data", "import+data"),
                         ("search", "search"), ("trace", "trace"), ("compile wall", "compile wall"),
                         ("compile xla", "compile (XLA, summed)"), ("train", "train"), ("host", "host"),
                         ("programs", "programs")]))
  notes = [f"target: vmaptune cold <= 0.5x the best hand-written contender (here {summary[0]['vs_best_hand']:.2f}x)"]
  if demo:
    notes.append(f"targets: demo cold compile share <= 30% (here "
                 f"{median('demo cold', 'compile_wall') / median('demo cold'):.0%} of the process); demo warm wall "
                 f"<= 1.3x its training (here {median('demo warm') / median('demo warm', 'train'):.2f}x, process "
                 f"wall over train)")
  notes.append(f"data: {data_source}; machine load at start {record['machine']['loadavg_1_5_15_at_start']}")
  record["summary"], record["phases"], record["elapsed_s"] = summary, phases, time.perf_counter() - t_start
  return C.finish(args.out, record, notes)


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--child":
    _child_main()
  else:
    sys.exit(main())
