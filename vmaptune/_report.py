"""One self-contained HTML page about a search: summary, tables and plots.

Plots are inlined as base64 PNG ``data:`` URIs and the styles sit in the
page, so the file can be mailed, attached to an issue or opened offline.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
import tempfile
from typing import Any, Callable

from . import _importance
from . import _space
from ._trial import rounds_text, unfinished

__all__ = ["write_report"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; }
td.name, th.name { text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #a33; font-size: 0.9em; }
.muted { color: #666; }
"""


def write_report(result, path, *, title: str | None = None, top: int = 10) -> str:
  """Writes one self-contained HTML page about ``result``; returns its path.

  The page holds the metric and its direction, the best config and score,
  where the time went, the top trials and the plots of :mod:`vmaptune.plot`
  (a scatter of the two most important hyperparameters, slices, learning
  curves, history and importance). Every image is an inline base64 PNG and
  every text is HTML-escaped. A plot that cannot be drawn (say, too few
  finite trials for importance) is replaced by a note saying why.

  Args:
    result: a :class:`~vmaptune.SearchResult`.
    path: a directory (created if needed; the page is ``report.html`` in it)
      or a file name ending in ``.html``.
    title: the page title; default ``"vmaptune search: <metric>"``.
    top: how many of the best trials the table lists.

  Returns:
    The page's path, as a string.

  >>> import os, tempfile
  >>> from vmaptune import _report
  >>> from vmaptune._demo import example_result
  >>> path = _report.write_report(example_result(), tempfile.mkdtemp())
  >>> os.path.basename(path)
  'report.html'
  """
  if isinstance(top, bool) or not isinstance(top, int) or top < 1:
    raise ValueError(f"`top` must be a positive int, got {top!r}.")
  path = os.fspath(path)
  if not isinstance(path, str):
    path = os.fsdecode(path)
  if path.lower().endswith((".html", ".htm")):
    directory = os.path.dirname(os.path.abspath(path))
  else:
    directory, path = path, os.path.join(path, "report.html")
  os.makedirs(directory, exist_ok=True)
  page = render(result, title=title, top=top)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".report-", suffix=".html.tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(page)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def render(result, *, title: str | None = None, top: int = 10) -> str:
  """The report page as an HTML string (see :func:`write_report`).

  >>> from vmaptune import _report
  >>> from vmaptune._demo import example_result
  >>> _report.render(example_result()).startswith("<!DOCTYPE html>")
  True
  """
  e = html.escape
  better = "higher" if result.maximize else "lower"
  title = title or f"vmaptune search: {result.metric}"
  ok = [t for t in result.trials if t.status == "ok" and math.isfinite(t.score)]
  done = {id(t) for t in ok}
  body = [f"<h1>{e(title)}</h1>"]
  rest = unfinished([t for t in result.trials if id(t) not in done])
  body.append(
      f"<p class='muted'>{len(result.trials)} trials ({len(ok)} finished{', ' if rest else ''}{rest}), "
      f"{rounds_text(result)}; metric "
      f"<b>{e(str(result.metric))}</b>, {better} is better; written "
      f"{e(datetime.datetime.now().isoformat(timespec='seconds'))}.</p>"
  )
  body += _best_section(result, ok)
  body += _plots_section(result)
  body += _top_section(result, top)
  body += _key_value_section("Search options", result.options)
  stats = result.stats.as_dict() if hasattr(result.stats, "as_dict") else dict(result.stats or {})
  body += _key_value_section("Where the time went", stats)
  body += _space_section(result)
  return (
      "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
      f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
      + "\n".join(body) + "\n</body>\n</html>\n"
  )


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.6g}"
  if callable(v):
    return getattr(v, "__qualname__", repr(v))
  return str(v)


def _best_section(result, ok) -> list[str]:
  e = html.escape
  if not ok:
    return ["<h2>Best trial</h2>", "<p class='note'>Every trial diverged: there is no best trial.</p>"]
  best = result.best_trial
  rows = "".join(
      f"<tr><td class='name'>{e(str(k))}</td><td>{e(_fmt(v))}</td></tr>" for k, v in best.config.items()
  )
  check = getattr(result, "rechecked", None)
  kept = []
  if check is not None and check.best_trial.id == best.id:
    kept = [f"<p class='note'>Kept by the re-check: the best mean {e(str(result.metric))} over "
            f"{len(check.seeds)} fresh seeds ({e(_fmt(float(check.mean[0])))}) of the top {len(check.trials)} "
            "trials, not necessarily the best single score below.</p>"]
  return [
      "<h2>Best trial</h2>",
      f"<p>{e(str(result.metric))} = <b>{e(_fmt(best.score))}</b> (trial {best.id}, round "
      f"{best.round}, seed {best.seed})</p>",
      *kept,
      f"<table><tr><th class='name'>hyperparameter</th><th>value</th></tr>{rows}</table>",
  ]


def _top_section(result, top: int) -> list[str]:
  e = html.escape
  names = list(_space.searched(result.space))
  head = ["rank", "trial", "round", str(result.metric)] + names
  rows = []
  for i, t in enumerate(result.top(top)):
    cells = [str(i + 1), str(t.id), str(t.round), _fmt(t.score)] + [_fmt(t.config.get(k)) for k in names]
    rows.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
  header = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
  return [f"<h2>Top {len(rows)} trials</h2>", f"<table>{header}{''.join(rows)}</table>"]


def _key_value_section(heading: str, values: dict) -> list[str]:
  e = html.escape
  if not values:
    return []
  rows = "".join(
      f"<tr><td class='name'>{e(str(k))}</td><td>{e(_fmt(v))}</td></tr>" for k, v in values.items()
  )
  return [f"<h2>{e(heading)}</h2>", f"<table>{rows}</table>"]


def _space_section(result) -> list[str]:
  e = html.escape
  rows = "".join(
      f"<tr><td class='name'>{e(str(k))}</td><td class='name'>{e(_space.describe(d))}</td></tr>"
      for k, d in result.space.items()
  )
  return ["<h2>Search space</h2>", f"<table>{rows}</table>"]


def _scatter_axes(result) -> tuple[str, str] | None:
  """The two hyperparameters to scatter: the most important numeric ones,
  then choices; in space order when importance cannot be computed."""
  dists = _space.searched(result.space)
  if len(dists) < 2:
    return None
  try:
    order = list(_importance.importance(result))
  except ValueError:
    order = list(dists)
  numeric = [k for k in order if not isinstance(dists[k], _space.Choice)]
  choices = [k for k in order if isinstance(dists[k], _space.Choice)]
  x, y = (numeric + choices)[:2]
  return x, y


def _plots_section(result) -> list[str]:
  from . import plot

  out = ["<h2>Plots</h2>"]
  try:
    plot._matplotlib()
  except ImportError as err:
    return out + [f"<p class='note'>{html.escape(str(err))}</p>"]
  figures: list[tuple[str, Callable[[], Any]]] = []
  axes = _scatter_axes(result)
  if axes is not None:
    x, y = axes
    figures.append((f"Every trial over {x} and {y}, coloured by {result.metric}; dashed boxes "
                    "are the zoom rounds' regions, the star the best trial.",
                    lambda: plot.scatter(result, x, y)))
  figures += [
      (f"{result.metric} against each hyperparameter.", lambda: plot.slice(result)),
      ("Validation curves of every lane, coloured by final score.", lambda: plot.curves(result)),
      (f"Best {result.metric} so far, round by round.", lambda: plot.history(result)),
      ("Each hyperparameter's share of the score's variance.", lambda: plot.importance(result)),
  ]
  for caption, make in figures:
    try:
      fig = make()
    except (ValueError, RuntimeError) as err:  # e.g. too few finite trials for importance
      out.append(f"<p class='note'>{html.escape(caption)} Not drawn: {html.escape(str(err))}</p>")
      continue
    out.append(
        f"<figure><img src='data:image/png;base64,{_png_base64(fig)}' alt='{html.escape(caption)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )
  return out


def _png_base64(fig) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  return base64.b64encode(buf.getvalue()).decode("ascii")
