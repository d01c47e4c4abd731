"""``delf-pipeline calibrate``: fit P(prediction right | evidence) from the index alone.

Leave-one-out over a seeded sample of index images: each one is a query against the rest of
the index (its own image excluded by ``shortlist.exclude_same_id``), through the real
shortlist and rerank (of its ``calibrate.depth`` best candidates), and its prediction
(``predict.aggregation`` over ``predict.top_k``) is right when it names the image's own
landmark. An image whose place has no other photo in the index can only be predicted wrong:
such images act as non-landmark queries. A logistic
model (:mod:`delf_pipeline.evidence.calibration`) is fitted on the evidence of these
predictions and written to ``calibration.json`` (default: beside the index store), which
``predict`` then uses so that submission confidences are probabilities.

It also prints, per threshold of the fitted confidence, the precision, recall and F1 of "the
prediction is right" on the sample, and the threshold that maximises each: the F1 one is the
suggested ``predict.abstain`` (queries below it get an empty row). The sample's predictions
are in-sample for the fit, so these figures are optimistic on small samples.

``--non-landmarks DIR`` adds the closeness of each query to images without a landmark as a
feature (formula in :mod:`delf_pipeline.evidence.nonlandmarks`).

Work files (``loo-FINGERPRINT/shortlist.csv``, ``rerank.csv``) go to ``--work`` (default:
``calibration/`` beside the output) and resume like the stages. ``run`` and ``index build``
calibrate by themselves (:func:`automatic`), in a fifth of their own time at most.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from . import extract, rerank, shortlist
from .budget import affordable_depth, measure_pair_seconds
from .config import Config, add_config_arguments, config_of
from .descriptors.derived import prepare_index
from .evidence import aggregation, calibration
from .evidence.nonlandmarks import add_nonlandmark
from .formats.blocks import read_table
from .formats.candidates import candidate_ids, top_candidates
from .formats.store import FeatureStore, open_store
from .formats.tables import read_labels
from .retrieval.search import select_matmul
from .utils.artifacts import fingerprint, read_json, write_json_atomic, write_text_atomic

log = logging.getLogger("delf_pipeline.calibrate")

THRESHOLDS = np.round(np.arange(0.0, 1.0001, 0.05), 2)  # rows of the printed threshold table
AUTO_SHARE = 0.2  # run and index build calibrate in at most this share of their own time
MIN_SAMPLE = 10  # fewer leave-one-out queries than this: no calibration
PROBE_QUERIES = 3  # leave-one-out queries timed to size the sample


def run(
    config: Config,
    index_store: str | Path | FeatureStore,
    labels: dict[str, str],
    out: str | Path,
    *,
    work: str | Path | None = None,
    jobs: int = 1,
    index_images: str | Path | None = None,
    non_landmarks: str | Path | None = None,
    table: bool = True,
) -> Path:
    """Fit and write ``out`` (calibration.json); returns ``out``. ``table``: print the weights and the
    threshold table.

    With ``non_landmarks`` (a folder of images without a landmark), their global descriptors
    are extracted to ``WORK/non_landmarks`` and the evidence gains the ``nonlandmark``
    feature (:mod:`delf_pipeline.evidence.nonlandmarks`); the store's path is recorded in the
    file so that ``predict`` computes the same feature for its queries.
    """
    out, index = Path(out), open_store(index_store)
    work = Path(work) if work else out.parent / "calibration"
    evidence = loo_evidence(config, index, labels, work, jobs=jobs, index_images=index_images)
    conf = config.calibrate
    settings = {"aggregation": config.predict.aggregation, "top_k": config.predict.top_k,
                "seed": conf.seed, "l2": conf.l2, "depth": loo_depth(config),
                "store": store_key(index)}
    if non_landmarks:
        store = nonlandmark_store(config, index.path, Path(non_landmarks), work / "non_landmarks")
        evidence = add_nonlandmark(evidence, index, store)
        settings["non_landmarks"] = str(store.resolve())
    right = evidence["right"].to_numpy()
    settings.update(sample=len(evidence), right=int(right.sum()))
    fitted = calibration.fit(evidence, right, l2=conf.l2, settings=settings)
    probability = fitted.probability(evidence)
    table_rows = calibration.threshold_table(probability, right, THRESHOLDS)
    chosen = calibration.chosen_thresholds(table_rows)
    fitted.settings.update(thresholds=chosen,
                           reliability=calibration.reliability(probability, right).to_dict(orient="records"))
    write_text_atomic(out, fitted.to_json())
    if table:
        print(calibration.describe(fitted, table_rows, chosen))
    log.info("calibration %s: %d leave-one-out queries, %d right", out, len(evidence), int(right.sum()))
    return out


def automatic(config: Config, index_store: str | Path, labels: dict[str, str], out: str | Path, *, seconds: float,
              limit: str, work: Path, jobs: int = 1, index_images: str | Path | None = None,
              non_landmarks: str | Path | None = None, overwrite: bool = False,
              remedy: str = "`delf-pipeline calibrate`") -> Path | None:
    """The calibration ``run`` and ``index build`` make by themselves: ``out`` fitted by :func:`run`
    on a sample cut to what fits in ``seconds`` (``limit`` says what they are, for the log), or
    None. One log line says which, and why not: too few labelled photos, no place with two,
    no time, or a sample without a wrong (or a right) answer. A finished ``out`` fitted on
    this store with these settings is kept, and the sample chosen is kept in ``work`` so that a
    killed calibration resumes with the same one (``overwrite``: neither is).
    """
    out, work, store = Path(out), Path(work), open_store(index_store)
    labelled = [i for i in store.ids if i in labels]
    places = pd.Series([labels[i] for i in labelled], dtype=object).value_counts()
    if len(labelled) < MIN_SAMPLE:
        return _without(f"the index has {len(labelled)} labelled photos, fewer than the {MIN_SAMPLE} a "
                        "leave-one-out fit needs")
    if places.max() < 2:
        return _without("every place in the index has a single photo, so no left-out photo can be found right")
    settings = {"aggregation": config.predict.aggregation, "top_k": config.predict.top_k,
                "depth": loo_depth(config), "store": store_key(store)}
    kept = read_json(out).get("settings", {}) if out.is_file() and not overwrite else {}
    if kept and all(kept.get(key) == value for key, value in settings.items()):
        log.info("calibration: kept %s (fitted on this index with these settings)", out)
        return out
    wanted = min(config.calibrate.sample or len(labelled), len(labelled))
    plan = _sample_plan(config, store, labels, work, seconds, jobs, wanted, index_images, overwrite)
    if plan["sample"] < MIN_SAMPLE:
        return _without(f"{limit} ({max(seconds, 0):.0f} s) fits {plan['sample']} leave-one-out queries (at "
                        f"{plan['query_seconds']:.2f} s each), fewer than the {MIN_SAMPLE} a fit needs; "
                        f"{remedy} fits one without this limit")
    sampled = copy.deepcopy(config)
    sampled.calibrate.sample = plan["sample"] if plan["sample"] < len(store) else 0
    start = time.monotonic()
    try:
        with _muted():
            run(sampled, index_store, labels, out, work=work, jobs=jobs, index_images=index_images,
                non_landmarks=non_landmarks, table=False)
    except calibration.CalibrationError as error:
        side, other = ("right", "wrong") if error.right else ("wrong", "right")
        cut = f" (a sample of the {len(labelled)}: what fits {limit})" if error.total < len(labelled) else ""
        return _without(f"all {error.total} leave-one-out answers{cut} were {side}, so there is no {other} one to "
                        "learn from" + (" (places with a single photo give some)" if error.right else ""))
    fitted = read_json(out)["settings"]
    log.info("calibration: P(right) fitted by leave-one-out on %d index photos (%d right, %d wrong) in %.1f s; "
             "confidences are probabilities (%s)", fitted["sample"], fitted["right"],
             fitted["sample"] - fitted["right"], time.monotonic() - start, out)
    return out


def _without(reason: str) -> None:
    log.info("no calibration: %s; confidences are scores", reason)


def store_key(store: FeatureStore) -> str:
    """What a calibration was fitted on: the store's settings fingerprint and its image count."""
    return f"{store.manifest().get('fingerprint')}:{len(store)}"


def _sample_plan(config: Config, store: FeatureStore, labels: dict[str, str], work: Path, seconds: float, jobs: int,
                 wanted: int, index_images: str | Path | None, overwrite: bool) -> dict:
    """{"sample", "query_seconds"}: how many leave-one-out queries fit in ``seconds``, timed on
    PROBE_QUERIES of them as the leave-one-out runs them; kept in ``work/automatic.json``."""
    path = work / "automatic.json"
    if not overwrite and path.is_file() and read_json(path).get("store") == store_key(store):
        return read_json(path)
    loo = loo_config(config)
    depth = max(loo.rerank.num_to_rerank, 1)
    pair_seconds = 0.0
    if loo.rerank.num_to_rerank > 0 and seconds > 0:
        probe_ids = sample_ids(store.ids, PROBE_QUERIES, config.calibrate.seed + 1)
        probe = loo_shortlist(loo, store, probe_ids, labels)
        wanted_ids = candidate_ids(top_candidates(probe, depth))
        local = extract.candidate_local_store(loo, store.path, wanted_ids, index_images)
        pair_seconds, _ = measure_pair_seconds(loo.rerank, probe, store.path, local, PROBE_QUERIES * depth,
                                               max_seconds=max(seconds / 4, 1.0))
    plan = {"store": store_key(store), "query_seconds": pair_seconds * depth,
            "sample": affordable_depth(seconds, pair_seconds, depth, jobs, wanted)}
    write_json_atomic(path, plan)
    return plan


@contextmanager
def _muted() -> Iterator[None]:
    """The package's INFO lines (progress, the inner rerank) held back, unless debugging."""
    package = logging.getLogger("delf_pipeline")
    level = package.level
    if package.getEffectiveLevel() > logging.DEBUG:
        package.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package.setLevel(level)


def nonlandmark_store(config: Config, index_store: Path, images: Path, out: Path) -> Path:
    """Global descriptors of the non-landmark ``images`` in the index's feature space (its codebook)."""
    globals_only = copy.deepcopy(config)
    globals_only.extract.local_features = False
    codebook = index_store / "codebook.npy"
    return extract.run(globals_only, images, out, codebook=codebook if codebook.exists() else None)


def loo_evidence(config: Config, index_store: str | Path | FeatureStore, labels: dict[str, str], work: Path, *,
                 jobs: int = 1, index_images: str | Path | None = None) -> pd.DataFrame:
    """Best-class evidence rows of the leave-one-out sample, with a ``right`` column (bool)."""
    candidates = loo_candidates(config, index_store, work, jobs=jobs, index_images=index_images, labels=labels)
    best = predicted_classes(config, candidates, labels)
    return best.assign(right=[labels.get(q) == label for q, label in zip(best["query_id"], best["label"])])


def loo_candidates(config: Config, index_store: str | Path | FeatureStore, work: Path, *, jobs: int = 1,
                   index_images: str | Path | None = None, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Candidate table (aggregation.CANDIDATE_COLUMNS) of the sampled index images as queries.

    The shortlist is searched as the shortlist stage searches (the index's whitening / DBA,
    ``labels`` for the supervised ones, and query expansion), so its scores are on the scale
    the calibration is applied to.
    """
    index = open_store(index_store)
    ids = sample_ids(index.ids, config.calibrate.sample, config.calibrate.seed)
    loo = loo_config(config)
    key = {"ids": ids, "shortlist": loo.shortlist, "index": (index.manifest().get("fingerprint"), len(index)),
           "depth": loo.rerank.num_to_rerank}
    if "supervised" in (loo.shortlist.whitening, loo.shortlist.dba):
        key["labels"] = sorted((labels or {}).items())  # supervised whitening / DBA learn from them
    work = work / f"loo-{fingerprint(key)}"  # a new sample (or other settings), a new folder
    shortlist_csv = work / "shortlist.csv"
    if not shortlist_csv.exists():
        write_text_atomic(shortlist_csv, loo_shortlist(loo, index, ids, labels).to_csv(index=False))
    ranked = read_table(shortlist_csv)
    rerank_csv = None
    if loo.rerank.num_to_rerank > 0:
        wanted = candidate_ids(top_candidates(ranked, loo.rerank.num_to_rerank))
        local_store = extract.candidate_local_store(loo, index, wanted, index_images)
        rerank_csv = rerank.run(loo, shortlist_csv, index, local_store, work / "rerank.csv", jobs=jobs,
                                index_labels=labels or {}, query_images=index_images, query_split="train",
                                index_images=index_images, index_split="train")
    return aggregation.candidate_table(ranked, read_table(rerank_csv) if rerank_csv else None)


def loo_config(config: Config) -> Config:
    """``config`` as the leave-one-out runs it: an image never shortlisted for itself, and
    :func:`loo_depth` candidates verified per query."""
    loo = copy.deepcopy(config)
    loo.shortlist.exclude_same_id = True
    loo.rerank.num_to_rerank = loo_depth(config)
    return loo


def loo_depth(config: Config) -> int:
    """Candidates verified per leave-one-out query: calibrate.depth, at most rerank.num_to_rerank."""
    configured = config.rerank.num_to_rerank
    return min(config.calibrate.depth, configured) if config.calibrate.depth > 0 else configured


def loo_shortlist(loo: Config, index: FeatureStore, ids: list[str], labels: dict[str, str] | None) -> pd.DataFrame:
    """Shortlist rows of the index images ``ids`` as queries against the index (``loo``: :func:`loo_config`)."""
    matmul = select_matmul(loo.shortlist.device)
    searched, whitening = prepare_index(index, loo.shortlist, labels, matmul)
    return shortlist.shortlist_blocks(index, [ids], searched, loo.shortlist, matmul, whitening)[0]


def predicted_classes(config: Config, candidates: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """Best-class evidence row per query under ``predict.aggregation`` and ``predict.top_k``."""
    conf = config.predict
    return aggregation.best_classes(aggregation.class_evidence(candidates, labels, conf.top_k, conf.aggregation))


def sample_ids(ids: list[str], size: int, seed: int) -> list[str]:
    """``size`` ids drawn without replacement with ``seed`` (all of them when size is 0 or larger), sorted."""
    if size <= 0 or size >= len(ids):
        return sorted(ids)
    chosen = np.random.default_rng(seed).choice(len(ids), size=size, replace=False)
    return sorted(ids[i] for i in chosen)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="feature store of the index images")
    parser.add_argument("--index-labels", required=True, help="CSV with id,landmark_id of the index images")
    parser.add_argument("--out", help="calibration file to write (default: calibration.json beside the index store)")
    parser.add_argument("--work", help="folder of the leave-one-out shortlist and rerank (default: beside --out)")
    parser.add_argument("--index-images", help="the index images: the leave-one-out's cascade (asift fallback) "
                        "reads them, and --index of global descriptors only needs them")
    parser.add_argument("--non-landmarks", metavar="DIR",
                        help="folder of images without a landmark: closeness to them becomes a calibration feature")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = config_of(args)
    out = Path(args.out) if args.out else Path(args.index).parent / "calibration.json"
    run(config, args.index, read_labels(args.index_labels), out, work=args.work, jobs=args.jobs,
        index_images=args.index_images, non_landmarks=args.non_landmarks)
    return 0
