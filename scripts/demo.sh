#!/usr/bin/env bash
# Set up ./.venv if needed, then run the self-contained demo (no download, no GPU needed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
exec "${DELF_VENV:-$root/.venv}/bin/delf-pipeline" demo "$@"
