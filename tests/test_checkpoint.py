"""Checkpoint and resume: kill, rerun, compare with an uninterrupted run."""

import os
import signal
import time

import numpy as np
import pytest

from flax import nnx

import vmaptune as vt
from vmaptune import _checkpoint, _faults

from _models import mlp_fn
from _subprocess import read, run_search, same_search, start_search

SPACE = {"learning_rate": vt.loguniform(1e-3, 3e-2), "hidden": vt.choice([8, 16])}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("xla-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted search with the same checkpoint settings, run in this
  process (same device count as the children, so the same programs)."""
  import json

  import _search_script

  d = tmp_path_factory.mktemp("reference")
  result = _search_script.run(str(d / "ckpt"), {"checkpoint_every": "20"})
  return json.loads(json.dumps(_search_script.record(result)))


def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(tmp_path, cache_dir, reference):
  out, ckpt = tmp_path / "out.json", tmp_path / "ckpt"
  rng = np.random.default_rng(int(time.time()))  # a different moment each run; any must work
  proc = start_search(out, ckpt, cache_dir, "checkpoint_every=20")
  deadline = time.time() + 120
  while time.time() < deadline and not (ckpt / "LATEST").exists() and proc.poll() is None:
    time.sleep(0.02)
  time.sleep(float(rng.uniform(0.0, 1.5)))
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
  proc.wait()
  run_search(out, ckpt, cache_dir, "checkpoint_every=20")
  same_search(read(out), reference)


def _small(tmp_path, **kw):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 64)).astype(np.float32)
  y = (x[:, :10].argmax(axis=1)).astype(np.int32)
  args = dict(num_configs=4, num_steps=20, rounds=2, seed=0, verbose=False,
              checkpoint_dir=tmp_path / "ckpt")
  args.update(kw)
  return vt.search(mlp_fn, (x, y), {"learning_rate": vt.loguniform(1e-3, 3e-2)}, **args)


def test_changed_call_is_refused_and_overwrite_starts_afresh(tmp_path):
  first = _small(tmp_path)
  # The split follows the seed, so the data differs too: said, not left to puzzle over.
  with pytest.raises(vt.CheckpointMismatch, match=r"seed: checkpoint has 0, this call has 1.*split follows `seed`"):
    _small(tmp_path, seed=1)
  with pytest.raises(vt.CheckpointMismatch, match="num_configs"):
    _small(tmp_path, num_configs=5)
  again = _small(tmp_path)  # the same call: nothing to train
  assert again.stats.lane_steps == 0 and again.stats.resumed_from
  assert [t.score for t in again.trials] == [t.score for t in first.trials]
  fresh = _small(tmp_path, seed=1, overwrite=True)
  assert fresh.stats.lane_steps > 0 and fresh.trials[0].config != first.trials[0].config


def test_ctrl_c_returns_and_saves_finished_rounds(tmp_path):
  calls = []

  def interrupt_after_first_round(result):
    calls.append(len(result.trials))
    raise KeyboardInterrupt

  with pytest.warns(RuntimeWarning, match="interrupted"):
    partial = _small(tmp_path, rounds=3, callbacks=[interrupt_after_first_round])
  assert partial.interrupted and len(partial.trials) == 4 and len(partial.regions) == 1
  finished = _small(tmp_path, rounds=3)
  assert not finished.interrupted and len(finished.trials) == 12
  straight = _small(tmp_path / "other", rounds=3)
  assert [t.score for t in finished.trials] == [t.score for t in straight.trials]
  # The restored best model and replay still work after resuming.
  assert finished.best_model() is not None
  assert finished.retrain(finished.trials[5]).score == finished.trials[5].score


def test_second_process_on_the_same_directory_fails_fast(tmp_path):
  ckpt = tmp_path / "ckpt"
  holder = _checkpoint.Checkpointer(ckpt)
  lock = ckpt / "LOCK"
  ckpt.mkdir()
  # A live process (the parent of this test) holds it.
  import socket

  lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")
  with pytest.raises(vt.CheckpointError, match=f"in use by process {os.getppid()}"):
    holder.acquire()
  # A dead holder's lock is taken over.
  lock.write_text(f"999999999 {socket.gethostname()}\n")
  holder.acquire()
  assert lock.read_text().split()[0] == str(os.getpid())
  holder.release()
  assert not lock.exists()


class _ActivationMLP(nnx.Module):
  def __init__(self, activation, rngs):
    self.inp, self.out, self.activation = nnx.Linear(64, 8, rngs=rngs), nnx.Linear(8, 10, rngs=rngs), activation

  def __call__(self, x):
    return self.out(self.activation(self.inp(x)))


def _activation_fn(config, rngs):
  return _ActivationMLP(config["activation"], rngs)


def test_function_valued_hyperparameters_survive_a_resume(tmp_path, monkeypatch):
  # JSON stores a function by name; a resumed search must hand the model the
  # space's own function again (configs, programs, best model, replay).
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 64)).astype(np.float32)
  y = (x[:, :10].argmax(axis=1)).astype(np.int32)
  space = {"learning_rate": vt.loguniform(1e-3, 3e-2), "activation": vt.choice([nnx.relu, nnx.tanh]),
           "unused": nnx.gelu}
  kw = dict(num_configs=4, num_steps=20, rounds=2, seed=0, verbose=False, checkpoint_dir=tmp_path / "ckpt",
            checkpoint_every=10)
  straight = vt.search(_activation_fn, (x, y), space, **dict(kw, checkpoint_dir=tmp_path / "straight"))
  monkeypatch.setenv("VMAPTUNE_FAILPOINT", "round1:mid=crash")
  _faults.reset()
  with pytest.raises(_faults.SimulatedCrash):
    vt.search(_activation_fn, (x, y), space, **kw)
  monkeypatch.delenv("VMAPTUNE_FAILPOINT")
  resumed = vt.search(_activation_fn, (x, y), space, **kw)
  assert resumed.stats.resumed_from
  assert [t.score for t in resumed.trials] == [t.score for t in straight.trials]
  for t, u in zip(resumed.trials, straight.trials):
    assert t.config["activation"] is u.config["activation"] and t.config["unused"] is nnx.gelu
  assert resumed.best_model().activation is straight.best_config["activation"]
  first = resumed.trials[0]  # finished before the crash: its program is rebuilt from the checkpoint
  assert resumed.retrain(first).score == first.score
