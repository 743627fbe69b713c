"""Progress: a ``rich`` bar on a terminal, a line per round otherwise.

``rich`` comes with Flax, so it costs no extra dependency. When stderr is not
a terminal (a log file, CI, a notebook's captured output) nothing animates:
one line per round says how far the search is and the best score so far.
"""

from __future__ import annotations

import sys
import time
from typing import Any

_LINE_SECONDS = 2.0  # without a bar: at most one progress line this often


class Progress:
  """Lane-steps done, what the search is doing, and the best score so far.

  Args:
    metric: the metric's name, for the label.
    enabled: False silences everything.
    unit: what is counted (``"lane-steps"``, or ``"steps"`` for one run).
  """

  def __init__(self, metric: str, enabled: bool, unit: str = "lane-steps"):
    self.enabled = bool(enabled)
    self.metric = metric
    self.unit = unit
    self.tty = self.enabled and sys.stderr.isatty()
    self._bar = None
    self._task = None
    self._label = ""
    self._best: float | None = None
    self._done = 0
    self._compiling = False
    self._printed = None  # when the last line was printed (no bar)

  def _best_text(self) -> str:
    if self._best is None:
      return ""
    label = "latest" if self.unit == "steps" else "best"
    return f"{label} {self.metric} {self._best:.5g}"

  def start(self, label: str, total: int | None, done: int = 0) -> None:
    """A bar of ``total`` units (None: open-ended), ``done`` of them already."""
    self._label, self._done = label, done
    if self.tty and self._bar is None:
      try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
        from rich.progress import TimeElapsedColumn
      except ImportError:  # pragma: no cover - rich comes with flax
        self.tty = False
      else:
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
            TextColumn("{task.fields[best]}"), TimeElapsedColumn(),
            console=Console(file=sys.stderr), transient=False)
        self._bar.start()
    if self._bar is not None:
      self._task = self._bar.add_task(label, total=total, completed=done, best=self._best_text())

  def status(self, text: str | None) -> None:
    """What the search does right now (e.g. ``"compiling 2/6 programs"``); a
    line when there is no bar and a batch of compiles begins."""
    if self._bar is not None and self._task is not None:
      self._bar.update(self._task, description=f"{self._label}: {text}" if text else self._label)
    elif self.enabled and not self.tty and text and not self._compiling:
      print(f"vmaptune: {self._label}: {text}", file=sys.stderr, flush=True)
    self._compiling = bool(text)

  def advance(self, done: int, best: float | None = None) -> None:
    """``done`` units so far (absolute), and the best score so far."""
    if best is not None:
      self._best = best
    self._done = done
    if self._bar is not None and self._task is not None:
      self._bar.update(self._task, completed=done, best=self._best_text())

  def end_round(self, best: float | None, rounds_done: int, last: bool = False) -> None:
    """A round (of population time) finished: a line when there is no bar,
    at most one every few seconds (and the last)."""
    if best is not None:
      self._best = best
    if not self.enabled:
      return
    if self._bar is not None:
      if self._task is not None:
        self._bar.update(self._task, best=self._best_text())
      return
    now = time.monotonic()
    if not last and self._printed is not None and now - self._printed < _LINE_SECONDS:
      return
    self._printed = now
    print(f"vmaptune: {self._label} round {rounds_done} done, {self._done:,} {self.unit}, {self._best_text()}",
          file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.stop()
      self._bar = None

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc: Any) -> bool:
    self.close()
    return False
