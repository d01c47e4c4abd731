#!/usr/bin/env python3
"""Google Landmark Recognition 2020 kernel: DELG features + geometric re-ranking, offline.

A thin main over ``delf_pipeline.pipeline.run`` with the ``kaggle2020_baseline`` preset
(DELG local_and_global SavedModel, KD-tree matching, homography RANSAC, host-baseline
scoring). It writes ``submission.csv`` with a row for every test id. Unless
``--no-calibrate``, the confidences are calibrated probabilities (``delf-pipeline calibrate``
on a sample of train images, sized to the time budget; "no calibration: REASON" in the
log when the budget leaves too little).

Paths, in order of precedence: command-line flag, environment variable, Kaggle default.

  --input   DELF_KERNEL_INPUT    /kaggle/input/landmark-recognition-2020
  --model   DELF_KERNEL_MODEL    /kaggle/input/delg-saved-models/local_and_global
  --output  DELF_KERNEL_OUTPUT   /kaggle/working/submission.csv
  --work    DELF_KERNEL_WORK     $TMPDIR/delf_pipeline_kernel (feature stores, shortlist, rerank)
  --xfeat-weights DELF_KERNEL_XFEAT_WEIGHTS  the bundle's copy (build_kernel_bundle.py --weights xfeat),
                                 else the delf_pipeline cache

``--features trained`` uses a model of ``delf-pipeline train``: the one in the bundle
(build_kernel_bundle.py --model DIR; then it is the default), else --model. ``--features lite0``
is EfficientNet-Lite0 alone (ImageNet EfficientNet-Lite0, exported on the train images
on first use), its weights package carried by the bundle; ``--features fused`` is delf_pipeline's
default preset (Lite0's global fused with the VLAD of XFeat features), which needs both weights
(build_kernel_bundle.py --weights xfeat).

The package comes from the bundle that scripts/build_kernel_bundle.py embeds in this file
(Kaggle runs with the internet off), or, in the unbundled source, from an installed
``delf_pipeline``. Nothing happens at import time.
"""
from __future__ import annotations

import argparse
import base64
import importlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

#: train.csv rows of the public competition data; the private rerun has another train set.
NUM_PUBLIC_TRAIN_IMAGES = 1580470
#: the competition's run-time limit is 9 hours; the rest is kept for safety.
DEFAULT_TIME_BUDGET_HOURS = 8.5
#: --features -> preset: DELG SavedModel (host baseline), RootSIFT (no weights), XFeat, ImageNet
#: EfficientNet-Lite0 (delf_pipeline's default preset), or a model of `delf-pipeline train` (the preset
#: its card names, else this one).
FEATURE_PRESETS = {"delg": "kaggle2020_baseline", "rootsift": "sift_default", "xfeat": "xfeat",
                   "lite0": "efficientnet_lite0", "fused": "efficientnet_lite0_fused", "trained": "efficientnet_lite0"}
#: the extract.model of the presets that export ImageNet EfficientNet-Lite0 on first use
BUILTIN_LITE0 = "builtin:efficientnet_lite0"
#: where build_kernel_bundle.py --weights puts weights in the bundle, beside the package
BUNDLED_WEIGHTS = "delf_pipeline_weights"
#: where build_kernel_bundle.py --model puts a trained model in the bundle, beside the package
BUNDLED_MODEL = "delf_pipeline_model"
#: (source description, base64 zip of the package); scripts/build_kernel_bundle.py sets it.
BUNDLE = None

log = logging.getLogger("delf_kernel")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with defaults taken from the DELF_KERNEL_* environment variables, then Kaggle's paths."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", default=env("DELF_KERNEL_INPUT", "/kaggle/input/landmark-recognition-2020"),
                        help="competition data: train.csv, train/, test/, sample_submission.csv [DELF_KERNEL_INPUT]")
    parser.add_argument("--model", default=env("DELF_KERNEL_MODEL", "/kaggle/input/delg-saved-models/local_and_global"),
                        help="DELG SavedModel folder, used with --features delg [DELF_KERNEL_MODEL]")
    parser.add_argument("--output", default=env("DELF_KERNEL_OUTPUT", "/kaggle/working/submission.csv"),
                        help="submission CSV to write [DELF_KERNEL_OUTPUT]")
    parser.add_argument("--work", default=env("DELF_KERNEL_WORK", str(Path(tempfile.gettempdir()) / "delf_pipeline_kernel")),
                        help="scratch folder for feature stores and stage CSVs; a rerun resumes from it [DELF_KERNEL_WORK]")
    parser.add_argument("--features", choices=sorted(FEATURE_PRESETS),
                        default=env("DELF_KERNEL_FEATURES", "trained" if bundle_has_model() else "delg"),
                        help="delg: the SavedModel in --model; rootsift: embedded OpenCV features, no model; "
                             "xfeat: XFeat features, weights from the bundle or --xfeat-weights; lite0: ImageNet "
                             "EfficientNet-Lite0, weights from the bundle; fused: delf_pipeline's default preset, "
                             "lite0 with the VLAD of XFeat features (both weights from the bundle); trained: "
                             "a model of delf-pipeline train, the bundle's or --model (default when bundled) "
                             "[DELF_KERNEL_FEATURES]")
    parser.add_argument("--xfeat-weights", default=env("DELF_KERNEL_XFEAT_WEIGHTS", ""),
                        help="folder with xfeat.pt and LICENSE (default: the bundle's copy, else the cache) "
                             "[DELF_KERNEL_XFEAT_WEIGHTS]")
    parser.add_argument("--preset", default=None, help="use this named preset instead of the one --features selects")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set rerank.num_to_rerank=5 (repeatable)")
    parser.add_argument("--time-budget-hours", type=float,
                        default=float(env("DELF_KERNEL_TIME_BUDGET_HOURS", DEFAULT_TIME_BUDGET_HOURS)),
                        help="lower num_to_rerank so the whole run fits; 0 disables [DELF_KERNEL_TIME_BUDGET_HOURS]")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction,
                        default=env("DELF_KERNEL_CALIBRATE", "1") == "1",
                        help="fit confidences as probabilities by leave-one-out on train images, with the sample cut "
                             "to the time budget (skipped, with a log line, when too little is left) "
                             "[DELF_KERNEL_CALIBRATE=0 turns it off]")
    parser.add_argument("--jobs", type=int, default=int(env("DELF_KERNEL_JOBS", "1")),
                        help="rerank worker processes [DELF_KERNEL_JOBS]")
    parser.add_argument("--public-run-shortcut", action="store_true",
                        default=env("DELF_KERNEL_PUBLIC_RUN_SHORTCUT", "0") == "1",
                        help="copy sample_submission.csv when train.csv has --public-train-images rows, as the host "
                             "baseline does to commit fast before the private rerun [DELF_KERNEL_PUBLIC_RUN_SHORTCUT=1]")
    parser.add_argument("--public-train-images", type=int, default=NUM_PUBLIC_TRAIN_IMAGES,
                        help="train.csv row count that identifies the public data")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sys.version_info < (3, 11) and importlib.util.find_spec("tomli") is None:
        raise SystemExit(f"delf_pipeline needs Python 3.11 (tomllib) or tomli on Python 3.10; "
                         f"this is {sys.version.split()[0]} without tomli")
    package = import_package()
    budget = make_budget(args.time_budget_hours)
    log.info("delf_pipeline %s from %s (%s)", package.__version__, package.__file__,
             BUNDLE[0] if BUNDLE else "installed, not bundled")
    data, output = Path(args.input), Path(args.output)
    check_input(data)
    if args.public_run_shortcut and count_train_images(data) == args.public_train_images:
        log.info("train.csv has %d rows: public data, copying sample_submission.csv", args.public_train_images)
        copy_file(data / "sample_submission.csv", output)
        return 0
    from delf_pipeline.pipeline import run

    config = kernel_config(args)
    submission = run(config, data, Path(args.work), jobs=args.jobs, time_budget=budget, calibrate_index=args.calibrate)
    copy_file(submission, output)
    log.info("wrote %s", output)
    return 0


def make_budget(hours: float):
    """A TimeBudget started now, or None when ``hours`` is 0."""
    if hours < 0:
        raise SystemExit(f"--time-budget-hours must be >= 0, got {hours}")
    if hours == 0:
        return None
    from delf_pipeline.budget import TimeBudget

    return TimeBudget(hours * 3600)


def import_package():
    """``delf_pipeline``: from the embedded bundle when there is one, else as installed."""
    if BUNDLE is not None and "delf_pipeline" not in sys.modules:
        sys.path.insert(0, str(unpack_bundle(BUNDLE[1])))
        importlib.invalidate_caches()
    try:
        return importlib.import_module("delf_pipeline")
    except ImportError:
        raise SystemExit("delf_pipeline is not importable: pip install it, or run the bundled kernel "
                         "that scripts/build_kernel_bundle.py writes") from None


def unpack_bundle(blob: str) -> Path:
    """Write the base64 zip ``blob`` to a new temporary folder; returns the folder."""
    target = Path(tempfile.mkdtemp(prefix="delf_pipeline_bundle_"))
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(blob))) as archive:
        archive.extractall(target)
    return target


def check_input(data: Path) -> None:
    missing = [name for name in ("train.csv", "sample_submission.csv", "test") if not (data / name).exists()]
    if missing:
        raise SystemExit(f"{data} is not the competition data: missing {', '.join(missing)} (see --input)")


def count_train_images(data: Path) -> int:
    """Rows of train.csv (its header excluded)."""
    with open(data / "train.csv", "rb") as handle:
        return max(0, sum(1 for line in handle if line.strip()) - 1)


def kernel_config(args: argparse.Namespace) -> dict:
    """The preset for ``--features``, the model path, ``--set`` overrides and the verifier fallback."""
    from delf_pipeline.config import load_config

    overrides, preset = list(args.overrides), args.preset or FEATURE_PRESETS[args.features]
    if args.features in ("delg", "trained"):
        model = (bundled_model() or args.model) if args.features == "trained" else args.model
        if not Path(model).is_dir():
            raise SystemExit(f"DELG model folder not found: {model} (see --model, or --features rootsift)")
        overrides.insert(0, f'extract.model="{Path(model).as_posix()}"')
        if args.features == "trained" and not args.preset:
            from delf_pipeline.extractors.efficientnet_lite_export import model_preset

            preset = model_preset(model) or preset
    weights = args.xfeat_weights or bundled_weights("xfeat")
    if args.features in ("xfeat", "fused") and weights:
        overrides.insert(0, f'extract.xfeat_weights="{Path(weights).as_posix()}"')
    config = load_config(preset, None, overrides)
    if config.extract.backend == "savedmodel" and config.extract.model == BUILTIN_LITE0:
        log.info("EfficientNet-Lite0 weights: %s", lite0_weights())
    return fall_back_verifier(config)


def lite0_weights() -> str:
    """The checked ImageNet EfficientNet-Lite0 weights file (the bundle carries its package), or
    SystemExit saying what is wrong before any work is done."""
    from delf_pipeline.extractors.efficientnet_lite import package_weights_path

    try:
        return str(package_weights_path("lite0"))
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"cannot use the EfficientNet-Lite0 weights: {error} (or bundle them: "
                         f"scripts/build_kernel_bundle.py carries them unless --no-lite0-weights)") from None


def bundle_has_model() -> bool:
    """Whether the embedded bundle carries a trained model (build_kernel_bundle.py --model)."""
    if BUNDLE is None:
        return False
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(BUNDLE[1]))) as archive:
        return any(name.startswith(f"{BUNDLED_MODEL}/") for name in archive.namelist())


def bundled_model() -> str:
    """The folder of the trained model unpacked with the bundle, or "" (not bundled, or without one)."""
    package = sys.modules.get("delf_pipeline")
    if BUNDLE is None or package is None:
        return ""
    folder = Path(package.__file__).resolve().parents[1] / BUNDLED_MODEL
    return str(folder) if (folder / "saved_model.pb").is_file() else ""


def bundled_weights(name: str) -> str:
    """The folder of weights ``name`` unpacked with the bundle, or "" (not bundled, or without them)."""
    package = sys.modules.get("delf_pipeline")
    if BUNDLE is None or package is None:
        return ""
    folder = Path(package.__file__).resolve().parents[1] / BUNDLED_WEIGHTS / name
    return str(folder) if folder.is_dir() else ""


def fall_back_verifier(config):
    """Replace the degensac verifier by OpenCV MAGSAC++ (same homography model) when pydegensac is missing."""
    if config.rerank.verifier != "degensac":
        return config
    try:
        importlib.import_module("pydegensac")
    except ImportError:
        log.warning("pydegensac is not installed: verifying with magsac (OpenCV USAC MAGSAC++ homography) instead")
        config.rerank.verifier = "magsac"
    return config


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary file, so ``target`` is never half written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


if __name__ == "__main__":
    sys.exit(main())
