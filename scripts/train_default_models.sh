#!/usr/bin/env bash
# Train the shipped models and the pix2pix baseline exactly as the bundles in
# Resources/Models were made (docs/model_cards/, docs/recipe_study.md), on a CPU-only
# 2-core machine: two lanes side by side, one thread each (more threads per process on
# 2 cores oversubscribe OpenMP and ran 10x slower here).
# Usage: bash scripts/train_default_models.sh DATA_DIRS [RUNS_DIR]
#   DATA_DIRS: ../shared/data and the subjects ../shared/more-data/stage.py writes, joined with ':'.
# Resumable: run it again after a stop; finished runs are skipped, stopped ones --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: train_default_models.sh DATA_DIRS [RUNS_DIR]}
RUNS=${2:-runs/default}
PY=.venv/bin/python
# The recipe adopted by the study (docs/recipe_study.md) and the study's budget: every model
# trains on the train part of the fixed split with the same data order seed.
RECIPE=(--background-weight 0.1 --intensity-reference median --augment)
COMMON=(--data "$DATA" --split docs/split.json --cache-dir "$RUNS/cache" --width 16 --epochs 2
        --slices-per-subject 40 --precision bf16 --seed 0 --num-threads 1 --max-val-slices 24 --no-progress
        "${RECIPE[@]}")
source scripts/resumable_runs.sh
lock_runs train_default_models.sh
( train fdgan_t1_t2 --sources t1,t2; train fdgan_t1 --sources t1 ) &
( train pix2pix_t1_t2 --sources t1,t2 --architecture pix2pix_unet; train fdgan_t1_t2_t1c --sources t1,t2,t1c ) &
wait
