#!/usr/bin/env bash
# The recipe study of docs/recipe_study.md: T1+T2 -> FLAIR variants at one fixed budget
# (width 16, 2 epochs of 40 middle slices per training subject, bf16, seed 0, one thread
# each), trained on the train part of docs/split.json and compared on its val part.
# Usage: bash scripts/recipe_study.sh DATA_DIRS [RUNS_DIR]
#   DATA_DIRS: ../shared/data and the staged ../shared/more-data subjects joined with ':'.
# Resumable: run it again after a stop; finished runs are skipped, stopped ones --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: recipe_study.sh DATA_DIRS [RUNS_DIR]}
RUNS=${2:-runs/study}
PY=.venv/bin/python
COMMON=(--data "$DATA" --split docs/split.json --cache-dir "$RUNS/cache" --sources t1,t2 --width 16 --epochs 2
        --slices-per-subject 40 --precision bf16 --seed 0 --num-threads 1 --max-val-slices 24 --no-progress)
source scripts/resumable_runs.sh
lock_runs recipe_study.sh
evaluate() {  # report folder, then NAME=RUN pairs; the first model's units for the baselines
  local out=$1; shift
  if [ -f "$RUNS/$out/metrics.json" ]; then return; fi  # done in an earlier pass
  local models=()
  for pair in "$@"; do models+=(--model "${pair%%=*}=$RUNS/${pair#*=}"); done
  $PY -m training evaluate "${models[@]}" --baseline linear --data "$DATA" --split docs/split.json \
      --split-name val --precision bf16 --out "$RUNS/$out"
}
# Two lanes, one thread each. a-f normalise with the brain percentiles; g-k with the
# brain median (their own units: evaluated apart, each against the linear fit in its units).
( train a_paper --adain-scale direct --style-init normal
  train c_bg --background-weight 0.1
  train e_bg_gdl --background-weight 0.1 --gdl-weight 50
  train g_bg_median --background-weight 0.1 --intensity-reference median
  train j_bg_median_aug_gan5 --background-weight 0.1 --intensity-reference median --augment --gan-weight 5
  train i_bg_median_aug_4ep --background-weight 0.1 --intensity-reference median --augment --epochs 4
  train l_bg_median_aug_ctx1 --background-weight 0.1 --intensity-reference median --augment --context-slices 1 ) &
( train b_init
  train d_bg_aug --background-weight 0.1 --augment
  train f_bg_gan5 --background-weight 0.1 --gan-weight 5
  train h_bg_median_aug --background-weight 0.1 --intensity-reference median --augment
  train k_bg_median_aug_gan0 --background-weight 0.1 --intensity-reference median --augment --gan-weight 0 ) &
wait
export OMP_NUM_THREADS=2
evaluate val-report a_paper=a_paper/model.safetensors b_init=b_init/model.safetensors c_bg=c_bg/model.safetensors \
    d_bg_aug=d_bg_aug/model.safetensors e_bg_gdl=e_bg_gdl/model.safetensors f_bg_gan5=f_bg_gan5/model.safetensors
evaluate val-report-median g_bg_median=g_bg_median/model.safetensors h_bg_median_aug=h_bg_median_aug/model.safetensors
evaluate val-report-4ep h_bg_median_aug=h_bg_median_aug/model.safetensors i_bg_median_aug_4ep=i_bg_median_aug_4ep/model.safetensors
evaluate val-report-gan h_bg_median_aug=h_bg_median_aug/model.safetensors \
    j_bg_median_aug_gan5=j_bg_median_aug_gan5/model.safetensors k_bg_median_aug_gan0=k_bg_median_aug_gan0/model.safetensors
evaluate val-report-2.5d h_bg_median_aug=h_bg_median_aug/model.safetensors \
    l_bg_median_aug_ctx1=l_bg_median_aug_ctx1/model.safetensors
