"""Batched extraction (extract.batch_size): how the stage groups decoded images into batch
calls, and the wrappers (VLAD, global-only, hybrid) that must keep an extractor's batch call.

The extractor here is a fake batch extractor whose features encode the image it was given,
so a result stored under the wrong id or out of order shows; XFeat's own batch call is
tested in test_xfeat.py.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delf_pipeline import extract
from delf_pipeline.config import load_config
from delf_pipeline.extractors import build, stream
from delf_pipeline.extractors.base import BatchExtractor, extract_batch
from delf_pipeline.formats.features import ImageFeatures
from delf_pipeline.formats.store import FeatureStore, read_errors


def image_features(image: np.ndarray) -> ImageFeatures:
    """Two features at fixed points whose descriptors and global descriptor encode ``image``
    [H, W] or [H, W, 3]: (mean, height, width)."""
    code = np.array([image.mean(), image.shape[0], image.shape[1]], np.float32)
    locations = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    return ImageFeatures(locations, np.stack([code, code + 1]), np.ones(2, np.float32),
                         np.array([2.0, 1.0], np.float32), code / np.linalg.norm(code))


class Recorder(BatchExtractor):
    """A batch extractor (features: :func:`image_features`) recording each call's image shapes."""

    def __init__(self):
        self.calls: list[list[tuple]] = []

        def batch(images):
            self.calls.append([image.shape for image in images])
            return [image_features(image) for image in images]

        super().__init__(batch)


def decoded(shapes: list[tuple | None]) -> list[tuple]:
    """iter_decoded-like tuples (record, image, factors, error); None in ``shapes`` is a failed image."""
    return [(f"r{i}", None if shape is None else np.zeros(shape, np.uint8), np.ones(2), None if shape else "bad")
            for i, shape in enumerate(shapes)]


def groups(shapes: list[tuple | None], batch_size: int, part_size: int = 100) -> list[list[str]]:
    return [[item[0] for item in group] for group in stream.batches(decoded(shapes), batch_size, part_size)]


A, B = (4, 6), (6, 4)


@pytest.mark.parametrize("shapes, batch_size, part_size, expected", [
    ([], 8, 100, []),
    ([A, A, A], 8, 100, [["r0", "r1", "r2"]]),
    ([A, A, A], 2, 100, [["r0", "r1"], ["r2"]]),
    ([A, A, A], 1, 100, [["r0"], ["r1"], ["r2"]]),
    ([A, B, B, A], 8, 100, [["r0"], ["r1", "r2"], ["r3"]]),  # a new shape starts a new batch
    ([A, None, A, A], 2, 100, [["r0", "r1", "r2"], ["r3"]]),  # a failed image rides along, in place
    ([None, None, A], 1, 100, [["r0", "r1", "r2"]]),
    ([A, A, A, A, A], 8, 2, [["r0", "r1"], ["r2", "r3"], ["r4"]]),  # never across a part boundary
    ([A, None, A, A], 8, 2, [["r0", "r1"], ["r2", "r3"]]),
])
def test_batches_group_consecutive_images_of_one_shape(shapes, batch_size, part_size, expected):
    assert groups(shapes, batch_size, part_size) == expected


def write_mixed(folder: Path) -> list[str]:
    """PNG photos of two sizes with unreadable files between them; returns the ids in listing order."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    sizes = [(48, 64), (48, 64), None, (48, 64), (64, 48), (64, 48), None, (48, 64), (48, 64), (48, 64)]
    for i, size in enumerate(sizes):
        if size is None:
            (folder / f"im{i:02d}.png").write_bytes(b"not a picture")
        else:
            Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(folder / f"im{i:02d}.png")
    return [f"im{i:02d}" for i in range(len(sizes))]


def test_stage_batches_by_shape_and_keeps_order_and_errors(tmp_path):
    ids = write_mixed(tmp_path / "photos")
    config = load_config(overrides=["extract.batch_size=2", "extract.part_size=4", "extract.max_image_size=0"])
    batched = Recorder()
    store = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "batched", extractor=batched))
    # parts: im00-im03 (im02 unreadable), im04-im07 (im06 unreadable), im08-im09
    wide, tall = (48, 64, 3), (64, 48, 3)  # the default preset (XFeat) decodes in colour
    assert batched.calls == [[wide] * 2, [wide], [tall] * 2, [wide], [wide] * 2]
    config.extract.batch_size = 1
    single = FeatureStore(extract.run(config, tmp_path / "photos", tmp_path / "single", extractor=image_features))
    assert store.ids == single.ids == [i for i in ids if i not in ("im02", "im06")]
    assert [e.id for e in read_errors(tmp_path / "batched" / "errors.csv")] == ["im02", "im06"]
    for image_id in store.ids:
        mine, theirs = store.features(image_id), single.features(image_id)
        np.testing.assert_array_equal(mine.descriptors, theirs.descriptors)
        np.testing.assert_array_equal(mine.global_descriptor, theirs.global_descriptor)


def test_batch_size_one_calls_once_per_image(tmp_path):
    write_mixed(tmp_path / "photos")
    recorder = Recorder()
    extract.run(load_config(overrides=["extract.batch_size=1"]), tmp_path / "photos", tmp_path / "store",
                extractor=recorder)
    assert [len(call) for call in recorder.calls] == [1] * 8


def test_extract_batch_without_a_batch_call_goes_image_by_image():
    seen = []
    images = [np.full((4, 4), value, np.uint8) for value in (1, 2, 3)]
    found = extract_batch(lambda image: seen.append(image.mean()) or image_features(image), images)
    assert seen == [1, 2, 3] and [f.descriptors[0, 0] for f in found] == [1, 2, 3]
    assert extract_batch(Recorder(), []) == []


def check_one_batch_call(wrapped, inner: Recorder) -> list[ImageFeatures]:
    """``wrapped``'s batch of three images goes to ``inner`` as one call; returns its features."""
    images = [np.full((4, 6), value, np.uint8) for value in (10, 20, 30)]
    found = wrapped.batch(images)
    assert inner.calls == [[(4, 6)] * 3]
    assert [f.descriptors[0, 0] for f in found] == [10, 20, 30]
    return found


def test_vlad_wrapper_keeps_the_batch_call():
    inner, words = Recorder(), np.eye(3, dtype=np.float32)
    found = check_one_batch_call(build.vlad_extractor(inner, words), inner)
    assert all(f.global_descriptor.shape == (9,) for f in found)


def test_global_only_wrapper_keeps_the_batch_call(monkeypatch):
    inner = Recorder()
    monkeypatch.setattr(build, "_assemble", lambda *a: inner)
    conf = replace(load_config().extract, local_features=False)
    images = [np.full((4, 6), value, np.uint8) for value in (10, 20, 30)]
    found = build.build(conf).batch(images)
    assert inner.calls == [[(4, 6)] * 3]
    assert all(f.num_features == 0 for f in found)
    np.testing.assert_array_equal(found[1].global_descriptor, image_features(images[1]).global_descriptor)


def test_hybrid_wrapper_keeps_both_batch_calls():
    model, local = Recorder(), Recorder()
    found = check_one_batch_call(build.with_locals(model, local), local)
    assert model.calls == local.calls
    assert found[0].global_descriptor is not None
