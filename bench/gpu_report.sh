#!/usr/bin/env bash
# One prepared script for a GPU machine (issues 5 and 7). Sections, in order:
#   ct     the CIFAR-10 CT config (NCSN++, LPIPS at 224) at global batch 512, bfloat16
#          and float32: the bare step (FLOPs, fraction of peak, memory, update and
#          batch-copy shares) and the real input path with and without `linear` (ratio
#          in one run; at batch 256 as well if 512 does not fit the device);
#   fid    the FID feature-extraction rate;
#   edm    EDM and CD training steps at batch 512 in bfloat16;
#   huber  the CT step with pseudo-Huber instead of LPIPS (what LPIPS costs);
# SECTIONS="memory": bench.memory's table of the four CIFAR-10 steps (issue 26), compiled
# on the GPU (32 compiles per config; MICROBATCHES / MEMORY_CONFIGS narrow it).
# issue 19 (one call of at most 9 minutes: SECTIONS="assign profile small restart"):
#   assign  training throughput at batch 512 in bfloat16 with none, linear and knn
#           through the real input path, interleaved windows (goal: linear >= 0.98x,
#           knn >= 0.99x vanilla);
#   profile a jax.profiler trace of the CT step (bfloat16, batch 512): the top
#           operations by device time and the step's FLOPs / fraction of peak;
#   small   the quickstart (and any SMALL_CONFIGS) with 1 and 8 steps per call: host
#           time per step, images/s, and the share of wall time the device is busy;
#   restart a second launch of the quickstart with a warm compilation cache against
#           the first (bench/restart.py).
# On an H200 (2026-11-26) the first compile of the CT step took 2-2.5 min; `ct` alone
# needs about 9 minutes, so with a 15-minute device budget run `SECTIONS="ct fid"` in one
# call and the rest in a later session. A persistent compilation cache lets the
# throughput runs reuse the bare step's program. Each python call has its own limit
# (LIMIT seconds); the script ends with the list of calls that failed, exit status 1.
#   pip install -r requirements.txt "jax[cuda12]==0.10.2" && SECTIONS="ct fid" bash bench/gpu_report.sh
# SMOKE=1 runs every command with the :smoke networks at batch 8 on whatever backend is
# present (tests/test_bench.py runs the ct section on the CPU, so its command lines stay
# valid; the other sections' commands use the same modules and flags, except bench.profile
# and bench.restart, which no test runs).
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/immiscible_cm_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
PY="${PYTHON:-python3}"
SECTIONS="${SECTIONS:-ct fid edm huber}"
DTYPES="${DTYPES:-bfloat16 float32}"  # of the ct section
LIMIT="${LIMIT:-400}"  # seconds per call; the first CT compile alone took ~2.5 min
if [[ -n "${SMOKE:-}" ]]; then
  BATCH=8 SMALL=4 SUFFIX=":smoke" TT=(--smoke) STEPS=1 WINDOWS=1 FID=(--n 8 --batch-size 4)
else
  BATCH=512 SMALL=256 SUFFIX="" TT=() STEPS=5 WINDOWS=2 FID=(--n 10000 --batch-size 500)
fi
FAILED=()
section() { echo; echo "== $1 ($(date +%T))"; }
wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }
# run NAME ARGS...: python ARGS under the time limit, absl's W/I log lines dropped.
run() {
  local name=$1 rc
  shift
  timeout "$LIMIT" "$PY" "$@" 2>&1 | { grep -v "^[WI][0-9]" || true; }
  rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || FAILED+=("$name: exit $rc")
  return "$rc"
}
step() {  # step NAME CONFIG DTYPE [FLAGS...]: the bare jitted step at batch $BATCH
  local name=$1 cfg=$2 dtype=$3
  shift 3
  section "bare train step: $name, batch $BATCH, $dtype"
  run "step $name $dtype" -m bench.train_step --config "configs/$cfg.py$SUFFIX" \
      --config.training.batch_size="$BATCH" --config.model.dtype="$dtype" \
      --steps $((2 * STEPS)) --windows "$WINDOWS" "$@"
}
throughput() {  # throughput BATCH DTYPE: none vs linear through the real input path
  section "training throughput, none vs linear: cifar10_ct, batch $1, $2"
  run "throughput batch $1 $2" -m bench.train_throughput --configs cifar10_ct \
      --cifar-batch "$1" "${TT[@]}" --dtype "$2" --methods none,linear --steps "$STEPS" \
      --windows "$WINDOWS"
}

if wanted ct; then
  for dtype in $DTYPES; do
    step "cifar10_ct (LPIPS)" cifar10_ct "$dtype"
    # The step's memory needs are printed first; a step that does not fit is reported
    # (exit 1) instead of crashing, and the ratio is then measured at a smaller batch.
    throughput "$BATCH" "$dtype" || { [[ $? == 1 ]] && throughput "$SMALL" "$dtype"; }
  done
fi
if wanted fid; then
  section "FID feature extraction (random weights, same cost as the real ones)"
  run "fid" bench/fid.py "${FID[@]}" --no-torch
fi
if wanted edm; then
  for cfg in cifar10_edm cifar10_cd; do step "$cfg" "$cfg" bfloat16; done
fi
if wanted assign; then
  section "training throughput, none vs linear vs knn: cifar10_ct, batch $BATCH, bfloat16"
  run "assign" -m bench.train_throughput --configs cifar10_ct --cifar-batch "$BATCH" \
      "${TT[@]}" --dtype bfloat16 --methods none,linear,knn --steps "$STEPS" \
      --windows "$((WINDOWS + 1))"
fi
if wanted profile; then
  section "profile: cifar10_ct step, batch $BATCH, bfloat16"
  run "profile" -m bench.profile --config "configs/cifar10_ct.py$SUFFIX" \
      --config.training.batch_size="$BATCH" --config.model.dtype=bfloat16 \
      --trace_steps "$STEPS" --top 25
fi
if wanted small; then
  for cfg in quickstart ${SMALL_CONFIGS:-}; do
    section "small model: $cfg, 1 and 8 steps per call"
    run "small $cfg" -m bench.train_step --config "configs/$cfg.py$SUFFIX" \
        --steps_per_call=1,8 --steps "$((4 * STEPS))" --windows "$WINDOWS" --nobreakdown
    run "small profile $cfg" -m bench.profile --config "configs/$cfg.py$SUFFIX" \
        --trace_steps "$((4 * STEPS))" --calls_per_step 1 --top 5
    run "small profile $cfg k=8" -m bench.profile --config "configs/$cfg.py$SUFFIX" \
        --trace_steps "$STEPS" --calls_per_step 8 --top 5
  done
fi
if wanted restart; then
  section "restart: quickstart, empty vs warm compilation cache"
  run "restart" -m bench.restart --config "configs/quickstart.py$SUFFIX" --steps 8
fi
if wanted memory; then
  # Compiled memory of the four CIFAR-10 steps, per microbatch and remat, in bfloat16 and
  # float32 (compile only, nothing runs): the GPU's own buffer assignment for the README's
  # table (docs/memory.md), next to the CPU's.
  for cfg in ${MEMORY_CONFIGS:-cifar10_ct cifar10_ict cifar10_edm cifar10_ddpm}; do
    section "memory: $cfg, microbatch 1 2 4 8, remat off/on"
    run "memory $cfg" -m bench.memory --config "configs/$cfg.py$SUFFIX" \
        --microbatch "${MICROBATCHES:-1,2,4,8}" --remat off,on --dtype bfloat16,float32
  done
fi
if wanted huber; then
  step "cifar10_ct with pseudo_huber" cifar10_ct bfloat16 --config.cm.metric=pseudo_huber
fi
section "done"
if (( ${#FAILED[@]} )); then
  printf 'failed: %s\n' "${FAILED[@]}"
  exit 1
fi
