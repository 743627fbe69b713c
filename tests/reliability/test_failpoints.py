"""Scenario 1 and 8: a crash at every fail point, then a rerun, equals a straight run.

The fail points: in the middle of a round (after a segment's checkpoint),
after a checkpoint's temporary directory is written, after it is renamed, and
before the LATEST pointer moves. In-process crashes (``=crash``) leave the
files exactly as SIGKILL would and make the full matrix cheap; a chain of real
SIGKILLs in child processes checks the same on a real process death.
"""

import json
import os
import signal

import pytest

import _search_script
from _subprocess import read, run_search, same_search
from vmaptune import _faults

OPTS = {"checkpoint_every": "20"}
POINTS = ["round1:mid", "checkpoint:after-temp-write@2", "checkpoint:after-rename@3",
          "checkpoint:before-latest@2", "round2:mid@2"]


def _record(result):
  return json.loads(json.dumps(_search_script.record(result)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  result = _search_script.run(str(tmp_path_factory.mktemp("straight") / "ckpt"), OPTS)
  return _record(result), result.stats.lane_steps


def _leftovers(ckpt):
  return [n for n in os.listdir(ckpt) if ".tmp" in n]


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_each_failpoint_then_resume_equals_straight_run(tmp_path, monkeypatch, straight, point):
  reference, total_steps = straight
  ckpt = tmp_path / "ckpt"
  monkeypatch.setenv("VMAPTUNE_FAILPOINT", point.split("@")[0] + "@" + (point.split("@")[1] if "@" in point else "1")
                     + "=crash")
  _faults.reset()
  with pytest.raises(_faults.SimulatedCrash):
    _search_script.run(str(ckpt), OPTS)
  monkeypatch.delenv("VMAPTUNE_FAILPOINT")
  resumed = _search_script.run(str(ckpt), OPTS)
  got = _record(resumed)
  same_search(got, reference)
  assert len({t["id"] for t in got["trials"]}) == len(got["trials"])  # no duplicate trial ids
  assert 0 < resumed.stats.lane_steps < total_steps  # saved work was not trained again
  assert not _leftovers(ckpt)  # nothing stale left behind


def test_sigkill_chain_across_processes(tmp_path, straight):
  reference, total_steps = straight
  out, ckpt = tmp_path / "out.json", tmp_path / "ckpt"
  # A renamed but unpublished checkpoint: the subtlest state a death can leave.
  for point in ("checkpoint:after-rename@2",):
    killed = run_search(out, ckpt, "unused", *[f"{k}={v}" for k, v in OPTS.items()],
                        env={"VMAPTUNE_FAILPOINT": point}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  run_search(out, ckpt, "unused", *[f"{k}={v}" for k, v in OPTS.items()])
  got = read(out)
  same_search(got, reference)
  assert got["lane_steps"] < total_steps and not _leftovers(ckpt)


def test_same_search_in_two_fresh_processes_is_bit_identical(tmp_path, straight):
  from _subprocess import start_search

  args = [f"{k}={v}" for k, v in OPTS.items()]
  procs = [start_search(tmp_path / f"{i}.json", tmp_path / f"ckpt{i}", "unused", *args) for i in range(2)]
  for p in procs:
    assert p.wait(timeout=240) == 0, p.stderr.read()[-2000:]
  a, b = read(tmp_path / "0.json"), read(tmp_path / "1.json")
  same_search(a, b)
  same_search(a, straight[0])  # and equal to this process's run
