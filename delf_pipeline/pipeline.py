"""All stages at once on a Kaggle-layout folder: ``delf-pipeline run``.

``DATA/train.csv`` + ``DATA/train/...`` are the index (with landmark labels) and
``DATA/test/...`` the queries. It writes the run folder ``OUT``
(:mod:`delf_pipeline.formats.run_folder` names every path in it): ``run.json`` first, so
``report``, ``show-matches`` and ``evaluate`` need only ``--run OUT``; the feature stores,
each opened once after its extraction; ``shortlist.csv``, ``rerank.csv`` (skipped when
num_to_rerank is 0), ``submission.csv`` and ``ranking.csv`` (every query id, failed images
too), ``errors.csv`` and, with ``--solution``, ``metrics.json``. ``features/calibration.json`` is the
confidence calibration the run fits on its index when it can (see :func:`run`).

Every stage resumes: finished work is skipped, so rerunning after a crash or a kill
continues where it stopped and gives the same files.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

from . import calibrate, extract, predict, rerank, shortlist
from .budget import TimeBudget, fit_num_to_rerank
from .config import Config, add_config_arguments, load_config
from .extractors.efficientnet_lite_export import model_preset
from .formats.candidates import candidate_ids, read_candidates
from .formats.images import list_images
from .formats.run_folder import RunFolder
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
    data, folder = Path(data), RunFolder(out)
    check_kaggle_layout(data)
    record = run_record(config, data, solution=solution, config_file=config_file, overrides=overrides)
    write_run_record(folder.path, record)
    index, query = extract_both(config, data, folder, overwrite=overwrite, strict=strict)
    labels = read_labels(data / "train.csv")
    shortlist_csv = shortlist.run(config, index, query, folder.shortlist, overwrite=overwrite, index_labels=labels)
    local = candidates_store(config, folder, index, shortlist_csv, data, strict=strict)
    write_run_errors(folder.errors, list(dict.fromkeys([index.path, query.path, local.path])))
    reranked = config if time_budget is None else fit_num_to_rerank(
        config, time_budget, shortlist_csv, query, local, folder.rerank, jobs=jobs, overwrite=overwrite, images=data)
    rerank_csv = None
    if reranked.rerank.num_to_rerank > 0:
        rerank_csv = rerank.run(reranked, shortlist_csv, query, local, folder.rerank, overwrite=overwrite, jobs=jobs,
                                index_labels=labels, query_images=data, index_images=data)
    predicting = calibrated(reranked, data, index, folder, calibrate_index=calibrate_index, jobs=jobs,
                            budget=time_budget, start=start, non_landmarks=non_landmarks, overwrite=overwrite)
    calibration = predicting.predict.calibration
    write_run_record(folder.path, {**record, "calibration": str(Path(calibration).resolve()) if calibration else None})
    submission = predict.run(predicting, shortlist_csv, labels,
                             predict.query_ids(query, data / "sample_submission.csv"),
                             folder.submission, rerank_csv=rerank_csv, query_store=query)
    if solution:
        from .evaluate import evaluate, print_report

        print_report(evaluate(submission, solution, folder.ranking, data / "train.csv", folder.metrics))
    return submission


def extract_both(config: Config, data: Path, folder: RunFolder, *, overwrite: bool,
                 strict: bool) -> tuple[FeatureStore, FeatureStore]:
    """The index store (train split) and the query store (test split, with the index's codebook
    and model) of the run ``folder``, extracted or resumed."""
    index = folder.store(extract.run(config, data, folder.index_store, split="train", overwrite=overwrite,
                                     strict=strict))
    codebook = index.path / "codebook.npy"
    query = folder.store(extract.run(extract.query_config(config, index), data, folder.query_store, split="test",
                                     overwrite=overwrite, strict=strict,
                                     codebook=codebook if codebook.exists() else None))
    return index, query


def candidates_store(config: Config, folder: RunFolder, index: FeatureStore, shortlist_csv: Path, data: Path, *,
                     strict: bool) -> FeatureStore:
    """The store holding the shortlisted candidates' local features: the index store, or the
    candidates' own store when the index holds global descriptors only (see
    :func:`delf_pipeline.extract.candidate_local_store`)."""
    if config.rerank.num_to_rerank <= 0:
        return index
    wanted = candidate_ids(read_candidates(shortlist_csv, config.rerank.num_to_rerank))
    return folder.store(extract.candidate_local_store(config, index, wanted, data, strict=strict))


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


def calibrated(config: Config, data: Path, index: FeatureStore, folder: RunFolder, *, calibrate_index: bool,
               jobs: int, budget: TimeBudget | None, start: float, non_landmarks: str | Path | None,
               overwrite: bool) -> Config:
    """The settings predict uses: with the calibration given, else the one fitted on the index
    (:func:`with_calibration`) unless ``calibrate_index`` is off; one log line says which."""
    if config.predict.calibration:
        log.info("calibration: %s (given); confidences are probabilities", config.predict.calibration)
        return config
    if not calibrate_index:
        log.info("no calibration (--no-calibrate); confidences are scores")
        return config
    return with_calibration(config, data, index, folder, jobs=jobs, budget=budget, start=start,
                            non_landmarks=non_landmarks, overwrite=overwrite)


def with_calibration(config: Config, data: Path, index: FeatureStore, folder: RunFolder, *, jobs: int,
                     budget: TimeBudget | None, start: float, non_landmarks: str | Path | None,
                     overwrite: bool = False) -> Config:
    """``config`` with predict.calibration set to the run folder's calibration when
    :func:`delf_pipeline.calibrate.automatic` fits one in a fifth of the run's time since ``start``
    (a ``time.monotonic()`` reading), or, under ``budget``, in CALIBRATION_SHARE of the time left."""
    if budget is not None:
        seconds, limit = CALIBRATION_SHARE * budget.remaining(), "half of the time the budget leaves"
    else:
        seconds, limit = calibrate.AUTO_SHARE * (time.monotonic() - start), "a fifth of the run's time"
    made = calibrate.automatic(config, index, read_labels(data / "train.csv"), folder.calibration, seconds=seconds,
                               limit=limit, work=folder.calibration_work, jobs=jobs, index_images=data,
                               non_landmarks=non_landmarks, overwrite=overwrite)
    config = config.copy()
    if made:
        config.predict.calibration = str(made)
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    preset = args.preset or (model_preset(args.model) if args.model and not args.config else None)
    if preset and not args.preset:
        log.info("preset %s: the one %s names (its card), as no --preset or --config is given", preset, args.model)
    config = load_config(preset, args.config, overrides)
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
