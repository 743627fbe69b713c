"""Scenario 4: a changed call against an existing checkpoint is refused, listing what differs."""

import numpy as np
import pytest

import vmaptune as vt

from _models import MLP, mlp_fn


def _data(n=200, dtype=np.float32):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 64)).astype(dtype)
  return x, (x[:, :10].argmax(axis=1)).astype(np.int32)


BASE = dict(num_configs=4, num_steps=10, rounds=2, seed=0, verbose=False)
SPACE = {"learning_rate": vt.loguniform(1e-3, 3e-2)}


def _wider(config, rngs):
  return MLP(32, 1, rngs)


@pytest.mark.parametrize(
    "change, expect",
    [
        (dict(space={"learning_rate": vt.loguniform(1e-3, 1e-1)}), "space"),
        (dict(num_configs=5), "num_configs"),
        (dict(seed=1), "seed"),
        (dict(rounds=3), "rounds"),
        (dict(data=_data(n=201)), "data"),
        (dict(data=_data(dtype=np.float16)), "data"),
        (dict(model_fn=_wider), "model_fn"),
        (dict(num_steps=11), "num_steps"),
    ],
)
def test_changed_call_is_refused(tmp_path, change, expect):
  vt.search(mlp_fn, _data(), SPACE, checkpoint_dir=tmp_path / "ckpt", **BASE)
  args = dict(model_fn=mlp_fn, data=_data(), space=SPACE, **BASE)
  args.update(change)
  with pytest.raises(vt.CheckpointMismatch, match=expect) as info:
    vt.search(args.pop("model_fn"), args.pop("data"), args.pop("space"), checkpoint_dir=tmp_path / "ckpt", **args)
  assert "overwrite=True" in str(info.value)
  # Only what changed is listed.
  listed = str(info.value).split("Differences: ")[1]
  assert listed.count(": checkpoint has") <= 3


def test_same_name_other_architecture_is_refused(tmp_path):
  def model_fn(config, rngs):
    return MLP(16, 1, rngs)

  vt.search(model_fn, _data(), SPACE, checkpoint_dir=tmp_path / "ckpt", **BASE)

  def model_fn(config, rngs):  # noqa: F811 - the same name, another model
    return MLP(16, 2, rngs)

  with pytest.raises(vt.CheckpointMismatch, match="model_source|model_structure"):
    vt.search(model_fn, _data(), SPACE, checkpoint_dir=tmp_path / "ckpt", **BASE)


def test_overwrite_starts_afresh(tmp_path):
  first = vt.search(mlp_fn, _data(), SPACE, checkpoint_dir=tmp_path / "ckpt", **BASE)
  other = vt.search(mlp_fn, _data(), SPACE, checkpoint_dir=tmp_path / "ckpt", overwrite=True,
                    **dict(BASE, seed=3))
  assert other.stats.resumed_from is None and other.trials[0].config != first.trials[0].config
