"""Running vmaptune in child processes, sharing one compilation cache."""

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def child_env(cache_dir, **extra):
  env = dict(os.environ)
  env.pop("VMAPTUNE_FAILPOINT", None)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env["VMAPTUNE_CPU_DEVICES"] = os.environ.get("VMAPTUNE_CPU_DEVICES", "4")  # as conftest
  env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("VMAPTUNE_TEST_XLA_CACHE", str(cache_dir))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_search(out, ckpt, cache_dir, *args, env=None, timeout=240, check=True):
  """Runs tests/_search_script.py; returns the CompletedProcess."""
  cmd = [sys.executable, str(HERE / "_search_script.py"), str(out), str(ckpt), *args]
  proc = subprocess.run(cmd, env=child_env(cache_dir, **(env or {})), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def start_search(out, ckpt, cache_dir, *args, env=None):
  cmd = [sys.executable, str(HERE / "_search_script.py"), str(out), str(ckpt), *args]
  return subprocess.Popen(cmd, env=child_env(cache_dir, **(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def read(out):
  with open(out) as f:
    return json.load(f)


def same_search(a, b):
  """Trials equal bit for bit (configs, seeds, scores, curves) and same regions."""
  assert len(a["trials"]) == len(b["trials"])
  for ta, tb in zip(a["trials"], b["trials"]):
    assert ta == tb, (ta, tb)
  assert a["regions"] == b["regions"]
  assert a["best"] == b["best"]
