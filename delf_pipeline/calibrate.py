"""``delf-pipeline calibrate``: fit P(prediction right | evidence) from the index alone.

Leave-one-out over a seeded sample of index images: each one is a query against the rest of
the index (its own image excluded by ``shortlist.exclude_same_id``), through the real
shortlist and rerank, and its prediction (``predict.aggregation`` over ``predict.top_k``) is
right when it names the image's own landmark. An image whose place has no other photo in
the index can only be predicted wrong: such images act as non-landmark queries. A logistic
model (:mod:`delf_pipeline.evidence.calibration`) is fitted on the evidence of these
predictions and written to ``calibration.json`` (default: beside the index store), which
``predict`` then uses so that submission confidences are probabilities.

It also prints, per threshold of the fitted confidence, the precision, recall and F1 of "the
prediction is right" on the sample, and the threshold that maximises each: the F1 one is the
suggested ``predict.abstain`` (queries below it get an empty row). The sample's predictions
are in-sample for the fit, so these figures are optimistic on small samples.

``--non-landmarks DIR`` adds the closeness of each query to images without a landmark as a
feature (formula in :mod:`delf_pipeline.evidence.nonlandmarks`).

Work files (``loo-FINGERPRINT/shortlist.csv`` and ``rerank.csv``, the fingerprint naming the
sample and the shortlist settings) go to ``--work`` (default: ``calibration/`` beside the
output) and resume like the stages.
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import extract, rerank, shortlist
from .config import Config, add_config_arguments, config_of
from .descriptors.derived import prepare_index
from .evidence import aggregation, calibration
from .evidence.nonlandmarks import add_nonlandmark
from .formats.blocks import read_table
from .formats.candidates import candidate_ids, top_candidates
from .formats.store import FeatureStore, open_store
from .formats.tables import read_labels
from .retrieval.search import select_matmul
from .utils.artifacts import fingerprint, write_text_atomic

log = logging.getLogger("delf_pipeline.calibrate")

THRESHOLDS = np.round(np.arange(0.0, 1.0001, 0.05), 2)  # rows of the printed threshold table


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
) -> Path:
    """Fit and write ``out`` (calibration.json); returns ``out``.

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
                "seed": conf.seed, "l2": conf.l2}
    if non_landmarks:
        store = nonlandmark_store(config, index.path, Path(non_landmarks), work / "non_landmarks")
        evidence = add_nonlandmark(evidence, index, store)
        settings["non_landmarks"] = str(store.resolve())
    right = evidence["right"].to_numpy()
    settings.update(sample=len(evidence), right=int(right.sum()))
    fitted = calibration.fit(evidence, right, l2=conf.l2, settings=settings)
    probability = fitted.probability(evidence)
    table = calibration.threshold_table(probability, right, THRESHOLDS)
    chosen = calibration.chosen_thresholds(table)
    fitted.settings.update(thresholds=chosen,
                           reliability=calibration.reliability(probability, right).to_dict(orient="records"))
    write_text_atomic(out, fitted.to_json())
    print(describe(fitted, table, chosen))
    log.info("calibration %s: %d leave-one-out queries, %d right", out, len(evidence), int(right.sum()))
    return out


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
    loo = copy.deepcopy(config)
    loo.shortlist.exclude_same_id = True
    key = {"ids": ids, "shortlist": loo.shortlist, "index": (index.manifest().get("fingerprint"), len(index))}
    if "supervised" in (loo.shortlist.whitening, loo.shortlist.dba):
        key["labels"] = sorted((labels or {}).items())  # supervised whitening / DBA learn from them
    work = work / f"loo-{fingerprint(key)}"  # a new sample (or other settings), a new folder
    shortlist_csv = work / "shortlist.csv"
    if not shortlist_csv.exists():
        matmul = select_matmul(loo.shortlist.device)
        searched, whitening = prepare_index(index, loo.shortlist, labels, matmul)
        frame = shortlist.shortlist_blocks(index, [ids], searched, loo.shortlist, matmul, whitening)[0]
        write_text_atomic(shortlist_csv, frame.to_csv(index=False))
    ranked = read_table(shortlist_csv)
    rerank_csv = None
    if loo.rerank.num_to_rerank > 0:
        wanted = candidate_ids(top_candidates(ranked, loo.rerank.num_to_rerank))
        local_store = extract.candidate_local_store(loo, index, wanted, index_images)
        rerank_csv = rerank.run(loo, shortlist_csv, index, local_store, work / "rerank.csv", jobs=jobs)
    return aggregation.candidate_table(ranked, read_table(rerank_csv) if rerank_csv else None)


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


def describe(fitted: calibration.Calibration, table: pd.DataFrame, chosen: dict[str, float]) -> str:
    """The weights, the threshold table and the chosen thresholds as text."""
    weights = ", ".join(f"{n} {w:+.3f}" for n, w in zip(fitted.features, fitted.weights))
    lines = [f"P(right) = expit({weights}, bias {fitted.bias:+.3f})  (standardised features)",
             "", "| threshold | kept | precision | recall | F1 |", "|---|---|---|---|---|"]
    lines += [f"| {r.threshold:.2f} | {r.kept} | {r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} |"
              for r in table.itertuples()]
    lines.append("")
    lines.append("best threshold: " + ", ".join(f"{name} {value:.2f}" for name, value in chosen.items())
                 + f"  (suggested abstain threshold: --set predict.abstain={chosen['f1']:.2f})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="feature store of the index images")
    parser.add_argument("--index-labels", required=True, help="CSV with id,landmark_id of the index images")
    parser.add_argument("--out", help="calibration file to write (default: calibration.json beside the index store)")
    parser.add_argument("--work", help="folder of the leave-one-out shortlist and rerank (default: beside --out)")
    parser.add_argument("--index-images", help="index images, when --index holds global descriptors only")
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
