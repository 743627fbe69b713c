"""Plots (vmaptune/plot.py) and the HTML report (vmaptune/_report.py), headless.

One real two-round search (a few seconds) plus hand-built results for the
grid sampler, a maximized metric and the edge cases.
"""

import base64
import dataclasses
import html.parser
import math
import os
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import vmaptune as vt  # noqa: E402
from vmaptune import _report, _region, _space, plot  # noqa: E402
from vmaptune import SearchResult, Stats, Trial  # noqa: E402

from _models import mlp_fn  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _space_():
  return {
      "learning_rate": vt.loguniform(1e-3, 3e-2),
      "b1": vt.reverse_loguniform(0.8, 0.99),
      "b2": vt.choice([0.99, 0.999]),  # an optimizer key: one compiled program for all lanes
  }


def with_diverged(r: SearchResult) -> SearchResult:
  """``r`` plus one hand-built diverged trial in the last round."""
  t0 = r.trials[0]
  curve = np.asarray([2.3, 4.0, 9.0] + [np.nan] * (len(t0.curve) - 3), np.float32)
  bad = dataclasses.replace(
      t0, id=len(r.trials), round=len(r.regions) - 1, lane=t0.lane, score=math.inf,
      status="diverged", diverged_at=int(t0.curve_steps[2]), curve=curve,
      config=dict(t0.config, learning_rate=0.029), parent=r.best_trial.id)
  return SearchResult(trials=r.trials + [bad], space=r.space, metric=r.metric, maximize=r.maximize,
                      regions=r.regions, stats=r.stats, best_params=r._best_params, options=r.options)


@pytest.fixture(scope="module")
def result(small_digits):
  r = vt.search(mlp_fn, small_digits, _space_(), num_configs=8, num_steps=40, rounds=2, seed=0,
                verbose=False)
  return with_diverged(r)


def _hand_built(space, configs, score_fn, *, maximize=False, sampler="random"):
  trials = []
  for i, c in enumerate(configs):
    s = score_fn(c)
    trials.append(Trial(id=i, config=c, score=s, round=0, lane=i, status="ok", seed=i,
                        curve=np.linspace(2.0, s, 5).astype(np.float32),
                        curve_steps=np.arange(1, 6) * 10, train_curve=np.zeros(5, np.float32),
                        steps=50))
  return SearchResult(trials=trials, space=space, metric="accuracy" if maximize else "loss",
                      maximize=maximize, regions=[_region.Region.full(space)], stats=Stats(),
                      options={"sampler": sampler})


def _png_ok(fig, path):
  fig.savefig(path)
  data = path.read_bytes()
  assert len(data) > 1000 and data[:8] == PNG


def _collection(ax, label):
  found = [c for c in ax.collections if c.get_label() == label]
  assert len(found) == 1, [c.get_label() for c in ax.collections]
  return found[0]


def _labels(fig):
  return [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else []


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def test_every_plot_renders_headless(result, tmp_path):
  figs = {
      "scatter": plot.scatter(result, "learning_rate", "b1"),
      "slice": plot.slice(result),
      "curves": plot.curves(result),
      "history": plot.history(result),
      "importance": plot.importance(result),
  }
  from matplotlib.figure import Figure

  for name, fig in figs.items():
    assert isinstance(fig, Figure)
    _png_ok(fig, tmp_path / f"{name}.png")


def test_scatter_scales_boxes_best_and_diverged(result):
  fig = plot.scatter(result, "learning_rate", "b1")
  ax = fig.axes[0]
  assert ax.get_xscale() == "log"
  assert ax.get_yscale() == "function"  # reverse-log: even in log(1 - b1)
  ticks = [t.get_text() for t in ax.get_yticklabels()]
  assert {"0.9", "0.99"} <= set(ticks), ticks
  # Reverse-log spacing: 0.9 -> 0.99 is as long as 0.8 -> 0.9 shifted by a decade.
  to_px = lambda v: ax.transData.transform((1e-2, v))[1]
  assert math.isclose(to_px(0.99) - to_px(0.9), to_px(0.9) - to_px(0.0), rel_tol=1e-6)
  # One box per zoom round, none for round 0, in value coordinates.
  boxes = [p for p in ax.patches if p.get_label().startswith("round ")]
  assert [b.get_label() for b in boxes] == ["round 1 region"]
  lo, hi = result.regions[1].numeric["learning_rate"]
  assert math.isclose(boxes[0].get_x(), math.exp(lo), rel_tol=1e-9)
  assert math.isclose(boxes[0].get_x() + boxes[0].get_width(), math.exp(hi), rel_tol=1e-9)
  # The best trial is a star at its config; the diverged trial a grey cross.
  best = _collection(ax, "best")
  np.testing.assert_allclose(best.get_offsets()[0], [result.best_config["learning_rate"],
                                                     result.best_config["b1"]])
  bad = _collection(ax, "diverged (1)")
  np.testing.assert_allclose(bad.get_offsets()[0], [0.029, result.trials[0].config["b1"]])
  assert bad.get_array() is None  # not coloured by score
  np.testing.assert_allclose(bad.get_edgecolor()[0][:3], [0.55] * 3)
  assert _collection(ax, "trials (16)").get_cmap().name == "viridis_r"  # lower is better: bright
  assert "loss (lower is better)" in fig.axes[1].get_ylabel()  # the colorbar
  assert {"best", "diverged (1)", "round 1 region"} <= set(_labels(fig))


def test_scatter_categorical_axis_and_errors(result):
  ax = plot.scatter(result, "b2", "learning_rate").axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0.99", "0.999"]
  assert ax.get_xscale() == "linear" and ax.get_yscale() == "log"
  offsets = _collection(ax, "trials (16)").get_offsets()[:, 0]
  assert np.all(np.abs(offsets - np.round(offsets)) <= 0.25)  # jittered around 0 and 1
  with pytest.raises(ValueError, match="pick one of the searched"):
    plot.scatter(result, "nope", "b1")
  with pytest.raises(ValueError, match="must differ"):
    plot.scatter(result, "b1", "b1")


def test_scatter_grid_shows_the_few_distinct_values():
  space = {"lr": vt.loguniform(1e-4, 1e-1), "momentum": vt.uniform(0.0, 0.99), "width": 32}
  configs = [dict(c, width=32) for c in _region.grid_values(_space.searched(space), 25,
                                                           _region.Region.full(space))]
  r = _hand_built(space, configs, lambda c: abs(math.log10(c["lr"]) + 2.5), sampler="grid")
  fig = plot.scatter(r, "lr", "momentum")
  title = fig.axes[0].get_title()
  assert "grid: 25 trials try only 5 distinct lr and 5 distinct momentum" in title
  assert len(fig.axes[0].lines) == 10  # the grid's 5 + 5 lines


def test_maximize_colours_and_integer_axes(tmp_path):
  space = {"lr": vt.loguniform(1e-4, 1e-1), "layers": vt.integer(1, 64, log=True),
           "depth": vt.integer(1, 4)}
  rng = np.random.default_rng(0)
  configs = [{k: d.sample(rng, 1)[0] for k, d in space.items()} for _ in range(12)]
  r = _hand_built(space, configs, lambda c: 1.0 - abs(math.log10(c["lr"]) + 2.5) / 3, maximize=True)
  fig = plot.scatter(r, "layers", "depth")
  ax = fig.axes[0]
  assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
  assert _collection(ax, "trials (12)").get_cmap().name == "viridis"  # higher is better: bright
  assert "higher is better" in fig.axes[1].get_ylabel()
  axes = plot.slice(r).axes
  assert [a.get_xscale() for a in axes] == ["log", "log", "linear"]
  _png_ok(plot.history(r), tmp_path / "h.png")


def test_slice_one_panel_per_hyperparameter(result):
  fig = plot.slice(result)
  visible = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_xlabel().split()[0] for ax in visible] == ["learning_rate", "b1", "b2"]
  assert [ax.get_xscale() for ax in visible] == ["log", "function", "linear"]
  for ax in visible:
    _collection(ax, "diverged (1)")
    _collection(ax, "best")
  assert {"round 0", "round 1", "diverged (1)", "best"} <= set(_labels(fig))


def test_curves_draws_every_lane_and_diverged_distinctly(result):
  ax = plot.curves(result).axes[0]
  dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
  assert len(dashed) == 1 and dashed[0].get_color() == "red"
  bad = result.trials[-1]
  np.testing.assert_array_equal(dashed[0].get_xdata(), bad.curve_steps[:3])  # up to the last finite
  solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
  assert len(solid) == len(result.trials) - 1


def test_trials_stopped_early_are_not_called_diverged(result, tmp_path):
  # A pruned trial (an adaptive search's "stopped") has a score up to its
  # stop: thin grey in the curves, "stopped early" in every legend and the
  # report, and an adaptive search's title names its strategy, not rounds.
  t0 = result.trials[0]
  curve = np.where(np.arange(len(t0.curve)) < 2, t0.curve, np.nan).astype(np.float32)
  stopped = dataclasses.replace(t0, id=len(result.trials), status="stopped", score=float(curve[1]), curve=curve,
                                steps=int(t0.curve_steps[1]))
  r = SearchResult(trials=result.trials + [stopped], space=result.space, metric=result.metric,
                   maximize=result.maximize, regions=result.regions[:1], stats=result.stats,
                   best_params=result._best_params, options=dict(result.options, strategy="adaptive"))
  ax = plot.curves(r).axes[0]
  (grey,) = [ln for ln in ax.lines if ln.get_label() == "stopped early (1)"]
  np.testing.assert_array_equal(grey.get_xdata(), t0.curve_steps[:2])
  assert {"diverged (1)", "stopped early (1)"} <= {ln.get_label() for ln in ax.lines}
  scatter = plot.scatter(r, "learning_rate", "b1").axes[0]
  _collection(scatter, "stopped early (1), diverged (1)")
  assert scatter.get_title().endswith("strategy adaptive")
  text = " ".join(_parse(r.report(tmp_path / "out")).text)
  assert "finished, stopped early (1), diverged (1)), strategy adaptive" in text


def test_history_is_monotone_and_marks_rounds(result):
  ax = plot.history(result).axes[0]
  (best_line,) = [ln for ln in ax.lines if ln.get_label() == "best so far"]
  y = np.asarray(best_line.get_ydata(), float)
  y = y[np.isfinite(y)]
  assert np.all(np.diff(y) <= 0) and math.isclose(y[-1], result.best_score)
  assert {t.get_text() for t in ax.texts} == {"round 0", "round 1"}


def test_importance_bars(result):
  ax = plot.importance(result).axes[0]
  shares = result.importance()
  assert [t.get_text() for t in ax.get_yticklabels()] == list(shares)[::-1]
  np.testing.assert_allclose([p.get_width() for p in ax.patches], list(shares.values())[::-1])


def test_missing_matplotlib_names_the_extra(result, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  with pytest.raises(ImportError, match=r"pip install 'vmaptune\[plot\]'"):
    plot.curves(result)


def test_builtin_slice_still_reachable():
  assert plot._builtin_slice is slice and plot.slice is not slice


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


class _Page(html.parser.HTMLParser):
  """Collects images and checks that every non-void element is closed."""

  VOID = {"meta", "img", "br", "hr", "link", "input"}

  def __init__(self):
    super().__init__()
    self.images, self.stack, self.errors, self.text = [], [], [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "img":
      self.images.append(attrs.get("src", ""))
    for name in ("src", "href"):
      if name in attrs and tag != "img":
        self.errors.append(f"external {name} on <{tag}>")
    if tag not in self.VOID:
      self.stack.append(tag)

  def handle_endtag(self, tag):
    if not self.stack or self.stack.pop() != tag:
      self.errors.append(f"unbalanced </{tag}>")

  def handle_data(self, data):
    self.text.append(data)


def _parse(path):
  page = _Page()
  page.feed(open(path, encoding="utf-8").read())
  page.close()
  assert not page.errors and not page.stack, (page.errors, page.stack)
  return page


def test_report_is_self_contained_html(result, tmp_path):
  path = result.report(tmp_path / "out")
  assert path == str(tmp_path / "out" / "report.html")
  page = _parse(path)
  assert len(page.images) == 5  # scatter, slice, curves, history, importance
  assert all(src.startswith("data:image/png;base64,") for src in page.images)
  assert base64.b64decode(page.images[0].split(",", 1)[1])[:8] == PNG
  text = " ".join(page.text)
  best = result.best_trial
  for k, v in best.config.items():
    assert k in text and (f"{v:.6g}" if isinstance(v, float) else str(v)) in text
  assert f"{best.score:.6g}" in text and "lower is better" in text
  assert os.listdir(tmp_path / "out") == ["report.html"]  # no temp file left


def test_report_to_html_file_escapes_and_skips_scatter(tmp_path):
  space = {"lr": vt.loguniform(1e-4, 1e-1), "note": "<i>constant</i>"}
  configs = [{"lr": lr, "note": "<i>constant</i>"} for lr in np.geomspace(1e-4, 1e-1, 6)]
  r = _hand_built(space, configs, lambda c: abs(math.log10(c["lr"]) + 2.5))
  r.metric = "<script>alert(1)</script>"
  path = _report.write_report(r, tmp_path / "deep" / "x.html", title="a & b")
  assert path == str(tmp_path / "deep" / "x.html")
  raw = open(path, encoding="utf-8").read()
  assert "<script>" not in raw and "&lt;script&gt;" in raw and "<i>" not in raw
  assert "<title>a &amp; b</title>" in raw
  page = _parse(path)
  assert len(page.images) == 4  # one searched hyperparameter: no scatter


def test_report_notes_a_plot_it_cannot_draw(tmp_path):
  space = {"lr": vt.loguniform(1e-4, 1e-1), "width": vt.choice([1, 2])}
  r = _hand_built(space, [{"lr": 1e-3, "width": 1}, {"lr": 1e-2, "width": 2}], lambda c: c["lr"])
  page = _parse(r.report(tmp_path))
  assert len(page.images) == 4  # importance needs 3 finite trials
  assert "Not drawn: importance needs at least 3 finite trials" in " ".join(page.text)
