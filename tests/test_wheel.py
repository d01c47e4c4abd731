"""The package as a wheel user gets it: the presets (the top-level configs/ folder) and the
report's assets are inside the wheel, and a venv with only the wheel installed (not editable, not this checkout) runs
``delf-pipeline demo``.

No network: the wheel is built with the build tools already installed
(``pip wheel --no-deps --no-build-isolation``), and the fresh venv borrows this
interpreter's site-packages on PYTHONPATH for the dependencies only (TensorFlow is too big
to install again per test); the ``delf_pipeline`` it imports is the installed wheel's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "delf_pipeline"
SOURCES = ("delf_pipeline", "configs", "setup.cfg", "setup.py", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built from a copy of its sources (no build/ left in the repository)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(source)], check=True, capture_output=True, text=True)
    (found,) = out.glob("delf_pipeline-*.whl")
    return found


@pytest.mark.parametrize("folder, source_folder, pattern", [
    ("presets", REPO / "configs", "*.toml"),
    ("tools/report_assets", PACKAGE / "tools" / "report_assets", "*"),
    ("service/static", PACKAGE / "service" / "static", "*"),
])
def test_wheel_holds_the_package_data_byte_for_byte(wheel, folder, source_folder, pattern):
    with zipfile.ZipFile(wheel) as archive:
        inside = {Path(name).name: archive.read(name) for name in archive.namelist()
                  if name.startswith(f"delf_pipeline/{folder}/")}
    source = {path.name: path.read_bytes() for path in source_folder.glob(pattern) if path.is_file()}
    assert source and inside == source


@pytest.mark.slow
def test_installed_wheel_runs_the_demo(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    alone = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # pip must see only the venv
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True, env=alone)
    env = {**alone, "PYTHONPATH": sysconfig.get_paths()["purelib"]}  # the dependencies, not delf_pipeline
    where = subprocess.run([str(python), "-c", "import delf_pipeline; print(delf_pipeline.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stderr[-3000:]
    done = subprocess.run([str(venv / "bin" / "delf-pipeline"), "demo", "--out", str(tmp_path / "demo")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gap_ignoring_non_landmarks" in done.stdout and "retrieval map@100" in done.stdout
    assert (tmp_path / "demo" / "run" / "metrics.json").is_file()
