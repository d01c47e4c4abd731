"""All stages at once on a Kaggle-layout folder: ``delf-pipeline run``.

``DATA/train.csv`` + ``DATA/train/...`` are the index (with landmark labels) and
``DATA/test/...`` the queries. It writes the run folder ``OUT``
(:mod:`delf_pipeline.formats.run_folder` names every path in it): ``run.json`` first, so
``report``, ``show-matches`` and ``evaluate`` need only ``--run OUT``; the feature stores,
each opened once after its extraction; ``shortlist.csv``, ``rerank.csv`` (skipped when
num_to_rerank is 0), ``submission.csv`` and ``ranking.csv`` (every query id, failed images
too), ``errors.csv`` and, with ``--solution``, ``metrics.json``.

Every stage resumes: finished work is skipped, so rerunning after a crash or a kill
continues where it stopped and gives the same files.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Sequence

from . import calibrate, extract, predict, rerank, shortlist
from .budget import TimeBudget, affordable_depth, fit_num_to_rerank, measure_pair_seconds
from .config import Config, add_config_arguments, load_config, with_recorded
from .evidence.calibration import CalibrationError
from .formats.blocks import read_table
from .formats.candidates import candidate_ids, read_candidates
from .formats.images import list_images
from .formats.run_folder import RunFolder
from .formats.run_record import run_record, write_run_record
from .formats.store import FeatureStore, errors_to_csv, read_errors
from .formats.tables import read_labels
from .utils.artifacts import write_text_atomic

log = logging.getLogger("delf_pipeline.pipeline")

CALIBRATION_SHARE = 0.5  # of the time left after the queries' rerank, at most, for the calibration
MIN_CALIBRATION_SAMPLE = 10  # fewer leave-one-out queries than this: no calibration


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
    calibrate_index: bool = False,
    non_landmarks: str | Path | None = None,
) -> Path:
    """Run extract, shortlist, rerank, predict (and evaluate) on ``data``; returns submission.csv.

    With ``time_budget``, rerank.num_to_rerank is lowered to fit the time left after the
    shortlist (see :mod:`delf_pipeline.budget`). ``strict``: stop (ImageError) at the first
    unusable image instead of recording it. ``config_file`` and ``overrides`` are only
    recorded in ``OUT/run.json`` (``config`` already holds their effect).
    With ``calibrate_index``, ``delf-pipeline calibrate`` runs on the index after the queries'
    rerank (its sample cut to the time left under a budget, or skipped with a log line) and
    predict uses ``features/calibration.json``; ``non_landmarks`` is its optional folder of
    images without a landmark.
    """
    data, folder = Path(data), RunFolder(out)
    check_kaggle_layout(data)
    write_run_record(folder.path, run_record(config, data, solution=solution, config_file=config_file,
                                             overrides=overrides))
    index, query = extract_both(config, data, folder, overwrite=overwrite, strict=strict)
    labels = read_labels(data / "train.csv")
    shortlist_csv = shortlist.run(config, index, query, folder.shortlist, overwrite=overwrite, index_labels=labels)
    local = candidates_store(config, folder, index, shortlist_csv, data, strict=strict)
    write_run_errors(folder.errors, list(dict.fromkeys([index.path, query.path, local.path])))
    reranked = config if time_budget is None else fit_num_to_rerank(
        config, time_budget, shortlist_csv, query, local, folder.rerank, jobs=jobs, overwrite=overwrite)
    rerank_csv = None
    if reranked.rerank.num_to_rerank > 0:
        rerank_csv = rerank.run(reranked, shortlist_csv, query, local, folder.rerank, overwrite=overwrite, jobs=jobs)
    predicting = reranked if not calibrate_index else with_calibration(
        reranked, data, index, folder, jobs=jobs, budget=time_budget, non_landmarks=non_landmarks,
        pair_seconds=lambda: _pair_seconds(reranked, shortlist_csv, query, local))
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
    query = folder.store(extract.run(_query_config(config, index), data, folder.query_store, split="test",
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


def with_calibration(config: Config, data: Path, index: FeatureStore, folder: RunFolder, *, jobs: int,
                     budget: TimeBudget | None, pair_seconds: Callable[[], float],
                     non_landmarks: str | Path | None) -> Config:
    """``config`` with predict.calibration set to a fresh ``OUT/features/calibration.json``, or
    unchanged (with a log line) when the budget leaves too little time or the sample cannot be fitted.
    pair_seconds: () -> seconds per verified pair, called only under a budget."""
    config = config.copy()
    conf = config.calibrate
    images = len(index)
    wanted = min(conf.sample, images) if conf.sample > 0 else images
    if budget is not None:
        depth = config.rerank.num_to_rerank  # pairs verified per leave-one-out query
        seconds = pair_seconds() if depth > 0 else 0.0
        conf.sample = affordable_depth(CALIBRATION_SHARE * budget.remaining(), seconds, max(depth, 1), jobs, wanted)
        if conf.sample < MIN_CALIBRATION_SAMPLE:
            log.warning("calibration skipped: the time left fits %d of %d leave-one-out queries (need %d)",
                        conf.sample, wanted, MIN_CALIBRATION_SAMPLE)
            return config
        log.info("calibration: %d leave-one-out queries fit in the time budget", conf.sample)
    target = folder.calibration
    try:
        calibrate.run(config, index, read_labels(data / "train.csv"), target, work=folder.calibration_work, jobs=jobs,
                      index_images=data, non_landmarks=non_landmarks)
    except CalibrationError as error:
        log.warning("calibration skipped: %s", error)
        return config
    config.predict.calibration = str(target)
    return config


def _pair_seconds(config: Config, shortlist_csv: Path, query_store: FeatureStore, index_store: FeatureStore) -> float:
    """Seconds per verified pair, timed on up to 50 of the queries' shortlisted pairs."""
    return measure_pair_seconds(config.rerank, read_table(shortlist_csv), query_store, index_store, 50,
                                max_seconds=30.0)[0]


def _query_config(config: Config, index: FeatureStore) -> Config:
    """The queries' settings: local features always, whatever extract.local_features says for the
    index, and the index store's model (a built-in model is exported, with its PCA, for the index)."""
    model = index.manifest()["settings"]["model"]
    return with_recorded(config, "extract", {"local_features": True, "model": model}, str(index.path / "manifest.json"))


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
    parser.add_argument("--calibrate", action="store_true",
                        help="run `delf-pipeline calibrate` on the index so that confidences are probabilities")
    parser.add_argument("--non-landmarks", metavar="DIR", help="with --calibrate: folder of images without a landmark")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f'extract.model="{args.model}"'] if args.model else [])
    config = load_config(args.preset, args.config, overrides)
    if args.model and config.extract.backend in ("rootsift", "xfeat"):
        raise ValueError(f"--model needs a model preset (e.g. --preset delg_gldv2 or kaggle2020_baseline); "
                         f"preset {config.preset} uses the {config.extract.backend} backend, which has no model")
    budget = TimeBudget(args.time_budget_hours * 3600) if args.time_budget_hours else None
    if args.non_landmarks and not args.calibrate:
        raise ValueError("--non-landmarks works through the calibration: add --calibrate")
    submission = run(config, args.data, args.out, solution=args.solution, jobs=args.jobs, overwrite=args.overwrite,
                     time_budget=budget, strict=args.strict, config_file=args.config, overrides=overrides,
                     calibrate_index=args.calibrate, non_landmarks=args.non_landmarks)
    print(f"submission: {submission}")
    return 0
