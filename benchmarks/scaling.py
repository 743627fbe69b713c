"""Scaling: vmaptune's time per step and lane-steps/s as the population grows.

For N = 1, 2, 4, ... lanes (until memory, the N list or the time budget runs
out), one ``vmaptune.search(rounds=1, num_configs=N)`` over learning rate and
β1 with a constant architecture (one bucket, one compiled program per N), on:

  * digits:  MLP 64-128-128-10, batch 64, scikit-learn digits (or synthetic
    data of its shape where scikit-learn is missing);
  * mnist:   MLP 784-512-512-10, batch 128, synthetic MNIST-shaped data
    (10 000 training examples, 256 validation examples).

Reads ``result.stats``. Each N is searched twice, cold (compiles) and warm
(the program is cached), and the warm call's training time is reported
(``--no-warm`` skips it). Next to each number: achieved FLOP/s and MFU
against a measured large matmul, and the memory roofline, bytes per
lane-step ≈ 40 x parameters (fp32 Adam: forward and backward reads, the
gradient write 4P, Adam's reads of p, g, m, v and writes of p, m, v: 28P)
over a measured copy bandwidth. Saturation: the first N from which
lane-steps/s grows by no more than 10% per doubling.

    PYTHONPATH=. python benchmarks/scaling.py [--quick] [--gpu] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (imports vmaptune first)

import jax  # noqa: E402
import optax  # noqa: E402

import vmaptune as vt  # noqa: E402

BYTES_PER_PARAM = 40  # fp32 Adam, per lane-step: forward 4P, backward ~1.6P + grad 4P, fused Adam 28P

MODELS = {
    "digits": {"sizes": (64, 128, 128, 10), "batch": 64},
    "mnist": {"sizes": (784, 512, 512, 10), "batch": 128},
}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="N = 1..64 with few steps (under 3 min on 2 CPU cores)")
  p.add_argument("--gpu", action="store_true", help="GPU settings: N up to 4096, 8192 matmul, both precisions")
  p.add_argument("--out", default=C.default_out("scaling"), help="JSON output path")
  p.add_argument("--models", default="digits,mnist", help="comma-separated: digits, mnist")
  p.add_argument("--ns", default=None,
                 help="comma-separated N values (default: doubling from 1; --gpu: 1, 4, 16, 64, 256, 1024, 2048, 4096)")
  p.add_argument("--max-n", type=int, default=None, help="largest N (default 4096; --quick 64)")
  p.add_argument("--steps", default=None, help="steps per lane, one value or digits,mnist (e.g. 200,100)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="per model: start no N whose predicted time would pass this many seconds")
  p.add_argument("--no-warm", action="store_true", help="report the cold call's training time only")
  p.add_argument("--matmul-n", type=int, default=None, help="matmul size for the FLOP/s ceiling (2048 CPU, 8192 GPU)")
  p.add_argument("--copy-mb", type=int, default=None, help="array size for the copy bandwidth (128 CPU, 2048 GPU)")
  p.add_argument("--precision", default=None, help="vmaptune.search(precision=...)")
  p.add_argument("--lane-batch", type=int, default=None,
                 help="vmaptune.search(lane_batch=...): lanes vmapped together per device (default vmaptune's: "
                      "1 on CPU, all on accelerators)")
  p.add_argument("--without", default="", help="treat these packages as missing, e.g. sklearn")
  return p.parse_args(argv)


def _steps(args) -> dict:
  if args.steps:
    v = [int(s) for s in args.steps.split(",")]
    return {"digits": v[0], "mnist": v[-1]}
  if args.quick:
    return {"digits": 50, "mnist": 10}
  if args.gpu:
    return {"digits": 200, "mnist": 100}
  return {"digits": 200, "mnist": 20}


def data_for(name: str):
  if name == "digits":
    return C.digits()
  return C.mnist_like()


def space(batch: int):
  return {"learning_rate": vt.loguniform(1e-4, 1e-2), "b1": vt.reverse_loguniform(0.8, 0.999),
          "batch_size": batch}


def one_search(model_fn, data, n, steps, batch, precision, lane_batch=None):
  t0 = time.perf_counter()
  result = vt.search(model_fn, data, space(batch), optimizer=optax.adam, rounds=1, num_configs=n,
                     num_steps=steps, eval_every=steps, seed=0, precision=precision, lane_batch=lane_batch,
                     verbose=False)
  wall = time.perf_counter() - t0
  s = result.stats
  return {"wall_s": wall, "train_s": s.train_seconds, "compile_s": s.compile_seconds + s.trace_seconds,
          "programs_compiled": s.programs_compiled, "lane_steps": s.lane_steps,
          "lane_steps_per_s": s.lane_steps_per_second, "padded_lanes": s.padded_lanes,
          "num_devices": s.num_devices, "lane_batch": s.lane_batch,
          "diverged": sum(t.status != "ok" for t in result.trials)}


def saturation(ns, rates, threshold: float = 0.10):
  """The first N from which lane-steps/s grows by <= ``threshold`` per
  doubling (normalised when N steps by more than 2x); None if it still grows."""
  for i in range(len(ns) - 1):
    doublings = math.log2(ns[i + 1] / ns[i])
    if doublings <= 0 or rates[i] <= 0:
      continue
    growth = (rates[i + 1] / rates[i]) ** (1.0 / doublings) - 1.0
    if growth <= threshold:
      return ns[i]
  return None


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  C.pretend_missing(args.without.split(","))
  t_start = time.perf_counter()
  record = C.header()
  plat = record["machine"]["platform"]
  gpu_like = args.gpu or plat == "gpu"
  max_n = args.max_n or (64 if args.quick else 4096)
  if args.ns:
    ns = [int(v) for v in args.ns.split(",")]
  elif args.gpu:
    # Every compile costs seconds of a short GPU loan: x4 steps, then the last doubling.
    ns = [v for v in (1, 4, 16, 64, 256, 1024, 2048, 4096) if v <= max_n]
  else:
    ns = [2 ** i for i in range(13) if 2 ** i <= max_n]
  steps = _steps(args)
  models = [m for m in args.models.split(",") if m]
  matmul_n = args.matmul_n or (8192 if gpu_like else 2048)
  warm = not args.no_warm
  record.update(benchmark="scaling", mode="gpu" if args.gpu else ("quick" if args.quick else "full"),
                settings={"ns": ns, "steps": steps, "models": models, "matmul_n": matmul_n, "warm": warm,
                          "precision": args.precision, "lane_batch": args.lane_batch, "budget_s": args.budget_s,
                          "bytes_per_param": BYTES_PER_PARAM},
                notes=[], models={}, summary=[])
  notes = record["notes"]
  if args.gpu and plat != "gpu":
    notes.append(f"--gpu settings ran on {plat}: a rehearsal, not GPU numbers")
  print(f"scaling: {record['machine']['description']}; N in {ns}; steps {steps}", flush=True)

  devs = jax.devices()
  lim = {"matmul_n": matmul_n}
  lim["matmul_flops"] = C.matmul_rate(matmul_n, devs, None)
  if gpu_like:
    lim["matmul_flops_highest"] = C.matmul_rate(matmul_n, devs, "highest")
  lim["copy_bytes"] = (args.copy_mb << 20) if args.copy_mb else ((2 << 30) if gpu_like else (128 << 20))
  lim["copy_bytes_per_s"] = C.copy_bandwidth(lim["copy_bytes"], devs)
  lim["precision"] = C.precision_probe()
  record["limits"] = lim
  print(f"limits: matmul {lim['matmul_flops'] / 1e9:,.1f} GFLOP/s on {len(devs)} device(s) (default precision"
        + (f"; HIGHEST {lim['matmul_flops_highest'] / 1e9:,.1f}" if "matmul_flops_highest" in lim else "")
        + f"), copy {lim['copy_bytes_per_s'] / 1e9:,.1f} GB/s, default float32 matmul is "
        f"{lim['precision']['default_is']}", flush=True)

  out_tables = []
  for name in models:
    spec = MODELS[name]
    sizes, batch, st = spec["sizes"], spec["batch"], steps[name]
    data, source = data_for(name)
    model_fn = C.model_fn_for(sizes[0], sizes[-1], sizes[1])
    fl = C.step_flops(sizes, "classification", batch)
    flops = fl["xla_flops"] or fl["analytic_matmul_flops"]
    params = fl["params"]
    bytes_step = BYTES_PER_PARAM * params
    mem_roof = lim["copy_bytes_per_s"] / bytes_step
    comp_roof = lim["matmul_flops"] / flops
    m = {"sizes": sizes, "batch": batch, "steps": st, "data": source, "flops_per_lane_step": flops,
         "params": params, "bytes_per_lane_step": bytes_step, "state_mb_per_lane": 12 * params / 1e6,
         "memory_roofline_lane_steps_per_s": mem_roof, "compute_roofline_lane_steps_per_s": comp_roof,
         "rows": [], "stopped": None}
    record["models"][name] = m
    t_model = time.perf_counter()
    last_cost = None
    print(f"{name}: {params:,} params, {flops / 1e6:.1f} MFLOP and ~{bytes_step / 1e6:.2f} MB per lane-step, "
          f"{st} steps", flush=True)
    for n in ns:
      if args.budget_s is not None and last_cost is not None:
        spent = time.perf_counter() - t_model
        if spent + 2.2 * last_cost > args.budget_s:
          m["stopped"] = f"time budget: N={n} would need ~{2.2 * last_cost:.0f} s more (spent {spent:.0f} of {args.budget_s:.0f} s)"
          break
      t0 = time.perf_counter()
      try:
        cold = one_search(model_fn, data, n, st, batch, args.precision, args.lane_batch)
        hot = one_search(model_fn, data, n, st, batch, args.precision, args.lane_batch) if warm else None
      except Exception as e:  # out of memory, most likely: stop growing
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        m["stopped"] = f"N={n} failed: {msg}"
        print(f"  N={n:>5} failed: {msg}", flush=True)
        break
      last_cost = time.perf_counter() - t0
      use = hot or cold
      lsps = use["lane_steps_per_s"]
      row = {"n": n, "cold": cold, "warm": hot, "lane_steps_per_s": lsps,
             "step_ms": 1e3 * use["train_s"] / st, "us_per_lane_step": 1e6 / lsps,
             "compile_s": cold["compile_s"], "flops_per_s": lsps * flops,
             "mfu": lsps * flops / lim["matmul_flops"],
             "of_memory_roofline": lsps / mem_roof,
             "device_peak_mb": C.device_peak_mb(), "peak_rss_mb": C.peak_rss_mb()}
      if "matmul_flops_highest" in lim:
        row["mfu_highest"] = lsps * flops / lim["matmul_flops_highest"]
      m["rows"].append(row)
      C.write_json(args.out, record)  # partial results survive a timeout
      print(f"  N={n:>5}: {lsps:>12,.0f} lane-steps/s, {row['step_ms']:.2f} ms/step, compile "
            f"{cold['compile_s']:.1f} s, MFU {100 * row['mfu']:.1f}%"
            + (f", {100 * row['of_memory_roofline']:.1f}% of memory roofline" if gpu_like else "")
            + f"  [{time.perf_counter() - t_start:.0f} s]", flush=True)
      vt.clear_cache()  # each N has its own program; keep device memory for the next
    rows = m["rows"]
    m["saturates_at"] = saturation([r["n"] for r in rows], [r["lane_steps_per_s"] for r in rows])
    m["peak_lane_steps_per_s"] = max((r["lane_steps_per_s"] for r in rows), default=None)
    # Less sensitive to one noisy point: the first N within 10% of the peak.
    m["n_at_90pct_of_peak"] = next((r["n"] for r in rows if r["lane_steps_per_s"] >= 0.9 * m["peak_lane_steps_per_s"]),
                                   None)
    title = (f"{name}: MLP {'-'.join(map(str, sizes))}, batch {batch}, {st} steps, {params:,} params, "
             f"{flops / 1e6:.1f} MFLOP/lane-step (XLA), ~{bytes_step / 1e6:.2f} MB/lane-step; data: {source}")
    for r in rows:
      r["layout"] = f"{(r['warm'] or r['cold'])['num_devices']}x{(r['warm'] or r['cold'])['lane_batch']}"
    cols = [("n", "N"), ("layout", "devices x lane_batch"), ("step_ms", "ms/step"), ("lane_steps_per_s", "lane-steps/s"),
            ("us_per_lane_step", "us/lane-step"), ("gflops", "GFLOP/s"), ("mfu_pct", "MFU %"),
            ("compile_s", "compile s"), ("rss", "peak RSS MB")]
    if gpu_like:
      cols.insert(6, ("roof_pct", "% mem roofline"))
    trows = [dict(r, gflops=r["flops_per_s"] / 1e9, mfu_pct=100 * r["mfu"], roof_pct=100 * r["of_memory_roofline"],
                  rss=r["peak_rss_mb"], dev=r["device_peak_mb"], mfu_hi=100 * r.get("mfu_highest", 0) or None)
             for r in rows]
    if "matmul_flops_highest" in lim:
      cols.insert(6, ("mfu_hi", "MFU % vs fp32"))
    if any(r["device_peak_mb"] for r in rows):
      cols.append(("dev", "peak device MB (process)"))
    sat = m["saturates_at"]
    foot = (f"stops growing >10% per doubling at N={sat}" if sat else "still growing >10% per doubling at the largest N")
    if rows:
      foot += (f"; peak {m['peak_lane_steps_per_s']:,.0f} lane-steps/s, first within 10% of it at "
               f"N={m['n_at_90pct_of_peak']}")
    foot += f"; compute roofline {comp_roof:,.0f} lane-steps/s (matmul {lim['matmul_flops'] / 1e9:,.0f} GFLOP/s)"
    if gpu_like:
      foot += f", memory roofline {mem_roof:,.0f} lane-steps/s (copy {lim['copy_bytes_per_s'] / 1e9:,.1f} GB/s)"
    if m["stopped"]:
      foot += f"; stopped: {m['stopped']}"
    out_tables.append(f"{title}\n{C.table(trows, cols)}\n{foot}")
    record["summary"].append(f"{name}: {foot}")

  record["elapsed_s"] = time.perf_counter() - t_start
  if not warm:
    notes.append("cold calls only: training time of the first execution after compiling")
  notes.append("ms/step: the whole population's training time per step (one validation pass at the end included)")
  notes.append(f"MFU: achieved FLOP/s over a {matmul_n}^2 float32 matmul on all {len(devs)} device(s) at once")
  if not gpu_like:
    notes.append("memory roofline (40 B x params per lane-step over copy bandwidth) left out of the CPU tables: "
                 "a lane's working set sits in the CPU caches; the JSON keeps the numbers")
  print()
  print("\n\n".join(out_tables))
  return C.finish(args.out, record, notes)


if __name__ == "__main__":
  sys.exit(main())
