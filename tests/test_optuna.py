"""Optuna export (vmaptune/_optuna.py) on a hand-built result: no training needed."""

import math
import sys

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

import vmaptune as vt  # noqa: E402
from vmaptune import _region, _space  # noqa: E402
from vmaptune import SearchResult, Stats, Trial  # noqa: E402

from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "learning_rate": vt.loguniform(1e-4, 1e-1),
    "b1": vt.reverse_loguniform(0.8, 0.999),
    "dropout": vt.uniform(0.0, 0.5),
    "width": vt.integer(8, 64, log=True),
    "layers": vt.integer(1, 3),
    "act": vt.choice(["relu", (1, 2), np.tanh]),
    "batch_size": 32,
    "clip": math.inf,
}


def _result(maximize=False, n=24):
  rng = np.random.default_rng(0)
  trials = []
  for i in range(n):
    cfg = {k: d.sample(rng, 1)[0] for k, d in _space.searched(SPACE).items()}
    cfg.update(batch_size=32, clip=math.inf)
    score = (math.log10(cfg["learning_rate"]) + 2.5) ** 2 + 0.1 * cfg["dropout"]
    score = -score if maximize else score
    diverged, stopped = i in (3, 7), i == 5
    curve = np.linspace(2.0, score, 4).astype(np.float32)
    if diverged:
      curve[2:] = np.nan
      score = -math.inf if maximize else math.inf
    if stopped:  # stopped after two evaluations: the rest of its curve never ran
      curve[2:] = np.nan
    trials.append(Trial(id=i, config=cfg, score=score, round=int(i >= n // 2), lane=i % 8,
                        status="diverged" if diverged else "stopped" if stopped else "ok", seed=100 + i, curve=curve,
                        curve_steps=np.asarray([10, 20, 30, 40]),
                        train_curve=np.zeros(4, np.float32), steps=40,
                        diverged_at=25 if diverged else None, parent=0 if i >= n // 2 else None))
  return SearchResult(trials=trials, space=SPACE, metric="accuracy" if maximize else "loss",
                      maximize=maximize, regions=[_region.Region.full(SPACE)], stats=Stats(),
                      options={"sampler": "random", "num_configs": n // 2})


def test_trials_values_states_and_distributions():
  r = _result()
  study = r.to_optuna()
  assert study.direction.name == "MINIMIZE"
  assert len(study.trials) == len(r.trials)
  for ft, t in zip(study.trials, r.trials):
    assert ft.user_attrs["vmaptune_trial"] == t.id
    assert (ft.user_attrs["round"], ft.user_attrs["lane"], ft.user_attrs["seed"]) == (t.round, t.lane, t.seed)
    assert ft.user_attrs["parent"] == t.parent and ft.user_attrs["status"] == t.status
    if t.status == "diverged":
      assert ft.state == TrialState.FAIL and ft.value is None
      assert ft.intermediate_values == {10: 2.0, 20: pytest.approx(float(t.curve[1]))}
      assert ft.user_attrs["diverged_at"] == 25
    elif t.status == "stopped":  # Optuna's pruned trial, valued at its last intermediate value as Optuna's
      assert ft.state == TrialState.PRUNED and ft.value == pytest.approx(float(t.curve[1]))
      assert ft.intermediate_values == {10: 2.0, 20: pytest.approx(float(t.curve[1]))}
    else:
      assert ft.state == TrialState.COMPLETE and ft.value == t.score
      assert ft.intermediate_values == {s: float(v) for s, v in zip(t.curve_steps, t.curve)}
    assert ft.params["learning_rate"] == t.config["learning_rate"]
    assert ft.params["width"] == t.config["width"]
  d = study.trials[0].distributions
  assert d["learning_rate"] == FloatDistribution(1e-4, 1e-1, log=True)
  assert d["b1"] == FloatDistribution(0.8, 0.999)  # no reverse-log in optuna
  assert d["dropout"] == FloatDistribution(0.0, 0.5)
  assert d["width"] == IntDistribution(8, 64, log=True)
  assert d["layers"] == IntDistribution(1, 3)
  assert d["act"] == CategoricalDistribution(["relu", "(1, 2)", "tanh"])  # others become str
  assert "batch_size" not in d
  assert study.trials[0].user_attrs["sampling_scales"]["b1"] == "reverse_log"
  attrs = study.user_attrs
  assert attrs["constants"] == {"batch_size": 32, "clip": "inf"}
  assert attrs["sampling_scales"]["learning_rate"] == "log" and attrs["metric"] == "loss"
  assert attrs["choices_as_str"] == ["act"]
  best = study.best_trial
  assert best.user_attrs["vmaptune_trial"] == r.best_trial.id and best.value == r.best_score


def test_optuna_tools_work_on_the_export():
  study = _result(maximize=True).to_optuna(study_name="vt")
  assert study.direction.name == "MAXIMIZE" and study.study_name == "vt"
  importances = optuna.importance.get_param_importances(
      study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))  # the default, seeded
  assert set(importances) == set(_space.searched(SPACE))
  assert next(iter(importances)) == "learning_rate"
  # The study can keep sampling where the search left off.
  trial = study.ask()
  assert 1e-4 <= trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True) <= 1e-1


def test_sqlite_storage(tmp_path):
  pytest.importorskip("sqlalchemy")
  url = f"sqlite:///{tmp_path / 'search.db'}"
  _result().to_optuna(storage=url, study_name="s")
  study = optuna.load_study(study_name="s", storage=url)
  assert len(study.trials) == 24
  assert sum(t.state == TrialState.FAIL for t in study.trials) == 2


def test_missing_optuna_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "optuna", None)
  with pytest.raises(ImportError, match=r"pip install 'vmaptune\[optuna\]'"):
    _result().to_optuna()
