#!/usr/bin/env bash
# The README's first command: set up .venv on a fresh machine, then synthesise a FLAIR for
# the embedded default case (a phantom built from the ICBM152 anatomy that nilearn ships)
# or, with --subject DIR, for a folder holding t1/t2/t1c(/flair).nii.gz.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/mrisynthesis demo "$@"
