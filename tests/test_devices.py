"""Devices and memory: sharding over devices, one CPU device per core, chunking, OOM."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import vmaptune as vt
from vmaptune import _devices, _faults

from _models import mlp_fn
from _subprocess import ROOT

SPACE = {"learning_rate": vt.loguniform(3e-4, 1e-3), "hidden": 16, "batch_size": 32}
KW = dict(num_configs=8, num_steps=30, rounds=2, seed=2, verbose=False)


def test_tests_run_on_four_devices():
  assert len(jax.devices()) == 4


def test_a_lanes_parameters_come_from_the_device_holding_it_without_compiling(caplog):
  # Copying a lane's parameters (the best trial's) reads the shard that holds
  # it: indexing the sharded array compiled a gather per leaf shape, a second
  # of a 10 s search's first finished trial on the 2-core CPU.
  from types import SimpleNamespace as NS

  from vmaptune import _placement

  rng = np.random.default_rng(0)
  host = {"w": rng.normal(size=(8, 3, 2)).astype(np.float32), "b": rng.normal(size=(8,)).astype(np.float32)}
  placed = _placement.place_lanes(host, _devices.make_mesh(jax.devices()))
  assert len(placed["w"].sharding.device_set) == 4
  with caplog.at_level("WARNING"), jax.log_compiles(True):
    for lane in range(8):
      params, _ = _placement.lane_params(NS(params=placed, model_state={}), lane)
      assert isinstance(params["w"], np.ndarray)
      np.testing.assert_array_equal(params["w"], host["w"][lane])
      np.testing.assert_array_equal(params["b"], host["b"][lane])
  assert not [r for r in caplog.records if "ompil" in r.getMessage()], "compiled to copy a lane"


@pytest.fixture(scope="module")
def sharded(small_digits):
  return vt.search(mlp_fn, small_digits, SPACE, **KW)


def test_sharded_over_four_devices_matches_one_device(small_digits, sharded):
  single = vt.search(mlp_fn, small_digits, SPACE, devices=1, **KW)
  assert sharded.stats.num_devices == 4 and single.stats.num_devices == 1
  for a, b in zip(sharded.trials, single.trials):
    assert a.config == b.config and a.seed == b.seed
    # Per-device lane counts change the program; at moderate learning rates
    # the lanes agree to rounding.
    np.testing.assert_allclose(a.curve, b.curve, rtol=1e-4)
  assert sharded.best_config == single.best_config


def test_padding_lanes_never_reach_the_results(small_digits):
  r = vt.search(mlp_fn, small_digits, SPACE, num_configs=5, num_steps=10, rounds=1, verbose=False)
  assert len(r.trials) == 5 and r.stats.padded_lanes == 3  # 5 lanes padded to 8 over 4 devices
  assert r.stats.lane_steps == 5 * 10


def test_a_buckets_trials_take_lanes_on_the_devices_in_turn(small_digits):
  # Each device holds a block of consecutive lanes. Lanes that start one by
  # one (the adaptive strategy with a timeout on CPU starts one per bucket and
  # adds more) must not all land on the first device while the others idle:
  # a bucket's trials, in the order they start, take one lane of each device
  # in turn, and each bucket's first trial sits on the next device.
  space = dict(SPACE, hidden=vt.choice([8, 16]))
  r = vt.search(mlp_fn, small_digits, space, num_configs=24, num_steps=10, rounds=1, seed=0, verbose=False)
  firsts = []
  for h in (8, 16):
    trials = sorted((t for t in r.trials if t.config["hidden"] == h), key=lambda t: t.id)
    lanes = r._replay.population.refs[trials[0].id].lanes
    per = lanes // 4
    assert len(trials) > 2 * per  # members on at least three devices
    devices = [t.lane // per for t in trials]
    used = len({d for d in devices})
    assert len(set(devices[:used])) == used, devices  # the first trials: one per device
    assert sorted(t.lane for t in trials) == list(range(len(trials)))  # padding stays last
    firsts.append(devices[0])
  assert firsts[0] != firsts[1]
  # The lanes moved, the results did not: a trial retrains to its scores.
  for t in r.trials[:2]:
    assert r.retrain(t).score == t.score


def _program(result, trial):
  """The compiled program a trial ran in (through the result's replay record)."""
  ref = result._replay.population.refs[trial.id]
  return result._replay.plan.program(ref.signature, ref.lanes, ref.evals_per_call)


def _peak(result, lanes):
  from vmaptune._plan import peak_bytes

  programs = [_program(result, t) for t in result.trials]
  return peak_bytes([p for p in programs if p.layout.num_lanes == lanes][0].memory)


def test_tiny_memory_budget_chunks_the_population_with_the_same_results(small_digits, sharded):
  # Just too small for the 8-lane program: the compiled program's own memory
  # analysis says so, and the bucket runs as two programs of 4 lanes.
  budget = _peak(sharded, 8) - 1
  chunked = vt.search(mlp_fn, small_digits, SPACE, memory_budget=budget, **KW)
  assert _peak(chunked, 4) <= budget
  lanes = {_program(chunked, t).layout.num_lanes for t in chunked.trials}
  assert lanes == {4}  # one lane per device per program instead of all 8 at once
  for a, b in zip(chunked.trials, sharded.trials):
    assert a.config == b.config and a.score == b.score  # lanes are independent: bit for bit


def test_out_of_memory_splits_and_retries(small_digits, sharded, monkeypatch):
  monkeypatch.setenv("VMAPTUNE_FAILPOINT", "execute@1=oom")
  _faults.reset()
  with pytest.warns(RuntimeWarning, match="out of memory with 8 lanes.*retrying with 4"):
    r = vt.search(mlp_fn, small_digits, SPACE, **KW)
  for a, b in zip(r.trials, sharded.trials):
    assert a.config == b.config and a.score == b.score


def test_out_of_memory_at_one_lane_per_device_is_a_clear_error(small_digits, monkeypatch):
  monkeypatch.setenv("VMAPTUNE_FAILPOINT", "execute@1=oom,execute@2=oom")
  _faults.reset()
  with pytest.raises(vt.OutOfMemoryError, match=r"1 per device.*one lane needs .*KiB.*budget is 2.0 MiB"):
    with pytest.warns(RuntimeWarning):
      vt.search(mlp_fn, small_digits, SPACE, num_configs=8, num_steps=10, rounds=1, verbose=False,
                memory_budget="2MB")


@pytest.mark.parametrize("value, expected", [(1024, 1024), ("2KB", 2048), ("1.5MB", 3 * 2**19), ("1GiB", 2**30)])
def test_memory_budget_parsing(value, expected):
  assert _devices.parse_bytes(value) == expected


@pytest.mark.parametrize("value", [0, -5, "lots", True, "0MB"])
def test_bad_memory_budget(value, small_digits):
  with pytest.raises((ValueError, TypeError), match="memory_budget"):
    vt.search(mlp_fn, small_digits, SPACE, memory_budget=value, num_configs=2, num_steps=5, verbose=False)


def _child(code, **env):
  e = dict(os.environ)
  for k in ("VMAPTUNE_CPU_DEVICES", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES"):
    e.pop(k, None)
  e["PYTHONPATH"] = str(ROOT)
  e.update(env)
  return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)


def test_import_gives_one_cpu_device_per_core():
  out = _child("import vmaptune, jax, os; print(len(jax.devices()), len(os.sched_getaffinity(0)))")
  devices, cores = map(int, out.stdout.split())
  assert devices == cores
  out = _child("import vmaptune, jax; print(len(jax.devices()))", VMAPTUNE_CPU_DEVICES="3")
  assert out.stdout.strip() == "3"


def test_late_import_warns_and_falls_back(tmp_path):
  code = (
      "import jax, jax.numpy as jnp, numpy as np, warnings\n"
      "jnp.ones(3)  # JAX initialised before vmaptune\n"
      "import vmaptune as vt\n"
      "import sys; sys.path.insert(0, %r)\n"
      "from _models import mlp_fn\n"
      "x = np.random.default_rng(0).normal(size=(100, 64)).astype(np.float32)\n"
      "y = (x[:, 0] > 0).astype(np.int32)\n"
      "with warnings.catch_warnings(record=True) as w:\n"
      "  warnings.simplefilter('always')\n"
      "  r = vt.search(mlp_fn, (x, y), {'learning_rate': 1e-3}, num_configs=2, num_steps=2, rounds=1, verbose=False)\n"
      "print(r.stats.num_devices, len([m for m in w if 'initialised before' in str(m.message)]))\n"
  ) % str(ROOT / "tests")
  out = _child(code)
  assert out.returncode == 0, out.stderr[-2000:]
  devices, warned = map(int, out.stdout.split())
  cores = len(os.sched_getaffinity(0))
  assert devices == 1 and warned == (1 if cores > 1 else 0)


def test_another_cache_folder_in_the_same_process_is_warned(tmp_path):
  # JAX's cache folder is set once per process (here by conftest): a search
  # asking for another one is told it is not used, instead of silence.
  current = jax.config.jax_compilation_cache_dir
  with pytest.warns(RuntimeWarning, match=r"compilation_cache=.* is not used: this process already caches"):
    assert _devices.use_compilation_cache(str(tmp_path / "elsewhere")) == current
  assert not (tmp_path / "elsewhere").exists()
  assert _devices.use_compilation_cache(True) == current  # the default folder: whatever is in use
