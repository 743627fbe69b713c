"""Shared helpers for the benchmark scripts (never collected by pytest).

Import this module before anything else touches JAX: it imports vmaptune
first, which gives JAX one CPU device per core (vmaptune/_devices.py), so that
every benchmark process sees the same devices as a vmaptune user does.

What lives here:

* the run record: machine, versions, date, the exact command (``header``),
  JSON output (``write_json``) and fixed-width tables (``table``);
* the data: scikit-learn's digits and diabetes, or synthetic arrays of the
  same shapes where scikit-learn is missing (the GPU machine), and a
  synthetic MNIST-size set (``digits``, ``diabetes``, ``mnist_like``);
* the model: a Flax NNX MLP, as a vmaptune ``model_fn`` and as the pure
  init/apply functions the hand-written baselines use (``MLP``,
  ``model_fn_for``, ``Functional``);
* the hand-written single-config trainers: a jitted Adam step for a Python
  loop and one jitted ``lax.scan`` over all steps (``Functional``);
* the limits every number is compared with: FLOPs per lane-step from XLA's
  cost analysis, a measured large-matmul rate, a measured copy bandwidth and
  which float32 matmul precision actually runs (``limits``);
* fresh-subprocess workers (``run_child``, ``child_main``), so compile times
  and peak RSS are clean.

Run ``python benchmarks/_common.py summary FILE.json ...`` for a compact
summary of result files (gpu.sh does).
"""

from __future__ import annotations

import datetime
import functools
import importlib
import inspect
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import vmaptune as vt  # noqa: E402  (first: it sets the CPU device count)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

RESULT_MARK = "@@BENCH-RESULT@@ "
_PREALLOC = "XLA_PYTHON_CLIENT_PREALLOCATE"
_USER_PREALLOC = os.environ.get(_PREALLOC)


def orchestrator_only() -> None:
  """For a parent that only starts child processes: keeps JAX (if it ever
  initialises a GPU backend here, e.g. for ``jax.devices()``) from
  preallocating most of the GPU's memory, which the children need. Must run
  before JAX initialises its backends; children get the user's setting."""
  os.environ[_PREALLOC] = "false"

# Packages treated as missing (``--without sklearn,optuna``), to rehearse the
# GPU machine's setup on a machine that has them.
_MISSING: set[str] = set(filter(None, os.environ.get("VMAPTUNE_BENCH_WITHOUT", "").split(",")))


def pretend_missing(names: Sequence[str]) -> None:
  """Treats ``names`` as not installed, here and in child processes."""
  _MISSING.update(n for n in names if n)
  os.environ["VMAPTUNE_BENCH_WITHOUT"] = ",".join(sorted(_MISSING))


def optional(module: str):
  """The module, or None if it is missing (or pretended missing)."""
  if module.split(".")[0] in _MISSING:
    return None
  try:
    return importlib.import_module(module)
  except ImportError:
    return None


# --------------------------------------------------------------------------
# The run record
# --------------------------------------------------------------------------


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - not Linux
    return os.cpu_count() or 1


def _version(name: str) -> str | None:
  try:
    from importlib.metadata import version

    return version(name)
  except Exception:
    mod = optional(name)
    return getattr(mod, "__version__", None) if mod else None


def command_line() -> str:
  """The exact command that ran, as one could paste it into a shell."""
  env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
  return env + " ".join(shlex.quote(a) for a in ["python"] + sys.argv)


def git_revision() -> str | None:
  """``<commit>`` plus ``-dirty`` if the working tree differs (None without git)."""
  try:
    rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                         text=True, timeout=10)
    if rev.returncode != 0:
      return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "vmaptune"],
                           cwd=REPO, capture_output=True, text=True, timeout=10)
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return None


def header() -> dict:
  """Date, machine, devices, versions and command: stored in every JSON."""
  devices = jax.devices()
  d0 = devices[0]
  machine = {
      "platform": d0.platform,
      "device_kind": d0.device_kind,
      "num_devices": len(devices),
      "cpu_model": cpu_model(),
      "cpu_cores": os.cpu_count(),
      "usable_cores": usable_cores(),
      "hostname": platform.node(),
      # Other work on the machine skews timings: the load when the run began.
      "loadavg_1_5_15_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
  }
  if d0.platform == "cpu":
    machine["description"] = f"{machine['cpu_model']}, {machine['usable_cores']} cores, {len(devices)} JAX CPU devices"
  else:
    machine["description"] = f"{len(devices)} x {d0.device_kind} ({d0.platform}); host {machine['cpu_model']}, {machine['usable_cores']} cores"
  return {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": command_line(),
      "git": git_revision(),  # "-dirty": vmaptune/ had uncommitted changes
      "machine": machine,
      "versions": {
          "python": platform.python_version(),
          "jax": jax.__version__,
          "jaxlib": _version("jaxlib"),
          "flax": _version("flax"),
          "optax": _version("optax"),
          "numpy": np.__version__,
          "vmaptune": getattr(vt, "__version__", None),
          "optuna": None if optional("optuna") is None else _version("optuna"),
          "scikit-learn": None if optional("sklearn") is None else _version("scikit-learn"),
      },
      "env": {k: v for k, v in os.environ.items()
              if k in ("XLA_FLAGS", "JAX_PLATFORMS", "VMAPTUNE_CPU_DEVICES", "VMAPTUNE_BENCH_WITHOUT",
                       "JAX_DEFAULT_MATMUL_PRECISION") or k.startswith("XLA_PYTHON_CLIENT_")},
  }


def default_out(name: str) -> str:
  return os.path.join(HERE, "out", f"{name}.json")


def write_json(path: str, payload: Mapping[str, Any]) -> str:
  """Writes ``payload`` atomically (temp file, fsync, rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1, default=_json_default, allow_nan=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def finish(out_path: str, record: Mapping[str, Any], notes: Sequence[str]) -> int:
  """Prints the notes, writes the JSON record and says where: every script's last words."""
  for n_ in notes:
    print(f"note: {n_}")
  print(f"\nwrote {write_json(out_path, record)} ({record['elapsed_s']:.0f} s)")
  return 0


def fmt(v: Any, digits: int = 3) -> str:
  """A compact cell: thousands separators for big numbers, 3 significant digits."""
  if v is None:
    return "-"
  if isinstance(v, str):
    return v
  if isinstance(v, (bool, np.bool_)):
    return str(bool(v))
  if isinstance(v, (int, np.integer)):
    return f"{int(v):,}"
  v = float(v)
  if not np.isfinite(v):
    return str(v)
  if v == 0:
    return "0"
  if abs(v) >= 10 ** digits:
    return f"{v:,.0f}"
  return f"{v:.{digits}g}"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
  """A Markdown table: ``columns`` is ``[(key, title), ...]``."""
  head = [t for _, t in columns]
  body = [[r.get(k) if isinstance(r.get(k), str) else fmt(r.get(k)) for k, _ in columns] for r in rows]
  widths = [max([len(h)] + [len(b[j]) for b in body]) for j, h in enumerate(head)]
  line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(head), sep] + [line(b) for b in body])


def best_at(trace: Sequence[Sequence[float]], seconds: float | None = None, lane_steps: float | None = None) -> float:
  """The best so far at a point of a run's trace of ``(seconds, lane-steps,
  best so far)`` rows (inf before the first)."""
  best = math.inf
  for t, steps, b in trace:
    if (seconds is not None and t > seconds) or (lane_steps is not None and steps > lane_steps):
      break
    best = b
  return best


def paired_wins(mine: Mapping[Any, float], ref: Mapping[Any, float]) -> str:
  """``"wins/n (p ...)"``: on how many of the shared seeds ``mine`` is lower
  than ``ref``, and the two-sided sign test's p-value (ties left out): how
  often a method no better than the reference would win this unevenly. At 20
  seeds 5 wins give p = 0.04, 9 give 0.82; a median a few thousandths apart
  with p above 0.3 is a draw."""
  from scipy.stats import binomtest  # scipy comes with jax

  seeds = [s for s in mine if s in ref]
  wins = sum(mine[s] < ref[s] for s in seeds)
  decided = sum(mine[s] != ref[s] for s in seeds)
  p = binomtest(wins, decided).pvalue if decided else 1.0
  return f"{wins}/{len(seeds)} (p {p:.2g})"


def peak_rss_mb() -> float:
  """This process's peak resident set size (``ru_maxrss``: KiB on Linux)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def device_peak_mb(device=None) -> float | None:
  """Peak accelerator memory in use so far (None on CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:
    return None
  if not stats:
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def _split(x, y, val_fraction: float, seed: int):
  perm = np.random.default_rng(seed).permutation(len(x))
  n_val = int(round(len(x) * val_fraction))
  iv, it = perm[:n_val], perm[n_val:]
  return (x[it], y[it]), (x[iv], y[iv])


def synthetic_classification(n: int, dim: int, classes: int, seed: int = 0, noise: float = 0.25):
  """Gaussian clusters in [0, 1]^dim: learnable, with the given shape."""
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0.0, 1.0, size=(classes, dim)).astype(np.float32)
  y = rng.integers(0, classes, size=n).astype(np.int32)
  x = centres[y] + noise * rng.normal(size=(n, dim)).astype(np.float32)
  return np.clip(x, 0.0, 1.0).astype(np.float32), y


def digits(val_fraction: float = 0.2, seed: int = 0) -> tuple[dict, str]:
  """scikit-learn's digits (1797 x 64, 10 classes, pixels / 16), split once.

  Falls back to synthetic data of the same shape where scikit-learn is
  missing. Returns ``({"train": (x, y), "val": (x, y)}, source)``.
  """
  datasets = optional("sklearn.datasets")
  if datasets is not None:
    x, y = datasets.load_digits(return_X_y=True)
    x, y, source = (x / 16.0).astype(np.float32), y.astype(np.int32), "sklearn digits"
  else:
    x, y = synthetic_classification(1797, 64, 10, seed=0)
    source = "synthetic digits-shaped (1797x64, 10 classes; scikit-learn missing)"
  train, val = _split(x, y, val_fraction, seed)
  return {"train": train, "val": val}, source


def diabetes(val_fraction: float = 0.2, seed: int = 0) -> tuple[dict, str]:
  """scikit-learn's diabetes regression (442 x 10), x and y standardised
  with the training split's statistics."""
  datasets = optional("sklearn.datasets")
  if datasets is not None:
    x, y = datasets.load_diabetes(return_X_y=True)
    source = "sklearn diabetes"
  else:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(442, 10))
    y = x @ rng.normal(size=10) + 0.5 * np.tanh(x[:, 0] * x[:, 1]) + 0.5 * rng.normal(size=442)
    source = "synthetic diabetes-shaped (442x10; scikit-learn missing)"
  (xt, yt), (xv, yv) = _split(np.asarray(x, np.float64), np.asarray(y, np.float64), val_fraction, seed)
  mx, sx = xt.mean(0), xt.std(0) + 1e-12
  my, sy = yt.mean(), yt.std()
  f = lambda a: a.astype(np.float32)
  return {"train": (f((xt - mx) / sx), f((yt - my) / sy)), "val": (f((xv - mx) / sx), f((yv - my) / sy))}, source


def breast_cancer(val_fraction: float = 0.2, seed: int = 0) -> tuple[dict, str]:
  """scikit-learn's breast cancer (569 x 30, 2 classes), x standardised with
  the training split's statistics (needs scikit-learn: no synthetic stand-in)."""
  from sklearn import datasets

  x, y = datasets.load_breast_cancer(return_X_y=True)
  (xt, yt), (xv, yv) = _split(np.asarray(x, np.float64), y.astype(np.int32), val_fraction, seed)
  mx, sx = xt.mean(0), xt.std(0) + 1e-12
  f = lambda a: ((a - mx) / sx).astype(np.float32)
  return {"train": (f(xt), yt), "val": (f(xv), yv)}, "sklearn breast cancer"


def mnist_like(n_train: int = 10_000, n_val: int = 256, seed: int = 0) -> tuple[dict, str]:
  """Synthetic data of MNIST's shape (784 features in [0, 1], 10 classes)."""
  x, y = synthetic_classification(n_train + n_val, 784, 10, seed=seed)
  return ({"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])},
          f"synthetic MNIST-shaped ({n_train}+{n_val} x 784, 10 classes)")


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

_List = getattr(nnx, "List", list)
try:
  _MERGE_KW = {"copy": True} if "copy" in inspect.signature(nnx.merge).parameters else {}
except (TypeError, ValueError):  # pragma: no cover
  _MERGE_KW = {}


class MLP(nnx.Module):
  """Dense layers of the given ``sizes`` (input, hidden..., output), ReLU between."""

  def __init__(self, sizes: Sequence[int], rngs: nnx.Rngs):
    self.layers = _List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    n = len(self.layers)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < n - 1:
        x = nnx.relu(x)
    return x


@functools.lru_cache(maxsize=None)
def model_fn_for(in_dim: int, out_dim: int, hidden: int, depth: int = 2) -> Callable:
  """A vmaptune ``model_fn``: ``config["hidden"]`` (default ``hidden``) units
  in ``depth`` hidden layers. The same object for the same arguments, so
  vmaptune's program cache recognises it."""

  def model_fn(config, rngs):
    h = int(config.get("hidden", hidden))
    return MLP((in_dim,) + (h,) * depth + (out_dim,), rngs)

  model_fn.__name__ = f"mlp_{in_dim}_{hidden}x{depth}_{out_dim}"
  return model_fn


def param_count(sizes: Sequence[int]) -> int:
  return int(sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])))


def cross_entropy(out, y):
  return optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), y)


def squared_error(out, y):
  d = out[..., 0].astype(jnp.float32) - y.astype(jnp.float32)
  return d * d


class Functional:
  """One config's MLP and Adam as pure functions: the hand-written baselines.

  ``init`` / ``apply`` work on plain parameter pytrees (NNX graph machinery
  only at the boundary); the optimizer is ``optax.inject_hyperparams(adam)``
  so learning rate and β1 live in the optimizer state as float32 arrays and
  new values never recompile.
  """

  def __init__(self, sizes: Sequence[int], task: str, batch_size: int, num_train: int):
    self.sizes = tuple(int(s) for s in sizes)
    self.task = task
    self.batch_size = int(batch_size)
    self.num_train = int(num_train)
    self.steps_per_epoch = self.num_train // self.batch_size
    abstract = nnx.eval_shape(lambda: MLP(self.sizes, nnx.Rngs(0)))
    self.graphdef, _ = nnx.split(abstract, nnx.Param)
    self.loss_fn = cross_entropy if task == "classification" else squared_error
    self.opt = optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float32)

  def init(self, key):
    _, params = nnx.split(MLP(self.sizes, nnx.Rngs(key)), nnx.Param)
    return params

  def apply(self, params, x):
    return nnx.merge(self.graphdef, params, **_MERGE_KW)(x)

  def loss(self, params, xb, yb):
    return jnp.mean(self.loss_fn(self.apply(params, xb), yb))

  def val_loss(self, params, xv, yv):
    return self.loss(params, xv, yv)

  def init_state(self, key, lr, b1):
    params = self.init(key)
    return params, self.opt(learning_rate=lr, b1=b1).init(params)

  # (a): one jitted step, driven by a Python loop ---------------------------

  def step(self, params, opt_state, xb, yb):
    """One Adam step; the hyperparameters come from ``opt_state``."""
    loss, grads = jax.value_and_grad(self.loss)(params, xb, yb)
    opt = self.opt(learning_rate=opt_state.hyperparams["learning_rate"], b1=opt_state.hyperparams["b1"])
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # (b): the whole run as one jitted lax.scan ----------------------------------

  def scan_train(self, num_steps: int):
    """``train(seed, lr, b1, x, y, xv, yv) -> (val_loss, last_train_loss)``.

    Init, every step and the final validation pass in one program; each
    epoch's permutation is drawn inside it (a real conditional, once per
    epoch) and mini-batches are gathered from it.
    """
    spe, b, n = self.steps_per_epoch, self.batch_size, self.num_train

    def train(seed, lr, b1, x, y, xv, yv):
      k_init, k_data = jax.random.split(jax.random.key(seed))
      params, opt_state = self.init_state(k_init, lr, b1)

      def body(carry, step):
        params, opt_state, perm = carry
        perm = lax.cond(
            step % spe == 0,
            lambda p: jax.random.permutation(jax.random.fold_in(k_data, step // spe), n).astype(jnp.int32),
            lambda p: p,
            perm,
        )
        idx = lax.dynamic_slice_in_dim(perm, (step % spe) * b, b)
        xb, yb = jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)
        params, opt_state, loss = self.step(params, opt_state, xb, yb)
        return (params, opt_state, perm), loss

      carry = (params, opt_state, jnp.zeros((n,), jnp.int32))
      (params, _, _), losses = lax.scan(body, carry, jnp.arange(num_steps, dtype=jnp.int32))
      return self.val_loss(params, xv, yv), losses[-1]

    return train


def sample_configs(n: int, seed: int = 1234, lr=(1e-4, 1e-2), b1=(0.8, 0.999)) -> list[dict]:
  """``n`` configs: lr log-uniform, β1 reverse-log-uniform (1-β1 log-uniform)."""
  rng = np.random.default_rng(seed)
  # Drawn a hair inside the bounds so that rounding to float32 (what every
  # lane sees) never steps outside them (vmaptune's enqueue checks bounds).
  shrink = lambda lo, hi: (lo * (1 + 1e-4), hi * (1 - 1e-4))
  lo, hi = shrink(*lr)
  lrs = np.exp(rng.uniform(np.log(lo), np.log(hi), size=n))
  lo, hi = shrink(1 - b1[1], 1 - b1[0])
  oms = np.exp(rng.uniform(np.log(lo), np.log(hi), size=n))
  return [{"learning_rate": float(np.float32(a)), "b1": float(np.float32(1.0 - o))} for a, o in zip(lrs, oms)]


# --------------------------------------------------------------------------
# Limits: FLOPs, matmul rate, bandwidth, precision
# --------------------------------------------------------------------------


def cost_flops(compiled) -> float | None:
  """FLOPs from ``Compiled.cost_analysis()``: a dict on new jax, a list of
  dicts on older ones, sometimes None."""
  try:
    ca = compiled.cost_analysis()
  except Exception:
    return None
  if ca is None:
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  try:
    v = ca.get("flops")
  except AttributeError:
    return None
  return None if v is None or v < 0 else float(v)


def step_flops(sizes: Sequence[int], task: str, batch_size: int) -> dict:
  """FLOPs of one lane-step (forward, backward, Adam) from XLA's cost analysis,
  next to the analytic count of the matmuls."""
  f = Functional(sizes, task, batch_size, num_train=batch_size)
  params, opt_state = jax.eval_shape(lambda: f.init_state(jax.random.key(0), jnp.float32(1e-3), jnp.float32(0.9)))
  xb = jax.ShapeDtypeStruct((batch_size, sizes[0]), jnp.float32)
  yb = jax.ShapeDtypeStruct((batch_size,), jnp.int32 if task == "classification" else jnp.float32)
  compiled = jax.jit(f.step).lower(params, opt_state, xb, yb).compile()
  matmul = 2 * batch_size * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
  # forward + weight gradients + input gradients (none needed for the first layer)
  analytic = matmul * 3 - 2 * batch_size * sizes[0] * sizes[1]
  return {"xla_flops": cost_flops(compiled), "analytic_matmul_flops": float(analytic),
          "params": param_count(sizes)}


def _timed(fn, reps: int) -> float:
  """The fastest of ``reps`` calls of ``fn()`` (which must block), after one
  warm-up call: a ceiling is the best the device does, and on a shared
  machine the median would drag it down (then MFU can read over 100%)."""
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(min(times))


def matmul_rate(n: int, devices: Sequence[Any], precision=None, reps: int = 5) -> float:
  """FLOP/s of a jitted ``n x n`` float32 matmul, run on every device in
  ``devices`` at once (sum over devices)."""
  prec = None if precision is None else getattr(lax.Precision, precision.upper())
  mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=prec))
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  args = [(jax.device_put(a, d), jax.device_put(b, d)) for d in devices]

  def run():
    jax.block_until_ready([mm(x, y) for x, y in args])

  return 2.0 * n ** 3 * len(devices) / _timed(run, reps)


def copy_bandwidth(nbytes: int, devices: Sequence[Any], reps: int = 5) -> float:
  """Bytes/s of a jitted ``x + 1`` over ``nbytes`` of float32 (read + write),
  summed over ``devices`` run at once."""
  n = nbytes // 4
  # Donated, so the output reuses the input's buffer: no fresh allocation
  # (first-touch page faults on CPU) inside the timing.
  add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  xs = [jax.device_put(np.zeros(n, np.float32), d) for d in devices]

  def run():
    xs[:] = [add(x) for x in xs]
    jax.block_until_ready(xs)

  import warnings

  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*donated buffers.*")
    return 2.0 * n * 4 * len(devices) / _timed(run, reps)


def precision_probe(n: int = 512) -> dict:
  """Which float32 matmul precision runs by default: the relative error of a
  jitted matmul against float64, with default and HIGHEST precision
  (~1e-7: true float32; ~1e-4: TF32; ~1e-3: bfloat16)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  exact = a.astype(np.float64) @ b.astype(np.float64)

  def rel(prec):
    out = np.asarray(jax.jit(lambda x, y: jnp.matmul(x, y, precision=prec))(a, b), np.float64)
    return float(np.linalg.norm(out - exact) / np.linalg.norm(exact))

  err_default, err_highest = rel(None), rel(lax.Precision.HIGHEST)
  if err_default < 1e-5:
    kind = "float32"
  elif err_default < 3e-3:
    kind = "tf32-like"
  else:
    kind = "bf16-like"
  return {"default_rel_error": err_default, "highest_rel_error": err_highest, "default_is": kind,
          "jax_default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None))}


def limits(matmul_n: int, copy_bytes: int, both_precisions: bool, reps: int = 5) -> dict:
  """The ceilings every throughput is compared with, on the lane devices."""
  devs = jax.devices()
  out = {"matmul_n": matmul_n, "copy_bytes": copy_bytes, "num_devices": len(devs)}
  out["matmul_flops_1dev"] = matmul_rate(matmul_n, devs[:1], None, reps)
  out["matmul_flops_all"] = out["matmul_flops_1dev"] if len(devs) == 1 else matmul_rate(matmul_n, devs, None, reps)
  if both_precisions:
    out["matmul_flops_1dev_highest"] = matmul_rate(matmul_n, devs[:1], "highest", reps)
    out["matmul_flops_all_highest"] = (out["matmul_flops_1dev_highest"] if len(devs) == 1
                                       else matmul_rate(matmul_n, devs, "highest", reps))
  out["copy_bytes_per_s_all"] = copy_bandwidth(copy_bytes, devs)
  out["precision"] = precision_probe()
  return out


# --------------------------------------------------------------------------
# Fresh-subprocess workers
# --------------------------------------------------------------------------


def run_child(script: str, task: Mapping[str, Any], timeout: float) -> dict:
  """Runs ``python SCRIPT --child JSON`` in a fresh process; returns its result
  dict (with ``error`` set if it failed)."""
  env = dict(os.environ)
  if _USER_PREALLOC is None:
    env.pop(_PREALLOC, None)
  else:
    env[_PREALLOC] = _USER_PREALLOC
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  cmd = [sys.executable, script, "--child", json.dumps(task)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s", "process_seconds": time.perf_counter() - t0}
  wall = time.perf_counter() - t0
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_MARK):
      out = json.loads(line[len(RESULT_MARK):])
      out["process_seconds"] = wall
      return out
  tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
  return {"error": f"exit {proc.returncode}: " + " / ".join(tail), "process_seconds": wall}


def child_main(argv: Sequence[str], handlers: Mapping[str, Callable[[dict], dict]]) -> bool:
  """If ``argv`` is ``--child JSON``, runs ``handlers[task['kind']](task)``,
  prints its result on a marked line and returns True."""
  if len(argv) < 2 or argv[0] != "--child":
    return False
  task = json.loads(argv[1])
  try:
    out = handlers[task["kind"]](task)
  except Exception as e:  # reported, not raised: the parent keeps going
    import traceback

    traceback.print_exc()
    out = {"error": f"{type(e).__name__}: {e}"}
  out["peak_rss_mb"] = peak_rss_mb()
  out.setdefault("device_peak_mb", device_peak_mb())
  print(RESULT_MARK + json.dumps(out, default=_json_default), flush=True)
  return True


# --------------------------------------------------------------------------
# Summaries (gpu.sh)
# --------------------------------------------------------------------------


def _summary(paths: Sequence[str]) -> None:
  """A compact table per result file, built from the raw runs (so a file
  left by a timed-out run summarises too)."""
  for p in paths:
    try:
      with open(p) as f:
        d = json.load(f)
    except (OSError, ValueError) as e:
      print(f"{p}: unreadable ({e})")
      continue
    m = d.get("machine", {})
    print(f"\n== {os.path.basename(p)}: {m.get('description')} | {d.get('date')} | jax {d.get('versions', {}).get('jax')}")
    kind = d.get("benchmark")
    if kind == "throughput":
      chk = d.get("check") or {}
      for r in chk.get("runs", []):
        print(f"check [{r['precision']}]: retrain bit-equal {r['retrain_bit_equal']}/{r['retrained']}; vt.train "
              f"max rel diff {fmt(r['max_rel_diff_lr_lt_1e-3'])} (lr<1e-3), {fmt(r['max_rel_diff_all'])} (all)")
      if chk.get("precision_probe"):
        print(f"default float32 matmul: {chk['precision_probe']['default_is']}")
      if chk.get("error"):
        print(f"check error: {chk['error']}")
      lim = d.get("limits") or {}
      flops = (lim.get("step") or {}).get("xla_flops")
      by = {}
      for r in d.get("runs", []):
        by.setdefault(r["n"], {})[r["peer"]] = r
      rows = []
      for n in sorted(by):
        row = {"n": n}
        for peer, rr in by[n].items():
          if "lane_steps_per_s" in rr:
            row[peer] = rr["lane_steps_per_s"]
          else:
            row[peer] = "skip" if "skipped" in rr else "err"
        dd = by[n].get("d", {})
        if isinstance(row.get("d"), float) and isinstance(row.get("b"), float):
          row["d/b"] = row["d"] / row["b"]
        calls = dd.get("calls") or []
        if len(calls) > 1:
          row["d_wall"] = calls[1]["wall_lane_steps_per_s"]
          row["d_over"] = calls[1]["overhead"]
        if calls:
          row["d_cold"] = calls[0]["wall_s"]
        if flops and isinstance(row.get("d"), float) and lim.get("matmul_flops_all"):
          row["d_mfu"] = 100 * row["d"] * flops / lim["matmul_flops_all"]
        rows.append(row)
      print(table(rows, [("n", "N"), ("a", "(a)"), ("b", "(b)"), ("b2", "(b2)"), ("c", "(c)"), ("d", "(d) train"),
                         ("d/b", "(d)/(b)"), ("d_wall", "(d) wall warm"), ("d_over", "(d) overhead warm"),
                         ("d_cold", "(d) cold call s"), ("d_mfu", "(d) MFU %")]))
      print("lane-steps/s; (d) train = stats.lane_steps_per_second (warm median)")
    elif kind == "scaling":
      for name, mm in (d.get("models") or {}).items():
        rows = [{"n": r["n"], "lsps": r["lane_steps_per_s"], "ms": r["step_ms"], "mfu": 100 * r["mfu"],
                 "roof": 100 * r["of_memory_roofline"], "dev": r.get("device_peak_mb"), "c": r["compile_s"]}
                for r in mm.get("rows", [])]
        print(f"{name} ({mm.get('params'):,} params, {mm.get('steps')} steps)"
              + (f"; stopped: {mm['stopped']}" if mm.get("stopped") else ""))
        print(table(rows, [("n", "N"), ("lsps", "lane-steps/s"), ("ms", "ms/step"), ("mfu", "MFU %"),
                           ("roof", "% mem roofline"), ("c", "compile s"), ("dev", "peak device MB")]))
    for line in d.get("summary", []):
      if kind != "throughput" or line.startswith("ceilings"):
        print("  " + line)


if __name__ == "__main__":
  if len(sys.argv) >= 2 and sys.argv[1] == "summary":
    _summary(sys.argv[2:])
  else:
    print("usage: python benchmarks/_common.py summary FILE.json ...")
