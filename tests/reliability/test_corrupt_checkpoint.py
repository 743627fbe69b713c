"""Scenario 2: a corrupt or partial checkpoint never resumes silently wrong.

Every member of the newest checkpoint is truncated to 0, 1, n/2 and n-1
bytes, has one byte flipped, or is deleted; LATEST is emptied or garbled; an
uncommitted temporary directory is left behind. Loading falls back to the
previous good checkpoint with a warning (and the resumed search equals a
straight run), or, when no good one is left, raises an error naming the file.
"""

import json
import os
import shutil

import numpy as np
import pytest

import _search_script
import vmaptune as vt
from _subprocess import same_search
from vmaptune import _checkpoint, _faults

OPTS = {"checkpoint_every": "20"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint directory left by a crash in round 1 (two committed checkpoints)."""
  root = tmp_path_factory.mktemp("saved")
  os.environ["VMAPTUNE_FAILPOINT"] = "round1:mid=crash"
  _faults.reset()
  try:
    with pytest.raises(_faults.SimulatedCrash):
      _search_script.run(str(root / "ckpt"), OPTS)
  finally:
    del os.environ["VMAPTUNE_FAILPOINT"]
  straight = _search_script.record(_search_script.run(str(root / "straight"), OPTS))
  return root / "ckpt", json.loads(json.dumps(straight))


def _copy(saved, tmp_path):
  ckpt = tmp_path / "ckpt"
  shutil.copytree(saved[0], ckpt)
  names = sorted(n for n in os.listdir(ckpt) if n.startswith("ckpt-"))
  assert len(names) == 2
  return ckpt, ckpt / names[-1], ckpt / names[0]


def _truncate(path, size):
  data = path.read_bytes()
  n = {"0": 0, "1": 1, "half": len(data) // 2, "n-1": len(data) - 1}[size]
  path.write_bytes(data[:n])


def _flip(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 3] ^= 0x40
  path.write_bytes(bytes(data))


CASES = [(m, op) for m in ("meta.json", "arrays.npz", "MANIFEST.json")
         for op in ("0", "1", "half", "n-1", "flip", "delete")]


@pytest.mark.parametrize("member, op", CASES)
def test_corrupt_newest_falls_back_to_previous(saved, tmp_path, member, op):
  ckpt, newest, previous = _copy(saved, tmp_path)
  expected = _checkpoint.Checkpointer(ckpt)._read_one(previous.name)
  target = newest / member
  if op == "flip":
    _flip(target)
  elif op == "delete":
    target.unlink()
  else:
    _truncate(target, op)
  with pytest.warns(RuntimeWarning, match=f"{newest.name}.*|{member}"):
    meta, arrays = _checkpoint.Checkpointer(ckpt).load()
  # The previous checkpoint, exactly: never silently zeros.
  assert _checkpoint.dumps(meta) == _checkpoint.dumps(expected[0])
  assert sorted(arrays) == sorted(expected[1])
  for k in arrays:
    np.testing.assert_array_equal(arrays[k], expected[1][k])


def test_resume_through_a_corrupt_checkpoint_equals_a_straight_run(saved, tmp_path):
  ckpt, newest, _ = _copy(saved, tmp_path)
  _truncate(newest / "arrays.npz", "half")
  with pytest.warns(RuntimeWarning, match="corrupt"):
    result = _search_script.run(str(ckpt), OPTS)
  same_search(json.loads(json.dumps(_search_script.record(result))), saved[1])


def test_no_good_checkpoint_raises_naming_the_file(saved, tmp_path):
  ckpt, newest, previous = _copy(saved, tmp_path)
  _flip(newest / "arrays.npz")
  (previous / "meta.json").write_bytes(b"")
  with pytest.raises(vt.CheckpointError, match=r"meta.json: checksum mismatch"):
    _checkpoint.Checkpointer(ckpt).load()
  with pytest.raises(vt.CheckpointError, match="no usable checkpoint"):
    _search_script.run(str(ckpt), OPTS)


@pytest.mark.parametrize("latest", [b"", b"garbage\n", b"ckpt-999999\n"])
def test_damaged_latest_pointer(saved, tmp_path, latest):
  ckpt, newest, _ = _copy(saved, tmp_path)
  (ckpt / "LATEST").write_bytes(latest)
  meta, _ = _checkpoint.Checkpointer(ckpt).load()
  assert _checkpoint.dumps(meta) == _checkpoint.dumps(_checkpoint.Checkpointer(ckpt)._read_one(newest.name)[0])


def test_leftover_temporary_directory_is_ignored_and_cleaned(saved, tmp_path):
  ckpt, newest, _ = _copy(saved, tmp_path)
  shutil.copytree(newest, ckpt / "ckpt-000099.tmp-12345")
  (ckpt / "ckpt-000099.tmp-12345" / "meta.json").write_bytes(b"{")
  (ckpt / "LATEST.tmp-12345").write_bytes(b"ckpt-000099")
  meta, _ = _checkpoint.Checkpointer(ckpt).load()
  assert _checkpoint.dumps(meta) == _checkpoint.dumps(_checkpoint.Checkpointer(ckpt)._read_one(newest.name)[0])
  result = _search_script.run(str(ckpt), OPTS)
  same_search(json.loads(json.dumps(_search_script.record(result))), saved[1])
  assert not [n for n in os.listdir(ckpt) if ".tmp" in n]


def _asset(name, tmp_path):
  ckpt = tmp_path / name
  shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "assets", name), ckpt)
  return ckpt


def _set_version(ckpt, version):
  for name in os.listdir(ckpt):
    if name.startswith("ckpt-"):
      manifest = ckpt / name / "MANIFEST.json"
      data = json.loads(manifest.read_text())
      data["format_version"] = version
      manifest.write_text(json.dumps(data))


def test_format_versions(tmp_path):
  """Scenario 11: today's format, kept as a test asset, loads and resumes; an
  older format is refused with a clear error (and overwrite=True starts
  afresh); a future version is refused with a clear error."""
  ckpt = _asset("checkpoint-v2", tmp_path)
  meta, arrays = _checkpoint.Checkpointer(ckpt).load()
  assert meta["phase"] == "advance" and meta["horizons"] == 1 and len(meta["trials"]) == 8
  stored = [(t["id"], t["score"]) for t in meta["trials"]]
  result = _search_script.run(str(ckpt), OPTS)
  assert result.stats.resumed_from and len(result.trials) == 24
  assert [(t.id, t.score) for t in result.trials[:8]] == stored  # restored as saved
  assert 0 < result.stats.lane_steps < 24 * 60  # round 1 was resumed mid-way, not trained again

  old = _asset("checkpoint-v1", tmp_path)
  with pytest.raises(vt.CheckpointError, match=r"format version 1.*reads version 2.*older vmaptune.*overwrite=True"):
    _search_script.run(str(old), OPTS)
  fresh = _search_script.run(str(old), dict(OPTS, overwrite="1"))
  assert not fresh.stats.resumed_from and len(fresh.trials) == 24

  future = _asset("checkpoint-v2", tmp_path / "future")
  _set_version(future, _checkpoint.FORMAT_VERSION + 1)
  with pytest.raises(vt.CheckpointError, match=r"format version 3.*reads version 2"):
    _checkpoint.Checkpointer(future).load()
