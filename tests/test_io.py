"""Saving and loading results (vmaptune/_io.py): round trips, atomic writes, errors."""

import dataclasses
import json
import math
import os
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

import vmaptune as vt
from vmaptune import _io, _region
from vmaptune import SearchResult, Stats, Trial

from _models import mlp_fn


def _space_():
  return {
      "learning_rate": vt.loguniform(1e-3, 3e-2),
      "b1": vt.reverse_loguniform(0.8, 0.99),
      "b2": vt.choice([0.99, 0.999]),  # an optimizer key: one compiled program for all lanes
  }


@pytest.fixture(scope="module")
def result(small_digits):
  # The same search as tests/test_plot.py: its programs are already compiled.
  r = vt.search(mlp_fn, small_digits, _space_(), num_configs=8, num_steps=40, rounds=2, seed=0,
                verbose=False)
  t0 = r.trials[0]
  curve = np.asarray([2.3, 4.0, 9.0] + [np.nan] * (len(t0.curve) - 3), np.float32)
  bad = dataclasses.replace(t0, id=len(r.trials), round=1, score=math.inf, status="diverged",
                            diverged_at=int(t0.curve_steps[2]), curve=curve, parent=r.best_trial.id)
  return SearchResult(trials=r.trials + [bad], space=r.space, metric=r.metric, maximize=r.maximize,
                      regions=r.regions, stats=r.stats, replay=r._replay,
                      best_params=r._best_params, options=r.options)


def _assert_same_trials(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for f in dataclasses.fields(Trial):
      u, v = getattr(x, f.name), getattr(y, f.name)
      if isinstance(u, np.ndarray):
        assert u.dtype == v.dtype and u.shape == v.shape, f.name
        np.testing.assert_array_equal(u, v)
      elif isinstance(u, float) and math.isnan(u):
        assert math.isnan(v)
      else:
        assert u == v and type(u) is type(v), (f.name, u, v)


def _leaves(tree):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(_io._path_entry(k) for k in path)
    out[keys[:-1] if keys[-1] == "value" else keys] = np.asarray(leaf)
  return out


def test_round_trip(result, tmp_path):
  path = result.save(tmp_path / "search.vmaptune")
  assert path == str(tmp_path / "search.vmaptune")
  loaded = vt.load(path)
  _assert_same_trials(result.trials, loaded.trials)
  assert loaded.trials[-1].score == math.inf and loaded.trials[-1].status == "diverged"
  assert loaded.space == result.space
  assert loaded.regions == result.regions
  assert loaded.stats.as_dict() == result.stats.as_dict()
  assert loaded.options == result.options
  assert (loaded.metric, loaded.maximize) == (result.metric, result.maximize)
  assert loaded.best_config == result.best_config and loaded.best_score == result.best_score
  assert loaded.table(5) == result.table(5)
  params, model_state = loaded.best_params
  assert isinstance(params, dict) and isinstance(params["inp"]["kernel"], np.ndarray)
  original = _leaves(result.best_params[0])
  restored = {k: v for k, v in _leaves(params).items()}
  assert original.keys() == restored.keys()
  for k in original:
    assert original[k].dtype == restored[k].dtype
    np.testing.assert_array_equal(original[k], restored[k])


def test_loaded_result_plots_reports_and_refuses_retrain(result, tmp_path):
  pytest.importorskip("matplotlib")
  from vmaptune import plot

  loaded = vt.load(result.save(tmp_path / "r.vmaptune"))
  for fig in (plot.scatter(loaded, "learning_rate", "b1"), plot.slice(loaded), plot.curves(loaded),
              plot.history(loaded), plot.importance(loaded)):
    assert fig.axes
  assert loaded.importance() == result.importance()
  page = open(loaded.report(tmp_path / "report.html"), encoding="utf-8").read()
  assert page.count("data:image/png;base64,") == 5
  with pytest.raises(RuntimeError, match="loaded result"):
    loaded.best_model()
  with pytest.raises(RuntimeError, match="loaded result"):
    loaded.retrain()


def _hand_built(best_params=None):
  space = {"lr": vt.loguniform(1e-4, 1e-1), "act": vt.choice([jax.nn.relu, (1, 2), "x"]),
           "fn": jax.nn.gelu, "clip": math.inf, "shape": (3, 4), "name": None}
  trials = []
  for i, act in enumerate([jax.nn.relu, (1, 2), "x"]):
    cfg = {"lr": 10.0 ** -(i + 1), "act": act, "fn": jax.nn.gelu, "clip": math.inf,
           "shape": (3, 4), "name": None}
    score = [math.nan, 0.5, -math.inf][i]
    trials.append(Trial(id=i, config=cfg, score=score, round=0, lane=i, seed=i,
                        status="ok" if i == 1 else "diverged", curve=np.asarray([1.0, score]),
                        curve_steps=np.asarray([5, 10], np.int32),
                        train_curve=np.zeros((0,), np.float32), steps=10))
  return SearchResult(trials=trials, space=space, metric="accuracy", maximize=True,
                      regions=[_region.Region.full(space)], stats=Stats(wall_seconds=1.5),
                      best_params=best_params, options={"shrink": 0.5, "keep": math.inf})


def test_constants_functions_tuples_and_nonfinite_floats(tmp_path):
  r = _hand_built()
  loaded = vt.load(r.save(tmp_path / "r"))
  # Functions can't round-trip: they come back as their qualified names.
  fn_name = f"{jax.nn.gelu.__module__}.{jax.nn.gelu.__qualname__}"
  relu_name = f"{jax.nn.relu.__module__}.{jax.nn.relu.__qualname__}"
  assert loaded.space["fn"] == fn_name
  assert loaded.space["act"] == vt.choice([relu_name, (1, 2), "x"])
  assert loaded.space["clip"] == math.inf and loaded.space["shape"] == (3, 4)
  assert loaded.space["name"] is None
  assert [t.config["act"] for t in loaded.trials] == [relu_name, (1, 2), "x"]
  assert loaded.trials[0].config["fn"] == fn_name
  assert math.isnan(loaded.trials[0].score) and loaded.trials[2].score == -math.inf
  assert np.isnan(loaded.trials[0].curve[1]) and loaded.trials[0].curve_steps.dtype == np.int32
  assert loaded.trials[0].train_curve.shape == (0,)
  assert loaded.options == {"shrink": 0.5, "keep": math.inf}
  assert loaded.regions[0].choices["act"] == (relu_name, (1, 2), "x")
  assert loaded.best_params is None
  # The index is strict JSON: no Infinity or NaN tokens.
  with zipfile.ZipFile(tmp_path / "r") as zf:
    json.loads(zf.read("vmaptune.json"), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


def test_odd_leaves_round_trip(tmp_path):
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
            "layers": [np.ones(2, np.int8), np.zeros((), np.float64)]}
  state = {"key": jax.random.key(3), "count": np.asarray(7, np.uint32)}
  loaded = vt.load(_hand_built({1: (params, state)}).save(tmp_path / "p.vmaptune"))
  p, s = loaded.best_params
  assert p["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(p["w"], params["w"])
  assert set(p["layers"]) == {0, 1} and p["layers"][0].dtype == np.int8
  assert p["layers"][1].shape == ()
  np.testing.assert_array_equal(s["key"], jax.random.key_data(jax.random.key(3)))  # raw key data
  assert s["count"] == 7


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
  r = _hand_built()
  target = tmp_path / "r.vmaptune"
  r.save(target)
  before = target.read_bytes()
  r.save(target)  # overwriting is fine
  assert os.listdir(tmp_path) == ["r.vmaptune"]

  def boom(result, writer):
    raise OSError("disk full")

  monkeypatch.setattr(_io, "_write", boom)
  with pytest.raises(OSError, match="disk full"):
    r.save(target)
  assert os.listdir(tmp_path) == ["r.vmaptune"] and target.read_bytes() == before
  with pytest.raises(IsADirectoryError, match="give a file name"):
    _io.save(r, tmp_path)


def test_clear_errors(tmp_path):
  missing = tmp_path / "nope.vmaptune"
  with pytest.raises(FileNotFoundError, match="nope.vmaptune"):
    vt.load(missing)
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  with pytest.raises(ValueError, match=r"notes\.txt.*not a saved vmaptune result"):
    vt.load(text)
  foreign = tmp_path / "foreign.zip"
  with zipfile.ZipFile(foreign, "w") as zf:
    zf.writestr("data.csv", "a,b\n")
  with pytest.raises(ValueError, match=r"foreign\.zip.*no 'vmaptune.json'"):
    vt.load(foreign)

  good = _hand_built().save(tmp_path / "good.vmaptune")

  def rewrite(name, change):
    with zipfile.ZipFile(good) as zf:
      members = {n: zf.read(n) for n in zf.namelist()}
    index = json.loads(members["vmaptune.json"])
    change(index)
    members["vmaptune.json"] = json.dumps(index).encode()
    out = tmp_path / name
    with zipfile.ZipFile(out, "w") as zf:
      for n, data in members.items():
        zf.writestr(n, data)
    return out

  future = rewrite("future.vmaptune", lambda ix: ix.update(format_version=99))
  with pytest.raises(ValueError, match=r"future\.vmaptune.*format_version 99"):
    vt.load(future)
  other = rewrite("other.vmaptune", lambda ix: ix.update(format="something.else"))
  with pytest.raises(ValueError, match=r"other\.vmaptune.*not a saved vmaptune result"):
    vt.load(other)
  broken = rewrite("broken.vmaptune", lambda ix: ix.pop("trials"))
  with pytest.raises(ValueError, match=r"broken\.vmaptune.*damaged"):
    vt.load(broken)
  truncated = tmp_path / "truncated.vmaptune"
  truncated.write_bytes(open(good, "rb").read()[:-40])
  with pytest.raises(ValueError, match="truncated.vmaptune"):
    vt.load(truncated)


def test_a_model_holding_an_rng_stream_saves(small_digits, tmp_path):
  # nnx.Dropout(rngs=...) keeps an RngKey Variable in the model's state; it
  # shows its key's dtype but is a Variable, saved as its raw key data.
  from flax import nnx

  fn = lambda c, rngs: nnx.Sequential(nnx.Linear(64, 8, rngs=rngs), nnx.Dropout(0.1, rngs=rngs),
                                      nnx.Linear(8, 10, rngs=rngs))
  r = vt.search(fn, small_digits, {"learning_rate": vt.loguniform(1e-3, 1e-2)}, num_configs=2, num_steps=5,
                rounds=1, verbose=False)
  loaded = vt.load(r.save(tmp_path / "dropout.vmaptune"))
  assert loaded.best_score == r.best_score
  _, state = loaded.best_params
  key = state["layers"][1]["rngs"]["key"]
  assert key.dtype == np.uint32 and key.shape == (2,)
