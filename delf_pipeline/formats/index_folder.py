"""The portable index folder that ``delf-pipeline index build`` writes and ``query`` / ``serve``
open: one self-contained folder that names no path outside itself, so a moved or copied index
keeps working::

    INDEX/manifest.json     what it is: format, package version, preset, counts, history
    INDEX/config.json       the full settings (extract, shortlist, rerank, predict)
    INDEX/labels.csv        id,landmark_id of the index images
    INDEX/store/            its feature store (rootsift, xfeat: with its codebook.npy)
    INDEX/previews/         small JPEG copies of the index images (thumbnails, match pictures),
                            named by a hash of the image id; absent with --previews 0
    INDEX/calibration.json  the confidence calibration: fitted on the index at build (when it
                            has enough labelled photos) or given (index build --calibration)
    INDEX/model/            the built-in model's export (``extract.model = "builtin:..."``, the
                            default preset): its local PCA was learned from these index images,
                            so the index carries it (about 20 MB)

Other model backends (``savedmodel``, ``hub``) keep their model by reference: ``extract.model``
in config.json, as given.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .. import __version__
from ..config import Config, config_from_dict
from ..utils.artifacts import DamagedArtifact, Layout, atomic_path, read_json
from .blocks import BLOCKS_LAYOUT
from .store import STORE_LAYOUT, FeatureStore
from .tables import read_labels

FORMAT = "delf_pipeline index"
FORMAT_VERSION = 1
MANIFEST_KEYS = ("format", "format_version", "package_version", "preset", "previews", "images", "history")
LOCK = "index"  # INDEX/.lock-index: held by `index build` and `index add` while they write


def is_index(folder: Path) -> bool:
    """True when ``folder/manifest.json`` is the manifest of an index (what makes its files ours)."""
    try:
        manifest = read_json(Path(folder) / "manifest.json")
    except (OSError, DamagedArtifact):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


# What an index folder holds (``index build --overwrite`` deletes these only, and only in a
# folder whose manifest says it is an index: labels.csv alone could be a user's).
# calibrating/: the leave-one-out work of the build's own calibration (calibrate.automatic),
# removed when it ends; a build killed during it leaves it.
_CALIBRATING = Layout("index's calibration work", ("automatic.json",), (
    ("loo-*", Layout("leave-one-out work", ("shortlist.csv", "rerank.csv"), (("rerank.csv.blocks", BLOCKS_LAYOUT),))),
))
# model/: a copy of the built-in model's export (a SavedModel folder and its export record).
_MODEL = Layout("index's model export", ("saved_model.pb", "fingerprint.pb", "delf_pipeline_export.json"), (
    ("variables", Layout("model variables", ("variables.*",))), ("assets", Layout("model assets")),
))
INDEX_LAYOUT = Layout("index", ("manifest.json", "config.json", "labels.csv", "calibration.json"), (
    ("store", STORE_LAYOUT), ("previews", Layout("index's previews", ("[0-9a-f]" * 20 + ".jpg",))),
    ("calibrating", _CALIBRATING), ("model", _MODEL),
), owned=is_index)


@dataclass
class Index:
    """An opened index folder (see the module docstring)."""

    path: Path
    manifest: dict
    config: Config

    @property
    def store_path(self) -> Path:
        return self.path / "store"

    @cached_property
    def store(self) -> FeatureStore:
        return FeatureStore(self.store_path)

    @cached_property
    def labels(self) -> dict[str, str]:
        """index image id -> landmark id."""
        return read_labels(self.path / "labels.csv")

    def preview(self, image_id: str) -> Path | None:
        """The preview JPEG of an index image, or None when the index has none for it."""
        path = self.path / "previews" / preview_name(image_id)
        return path if path.is_file() else None

    def images_of(self, landmark_id: str) -> list[str]:
        """Index image ids labelled ``landmark_id``, sorted."""
        return sorted(i for i, label in self.labels.items() if label == landmark_id)

    @property
    def calibration(self) -> dict | None:
        path = self.path / "calibration.json"
        return read_json(path) if path.is_file() else None


def open_index(path: str | Path) -> Index:
    """Open the index folder ``path``; ValueError names what is missing or foreign, DamagedArtifact
    a manifest missing a key or an index whose first build did not finish."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no index at {path} (no manifest.json): make one with `delf-pipeline index build`")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{manifest_path} is not a delf_pipeline index manifest (format {found!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: index format version {manifest.get('format_version')} is not "
                         f"{FORMAT_VERSION}, the one this delf_pipeline {__version__} reads; rebuild it")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DamagedArtifact(f"{manifest_path} lacks {', '.join(missing)}: not written by `delf-pipeline index "
                              "build`, or changed since; rebuild the index")
    if not manifest["history"]:
        raise DamagedArtifact(f"index {path}: its first `index build` did not finish; run the same command again "
                              "to finish it")
    for name in ("config.json", "labels.csv", "store"):
        if not (path / name).exists():
            raise FileNotFoundError(f"index {path} is incomplete: {name} is missing")
    return Index(path, manifest, config_from_dict(read_json(path / "config.json"), str(path / "config.json")))


def keep_model_export(path: Path, config: Config) -> None:
    """Copy the built-in model's export that the index ``path``'s store was made with into
    ``path/model`` (once), so the index carries it; nothing for any other model."""
    copy = Path(path) / "model"
    if not config.extract.model.startswith("builtin:") or (copy / "saved_model.pb").is_file():
        return
    export = Path(FeatureStore(Path(path) / "store").manifest()["settings"]["model"])
    with atomic_path(copy, is_dir=True) as tmp:
        shutil.copytree(export, tmp, dirs_exist_ok=True)


def preview_name(image_id: str) -> str:
    """File name of an image's preview: a hash of its id (ids may hold '/' and any character)."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:20] + ".jpg"
