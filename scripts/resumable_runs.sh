# Sourced by the training scripts: a lock per runs folder and a resumable `train`.
# Needs RUNS (runs folder), PY (the venv's python) and COMMON (options of every run).

# One instance per runs folder: a second one would --resume runs that are still training.
lock_runs() {  # script name, for the message
  mkdir -p "$RUNS"
  exec 9>"$RUNS/.lock"
  flock -n 9 || { echo "another $1 is using $RUNS" >&2; exit 1; }
}

# train NAME OPTIONS...: skip a finished run, --resume a stopped one, else start it with
# COMMON and OPTIONS; its output goes to RUNS/NAME.out.
train() {
  local name=$1; shift
  if [ -f "$RUNS/$name/model.safetensors" ]; then return; fi
  if [ -f "$RUNS/$name/checkpoint.pt" ]; then
    $PY -m training train --out "$RUNS/$name" --resume --num-threads 1 --no-progress >> "$RUNS/$name.out" 2>&1
  else
    $PY -m training train "${COMMON[@]}" --out "$RUNS/$name" "$@" > "$RUNS/$name.out" 2>&1
  fi
}
