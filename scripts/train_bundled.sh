#!/usr/bin/env bash
# Reproduces the bundled text-to-video model dit_fast/assets/shapes_t2v.safetensors (+ .json).
# Trained on CPU (2 cores, backend "torch"); on a GPU add --device cuda --backend auto.
# Usage: scripts/train_bundled.sh [RUN_DIR] [extra dit-fast train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/shapes_t2v}
shift || true
STEPS=${STEPS:-20000}
dit-fast train --out-dir "$RUN_DIR" \
    --num-frames 8 --size 32 --patch 2 8 8 --hidden-size 128 --depth 4 --num-heads 4 --text-dim 64 \
    --batch-size 16 --lr 1e-3 --min-lr-ratio 1.0 --warmup 100 --ema-decay 0.995 --grad-clip 1.0 \
    --prediction x0 --text-dropout 0.1 --shift 2.0 --timestep-sampling logit_normal --seed 0 --data-seed 0 \
    --checkpoint-every 100 --keep-checkpoints 1000 --log-every 10 --threads 1 --steps "$STEPS" "$@"
dit-fast export "$RUN_DIR" dit_fast/assets/shapes_t2v.safetensors \
    --command-line "STEPS=$STEPS scripts/train_bundled.sh $RUN_DIR $*"
