#!/usr/bin/env bash
# The README's second command: set up the scripts' environment with the test tools
# (scripts/setup_env.sh, which never changes a ./.venv it did not make), then run the tests.
#   bash scripts/test.sh           the default tests (slow ones left out: under 4 minutes on 2 cores)
#   bash scripts/test.sh --all     every test, the slow ones too (what CI runs)
# Other arguments go to pytest, e.g. bash scripts/test.sh tests/test_verify.py -k evd
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
start=$SECONDS
selection=()
if [ "${1:-}" = "--all" ]; then
  shift
  selection=(--slow)
  what="every test, the slow ones too (about 12 minutes on 2 cores)"
else
  what="the default tests, slow ones left out (under 4 minutes on 2 cores; --all runs them too)"
fi
echo "[test] 1/2 set-up: the scripts' virtual environment with the test tools (about 3 minutes the first time," \
     "seconds after)" >&2
venv="$(DELF_EXTRAS=test bash "$root/scripts/setup_env.sh")"
echo "[test] 2/2 $what" >&2
cd "$root"
status=0
"$venv/bin/python" -m pytest "${selection[@]}" "$@" || status=$?
echo "[test] done in $((SECONDS - start)) s" >&2
exit $status
