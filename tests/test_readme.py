"""The README's code runs as written; the demo runs end to end."""

import pathlib
import re

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
                     "--report", str(report)]) == 0
  out = capsys.readouterr().out
  assert "Top 5 trials" in out and "Best config:" in out and "Wall time" in out
  assert "learning_rate =" in out
  assert (report / "report.html").stat().st_size > 10_000
