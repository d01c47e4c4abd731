"""A portable search index: ``delf-pipeline index build|add|info``.

The job that writes the index folder (its layout: :mod:`delf_pipeline.formats.index_folder`):
``build`` extracts the labelled images into its store with :func:`delf_pipeline.extract.run`,
``add`` extracts new images into new store parts with the same settings and codebook and
merges their labels (nothing is rebuilt), ``info`` says what it holds.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import shutil
import time
from pathlib import Path

from PIL import Image

from . import __version__, calibrate, extract
from .config import Config, add_config_arguments, config_of
from .evidence.calibration import load_checked
from .extractors.build import recorded_model
from .formats.images import ImageRecord, iter_decoded, list_images
from .formats.index_folder import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_LAYOUT,
    LOCK,
    is_index,
    keep_model_export,
    open_index,
    preview_name,
)
from .formats.store import FeatureStore
from .formats.tables import read_labels
from .utils.artifacts import (
    atomic_path,
    output_lock,
    overwrite_advice,
    read_json,
    rebuild_advice,
    refuse_foreign,
    remove_owned,
    write_json_atomic,
    write_text_atomic,
)
from .utils.progress import track

log = logging.getLogger("delf_pipeline.index")

PREVIEW_QUALITY = 85  # JPEG quality of the previews


def build(
    config: Config,
    images: str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    split: str = "train",
    previews: int = 512,
    calibration: str | Path | None = None,
    calibrate_index: bool = True,
    overwrite: bool = False,
) -> Path:
    """Make the index ``out`` from ``images`` (a source :func:`list_images` reads); returns ``out``.

    labels: CSV of the images' landmarks (see :func:`.formats.tables.read_labels`); default: the labels of a
    Kaggle train.csv or an ``id,path,landmark_id`` CSV, or, for a folder of photos, the name of the
    folder each photo is in (``PHOTOS/PLACE/photo.jpg``: one folder per place). previews: longest side of the
    preview JPEGs (0: none). A finished index is reused only with the same settings
    (resumable like extract; a rerun also finishes what an interrupted one left: labels and
    previews of stored images); ``overwrite`` rebuilds it, deleting only the index's own files.
    Labels and calibration are checked before anything is written, and the labels are written
    before the store parts, so no stored image lacks its label. calibration: a calibration.json to
    keep; without it and with ``calibrate_index``, the index is calibrated on itself when it has
    enough labelled photos (:func:`delf_pipeline.calibrate.automatic`, in a fifth of the build's time).
    """
    start = time.monotonic()
    out = Path(out)
    if not config.extract.local_features:
        raise ValueError("an index needs local features for re-ranking: drop extract.local_features=false")
    records = _listed(images, split)
    if not records:
        raise ValueError(f"no images in {images} (a folder of photos, a Kaggle root or a CSV id,path): nothing to index")
    given = _labels_of(records, labels, images)  # before anything is written: a source without labels stops here
    if calibration:
        load_checked(calibration, config.predict)
    with output_lock(out, LOCK, "index"):  # one writer: `index add` takes it too
        if overwrite:
            remove_owned(out, INDEX_LAYOUT)
        if not is_index(out):
            refuse_foreign(out, INDEX_LAYOUT)  # a user's folder is never written into
        if (out / "config.json").exists() and _stage_sections(read_json(out / "config.json")) != _stage_sections(config.to_dict()):
            raise ValueError(f"index {out} was made with other settings; {overwrite_advice(out, INDEX_LAYOUT)}")
        if not (out / "manifest.json").exists():  # first: what makes the folder's files ours (--overwrite)
            _write_manifest(out, config, previews, None, 0)
        write_json_atomic(out / "config.json", config.to_dict())
        _merge_labels(out, given)
        extract.run(config, images, out / "store", split=split)
        if not len(FeatureStore(out / "store")):
            raise ValueError(f"none of the {len(records)} images of {images} could be used (see "
                             f"{out / 'store' / 'errors.csv'}): nothing to index")
        keep_model_export(out, config)
        _write_previews(out, records, previews)
        if calibration:
            with atomic_path(out / "calibration.json") as tmp:
                shutil.copyfile(calibration, tmp)
        elif calibrate_index:
            _calibrate(config, out, images, seconds=calibrate.AUTO_SHARE * (time.monotonic() - start))
        _write_manifest(out, config, previews, "build", len(records))
    return out


def _calibrate(config: Config, out: Path, images: str | Path, *, seconds: float) -> None:
    """The index calibrated on itself (:func:`delf_pipeline.calibrate.automatic`) in ``seconds``; its
    leave-one-out work (``calibrating/``, part of :data:`INDEX_LAYOUT`) removed after."""
    calibrate.automatic(config, out / "store", read_labels(out / "labels.csv"), out / "calibration.json",
                        seconds=seconds, limit="a fifth of the build's time", work=out / "calibrating",
                        index_images=images, remedy=f"`delf-pipeline calibrate --index {out / 'store'} "
                                                    f"--index-labels {out / 'labels.csv'}`")
    shutil.rmtree(out / "calibrating", ignore_errors=True)  # its leave-one-out work: not part of the index


def add(index_path: str | Path, images: str | Path, *, labels: str | Path | None = None, split: str = "train") -> Path:
    """Append the images of ``images`` to an index as new store parts, with the index's own
    settings and codebook; ids already in the index are kept as they were. Returns the index path.

    The new labels are checked, then written, before any part: a failed run leaves no stored image
    without its label. Images of ``images`` already stored but lacking a label or a preview (an
    interrupted run) get them.
    """
    index = open_index(index_path)
    records = _listed(images, split)
    with output_lock(index.path, LOCK, "index"):
        known = index.store.finished_ids()
        fresh = [r for r in records if r.id not in known]
        given = _labels_of(fresh, labels, images, repair=[r for r in records if r.id in known])
        if len(fresh) < len(records):
            log.info("%d of the %d images are already in the index: kept as they were", len(records) - len(fresh),
                     len(records))
        _merge_labels(index.path, given)
        config = index.config.copy()
        config.extract = recorded_model(config.extract, index.store.manifest(), index.path / "model")  # a built-in model: the build's export
        with rebuild_advice(f"`delf-pipeline index build --out {index.path} --overwrite`"):
            extract.run(config, images, index.store_path, split=split, only_ids={r.id for r in fresh})
        _write_previews(index.path, records, index.manifest["previews"])
        _write_manifest(index.path, index.config, index.manifest["previews"], "add", len(fresh))
    return index.path


def info(index_path: str | Path) -> dict:
    """What an index holds, as a JSON-able dict (no absolute path)."""
    index = open_index(index_path)
    conf = index.config.extract
    files = [p for p in index.path.rglob("*") if p.is_file()]
    return {
        "package_version": index.manifest["package_version"],
        "format_version": index.manifest["format_version"],
        "preset": index.config.preset,
        "backend": conf.backend + (f" + {conf.local_backend} locals" if conf.local_backend else ""),
        "model": conf.model or None,
        "codebook_words": conf.vlad_words if (index.store_path / "codebook.npy").is_file() else None,
        "images": len(index.store),
        "errors": len(index.store.errors()),
        "store_parts": len(index.store.parts),
        "landmarks": len(set(index.labels.values())),
        "labelled_images": len(index.labels),
        "previews": index.manifest["previews"],
        "calibration": index.calibration is not None,
        "megabytes": round(sum(p.stat().st_size for p in files) / 1e6, 1),
        "history": index.manifest["history"],
    }


def _stage_sections(config: Config) -> dict:
    return {key: value for key, value in config.items() if key != "preset"}


def _listed(images: str | Path, split: str) -> list[ImageRecord]:
    records, _ = list_images(images, split)  # listing errors are recorded by the extraction
    return records


def _labels_of(records: list[ImageRecord], labels_csv: str | Path | None, images: str | Path,
               repair: list[ImageRecord] = ()) -> dict[str, str]:
    """Landmark ids of ``records`` (and of the already stored ``repair`` ones, when the source
    has them) from ``labels_csv``; without it, from the records themselves (Kaggle train.csv, a
    CSV's landmark_id) or, for a folder of photos, the folder each is in. ValueError when none of
    ``records`` has one."""
    listed = [*records, *repair]
    if labels_csv:
        given = read_labels(labels_csv)
    elif any(r.label is not None for r in listed) or not Path(images).is_dir():
        given = {r.id: r.label for r in listed if r.label is not None}
    else:  # PHOTOS/PLACE/photo.jpg: the id is PLACE/photo, the place folder names the landmark
        given = {r.id: r.id.split("/", 1)[0] for r in listed if "/" in r.id}
        if given:
            log.info("labels from the folder names: %d photos of %d places", len(given), len(set(given.values())))
    found = {r.id: given[r.id] for r in records if r.id in given}
    if records and not found:
        where = labels_csv or "the image source (a Kaggle train.csv, a CSV with landmark_id, or place folders)"
        raise ValueError(f"none of the {len(records)} images has a label in {where}: put the photos in one folder "
                         "per place (PHOTOS/PLACE/photo.jpg) or give --labels CSV")
    if len(found) < len(records):
        log.warning("%d of %d images have no label (e.g. %s): they can be found but vote for no landmark",
                    len(records) - len(found), len(records), next(r.id for r in records if r.id not in found))
    return {**{r.id: given[r.id] for r in repair if r.id in given}, **found}


def _merge_labels(out: Path, new: dict[str, str]) -> None:
    """Add ``new`` labels to ``out/labels.csv``; labels already there win."""
    path = out / "labels.csv"
    merged = {**new, **(read_labels(path) if path.is_file() else {})}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "landmark_id"])
    writer.writerows(sorted(merged.items()))
    write_text_atomic(path, buffer.getvalue())


def _write_previews(out: Path, records: list[ImageRecord], size: int) -> None:
    """A JPEG of at most ``size`` px per side for every stored image of ``records`` lacking one."""
    if size <= 0:
        return
    folder = out / "previews"
    folder.mkdir(parents=True, exist_ok=True)
    stored = set(FeatureStore(out / "store").ids)
    todo = [r for r in records if r.id in stored and not (folder / preview_name(r.id)).is_file()]
    for record, image, _, error in track(iter_decoded(todo, size), len(todo), "previews"):
        if error is None:
            with atomic_path(folder / preview_name(record.id)) as tmp:
                Image.fromarray(image).save(tmp, "JPEG", quality=PREVIEW_QUALITY)


def _write_manifest(out: Path, config: Config, previews: int, command: str | None, images: int) -> None:
    """The index manifest with ``command`` (None: none yet, the start of a first build) in its history."""
    path = out / "manifest.json"
    history = read_json(path)["history"] if path.is_file() else []
    if command is not None:
        history.append({"command": command, "images": images, "package_version": __version__,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    stored = len(FeatureStore(out / "store")) if (out / "store" / "parts").is_dir() else 0
    write_json_atomic(path, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
        "preset": config.preset, "previews": previews, "images": stored, "history": history,
    })


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    made = sub.add_parser("build", help="extract index images into a new portable index folder")
    made.add_argument("--images", required=True, metavar="PHOTOS",
                      help="folder with one folder of photos per place (PHOTOS/PLACE/photo.jpg: the folder names "
                           "are the labels), Kaggle root, or CSV with id,path[,landmark_id]")
    made.add_argument("--labels", help="CSV id,landmark_id (or image,label); default: the labels of the source")
    made.add_argument("--out", required=True, help="index folder to write (resumed if present)")
    made.add_argument("--split", default="train", help="Kaggle layout: which split folder to read")
    made.add_argument("--previews", type=int, default=512, help="longest side of preview JPEGs (0: none)")
    made.add_argument("--calibration", help="calibration.json to keep in the index (default: one fitted on the "
                                            "index itself, when it has enough labelled photos)")
    made.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                      help="keep raw scores: no calibration fitted on the index")
    made.add_argument("--overwrite", action="store_true", help="rebuild the index from scratch (deletes only the "
                      "index's own files; a folder holding anything else is refused)")
    add_config_arguments(made)
    more = sub.add_parser("add", help="append labelled images to an index (new store parts, same settings)")
    more.add_argument("index", help="index folder")
    more.add_argument("--images", required=True, metavar="PHOTOS",
                      help="as for build: place folders, Kaggle root, or CSV with id,path[,landmark_id]")
    more.add_argument("--labels", help="CSV id,landmark_id (or image,label); default: the labels of the source")
    more.add_argument("--split", default="train", help="Kaggle layout: which split folder to read")
    shown = sub.add_parser("info", help="print what an index holds")
    shown.add_argument("index", help="index folder")
    shown.add_argument("--json", action="store_true", help="print JSON")


def main(args: argparse.Namespace) -> int:
    if args.index_command == "build":
        config = config_of(args)
        out = build(config, args.images, args.out, labels=args.labels, split=args.split, previews=args.previews,
                    calibration=args.calibration, calibrate_index=args.calibrate, overwrite=args.overwrite)
        print(f"index: {out}")
    elif args.index_command == "add":
        print(f"index: {add(args.index, args.images, labels=args.labels, split=args.split)}")
    facts = info(getattr(args, "index", None) or args.out)
    print(json.dumps(facts, indent=2) if getattr(args, "json", False) else format_info(facts))
    return 0


def format_info(facts: dict) -> str:
    """:func:`info` as aligned ``key: value`` lines (the history as one line per command)."""
    lines = [f"{key:>16}: {value}" for key, value in facts.items() if key != "history"]
    lines += [f"{'history':>16}: {h['time']} {h['command']} {h['images']} images (delf_pipeline {h['package_version']})"
              for h in facts["history"]]
    return "\n".join(lines)
