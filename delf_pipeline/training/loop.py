"""The training loop: epochs of seeded batches, validation, early stopping, checkpoints, resume.

After every epoch one file, ``checkpoint.npz``, is replaced atomically: every variable of the
network and of the class centres, both optimizers' state (step count and moments), the
weights of the best epoch so far, and the loop's own state (epoch, history, early-stopping
counters) as JSON. An epoch's batches and augmentations depend only on (seed, epoch), and
TensorFlow runs with op determinism on (the job turns it on), so a run killed anywhere and
resumed from its last checkpoint replays the unfinished epoch exactly and ends with the same
weights as a run never stopped. ``training.csv`` (the curves) is rewritten with each checkpoint.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..extractors import efficientnet_lite as lite
from ..utils.artifacts import DamagedArtifact, atomic_path, write_text_atomic
from ..utils.progress import track
from . import augment, data, losses, model, validation

log = logging.getLogger("delf_pipeline.training.loop")

CHECKPOINT = "checkpoint.npz"
CURVES = "training.csv"
BACKBONE_LR_FACTOR = 0.1  # the pretrained backbone learns at a tenth of the head's rate
WARMUP_SHARE = 0.1  # of all steps, the learning rate rises linearly from 0, then decays (cosine) to 0
INITIAL_LOSS_SCALE = 2.0**15  # mixed precision: dynamic loss scaling, halved on overflow,
GROWTH_INTERVAL = 1000  # doubled after this many finite steps
CURVE_COLUMNS = ("epoch", "train_loss", "learning_rate", "seconds", "images_per_second", "val_map@100", "val_top1",
                 "val_gap", "unseen_map@100", "unseen_top1", "unseen_gap")


@dataclass
class Result:
    """What a finished (or resumed and finished) training gives."""

    history: list[dict]  # epoch 0 (the ImageNet descriptor's validation), then one row per epoch trained
    epochs: int  # epochs trained
    best_epoch: int  # 1-based; the last epoch when there is no validation
    stopped_early: bool
    best_weights: list[np.ndarray] = field(repr=False)
    step_seconds: float  # median seconds per training step (first step of each run left out)


class Trainer:
    """Holds the network, class centres and optimizers of one training.

    conf: the ``[train]`` settings (``config.train``, or a dict of the same keys); split, bank: the
    examples and their decoded images.
    """

    def __init__(self, conf: dict, split: data.Split, bank: data.ImageBank, weights: dict | None, *,
                 mixed_precision: bool = False):
        import keras
        import tensorflow as tf

        self.conf, self.split, self.bank, self.mixed = conf, split, bank, mixed_precision
        build = dict(variant=conf["backbone"], dim=conf["dim"], train_blocks=conf["train_blocks"], weights=weights,
                     seed=conf["seed"])
        self.network = model.build(**build, mixed_precision=mixed_precision)
        self.eval_network = model.build(**build) if mixed_precision else self.network
        self.class_index = split.class_indices()
        self.aspects = np.array([_aspect(bank.images[e.id]) for e in split.train])
        classes, subcentres = len(split.classes), conf["subcenters"] if conf["loss"] == "subcenter_arcface" else 1
        self.margins = (losses.dynamic_margins(split.counts(), conf["margin_min"], conf["margin_max"])
                        if conf["loss"] == "subcenter_arcface" else np.full(classes, conf["margin_max"], np.float32))
        self.centres = losses.make_centres(classes, subcentres, conf["dim"], conf["seed"] + 1)
        self.centres(np.zeros((1, conf["dim"]), np.float32))
        self.steps_per_epoch = len(self.plan(0))
        total = self.steps_per_epoch * conf["epochs"]
        warmup = int(total * WARMUP_SHARE)

        def adam(rate: float):
            schedule = keras.optimizers.schedules.CosineDecay(0.0, max(total - warmup, 1), warmup_target=rate,
                                                              warmup_steps=warmup)
            return keras.optimizers.Adam(schedule)

        self.backbone_vars, self.head_vars = self.network.trainable_backbone(), self.network.trainable_head()
        self.head_vars += list(self.centres.trainable_weights)
        self.opt_backbone = adam(conf["learning_rate"] * BACKBONE_LR_FACTOR)
        self.opt_head = adam(conf["learning_rate"])
        self.opt_backbone.build(self.backbone_vars)
        self.opt_head.build(self.head_vars)
        self.loss_scale = tf.Variable(INITIAL_LOSS_SCALE, trainable=False, dtype=tf.float32)
        self.good_steps = tf.Variable(0, trainable=False, dtype=tf.int64)
        self._margins = tf.constant(self.margins)
        self._step = tf.function(self._train_step)
        pixels = [tf.TensorSpec([1, None, None, 3], tf.float32)]
        trained = model.delg_backbone(self.eval_network)
        self._embed = tf.function(lambda images: trained(images)[2], input_signature=pixels)
        self._embed_imagenet = tf.function(
            lambda images: lite.backbone_outputs(self.eval_network.backbone, images)[2], input_signature=pixels)

    # ------------------------------------------------------------------ one step, one epoch

    def plan(self, epoch: int) -> list[data.Step]:
        conf = self.conf
        return data.epoch_plan(self.class_index, self.aspects, epoch, seed=conf["seed"], batch_size=conf["batch_size"],
                               balanced=conf["balanced"], flip=conf["flip"])

    def _train_step(self, images, labels):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            embeddings = self.network.embed(images, training=True)
            loss = losses.arcface_loss(self.centres(embeddings), labels, self._margins, self.conf["scale"])
            scaled = loss * self.loss_scale if self.mixed else loss
        count = len(self.backbone_vars)
        gradients = tape.gradient(scaled, self.backbone_vars + self.head_vars)
        if not self.mixed:
            self._apply(gradients, count)
            return loss
        gradients = [g / self.loss_scale for g in gradients]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients])

        def apply():
            self._apply(gradients, count)
            self.good_steps.assign_add(1)
            grow = self.good_steps >= GROWTH_INTERVAL
            self.loss_scale.assign(tf.where(grow, self.loss_scale * 2.0, self.loss_scale))
            self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), self.good_steps))
            return tf.constant(True)

        def skip():
            self.loss_scale.assign(tf.maximum(self.loss_scale / 2.0, 1.0))
            self.good_steps.assign(0)
            return tf.constant(False)

        tf.cond(finite, apply, skip)
        return loss

    def _apply(self, gradients, count: int) -> None:
        if count:
            self.opt_backbone.apply(gradients[:count], self.backbone_vars)
        self.opt_head.apply(gradients[count:], self.head_vars)

    def train_epoch(self, epoch: int, on_step: Callable[[int, int], None] | None = None) -> dict:
        """Train one epoch (0-based); returns {"train_loss", "seconds", "images_per_second", "step_seconds"}."""
        plan = self.plan(epoch)
        images = [self.bank.images[e.id] for e in self.split.train]
        losses_seen: list[float] = []
        times: list[float] = []
        size = self.conf["image_size"]

        def status() -> str:
            if not times:
                return ""
            rate = len(plan[0].positions) / float(np.median(times))
            return f"loss {np.mean(losses_seen[-20:]):.3f}, {rate:.1f} img/s"

        start = time.perf_counter()
        batches = data.batches(plan, images, size, workers=1)
        for number, (step, pixels) in enumerate(track(zip(plan, batches), len(plan), f"epoch {epoch + 1}",
                                                      status=status)):
            began = time.perf_counter()
            loss = self._step(pixels, self.class_index[step.positions])
            losses_seen.append(float(loss))
            times.append(time.perf_counter() - began)
            if on_step is not None:
                on_step(epoch, number)
        seconds = time.perf_counter() - start
        return {"train_loss": float(np.mean(losses_seen)), "seconds": round(seconds, 2),
                "images_per_second": round(len(plan) * len(plan[0].positions) / seconds, 2),
                "step_seconds": times}

    # ------------------------------------------------------------------ validation

    def embeddings(self, examples: Sequence[data.Example], imagenet: bool = False) -> np.ndarray:
        """[N, D] L2-normalised global descriptors of ``examples`` at longest side ``eval_size``:
        the trained head's as the exported model computes them, or with ``imagenet`` the
        backbone's GeM (p = 3) over its 1280-d head, the ImageNet Lite descriptor."""
        if self.mixed:
            self.eval_network.assign(self.network.arrays())
        embed = self._embed_imagenet if imagenet else self._embed
        rows = []
        for example in examples:
            image = augment.resize_longest(self.bank.images[example.id], self.conf["eval_size"])
            rows.append(embed(image[None].astype(np.float32)).numpy()[0])
        vectors = np.array(rows, np.float32).reshape(len(rows), -1)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def validate(self, imagenet: bool = False) -> dict[str, float]:
        """{"val_map@100", "val_top1", "val_gap", and the same for "unseen_"} of the held-out
        images, each against every other image (training ones included); {} without any.
        ``imagenet``: of the ImageNet descriptor (see :meth:`embeddings`), the reference."""
        split = self.split
        if not split.val and not split.unseen:
            return {}
        everything = split.train + split.val + split.unseen
        vectors = self.embeddings(everything, imagenet)
        labels = np.array([e.label for e in everything])
        out = {}
        for name, start, count in (("val", len(split.train), len(split.val)),
                                   ("unseen", len(split.train) + len(split.val), len(split.unseen))):
            if count:
                found = validation.figures(vectors, labels, np.arange(start, start + count))
                out.update({f"{name}_{k}": round(v, 6) for k, v in found.items() if k != "queries"})
        return out

    # ------------------------------------------------------------------ checkpoints

    def _optimizer_vars(self) -> list:
        return list(self.opt_backbone.variables) + list(self.opt_head.variables) + [self.loss_scale, self.good_steps]

    def save(self, folder: Path, state: dict, best: list[np.ndarray]) -> None:
        """Write ``folder/checkpoint.npz`` atomically (see the module docstring)."""
        arrays = {"state": np.array(json.dumps(state))}
        groups = (("model", self.network.arrays()), ("centres", [v.numpy() for v in self.centres.weights]),
                  ("optimizer", [np.array(v.numpy()) for v in self._optimizer_vars()]), ("best", best))
        for group, values in groups:
            arrays.update({f"{group}/{i:04d}": value for i, value in enumerate(values)})
        with atomic_path(folder / CHECKPOINT) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    def restore(self, folder: Path) -> tuple[dict, list[np.ndarray]]:
        """Load ``folder/checkpoint.npz`` into the network, centres and optimizers; returns
        (loop state, best weights). DamagedArtifact when it does not fit this training."""
        path = folder / CHECKPOINT
        try:
            with np.load(path, allow_pickle=False) as stored:
                groups: dict[str, list] = {}
                for key in sorted(k for k in stored.files if "/" in k):
                    groups.setdefault(key.split("/")[0], []).append(stored[key])
                state = json.loads(str(stored["state"]))
        except (OSError, ValueError, KeyError, EOFError) as error:
            raise DamagedArtifact(f"{path} cannot be read ({error}); start again with --overwrite") from None
        try:
            self.network.assign(groups["model"])
            _assign(self.centres.weights, groups["centres"])
            _assign(self._optimizer_vars(), groups["optimizer"])
        except (KeyError, ValueError) as error:
            raise DamagedArtifact(f"{path} does not fit this training ({error}); start again with --overwrite") from None
        return state, groups.get("best", [])


def _assign(variables: list, arrays: list) -> None:
    if len(variables) != len(arrays) or any(tuple(v.shape) != a.shape for v, a in zip(variables, arrays)):
        raise ValueError("variable count or shapes differ")
    for variable, array in zip(variables, arrays):
        variable.assign(array)


def _aspect(image: np.ndarray) -> float:
    return image.shape[1] / image.shape[0]


def fit(trainer: Trainer, folder: Path, *, fingerprint: str, resume: bool = False,
        on_step: Callable[[int, int], None] | None = None) -> Result:
    """Train ``trainer`` for up to ``epochs`` epochs, checkpointing into ``folder``.

    fingerprint: what the training is made of (data and settings); a resumed checkpoint with
    another one is refused. resume: continue from ``folder/checkpoint.npz``. on_step(epoch,
    step), both 0-based, is called after every step (tests use it to kill a run mid-epoch).
    Early stopping: ``patience`` epochs without a better validation mAP@100 (of the held-out
    images, else of the unseen places) end the run; the best epoch's weights are the result.
    """
    conf = trainer.conf
    state = {"epoch": 0, "history": [], "best_epoch": 0, "best_score": -1.0, "bad_epochs": 0,
             "stopped_early": False, "fingerprint": fingerprint}
    best = trainer.network.arrays()
    if resume:
        state, best = trainer.restore(folder)
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"{folder / CHECKPOINT} was made from other images or [train] settings; "
                             "start again with --overwrite, or resume with what it was started with")
        log.info("resuming after epoch %d of %d", state["epoch"], conf["epochs"])
    else:
        reference = trainer.validate(imagenet=True)
        if reference:
            state["history"].append({"epoch": 0, **reference})
            log.info("epoch 0 (the ImageNet descriptor, before training): %s", _figures(reference))
    step_times: list[float] = []
    while state["epoch"] < conf["epochs"] and not state["stopped_early"]:
        epoch = state["epoch"]
        row = {"epoch": epoch + 1, **trainer.train_epoch(epoch, on_step)}
        step_times += row.pop("step_seconds")[1:]
        row["learning_rate"] = float(np.asarray(trainer.opt_head.learning_rate))
        row.update(trainer.validate())
        score = row.get("val_map@100", row.get("unseen_map@100"))
        if score is None or score > state["best_score"]:
            state.update(best_epoch=epoch + 1, best_score=-1.0 if score is None else score, bad_epochs=0)
            best = trainer.network.arrays()
        else:
            state["bad_epochs"] += 1
            state["stopped_early"] = 0 < conf["patience"] <= state["bad_epochs"]
        state["history"].append(row)
        state["epoch"] = epoch + 1
        trainer.save(folder, state, best)
        write_curves(folder / CURVES, state["history"])
        log.info("epoch %d: %s", epoch + 1, _figures(row))
        if state["stopped_early"]:
            log.info("early stop: validation mAP@100 has not risen for %d epochs; best epoch %d",
                     state["bad_epochs"], state["best_epoch"])
    reference = state["history"][0].get("val_map@100", state["history"][0].get("unseen_map@100")) \
        if state["history"] and state["history"][0]["epoch"] == 0 else None
    if reference is not None and state["best_score"] < reference:
        log.warning("the trained descriptor validates below the ImageNet one (mAP@100 %.4f < %.4f): more photos, "
                    "fewer train_blocks or a lower learning_rate may help", state["best_score"], reference)
    return Result(state["history"], state["epoch"], state["best_epoch"], state["stopped_early"], best,
                  float(np.median(step_times)) if step_times else float("nan"))


def _figures(row: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")


def write_curves(path: Path, history: list[dict]) -> None:
    """``training.csv``: one row per epoch, the columns of :data:`CURVE_COLUMNS` (empty when not
    measured); epoch 0 is the ImageNet descriptor's validation, before training."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CURVE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buffer.getvalue())
