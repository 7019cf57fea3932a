#!/usr/bin/env bash
# One prepared script for a GPU machine (issues 5 and 7). Sections, in order:
#   ct     the CIFAR-10 CT config (NCSN++, LPIPS at 224) at global batch 512, bfloat16
#          and float32: the bare step (FLOPs, fraction of peak, update and batch-copy
#          shares) and the real input path with and without `linear` (ratio in one run);
#   fid    the FID feature-extraction rate;
#   edm    EDM and CD training steps at batch 512 in bfloat16;
#   huber  the CT step with pseudo-Huber instead of LPIPS (what LPIPS costs).
# On an H200 (2026-11-26) the first compile of the CT step took 2-2.5 min; `ct` alone
# needs about 9 minutes, so with a 15-minute device budget run `SECTIONS="ct fid"` in one
# call and the rest in a later session. A persistent compilation cache lets the
# throughput runs reuse the bare step's program. Each python call has its own limit.
#   pip install -r requirements.txt "jax[cuda12]==0.10.2" && SECTIONS="ct fid" bash bench/gpu_report.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/immiscible_cm_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
PY="${PYTHON:-python3}"
SECTIONS="${SECTIONS:-ct fid edm huber}"
LIMIT="${LIMIT:-400}"  # seconds per section; the first CT compile alone took ~2.5 min
quiet() { grep -v "^[WI][0-9]" || true; }
section() { echo; echo "== $1 ($(date +%T))"; }
wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }

wanted ct && for dtype in bfloat16 float32; do
  section "bare train step: cifar10_ct (LPIPS), batch 512, $dtype"
  timeout "$LIMIT" "$PY" -m bench.train_step --config configs/cifar10_ct.py \
      --config.model.dtype="$dtype" --steps 10 --windows 2 2>&1 | quiet
  section "training throughput, none vs linear: cifar10_ct, batch 512, $dtype"
  timeout "$LIMIT" "$PY" -m bench.train_throughput --configs cifar10_ct --cifar-batch 512 \
      --dtype "$dtype" --methods none,linear --steps 5 --windows 2 2>&1 | quiet
done
wanted fid && section "FID feature extraction (random weights, same cost as the real ones)" &&
timeout "$LIMIT" "$PY" bench/fid.py --n 10000 --batch-size 500 --no-torch 2>&1 | quiet
wanted edm && for cfg in cifar10_edm cifar10_cd; do
  section "bare train step: $cfg, batch 512, bfloat16"
  timeout "$LIMIT" "$PY" -m bench.train_step --config "configs/$cfg.py" \
      --config.model.dtype=bfloat16 --steps 5 --windows 2 2>&1 | quiet
done
wanted huber && section "bare train step: cifar10_ct with pseudo_huber, batch 512, bfloat16" &&
timeout "$LIMIT" "$PY" -m bench.train_step --config configs/cifar10_ct.py \
    --config.model.dtype=bfloat16 --config.cm.metric=pseudo_huber --steps 5 --windows 2 \
    2>&1 | quiet
section "done"
