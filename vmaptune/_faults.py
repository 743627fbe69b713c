"""Test-only fault injection: ``VMAPTUNE_FAILPOINT`` makes named points fail.

The variable holds comma-separated ``point[@n][=action]`` entries: at the
``n``-th time (default 1st) the program passes ``point``, ``action`` happens:
``kill`` (SIGKILL this process, default for checkpoint points), ``crash`` (raise
:class:`SimulatedCrash`, a ``BaseException`` nothing in vmaptune catches: the
files on disk are left as a SIGKILL would leave them, for fast in-process
tests) or ``oom`` (an XLA-style ``RESOURCE_EXHAUSTED`` error, default for
``execute``). Examples::

  VMAPTUNE_FAILPOINT=round1:mid            # SIGKILL in the middle of round 1
  VMAPTUNE_FAILPOINT=checkpoint:after-rename@2
  VMAPTUNE_FAILPOINT=execute@3=oom         # the 3rd compiled call runs out of memory

Unset (the normal case) it costs one dictionary lookup per point.
"""

from __future__ import annotations

import os
import signal

__all__ = ["failpoint", "is_out_of_memory", "InjectedOutOfMemory", "SimulatedCrash"]

_counts: dict[str, int] = {}


class InjectedOutOfMemory(RuntimeError):
  """Raised by an ``=oom`` fail point; reads like XLA's own error."""


class SimulatedCrash(BaseException):
  """Raised by a ``=crash`` fail point: the process 'dies' here."""


def _entries() -> list[tuple[str, int, str]]:
  spec = os.environ.get("VMAPTUNE_FAILPOINT", "")
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    action = "oom" if item.startswith("execute") else "kill"
    if "=" in item:
      item, action = item.split("=", 1)
    n = 1
    if "@" in item:
      item, count = item.split("@", 1)
      n = int(count)
    out.append((item, n, action))
  return out


def failpoint(name: str) -> None:
  """Fails here if ``VMAPTUNE_FAILPOINT`` names this point and its count is due."""
  if "VMAPTUNE_FAILPOINT" not in os.environ:
    return
  _counts[name] = _counts.get(name, 0) + 1
  for point, n, action in _entries():
    if point == name and _counts[name] == n:
      if action == "oom":
        raise InjectedOutOfMemory(
            f"RESOURCE_EXHAUSTED: Out of memory (injected by VMAPTUNE_FAILPOINT at {name}@{n})"
        )
      if action == "crash":
        raise SimulatedCrash(f"{name}@{n}")
      os.kill(os.getpid(), signal.SIGKILL)


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an exception is XLA running out of device memory."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def reset() -> None:
  """Forgets how often each point was passed (tests)."""
  _counts.clear()
