#!/usr/bin/env bash
# Whole `mrisynthesis predict` processes of an earlier commit and of this tree, alternating,
# on one real case (what docs/performance.md's "before and after in one run" rows use).
# Usage: bash scripts/bench_before_after.sh REV [ROUNDS] [MODEL]
#   data from $MRISYNTHESIS_DATA (default ../shared/data), case brats18-cbica-abm (T1 + T2).
# Prints each run's seconds and the medians; the earlier tree is a temporary git worktree.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: bench_before_after.sh REV [ROUNDS] [MODEL]}
ROUNDS=${2:-5}
MODEL=${3:-t1_t2_to_flair}
CASE="$(realpath -m "${MRISYNTHESIS_DATA:-../shared/data}")/brats18-cbica-abm"
[ -f "$CASE/t1.nii.gz" ] || { echo "no $CASE/t1.nii.gz: set MRISYNTHESIS_DATA" >&2; exit 1; }
PY="$PWD/.venv/bin/python"
WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/before" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git worktree add --detach "$WORK/before" "$REV" >/dev/null 2>&1
for i in $(seq 1 "$ROUNDS"); do
  for tree in before after; do
    root="$WORK/before"; [ $tree = after ] && root="$PWD"
    rm -f "$WORK/$tree.nii.gz" "$WORK/$tree.json"  # the output and its sidecar
    start=$(date +%s.%N)
    (cd "$root" && PYTHONPATH="$root" "$PY" -m MRISynthesisLib predict --t1 "$CASE/t1.nii.gz" \
        --t2 "$CASE/t2.nii.gz" --model "$MODEL" -o "$WORK/$tree.nii.gz" > "$WORK/$tree.log" 2>&1) \
      || { echo "$tree run failed:" >&2; cat "$WORK/$tree.log" >&2; exit 1; }
    echo "$tree $(echo "$(date +%s.%N) - $start" | bc)"
  done
done | tee "$WORK/times"
for tree in before after; do
  grep "^$tree " "$WORK/times" | cut -d' ' -f2 | sort -n | awk -v t=$tree '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%s: median %.2f s of %d\n", t, m, NR}'
done
