#!/usr/bin/env bash
# The GPU benchmarks in one go, under 8 minutes: throughput (with the
# lane-equivalence check), scaling, time to result from fresh processes
# (cold_start.py), and a compact table of the first two.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # from the repository root; OUT_DIR defaults to benchmarks/out
#
# Needs only jax (with CUDA), flax, optax and numpy: no pip install of the
# project (PYTHONPATH=. below), no scikit-learn (digits-shaped synthetic
# data then), no optuna (peer (c) is skipped with a note). Every script
# writes its JSON after each run, so a timeout still leaves what finished.
#
# Rehearse on a CPU with small settings appended through TP_ARGS / SC_ARGS
# (and VMAPTUNE_BENCH_WITHOUT=sklearn,optuna to mimic the GPU machine), e.g.
#   VMAPTUNE_BENCH_WITHOUT=sklearn,optuna TP_ARGS="--ns 1,4 --steps 20 --matmul-n 256 --copy-mb 64 \
#     --check-steps 20 --check-retrain 2" SC_ARGS="--ns 1,2 --steps 5,2 --matmul-n 256 --copy-mb 64" \
#     bash benchmarks/gpu.sh /tmp/gpu-rehearsal
#
# Time plan (worst case ~7.9 min): throughput stops starting runs after
# 150 s and is killed at 240 s; scaling stops growing N after ~60 s per
# model and is killed at 150 s; the cold start is killed at 80 s.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"

# 1. Throughput of the five peers at N = 1, 32, 256, 1024, 4096 (500 steps;
#    (a) only up to N=32, (c) skipped without optuna, (b) timed on at most
#    64 configs), preceded by the lane-equivalence check at default (TF32 on
#    Hopper) and "highest" precision: retrain bit for bit, vt.train to rounding.
timeout 240 python benchmarks/throughput.py --gpu --check --budget-s 150 ${TP_ARGS:-} \
  --out "$OUT/throughput_gpu.json" 2>&1 | tee "$OUT/throughput_gpu.log"
echo "[gpu.sh] throughput done at $(( $(date +%s) - t0 )) s"

# 2. Scaling N = 1, 4, 16, 64, 256, 1024, 2048, 4096 on the digits MLP (200 steps) and the
#    MNIST-size MLP (100 steps), with MFU and the memory roofline. A larger
#    memory fraction lets the MNIST-size model reach more lanes.
timeout 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python benchmarks/scaling.py --gpu --budget-s 60 ${SC_ARGS:-} \
  --out "$OUT/scaling_gpu.json" 2>&1 | tee "$OUT/scaling_gpu.log"
echo "[gpu.sh] scaling done at $(( $(date +%s) - t0 )) s"

# 3. Time to result from fresh processes (16 configs x 2 rounds x 200 steps, six shapes): vmaptune
#    against hand-written jitted loops, cold and warm compilation caches; synthetic digits-shaped data
#    and no demo where scikit-learn is missing.
timeout 80 python benchmarks/cold_start.py --quick --reps 1 --no-demo ${CS_ARGS:-} \
  --out "$OUT/cold_start_gpu.json" 2>&1 | tee "$OUT/cold_start_gpu.log"
echo "[gpu.sh] cold start done at $(( $(date +%s) - t0 )) s"

# 4. The compact table.
python benchmarks/_common.py summary "$OUT/throughput_gpu.json" "$OUT/scaling_gpu.json" | tee "$OUT/summary_gpu.txt"
echo "[gpu.sh] total $(( $(date +%s) - t0 )) s"
