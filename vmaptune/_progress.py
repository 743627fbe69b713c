"""A progress bar on stderr when it is a terminal; a line per round otherwise."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
  """Rounds, lane-steps and the best score so far.

  Args:
    total_rounds: rounds in the search (or 1 for a single run).
    metric: the metric's name, for the label.
    enabled: False silences everything.
  """

  def __init__(self, total_rounds: int, metric: str, enabled: bool, unit: str = "lane-steps"):
    self.enabled = bool(enabled)
    self.total_rounds = total_rounds
    self.metric = metric
    self.unit = unit
    self.tty = self.enabled and sys.stderr.isatty()
    self._bar = None
    self._task = None
    self._round = 0
    self._best = None
    if self.tty:
      try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
        from rich.console import Console
      except ImportError:  # pragma: no cover - rich comes with flax
        self.tty = False
      else:
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TextColumn("{task.fields[best]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._bar.start()

  def _best_text(self) -> str:
    if self._best is None:
      return ""
    label = "latest" if self.unit == "steps" else "best"
    return f"{label} {self.metric} {self._best:.5g}"

  def start_round(self, r: int, total: int, label: str | None = None) -> None:
    self._round = r
    if not self.enabled:
      return
    desc = label or f"round {r + 1}/{self.total_rounds}"
    if self._bar is not None:
      self._task = self._bar.add_task(desc, total=total, best=self._best_text())

  def advance(self, amount: int, best: float | None = None) -> None:
    if best is not None:
      self._best = best
    if self._bar is not None and self._task is not None:
      self._bar.update(self._task, advance=amount, best=self._best_text())

  def end_round(self, best: float | None, extra: str = "") -> None:
    if best is not None:
      self._best = best
    if not self.enabled:
      return
    if self._bar is not None:
      if self._task is not None:
        self._bar.update(self._task, best=self._best_text())
      return
    print(
        f"vmaptune: round {self._round + 1}/{self.total_rounds} done, {self._best_text()}{extra}",
        file=sys.stderr,
        flush=True,
    )

  def close(self) -> None:
    if self._bar is not None:
      self._bar.stop()
      self._bar = None

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc: Any) -> bool:
    self.close()
    return False
