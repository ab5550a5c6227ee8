# Sourced by the training scripts: a lock per runs folder and a resumable `train`.
# Needs RUNS (runs folder), PY (the venv's python) and COMMON (options of every run).

# One instance per runs folder: a second one would --resume runs that are still training.
lock_runs() {  # script name, for the message
  mkdir -p "$RUNS"
  exec 9>"$RUNS/.lock"
  flock -n 9 || { echo "another $1 is using $RUNS" >&2; exit 1; }
}

# train NAME OPTIONS...: skip a finished run, --resume a stopped one, else start it with
# COMMON and OPTIONS; its output goes to RUNS/NAME.out. With STOP_AT=N set, the run stops
# at global step N with a checkpoint there (to branch from it) and train returns 0.
train() {
  local name=$1; shift
  local stop=()
  if [ -n "${STOP_AT:-}" ]; then stop=(--stop-after-steps "$STOP_AT"); fi
  if [ -f "$RUNS/$name/model.safetensors" ]; then return; fi
  local rc=0
  if [ -f "$RUNS/$name/checkpoint.pt" ]; then
    $PY -m training train --out "$RUNS/$name" --resume --num-threads 1 --no-progress "${stop[@]}" \
      >> "$RUNS/$name.out" 2>&1 || rc=$?
  else
    $PY -m training train "${COMMON[@]}" --out "$RUNS/$name" "$@" "${stop[@]}" > "$RUNS/$name.out" 2>&1 || rc=$?
  fi
  # 130: stopped (Ctrl-C, or STOP_AT reached); only the planned stop counts as success.
  if [ "$rc" = 130 ] && [ -n "${STOP_AT:-}" ]; then return 0; fi
  return "$rc"
}
