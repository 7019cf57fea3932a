#!/usr/bin/env bash
# One prepared script for a GPU machine (issue 7 item 5), a few minutes in all:
# the CIFAR-10 CT config at global batch 512 in float32 and bfloat16, with and without
# `linear` assignment (the real input path, ratios measured in the same run), the bare
# step's FLOPs and fraction of peak, and the FID feature-extraction rate.
#   pip install -r requirements.txt "jax[cuda12]==0.10.2" && bash bench/gpu_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for dtype in float32 bfloat16; do
  echo "== bare train step, cifar10_ct, batch 512, $dtype"
  python -m bench.train_step --config configs/cifar10_ct.py --config.model.dtype="$dtype" \
      --steps 20 --windows 3 2>&1 | grep -v "^[WI][0-9]"
done
echo "== training throughput with assignment (CIFAR-10 CT network, batch 512)"
python -m bench.train_throughput --configs cifar10_ct --cifar-batch 512 \
    --methods none,linear --steps 10 --windows 3 2>&1 | grep -v "^[WI][0-9]"
python -m bench.train_throughput --configs cifar10_ct --cifar-batch 512 --dtype bfloat16 \
    --methods none,linear --steps 10 --windows 3 2>&1 | grep -v "^[WI][0-9]" | tail -n +3
echo "== FID feature extraction (random weights, same cost as the real ones)"
python bench/fid.py --n 10000 --batch-size 500 --no-torch 2>&1 | grep -v "^[WI][0-9]"
