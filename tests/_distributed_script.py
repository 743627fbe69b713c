"""One process of a two-process search on localhost (CPU, gloo collectives).

Usage: python _distributed_script.py PROCESS_ID NUM_PROCESSES PORT OUT.json [CHECKPOINT_DIR]
"""

import json
import os
import sys


def main():
  import jax

  pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  ckpt = sys.argv[5] if len(sys.argv) > 5 else None
  jax.config.update("jax_num_cpu_devices", int(os.environ.get("DEVICES_PER_PROCESS", "1")))
  jax.distributed.initialize(f"localhost:{port}", nproc, pid, heartbeat_timeout_seconds=5,
                             initialization_timeout=60)

  sys.path.insert(0, os.path.dirname(__file__))
  import _search_script

  assert jax.process_count() == nproc and len(jax.devices()) > len(jax.local_devices())
  opts = {"checkpoint_every": "20"} if ckpt else {}
  result = _search_script.run(ckpt or "-", opts)
  if pid == 0:
    with open(out, "w") as f:
      json.dump(dict(_search_script.record(result), devices=result.stats.num_devices), f)


if __name__ == "__main__":
  main()
