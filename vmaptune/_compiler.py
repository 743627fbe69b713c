"""How programs compile: one path, its options, a thread pool, and the registry.

Every program vmaptune builds goes through :class:`Compiler`: tracing and
lowering on the calling thread, XLA compilation (which releases the GIL) on
any thread, one precision and timing wrapper. XLA options follow what a
program is for (:data:`TIERS`). Built programs are kept between searches in
one registry (:func:`cached`), emptied by :func:`clear_cache`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import time
import types
import warnings
from typing import Any, Callable

import jax

__all__ = ["Compiler", "TIERS", "START_TIERS", "tier_for", "compiler_options", "compile_pool", "cached", "clear_cache",
           "code_reads",
           "CPU_FLOPS_PER_CORE", "CPU_CONV_FLOPS_PER_CORE", "CPU_FAST_CONV_FLOPS_PER_CORE", "quiet_donation",
           "step_seconds", "has_convolution",
           "counted_flops"]


_CACHE_SIZE = 64
_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()


def cached(key: tuple, build: Callable[[], Any]) -> Any:
  """The registry's entry for ``key``, built (and kept) on first use.

  A key holding an unhashable static value is not cached across searches.
  """
  try:
    found = _CACHE.get(key)
  except Exception:  # noqa: BLE001 - unhashable, or an __eq__ that does not give a bool
    return build()
  if found is not None:
    _CACHE.move_to_end(key)
    return found
  found = build()
  _CACHE[key] = found
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return found


def code_reads(fn: Any, depth: int = 2) -> tuple:
  """What ``fn``'s code reads by global name or closure, two levels down
  (the classes and functions it reads, and what their methods read): a key
  part that changes when a notebook cell redefines the model's class or a
  function it calls, though ``fn`` itself is the same object. Hashable
  values stand for themselves, others by ``id``; modules are left out.

  >>> class A: pass
  >>> f = lambda c, rngs: A()
  >>> before = code_reads(f)
  >>> class A: pass
  >>> code_reads(f) == before
  False
  """
  out, seen = [], set()

  def names(code) -> set:
    found = set(code.co_names)
    for const in code.co_consts:
      if isinstance(const, types.CodeType):
        found |= names(const)
    return found

  def visit(obj, level: int) -> None:
    if id(obj) in seen:
      return
    seen.add(id(obj))
    if isinstance(obj, functools.partial):  # its function, and its bound arguments by identity
      out.extend(("id", id(v)) for v in (*obj.args, *obj.keywords.values()))
      return visit(obj.func, level)
    if isinstance(obj, type):
      for attr in vars(obj).values():
        if level > 0 and isinstance(attr, (types.FunctionType, staticmethod, classmethod)):
          visit(getattr(attr, "__func__", attr), level - 1)
      return
    code, scope = getattr(obj, "__code__", None), getattr(obj, "__globals__", None)
    if code is None or scope is None:
      return
    cells = [c.cell_contents for c in (getattr(obj, "__closure__", None) or ()) if _filled(c)]
    for value in [scope[n] for n in sorted(names(code)) if n in scope] + cells:
      if isinstance(value, types.ModuleType):
        continue
      try:
        hash(value)
        out.append(value)
      except Exception:  # noqa: BLE001 - unhashable (an array, a dict): by identity
        out.append(("id", id(value)))
      if level > 0 and isinstance(value, (type, types.FunctionType)):
        visit(value, level - 1)

  visit(fn, depth)
  return tuple(out)


def _filled(cell) -> bool:
  try:
    cell.cell_contents
  except ValueError:  # an empty cell: a name bound later
    return False
  return True


def clear_cache() -> None:
  """Forgets every compiled program kept between searches in this process.

  Programs are cached by the identity of ``model_fn``, the optimizer, loss and
  metric, what ``model_fn`` reads (:func:`code_reads`: a redefined model
  class or a function it calls is seen), and by the shapes of the data, so a
  second search with the same setup compiles nothing. Clear the cache if a
  value those functions read changed in place (a list, an attribute).

  >>> import vmaptune as vt
  >>> vt.clear_cache()
  """
  _CACHE.clear()


#: XLA options on CPU, by what a program is for. Measured on the 2-core
#: development CPU (benchmarks/RESULTS.md, "Compile time"), a bucket's
#: training program: level 1 compiles in 1.2 s (level 3, XLA's default, 1.7 s)
#: and runs as fast as level 3; without the MLIR fusion emitters it compiles
#: 30% faster but trains 45% slower; level 0 on top compiles in 0.5 s and
#: trains 4x slower. So a program's tier follows its predicted training time
#: (see :func:`tier_for`); a lane's initialisation runs once and gets the
#: cheapest. Where a strategy restarts lanes at every decision (adaptive,
#: halving: hundreds of ``start`` calls a search), the initialisation gets
#: level 1 ("restarts"): on the digits MLPs of the demo it compiled in
#: 0.35-0.46 s instead of 0.25-0.32 s and restarted half of 12 lanes 2-5x
#: faster (128 x 2: 11.3 -> 2.4 ms).
TIERS = {
    "init": {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False},
    "restarts": {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False},
    "quick": {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False},
    "short": {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False},
    "long": {"xla_backend_optimization_level": 1},
}
#: The tiers of a bucket's ``start`` program (the others are its ``run``'s).
START_TIERS = ("init", "restarts")
#: Predicted training seconds (at tier "long") below which a cheaper tier wins.
TIER_SECONDS = (("quick", 0.15), ("short", 0.8))
#: A CPU core's rate on these programs (measured 55-67 GFLOP/s a core), for predictions.
CPU_FLOPS_PER_CORE = 60e9
#: A CPU core's rate on programs with convolutions, by XLA's FLOP count of a
#: lane-step (``Program.step_flops``): 6.3-7.8 GFLOP/s measured for a digits
#: CNN of 8 to 32 channels (tier "long"). Predicted from parameters alone, a
#: 16-channel CNN's training looked 1,000 times shorter than it was.
CPU_CONV_FLOPS_PER_CORE = 6e9
#: The same with ``_convgrad``'s gradients (``TrainSpec.conv_grads``): 5.4 to
#: 96 GFLOP/s measured on that CNN's six shapes (Intel Xeon, tier "long"),
#: the widest fastest.
CPU_FAST_CONV_FLOPS_PER_CORE = 20e9


#: A program's compile time before any is measured, for time-budget estimates.
UNMEASURED_COMPILE_SECONDS = 2.0


def expected_compile_seconds(stats) -> float:
  """A program's compile time by a search's ``Stats`` so far: the mean of
  its compiles (:data:`UNMEASURED_COMPILE_SECONDS` before any)."""
  if stats.programs_compiled:
    return stats.compile_seconds / stats.programs_compiled
  return UNMEASURED_COMPILE_SECONDS


def tier_for(seconds: float, convolution: bool = False) -> str:
  """The compile tier of a program predicted to train ``seconds`` in all
  (``VMAPTUNE_COMPILE_TIER=quick|short|long`` fixes it instead). A program
  with convolutions never gets tier "quick": without XLA's optimisations a
  digits CNN trained 8 to 13 times slower (measured), not 4 times as an MLP
  does, for a second of compiling saved."""
  forced = os.environ.get("VMAPTUNE_COMPILE_TIER")
  if forced in ("quick", "short", "long"):
    return forced
  for tier, limit in TIER_SECONDS:
    if seconds < limit and not (convolution and tier == "quick"):
      return tier
  return "long"


def step_seconds(param_flops: float, counted: float | None = None, fast_conv: bool = False) -> float:
  """A lane-step's predicted seconds on one CPU core: ``param_flops`` (~6
  per parameter and example) at :data:`CPU_FLOPS_PER_CORE`; with
  convolutions, at least XLA's count of a step (``counted``) at
  :data:`CPU_CONV_FLOPS_PER_CORE` (:data:`CPU_FAST_CONV_FLOPS_PER_CORE`
  with ``fast_conv``, ``_convgrad``'s gradients)."""
  seconds = param_flops / CPU_FLOPS_PER_CORE
  if counted:
    seconds = max(seconds, counted / (CPU_FAST_CONV_FLOPS_PER_CORE if fast_conv else CPU_CONV_FLOPS_PER_CORE))
  return seconds


def has_convolution(lowered) -> bool:
  """Whether a lowered program holds a convolution (the op, not a name)."""
  return "stablehlo.convolution" in lowered.as_text()


def counted_flops(lowered) -> float | None:
  """XLA's FLOP count of a lowered program (None if unknown). XLA counts a
  loop's body once: about one lane-step and one validation batch."""
  try:
    flops = lowered.cost_analysis().get("flops")
  except Exception:  # noqa: BLE001 - not every backend reports it
    flops = None
  return float(flops) if flops else None


def compiler_options(platform: str, tier: str = "long") -> dict:
  """XLA options per platform and tier (accelerators: XLA's own)."""
  if platform == "cpu":
    return dict(TIERS[tier])
  return {}


def _precision(precision: str | None):
  if precision is None:
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


def quiet_donation(fn, *args):
  with warnings.catch_warnings():
    # CPU backends may decline donation; it is an optimisation only.
    warnings.filterwarnings("ignore", message=".*donated buffers.*")
    return fn(*args)


class Compiler:
  """One compile path for every program kind: one precision and timing wrapper.

  :meth:`lower` traces and lowers (the host, holding the GIL; errors in the
  user's model and loss surface here, before anything compiles);
  :meth:`compile` runs XLA, which releases the GIL, so several programs may
  compile on threads at once. Counters add up over the programs a
  :class:`Program` builds; the caller books them into the search's stats.
  """

  def __init__(self, precision: str | None, platform: str):
    self.precision = precision
    self.platform = platform
    self.trace_seconds = 0.0
    self.compile_seconds = 0.0
    self.programs_compiled = 0
    self._lock = threading.Lock()

  def lower(self, fn, args, *, donate=(), out_shardings=None):
    kw = {"donate_argnums": donate} if donate else {}
    if out_shardings is not None:
      kw["out_shardings"] = out_shardings
    t0 = time.perf_counter()
    with _precision(self.precision):
      lowered = jax.jit(fn, **kw).lower(*args)
    self.trace_seconds += time.perf_counter() - t0
    return lowered

  def compile(self, lowered, tier: str = "long"):
    t0 = time.perf_counter()
    opts = compiler_options(self.platform, tier)
    try:
      compiled = lowered.compile(compiler_options=opts) if opts else lowered.compile()
    except Exception as e:  # an XLA build that does not know an option
      if not (opts and "compile option" in str(e)):
        raise
      compiled = lowered.compile()
    with self._lock:
      self.compile_seconds += time.perf_counter() - t0
      # A bucket's start program goes with its training program: one program to count.
      self.programs_compiled += tier not in START_TIERS
    return compiled

  def build(self, fn, args, tier: str = "long", **kw):
    return self.compile(self.lower(fn, args, **kw), tier)


_POOLS: dict[Any, Any] = {}  # compile pools by thread count; "lower", "start": one thread each


def compile_threads(platform: str) -> int:
  """Programs compiled at once in the background (0: on first use, in line).

  ``VMAPTUNE_COMPILE_THREADS`` overrides the platform's default.
  """
  value = os.environ.get("VMAPTUNE_COMPILE_THREADS")
  if value is not None:
    return max(0, int(value))
  return 1 if platform == "cpu" else 4


def lowering_pool(platform: str):
  """One background thread that traces and lowers programs while the search
  trains (None where programs compile in line: ``VMAPTUNE_COMPILE_THREADS=0``).

  Lowering is Python and holds the GIL, so one thread: it takes one core
  beside the devices' work, and the main thread only waits for a program's
  lowering when that program is the next to train.
  """
  return _one_thread("lower", platform)


def start_pool(platform: str):
  """One background thread that compiles a program's ``start`` beside its
  ``run`` (None where programs compile in line: ``VMAPTUNE_COMPILE_THREADS=0``).

  The two are independent, and in sequence the first program's compile left
  a core idle at every search's start (``start`` takes 0.6-0.8 s at XLA
  level 0 on the 2-core development CPU).
  """
  return _one_thread("start", platform)


def _one_thread(name: str, platform: str):
  if compile_threads(platform) == 0:
    return None
  if name not in _POOLS:
    import concurrent.futures  # noqa: PLC0415  (only when a pool is used)

    _POOLS[name] = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vmaptune-{name}")
  return _POOLS[name]


def compile_pool(platform: str):
  """The shared thread pool programs compile on (None: compile in line)."""
  n = compile_threads(platform)
  if n == 0:
    return None
  if n not in _POOLS:
    import concurrent.futures  # noqa: PLC0415  (only when a pool is used)

    _POOLS[n] = concurrent.futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix="vmaptune-compile")
  return _POOLS[n]
