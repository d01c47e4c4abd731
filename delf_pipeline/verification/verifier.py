"""Verification of a query's shortlisted candidates: each (query, candidate) pair matched and
fitted with :func:`.pairs.verify_pair` (or LighterGlue's matches with :func:`.pairs.verify_matches`),
then scored.

Scoring (``rerank.scoring``):

* ``official`` (DELF/DELG retrieval): order by (inliers, global score). The score column
  is ``inliers + global_score / 2``, which sorts exactly that way since |global| <= 1.
* ``kaggle2020`` (host baseline): ``min(inliers, M) / M + global_score``, M = max_inlier_score.

Inlier counts below ``min_inliers`` count as 0: unrelated pairs still get a handful of
"inliers" from every RANSAC variant (see docs/design.md), which must not raise their score.

Adaptive depth (``rerank.first_depth`` > 0): the first ``first_depth`` candidates are verified,
and the rest of the ``num_to_rerank`` only when the best of them has fewer than
``decided_inliers`` inliers (:func:`first_round`, :func:`decided`); a query's rows are the
candidates verified, so their number is the depth it used. Each pair is verified alike whatever
else is (same seed), so a query that goes on gets the rows of a full-depth run, and one that
stops gets that run's rows of its first candidates.

The pairs are matched in one BLAS thread (:func:`delf_pipeline.utils.threads.one_blas_thread`):
the same results, several times faster on a loaded machine than with OpenBLAS's threads.

With ``rerank.cascade`` set, a second stage re-verifies the few candidates that can still change
the answer (:mod:`.cascade`): it needs the index labels (classes) and, for ``views``, the
query's image.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from ..config import DEFAULTS, ExtractSettings, RerankSettings, with_recorded
from ..extractors.build import vlad_backend, view_extractor
from ..extractors.views import ViewExtractor
from ..formats.features import ImageFeatures
from ..formats.store import FeatureStore, open_store
from ..utils.threads import one_blas_thread
from .cascade import (
    AsiftFallback,
    GlueStage,
    QuerySide,
    ViewFeatures,
    ViewsStage,
    combine,
    counted,
    fallback_counted,
    select,
    undecided,
    xfeat_of,
)
from .matching import MATCHERS
from .pairs import PairResult, fit_matches, match_and_fit, resolve_options, verify_options

COLUMNS = ("query_id", "index_id", "global_score", "matches", "inliers", "score", "status")
RELEASE_EVERY = 256  # candidates read between two releases of the stores' mapped pages
GLUE_MATCHED_BY = "LighterGlue on XFeat features (cascade)"  # how a pair of the cascade's lighterglue stage is matched
ASIFT_MATCHED_BY = "RootSIFT on affine views of both images (cascade fallback)"  # and one of its asift fallback


def by_glue_stage(status: str) -> bool:
    """Whether a rerank row's ``status`` says the cascade's LighterGlue stage counted its pair."""
    return status.startswith(f"{GlueStage.name}:")


def fast_counted(inliers: int, conf: RerankSettings) -> int:
    """A fast-path inlier count as the score counts it: 0 below ``conf.min_inliers``."""
    return inliers if inliers >= conf.min_inliers else 0


@dataclass
class VerifiedPair:
    """A (query, candidate) pair verified again as its rerank row was (:meth:`CandidateVerifier.verify_row`).

    result: its matches, ``match_indices`` [M, 2] rows of ``query`` and ``candidate`` (the
        features it matched, locations [N, 2] (y, x) in original-image pixels), ``inlier_mask`` [M].
    matched_by: how, in words; stage: the cascade's second stage that verified it ("lighterglue"),
        "" for the fast path.
    """

    index_id: str
    result: PairResult
    query: ImageFeatures
    candidate: ImageFeatures
    matched_by: str
    stage: str = ""

    @property
    def status(self) -> str:
        """The status its rerank row has: ``STAGE:STATUS`` for a second stage's pair."""
        return f"{self.stage}:{self.result.status}" if self.stage else self.result.status

    def counted(self, conf: RerankSettings) -> int:
        """Its inliers as the score counts them under the rerank settings ``conf`` (0 under the
        floor of its stage); the rerank row's count unless a cascade rule other than replace
        combined it with the fast count."""
        if self.stage == AsiftFallback.name:
            return fallback_counted(self.result.inliers, conf)
        return counted(self.result.inliers, conf) if self.stage else fast_counted(self.result.inliers, conf)


class CandidateVerifier:
    """Verifies the candidates of queries against one index store, keeping recently used index
    features in memory (a bounded cache: an index image shared by many queries is read once)."""

    def __init__(self, query_store: str | Path | FeatureStore | None, index_store: str | Path | FeatureStore,
                 conf: RerankSettings, cache_images: int = 2000):
        self.queries = open_store(query_store) if query_store is not None else None  # None: queries given in memory
        self.index = open_store(index_store)
        self.conf = conf
        self.seed = int(conf.seed)
        self.settings = resolve_options({k: v for k, v in verify_options(conf).items() if k != "seed"})
        stores = [s for s in (self.queries, self.index) if s is not None]
        check_cascade(conf)
        glue = learned_matcher(conf, stores)
        self.glue = glue if conf.matcher == "lighterglue" else None
        self.second = second_stage(conf, glue)
        self.fallback = AsiftFallback(conf) if conf.cascade_fallback else None  # runs within a cascade only
        self.views: ViewExtractor | None = (view_extractor(store_settings(stores[0]), conf.cascade_tilts)
                                            if conf.cascade == "views" else None)
        self.cache: OrderedDict[str, ImageFeatures] = OrderedDict()
        self.cache_images = cache_images
        self.reads_since_release = 0

    def index_features(self, image_id: str) -> ImageFeatures:
        """Local features of an index image, read from the store once while cached."""
        if image_id in self.cache:
            self.cache.move_to_end(image_id)
            return self.cache[image_id]
        features = self.index.features(image_id)
        self.cache[image_id] = features
        if len(self.cache) > self.cache_images:
            self.cache.popitem(last=False)
        return features

    def rerank_block(self, block: dict[str, list[tuple[str, float]]], labels: dict[str, str] | None = None,
                     query_paths: Mapping[str, str] | None = None,
                     index_paths: Mapping[str, str] | None = None) -> pd.DataFrame:
        """Rows (COLUMNS) for every (query, candidate) of the block. The cascade's selection needs
        ``labels`` (index id -> landmark; None: every candidate a class of its own), its views
        stage ``query_paths`` (query id -> image file) and its asift fallback both those and
        ``index_paths`` (index id -> image file)."""
        rows = [row for query_id, cands in block.items()
                for row in self.rerank_query(query_id, cands, labels,
                                             query_paths.get(query_id) if query_paths is not None else None,
                                             index_paths)]
        return pd.DataFrame(rows, columns=list(COLUMNS))

    def rerank_query(self, query_id: str, candidates: list[tuple[str, float]], labels: dict[str, str] | None = None,
                     query_path: str | None = None, index_paths: Mapping[str, str] | None = None) -> list[tuple]:
        """Verify one stored query against its candidates; rows sorted by score descending.
        ``labels``, ``query_path`` (its image file) and ``index_paths`` serve the cascade
        (:meth:`rerank_block`).

        Every RELEASE_EVERY candidates the stores' mapped pages are released, so the worker's
        resident memory is bounded by that many reads, not by the union of its candidates
        (releasing after every query cost more: each query's candidates were mapped anew)."""
        size = self.queries.size(query_id) if self.glue is not None or self.second is not None else None
        views = None
        if self.views is not None:
            views = (lambda: self.views.of_file(query_path)) if query_path else lambda: _no_image(query_id)
        rows = self.rerank_features(query_id, self.stored_query(query_id), candidates, size, labels=labels,
                                    views=views, query_path=query_path, index_paths=index_paths)
        self.reads_since_release += len(rows)
        if self.reads_since_release >= RELEASE_EVERY:
            self.queries.release()
            self.index.release()
            self.reads_since_release = 0
        return rows

    def stored_query(self, query_id: str) -> ImageFeatures:
        """A query's stored features, with its kept VLAD local features when the cascade matches them."""
        return self._with_kept(self.queries, query_id, self.queries.features(query_id))

    def second_candidate(self, index_id: str) -> ImageFeatures:
        """An index image's features as the cascade's second stage sees them: with its kept VLAD
        local features when the stage matches them (lighterglue)."""
        return self._with_kept(self.index, index_id, self.index_features(index_id))

    def _with_kept(self, store: FeatureStore, image_id: str, features: ImageFeatures) -> ImageFeatures:
        if self.second is None or self.second.name != "lighterglue":
            return features
        return replace(features, vlad_locals=store.vlad_locals(image_id))

    def rerank_features(self, query_id: str, query: ImageFeatures, candidates: list[tuple[str, float]],
                        query_size: tuple[int, int] | None = None, *, labels: dict[str, str] | None = None,
                        views: Callable[[], ViewFeatures] | None = None, query_path: str | None = None,
                        index_paths: Mapping[str, str] | None = None) -> list[tuple]:
        """:meth:`rerank_query` of a query whose features are given (in original-image pixels;
        ``query_size``, its original (height, width), is needed by lighterglue, as matcher or
        second stage). ``views``: () -> the query's view features (the cascade's views stage);
        ``query_path`` and ``index_paths`` (index id -> file): the image files of the asift
        fallback, which is skipped for a pair without both.
        ``candidates`` in shortlist order: with adaptive depth, the first ones are verified first."""
        with one_blas_thread():
            first = first_round(self.conf, len(candidates))
            rows = [self.verify_candidate(query_id, query, candidate, query_size) for candidate in candidates[:first]]
            if first < len(candidates) and not decided(rows, self.conf):
                rows += [self.verify_candidate(query_id, query, candidate, query_size)
                         for candidate in candidates[first:]]
            rows.sort(key=lambda row: (-row[5], row[1]))
            if self.second is not None:
                rows = self.cascade(rows, QuerySide(query, query_size, views, query_path), labels, index_paths)
        return rows

    def verify_candidate(self, query_id: str, query: ImageFeatures, candidate: tuple[str, float],
                         query_size: tuple[int, int] | None) -> tuple:
        """The row (COLUMNS) of one (query, (index id, global score)) pair by the fast path."""
        index_id, global_score = candidate
        sizes = (query_size, self.index.size(index_id)) if self.glue is not None else None
        result = self.verify(query, self.index_features(index_id), sizes)
        inliers = fast_counted(result.inliers, self.conf)
        score = final_score(inliers, global_score, self.conf)
        return (query_id, index_id, global_score, result.matches, inliers, score, result.status)

    def cascade(self, rows: list[tuple], query: QuerySide, labels: dict[str, str] | None,
                index_paths: Mapping[str, str] | None = None) -> list[tuple]:
        """The fast ``rows`` (sorted) with the second stage's verdict on the selected candidates
        (:func:`.cascade.select`, combined by :func:`.cascade.combine`), then the fallback's where
        the query is still undecided (:meth:`fall_back`), sorted again."""
        conf = self.conf
        chosen = select([row[1] for row in rows], [row[5] for row in rows], [row[4] for row in rows], labels,
                        conf.cascade_pairs, conf.cascade_margin, conf.cascade_inliers,
                        best_global=max((row[2] for row in rows), default=0.0), min_global=conf.cascade_min_global)
        for position in chosen:
            query_id, index_id, global_score, _, fast, _, _ = rows[position]
            result = self.second.verify(query, self.second_candidate(index_id), self.index.size(index_id))
            second = counted(result.inliers, conf)
            inliers = combine(fast, second, conf.cascade_rule)
            rows[position] = (query_id, index_id, global_score, result.matches, inliers,
                              final_score(inliers, global_score, conf), f"{self.second.name}:{result.status}")
        if chosen and self.fallback is not None and undecided([row[4] for row in rows], conf):
            self.fall_back(rows, chosen, query.path, index_paths if index_paths is not None else {})
        return sorted(rows, key=lambda row: (-row[5], row[1])) if chosen else rows

    def fall_back(self, rows: list[tuple], chosen: list[int], query_path: str | None,
                  index_paths: Mapping[str, str]) -> None:
        """The asift fallback on the ``chosen`` positions of ``rows`` (changed in place): a row
        becomes the fallback's where its count (0 under fallback_min_inliers) is the larger; the first
        ``fallback_pairs`` of them only."""
        for position in chosen[:self.conf.fallback_pairs]:
            query_id, index_id, global_score, _, inliers, _, _ = rows[position]
            path = index_paths.get(index_id)
            result = self.fallback.verify(query_path, path) if query_path and path else None
            count = fallback_counted(result.inliers, self.conf) if result is not None else 0
            if count <= inliers:
                continue
            rows[position] = (query_id, index_id, global_score, result.matches, count,
                              final_score(count, global_score, self.conf), f"{self.fallback.name}:{result.status}")

    def verify_row(self, query: QuerySide, index_id: str, status: str, index_path: str | None = None) -> VerifiedPair:
        """(query, ``index_id``) verified again as its rerank row's ``status`` says: by the cascade's
        LighterGlue stage for ``lighterglue:...`` (both images' XFeat features: ``query.features``
        carry the query's kept ones, as :meth:`stored_query` reads them), by the asift fallback for
        ``asift:...`` (from ``query.path`` and ``index_path``, the images' files; ValueError
        without them), else by the fast path (same seed, so the same matches)."""
        if status.startswith(f"{AsiftFallback.name}:"):
            return self.verify_by_fallback(query, index_id, index_path)
        size = self.index.size(index_id)
        if by_glue_stage(status) and self.second is not None:
            candidate = self.second_candidate(index_id)
            result = self.second.verify(query, candidate, size)
            return VerifiedPair(index_id, result, xfeat_of(query.features), xfeat_of(candidate), GLUE_MATCHED_BY,
                                self.second.name)
        candidate = self.index_features(index_id)
        result = self.verify(query.features, candidate, (query.size, size))
        return VerifiedPair(index_id, result, query.features, candidate, f"{self.conf.matcher} matching")

    def verify_by_fallback(self, query: QuerySide, index_id: str, index_path: str | None) -> VerifiedPair:
        """(query, ``index_id``) verified again by the asift fallback, from both images' files."""
        fallback = self.fallback or AsiftFallback(self.conf)
        result = fallback.verify(query.path, index_path) if query.path and index_path else None
        if result is None:
            raise ValueError(f"{index_id} was verified by the cascade's asift fallback, which reads both images: "
                             "give the images (--data)")
        return VerifiedPair(index_id, result, fallback.features(query.path), fallback.features(index_path),
                            ASIFT_MATCHED_BY, fallback.name)

    def verify(self, query: ImageFeatures, candidate: ImageFeatures,
               sizes: tuple[tuple[int, int] | None, tuple[int, int]] | None = None) -> PairResult:
        """:func:`verify_pair` of two images; 0 matches when a side has no features (a store
        part whose images all have none holds descriptors [0, 0], of another dimension).
        With the lighterglue matcher, its matches go to the same verifier; it needs ``sizes``,
        the original (height, width) of the query and of the candidate."""
        if not query.num_features or not candidate.num_features:
            return PairResult(0, 0, "too_few_matches", np.zeros((0, 2), np.int64), np.zeros(0, bool))
        if self.glue is not None:
            if sizes is None or sizes[0] is None:
                raise ValueError("rerank.matcher = 'lighterglue' needs the original (height, width) of both images")
            pairs = self.glue.match_stored(query.locations, query.descriptors, sizes[0],
                                           candidate.locations, candidate.descriptors, sizes[1])
            return fit_matches(query.locations, candidate.locations, pairs, self.settings, self.seed)
        return match_and_fit(query.locations, query.descriptors, candidate.locations, candidate.descriptors,
                             self.settings, self.seed)


def learned_matcher(conf: RerankSettings, stores: list[FeatureStore]):
    """The LighterGlue model when ``conf.matcher`` or ``conf.cascade`` is ``lighterglue`` (else
    None), once every store in ``stores`` is checked to hold XFeat local features (ValueError
    naming it if not): as its local features or, for the cascade, kept beside a model's own
    (``extract.keep_vlad_locals``). Its weights come from the folder the last store was extracted
    with (``extract.xfeat_weights``, as a Kaggle bundle sets it), else from the cache."""
    key = "matcher" if conf.matcher == "lighterglue" else "cascade" if conf.cascade == "lighterglue" else None
    if key is None:
        return None
    for store in stores:
        settings = store_settings(store)
        local = settings.local_backend or settings.backend
        if local != "xfeat" and not (key == "cascade" and keeps_xfeat(store, settings)):
            raise ValueError(no_xfeat_features(key, store, local))
    from .lighterglue import load_xfeat_lighterglue

    return load_xfeat_lighterglue(settings.xfeat_weights or None)


def no_xfeat_features(key: str, store: FeatureStore, local: str) -> str:
    """The refusal of rerank.``key`` = lighterglue on ``store``, whose local features are ``local``'s."""
    fix = "extract.backend / extract.local_backend must be xfeat"
    if key == "cascade":
        fix += (" or, for the cascade, a model's fused with the VLAD of XFeat features kept beside its own "
                "(extract.vlad_backend = xfeat, keep_vlad_locals = true), or turn the cascade off: "
                "--set rerank.cascade='\"\"'")
    return f"rerank.{key} = 'lighterglue' matches 64-d XFeat local features; {store.path} holds {local!r} ones: {fix}"


def keeps_xfeat(store: FeatureStore, settings: ExtractSettings) -> bool:
    """Whether ``store`` (made with ``settings``) keeps XFeat local features beside a model's own:
    its settings fuse the VLAD of XFeat's and every part holding local features has them (a
    store made before keep_vlad_locals existed has none, whatever its manifest says of the key;
    parts of global descriptors only need none)."""
    if not settings.keep_vlad_locals or settings.local_backend or vlad_backend(settings) != "xfeat":
        return False
    return all(part.has_vlad_locals for part in open_store(store).parts if part.num_features)


def store_settings(store: str | Path | FeatureStore) -> ExtractSettings:
    """The ``extract`` settings a feature store (opened, or its path) was made with (its manifest)."""
    store = open_store(store)
    return with_recorded(DEFAULTS, "extract", store.manifest()["settings"], str(store.path / "manifest.json")).extract


def check_cascade(conf: RerankSettings) -> None:
    """ValueError when ``conf`` has a cascade on a fast path that is not a descriptor matcher (the
    cascade's first stage is the fast path)."""
    if conf.cascade and conf.matcher not in MATCHERS:
        raise ValueError(f"rerank.cascade = {conf.cascade!r} adds a second stage to the fast path, whose matcher must "
                         f"be one of {', '.join(MATCHERS)} (rerank.matcher is {conf.matcher!r})")


def second_stage(conf: RerankSettings, glue) -> ViewsStage | GlueStage | None:
    """The cascade's second stage of ``conf`` (None without one); ``glue``: the LighterGlue model
    (:func:`learned_matcher`) when the stage is lighterglue."""
    if not conf.cascade:
        return None
    check_cascade(conf)
    options = verify_options(conf)
    return ViewsStage(options) if conf.cascade == "views" else GlueStage(glue, options)


def _no_image(query_id: str):
    raise ValueError(f"rerank.cascade = 'views' extracts the query's views from its image, and query {query_id!r} has "
                     "none among the query images given (`delf-pipeline rerank --query-images`, as `run` gives)")


def first_round(conf: RerankSettings, candidates: int) -> int:
    """How many of a query's ``candidates`` (its ``num_to_rerank`` best, or fewer) are verified
    before the query may stop: ``conf.first_depth``, all of them when it is 0 or larger."""
    return min(conf.first_depth, candidates) if conf.first_depth > 0 else candidates


def decided(rows: list[tuple], conf: RerankSettings) -> bool:
    """Whether the verified ``rows`` (COLUMNS) decide the query: the best has at least
    ``conf.decided_inliers`` inliers (counted as the score counts them, after min_inliers)."""
    return max((row[4] for row in rows), default=0) >= conf.decided_inliers


def final_score(inliers: int, global_score: float, conf: RerankSettings) -> float:
    """Score of a verified candidate under ``conf.scoring`` (see module docstring)."""
    if conf.scoring == "official":
        return inliers + global_score / 2.0
    if conf.scoring == "kaggle2020":
        cap = conf.max_inlier_score
        return min(inliers, cap) / cap + global_score
    raise ValueError(f"unknown rerank.scoring {conf.scoring!r}; use official or kaggle2020")
