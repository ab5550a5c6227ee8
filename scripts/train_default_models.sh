#!/usr/bin/env bash
# Train the shipped default models and the pix2pix baseline on a CPU-only 2-core machine,
# exactly as the bundles in Resources/Models were made (see docs/model_card.md).
# Usage: bash scripts/train_default_models.sh DATA_DIR [RUNS_DIR]
# Two lanes run side by side, one thread each (more threads per process on 2 cores
# oversubscribe OpenMP and ran 10x slower here).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: train_default_models.sh DATA_DIR [RUNS_DIR]}
RUNS=${2:-runs}
EPOCHS=${EPOCHS:-24}
COMMON=(--data "$DATA" --cache-dir "$RUNS/cache" --width 16 --epochs "$EPOCHS" --slices-per-subject 80
        --precision bf16 --seed 0 --num-threads 1 --max-val-slices 24 --no-progress)
PY=.venv/bin/python
mkdir -p "$RUNS"
# One instance per runs folder: a second one would --resume runs that are still training.
exec 9>"$RUNS/.train_default_models.lock"
flock -n 9 || { echo "another train_default_models.sh is using $RUNS" >&2; exit 1; }
# One split for every model (docs/default_split.json, seed 0 over all 15 subjects of the
# shared data, same-patient pairs kept together): no model is tested on a subject another
# one trained on, and every model is tested on the same held-out subjects.
SPLIT=${SPLIT:-docs/default_split.json}
train() {  # name, then options
  local name=$1; shift
  if [ -f "$RUNS/$name/model.safetensors" ]; then return; fi
  if [ -f "$RUNS/$name/checkpoint.pt" ]; then
    $PY -m training train --out "$RUNS/$name" --resume --num-threads 1 --no-progress > "$RUNS/$name.out" 2>&1
  else
    $PY -m training train "${COMMON[@]}" --split "$SPLIT" --out "$RUNS/$name" "$@" > "$RUNS/$name.out" 2>&1
  fi
}
# Three lanes, one thread each, on 2 cores. The T1-only model may use every subject with a
# T1 and a FLAIR (the BraTS 2018 cases too), so it keeps the middle 40 slices per subject
# for about the same number of steps per epoch as the others.
( train fdgan_t1_t2 --sources t1,t2 ) &
( train pix2pix_t1_t2 --sources t1,t2 --architecture pix2pix_unet; train fdgan_t1_t2_t1c --sources t1,t2,t1c ) &
( train fdgan_t1 --sources t1 --slices-per-subject 40 ) &
wait
