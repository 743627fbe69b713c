"""vt.train: one config alone (panda), its callback, and its validation."""

import numpy as np
import optax
import pytest

import jax
import vmaptune as vt

from _models import MLP, mlp_fn

CONFIG = {"learning_rate": 3e-3, "hidden": 16}


def test_train_returns_a_run(small_digits):
  run = vt.train(mlp_fn, small_digits, CONFIG, seed=7, num_steps=40, verbose=False)
  assert run.status == "ok" and run.steps == 40 and run.seed == 7
  assert run.curve.shape == (10,) and list(run.curve_steps) == list(range(4, 41, 4))
  assert run.score == run.curve[-1]
  assert run.curve[-1] < run.curve[0]  # it learned
  assert isinstance(run.model(), MLP)
  again = vt.train(mlp_fn, small_digits, CONFIG, seed=7, num_steps=40, verbose=False)
  assert again.score == run.score  # replays
  other = vt.train(mlp_fn, small_digits, CONFIG, seed=8, num_steps=40, verbose=False)
  assert other.score != run.score


def test_callback_changes_hyperparameters_in_the_same_program(small_digits):
  compiles = []

  def listen(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  seen = []

  def freeze_at_20(state):
    seen.append((state.step, state.hyperparams["learning_rate"]))
    if state.step == 20:
      return {"learning_rate": 0.0}
    return None

  vt.train(mlp_fn, small_digits, CONFIG, num_steps=40, eval_every=5, verbose=False)  # warm
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    run = vt.train(mlp_fn, small_digits, CONFIG, num_steps=40, eval_every=5, callback=freeze_at_20,
                   verbose=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert [s for s, _ in seen] == list(range(5, 41, 5))
  assert seen[3][1] == pytest.approx(3e-3) and seen[4][1] == 0.0
  # The curve moves until step 20 and is flat after: the change took effect.
  assert len(set(run.curve[:4].tolist())) == 4
  assert len(set(run.curve[4:].tolist())) == 1
  assert len([c for c in compiles if c > 0.05]) == 0  # no recompilation for the change


def test_callback_can_stop_early(small_digits):
  run = vt.train(mlp_fn, small_digits, CONFIG, num_steps=40, eval_every=5, verbose=False,
                 callback=lambda s: {"stop": True} if s.step >= 10 else None)
  assert run.steps == 10 and len(run.curve) == 2
  with pytest.raises(TypeError, match=r"`callback` must return None or a dict.*got 0.1"):
    vt.train(mlp_fn, small_digits, CONFIG, num_steps=40, eval_every=5, verbose=False, callback=lambda s: 0.1)
  for bad in (-1.0, None, [1e-3], float("nan")):  # checked, not trained (or compiled again) with
    with pytest.raises(ValueError, match=r"callback changes 'learning_rate'.*finite number >= 0"):
      vt.train(mlp_fn, small_digits, CONFIG, num_steps=40, eval_every=5, verbose=False,
               callback=lambda s: {"learning_rate": bad})


def test_compile_tier_follows_the_length_of_the_run(small_digits, compile_tiers):
  # As a population's training program: a short run compiles at a cheap
  # tier, a long one at "long" (the same program, compiled again).
  tiers = compile_tiers
  config = dict(CONFIG, hidden=13)  # a width no other test trains alone: nothing cached
  short = vt.train(mlp_fn, small_digits, config, num_steps=20, verbose=False)
  assert tiers == ["init", "quick"] and short.steps == 20
  long = vt.train(mlp_fn, small_digits, config, num_steps=10**6, eval_every=10, verbose=False,
                  callback=lambda s: {"stop": True})
  assert tiers[2:] == ["long"] and long.steps == 10
  vt.train(mlp_fn, small_digits, config, num_steps=20, verbose=False)
  assert len(tiers) == 3  # both kept


def test_callback_refuses_unknown_hyperparameters(small_digits):
  with pytest.raises(ValueError, match="hidden"):
    vt.train(mlp_fn, small_digits, CONFIG, num_steps=10, eval_every=5, verbose=False,
             callback=lambda s: {"hidden": 32})


def test_lr_decay_decays_the_injected_learning_rate(small_digits):
  seen = []
  vt.train(mlp_fn, small_digits, {**CONFIG, "lr_decay": 1.0, "batch_size": 32}, num_steps=60,
           eval_every=15, verbose=False, callback=lambda s: seen.append(s.hyperparams["learning_rate"]))
  # 480 training examples / 32 = 15 steps an epoch; epoch e's steps use
  # lr0 / (1 + e), and the callback sees the rate of the last step taken.
  np.testing.assert_allclose(seen, [3e-3, 3e-3 / 2, 3e-3 / 3, 3e-3 / 4], rtol=1e-6)
  # A rate the callback returns replaces the rate it saw (the last step's), not
  # a new base to decay again: the same rate back changes nothing, half of it
  # halves the schedule from there on.
  for factor in (1.0, 0.5):
    seen = []

    def scale_at_30(state):
      seen.append(state.hyperparams["learning_rate"])
      return {"learning_rate": state.hyperparams["learning_rate"] * factor} if state.step == 30 else None

    vt.train(mlp_fn, small_digits, {**CONFIG, "lr_decay": 1.0, "batch_size": 32}, num_steps=60, eval_every=15,
             verbose=False, callback=scale_at_30)
    np.testing.assert_allclose(seen, [3e-3, 3e-3 / 2, 3e-3 / 3 * factor, 3e-3 / 4 * factor], rtol=1e-6)


def test_train_validation(small_digits):
  with pytest.raises(TypeError, match="distribution"):
    vt.train(mlp_fn, small_digits, {"learning_rate": vt.loguniform(1e-3, 1e-2)}, verbose=False)
  with pytest.raises(ValueError, match="learning_rate"):
    vt.train(mlp_fn, small_digits, {"hidden": 16}, verbose=False)
  with pytest.raises(TypeError, match="callback"):
    vt.train(mlp_fn, small_digits, CONFIG, callback=3, verbose=False)
  with pytest.raises(TypeError, match="config"):
    vt.train(mlp_fn, small_digits, [("learning_rate", 1e-3)], verbose=False)


def test_sgd_partial_needs_no_space_entry(small_digits):
  import functools

  run = vt.train(mlp_fn, small_digits, {}, optimizer=functools.partial(optax.sgd, learning_rate=0.05),
                 num_steps=20, verbose=False)
  assert run.status == "ok" and run.curve[-1] < run.curve[0]
