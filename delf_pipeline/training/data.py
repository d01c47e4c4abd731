"""Labelled photos for training: examples, the validation split, decoded images and epoch plans.

Randomness is drawn from ``numpy.random.default_rng((seed, STREAM, epoch))``: the split from
its own stream, each epoch's order and augmentations from (seed, epoch) alone, so an epoch
replayed after a resume is the same epoch, image for image and crop for crop.
"""
from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..formats.images import ErrorRecord, ImageRecord, iter_decoded
from ..utils.progress import track
from . import augment

log = logging.getLogger("delf_pipeline.training.data")

SPLIT_STREAM, EPOCH_STREAM = 0, 1  # the rng streams of the split and of the epoch plans


@dataclass(frozen=True)
class Example:
    """One labelled image: ``label`` is its place."""

    id: str
    path: str
    label: str


def examples_of(records: Sequence[ImageRecord]) -> tuple[list[Example], list[ErrorRecord]]:
    """Labelled examples of ``records``: the record's label, else (a folder of place folders) the
    first folder of its id. Images with neither are returned as error records, never dropped silently."""
    examples, unlabelled = [], []
    for record in records:
        label = record.label or (record.id.split("/")[0] if "/" in record.id else None)
        if label:
            examples.append(Example(record.id, str(record.path), str(label)))
        else:
            unlabelled.append(ErrorRecord(record.id, str(record.path), "no label: give a landmark_id, or put the "
                                          "image in a folder named after its place"))
    return examples, unlabelled


@dataclass(frozen=True)
class Split:
    """Training examples and the held-out ones: ``val`` (images of training places) and
    ``unseen`` (every image of the places held out whole). ``classes`` are the training
    labels, sorted; an example's class index is its label's position there."""

    train: list[Example]
    val: list[Example]
    unseen: list[Example]

    @property
    def classes(self) -> list[str]:
        return sorted({e.label for e in self.train})

    def class_indices(self) -> np.ndarray:
        """[len(train)] int32 class index of each training example."""
        index = {label: i for i, label in enumerate(self.classes)}
        return np.array([index[e.label] for e in self.train], np.int32)

    def counts(self) -> np.ndarray:
        """[classes] training images per class."""
        counted = Counter(e.label for e in self.train)
        return np.array([counted[label] for label in self.classes], np.int64)


def split(examples: Sequence[Example], val_share: float, val_places: int, seed: int) -> Split:
    """Hold out ``val_places`` whole places (drawn among places with 2+ images) and, of every
    other place, round(val_share x n) of its n images, always leaving one to train on.

    Deterministic in (examples, val_share, val_places, seed).
    """
    rng = np.random.default_rng((seed, SPLIT_STREAM))
    by_place: dict[str, list[Example]] = {}
    for example in sorted(examples, key=lambda e: e.id):
        by_place.setdefault(example.label, []).append(example)
    places = sorted(by_place)
    eligible = [p for p in places if len(by_place[p]) >= 2]
    if val_places > max(len(places) - 2, 0) or val_places > len(eligible):
        raise ValueError(f"train.val_places={val_places} leaves too few places: {len(places)} places, "
                         f"{len(eligible)} with 2+ images, and 2 must stay for training")
    held = set(rng.choice(eligible, size=val_places, replace=False).tolist()) if val_places else set()
    train, val, unseen = [], [], []
    for place in places:
        images = by_place[place]
        if place in held:
            unseen += images
            continue
        count = min(int(round(val_share * len(images))), len(images) - 1)
        chosen = set(rng.permutation(len(images))[:count].tolist())
        for i, example in enumerate(images):
            (val if i in chosen else train).append(example)
    return Split(train, val, unseen)


class ImageBank:
    """The images of some examples, decoded once (longest side at most ``longest``) and held in memory.

    Images that cannot be decoded are left out and listed in ``errors`` (id, path, reason).
    """

    def __init__(self, examples: Sequence[Example], longest: int):
        records = [ImageRecord(e.id, e.path, e.label) for e in examples]
        self.images: dict[str, np.ndarray] = {}
        self.errors: list[ErrorRecord] = []
        for record, image, _factors, error in track(iter_decoded(records, longest), len(records), "decoding images"):
            if error:
                self.errors.append(ErrorRecord(record.id, str(record.path), error))
            else:
                self.images[record.id] = image
        megabytes = sum(image.nbytes for image in self.images.values()) / 1e6
        log.info("%d images decoded (longest side %d px, %.0f MB in memory), %d unusable",
                 len(self.images), longest, megabytes, len(self.errors))

    def usable(self, examples: Sequence[Example]) -> list[Example]:
        return [e for e in examples if e.id in self.images]


@dataclass(frozen=True)
class Step:
    """One training step: positions into the training examples and their augmentations."""

    positions: np.ndarray
    augmentations: tuple[augment.Augmentation, ...]


def epoch_plan(class_index: np.ndarray, aspects: np.ndarray, epoch: int, *, seed: int, batch_size: int,
               balanced: bool, flip: bool) -> list[Step]:
    """The steps of ``epoch``, drawn from (seed, epoch) only.

    class_index: [N] class of each training example; aspects: [N] width / height of each.
    An epoch draws N images: a permutation, or with ``balanced`` a class uniformly then one of
    its images. Full batches of min(batch_size, N) only (the batch norm needs 2+ images).
    """
    rng = np.random.default_rng((seed, EPOCH_STREAM, epoch))
    count = len(class_index)
    if balanced:
        members = [np.flatnonzero(class_index == c) for c in range(int(class_index.max()) + 1)]
        classes = rng.integers(0, len(members), size=count)
        picks = rng.random(count)
        order = np.array([members[c][int(u * len(members[c]))] for c, u in zip(classes, picks)])
    else:
        order = rng.permutation(count)
    batch = min(batch_size, count)
    augmentations = [augment.draw(rng, float(aspects[i]), flip) for i in order]
    return [Step(order[start:start + batch], tuple(augmentations[start:start + batch]))
            for start in range(0, count - batch + 1, batch)]


def batches(plan: Sequence[Step], images: Sequence[np.ndarray], size: int, workers: int = 2,
            lookahead: int = 2) -> Iterator[np.ndarray]:
    """float32 [B, size, size, 3] pixel batches (0..255) of ``plan``, made in background threads
    while the caller trains on the previous ones; in plan order whatever the threads do."""
    def make(step: Step) -> np.ndarray:
        return np.stack([augment.apply(images[i], aug, size) for i, aug in zip(step.positions, step.augmentations)]
                        ).astype(np.float32)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="augment") as pool:
        pending = [pool.submit(make, step) for step in plan[:lookahead]]
        for index in range(len(plan)):
            if index + lookahead < len(plan):
                pending.append(pool.submit(make, plan[index + lookahead]))
            yield pending.pop(0).result()
