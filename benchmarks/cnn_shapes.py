"""What each shape of ``equal_time.py``'s digits CNN can reach, and what a lane-step of it costs.

A grid, one search (``sampler="grid"``, one round): every shape of the
``digits_cnn`` task (channels 8, 16, 32 x 1 or 2 convolutions) at a few
learning rates, β1 0.9, no decay, batch 64, 500 steps, Adam, on the split of
``--seed``. Per shape: the best final validation cross-entropy over the
learning rates (the floor a search of that shape can hope for in one trial
length), and the seconds its lanes were charged per lane-step (the cost a
time-budgeted search weighs that floor against).

It says where a timed CNN search should spend its lane-steps: a search that
gives most of them to the cheapest shape is bounded by that shape's floor.

    PYTHONPATH=. python benchmarks/cnn_shapes.py [--seed 0] [--lrs 3e-3,1e-2,3e-2,1e-1] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (imports vmaptune first)
import equal_time as E  # noqa: E402  (the task's data, model and split)

import vmaptune as vt  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seed", type=int, default=0, help="the train/validation split and the lanes' seeds")
  p.add_argument("--lrs", default="3e-3,1e-2,3e-2,1e-1", help="learning rates, comma-separated")
  p.add_argument("--steps", type=int, default=E.S)
  p.add_argument("--out", default=C.default_out("cnn_shapes"), help="JSON output path")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  lrs = [float(v) for v in args.lrs.split(",") if v]
  t_start = time.perf_counter()
  record = C.header()
  record.update(benchmark="cnn_shapes", settings={"seed": args.seed, "lrs": lrs, "steps": args.steps, "b1": 0.9,
                                                  "lr_decay": 0.0, "batch_size": E.BATCH},
                notes=[], runs=[], rows=[])
  data = E.load("digits_cnn", args.seed)
  space = {"learning_rate": vt.choice(lrs), "b1": 0.9, "hidden": vt.choice(list(E.WIDTHS["digits_cnn"])),
           "num_layers": vt.choice([1, 2]), "lr_decay": 0.0, "batch_size": E.BATCH}
  t0 = time.perf_counter()
  result = vt.search(E.model_fn_for("digits_cnn", data), data, space, num_steps=args.steps, seed=args.seed,
                     sampler="grid", strategy="zoom", rounds=1, verbose=False)
  wall = time.perf_counter() - t0
  shapes: dict = {}
  for t in result.trials:
    shape = (int(t.config["hidden"]), int(t.config["num_layers"]))
    record["runs"].append({"channels": shape[0], "convolutions": shape[1], "learning_rate": t.config["learning_rate"],
                           "score": float(t.score), "steps": int(t.steps), "seconds": float(t.seconds)})
    shapes.setdefault(shape, []).append(record["runs"][-1])
  cheapest = min(sum(r["seconds"] for r in rs) / sum(r["steps"] for r in rs) for rs in shapes.values())
  for shape, rs in sorted(shapes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    per_step = sum(r["seconds"] for r in rs) / sum(r["steps"] for r in rs)
    finite = [r for r in rs if math.isfinite(r["score"])]
    best = min(finite, key=lambda r: r["score"]) if finite else None
    row = {"shape": f"{shape[0]} x {shape[1]}", "best": best["score"] if best else math.inf,
           "best_lr": best["learning_rate"] if best else None, "ms_per_lane_step": 1e3 * per_step,
           "cost_vs_cheapest": per_step / cheapest}
    row.update({f"lr {lr:g}": next(r["score"] for r in rs if r["learning_rate"] == lr) for lr in lrs})
    record["rows"].append(row)
  cols = [("shape", "channels x convolutions"), ("best", "best val loss"), ("best_lr", "at lr")]
  cols += [(f"lr {lr:g}", f"lr {lr:g}") for lr in lrs]
  cols += [("ms_per_lane_step", "ms a lane-step (charged)"), ("cost_vs_cheapest", "x cheapest")]
  print(f"cnn_shapes: {record['machine']['description']}; seed {args.seed}, {args.steps} steps, "
        f"{len(result.trials)} trials in one search, {wall:.1f} s", flush=True)
  print(C.table(record["rows"], cols))
  record["elapsed_s"] = time.perf_counter() - t_start
  notes = record["notes"]
  notes.append("best val loss: final validation cross-entropy after the whole trial, the best over the learning "
               "rates; lr columns: each rate's (2.30 = chance)")
  notes.append("ms a lane-step: the seconds the search charged the shape's lanes (their chunk's measured time "
               "split over its lanes) per step; lanes of one shape train together, the shapes one after another")
  return C.finish(args.out, record, notes)


if __name__ == "__main__":
  sys.exit(main())
