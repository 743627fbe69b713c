"""Scenario 3: a full disk while writing a checkpoint.

The error reaches the user with the path; the previous checkpoint stays byte
for byte; the next save succeeds despite the leftovers; resuming then equals a
straight run.
"""

import errno
import hashlib
import json
import os

import pytest

import _search_script
from _subprocess import same_search
from vmaptune import _checkpoint

OPTS = {"checkpoint_every": "20"}


def _digest(directory):
  """SHA-256 of every committed file (not the lock, not uncommitted temporaries)."""
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    if ".tmp" in root:
      continue
    for f in sorted(files):
      if f == "LOCK" or ".tmp" in f:
        continue
      h.update(f.encode())
      with open(os.path.join(root, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


@pytest.mark.parametrize("where", ["write", "replace"])
def test_disk_full_keeps_the_previous_checkpoint_and_resumes(tmp_path, monkeypatch, where):
  ckpt = tmp_path / "ckpt"
  real_write, real_replace = _checkpoint.write_file, os.replace
  calls = {"n": 0}
  snapshot = {}

  def full(*args):
    calls["n"] += 1
    if calls["n"] == 9:  # the 3rd checkpoint's first member / rename
      snapshot["before"] = _digest(ckpt)
      raise OSError(errno.ENOSPC, "No space left on device")
    return (real_write if where == "write" else real_replace)(*args)

  if where == "write":
    monkeypatch.setattr(_checkpoint, "write_file", full)
  else:
    monkeypatch.setattr(_checkpoint.os, "replace", full)
  with pytest.raises(OSError, match=r"could not write checkpoint .*ckpt-\d+.*No space left") as info:
    _search_script.run(str(ckpt), OPTS)
  assert info.value.errno == errno.ENOSPC
  assert _digest(ckpt) == snapshot["before"]  # what was committed is untouched
  monkeypatch.setattr(_checkpoint, "write_file", real_write)
  monkeypatch.setattr(_checkpoint.os, "replace", real_replace)
  resumed = _search_script.run(str(ckpt), OPTS)
  straight = _search_script.run(str(tmp_path / "straight"), OPTS)
  same_search(json.loads(json.dumps(_search_script.record(resumed))),
              json.loads(json.dumps(_search_script.record(straight))))
  assert resumed.stats.resumed_from
  assert not [n for n in os.listdir(ckpt) if ".tmp" in n]
