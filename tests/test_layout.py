"""The package's shape: imports flow one way, modules stay small, a strategy is one class."""

import ast
import dataclasses
import pathlib
from typing import ClassVar, NamedTuple

import numpy as np

import vmaptune as vt
from vmaptune import _options, _region, _strategy

from _models import mlp_fn

PKG = pathlib.Path(vt.__file__).parent
MAX_LINES = 540  # "about 500"


def _imports(path: pathlib.Path) -> set[str]:
  """Sibling modules a module imports, at any depth (lazy imports count too)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom):
      if node.level == 1:
        out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
      elif node.module and node.module.startswith("vmaptune."):
        out.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vmaptune.")}
  return out


def test_no_import_cycle_inside_the_package():
  modules = {p.stem: p for p in PKG.glob("*.py")}
  graph = {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}
  state = {}

  def visit(name, stack):
    state[name] = "open"
    for dep in sorted(graph[name]):
      assert state.get(dep) != "open", f"import cycle: {' -> '.join(stack + [name, dep])}"
      if dep not in state:
        visit(dep, stack + [name])
    state[name] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name, [])


def test_no_module_is_large():
  sizes = {p.name: len(p.read_text().splitlines()) for p in PKG.glob("*.py")}
  assert max(sizes.values()) <= MAX_LINES, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


class _OneShotState(NamedTuple):
  next_id: int


@dataclasses.dataclass(frozen=True)
class OneShot:
  """A fourth strategy, written against the interface alone: one batch, no zoom."""

  name: ClassVar[str] = "oneshot"
  sequential: ClassVar[bool] = True

  def check(self, ctx):
    pass

  def cadence(self, ctx, signature):
    steps = ctx.steps_for(signature)
    return _strategy.Cadence(ctx.eval_every_for(steps), -(-steps // ctx.eval_every_for(steps)), steps)

  def total_steps(self, ctx):
    return None

  def state_type(self):
    return _OneShotState

  def regions(self, state):
    return [_region.Region.full({})]

  def init(self, ctx):
    configs = ctx.drawer.batch(0, ctx.num_configs, _region.Region.full(ctx.space))
    return [_strategy.NewTrial(i, c, 1000 + i, 0) for i, c in enumerate(configs)], _OneShotState(len(configs))

  def stop(self, ctx, state, lanes, clock):
    return [(v.slot, {"status": "ok"}) for v in lanes], state

  def next(self, ctx, state, lanes, ended, history, clock):
    return _strategy.Decision(done=True), state


def test_a_new_strategy_is_one_class_and_one_registry_line(small_digits, monkeypatch):
  monkeypatch.setitem(_options.STRATEGIES, "oneshot", OneShot)
  r = vt.search(mlp_fn, small_digits, {"learning_rate": vt.loguniform(1e-3, 1e-2), "hidden": 8},
                strategy="oneshot", num_configs=4, num_steps=10, verbose=False)
  assert len(r.trials) == 4 and [t.seed for t in r.trials] == [1000, 1001, 1002, 1003]
  assert r.options["strategy"] == "oneshot" and np.isfinite(r.best_score)
  assert r.retrain(r.best_trial).score == r.best_score
