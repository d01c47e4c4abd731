"""Quiet by default: no TensorFlow, absl or CUDA start-up line on stderr unless --verbose.

The commands a user runs first (demo, run, index build, query, serve) are run in a real
subprocess, as a user runs them, and their stderr is searched for any line TensorFlow's C++
side prints while it starts (absl's pre-initialisation banner, glog-style ``I0000 ...``
lines, cuInit, oneDNN, CPU-feature notes). The end-to-end runs are slow (TensorFlow is
imported in each process); one quick check imports TensorFlow under the command line's hook.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.synthetic_images import write_kaggle

from delf_pipeline.cli import filter_startup_lines, nvidia_driver_present

REPO = Path(__file__).resolve().parents[1]
#: Any line TensorFlow / absl / XLA print at start-up (glog-style prefixes, the absl banner, known texts).
NOISE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|cuInit|cuda|oneDNN|cpu_feature_guard|TensorFlow binary|"
                   r"rebuild TensorFlow", re.IGNORECASE | re.MULTILINE)
SMALL = ["--set", "extract.max_image_size=320", "--set", "extract.max_features=300", "--set", "extract.vlad_words=8",
         "--set", "rerank.num_to_rerank=4", "--set", "shortlist.top_k=8"]
needs_cpu_only = pytest.mark.skipif(nvidia_driver_present(), reason="on a GPU machine TensorFlow names its device")


def child_env() -> dict:
    """This checkout on the path, and no TF_CPP_MIN_LOG_LEVEL of the test process's own."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def delf(*args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m delf_pipeline ARGS`` in a fresh process with this checkout; output captured."""
    return subprocess.run([sys.executable, "-m", "delf_pipeline", *map(str, args)], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    noise = [line for line in result.stderr.splitlines() if NOISE.search(line)]
    assert noise == [], "\n".join(noise)


def test_startup_lines_are_dropped_and_others_kept():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1796626219.288528   21979 port.cc:153] oneDNN custom operations are on.\n"
            "I0000 00:00:1796626219.288946   21979 cudart_stub.cc:31] Could not find cuda drivers\n"
            "E0000 00:00:1796626222.049344   21979 some_op.cc:52] a real error\n"
            "a Python warning\n")
    assert filter_startup_lines(text) == ("E0000 00:00:1796626222.049344   21979 some_op.cc:52] a real error\n"
                                          "a Python warning\n")


@needs_cpu_only
def test_tensorflow_imported_under_the_command_line_hook_prints_nothing(tmp_path):
    code = ("import sys; from delf_pipeline.cli import quiet_tensorflow; quiet_tensorflow(); import tensorflow as tf; "
            "tf.constant(1.0) + 1; tf.config.list_physical_devices(); print('warned', file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "warned\n"


@pytest.mark.slow
@needs_cpu_only
def test_first_commands_print_no_tensorflow_line(tmp_path):
    from test_index import write_views

    places = write_views(tmp_path / "places", ("astronaut", "coffee", "chelsea"), 3, seed=1)
    query = write_views(tmp_path / "queries", ("coffee",), 1, seed=2) / "coffee" / "v0.jpg"
    assert_quiet(delf("index", "build", "--images", places, "--out", "idx", *SMALL, cwd=tmp_path))
    answered = delf("query", "--index", "idx", query, cwd=tmp_path)
    assert_quiet(answered)
    assert "coffee" in answered.stdout
    write_kaggle(tmp_path / "kaggle")
    assert_quiet(delf("run", "--data", "kaggle", "--out", "run", *SMALL, cwd=tmp_path))
    assert_quiet(delf("demo", "--out", "demo", *SMALL, cwd=tmp_path))
    served = serve_until_up(tmp_path, "idx")
    noise = [line for line in served.splitlines() if NOISE.search(line)]
    assert "serving http://127.0.0.1:" in served and "Application startup complete" in served and noise == [], served
    loud = delf("--verbose", "index", "info", "idx", cwd=tmp_path)  # info imports no TensorFlow: nothing either way
    assert loud.returncode == 0 and not NOISE.search(loud.stderr)


def test_the_hook_is_installed_unless_verbose(monkeypatch):
    """--verbose leaves TensorFlow's own lines alone; without it the first import goes through the hook."""
    from delf_pipeline import cli

    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, cli._QuietTensorFlow)])
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)  # as before its first import (restored after)
    assert cli.main(["--verbose", "config", "--list"]) == 0
    assert not any(isinstance(f, cli._QuietTensorFlow) for f in sys.meta_path)
    assert cli.main(["config", "--list"]) == 0
    assert any(isinstance(f, cli._QuietTensorFlow) for f in sys.meta_path)


def serve_until_up(cwd: Path, index: str, timeout: float = 300) -> str:
    """Start ``serve`` on a free port, wait for uvicorn's start line, stop it; returns its stderr."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "delf_pipeline", "serve", "--index", index, "--port", str(port)],
                               cwd=cwd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + timeout
    try:
        for line in process.stderr:
            lines.append(line)
            if "Application startup complete" in line or time.monotonic() > deadline:
                break
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    return "".join(lines) + (rest or "")


def test_library_info_lines_are_left_out_unless_verbose():
    """A SavedModel export logs a multi-thousand-character INFO line through absl: left out by
    default (the first use of the default preset exports one), kept with --verbose."""
    import logging

    from delf_pipeline import cli

    try:
        cli.setup_logging(False)
        assert [logging.getLogger(name).isEnabledFor(logging.INFO) for name in cli.LIBRARY_LOGGERS] == [False, False]
        assert logging.getLogger("absl").isEnabledFor(logging.WARNING)
        cli.setup_logging(True)
        assert all(logging.getLogger(name).isEnabledFor(logging.INFO) for name in cli.LIBRARY_LOGGERS)
    finally:
        for name in cli.LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
