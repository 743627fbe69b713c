"""Scenario 10: two processes on one checkpoint directory."""

import socket
import subprocess
import sys

import pytest

import _search_script
import vmaptune as vt


def test_second_search_fails_fast_naming_the_live_holder(tmp_path):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (ckpt / "LOCK").write_text(f"{holder.pid} {socket.gethostname()}\n")
    with pytest.raises(vt.CheckpointError, match=f"in use by process {holder.pid}"):
      _search_script.run(str(ckpt), {})
  finally:
    holder.kill()
    holder.wait()
  # Its holder is dead now: the next search takes over and completes.
  result = _search_script.run(str(ckpt), {})
  assert len(result.trials) == 24 and not (ckpt / "LOCK").exists()
