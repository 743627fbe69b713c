"""How vmaptune lays a population out on CPU, and why: measured choices.

Three questions, each answered in one process on the same model (the digits
MLP 64-128-128-10, batch 64, Adam) so the numbers compare:

1. XLA compile options: none, the default optimisation level passed
   explicitly, and LLVM -O1: compile time of a bucket's program and its run
   time per lane-step.
2. ``lane_batch``: lanes vectorised together by ``vmap`` on each device
   (1 = one lane at a time, all = the whole device's lanes at once).
3. Several buckets traced into one jitted program vs one program per bucket
   (two widths, 64 and 128): compile and run time.

Usage: ``PYTHONPATH=. python benchmarks/cpu_layout.py [--quick] [--out PATH]``.
Prints a table per question and writes JSON (default benchmarks/out/cpu_layout.json).
"""

from __future__ import annotations

import argparse
import sys
import time

import _common  # noqa: F401  (imports vmaptune first: one CPU device per core)
import jax
import numpy as np
import optax

from vmaptune import _compiler, _data, _devices, _lane, _model, _objective, _placement, _program, _routing


def _spec(dataset, hidden: int):
  objective = _objective.resolve_objective(dataset.task, None, "loss", None)
  model_fn = _common.model_fn_for(64, 10, hidden, depth=2)
  adapter = _model.make_adapter(model_fn, {}, jax.ShapeDtypeStruct((1, 64), np.float32))
  routing = _routing.route({"learning_rate": 1e-3, "b1": 0.9}, optax.adam, "inverse_time")
  return _lane.TrainSpec(
      adapter=adapter, routing=routing, static_opt=(), batch_size=64, eval_batch_size=512,
      objective=objective, num_train=dataset.num_train, num_val=dataset.num_val)


def _inputs(spec, n: int, steps: int):
  configs = _common.sample_configs(n)
  return _lane.stack_inputs(range(n), [{"learning_rate": c["learning_rate"], "b1": c["b1"]} for c in configs],
                               [0.0] * n, [steps] * n, spec)


def _best_of(fn, reps: int) -> float:
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def _timed_program(spec, n, devices, lane_batch, evals, options=None):
  mesh = _devices.make_mesh(devices)
  program = _program.Program(spec, _program.Layout(n, len(devices), lane_batch), mesh, evals_per_call=evals)
  if options is not None:
    saved = _compiler.compiler_options
    _compiler.compiler_options = lambda platform, tier="long": options
  try:
    data = _placement.place_data(_DATA, 512, mesh)
    inputs = _placement.place_lanes(_inputs(spec, n, _STEPS), mesh)
    mask = _placement.place_lanes(np.ones(n, bool), mesh)
    t0 = time.perf_counter()
    program.lower(inputs, data)
    program.compile()
    compile_s = time.perf_counter() - t0
  finally:
    if options is not None:
      _compiler.compiler_options = saved
  # A fresh start each time: every lane initialised, then trained.
  run = lambda: jax.block_until_ready(
      program.run(program.start(program.zeros(inputs), inputs, mask, data), data, _STEPS // evals))
  run()
  return compile_s, _best_of(run, _REPS)


OPTIONS = {
    "none (JAX's call)": {},
    "level 2 (explicit)": {"xla_backend_optimization_level": 2},
    "level 1": {"xla_backend_optimization_level": 1},
}


def question_opt_level(spec, n, devices):
  """XLA compile options: none at all, the default level passed explicitly, -O1.

  Passing any option makes XLA build its debug options from its flag
  defaults instead of JAX's bare proto, which is the difference measured
  here. A process's first compile pays one-off set-up: warm up first, then
  alternate the variants and keep each one's best (widths differ by one so
  nothing is served from a cache).
  """
  _timed_program(_spec(_DATA, 32), n, devices, 1, 10)
  best = {}
  width = 128
  for _ in range(2):
    for name, options in OPTIONS.items():
      width += 1
      compile_s, run_s = _timed_program(_spec(_DATA, width), n, devices, 1, 10, options)
      c, r = best.get(name, (float("inf"), float("inf")))
      best[name] = (min(c, compile_s), min(r, run_s))
  return [{"llvm": name, "compile_s": c, "us_per_lane_step": r / n / _STEPS * 1e6}
          for name, (c, r) in best.items()]


def question_lane_batch(spec, n, devices):
  per_device = n // len(devices)
  rows = []
  for k in sorted({1, 2, 4, 8, per_device}):
    if per_device % k:
      continue
    compile_s, run_s = _timed_program(spec, n, devices, k, 10)
    rows.append({"lane_batch": k if k < per_device else f"{k} (all)", "compile_s": compile_s,
                 "us_per_lane_step": run_s / n / _STEPS * 1e6})
  return rows


def question_fused_buckets(n, devices):
  """Two buckets as two programs, or traced together into one jitted program (one device)."""
  specs = [_spec(_DATA, 64), _spec(_DATA, 128)]
  device = devices[:1]
  mesh = _devices.make_mesh(device)
  data = _placement.place_data(_DATA, 512, mesh)
  inputs = [_placement.place_lanes(_inputs(s, n, _STEPS), mesh) for s in specs]
  mask = _placement.place_lanes(np.ones(n, bool), mesh)
  programs = [_program.Program(s, _program.Layout(n, 1, 1), mesh, evals_per_call=10) for s in specs]
  eval_every = np.asarray(_STEPS // 10, np.int32)
  t0 = time.perf_counter()
  for p, i in zip(programs, inputs):
    p.lower(i, data)
    p.compile()
  separate_compile = time.perf_counter() - t0
  separate = lambda: jax.block_until_ready([p.run(p.start(p.zeros(i), i, mask, data), data, _STEPS // 10)
                                            for p, i in zip(programs, inputs)])
  separate()
  separate_run = _best_of(separate, _REPS)

  def fused(sa, a, sb, b, m, train, val, every):
    sa, sb = programs[0]._local_start(sa, a, m), programs[1]._local_start(sb, b, m)
    return programs[0]._local_run(sa, train, val, every), programs[1]._local_run(sb, train, val, every)

  zeros = lambda: (programs[0].zeros(inputs[0]), programs[1].zeros(inputs[1]))
  t0 = time.perf_counter()
  compiler = _compiler.Compiler(None, device[0].platform)
  za, zb = zeros()
  compiled = compiler.build(fused, (za, inputs[0], zb, inputs[1], mask, data.train, data.val, eval_every))
  fused_compile = time.perf_counter() - t0

  def run():
    za, zb = zeros()
    jax.block_until_ready(compiled(za, inputs[0], zb, inputs[1], mask, data.train, data.val, eval_every))

  run()
  fused_run = _best_of(run, _REPS)
  lane_steps = 2 * n * _STEPS
  return [
      {"buckets": "one program per bucket", "compile_s": separate_compile,
       "us_per_lane_step": separate_run / lane_steps * 1e6},
      {"buckets": "both in one program", "compile_s": fused_compile, "us_per_lane_step": fused_run / lane_steps * 1e6},
  ]


def main(argv=None) -> int:
  global _DATA, _STEPS, _REPS
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer lanes, steps and repeats")
  parser.add_argument("--out", default=_common.default_out("cpu_layout"))
  args = parser.parse_args(argv)
  n = 16 if args.quick else 32
  _STEPS = 200 if args.quick else 500
  _REPS = 2 if args.quick else 3
  data, source = _common.digits()
  _DATA = _data.prepare_data({"train": data["train"], "val": data["val"]}, val_fraction=0.2, seed=0)
  devices = jax.devices()
  spec = _spec(_DATA, 128)
  result = {"header": _common.header(), "data": source, "lanes": n, "steps": _STEPS, "devices": len(devices)}
  print(f"digits MLP 64-128-128-10, batch 64, Adam; N={n} lanes, {_STEPS} steps, {len(devices)} device(s)")
  result["opt_level"] = question_opt_level(spec, n, devices)
  print("\n1. XLA compile options (lane_batch 1)")
  print(_common.table(result["opt_level"], [("llvm", "options"), ("compile_s", "compile s"),
                                            ("us_per_lane_step", "us/lane-step")]))
  result["lane_batch"] = question_lane_batch(spec, n, devices)
  print("\n2. Lanes vectorised together per device")
  print(_common.table(result["lane_batch"], [("lane_batch", "lane_batch"), ("compile_s", "compile s"),
                                             ("us_per_lane_step", "us/lane-step")]))
  result["fused_buckets"] = question_fused_buckets(n // 2, devices)
  print("\n3. Two buckets (widths 64 and 128), one device")
  print(_common.table(result["fused_buckets"], [("buckets", "layout"), ("compile_s", "compile s"),
                                                ("us_per_lane_step", "us/lane-step")]))
  print("\nwrote", _common.write_json(args.out, result))
  return 0


_DATA = None
_STEPS = 500
_REPS = 3

if __name__ == "__main__":
  sys.exit(main())
