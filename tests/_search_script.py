"""A search run in a child process by the checkpoint and reliability tests.

Usage: python _search_script.py OUT.json CHECKPOINT_DIR [key=value ...]
Writes the result's trials and regions as JSON to OUT.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import vmaptune as vt  # noqa: E402
from _models import mlp_fn  # noqa: E402


def run(ckpt, opts):
  """The search, as the child runs it (the tests also call it in-process)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 64)).astype(np.float32)
  y = (x[:, :10].argmax(axis=1)).astype(np.int32)
  space = {"learning_rate": vt.loguniform(1e-3, 3e-2), "hidden": vt.choice([8, 16])}
  kw = dict(num_configs=int(opts.get("num_configs", 8)), num_steps=int(opts.get("num_steps", 60)),
            rounds=int(opts.get("rounds", 3)), seed=int(opts.get("seed", 0)), verbose=False,
            checkpoint_dir=None if ckpt == "-" else ckpt)
  if "checkpoint_every" in opts:
    kw["checkpoint_every"] = int(opts["checkpoint_every"])
  if opts.get("overwrite") == "1":
    kw["overwrite"] = True
  return vt.search(mlp_fn, (x, y), space, **kw)


def record(result):
  return {
      "trials": [
          {"id": t.id, "config": t.config, "seed": t.seed, "score": t.score, "round": t.round,
           "status": t.status, "parent": t.parent, "curve": [float(v) for v in t.curve]}
          for t in result.trials
      ],
      "regions": [r.to_json() for r in result.regions],
      "best": result.best_trial.id,
      "lane_steps": result.stats.lane_steps,
      "resumed_from": result.stats.resumed_from,
  }


def main(argv):
  out, ckpt = argv[0], argv[1]
  opts = dict(a.split("=", 1) for a in argv[2:])
  data = record(run(ckpt, opts))
  tmp = out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f)
  os.replace(tmp, out)


if __name__ == "__main__":
  main(sys.argv[1:])
