"""Unit tests of the training core (delf_pipeline.training): hand-worked values, no training run.

The runs themselves (CLI, resume after kill -9, export, `run --model`) are in test_train.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from delf_pipeline.formats.images import ImageRecord
from delf_pipeline.training import augment, data, losses, validation

# --------------------------------------------------------------------------- losses


def test_dynamic_margins_hand_worked():
    # n^-1/4 of 1, 16, 81: 1, 1/2, 1/3; margins run from 0.05 (81 images) to 0.5 (1 image)
    margins = losses.dynamic_margins(np.array([1, 16, 81]), 0.05, 0.5)
    a = 0.45 / (1 - 1 / 3)
    np.testing.assert_allclose(margins, [0.5, a * 0.5 + 0.05 - a / 3, 0.05], rtol=1e-6)
    assert margins.dtype == np.float32


def test_dynamic_margins_fall_as_classes_grow_and_equal_counts_get_the_upper_bound():
    margins = losses.dynamic_margins(np.array([3, 24, 8, 24]), 0.1, 0.4)
    assert margins[1] == margins[3] == pytest.approx(0.1) and margins[0] == pytest.approx(0.4)
    assert margins[0] > margins[2] > margins[1]
    np.testing.assert_allclose(losses.dynamic_margins(np.array([5, 5]), 0.05, 0.5), [0.5, 0.5])


def test_dynamic_margins_must_not_cross():
    with pytest.raises(ValueError, match="train.margin_min must be <= train.margin_max"):
        losses.dynamic_margins(np.array([1, 2]), 0.6, 0.5)


@pytest.mark.parametrize("counts", [[], [0, 3], [[1, 2]]])
def test_dynamic_margins_reject_bad_counts(counts):
    with pytest.raises(ValueError, match="class counts"):
        losses.dynamic_margins(np.array(counts), 0.05, 0.5)


def _numpy_arcface(cosines, labels, margins, scale):
    total = 0.0
    for row, label in zip(cosines, labels):
        theta, m = math.acos(row[label]), margins[label]
        logits = np.array(row, np.float64)
        logits[label] = math.cos(theta + m) if theta + m < math.pi else row[label] - m * math.sin(m)
        logits *= scale
        total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[label]
    return total / len(labels)


def test_arcface_loss_matches_the_formula():
    pytest.importorskip("tensorflow")
    cosines = np.array([[0.8, 0.1, -0.3], [0.2, 0.5, 0.4], [-0.95, 0.3, 0.0]], np.float32)
    labels = np.array([0, 2, 0])  # the last one's theta + m passes pi: the continuation
    margins = np.array([0.5, 0.2, 0.3], np.float32)
    loss = float(losses.arcface_loss(cosines, labels, margins, 30.0))
    assert loss == pytest.approx(_numpy_arcface(cosines, labels, margins, 30.0), rel=1e-5)


def test_zero_margin_is_plain_softmax_cross_entropy():
    pytest.importorskip("tensorflow")
    cosines = np.array([[0.3, -0.2], [0.1, 0.6]], np.float32)
    loss = float(losses.arcface_loss(cosines, np.array([1, 1]), np.zeros(2, np.float32), 2.0))
    logits = 2.0 * cosines.astype(np.float64)
    expected = np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[:, 1])
    assert loss == pytest.approx(expected, rel=1e-6)


def test_subcenters_give_each_class_its_best_centre():
    pytest.importorskip("tensorflow")
    centres = losses.make_centres(classes=2, subcenters=3, dim=2, seed=0)
    centres(np.zeros((1, 2), np.float32))
    # class 0: centres along x, -x, y; class 1: along -y (three times)
    centres.kernel.assign(np.array([[1, -1, 0, 0, 0, 0], [0, 0, 1, -1, -1, -1]], np.float32))
    cosines = centres(np.array([[0, 2], [3, 0], [0, -1]], np.float32)).numpy()
    np.testing.assert_allclose(cosines, [[1, -1], [1, 0], [0, 1]], atol=1e-6)


# --------------------------------------------------------------------------- augmentation


def test_draws_are_seeded_and_stay_in_the_image():
    first = [augment.draw(np.random.default_rng(7), 1.5) for _ in range(3)]
    assert first == [augment.draw(np.random.default_rng(7), 1.5) for _ in range(3)]
    rng = np.random.default_rng(0)
    for aspect in (0.5, 1.0, 2.0):
        for _ in range(200):
            aug = augment.draw(rng, aspect)
            assert 0 < aug.height <= 1 and 0 < aug.width <= 1 and not aug.flip
            assert aug.height / 2 - 1e-9 <= aug.centre_y <= 1 - aug.height / 2 + 1e-9
            assert aug.width / 2 - 1e-9 <= aug.centre_x <= 1 - aug.width / 2 + 1e-9
            assert abs(aug.degrees) <= augment.ROTATION_DEGREES
            assert augment.AREA[0] - 1e-9 <= aug.height * aug.width <= 1 + 1e-9


def test_flip_is_drawn_only_when_allowed():
    rng = np.random.default_rng(3)
    assert any(augment.draw(rng, 1.0, flip=True).flip for _ in range(20))


def test_whole_image_unrotated_is_a_plain_resize():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = augment.Augmentation(0.5, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, flip=False)
    np.testing.assert_array_equal(augment.apply(image, whole, 64), image)
    flipped = augment.apply(image, augment.Augmentation(0.5, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, flip=True), 64)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    assert augment.apply(image, whole, 32).shape == (32, 32, 3)


def test_crop_takes_the_right_part():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 40:] = 200  # right half bright
    right = augment.Augmentation(0.5, 0.75, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0, flip=False)
    assert augment.apply(image, right, 16)[2:-2, 2:-2].min() == 200


def test_colour_factors_hand_worked():
    image = np.array([[[100, 50, 0]]], np.uint8)
    np.testing.assert_array_equal(augment.colour(image, 1.0, 1.0, 1.0), image)
    np.testing.assert_array_equal(augment.colour(image, 2.0, 1.0, 1.0), [[[200, 100, 0]]])
    grey = 0.299 * 100 + 0.587 * 50
    np.testing.assert_array_equal(augment.colour(image, 1.0, 1.0, 0.0), np.full((1, 1, 3), int(grey + 0.5)))


def test_resize_longest():
    image = np.zeros((30, 60, 3), np.uint8)
    assert augment.resize_longest(image, 120).shape == (60, 120, 3)
    assert augment.resize_longest(image, 60) is image


# --------------------------------------------------------------------------- data


def examples(counts: dict[str, int]) -> list[data.Example]:
    return [data.Example(f"{place}/{i:02d}", f"/x/{place}/{i}.jpg", place) for place, n in counts.items()
            for i in range(n)]


def test_labels_come_from_the_record_else_the_place_folder():
    records = [ImageRecord("a/1", "/x/a/1.jpg"), ImageRecord("2", "/x/2.jpg", "77"), ImageRecord("3", "/x/3.jpg")]
    found, unlabelled = data.examples_of(records)
    assert [(e.id, e.label) for e in found] == [("a/1", "a"), ("2", "77")]
    assert [e.id for e in unlabelled] == ["3"] and "no label" in unlabelled[0].reason


def test_split_by_image_is_seeded_and_leaves_every_place_a_training_image():
    given = examples({"a": 10, "b": 4, "c": 1, "d": 2})
    chosen = data.split(given, 0.5, 0, seed=1)
    assert chosen == data.split(list(reversed(given)), 0.5, 0, seed=1)
    assert chosen != data.split(given, 0.5, 0, seed=2)
    held = {p: sum(e.label == p for e in chosen.val) for p in "abcd"}
    assert held == {"a": 5, "b": 2, "c": 0, "d": 1}
    assert chosen.classes == ["a", "b", "c", "d"] and not chosen.unseen
    assert sorted(e.id for e in chosen.train + chosen.val) == sorted(e.id for e in given)
    assert list(chosen.counts()) == [5, 2, 1, 1]
    assert [chosen.classes[i] for i in chosen.class_indices()] == [e.label for e in chosen.train]


def test_split_by_place_holds_out_whole_places():
    chosen = data.split(examples({"a": 3, "b": 3, "c": 3, "d": 1, "e": 2}), 0.0, 2, seed=0)
    unseen = {e.label for e in chosen.unseen}
    assert len(unseen) == 2 and "d" not in unseen and not chosen.val
    assert not unseen & set(chosen.classes) and len(chosen.classes) == 3
    with pytest.raises(ValueError, match="val_places=4 leaves too few places"):
        data.split(examples({"a": 3, "b": 3, "c": 3, "d": 3}), 0.0, 4, seed=0)


def test_epoch_plans_depend_on_seed_and_epoch_only():
    classes = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    aspects = np.linspace(0.5, 2.0, len(classes))

    def plan(epoch, seed=0, **kw):
        return data.epoch_plan(classes, aspects, epoch, seed=seed, batch_size=4, balanced=kw.get("balanced", False),
                               flip=False)

    first = plan(3)
    assert len(first) == 2 and all(len(step.positions) == 4 for step in first)  # 10 // 4 full batches
    assert all(np.array_equal(a.positions, b.positions) and a.augmentations == b.augmentations
               for a, b in zip(first, plan(3)))
    assert not np.array_equal(first[0].positions, plan(4)[0].positions)
    assert not np.array_equal(first[0].positions, plan(3, seed=1)[0].positions)
    unique = np.concatenate([s.positions for s in first])
    assert len(set(unique.tolist())) == 8  # a permutation: no image twice in an epoch
    drawn = np.concatenate([s.positions for e in range(30) for s in plan(e, balanced=True)])
    share = np.bincount(classes[drawn]) / len(drawn)
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.05)  # balanced: classes, not images, equally often


def test_small_sets_train_in_one_batch_of_all_images():
    plan = data.epoch_plan(np.array([0, 1, 1]), np.ones(3), 0, seed=0, batch_size=16, balanced=False, flip=False)
    assert len(plan) == 1 and sorted(plan[0].positions.tolist()) == [0, 1, 2]


def test_batches_come_in_plan_order():
    images = [np.full((20, 30, 3), 10 * i, np.uint8) for i in range(6)]
    plan = data.epoch_plan(np.zeros(6, int), np.full(6, 1.5), 0, seed=0, batch_size=2, balanced=False, flip=False)
    made = list(data.batches(plan, images, 8, workers=2, lookahead=1))
    assert [b.shape for b in made] == [(2, 8, 8, 3)] * 3 and made[0].dtype == np.float32
    for step, batch in zip(plan, made):
        expected = np.stack([augment.apply(images[i], a, 8) for i, a in zip(step.positions, step.augmentations)])
        np.testing.assert_array_equal(batch, expected)


# --------------------------------------------------------------------------- validation


def test_validation_figures_hand_worked():
    # four images: two of place a (0, 1), two of b (2, 3)
    vectors = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], np.float32)
    found = validation.figures(vectors, np.array(["a", "a", "b", "b"]), np.array([1, 3]))
    # query 1: similarities 0.8 (0), 0.96 (2), 0.6 (3): ranking 2, 0, 3 -> AP 1/2, top-1 wrong
    # query 3: similarities 0 (0), 0.6 (1), 0.8 (2): ranking 2, 1, 0 -> AP 1, top-1 right
    assert found["map@100"] == pytest.approx(0.75) and found["top1"] == pytest.approx(0.5)
    # pooled by confidence: q1's wrong b (0.96), then q3's right b (0.8) at precision 1/2: GAP = (1/2) / 2
    assert found["gap"] == pytest.approx(0.25) and found["queries"] == 2


def test_validation_needs_queries():
    with pytest.raises(ValueError, match="at least one query"):
        validation.figures(np.eye(2, dtype=np.float32), np.array(["a", "a"]), np.array([], int))
