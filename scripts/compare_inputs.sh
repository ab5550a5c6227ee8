#!/usr/bin/env bash
# What each added input buys: the three shipped paper models (Resources/Models) in one
# evaluation on the test subjects of docs/split.json that have a T1c, every brain slice
# (docs/evaluation/inputs_compared/), and the paired differences written into each model's
# card (docs/model_cards/) and stored in its bundle, weights untouched.
# Usage: bash scripts/compare_inputs.sh DATA_DIRS
#        REUSE_EVALUATION=1: keep docs/evaluation/inputs_compared, only rewrite the cards.
# Run by scripts/finalize_default_models.sh after it exports the models.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: compare_inputs.sh DATA_DIRS}
PY=.venv/bin/python
NAMES=(t1_t2_t1c_to_flair t1_t2_to_flair t1_to_flair)
REPORT=docs/evaluation/inputs_compared
if [ "${REUSE_EVALUATION:-0}" != 1 ]; then
  models=()
  for name in "${NAMES[@]}"; do models+=(--model "$name=Resources/Models/$name.safetensors"); done
  # Written beside the report first, so that a failed evaluation leaves the old one in place.
  rm -rf "$REPORT.new"
  $PY -m training evaluate "${models[@]}" --data "$DATA" --split docs/split.json --split-name test \
      --slices-per-subject 0 --precision bf16 --out "$REPORT.new"
  rm -rf "$REPORT" && mv "$REPORT.new" "$REPORT"
fi
for name in "${NAMES[@]}"; do
  $PY -m training model-card --from-bundle "Resources/Models/$name.safetensors" \
      --compared-in "$REPORT/metrics.json" --label "$name" --out "docs/model_cards/$name.md"
  $PY -m training set-model-card --bundle "Resources/Models/$name.safetensors" --model-card "docs/model_cards/$name.md"
done
