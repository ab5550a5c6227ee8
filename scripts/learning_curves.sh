#!/usr/bin/env bash
# Issue 20: learning curves of the shipped recipe trained far longer (the shipped models had
# 934 steps of batch 3): every brain slice of the 37 training subjects (4552 slices, 1518
# steps per epoch), 20 epochs (10 at constant lr, 10 decaying), the validation figures
# (brain and scale-free brain PSNR, sharpness, GMSD, SSIM) every 500 steps against steps and
# CPU hours (RUN/curve.csv, curve.png, curve_samples.png), a mid-epoch checkpoint with each.
# Lane 1: the paper model T1+T2 -> FLAIR; lane 2 (LANES=2): its pix2pix baseline with the same
# data, split, recipe, budget and seed. One thread per run, niced: on 2 cores run one lane
# while working (keep a core for tests), two when the machine is otherwise idle.
# Usage: bash scripts/learning_curves.sh DATA_DIRS [RUNS_DIR] [LANES]
#   DATA_DIRS: ../shared/data and the subjects ../shared/more-data/stage.py writes, joined with ':'.
# Resumable: run it again after a stop (a session's end, Ctrl-C, a kill); finished runs are skipped.
# STOP_AT=N: stop at global step N with a checkpoint there (scripts/train_default_models.sh
# branches the shipped T1+T2 model from the paper model's curve at step 14,000).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: learning_curves.sh DATA_DIRS [RUNS_DIR] [LANES]}
RUNS=${2:-runs/curves}
LANES=${3:-1}
PY="nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python"
RECIPE=(--background-weight 0.1 --intensity-reference median --augment)
COMMON=(--data "$DATA" --split docs/split.json --cache-dir "$RUNS/cache_all" --width 16 --epochs 20
        --slices-per-subject 0 --precision bf16 --seed 0 --num-threads 1 --max-val-slices 60 --val-every 500
        --no-progress "${RECIPE[@]}")
source scripts/resumable_runs.sh
lock_runs learning_curves.sh
train curve_fdgan_t1_t2 --sources t1,t2 &
if [ "$LANES" -ge 2 ]; then
  train curve_pix2pix_t1_t2 --sources t1,t2 --architecture pix2pix_unet &
fi
wait
