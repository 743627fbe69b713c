"""Two processes with jax.distributed on localhost (CPU, gloo collectives).

Every child has an outer timeout: a stuck-but-alive process can hang the
others (jax#38503), so the test kills what is left and fails instead.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from _subprocess import HERE, child_env, read, same_search

TIMEOUT = 150


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(out, ckpt=None, env_per_process=None):
  port = _port()
  procs = []
  for pid in range(2):
    # Two devices a process: four in all, as in this test process (conftest).
    env = child_env("unused", VMAPTUNE_CPU_DEVICES="0", JAX_PLATFORMS="cpu", DEVICES_PER_PROCESS="2",
                    **(env_per_process or {}).get(pid, {}))
    cmd = [sys.executable, str(HERE / "_distributed_script.py"), str(pid), "2", str(port), str(out)]
    if ckpt is not None:
      cmd.append(str(ckpt))
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  codes = []
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT)
      codes.append(p.returncode)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return codes, procs


def _single_process_reference(ckpt_dir):
  """The same search in this process, on its four CPU devices."""
  import _search_script

  opts = {"checkpoint_every": "20"}  # as the other reliability tests: programs already compiled
  return json.loads(json.dumps(_search_script.record(_search_script.run(str(ckpt_dir), opts))))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One reference for both tests: the checkpointed search, in this process."""
  return _single_process_reference(tmp_path_factory.mktemp("reference") / "ckpt")


@pytest.mark.slow  # its path is the resumed launch of the next test, which checks the same
def test_two_processes_match_one_process_with_two_devices(tmp_path, reference):
  codes, procs = _launch(tmp_path / "out.json", tmp_path / "ckpt")
  assert codes == [0, 0], procs[0].stderr.read()[-2000:] + procs[1].stderr.read()[-2000:]
  got = read(tmp_path / "out.json")
  assert got["devices"] == 4
  # Two processes of two devices vs one process of four: the same per-device
  # program, and the results agree (here bit for bit; promised: to rounding).
  for a, b in zip(got["trials"], reference["trials"]):
    assert a["config"] == b["config"] and a["seed"] == b["seed"]
    np.testing.assert_allclose(a["curve"], b["curve"], rtol=1e-5)
  assert got["best"] == reference["best"]
  # Process 0 alone committed the checkpoints.
  assert (tmp_path / "ckpt" / "LATEST").exists()


def test_killed_process_stops_the_other_and_the_search_resumes(tmp_path, reference):
  ckpt = tmp_path / "ckpt"
  out = tmp_path / "out.json"
  codes, procs = _launch(out, ckpt, {1: {"VMAPTUNE_FAILPOINT": "round1:mid"}})
  assert codes[1] == -signal.SIGKILL
  assert codes[0] != 0  # the survivor exits non-zero (within the timeout) instead of hanging
  committed = sorted(n for n in os.listdir(ckpt) if n.startswith("ckpt-") and ".tmp" not in n)
  assert committed  # process 0 committed checkpoints; nobody else wrote any
  codes, procs = _launch(out, ckpt)
  assert codes == [0, 0], procs[0].stderr.read()[-2000:] + procs[1].stderr.read()[-2000:]
  resumed = read(out)
  assert resumed["resumed_from"] == str(ckpt)
  # Two processes of two devices resume and finish the search of one process
  # of four: the same per-device program, the same trials and curves.
  assert resumed["devices"] == 4
  same_search(resumed, reference)
  assert (ckpt / "LATEST").exists()
