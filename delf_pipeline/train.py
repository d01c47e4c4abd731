"""``delf-pipeline train``: fine-tune a global descriptor on labelled photos, export it as a DELG model.

Reads a Kaggle-layout folder (``train.csv`` + ``train/``), a folder of place folders, or a CSV
``id,path,landmark_id``; trains EfficientNet-Lite + GeM -> linear -> BatchNorm -> L2 with
sub-center ArcFace (settings: the ``[train]`` section); writes, in ``OUT``::

    saved_model.pb, variables/     the DELG SavedModel: `run --model OUT`, `extract`, `index`, `serve`
    delf_pipeline_export.json      what the export is (stores record it), and its preset
    model_card.json                data, settings, epochs, validation figures, package version
    training.csv                   one row per epoch: loss, learning rate, speed, validation figures
    checkpoint.npz                 the last epoch's state (what --resume continues from)
    split.csv, errors.csv          which image trained or validated; images that could not be used

A killed run continues with ``--resume`` and ends with the same weights; a finished one is
skipped unless ``--overwrite``. Training runs on a GPU when TensorFlow sees one (mixed
precision there), else on the CPU. Formulas, values and measurements: docs/training.md.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path
from typing import Callable

from . import __version__
from .config import Config, TrainSettings, load_config
from .extractors.efficientnet_lite_export import PCA_IMAGES, RECORD_NAME, decoded, pca_sample
from .extractors import efficientnet_lite as lite
from .formats.images import ImageRecord, list_images
from .formats.store import errors_to_csv
from .training import data, loop
from .training.export import MODEL_CARD, PRESET, export
from .utils.artifacts import Layout, fingerprint, output_lock, read_json, remove_owned, write_text_atomic

log = logging.getLogger("delf_pipeline.train")

# What a model folder holds (the module docstring; ``--overwrite`` deletes these only, and refuses
# a folder holding anything else): the SavedModel, its record, the card, the curves, the
# checkpoint, split.csv and errors.csv, and the staging folder of an export that was killed.
_SAVED_MODEL = (("variables", Layout("SavedModel variables", ("variables.index", "variables.data-*"))),
                ("assets", Layout("SavedModel assets", ("*",))))
MODEL_LAYOUT = Layout("model folder", (
    "saved_model.pb", "fingerprint.pb", RECORD_NAME, MODEL_CARD, loop.CURVES, loop.CHECKPOINT, "split.csv", "errors.csv",
), (*_SAVED_MODEL, (".export", Layout("model export staging", ("saved_model.pb", "fingerprint.pb"), _SAVED_MODEL))))


def run(config: Config, images: str | Path, out: str | Path, *, split: str = "train", resume: bool = False,
        overwrite: bool = False, on_step: Callable[[int, int], None] | None = None) -> Path:
    """Train on the labelled ``images`` with ``config.train`` and export the model to ``out``; returns ``out``.

    resume: continue the unfinished training in ``out``. on_step(epoch, step): called after
    every training step (tests). An unfinished training is never restarted silently: without
    ``resume`` or ``overwrite`` it is a ValueError saying so.
    """
    out = Path(out)
    conf = config.train
    with output_lock(out, "train", "training"):
        if overwrite:
            remove_owned(out, MODEL_LAYOUT)
        if (out / MODEL_CARD).is_file():
            check_finished(out, conf)
            log.info("Skipping: %s is a finished training (%s); --overwrite trains again", out, MODEL_CARD)
            return out
        started = (out / loop.CHECKPOINT).is_file()
        if started and not resume:
            raise ValueError(f"{out} holds an unfinished training ({loop.CHECKPOINT}): add --resume to continue it, "
                             "or --overwrite to start again")
        if resume and not started:
            log.info("nothing to resume in %s: starting from the first epoch", out)
        chosen, bank, errors = read_examples(images, split, conf)
        write_text_atomic(out / "errors.csv", errors_to_csv(errors))
        write_text_atomic(out / "split.csv", split_csv(chosen))
        _deterministic_tensorflow()
        mixed = _has_gpu()
        log.info("training %s on %d images of %d places (%d held out, %d of unseen places) on the %s%s",
                 conf.backbone, len(chosen.train), len(chosen.classes), len(chosen.val), len(chosen.unseen),
                 "GPU" if mixed else "CPU", " with mixed precision" if mixed else "")
        trainer = loop.Trainer(conf, chosen, bank, lite.load_weights(variant=conf.backbone), mixed_precision=mixed)
        made_of = fingerprint({"train": dict(conf.items()), "examples": split_csv(chosen)})
        result = loop.fit(trainer, out, fingerprint=made_of, resume=started and resume, on_step=on_step)
        trainer.eval_network.assign(result.best_weights)
        extract = load_config(PRESET).extract
        sample = [ImageRecord(e.id, Path(e.path), e.label) for e in chosen.train]
        card = model_card(images, conf, chosen, result, errors, made_of, mixed)
        export(trainer.eval_network, out, pca_images=decoded(pca_sample(sample, PCA_IMAGES), extract.max_image_size),
               scales=extract.image_scales, max_features=extract.max_features,
               record={"trained_on": card["data"], "best_epoch": result.best_epoch}, card=card)
        log.info("model written to %s (best epoch %d of %d); use it with: delf-pipeline run --model %s ...",
                 out, result.best_epoch, result.epochs, out)
    return out


def check_finished(out: Path, conf: TrainSettings) -> None:
    """ValueError naming the [train] keys that differ from those the finished model in ``out`` was made with."""
    made = read_json(out / MODEL_CARD).get("settings", {})
    changed = [f"train.{k}: was {made.get(k)!r}, now {v!r}" for k, v in conf.items() if made.get(k) != v]
    if changed:
        raise ValueError(f"{out} holds a model trained with other settings ({'; '.join(changed)}): "
                         "--overwrite trains it again, or choose another --out")


def read_examples(images: str | Path, split: str, conf: TrainSettings) -> tuple[data.Split, data.ImageBank, list]:
    """The split of the labelled images of ``images``, their decoded pixels, and every image
    that could not be used (listing errors, no label, not decodable)."""
    records, errors = list_images(images, split=split)
    examples, unlabelled = data.examples_of(records)
    bank = data.ImageBank(examples, max(conf.eval_size, 2 * conf.image_size))
    chosen = data.split(bank.usable(examples), conf.val_share, conf.val_places, conf.seed)
    if len(chosen.classes) < 2:
        raise ValueError(f"{images}: training needs labelled images of at least 2 places, found "
                         f"{len(chosen.classes)} (labels from landmark_id, or one folder per place)")
    return chosen, bank, errors + unlabelled + bank.errors


def split_csv(chosen: data.Split) -> str:
    """``id,label,role`` rows; role is train, val (held-out image) or unseen (held-out place)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("id", "label", "role"))
    for role, examples in (("train", chosen.train), ("val", chosen.val), ("unseen", chosen.unseen)):
        writer.writerows((e.id, e.label, role) for e in examples)
    return buffer.getvalue()


def model_card(images, conf: TrainSettings, chosen: data.Split, result: loop.Result, errors: list, made_of: str,
               mixed: bool) -> dict:
    """The JSON written beside the model: what it was trained on, how, and how it validated."""
    rows = {row["epoch"]: row for row in result.history}
    best, reference = rows.get(result.best_epoch, {}), rows.get(0, {})
    return {
        "model": f"efficientnet_{conf.backbone} global descriptor trained by delf-pipeline train",
        "package_version": __version__,
        "data": {"source": str(images), "places": len(chosen.classes), "train_images": len(chosen.train),
                 "val_images": len(chosen.val), "unseen_images": len(chosen.unseen),
                 "unseen_places": sorted({e.label for e in chosen.unseen}), "unusable_images": len(errors),
                 "fingerprint": made_of},
        "settings": dict(conf.items()),
        "epochs_run": result.epochs, "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
        "validation": {k: v for k, v in best.items() if k.startswith(("val_", "unseen_"))},
        "validation_imagenet": {k: v for k, v in reference.items() if k.startswith(("val_", "unseen_"))},
        "step_seconds": round(result.step_seconds, 4), "device": "GPU" if mixed else "CPU", "mixed_precision": mixed,
        "curves": loop.CURVES, "preset": PRESET,
    }


def _deterministic_tensorflow() -> None:
    """Same inputs, same results, kernel for kernel (what makes --resume bit-exact)."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import add_config_arguments

    parser.add_argument("--images", required=True, help="labelled photos: Kaggle root (train.csv + train/), a folder "
                        "of place folders, or a CSV with id,path,landmark_id")
    parser.add_argument("--out", required=True, help="model folder to write (the SavedModel, its card, the curves)")
    parser.add_argument("--split", default="train", help="Kaggle layout: which split folder to read")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished training in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again, deleting the model folder's own files (a folder holding anything else "
                             "is refused)")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.config, args.overrides)
    out = run(config, args.images, args.out, split=args.split, resume=args.resume, overwrite=args.overwrite)
    print(f"model: {out}")
    return 0
