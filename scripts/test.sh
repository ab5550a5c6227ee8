#!/usr/bin/env bash
# The README's test command: set up .venv on a fresh machine and run the whole suite.
# Real-data tests read MRISYNTHESIS_DATA (default: ../shared/data next to the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export MRISYNTHESIS_DATA=${MRISYNTHESIS_DATA:-$(cd .. && pwd)/shared/data}
exec .venv/bin/python -m pytest "$@"
