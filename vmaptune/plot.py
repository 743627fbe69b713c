"""Plots of a search: where it sampled, what mattered, how the lanes trained.

Every function takes a :class:`~vmaptune.SearchResult` and returns a
``matplotlib.figure.Figure`` built without pyplot: nothing global changes,
no display is needed, and ``fig.savefig("plot.png")`` renders it with Agg.
In a notebook, show a figure by leaving it as a cell's last expression.

Hyperparameters are drawn on the scale they were sampled on: a log axis for
:func:`~vmaptune.loguniform` and ``integer(..., log=True)``, a reverse-log
axis for :func:`~vmaptune.reverse_loguniform` (even spacing in ``1 - x``,
ticks labelled 0.9, 0.99, 0.999), and one jittered column per value for
:func:`~vmaptune.choice`. Scores are coloured so that the brighter end of the
colormap is always the better end, whether the metric is minimized or
maximized. Diverged trials are grey crosses (red dashes on learning curves).

Needs matplotlib: ``pip install 'vmaptune[plot]'``.
"""

from __future__ import annotations

import builtins
import math
from typing import Any, Sequence

import numpy as np

from . import _importance
from . import _space
from ._trial import rounds_text, unfinished

__all__ = ["scatter", "slice", "curves", "history", "importance"]

# ``slice`` below is the public plot; the builtin stays reachable as this.
_builtin_slice = builtins.slice

_DIVERGED = dict(marker="x", color="0.55", s=30, linewidths=1.2)
_BEST = dict(marker="*", s=280, c="red", edgecolors="black", linewidths=0.8, zorder=5)


def _matplotlib():
  try:
    import matplotlib  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401
  except ImportError:
    raise ImportError(
        "vmaptune.plot needs matplotlib; install it with `pip install 'vmaptune[plot]'` "
        "(or `pip install matplotlib`)."
    ) from None
  return matplotlib


def _figure(width: float, height: float):
  _matplotlib()
  from matplotlib.figure import Figure

  return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------
# One hyperparameter on one axis
# --------------------------------------------------------------------------


def _dist(result, name: Any, arg: str) -> _space.Distribution:
  d = result.space.get(name) if isinstance(name, str) else None
  if not isinstance(d, _space.Distribution):
    names = list(_space.searched(result.space))
    what = "a constant" if isinstance(name, str) and name in result.space else "not in the space"
    raise ValueError(f"`{arg}`={name!r} is {what}; pick one of the searched hyperparameters {names}.")
  return d


def _value_of(d: _space.Distribution, t: float) -> float:
  """A sampling coordinate back to a value, without rounding or clipping."""
  if d.scale == "reverse_log":
    return -math.expm1(t)
  if d.scale == "log":
    return math.exp(t)
  return float(t)


def _label_of(v: Any) -> str:
  if callable(v):
    return getattr(v, "__name__", repr(v))
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _reverse_log_functions():
  def forward(x):
    with np.errstate(divide="ignore", invalid="ignore"):
      return -np.log10(1.0 - np.asarray(x, dtype=np.float64))

  def inverse(t):
    return 1.0 - 10.0 ** (-np.asarray(t, dtype=np.float64))

  return forward, inverse


def _reverse_log_ticks(low: float, high: float) -> list[float]:
  """Values ``1 - m·10^-k`` inside ``[low, high]``: 0.9, 0.99, 0.999, ...

  >>> _reverse_log_ticks(0.9, 0.999)
  [0.9, 0.99, 0.999]
  >>> _reverse_log_ticks(0.8, 0.95)
  [0.8, 0.9, 0.95]
  """
  k_lo = math.floor(-math.log10(1.0 - low)) - 1
  k_hi = math.ceil(-math.log10(1.0 - high)) + 1
  decades = -math.log10(1.0 - high) + math.log10(1.0 - low)
  mantissas = (1,) if decades >= 2 - 1e-9 else (1, 2, 5)
  ticks = sorted({round(1.0 - m * 10.0 ** -k, 12) for k in range(k_lo, k_hi + 1) for m in mantissas})
  return [t for t in ticks if low - 1e-12 <= t <= high + 1e-12]


class _Axis:
  """Places one hyperparameter's values on a plot axis, on its own scale."""

  def __init__(self, name: str, d: _space.Distribution):
    self.name = name
    self.d = d
    self.categorical = isinstance(d, _space.Choice)
    if self.categorical:
      self.labels = [_label_of(v) for v in d.values]

  def positions(self, trials: Sequence, jitter: bool = True) -> np.ndarray:
    """Each trial's position along the axis, shape ``(len(trials),)``."""
    if not self.categorical:
      return np.asarray([float(t.config[self.name]) for t in trials], dtype=np.float64)
    out = []
    for t in trials:
      idx = self._index(t.config[self.name])
      # Golden-ratio jitter: deterministic, evenly spread, different per trial.
      shift = (((t.id * 0.6180339887) % 1.0) - 0.5) * 0.5 if jitter else 0.0
      out.append(idx + shift)
    return np.asarray(out, dtype=np.float64)

  def _index(self, value: Any) -> float:
    for i, v in enumerate(self.d.values):
      if v == value or _label_of(v) == _label_of(value):
        return float(i)
    return math.nan

  def span(self, region) -> tuple[float, float] | None:
    """A region's extent along the axis, in plot coordinates."""
    if self.categorical:
      allowed = region.choices.get(self.name)
      if not allowed:
        return None
      idx = [self._index(v) for v in allowed]
      idx = [i for i in idx if not math.isnan(i)]
      return (min(idx) - 0.4, max(idx) + 0.4) if idx else None
    if self.name not in region.numeric:
      return None
    lo, hi = region.numeric[self.name]
    a, b = _value_of(self.d, lo), _value_of(self.d, hi)
    return (min(a, b), max(a, b))

  def setup(self, ax, which: str) -> None:
    """Sets the scale, limits, ticks and label of ``ax``'s ``which`` axis."""
    from matplotlib import ticker

    axis = ax.xaxis if which == "x" else ax.yaxis
    set_scale = ax.set_xscale if which == "x" else ax.set_yscale
    set_lim = ax.set_xlim if which == "x" else ax.set_ylim
    set_label = ax.set_xlabel if which == "x" else ax.set_ylabel
    if self.categorical:
      n = len(self.labels)
      axis.set_major_locator(ticker.FixedLocator(list(range(n))))
      axis.set_major_formatter(ticker.FixedFormatter(self.labels))
      set_lim(-0.6, n - 0.4)
      set_label(f"{self.name} (choice)")
      return
    scale = self.d.scale
    if scale == "log":
      set_scale("log")
    elif isinstance(self.d, _space.Integer):
      axis.set_major_locator(ticker.MaxNLocator(integer=True))
    elif scale == "reverse_log":
      set_scale("function", functions=_reverse_log_functions())
      axis.set_major_locator(ticker.FixedLocator(_reverse_log_ticks(self.d.low, self.d.high)))
      axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.6g}"))
      axis.set_minor_locator(ticker.NullLocator())
    lo, hi = self.d.bounds()
    pad = 0.04 * (hi - lo)
    a, b = _value_of(self.d, lo - pad), _value_of(self.d, hi + pad)
    set_lim(min(a, b), max(a, b))
    hint = {"log": " (log)", "reverse_log": " (log 1−x)"}.get(scale, "")
    set_label(f"{self.name}{hint}")


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------


def _split(trials: Sequence) -> tuple[list, list]:
  ok = [t for t in trials if t.status == "ok" and math.isfinite(t.score)]
  ids = {t.id for t in ok}
  return ok, [t for t in trials if t.id not in ids]


def _best(result):
  """The trial the result keeps (the re-check's best mean when it ran one)."""
  return result.best_trial if result.ranked() else None


def _score_colors(result, scores: np.ndarray):
  """``(cmap, norm, extend)``: the better end bright, the worst tenth clipped.

  Clipping the colour scale at the 90th percentile (toward the worse end)
  keeps one nearly diverged trial from washing out every other colour; the
  colorbar's arrow says so.
  """
  from matplotlib import colormaps, colors

  cmap = colormaps["viridis" if result.maximize else "viridis_r"]
  extend = "neither"
  if len(scores) == 0:
    return cmap, colors.Normalize(0.0, 1.0), extend
  lo, hi = float(np.min(scores)), float(np.max(scores))
  if len(scores) >= 10:
    if result.maximize:
      cut = float(np.quantile(scores, 0.1))
      extend, lo = ("min", cut) if cut > lo else (extend, lo)
    else:
      cut = float(np.quantile(scores, 0.9))
      extend, hi = ("max", cut) if cut < hi else (extend, hi)
  if not hi > lo:
    lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
  return cmap, colors.Normalize(lo, hi), extend


def _colorbar(fig, ax, result, cmap, norm, extend) -> None:
  from matplotlib.cm import ScalarMappable

  better = "higher" if result.maximize else "lower"
  fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, extend=extend,
               label=f"{result.metric} ({better} is better)")


def _score_scale(ax, values: np.ndarray) -> None:
  """A log score axis when positive scores span more than two decades."""
  values = values[np.isfinite(values)]
  if len(values) and values.min() > 0 and values.max() / values.min() > 100:
    ax.set_yscale("log")


def _worse_edge(result) -> float:
  """Where diverged trials sit, in axes coordinates: at the worse end."""
  return 0.03 if result.maximize else 0.97


def _round_color(r: int):
  from matplotlib import colormaps

  return colormaps["tab10"](r % 10)


# --------------------------------------------------------------------------
# The plots
# --------------------------------------------------------------------------


def scatter(result, x: str, y: str):
  """Every trial over two hyperparameters, coloured by score.

  Each axis is on its hyperparameter's own scale. Each zoom round's region is
  a dashed box (round 0 sampled the whole space, drawn as the axis limits);
  the best trial is a red star; diverged trials are grey crosses. For a
  ``sampler="grid"`` search faint lines mark the grid's rows and the title
  counts the distinct values each axis got: a 5×5 grid tries 5 learning
  rates where 25 random configs try 25.

  Args:
    result: a :class:`~vmaptune.SearchResult`.
    x: the searched hyperparameter on the horizontal axis.
    y: the searched hyperparameter on the vertical axis.

  Returns:
    A ``matplotlib.figure.Figure``.

  >>> from vmaptune import plot
  >>> from vmaptune._demo import example_result
  >>> fig = plot.scatter(example_result(), "learning_rate", "width")
  >>> fig.axes[0].get_xscale()
  'log'
  """
  _matplotlib()
  ax_x, ax_y = _Axis(x, _dist(result, x, "x")), _Axis(y, _dist(result, y, "y"))
  if x == y:
    raise ValueError(f"`x` and `y` must differ, both are {x!r}; use plot.slice for one hyperparameter.")
  from matplotlib.patches import Rectangle

  fig = _figure(6.4, 4.8)
  ax = fig.add_subplot()
  ok, bad = _split(result.trials)
  scores = np.asarray([t.score for t in ok], dtype=np.float64)
  cmap, norm, extend = _score_colors(result, scores)
  if ok:
    ax.scatter(ax_x.positions(ok), ax_y.positions(ok), c=scores, cmap=cmap, norm=norm, s=26,
               edgecolors="none", alpha=0.9, zorder=3, label=f"trials ({len(ok)})")
  if bad:
    ax.scatter(ax_x.positions(bad), ax_y.positions(bad), zorder=3, label=unfinished(bad), **_DIVERGED)
  for r, region in enumerate(result.regions):
    if r == 0:
      continue  # round 0 sampled the whole space: the axis limits are its box
    sx, sy = ax_x.span(region), ax_y.span(region)
    if sx is None or sy is None:
      continue
    ax.add_patch(Rectangle((sx[0], sy[0]), sx[1] - sx[0], sy[1] - sy[0], fill=False,
                           edgecolor=_round_color(r), linestyle="--", linewidth=1.5, zorder=2,
                           label=f"round {r} region"))
  best = _best(result)
  if best is not None:
    ax.scatter(ax_x.positions([best]), ax_y.positions([best]), label="best", **_BEST)
  ax_x.setup(ax, "x")
  ax_y.setup(ax, "y")
  title = f"{len(result.trials)} trials, {rounds_text(result)}"
  if result.options.get("sampler") == "grid":
    # The grid's rows: every trial sits on one of a few lines, so n trials
    # try only about sqrt(n) values of each hyperparameter.
    n = len(result.trials)
    xs = sorted({p for p in ax_x.positions(result.trials, jitter=False) if math.isfinite(p)})
    ys = sorted({p for p in ax_y.positions(result.trials, jitter=False) if math.isfinite(p)})
    for p in xs:
      ax.axvline(p, color="0.8", linewidth=0.8, zorder=1)
    for p in ys:
      ax.axhline(p, color="0.8", linewidth=0.8, zorder=1)
    title = (f"grid: {n} trials try only {len(xs)} distinct {x} and {len(ys)} distinct {y}\n"
             f"(random sampling would try {n} of each)")
  ax.set_title(title, fontsize="medium")
  fig.legend(loc="outside lower center", ncols=4, fontsize="small", frameon=False)
  _colorbar(fig, ax, result, cmap, norm, extend)
  return fig


def slice(result):  # noqa: A001  (the name the API promises; builtins.slice stays reachable)
  """The score against each searched hyperparameter, one panel each.

  Each panel's horizontal axis is on the hyperparameter's own scale; points
  are coloured by round, so zoom rounds show where the search concentrated.
  Diverged trials have no score: they are grey crosses along each panel's
  worse edge (the top when minimizing).

  Args:
    result: a :class:`~vmaptune.SearchResult`.

  Returns:
    A ``matplotlib.figure.Figure`` with one axes per searched hyperparameter.

  >>> from vmaptune import plot
  >>> from vmaptune._demo import example_result
  >>> [ax.get_xscale() for ax in plot.slice(example_result()).axes]
  ['log', 'linear']
  """
  _matplotlib()
  dists = _space.searched(result.space)
  if not dists:
    raise ValueError("the space has no searched hyperparameter to plot (only constants).")
  ncols = min(3, len(dists))
  nrows = -(-len(dists) // ncols)
  fig = _figure(4.0 * ncols, 3.3 * nrows)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  ok, bad = _split(result.trials)
  best = _best(result)
  rounds = sorted({t.round for t in ok})
  scores = np.asarray([t.score for t in ok], dtype=np.float64)
  for ax, (name, d) in zip(axes, dists.items()):
    axis = _Axis(name, d)
    for r in rounds:
      members = [t for t in ok if t.round == r]
      ax.scatter(axis.positions(members), [t.score for t in members], s=18, alpha=0.75,
                 color=_round_color(r), edgecolors="none", label=f"round {r}", zorder=3)
    if bad:
      ax.scatter(axis.positions(bad), np.full(len(bad), _worse_edge(result)),
                 transform=ax.get_xaxis_transform(),
                 clip_on=False, label=unfinished(bad), zorder=3, **_DIVERGED)
    if best is not None:
      ax.scatter(axis.positions([best]), [best.score], label="best", **_BEST)
    axis.setup(ax, "x")
    _score_scale(ax, scores)
    ax.set_ylabel(result.metric)
  for ax in axes[len(dists):]:
    ax.set_visible(False)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small",
             frameon=False)
  better = "higher" if result.maximize else "lower"
  fig.suptitle(f"{result.metric} ({better} is better) against each hyperparameter", fontsize="medium")
  return fig


def curves(result):
  """Every lane's validation curve at once, coloured by its final score.

  Diverged lanes are red dashed lines up to their last finite evaluation,
  ending in a cross at the divergence.

  Args:
    result: a :class:`~vmaptune.SearchResult`.

  Returns:
    A ``matplotlib.figure.Figure``.

  >>> from vmaptune import plot
  >>> from vmaptune._demo import example_result
  >>> len(plot.curves(example_result()).axes[0].lines)
  40
  """
  _matplotlib()
  fig = _figure(6.4, 4.4)
  ax = fig.add_subplot()
  ok, bad = _split(result.trials)
  scores = np.asarray([t.score for t in ok], dtype=np.float64)
  cmap, norm, extend = _score_colors(result, scores)
  # Worst first, so the best curves are drawn on top.
  for t in sorted(ok, key=lambda t: t.score, reverse=not result.maximize):
    steps, values = np.asarray(t.curve_steps), np.asarray(t.curve, dtype=np.float64)
    ax.plot(steps, values, color=cmap(norm(t.score)), linewidth=1.0, alpha=0.75,
            marker="o" if len(values) == 1 else None, markersize=3)
  labelled = set()  # stopped early: thin grey, to their last score; diverged: red, dashed, to an x
  for t in bad:
    steps, values = np.asarray(t.curve_steps), np.asarray(t.curve, dtype=np.float64)
    keep = np.isfinite(values) & (steps <= (t.diverged_at if t.diverged_at is not None else np.inf))
    if not keep.any():
      continue
    stopped = t.status == "stopped"
    label = None if stopped in labelled else unfinished([b for b in bad if (b.status == "stopped") == stopped])
    labelled.add(stopped)
    ax.plot(steps[keep], values[keep], color="0.6" if stopped else "red", linestyle="-" if stopped else "--",
            linewidth=0.8 if stopped else 1.0, alpha=0.6 if stopped else 0.8, label=label)
    if not stopped:
      ax.plot(steps[keep][-1:], values[keep][-1:], color="red", marker="x", linestyle="none")
  values = np.concatenate([np.asarray(t.curve, dtype=np.float64) for t in result.trials]) \
      if result.trials else np.zeros(0)
  _score_scale(ax, values)
  ax.set_xlabel("step")
  ax.set_ylabel(f"validation {result.metric}")
  ax.set_title(f"learning curves of {len(result.trials)} trials", fontsize="medium")
  if labelled:
    ax.legend(fontsize="small", framealpha=0.85)
  _colorbar(fig, ax, result, cmap, norm, extend)
  return fig


def history(result):
  """The best score so far against trial index, rounds shaded.

  Trials are in creation order (round by round); faint dots are each trial's
  own score, grey crosses along the worse edge (the top when minimizing) the
  diverged trials.

  Args:
    result: a :class:`~vmaptune.SearchResult`.

  Returns:
    A ``matplotlib.figure.Figure``.

  >>> from vmaptune import plot
  >>> from vmaptune._demo import example_result
  >>> plot.history(example_result()).axes[0].get_xlabel()
  'trial'
  """
  _matplotlib()
  fig = _figure(6.4, 4.0)
  ax = fig.add_subplot()
  trials = list(result.trials)
  index = np.arange(len(trials))
  scores = np.asarray([t.score if t.status == "ok" else math.nan for t in trials], dtype=np.float64)
  finite = np.isfinite(scores)
  best_so_far = np.full(len(trials), math.nan)
  current = math.nan
  for i, s in enumerate(scores):
    if finite[i] and (math.isnan(current) or (s > current if result.maximize else s < current)):
      current = s
    best_so_far[i] = current
  ax.scatter(index[finite], scores[finite], s=12, color="0.6", alpha=0.6, zorder=2, label="trial")
  ax.step(index, best_so_far, where="post", color="C0", linewidth=2.0, zorder=3, label="best so far")
  if (~finite).any():
    ax.scatter(index[~finite], np.full(int((~finite).sum()), _worse_edge(result)),
               transform=ax.get_xaxis_transform(),
               clip_on=False, zorder=3, label=unfinished([t for t, f in zip(trials, finite) if not f]), **_DIVERGED)
  for r in sorted({t.round for t in trials}):
    members = index[[t.round == r for t in trials]]
    a, b = members.min() - 0.5, members.max() + 0.5
    ax.axvspan(a, b, color=_round_color(r), alpha=0.08, linewidth=0, zorder=1)
    if r > 0:
      ax.axvline(a, color="0.3", linestyle=":", linewidth=1.0, zorder=1)
    ax.text(0.5 * (a + b), 1.0, f"round {r}", transform=ax.get_xaxis_transform(), ha="center",
            va="bottom", fontsize="small")
  from matplotlib.ticker import MaxNLocator

  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  _score_scale(ax, scores)
  ax.set_xlabel("trial")
  ax.set_ylabel(result.metric)
  better = "higher" if result.maximize else "lower"
  fig.suptitle(f"best {result.metric} so far ({better} is better)", fontsize="medium")
  fig.legend(loc="outside lower center", ncols=3, fontsize="small", frameon=False)
  return fig


def importance(result):
  """A bar chart of :meth:`SearchResult.importance`: each hyperparameter's
  share of the score's variance.

  Args:
    result: a :class:`~vmaptune.SearchResult` with at least 3 finite trials.

  Returns:
    A ``matplotlib.figure.Figure``.

  >>> from vmaptune import plot
  >>> from vmaptune._demo import example_result
  >>> [t.get_text() for t in plot.importance(example_result()).axes[0].get_yticklabels()]
  ['width', 'learning_rate']
  """
  _matplotlib()
  shares = _importance.importance(result)
  _, description = _importance.select_trials(result, None)
  names = list(shares)[::-1]  # barh draws bottom-up: largest on top
  values = [shares[k] for k in names]
  fig = _figure(6.0, 1.2 + 0.45 * max(1, len(names)))
  ax = fig.add_subplot()
  bars = ax.barh(range(len(names)), values, color="C0")
  ax.set_yticks(range(len(names)), names)
  for bar, v in zip(bars, values):
    ax.text(min(v + 0.01, 0.9), bar.get_y() + bar.get_height() / 2, f"{100 * v:.0f}%", va="center",
            fontsize="small")
  ax.set_xlim(0.0, 1.0)
  ax.set_xlabel("share of score variance (η², chance-corrected)")
  ax.set_title(f"hyperparameter importance ({description})", fontsize="medium")
  if not any(values):
    ax.text(0.5, 0.5, "no hyperparameter explains more than chance", transform=ax.transAxes,
            ha="center", va="center")
  return fig

