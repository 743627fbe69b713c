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
  from vmaptune._demo import main

  monkeypatch.setenv("VMAPTUNE_CACHE_DIR", str(tmp_path / "cache"))
  assert main(["demo", "--configs", "8", "--rounds", "2", "--steps", "30", "--quiet", "--no-cache"]) == 0
  out = capsys.readouterr().out
  assert "Top 5 trials" in out and "Best config:" in out and "Wall time" in out
  assert "learning_rate =" in out
