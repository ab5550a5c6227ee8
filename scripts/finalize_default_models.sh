#!/usr/bin/env bash
# After scripts/train_default_models.sh: evaluate each model on the held-out test subjects
# against pix2pix (T1+T2) and trivial references, write the model cards and reports under
# docs/, and export the shipped fp16 bundles (with card and evaluation in their provenance)
# into Resources/Models.
# Usage: bash scripts/finalize_default_models.sh DATA_DIR [RUNS_DIR] [NAME ...]
#        (NAME: t1_t2_to_flair, t1_t2_t1c_to_flair, t1_to_flair; default all three)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: finalize_default_models.sh DATA_DIR [RUNS_DIR]}
RUNS=${2:-runs}
shift $(( $# < 2 ? $# : 2 ))
ONLY=" ${*:-t1_t2_to_flair t1_t2_t1c_to_flair t1_to_flair} "
SPLIT=${SPLIT:-docs/default_split.json}
PY=.venv/bin/python
EVAL=(--data "$DATA" --split "$SPLIT" --split-name test --precision bf16)

finalize() {  # shipped name, run name, evaluate arguments...
  local name=$1 run=$2; shift 2
  [[ "$ONLY" == *" $name "* ]] || return 0
  local report=docs/evaluation/$name
  $PY -m training evaluate --model "fdgan=$RUNS/$run/model.safetensors" "$@" "${EVAL[@]}" --out "$report"
  $PY -m training model-card --run "$RUNS/$run" --evaluation "$report/metrics.json" --label fdgan \
      --name "$name" --out "docs/model_cards/$name.md"
  $PY -m training export --run "$RUNS/$run" --out "Resources/Models/$name.safetensors" --half \
      --model-card "docs/model_cards/$name.md" --evaluation "$report/metrics.json"
}
finalize t1_t2_to_flair fdgan_t1_t2 --model "pix2pix=$RUNS/pix2pix_t1_t2/model.safetensors" \
    --baseline t2 --baseline linear
finalize t1_t2_t1c_to_flair fdgan_t1_t2_t1c --baseline t2 --baseline linear
finalize t1_to_flair fdgan_t1 --baseline linear
