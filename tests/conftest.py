"""Test configuration: several CPU devices, strict rank promotion, shared data.

Four forced CPU devices (set before JAX initialises) exercise the sharded lane
layout on any machine. Strict rank promotion makes accidental broadcasting
between the lane axis and a parameter axis fail loudly. Dtype promotion stays
standard: optax itself is not strict-clean (``decay ** count`` with an int32
count in its Adam bias correction), nor is Flax's ``avg_pool``.
"""

import os

os.environ.setdefault("VMAPTUNE_CPU_DEVICES", "4")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["VMAPTUNE_CPU_DEVICES"]))
jax.config.update("jax_numpy_rank_promotion", "raise")

# One on-disk compilation cache for the session, shared with the child
# processes of the checkpoint and reliability tests (tests/_subprocess.py):
# a child then loads what this process compiled instead of compiling again.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

XLA_CACHE = os.environ.get("VMAPTUNE_TEST_XLA_CACHE") or tempfile.mkdtemp(prefix="vmaptune-test-xla-")
if "VMAPTUNE_TEST_XLA_CACHE" not in os.environ:
  os.environ["VMAPTUNE_TEST_XLA_CACHE"] = XLA_CACHE
  atexit.register(shutil.rmtree, XLA_CACHE, True)
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

import pytest  # noqa: E402

import vmaptune  # noqa: E402,F401  (after the device count is fixed)


@pytest.fixture
def no_compile(monkeypatch):
  """Any compile fails the test: bad input must be refused before compiling."""
  from vmaptune import _program, _single

  def refuse(*a, **k):
    raise AssertionError("compiled before validating the input")

  monkeypatch.setattr(_program.Program, "compile", refuse)
  monkeypatch.setattr(_single.SingleProgram, "init", refuse)


@pytest.fixture
def compile_tiers(monkeypatch):
  """The tier of every XLA compile from here on, in order (a list that grows)."""
  from vmaptune import _compiler

  tiers = []
  compile = _compiler.Compiler.compile

  def record(self, lowered, tier="long"):
    tiers.append(tier)
    return compile(self, lowered, tier)

  monkeypatch.setattr(_compiler.Compiler, "compile", record)
  return tiers


@pytest.fixture(scope="session")
def digits():
  """scikit-learn's digits, features scaled to [0, 1] (1797 x 64, 10 classes),
  read as the demo reads them (without importing scikit-learn)."""
  from vmaptune._demo import load_digits

  return load_digits()


@pytest.fixture(scope="session")
def digits_split(digits):
  """600 digits to train on and the next 200 to validate on, as a data dict."""
  x, y = digits
  return {"train": (x[:600], y[:600]), "val": (x[600:800], y[600:800])}


@pytest.fixture(scope="session")
def small_digits(digits):
  """The first 600 digits: enough to learn, quick to train."""
  x, y = digits
  return x[:600], y[:600]


_COMPILE = {"n": 0, "s": 0.0}


def _on_duration(event, duration, **kw):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILE["n"] += 1
    _COMPILE["s"] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def pytest_sessionfinish(session):
  # An xdist worker hands its count to the controller (pytest_testnodedown).
  if hasattr(session.config, "workeroutput"):
    session.config.workeroutput["xla_compiles"] = dict(_COMPILE)


def pytest_testnodedown(node, error):
  theirs = getattr(node, "workeroutput", {}).get("xla_compiles", {})
  _COMPILE["n"] += theirs.get("n", 0)
  _COMPILE["s"] += theirs.get("s", 0.0)


def pytest_terminal_summary(terminalreporter):
  terminalreporter.write_line(
      f"XLA backend compiles: {_COMPILE['n']} taking {_COMPILE['s']:.1f}s (every worker's, summed)"
  )
