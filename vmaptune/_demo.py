"""The demo: a search over an MLP on scikit-learn's digits (shipped, no download)."""

from __future__ import annotations

import argparse
import sys
import time


def _positive(kind):
  """An argparse type: a positive ``kind`` (a usage error, not a traceback)."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not {'an int' if kind is int else 'a number'}") from None
    if not value > 0:
      raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value

  return parse


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="vmaptune",
      description="vmaptune: hyperparameter search that trains every config at once.",
  )
  sub = p.add_subparsers(dest="command", required=True)
  d = sub.add_parser("demo", help="search an MLP on the digits dataset (15-40 s on 2 CPU cores)")
  d.add_argument("--configs", type=_positive(int), default=64, help="configs per round (default 64)")
  d.add_argument("--rounds", type=_positive(int), default=3,
                 help="rounds of the budget, configs x rounds x steps lane-steps (default 3)")
  d.add_argument("--strategy", choices=["auto", "adaptive", "zoom", "halving", "pbt"], default="auto",
                 help="how the budget is spent (default auto: adaptive at this size)")
  d.add_argument("--timeout", type=_positive(float), default=None, help="seconds for the search (default: the budget)")
  d.add_argument("--steps", type=_positive(int), default=500, help="training steps per config (default 500)")
  d.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
  d.add_argument("--sampler", choices=["random", "grid"], default="random")
  d.add_argument("--recheck", type=int, nargs=2, metavar=("TOP", "SEEDS"), default=None,
                 help="re-train the TOP configs with SEEDS fresh seeds each, in the search's programs, and keep "
                      "the best mean (default: the search's recheck='auto', the top 4 with 4 seeds in an adaptive "
                      "search, cut to fit a timeout; after a search that ran none without a timeout (zoom, "
                      "halving, a small adaptive one), 5 with 4, shown only; 0 0 skips)")
  d.add_argument("--report", metavar="DIR", default=None, help="write an HTML report into DIR")
  d.add_argument("--no-cache", action="store_true", help="do not use the on-disk compilation cache")
  d.add_argument("--quiet", action="store_true", help="no progress bar")
  return p


def load_digits():
  """scikit-learn's 8x8 digits: 1797 images, 10 classes, pixels scaled to [0, 1].

  Read straight from the file scikit-learn ships
  (``sklearn/datasets/data/digits.csv.gz``, as its ``load_digits`` reads
  it) without importing scikit-learn: in a process that had imported
  vmaptune, scikit-learn's import and loader (SciPy and the rest) took
  1.6 s on the 2-core CPU, reading the file 0.01 s. Where the file is not
  there (a scikit-learn that moved it), scikit-learn's loader.
  """
  import importlib.util
  import os

  import numpy as np

  spec = importlib.util.find_spec("sklearn")  # a top-level package: found, not imported
  if spec is None:
    raise SystemExit(
        "the demo needs scikit-learn for its bundled digits dataset: "
        "pip install 'vmaptune[demo]'"
    )
  path = os.path.join(list(spec.submodule_search_locations or [""])[0], "datasets", "data", "digits.csv.gz")
  if os.path.isfile(path):
    data = np.loadtxt(path, delimiter=",")
    x, y = data[:, :-1], data[:, -1].astype(int)
  else:  # pragma: no cover - a scikit-learn without the file where it has always been
    from sklearn.datasets import load_digits as _load

    x, y = _load(return_X_y=True)
  return (x / 16.0).astype(np.float32), y.astype(np.int32)


def demo_space():
  import vmaptune as vt

  return {
      "learning_rate": vt.loguniform(1e-4, 1e-1),  # α, on a log scale: tune it first
      "b1": vt.reverse_loguniform(0.8, 0.999),  # Adam's β1: 1-β1 log-uniform
      "hidden": vt.choice([32, 64, 128]),  # hidden units
      "num_layers": vt.integer(1, 2),  # hidden layers
      "lr_decay": vt.uniform(0.0, 0.5),  # α = α0 / (1 + decay · epoch)
  }


def demo_model_fn(config, rngs):
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, hidden: int, num_layers: int, rngs: nnx.Rngs):
      self.inp = nnx.Linear(64, hidden, rngs=rngs)
      self.hidden = getattr(nnx, "List", list)([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(num_layers - 1)])
      self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.inp(x))
      for layer in self.hidden:
        x = nnx.relu(layer(x))
      return self.out(x)

  return MLP(config["hidden"], config["num_layers"], rngs)


def example_result():
  """A small hand-built :class:`~vmaptune.SearchResult` for examples and docs.

  Forty round-0 trials over a learning rate (log scale) and a width, where the
  score is ``(log10(lr) + 2.5)**2`` plus a little noise: the learning rate
  drives the score, the width does not. No training involved.

  >>> example_result().best_config["learning_rate"] > 0
  True
  """
  import math

  import numpy as np

  import vmaptune as vt

  space = {"learning_rate": vt.loguniform(1e-4, 1e-1), "width": vt.choice([8, 16])}
  rng = np.random.default_rng(0)
  trials = []
  for i in range(40):
    lr = float(np.exp(rng.uniform(*space["learning_rate"].bounds())))
    width = [8, 16][int(rng.integers(2))]
    score = (math.log10(lr) + 2.5) ** 2 + 0.01 * rng.normal()
    trials.append(vt.Trial(id=i, config={"learning_rate": lr, "width": width}, score=score, round=0,
                           lane=i, status="ok", seed=i, curve=np.asarray([score]),
                           curve_steps=np.asarray([10]), train_curve=np.asarray([score]), steps=10))
  return vt.SearchResult(trials=trials, space=space, metric="loss", maximize=False,
                         regions=[vt.Region.full(space)], stats=vt.Stats())


def run_demo(args: argparse.Namespace) -> int:
  import vmaptune as vt

  x, y = load_digits()
  budget = (f"{args.timeout:g} s" if args.timeout else
            f"{args.configs} configs x {args.rounds} rounds x {args.steps} steps of budget")
  print(f"vmaptune demo: {budget}, strategy {args.strategy!r}, on digits ({len(x)} images), "
        f"metric: validation accuracy", flush=True)
  pbt = args.strategy == "pbt"
  if args.recheck is None:
    recheck = None if pbt else "auto"
  else:
    recheck = None if 0 in args.recheck or pbt else tuple(args.recheck)
  t0 = time.perf_counter()
  result = vt.search(
      demo_model_fn, (x, y), demo_space(), num_configs=args.configs, num_steps=args.steps,
      rounds=args.rounds, seed=args.seed, sampler=args.sampler, metric="accuracy", strategy=args.strategy,
      timeout=args.timeout, compilation_cache=False if args.no_cache else None, verbose=not args.quiet,
      recheck=recheck,
  )
  wall = time.perf_counter() - t0
  print()
  print("Top 5 trials (by their one run's score" + ("; mean: over the re-check's seeds; * the kept trial)"
                                                    if result.rechecked is not None else ")"))
  print(result.table(5))
  print()
  check = result.rechecked
  if check is not None:
    print(f"The search re-checked its top {len(check.trials)} with {len(check.seeds)} fresh seeds each "
          f"({check.seconds:.1f}s) and keeps trial {result.best_trial.id}, the best mean:")
    print(check.table())
    print()
  print("Best config:")
  for k, v in result.best_config.items():
    print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")
  s = result.stats
  ok = sum(t.status == "ok" for t in result.trials)
  print(f"Validation accuracy of the kept trial: {result.best_score:.4f} (trial id {result.best_trial.id}; "
        f"{len(result.trials)} trials, {ok} trained to the end; strategy {result.options['strategy']!r})")
  print(f"Wall time: {wall:.1f}s: training {s.train_seconds:.1f}s ({s.lane_steps_per_second:,.0f} lane-steps/s "
        f"on {s.num_devices} device(s)), compiling {s.compile_wall_seconds:.1f}s ({s.programs_compiled} "
        f"programs, {s.compile_seconds:.1f}s of XLA time), tracing {s.trace_seconds:.1f}s, "
        f"host {s.host_seconds:.1f}s")
  if result.options["strategy"] == "pbt":
    print("\n(No re-check: PBT lanes changed hyperparameters mid-run, so no config ran alone.)")
  elif check is None and args.recheck is None and args.timeout is None:  # a search that ran none: shown only
    top, seeds = 5, 4
    check = result.recheck(top=top, seeds=seeds)
    print()
    print(f"The top {len(check.trials)} re-checked after the search with {seeds} fresh seeds each "
          f"({check.seconds:.1f}s): the config to keep is trial {check.best_trial.id}")
    print(check.table())
  if args.report:
    path = result.report(args.report)
    print(f"Report: {path}")
  return 0


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "demo":
    return run_demo(args)
  return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
  sys.exit(main())
