#!/usr/bin/env bash
# One prepared script for a GPU machine (issues 5 and 7), about 8 minutes on an H200:
#  1. the CIFAR-10 CT config (NCSN++, LPIPS at 224) at global batch 512, bfloat16 and
#     float32: the bare step (FLOPs, fraction of peak, update and batch-copy shares) and
#     the real input path with and without `linear` assignment (ratio in the same run);
#  2. the FID feature-extraction rate;
#  3. EDM and CD training steps at batch 512 in bfloat16;
#  4. the CT step with pseudo-Huber instead of LPIPS (what LPIPS costs).
# Sections run in order of importance; each has its own time limit, so a slow one
# cannot eat the rest. A persistent compilation cache lets the throughput runs reuse
# the bare step's compiled program.
#   pip install -r requirements.txt "jax[cuda12]==0.10.2" && bash bench/gpu_report.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/immiscible_cm_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
PY="${PYTHON:-python3}"
LIMIT="${LIMIT:-400}"  # seconds per section; the first CT compile alone took ~2.5 min
quiet() { grep -v "^[WI][0-9]" || true; }
section() { echo; echo "== $1 ($(date +%T))"; }

for dtype in bfloat16 float32; do
  section "bare train step: cifar10_ct (LPIPS), batch 512, $dtype"
  timeout "$LIMIT" "$PY" -m bench.train_step --config configs/cifar10_ct.py \
      --config.model.dtype="$dtype" --steps 10 --windows 2 2>&1 | quiet
  section "training throughput, none vs linear: cifar10_ct, batch 512, $dtype"
  timeout "$LIMIT" "$PY" -m bench.train_throughput --configs cifar10_ct --cifar-batch 512 \
      --dtype "$dtype" --methods none,linear --steps 5 --windows 2 2>&1 | quiet
done
section "FID feature extraction (random weights, same cost as the real ones)"
timeout "$LIMIT" "$PY" bench/fid.py --n 10000 --batch-size 500 --no-torch 2>&1 | quiet
for cfg in cifar10_edm cifar10_cd; do
  section "bare train step: $cfg, batch 512, bfloat16"
  timeout "$LIMIT" "$PY" -m bench.train_step --config "configs/$cfg.py" \
      --config.model.dtype=bfloat16 --steps 5 --windows 2 2>&1 | quiet
done
section "bare train step: cifar10_ct with pseudo_huber, batch 512, bfloat16"
timeout "$LIMIT" "$PY" -m bench.train_step --config configs/cifar10_ct.py \
    --config.model.dtype=bfloat16 --config.cm.metric=pseudo_huber --steps 5 --windows 2 \
    2>&1 | quiet
section "done"
