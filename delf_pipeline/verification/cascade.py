"""The verification cascade (issue 23.3): every shortlisted candidate is verified by the fast
path (descriptor matches + the preset's verifier, :func:`.pairs.verify_pair`); an expensive
second stage (``rerank.cascade``) runs only on the candidates that can still change the answer.

Selection (:func:`select`): the query's fast rows, best score first, are grouped by class (the
index image's landmark label; an image without a label is a class of its own). When the fast
path has not decided, the best candidate of each of the first ``cascade_pairs`` classes goes to
the second stage. Undecided: the best candidate's inliers are below ``cascade_inliers`` (within
the counts unrelated pairs reach, so the fast order is the global descriptor's order plus noise),
or the best class's score leads the next class's by less than ``cascade_margin`` (rerank score
units). With one class only nothing is selected, nor for a query whose best global similarity
(its shortlist's first score) is under ``cascade_min_global``. On the default's fused descriptor,
the landmark queries the cascade ran on had a best global similarity of 0.42 or more on the
landmarks_dev split, 0.44 or more on the hard task, while 24 of their 37 photos of no landmark
of the index were under 0.40 (``bench_cascade.py --gates``): there LighterGlue's counts on
unrelated structure (up to 32) only raised wrong confidences.

Second stages:

* ``views`` (:class:`ViewsStage`): the query's local features found on simulated affine views
  (tilts ``cascade_tilts``, :mod:`delf_pipeline.extractors.views`), each view matched to the
  candidate on its own (:func:`.matching.match_views`, the preset's matcher and ratio), then the
  preset's verifier. The candidate's stored features are used as they are: the index side stays
  one view. On the EVD pairs with image 1 as the query, tilts (1, 2, 4) lift the true pairs above
  every swapped pair from 4/15 to 11/15; with image 2 as the query (the hard task's direction)
  they stay at 5/15, where the stretching tilts (1, 0.5, 0.25), the default, reach 8/15 (and 7/15
  the other way). CPU: ~13-15x the fast path's per pair, plus the views' extraction.
* ``lighterglue`` (:class:`GlueStage`): XFeat's learned matcher on the stored XFeat features (an
  image's ``vlad_locals`` when its store kept them beside a model's own, as the default's does),
  then the preset's verifier (EVD: 9/15 with image 1 as the query, 5/15 with image 2; ~17-21x
  the fast path's CPU per pair).

Last stage (``cascade_fallback = "asift"``, :class:`AsiftFallback`): a query whose best
candidate is still under ``cascade_inliers`` after the second stage has the first
``fallback_pairs`` of its selected candidates matched once more, on RootSIFT of simulated
affine views of both images (ASIFT, tilts ``fallback_tilts``,
:mod:`delf_pipeline.extractors.views`), decoded from the image files at ``fallback_image_size``, mutual nearest neighbours with Lowe's ratio 0.8 and an affine MSAC at
20 px, as ``sift_default`` verifies (:data:`FALLBACK_VERIFY`). A candidate keeps the larger of its
count and the fallback's, which counts 0 under ``fallback_min_inliers``; the row is the
fallback's (status ``asift:STATUS``) only where its count is the larger. It needs both images'
files, so the rerank is given them (``run`` does); views on both sides are what lift the EVD pairs
that LighterGlue and one-sided views leave near the swapped pairs' counts (docs/benchmarks.md,
"Extreme viewpoints: EVD"). CPU on EVD: ~1.4 s per image (51 views at 640 px, ~10,000
features) and 1-2.5 s per pair.

Combination (``cascade_rule``): a selected candidate's inliers become the second stage's
(``replace``), the larger of both (``max``) or their sum (``sum``); a second-stage count below
``cascade_min_inliers`` (or ``min_inliers``, as for the fast path) counts 0 (:func:`counted`). Its
score is recomputed from them (``rerank.scoring``), its ``matches`` are the second stage's and its
status is ``STAGE:STATUS`` (``views:ok``).

Measured: benchmarks/bench_cascade.py on the ``xfeat`` preset (docs/benchmarks.md, "Verification
cascade": no setting beat its fast path beyond the interval), then benchmarks/quality.py on the
default, whose fused global descriptor brings the right place into the first classes of the hard
task's queries: there lighterglue on the XFeat features kept beside Lite0's, 10 classes, fast
path under 8 inliers, counts replaced, under 6 counting 0, is the default (docs/benchmarks.md,
"Dev table (issue 23)").
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..extractors.rootsift import extract_rootsift
from ..formats.features import ImageFeatures
from ..formats.images import ImageError, load_image
from .matching import match_views
from .pairs import PairResult, verify_matches, verify_pair

log = logging.getLogger("delf_pipeline.cascade")

SECOND_STAGES = ("views", "lighterglue")
RULES = ("replace", "max", "sum")
#: how the asift fallback verifies its matches: sift_default's rerank settings (configs/sift_default.toml)
FALLBACK_VERIFY = {"matcher": "mutual", "match_threshold": 0.9, "ratio": 0.8, "verifier": "msac_affine",
                   "residual_threshold": 20.0, "max_trials": 2000, "confidence": 0.99, "min_matches": 5}

ViewFeatures = tuple[ImageFeatures, np.ndarray]  # features of every view, [N] view index of each


@dataclass
class QuerySide:
    """The query as a second stage sees it: its stored features, its original (height, width),
    for ``views`` a function giving its view features (called once, when first needed) and, for
    the asift fallback, its image file."""

    features: ImageFeatures
    size: tuple[int, int] | None = None
    views: Callable[[], ViewFeatures] | None = None
    path: str | None = None  # its image file, for the asift fallback
    _views: ViewFeatures | None = field(default=None, repr=False)

    def view_features(self) -> ViewFeatures:
        if self._views is None:
            if self.views is None:
                raise ValueError("rerank.cascade = 'views' needs the query's image to extract its views: give the "
                                 "rerank the query images (`delf-pipeline rerank --query-images`, as `run` does)")
            self._views = self.views()
        return self._views


def select(index_ids: Sequence[str], scores: Sequence[float], inliers: Sequence[int], labels: dict[str, str] | None,
           pairs: int, margin: float, band: int, *, best_global: float = 1.0, min_global: float = 0.0) -> list[int]:
    """Positions (into ``index_ids``, the fast rows best score first, with their ``scores`` and
    ``inliers``) of the candidates the second stage verifies: the best candidate of each of the
    first ``pairs`` classes, when the fast path has not decided: the best class's score leads the
    next class's by less than ``margin``, or the best candidate has fewer than ``band`` inliers;
    else none, and none when one class is left or the query's best global similarity
    ``best_global`` is under ``min_global`` (see the module doc)."""
    if best_global < min_global:
        return []
    firsts, seen = [], set()
    for position, index_id in enumerate(index_ids):
        label = (labels or {}).get(index_id) or f"\0{index_id}"  # no label: a class of its own
        if label not in seen:
            seen.add(label)
            firsts.append(position)
    if len(firsts) < 2:
        return []
    if scores[firsts[0]] - scores[firsts[1]] >= margin and inliers[firsts[0]] >= band:
        return []
    return firsts[:pairs]


def undecided(inliers: Sequence[int], conf) -> bool:
    """Whether a query whose candidates have ``inliers`` (as counted) is still undecided under
    the rerank settings ``conf``: its best is under ``cascade_inliers``."""
    return max(inliers, default=0) < conf.cascade_inliers


def counted(second: int, conf) -> int:
    """A second-stage inlier count as the score counts it under the rerank settings ``conf``: 0
    below the larger of ``min_inliers`` and ``cascade_min_inliers``, else itself."""
    return second if second >= max(conf.min_inliers, conf.cascade_min_inliers) else 0


def fallback_counted(inliers: int, conf) -> int:
    """An asift fallback count as the score counts it under the rerank settings ``conf``: 0 below
    ``fallback_min_inliers``, else itself."""
    return inliers if inliers >= conf.fallback_min_inliers else 0


def combine(fast: int, second: int, rule: str) -> int:
    """A selected candidate's inliers from its fast and second-stage counts under ``rule``."""
    if rule == "replace":
        return second
    if rule == "max":
        return max(fast, second)
    if rule == "sum":
        return fast + second
    raise ValueError(f"unknown rerank.cascade_rule {rule!r}; use one of {', '.join(RULES)}")


class ViewsStage:
    """Second stage ``views``: the query's view features (``QuerySide.views``) matched view by
    view to the candidate's stored features, then the verifier of ``options``
    (:func:`.pairs.verify_options` of the rerank settings)."""

    name = "views"

    def __init__(self, options: dict):
        self.options = options

    def verify(self, query: QuerySide, candidate: ImageFeatures, candidate_size: tuple[int, int]) -> PairResult:
        features, views = query.view_features()
        if not len(views) or not candidate.num_features:
            return _nothing()
        pairs = match_views(features.descriptors, views, candidate.descriptors, matcher=self.options["matcher"],
                            match_threshold=self.options["match_threshold"], ratio=self.options["ratio"])
        return verify_matches(features.locations, candidate.locations, pairs, **self.options)


class GlueStage:
    """Second stage ``lighterglue``: ``glue`` (:class:`.lighterglue.LighterGlue`) matches the stored
    XFeat features (:func:`xfeat_of`), then the verifier of ``options``."""

    name = "lighterglue"

    def __init__(self, glue, options: dict):
        self.glue, self.options = glue, options

    def verify(self, query: QuerySide, candidate: ImageFeatures, candidate_size: tuple[int, int]) -> PairResult:
        if query.size is None:
            raise ValueError("rerank.cascade = 'lighterglue' needs the query's original (height, width)")
        query_features, candidate = xfeat_of(query.features), xfeat_of(candidate)
        if not query_features.num_features or not candidate.num_features:
            return _nothing()
        pairs = self.glue.match_stored(query_features.locations, query_features.descriptors, query.size,
                                       candidate.locations, candidate.descriptors, candidate_size)
        return verify_matches(query_features.locations, candidate.locations, pairs, **self.options)


class AsiftFallback:
    """The ``asift`` last stage: RootSIFT on the simulated views of both images' files (the rerank
    settings ``conf``: ``fallback_tilts``, ``fallback_image_size``, ``fallback_features`` per
    view), matched and verified as :data:`FALLBACK_VERIFY` says. Features of the last
    ``cache_images`` images read are kept (about 5 MB each: ~10,000 RootSIFT at the default
    settings), so a query's images are extracted once for its pairs."""

    name = "asift"

    def __init__(self, conf, cache_images: int = 8):
        self.tilts = tuple(float(t) for t in conf.fallback_tilts)
        self.size, self.per_view = int(conf.fallback_image_size), int(conf.fallback_features)
        self.options = {**FALLBACK_VERIFY, "seed": int(conf.seed)}
        self.cache: OrderedDict[str, ImageFeatures | None] = OrderedDict()
        self.cache_images = cache_images

    def features(self, path: str) -> ImageFeatures | None:
        """Locations [N, 2] (y, x) in original pixels and RootSIFT [N, 128] of every view of the
        image at ``path`` (None, logged, when it cannot be read now)."""
        if path in self.cache:
            self.cache.move_to_end(path)
            return self.cache[path]
        try:
            image, factors = load_image(Path(path), self.size, "L")
            found = extract_rootsift(image, self.per_view, self.tilts)
            features = replace(found, locations=found.locations * factors.astype(np.float32))
        except ImageError as error:
            log.warning("asift fallback: %s cannot be read (%s); its pairs keep their counts", path, error)
            features = None
        self.cache[path] = features
        if len(self.cache) > self.cache_images:
            self.cache.popitem(last=False)
        return features

    def verify(self, query_path: str, candidate_path: str) -> PairResult | None:
        """The pair's matches and inliers (None when an image cannot be read)."""
        query, candidate = self.features(query_path), self.features(candidate_path)
        if query is None or candidate is None:
            return None
        if not query.num_features or not candidate.num_features:
            return _nothing()
        return verify_pair(query.locations, query.descriptors, candidate.locations, candidate.descriptors,
                           **self.options)


def xfeat_of(features: ImageFeatures) -> ImageFeatures:
    """The XFeat local features of an image: its ``vlad_locals`` when kept (a fused model's store),
    else its own local features (an xfeat store)."""
    return features.vlad_locals if features.vlad_locals is not None else features


def _nothing() -> PairResult:
    return PairResult(0, 0, "too_few_matches", np.zeros((0, 2), np.int64), np.zeros(0, bool))
