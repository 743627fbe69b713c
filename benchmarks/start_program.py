"""What a population's ``start`` program costs: its compile, and a call that
restarts some of its lanes.

A ``start`` (re)initialises the lanes a mask selects and leaves the others
bit for bit; the adaptive strategy calls it at every decision that refills
lanes (hundreds of times in a 40 s search), zoom once a round. For each of
the demo's six model shapes (digits MLPs: hidden 32, 64, 128 x 1, 2 layers),
one zoom round builds the programs, then each ``start`` is compiled again at
``--tier`` (``init``: XLA level 0, a zoom search's; ``restarts``: level 1,
under a strategy that restarts lanes at every decision) with JAX's in-memory
caches cleared, and called with 1, half and all of its lanes fresh (median of
``--calls`` calls, each waited for).

This times internals of vmaptune (``Program``): run it at two commits to
compare them, alternating, in the same session::

    PYTHONPATH=. python benchmarks/start_program.py [--quick] [--tier init|restarts]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (imports vmaptune first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import vmaptune as vt  # noqa: E402
from vmaptune import _compiler, _demo  # noqa: E402
from vmaptune._placement import place_lanes  # noqa: E402
from vmaptune._program import Program, quiet_donation  # noqa: E402


def _host_inputs(abstract):
  """Lane inputs of the right shapes: distinct seeds, zero hyperparameters."""
  def leaf(a):
    if jnp.issubdtype(a.dtype, jnp.integer):
      return np.arange(int(np.prod(a.shape)), dtype=a.dtype).reshape(a.shape)
    return np.zeros(a.shape, a.dtype)

  return jax.tree.map(leaf, abstract)


def measure(program: Program, calls: int, tier: str = "init") -> dict:
  lowered = program._lowered["start"]
  n = program.layout.num_lanes
  inputs = place_lanes(_host_inputs(lowered.args_info[0][1]), program.mesh)
  state = program.zeros(inputs)
  jax.clear_caches()
  t0 = time.perf_counter()
  compiled = program.compiler.compile(lowered, tier)
  row = {"hidden": program.spec.adapter.config["hidden"], "layers": program.spec.adapter.config["num_layers"],
         "lanes": n, "compile_s": time.perf_counter() - t0}
  for name, k in (("one_ms", 1), ("half_ms", n // 2), ("all_ms", n)):
    mask = np.zeros(n, bool)
    mask[:k] = True
    placed = place_lanes(mask, program.mesh)
    for _ in range(3):
      state = quiet_donation(compiled, state, inputs, placed)
    times = []
    for _ in range(calls):
      t = time.perf_counter()
      state = quiet_donation(compiled, state, inputs, placed)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
    row[name] = 1e3 * float(np.median(times))
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="two shapes, 20 calls")
  p.add_argument("--calls", type=int, default=None, help="calls timed per mask (default 60; --quick 20)")
  p.add_argument("--lanes", type=int, default=24, help="configs in the zoom round (default 24)")
  p.add_argument("--tier", default="init", choices=_compiler.START_TIERS, help="the start program's tier")
  p.add_argument("--out", default=C.default_out("start_program"))
  args = p.parse_args(argv)
  calls = args.calls or (20 if args.quick else 60)
  t_start = time.perf_counter()
  x, y = _demo.load_digits()
  space = dict(_demo.demo_space())
  if args.quick:
    space.update(hidden=vt.choice([32, 128]), num_layers=2)
  vt.clear_cache()
  vt.search(_demo.demo_model_fn, (x, y), space, num_configs=args.lanes, num_steps=20, rounds=1, seed=0,
            strategy="zoom", verbose=False, compilation_cache=False)
  programs = [v for v in _compiler._CACHE.values() if isinstance(v, Program)]
  rows = sorted((measure(prog, calls, args.tier) for prog in programs), key=lambda r: (r["hidden"], r["layers"]))
  print(f"\nstart programs of the demo's shapes at tier {args.tier!r}, {C.header()['machine']['description']}; "
        f"median of {calls} calls\n")
  print(C.table(rows, [("hidden", "hidden"), ("layers", "layers"), ("lanes", "lanes"), ("compile_s", "compile s"),
                       ("one_ms", "1 fresh, ms"), ("half_ms", "half fresh, ms"), ("all_ms", "all fresh, ms")]))
  total = sum(r["compile_s"] for r in rows)
  print(f"\ncompile, all shapes: {total:.2f} s")
  record = {**C.header(), "calls": calls, "tier": args.tier, "rows": rows, "compile_total_s": total,
            "elapsed_s": time.perf_counter() - t_start}
  return C.finish(args.out, record, [])


if __name__ == "__main__":
  sys.exit(main())
