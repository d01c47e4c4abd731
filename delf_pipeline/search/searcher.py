"""Search by photo: a :class:`Searcher` loads an index folder once (its extractor and codebook,
the global descriptor matrix in memory, the labels), then answers one photo at a time with
the stages' own cores, in memory instead of through files:

1. decode: the photo as the index's extraction decodes (same mode and size limit);
2. extract: the index's backend, locations mapped back to original pixels (as stored);
3. shortlist: one matrix product against the index matrix, top ``shortlist.top_k`` (with the
   index's whitening / DBA / query expansion / SuperGlobal settings, as the shortlist stage applies them);
4. rerank: the ``rerank.num_to_rerank`` best (:func:`.formats.candidates.top_candidates`)
   verified by a :class:`.verification.verifier.CandidateVerifier` with the index's rerank settings
   (a cascade's views stage extracts the photo's simulated views here, from the decoded photo);
5. answer: the final ranking and per-class evidence of :mod:`delf_pipeline.evidence.aggregation`,
   as ``predict`` makes them.

The answer (:meth:`Answer.to_json`) lists the best landmarks with their pooled score (what
``submission.csv`` reports without a calibration) and, when the index keeps a
``calibration.json``, their confidence: P(right), the probability that the landmark is the
right answer; then the best candidates with their global score and inliers, and how long
each step took. ``delf-pipeline query`` and ``serve`` are its front ends.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ..config import PredictSettings
from ..descriptors.derived import prepare_index
from ..descriptors.expansion import expand_in_memory
from ..descriptors.superglobal import rerank_rows
from ..evidence.aggregation import candidate_table, class_evidence
from ..evidence.calibration import Calibration, load_checked
from ..extractors.build import build, decode_mode, recorded_model
from ..extractors.codebook import stored_codebook
from ..extractors.stream import as_stored
from ..formats.candidates import top_candidates
from ..formats.features import ImageFeatures
from ..formats.images import decode_bytes
from ..formats.index_folder import Index, open_index
from ..retrieval.search import select_matmul, top_k_in_memory
from ..verification.cascade import QuerySide
from ..verification.verifier import COLUMNS as RERANK_COLUMNS
from ..utils.artifacts import rebuild_advice
from ..verification.verifier import CandidateVerifier, VerifiedPair

log = logging.getLogger("delf_pipeline.search")

STEPS = ("decode", "extract", "shortlist", "rerank", "answer")
QUERY_ID = "photo"  # the query's id in the stage tables (never written anywhere)
MAX_PIXELS = 50_000_000  # larger claimed sizes are refused before decoding (decompression bombs)


@dataclass
class Answer:
    """The answer for one photo.

    landmarks: best first, dicts ``landmark_id, score, confidence, candidates`` (ids of the voters);
        ``confidence`` (P(right), 0..1) only when ``calibrated``.
    candidates: best first, dicts ``rank, index_id, landmark_id, global_score, matches,
        inliers, score, status`` (matches/inliers -1 and status "not verified" past the rerank).
    timings: seconds per step of :data:`STEPS`.
    image: the decoded photo, uint8 [H, W] or [H, W, 3]; factors [2] (y, x) to original pixels.
    features: its features in original-image pixels.
    size: the original (height, width) of the photo.
    """

    photo: str
    landmarks: list[dict]
    candidates: list[dict]
    timings: dict[str, float]
    image: np.ndarray = field(repr=False)
    factors: np.ndarray = field(repr=False)
    features: ImageFeatures = field(repr=False)
    size: tuple[int, int] = (0, 0)
    calibrated: bool = False

    def to_json(self) -> dict:
        """What ``query --json`` prints and ``POST /query`` returns for this photo."""
        return {"photo": self.photo, "calibrated": self.calibrated, "landmarks": self.landmarks,
                "candidates": self.candidates,
                "timings_ms": {step: round(seconds * 1000, 1) for step, seconds in self.timings.items()}}


def index_calibration(path: Path, predict_conf: PredictSettings) -> Calibration | None:
    """The calibration an index keeps (checked against its predict settings), or None when it
    keeps none or one that needs a non-landmark store (that store is not part of an index)."""
    if not path.is_file():
        return None
    fitted = load_checked(path, predict_conf)
    if "nonlandmark" in fitted.features:
        log.warning("%s uses non-landmark images, whose store is not in the index: confidences stay raw scores", path)
        return None
    return fitted


class Searcher:
    """An index loaded once, answering photos (see the module docstring).

    Thread-safe: each thread verifies with its own :class:`CandidateVerifier` (and feature cache).
    """

    def __init__(self, index: str | Path, *, top_candidates: int = 10, max_pixels: int = MAX_PIXELS):
        self.index: Index = open_index(index)
        self.config = self.index.config
        self.top_candidates = top_candidates
        self.max_pixels = max_pixels
        conf = recorded_model(self.config.extract, self.index.store.manifest(), self.index.path / "model")  # a built-in model: the build's export
        self.extract = build(conf, stored_codebook(self.index.store_path))
        self.ids = self.index.store.ids
        self.matmul = select_matmul(self.config.shortlist.device)
        self.labels = self.index.labels
        searched, self.whitening = prepare_index(self.index.store, self.config.shortlist, self.labels, self.matmul)
        self.matrix = searched.global_matrix()  # [M, G] float32, whitened / augmented if so configured
        with rebuild_advice(f"`delf-pipeline index build --out {self.index.path} --overwrite`"):
            searched.refuse_non_finite(self.matrix)  # one pass over the matrix just read
        self.calibration = index_calibration(self.index.path / "calibration.json", self.config.predict)
        self._local = threading.local()
        log.info("index %s: %d images, global matrix %s (%.0f MB in memory)", self.index.path.name, len(self.ids),
                 self.matrix.shape, self.matrix.nbytes / 1e6)

    def worker(self) -> CandidateVerifier:
        """This thread's verifier over the index store."""
        if not hasattr(self._local, "worker"):
            self._local.worker = CandidateVerifier(None, str(self.index.store_path), self.config.rerank)
        return self._local.worker

    def search_file(self, path: str | Path) -> Answer:
        """:meth:`search` of an image file (named by its file name in the answer)."""
        return self.search(Path(path).read_bytes(), Path(path).name)

    def search(self, data: bytes, photo: str = "photo") -> Answer:
        """The answer for one encoded image; ImageError (with a reason) when it is unusable."""
        timings: dict[str, float] = {}
        conf = self.config.extract
        with _timed(timings, "decode"):
            image, factors = decode_bytes(data, conf.max_image_size, decode_mode(conf), self.max_pixels)
        with _timed(timings, "extract"):
            stored = as_stored(QUERY_ID, self.extract(image), image.shape, factors)
            features = stored.features
        with _timed(timings, "shortlist"):
            shortlist = self.shortlist(features)
        with _timed(timings, "rerank"):
            reranked = self.rerank(features, shortlist, stored.size, image=(image, factors))
        with _timed(timings, "answer"):
            landmarks, candidates = self.answer(shortlist, reranked)
        return Answer(photo, landmarks, candidates, timings, image, factors, features, stored.size,
                      self.calibration is not None)

    def shortlist(self, features: ImageFeatures) -> pd.DataFrame:
        """Shortlist rows ``query_id,index_id,rank,score`` of the photo (top ``shortlist.top_k``)."""
        if features.global_descriptor is None:
            raise ValueError(f"the index's backend {self.config.extract.backend!r} gives no global descriptor")
        conf = self.config.shortlist
        query = features.global_descriptor[None].astype(np.float32)
        if self.whitening is not None:
            query = self.whitening.apply(query)
        if conf.qe_top_n:
            query = expand_in_memory(query, self.matrix, conf, self.matmul)
        rows, scores = top_k_in_memory(query, self.matrix, max(conf.top_k, conf.superglobal_depth), self.matmul)
        if conf.superglobal_depth:
            rows, scores = rerank_rows(query, rows, scores, lambda found: self.matrix[found], conf.superglobal_depth,
                                       conf.superglobal_neighbours)
            rows, scores = rows[:, : conf.top_k], scores[:, : conf.top_k]
        return pd.DataFrame({"query_id": QUERY_ID, "index_id": [self.ids[r] for r in rows[0]],
                             "rank": np.arange(1, rows.shape[1] + 1), "score": scores[0]})

    def rerank(self, features: ImageFeatures, shortlist: pd.DataFrame, size: tuple[int, int],
               image: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
        """Rerank rows (rerank.COLUMNS) of the photo's ``num_to_rerank`` best candidates; ``size``
        is the photo's original (height, width). With ``rerank.cascade = "views"`` the views are
        extracted from ``image`` (the decoded photo and its factors to original pixels), in
        memory, only when the cascade selects a candidate."""
        if self.config.rerank.num_to_rerank <= 0 or shortlist.empty:
            return pd.DataFrame(columns=list(RERANK_COLUMNS))
        candidates = top_candidates(shortlist, self.config.rerank.num_to_rerank)[QUERY_ID]
        worker = self.worker()
        views = (lambda: worker.views.of_image(*image)) if worker.views is not None and image is not None else None
        rows = worker.rerank_features(QUERY_ID, features, candidates, size, labels=self.labels, views=views)
        return pd.DataFrame(rows, columns=list(RERANK_COLUMNS))

    def answer(self, shortlist: pd.DataFrame, reranked: pd.DataFrame) -> tuple[list[dict], list[dict]]:
        """(landmarks, candidates) of :class:`Answer` from the photo's shortlist and rerank rows.

        A landmark's score is its aggregated score; when the index keeps a calibration, its
        confidence is P(right) of its evidence (as ``predict`` computes for the best class of a query)."""
        ranking = candidate_table(shortlist, reranked if len(reranked) else None)
        conf = self.config.predict
        classes = class_evidence(ranking, self.labels, conf.top_k, conf.aggregation)
        voters = ranking[ranking["rank"] <= conf.top_k]
        calibrated = self.calibration is not None and len(classes) > 0
        probability = self.calibration.probability(classes) if calibrated else [None] * len(classes)
        landmarks = [{"landmark_id": label, "score": round(float(score), 6),
                      **({"confidence": round(float(p), 6)} if calibrated else {}),
                      "candidates": [i for i in voters["index_id"] if self.labels.get(i) == label]}
                     for label, score, p in zip(classes["label"], classes["score"], probability)]
        top = (ranking[ranking["rank"] <= self.top_candidates].drop(columns=["inliers"])
               .merge(reranked[["index_id", "matches", "inliers", "status"]], on="index_id", how="left"))
        candidates = [{
            "rank": int(row.rank), "index_id": row.index_id, "landmark_id": self.labels.get(row.index_id),
            "global_score": round(float(row.global_score), 6), "score": round(float(row.score), 6),
            "matches": -1 if pd.isna(row.matches) else int(row.matches),
            "inliers": -1 if pd.isna(row.inliers) else int(row.inliers),
            "status": "not verified" if pd.isna(row.status) else row.status,
        } for row in top.itertuples()]
        return landmarks, candidates

    def verify_best(self, answer: Answer) -> VerifiedPair | None:
        """The answer's best verified candidate verified again as the rerank verified it
        (:meth:`CandidateVerifier.verify_row`: by the cascade's LighterGlue stage when its row says
        so, on both images' XFeat features, else by the fast path); None when none was verified."""
        verified = [c for c in answer.candidates if c["inliers"] >= 0]
        if not verified:
            return None
        return self.worker().verify_row(QuerySide(answer.features, answer.size), verified[0]["index_id"],
                                        verified[0]["status"])


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start
