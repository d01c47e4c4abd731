"""All stages at once on a Kaggle-layout folder: ``delf-pipeline run``.

``DATA/train.csv`` + ``DATA/train/...`` are the index (with landmark labels) and
``DATA/test/...`` the queries. Writes, under ``OUT``::

    run.json                         what the run was given (data, preset, overrides, model,
                                     solution, package version): ``report``, ``show-matches``
                                     and ``evaluate`` need only ``--run OUT``
    features/index, features/query   feature stores (extract)
    errors.csv                       id,path,reason of every image of every store that failed
    shortlist.csv                    top-K index images per query
    features/index-candidates        local features of shortlisted index images, when
                                     extract.local_features is false (extracted once each)
    rerank.csv                       verified candidates (skipped when num_to_rerank is 0)
    features/calibration.json        P(right) fitted on the index (calibrate.automatic), when it
                                     has enough labelled photos; calibration/ its work files
    submission.csv, ranking.csv      predictions (every query id, also failed images)
    metrics.json                     with --solution

Every stage resumes: finished work is skipped, so rerunning after a crash or a kill
continues where it stopped and gives the same files.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Sequence

from . import calibrate, extract, predict, rerank, shortlist
from .budget import TimeBudget, fit_num_to_rerank
from .config import Config, load_config, with_recorded
from .formats.candidates import candidate_ids, read_candidates
from .formats.images import list_images
from .formats.run_record import run_record, write_run_record
from .formats.store import FeatureStore, errors_to_csv, read_errors
from .formats.tables import read_labels
from .utils.artifacts import write_text_atomic

log = logging.getLogger("delf_pipeline.pipeline")

CALIBRATION_SHARE = 0.5  # under a time budget: of the time left after the queries' rerank, at most


def run(
    config: Config,
    data: str | Path,
    out: str | Path,
    *,
    solution: str | Path | None = None,
    jobs: int = 1,
    overwrite: bool = False,
    time_budget: TimeBudget | None = None,
    strict: bool = False,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    calibrate_index: bool = True,
    non_landmarks: str | Path | None = None,
) -> Path:
    """Run extract, shortlist, rerank, predict (and evaluate) on ``data``; returns submission.csv.

    With ``time_budget``, rerank.num_to_rerank is lowered to fit the time left after the
    shortlist (see :mod:`delf_pipeline.budget`). ``strict``: stop (ImageError) at the first
    unusable image instead of recording it. ``config_file`` and ``overrides`` are only
    recorded in ``OUT/run.json`` (``config`` already holds their effect).
    With ``calibrate_index`` (the default), the index is calibrated after the queries' rerank
    (:func:`delf_pipeline.calibrate.automatic`: leave-one-out within a fifth of the run's time so
    far, or half the time a budget leaves; one log line says what was fitted or why not) and
    predict writes P(right) as the confidence; ``non_landmarks`` is the calibration's optional
    folder of images without a landmark. ``run.json`` then records the calibration (or null).
    """
    start = time.monotonic()
    data, out = Path(data), Path(out)
    check_kaggle_layout(data)
    record = run_record(config, data, solution=solution, config_file=config_file, overrides=overrides)
    write_run_record(out, record)
    features = out / "features"
    index_store = extract.run(config, data, features / "index", split="train", overwrite=overwrite, strict=strict)
    codebook = index_store / "codebook.npy"
    query_store = extract.run(_query_config(config, index_store), data, features / "query", split="test",
                              overwrite=overwrite, strict=strict, codebook=codebook if codebook.exists() else None)
    labels = read_labels(data / "train.csv")
    shortlist_csv = shortlist.run(config, index_store, query_store, out / "shortlist.csv", overwrite=overwrite,
                                  index_labels=labels)
    rerank_csv, global_store = None, index_store
    if config.rerank.num_to_rerank > 0:
        candidates = read_candidates(shortlist_csv, config.rerank.num_to_rerank)
        index_store = extract.candidate_local_store(config, index_store, candidate_ids(candidates), data, strict=strict)
    write_run_errors(out / "errors.csv", sorted({features / "index", query_store, index_store}))
    if time_budget is not None:
        config = fit_num_to_rerank(config, time_budget, shortlist_csv, query_store, index_store,
                                   out / "rerank.csv", jobs=jobs, overwrite=overwrite)
    if config.rerank.num_to_rerank > 0:
        rerank_csv = rerank.run(config, shortlist_csv, query_store, index_store, out / "rerank.csv",
                                overwrite=overwrite, jobs=jobs)
    if config.predict.calibration:
        log.info("calibration: %s (given); confidences are probabilities", config.predict.calibration)
    elif calibrate_index:
        config = with_calibration(config, data, global_store, out, jobs=jobs, budget=time_budget, start=start,
                                  non_landmarks=non_landmarks, overwrite=overwrite)
    else:
        log.info("no calibration (--no-calibrate); confidences are scores")
    calibration = config.predict.calibration
    write_run_record(out, {**record, "calibration": str(Path(calibration).resolve()) if calibration else None})
    submission = predict.run(config, shortlist_csv, labels,
                             predict.query_ids(query_store, data / "sample_submission.csv"),
                             out / "submission.csv", rerank_csv=rerank_csv, query_store=query_store)
    if solution:
        from .evaluate import evaluate, print_report

        print_report(evaluate(submission, solution, out / "ranking.csv", data / "train.csv", out / "metrics.json"))
    return submission


def check_kaggle_layout(data: Path) -> None:
    """ValueError naming what ``data`` lacks to be a Kaggle-layout folder: ``train.csv``
    (id,landmark_id), ``train/`` and ``test/`` (``a/b/c/ID.jpg``) with at least one test image."""
    if data.is_file():
        raise ValueError(f"--data {data} is a file; `run` needs the Kaggle-layout folder that holds train.csv, "
                         f"train/ and test/ (a CSV of id,path suits `delf-pipeline extract --images`)")
    if not data.is_dir():
        raise ValueError(f"--data {data}: folder not found")
    missing = [name for name, found in (("train.csv", (data / "train.csv").is_file()),
                                        ("train/", (data / "train").is_dir()), ("test/", (data / "test").is_dir()))
               if not found]
    if missing:
        raise ValueError(f"--data {data} is not a Kaggle-layout folder: it has no {', '.join(missing)} "
                         "(wanted: train.csv with id,landmark_id, train/a/b/c/ID.jpg, test/a/b/c/ID.jpg; "
                         "for a plain folder of photos run the stages one by one, see `delf-pipeline extract --help`)")
    if not list_images(data, split="test")[0]:
        raise ValueError(f"--data {data}: test/ holds no .jpg image, so there is no query")


def write_run_errors(path: Path, stores: Sequence[Path]) -> None:
    """``OUT/errors.csv``: the rows of every store's errors.csv (id,path,reason), store by store."""
    errors = [error for store in stores for error in read_errors(store / "errors.csv")]
    write_text_atomic(path, errors_to_csv(errors))
    if errors:
        log.info("%d image(s) could not be used: see %s", len(errors), path)


def with_calibration(config: Config, data: Path, index_store: Path, out: Path, *, jobs: int, budget: TimeBudget | None,
                     start: float, non_landmarks: str | Path | None, overwrite: bool = False) -> Config:
    """``config`` with predict.calibration set to ``OUT/features/calibration.json`` when
    :func:`delf_pipeline.calibrate.automatic` fits one in a fifth of the run's time since ``start``
    (a ``time.monotonic()`` reading), or, under ``budget``, in CALIBRATION_SHARE of the time left."""
    if budget is not None:
        seconds, limit = CALIBRATION_SHARE * budget.remaining(), "half of the time the budget leaves"
    else:
        seconds, limit = calibrate.AUTO_SHARE * (time.monotonic() - start), "a fifth of the run's time"
    made = calibrate.automatic(config, index_store, read_labels(data / "train.csv"),
                               out / "features" / "calibration.json", seconds=seconds, limit=limit,
                               work=out / "calibration", jobs=jobs, index_images=data, non_landmarks=non_landmarks,
                               overwrite=overwrite)
    config = copy.deepcopy(config)
    if made:
        config.predict.calibration = str(made)
    return config


def _query_config(config: Config, index_store: Path) -> Config:
    """The queries' settings: local features always, whatever extract.local_features says for the
    index, and the index store's model (a built-in model is exported, with its PCA, for the index)."""
    model = FeatureStore(index_store).manifest()["settings"]["model"]
    return with_recorded(config, "extract", {"local_features": True, "model": model}, str(index_store / "manifest.json"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import add_config_arguments

    parser.add_argument("--data", required=True, help="Kaggle-layout folder: train.csv, train/, test/")
    parser.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    parser.add_argument("--model", help="DELF/DELG SavedModel folder or hub handle (sets extract.model)")
    parser.add_argument("--solution", help="solution CSV (id,landmarks[,Usage]): also write and print metrics")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    parser.add_argument("--overwrite", action="store_true", help="redo every stage")
    parser.add_argument("--strict", action="store_true",
                        help="stop with exit code 1 at the first unusable image (also one an earlier run recorded)")
    parser.add_argument("--time-budget-hours", type=float,
                        help="lower rerank.num_to_rerank so the run fits this many hours (timed on sample pairs)")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="fit P(right) on the index by leave-one-out (in at most a fifth of the run's time), so "
                             "that confidences are probabilities (default; --no-calibrate keeps raw scores)")
    parser.add_argument("--non-landmarks", metavar="DIR", help="folder of images without a landmark: closeness to "
                                                                "them becomes a calibration feature")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f'extract.model="{args.model}"'] if args.model else [])
    config = load_config(args.preset, args.config, overrides)
    if args.model and config.extract.backend in ("rootsift", "xfeat"):
        raise ValueError(f"--model needs a model preset (e.g. --preset delg_gldv2 or kaggle2020_baseline); "
                         f"preset {config.preset} uses the {config.extract.backend} backend, which has no model")
    budget = TimeBudget(args.time_budget_hours * 3600) if args.time_budget_hours else None
    if args.non_landmarks and not args.calibrate:
        raise ValueError("--non-landmarks works through the calibration: drop --no-calibrate")
    submission = run(config, args.data, args.out, solution=args.solution, jobs=args.jobs, overwrite=args.overwrite,
                     time_budget=budget, strict=args.strict, config_file=args.config, overrides=overrides,
                     calibrate_index=args.calibrate, non_landmarks=args.non_landmarks)
    print(f"submission: {submission}")
    return 0
