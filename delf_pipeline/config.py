"""Configuration: built-in defaults, named presets (package data in ``presets/``), and overrides.

A config is a plain nested dict with one section per stage. Presets are TOML files that
override some keys of :data:`DEFAULTS`; ``--set section.key=value`` overrides any key
from the command line. Unknown sections or keys are errors, never silently ignored.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (older Kaggle images): the same parser, published as tomli
    import tomli as tomllib

DEFAULT_PRESET = "sift_default"

DEFAULTS: dict[str, dict[str, Any]] = {
    "extract": {
        "backend": "rootsift",  # rootsift (embedded default) | savedmodel (DELF/DELG export) | hub (DELF v1)
        "model": "",  # SavedModel folder or TF Hub handle (savedmodel / hub backends)
        "image_scales": [0.7071, 1.0, 1.4142],  # pyramid scales fed to the model
        "global_scale_indices": [0, 1, 2],  # which of image_scales build the global descriptor
        "max_image_size": 1024,  # longest side before the model; 0 keeps the original size
        "score_threshold": 175.0,  # attention score threshold (DELF/DELG)
        "max_features": 1000,  # local features kept per image
        "descriptor_dtype": "float16",  # float16 halves the store; float32 keeps it exact
        "affine_tilts": [1.0],  # rootsift: [1, 2, 4] adds simulated views (ASIFT) for extreme viewpoints
        "vlad_words": 256,  # rootsift: VLAD codebook size (global dim = words x 128)
        "codebook_images": 500,  # rootsift: index images sampled to learn the codebook
        "seed": 0,  # rootsift: codebook k-means seed
        "local_backend": "",  # "" (same as backend) | rootsift: RootSIFT local features with a model's global
        "local_features": True,  # false: store global descriptors only (local ones on demand at rerank)
        "part_size": 256,  # images per store part (unit of atomic write and resume)
    },
    "shortlist": {
        "top_k": 100,  # index images kept per query
        "chunk_rows": 4096,  # index rows per matrix product (memory bound, not index bound)
        "exclude_same_id": False,  # leave-one-out: never shortlist an image for itself
        "device": "auto",  # auto | cpu | gpu: where the matrix products run (gpu = TensorFlow)
    },
    "rerank": {
        "num_to_rerank": 100,  # shortlisted candidates verified per query
        "matcher": "kdtree",  # kdtree (official) | nn (same answer by matmul) | mutual (mutual nearest neighbours)
        "match_threshold": 0.8,  # max descriptor distance of a putative match
        "ratio": 0.0,  # nn / mutual matchers: Lowe ratio test, 0 disables
        "verifier": "skimage_affine",  # skimage_affine | magsac | magsac_affine | msac_affine | affine2d | degensac
        "residual_threshold": 20.0,  # RANSAC inlier threshold in pixels
        "max_trials": 1000,  # RANSAC iterations
        "confidence": 0.99,  # magsac / affine2d / degensac confidence
        "min_matches": 4,  # fewer putative matches than this give 0 inliers (official: > 3)
        "seed": 0,  # RANSAC seed
        "min_inliers": 0,  # inlier counts below this count as 0 (unrelated pairs get ~6-16)
        "scoring": "official",  # official: order by (inliers, global) | kaggle2020
        "max_inlier_score": 70,  # kaggle2020: inliers are capped at this then divided by it
    },
    "predict": {
        "top_k": 3,  # candidates per query that vote for a class
        "aggregation": "sum",  # sum | max: how a class pools its candidates' scores
    },
}


class ConfigError(ValueError):
    """A preset, config file or override that cannot be used."""


def presets_dir() -> Path:
    """The folder of named presets: ``delf_pipeline/presets/``, installed with the package."""
    return Path(__file__).resolve().parent / "presets"


def list_presets() -> list[str]:
    """Names of the available presets."""
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Merge ``DEFAULTS`` <- preset <- config file <- ``section.key=value`` overrides."""
    config = copy.deepcopy(DEFAULTS)
    name = preset or (None if config_file else DEFAULT_PRESET)
    if name:
        _merge_preset(config, name, seen=())
    if config_file:
        merge(config, _read_toml(Path(config_file)), origin=str(config_file))
    for item in overrides or []:
        merge(config, parse_override(item), origin=f"--set {item}")
    config["preset"] = name or str(config_file)
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


def to_toml(config: dict) -> str:
    """The stage sections of ``config`` as TOML text, each key with its comment from DEFAULTS."""
    comments = _default_comments()
    lines = [f"# preset: {config.get('preset')}"]
    for section in DEFAULTS:
        lines.append(f"\n[{section}]")
        for key, value in config[section].items():
            lines.append(f"{key} = {json.dumps(value)}  # {comments.get((section, key), '')}".rstrip(" #"))
    return "\n".join(lines) + "\n"


def _default_comments() -> dict[tuple[str, str], str]:
    """(section, key) -> the comment written beside the key in this file's DEFAULTS."""
    comments, section = {}, None
    for line in Path(__file__).read_text().splitlines():
        stripped = line.strip()
        if stripped.endswith(": {") and stripped.startswith('"'):
            section = stripped.split('"')[1]
        elif section and stripped.startswith('"') and "#" in stripped:
            comments[(section, stripped.split('"')[1])] = stripped.split("#", 1)[1].strip()
    return comments


def fingerprint(settings: dict) -> str:
    """A short stable hash of ``settings`` (any JSON-able dict), recorded in artifacts."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every stage shares: preset, config file and key overrides."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", help="named preset (default: sift_default); "
                       "`delf-pipeline config --list` names them")
    group.add_argument("--config", metavar="FILE", help="TOML file of settings, applied after the preset")
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
