#!/usr/bin/env bash
# Reproduces the bundled text-to-video model dit_fast/assets/shapes_t2v.safetensors (+ .json).
# Trained on CPU (2 cores, backend "torch"); on a GPU add --device cuda --backend auto.
# Two phases of one schedule:
#   1. STEPS steps at a constant learning rate 1e-3 (min_lr_ratio 1.0) into RUN_DIR;
#   2. resumed from RUN_DIR's last checkpoint into RUN_DIR_decay for DECAY_STEPS more steps with
#      min_lr_ratio 0.1: the cosine schedule of a STEPS + DECAY_STEPS run taken from step STEPS on
#      (lr 3.3e-4 at 20000 down to 1e-4 at 30000 with the defaults). This phase raised held-out shape
#      accuracy from 57.5% to the figure in benchmarks/results/prompt_following.json.
#   3. PATCH_STEPS more steps from phase 2's EMA weights with patch (1, 8, 8) instead of (2, 8, 8)
#      (--init-from re-cuts the patch embedding and final layer), cosine 5e-4 -> 5e-5: a 128-wide
#      final layer cannot draw square corners into 384-value patches (benchmarks/patch_rank.py).
# Usage: scripts/train_bundled.sh [RUN_DIR] [extra dit-fast train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/shapes_t2v}
shift || true
STEPS=${STEPS:-20000}
DECAY_STEPS=${DECAY_STEPS:-10000}
MODEL=(--num-frames 8 --size 32 --hidden-size 128 --depth 4 --num-heads 4 --text-dim 64
        --batch-size 16 --warmup 100 --ema-decay 0.995 --grad-clip 1.0
        --prediction x0 --text-dropout 0.1 --shift 2.0 --timestep-sampling logit_normal --seed 0 --data-seed 0
        --log-every 10 --threads 1)
COMMON=(--patch 2 8 8 --lr 1e-3 "${MODEL[@]}")
dit-fast train --out-dir "$RUN_DIR" "${COMMON[@]}" --min-lr-ratio 1.0 \
    --checkpoint-every 100 --keep-checkpoints 1000 --steps "$STEPS" "$@"
dit-fast train --out-dir "${RUN_DIR}_decay" --resume "$RUN_DIR" "${COMMON[@]}" --min-lr-ratio 0.1 \
    --checkpoint-every 500 --keep-checkpoints 4 --steps $((STEPS + DECAY_STEPS)) "$@"
PATCH_STEPS=${PATCH_STEPS:-12000}
dit-fast train --out-dir "${RUN_DIR}_p188" --init-from "${RUN_DIR}_decay" --patch 1 8 8 --lr 5e-4 \
    "${MODEL[@]}" --min-lr-ratio 0.1 --checkpoint-every 1000 --keep-checkpoints 4 --steps "$PATCH_STEPS" "$@"
dit-fast export "${RUN_DIR}_p188" dit_fast/assets/shapes_t2v.safetensors \
    --command-line "STEPS=$STEPS DECAY_STEPS=$DECAY_STEPS PATCH_STEPS=$PATCH_STEPS scripts/train_bundled.sh $RUN_DIR $*"
