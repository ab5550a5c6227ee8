#!/usr/bin/env bash
# Train the shipped models and the pix2pix baseline (issue 20; docs/learning_curves.md) on a
# CPU-only 2-core machine: two lanes side by side, one thread each (more threads per process
# on 2 cores oversubscribe OpenMP and ran 10x slower here).
# - The paper model T1+T2 -> FLAIR: the learning-curve run of the earlier recipe
#   (scripts/learning_curves.sh: every brain slice, bilinear slices) up to step 14,000, where
#   its figures had stopped improving at constant learning rate; then, warm-started from that
#   checkpoint (--init-from), 8 epochs on bicubic slices: 2 at lr 2e-4, 6 decaying to 0.
# - Its pix2pix baseline: the same data, split, recipe and seed, bicubic slices, 20 epochs
#   from scratch (30,360 steps, more than the paper model's 14,000 + 12,144).
# - T1 -> FLAIR and T1+T2+T1c -> FLAIR: warm-started from the T1+T2 run at the end of its
#   constant-lr phase (epoch 2; shared sources keep their weights, an added source starts at
#   zero weight: training/warm_start.py), then 4 epochs of linear decay (the T1+T2 run decays
#   over 6; 4 keep each at ~1.6 CPU-hours). The T1 model's bundle is exported with its T1
#   histogram standardised (scripts/finalize_default_models.sh): without that it drew whole
#   lobes of low-contrast (old-scanner) T1s black, and contrast and blur augmentation in
#   training did not cure it (docs/learning_curves.md, "T1: black regions").
# Usage: bash scripts/train_default_models.sh DATA_DIRS [RUNS_DIR] [LANES]
#   DATA_DIRS: ../shared/data and the subjects ../shared/more-data/stage.py writes, joined with ':'.
#   LANES: 2 (default) runs two processes; 1 runs everything one after the other.
# Resumable: run it again after a stop; finished runs are skipped, stopped ones --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: train_default_models.sh DATA_DIRS [RUNS_DIR] [LANES]}
RUNS=${2:-runs/curves}
LANES=${3:-2}
PY="nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python"
BRANCH_STEP=14000
BRANCH="$RUNS/curve_step$BRANCH_STEP.pt"
if [ ! -f "$BRANCH" ]; then
  # The curve up to the branch step (resumable), then a copy of its checkpoint there.
  STOP_AT=$BRANCH_STEP bash scripts/learning_curves.sh "$DATA" "$RUNS" 1
  step=$(tail -n 1 "$RUNS/curve_fdgan_t1_t2/curve.csv" | cut -d, -f1)  # its checkpoint's step
  if [ "$step" != "$BRANCH_STEP" ]; then
    echo "the curve run's last checkpoint is at step $step, not $BRANCH_STEP: cannot branch from it" >&2; exit 1
  fi
  cp "$RUNS/curve_fdgan_t1_t2/checkpoint.pt" "$BRANCH"
fi
RECIPE=(--background-weight 0.1 --intensity-reference median --augment --resize-interpolation bicubic)
COMMON=(--data "$DATA" --split docs/split.json --cache-dir "$RUNS/cache_all" --width 16 --slices-per-subject 0
        --precision bf16 --seed 0 --num-threads 1 --max-val-slices 60 --val-every 500 --no-progress "${RECIPE[@]}")
WARM=(--init-from "$BRANCH" --epochs-constant 2 --epochs-decay 6)
# The T1+T2 run's checkpoint after its 2 constant-lr epochs (4,552 training slices at batch 3:
# 1,518 steps an epoch), where the other source sets branch off.
EPOCH2_STEP=3036
BRANCH2="$RUNS/fdgan_t1_t2_epoch2.pt"
BRANCHED=(--init-from "$BRANCH2" --epochs-constant 0 --epochs-decay 4)
source scripts/resumable_runs.sh
lock_runs train_default_models.sh
t1_t2_to_epoch2() {
  [ -f "$BRANCH2" ] && return
  STOP_AT=$EPOCH2_STEP train fdgan_t1_t2 --sources t1,t2 "${WARM[@]}"
  local at
  at=$($PY -c "import sys, torch; c = torch.load(sys.argv[1], map_location='cpu', weights_only=False); print(c['epoch'], c['step'])" \
       "$RUNS/fdgan_t1_t2/checkpoint.pt")
  if [ "$at" != "2 0" ]; then  # (epoch, step in it): the end of epoch 2
    echo "the T1+T2 run's checkpoint is at epoch/step $at, not the end of epoch 2: cannot branch from it" >&2; exit 1
  fi
  cp "$RUNS/fdgan_t1_t2/checkpoint.pt" "$BRANCH2.tmp" && mv "$BRANCH2.tmp" "$BRANCH2"
}
wait_for_branch2() {  # lane 2, should it get there first; gives up when lane 1 has ended without it
  while [ ! -f "$BRANCH2" ]; do
    kill -0 "$LANE1" 2>/dev/null || { echo "lane 1 ended without $BRANCH2" >&2; exit 1; }
    sleep 60
  done
}
# Lanes of about equal CPU time on AMD: T1+T2 (~3.1 h) + T1 (~1.6 h); pix2pix (~1.5 h) + T1+T2+T1c (~1.6 h).
lane1() {
  t1_t2_to_epoch2
  train fdgan_t1_t2 --sources t1,t2 "${WARM[@]}"
  train fdgan_t1 --sources t1 "${BRANCHED[@]}"
}
lane2() {
  train pix2pix_t1_t2 --sources t1,t2 --architecture pix2pix_unet --epochs 20
  wait_for_branch2
  train fdgan_t1_t2_t1c --sources t1,t2,t1c "${BRANCHED[@]}"
}
if [ "$LANES" -ge 2 ]; then
  lane1 & LANE1=$!
  lane2 &
  wait
else
  LANE1=$$
  lane1; lane2
fi
