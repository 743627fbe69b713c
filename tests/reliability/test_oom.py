"""Scenario 6: running out of device memory.

The k-th compiled call raises RESOURCE_EXHAUSTED (deterministically, through
VMAPTUNE_FAILPOINT): the population splits in half and retries; at one lane
per device the search stops with a message naming the memory needed and the
budget, its finished work saved, and a rerun resumes.
"""

import json

import pytest

import _search_script
import vmaptune as vt
from _subprocess import same_search
from vmaptune import _faults

OPTS = {"checkpoint_every": "20"}


def test_oom_at_the_smallest_layout_stops_with_state_saved(tmp_path, monkeypatch):
  ckpt = tmp_path / "ckpt"
  # Round 0: two buckets x three calls. The 7th call is round 1's first, already
  # at one lane per device (4 lanes over 4 devices): it cannot shrink.
  monkeypatch.setenv("VMAPTUNE_FAILPOINT", "execute@7=oom")
  _faults.reset()
  with pytest.raises(vt.OutOfMemoryError, match=r"one lane needs .* of state") as info:
    _search_script.run(str(ckpt), OPTS)
  assert "budget is" in str(info.value) and "per device" in str(info.value)
  monkeypatch.delenv("VMAPTUNE_FAILPOINT")
  resumed = _search_script.run(str(ckpt), OPTS)
  assert resumed.stats.resumed_from
  straight = _search_script.run(str(tmp_path / "straight"), OPTS)
  same_search(json.loads(json.dumps(_search_script.record(resumed))),
              json.loads(json.dumps(_search_script.record(straight))))
