"""The README's code runs as written; the demo runs end to end."""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README.md has no python block"
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)
  assert namespace["result"].best_score == namespace["result"].retrain().score


def test_readme_has_exactly_two_setup_commands():
  text = (ROOT / "README.md").read_text()
  setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
  commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
  assert [c.strip() for c in commands] == [
      'pip install -e ".[demo]" && python -m vmaptune demo',
      'pip install -e ".[test]" && python -m pytest',
  ]
  ci = (ROOT / ".ci" / "run").read_text()
  assert commands[1].strip() in ci


def test_demo_runs_end_to_end(capsys, tmp_path, monkeypatch):
  from vmaptune import _demo

  full = _demo.demo_space()
  assert {"learning_rate", "b1", "hidden", "num_layers", "lr_decay"} == set(full)
  # The demo's own space compiles six programs; one width keeps the test quick
  # while running the same command-line path.
  monkeypatch.setattr(_demo, "demo_space", lambda: dict(full, hidden=32, num_layers=1))
  monkeypatch.setenv("VMAPTUNE_CACHE_DIR", str(tmp_path / "cache"))
  report = tmp_path / "report"
  assert _demo.main(["demo", "--configs", "8", "--rounds", "2", "--steps", "30", "--quiet", "--no-cache",
                     "--strategy", "adaptive", "--recheck", "2", "2", "--report", str(report)]) == 0
  out = capsys.readouterr().out
  assert "Top 5 trials" in out and "Best config:" in out and "Wall time" in out
  assert "learning_rate =" in out
  assert "The search re-checked its top 2 with 2 fresh seeds each" in out and "mean accuracy" in out
  assert (report / "report.html").stat().st_size > 10_000
  # PBT has no config that ran alone: the demo says so instead of re-checking.
  assert _demo.main(["demo", "--configs", "4", "--rounds", "2", "--steps", "20", "--quiet", "--no-cache",
                     "--strategy", "pbt"]) == 0
  assert "No re-check: PBT" in capsys.readouterr().out
  # A bad value is argparse's usage error (exit 2), not a traceback.
  for bad in (["--configs", "0"], ["--steps", "-5"], ["--timeout", "0"], ["--rounds", "x"]):
    with pytest.raises(SystemExit) as exit_:
      _demo.main(["demo", *bad])
    assert exit_.value.code == 2
  assert "must be positive" in capsys.readouterr().err


def test_demo_digits_are_scikit_learns_without_importing_it():
  import subprocess
  import sys

  from sklearn.datasets import load_digits

  from vmaptune import _demo

  x, y = _demo.load_digits()
  want_x, want_y = load_digits(return_X_y=True)
  assert x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(x, (want_x / 16.0).astype(np.float32))
  np.testing.assert_array_equal(y, want_y)
  # In a fresh process the loader leaves scikit-learn (and SciPy) unimported.
  code = ("import sys; from vmaptune._demo import load_digits; x, y = load_digits(); "
          "print(x.shape, sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=str(ROOT)).stdout
  assert out.strip() == "(1797, 64) []"
