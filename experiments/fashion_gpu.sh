#!/usr/bin/env bash
# The Fashion-MNIST 32x32 sweep on one GPU: vanilla vs linear vs knn, 3 seeds each, all
# nine runs at once on the one device (each process gets a share of its memory), then the
# Fréchet distance of every kept snapshot and the report (docs-ready Markdown, curves,
# one-step sample grids). Budget: at most about 9 minutes in all; each stage has a time
# limit, and whatever finished is evaluated and reported.
#
#   bash experiments/fashion_gpu.sh            # GPU (pip install "jax[cuda12]" first)
#   SMOKE=1 bash experiments/fashion_gpu.sh    # the same stages on the CPU: 73 s on 2 idle cores
#
# Settings (environment): ROOT (runs/fashion32_gpu), PARALLEL (9), SEEDS (0,1,2),
# TRAIN_LIMIT / EVAL_LIMIT (seconds: 330 / 120), CACHE (the classifier and reference
# statistics; ~/.cache/immiscible_cm), EXTRA (more key=value overrides, space-separated).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CONFIG=configs/fashion32_ict.py
ROOT=${ROOT:-runs/fashion32_gpu}
PARALLEL=${PARALLEL:-9}
SEEDS=${SEEDS:-0,1,2}
TRAIN_LIMIT=${TRAIN_LIMIT:-330}
EVAL_LIMIT=${EVAL_LIMIT:-120}
CACHE=${CACHE:-$HOME/.cache/immiscible_cm}
CLASSIFIER=()
SETS=()
if [ "${SMOKE:-0}" = 1 ]; then
  # Tiny networks, a few steps, a classifier trained on 2,560 images in its own cache,
  # and the 10,000 test images as the data (cheap reference statistics).
  export JAX_PLATFORMS=cpu
  CONFIG=configs/fashion32_ict.py:smoke
  ROOT=${SMOKE_ROOT:-runs/fashion32_smoke}
  CACHE=$ROOT/cache
  SEEDS=0
  PARALLEL=1  # one at a time: the three arms share one compiled step (cache below)
  TRAIN_LIMIT=300
  EVAL_LIMIT=120
  CLASSIFIER=(--epochs 1 --train_images 2560)
  SETS=(data.split=test eval.samplers="('1step',)")
else
  # One GPU shared by PARALLEL processes: each preallocates its share (90% in all).
  XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk "BEGIN {printf \"%.3f\", 0.9 / $PARALLEL}")
  export XLA_PYTHON_CLIENT_MEM_FRACTION
fi
# Runs whose programs are identical (the arms differ only on the host) compile once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$ROOT/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
SETS+=("eval.cache_dir=$CACHE")
for kv in ${EXTRA:-}; do SETS+=("$kv"); done
SWEEP_SETS=()
MAIN_SETS=()
for kv in "${SETS[@]}"; do SWEEP_SETS+=(--set "$kv"); MAIN_SETS+=("--config.$kv"); done
mkdir -p "$ROOT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stamp "1/5 the Fashion-MNIST classifier (trained once into $CACHE, then reused)"
$PY -m evaluation.fashion_net --cache_dir "$CACHE" "${CLASSIFIER[@]}"

stamp "2/5 reference statistics of the training images (once, before the parallel runs)"
$PY main.py --config "$CONFIG" --workdir "$ROOT/fid_stats" --mode fid_stats "${MAIN_SETS[@]}"

stamp "3/5 training: 3 arms x seeds $SEEDS; $PARALLEL run(s) at a time, at most $TRAIN_LIMIT s"
timeout --signal=INT --kill-after=30 "$TRAIN_LIMIT" $PY -m experiments.sweep --config "$CONFIG" \
  --grid assignment.method=none,linear,knn --seeds "$SEEDS" --root "$ROOT" \
  --parallel "$PARALLEL" --no-eval "${SWEEP_SETS[@]}" \
  || stamp "training stopped early (time limit or a failed run): evaluating what exists"

stamp "4/5 Fréchet distance of every kept snapshot; $PARALLEL run(s) at a time, at most $EVAL_LIMIT s"
find "$ROOT" -mindepth 3 -maxdepth 3 -name config.json -path '*/seed*/config.json' \
  -printf '%h\n' | sort | timeout "$EVAL_LIMIT" xargs -P "$PARALLEL" -I{} \
  sh -c "$PY main.py --workdir '{}' --mode eval > '{}.eval.out' 2>&1 || echo 'eval failed: {}'" \
  || stamp "evaluation stopped early: reporting what was evaluated"

stamp "5/5 report"
$PY -m experiments.report --root "$ROOT" --metric fd_fashion --sampler 1step
for arm in "$ROOT"/assignment.method=*/; do
  grid=$(ls "$arm"seed"${SEEDS%%,*}"/samples/step_*.png 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$grid" ] && cp "$grid" "$ROOT/grid_$(basename "$arm" | cut -d= -f2).png"
done
stamp "done: $ROOT/report.md, $ROOT/curves.png, $ROOT/grid_{none,linear,knn}.png"
