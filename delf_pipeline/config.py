"""Configuration: built-in defaults, named presets (the TOML files of the top-level ``configs/``
folder, carried by the wheel as package data), and overrides.

A config is a plain nested dict with one section per stage. Presets are TOML files that
override some keys of :data:`DEFAULTS`; ``--set section.key=value`` overrides any key
from the command line. Unknown sections or keys are errors, never silently ignored.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .verification.matching import LEARNED_MATCHERS, MATCHERS
from .verification.pairs import MODES
from .verification.ransac import VERIFIERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (older Kaggle images): the same parser, published as tomli
    import tomli as tomllib

DEFAULT_PRESET = "xfeat"

def _official(key: str, comment: str) -> tuple[Any, str]:
    """The official re-ranking value of a rerank key (one definition: verification.pairs.MODES)."""
    return MODES["official"][key], comment


#: Every setting as section -> key -> (default value, the comment printed beside it).
SETTINGS: dict[str, dict[str, tuple[Any, str]]] = {
    "extract": {
        "backend": ("rootsift", "rootsift (embedded default) | xfeat | savedmodel (DELF/DELG export) | hub (DELF v1)"),
        "model": ("", "SavedModel folder or TF Hub handle (savedmodel / hub backends)"),
        "image_scales": ([0.7071, 1.0, 1.4142], "pyramid scales fed to the model"),
        "global_scale_indices": ([0, 1, 2], "which of image_scales build the global descriptor"),
        "max_image_size": (1024, "longest side before the model; 0 keeps the original size"),
        "score_threshold": (175.0, "attention score threshold (DELF/DELG)"),
        "max_features": (1000, "local features kept per image"),
        "descriptor_dtype": ("float16", "float16 halves the store; float32 keeps it exact"),
        "affine_tilts": ([1.0], "rootsift: [1, 2, 4] adds simulated views (ASIFT) for extreme viewpoints"),
        "vlad_words": (256, "rootsift, xfeat: VLAD codebook size (global dim = words x 128, x 64 for xfeat)"),
        "codebook_images": (500, "rootsift, xfeat: index images sampled to learn the codebook"),
        "seed": (0, "rootsift, xfeat: codebook k-means seed"),
        "local_backend": ("", '"" (same as backend) | rootsift | xfeat: these local features with a model\'s global'),
        "xfeat_weights": ("", 'xfeat: folder with xfeat.pt and LICENSE; "" = the cache (delf-pipeline weights fetch xfeat)'),
        "xfeat_threshold": (0.05, "xfeat: keypoint heatmap threshold of the non-maximum suppression (authors' 0.05)"),
        "xfeat_scales": ([1.0], "xfeat: image scales detected on; the best max_features of all are kept"),
        "local_features": (True, "false: store global descriptors only (local ones on demand at rerank)"),
        "part_size": (256, "images per store part (unit of atomic write and resume)"),
        "batch_size": (1, "xfeat: images of one decoded size per model call; 1 measured fastest on CPU (docs/xfeat.md)"),
    },
    "shortlist": {
        "top_k": (100, "index images kept per query"),
        "chunk_rows": (4096, "index rows per matrix product (memory bound, not index bound)"),
        "exclude_same_id": (False, "leave-one-out: never shortlist an image for itself"),
        "device": ("auto", "auto | cpu | gpu: where the matrix products run (gpu = TensorFlow)"),
        "whitening": ("", '"" | pca | supervised (index labels): learned once on the index, stored beside it'),
        "whitening_dim": (0, "whitened dimensions kept; 0 keeps all the index spans (at most images - 1)"),
        "whitening_shrinkage": (0.0, "0..1: covariance shrunk towards the identity (few images, many dims)"),
        "whitening_images": (100000, "index images (sampled, seed 0) the whitening is learned on"),
        "dba": ("", '"" | plain | supervised (same-label neighbours): database-side augmentation, stored beside the index'),
        "dba_top_n": (3, "neighbours (the image itself included) averaged per index image"),
        "dba_alpha": (0.0, "neighbour weight similarity ** alpha (0: plain mean)"),
        "qe_top_n": (0, "query expansion: first results added to the query, 0 disables"),
        "qe_alpha": (0.0, "0: average QE; > 0: alpha-QE (Radenovic et al. 2018 use 3)"),
    },
    "rerank": {
        "num_to_rerank": (100, "shortlisted candidates verified per query"),
        "matcher": _official("matcher", "kdtree (official) | nn (same answer by matmul) | mutual (mutual nearest "
                             "neighbours) | lighterglue (XFeat's learned matcher; XFeat locals only)"),
        "match_threshold": _official("match_threshold", "max descriptor distance of a putative match"),
        "ratio": _official("ratio", "nn / mutual matchers: Lowe ratio test, 0 disables"),
        "verifier": _official("verifier", " | ".join(VERIFIERS)),
        "residual_threshold": _official("residual_threshold", "RANSAC inlier threshold in pixels"),
        "max_trials": _official("max_trials", "RANSAC iterations"),
        "confidence": _official("confidence", "magsac / affine2d / degensac confidence"),
        "min_matches": _official("min_matches", "fewer putative matches than this give 0 inliers (official: > 3)"),
        "seed": (0, "RANSAC seed"),
        "min_inliers": (0, "inlier counts below this count as 0 (unrelated pairs get ~6-16)"),
        "scoring": ("official", "official: order by (inliers, global) | kaggle2020"),
        "max_inlier_score": (70, "kaggle2020: inliers are capped at this then divided by it"),
    },
    "predict": {
        "top_k": (3, "candidates per query that vote for a class"),
        "aggregation": ("max", "sum | max | mean_best | verified: how a class pools its candidates (docs/confidence.md)"),
        "calibration": ("", "calibration.json from `delf-pipeline calibrate`: confidences become P(right)"),
        "abstain": (0.0, "empty row when the confidence is below this (calibrate prints the F1-best one)"),
        "max_share": (0.0, ">0: a landmark predicted for more than this share of queries gets confidence "
                           "x max_share / share"),
    },
    "calibrate": {
        "sample": (200, "index images used as leave-one-out queries (0: all of them)"),
        "seed": (0, "seed of the sample"),
        "l2": (1.0, "logistic regression penalty on the standardised weights"),
    },
}
DEFAULTS: dict[str, dict[str, Any]] = {
    section: {key: value for key, (value, _) in keys.items()} for section, keys in SETTINGS.items()
}
COMMENTS: dict[tuple[str, str], str] = {
    (section, key): comment for section, keys in SETTINGS.items() for key, (_, comment) in keys.items()
}


class ConfigError(ValueError):
    """A preset, config file or override that cannot be used."""


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
) -> dict[str, dict[str, Any]]:
    """Merge ``DEFAULTS`` <- preset <- config file <- ``section.key=value`` overrides, then validate.

    The preset is ``preset``, else the one the config file names (``preset = "..."``), else
    :data:`DEFAULT_PRESET`: a config file is always layered over a preset.
    """
    config = copy.deepcopy(DEFAULTS)
    data = _read_toml(Path(config_file)) if config_file else {}
    named = data.pop("preset", None)
    if named is not None and not isinstance(named, str):
        raise ConfigError(f"{config_file}: preset must be a preset name (a string), got {named!r}")
    name = preset or named or DEFAULT_PRESET
    _merge_preset(config, name, seen=())
    merge(config, data, origin=str(config_file))
    for item in overrides or []:
        merge(config, parse_override(item), origin=f"--set {item}")
    validate(config)
    config["preset"] = name
    return config


def _merge_preset(config: dict, name: str, seen: tuple[str, ...]) -> None:
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
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


def parse_override(item: str) -> dict:
    """``"rerank.max_trials=500"`` -> ``{"rerank": {"max_trials": 500}}`` (values parsed as TOML)."""
    key, sep, raw = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as magsac is taken as a string
    return {section: {name: value}}


def merge(config: dict, update: dict, origin: str) -> None:
    """Override keys of ``config`` in place; unknown sections or keys raise ConfigError."""
    for section, values in update.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{origin}: unknown section {section!r}; known: {', '.join(DEFAULTS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a table")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                known = ", ".join(DEFAULTS[section])
                raise ConfigError(f"{origin}: unknown key {section}.{key}; known: {known}")
            config[section][key] = _coerce(value, DEFAULTS[section][key], f"{section}.{key}", origin)


def _coerce(value: Any, default: Any, key: str, origin: str) -> Any:
    if isinstance(default, bool) or isinstance(value, type(default)):
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    raise ConfigError(f"{origin}: {key} must be {type(default).__name__}, got {value!r}")


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"must be >= {low}"


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    """Open interval on the right: low <= value < high."""
    return lambda value: None if low <= value < high else f"must be in [{low}, {high})"


def _closed(low: float, high: float) -> Callable[[Any], str | None]:
    """Closed interval: low <= value <= high."""
    return lambda value: None if low <= value <= high else f"must be in [{low}, {high}]"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _list_of(check: Callable[[Any], str | None], what: str) -> Callable[[Any], str | None]:
    """A check of a non-empty list of numbers, each passing ``check``."""
    def check_list(value: list) -> str | None:
        ok = value and all(isinstance(v, (int, float)) and check(v) is None for v in value)
        return None if ok else f"must be a non-empty list of numbers {what}"

    return check_list


def _indices(value: list) -> str | None:
    return None if all(isinstance(v, int) and v >= 0 for v in value) else "must be a list of indices >= 0"


def _probability(value: float) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


@dataclass(frozen=True)
class OneOf:
    """The check of a key whose value is one of a few ``names``."""

    names: tuple

    def __call__(self, value: Any) -> str | None:
        return None if value in self.names else f"must be one of {', '.join(map(repr, self.names))}"


#: The one validation table: (section, key) -> check(value), which returns None when the value
#: is valid, else what is wrong. Keys not listed accept any value of their default's type.
CHECKS: dict[tuple[str, str], Callable[[Any], str | None]] = {
    ("extract", "backend"): OneOf(("rootsift", "xfeat", "savedmodel", "hub")),
    ("extract", "local_backend"): OneOf(("", "rootsift", "xfeat")),
    ("extract", "xfeat_threshold"): _between(0, 1),
    ("extract", "xfeat_scales"): _list_of(_positive, "> 0"),
    ("extract", "image_scales"): _list_of(_positive, "> 0"),
    ("extract", "global_scale_indices"): _indices,
    ("extract", "max_image_size"): _at_least(0),
    ("extract", "max_features"): _at_least(1),
    ("extract", "descriptor_dtype"): OneOf(("float16", "float32")),
    ("extract", "affine_tilts"): _list_of(_at_least(1), ">= 1"),
    ("extract", "vlad_words"): _at_least(1),
    ("extract", "codebook_images"): _at_least(1),
    ("extract", "part_size"): _at_least(1),
    ("extract", "batch_size"): _at_least(1),
    ("shortlist", "top_k"): _at_least(1),
    ("shortlist", "chunk_rows"): _at_least(1),
    ("shortlist", "device"): OneOf(("auto", "cpu", "gpu")),
    ("shortlist", "whitening"): OneOf(("", "pca", "supervised")),
    ("shortlist", "whitening_dim"): _at_least(0),
    ("shortlist", "whitening_shrinkage"): _closed(0, 1),
    ("shortlist", "whitening_images"): _at_least(2),
    ("shortlist", "dba"): OneOf(("", "plain", "supervised")),
    ("shortlist", "dba_top_n"): _at_least(1),
    ("shortlist", "dba_alpha"): _at_least(0),
    ("shortlist", "qe_top_n"): _at_least(0),
    ("shortlist", "qe_alpha"): _at_least(0),
    ("rerank", "num_to_rerank"): _at_least(0),
    ("rerank", "matcher"): OneOf(MATCHERS + LEARNED_MATCHERS),
    ("rerank", "match_threshold"): _positive,
    ("rerank", "ratio"): _between(0, 1),
    ("rerank", "verifier"): OneOf(VERIFIERS),
    ("rerank", "residual_threshold"): _positive,
    ("rerank", "max_trials"): _at_least(1),
    ("rerank", "confidence"): _probability,
    ("rerank", "min_matches"): _at_least(0),
    ("rerank", "min_inliers"): _at_least(0),
    ("rerank", "scoring"): OneOf(("official", "kaggle2020")),
    ("rerank", "max_inlier_score"): _at_least(1),
    ("predict", "top_k"): _at_least(1),
    ("predict", "aggregation"): OneOf(("sum", "max", "mean_best", "verified")),
    ("predict", "abstain"): _at_least(0),
    ("predict", "max_share"): _between(0, 1),
    ("calibrate", "sample"): _at_least(0),
    ("calibrate", "l2"): _at_least(0),
}


def validate(config: dict) -> None:
    """Raise ConfigError naming the first key of ``config`` that :data:`CHECKS` rejects."""
    for (section, key), check in CHECKS.items():
        value = config[section][key]
        problem = check(value)
        if problem:
            raise ConfigError(f"{section}.{key} {problem}, got {value!r}")


def to_toml(config: dict) -> str:
    """The settings of ``config`` as TOML text that loads back with ``--config`` (its preset
    first), each key with its comment from :data:`SETTINGS`."""
    lines = [f"preset = {json.dumps(config.get('preset', DEFAULT_PRESET))}"]
    for section in DEFAULTS:
        lines.append(f"\n[{section}]")
        for key, value in config[section].items():
            lines.append(f"{key} = {json.dumps(value)}  # {COMMENTS[(section, key)]}")
    return "\n".join(lines) + "\n"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every stage shares: preset, config file and key overrides."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", help=f"named preset (default: {DEFAULT_PRESET}); "
                       "`delf-pipeline config --list` names them")
    group.add_argument("--config", metavar="FILE", help="TOML file of settings, layered over the preset (the "
                       "default one unless the file names preset = \"NAME\" or --preset is given)")
    group.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set rerank.max_trials=500 (repeatable); "
        "`delf-pipeline config` lists every key",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of resumable, shardable stages."""
    parser.add_argument("--shard", metavar="I/N", help="process only shard I of N (1-based), e.g. 2/4")
    parser.add_argument("--overwrite", action="store_true", help="redo work that is already finished")


def add_arguments(parser) -> None:
    """``delf-pipeline config``: show the effective settings, or the preset names."""
    parser.add_argument("--list", action="store_true", help="list the preset names and exit")
    add_config_arguments(parser)


def main(args) -> int:
    if args.list:
        print("\n".join(list_presets()))
        return 0
    print(to_toml(load_config(args.preset, args.config, args.overrides)), end="")
    return 0
