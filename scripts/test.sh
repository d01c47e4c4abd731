#!/usr/bin/env bash
# Set up ./.venv if needed, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec "${DELF_VENV:-$root/.venv}/bin/python" -m pytest "$@"
