"""Golden values of the default backend's maths and of the artifact helpers, worked by hand
(tensorflow/models research/delf style: small inputs, exact expected outputs)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from delf_pipeline.extractors.rootsift import root_sift
from delf_pipeline.extractors.vlad import _kmeans_plus_plus, learn_codebook, vlad
from delf_pipeline.utils.artifacts import (
    atomic_path,
    check_manifest,
    fingerprint,
    parse_shard,
    select_shard,
    write_json_atomic,
)


def sift(entries: dict[int, float]) -> np.ndarray:
    """A [1, 128] SIFT vector, zero but for ``entries`` (index -> value)."""
    vector = np.zeros((1, 128), np.float32)
    for index, value in entries.items():
        vector[0, index] = value
    return vector


@pytest.mark.parametrize("entries, expected", [
    ({0: 36, 1: 64}, {0: 0.6, 1: 0.8}),  # L1: 36/100, 64/100; sqrt: 0.6, 0.8
    ({5: 1, 127: 3}, {5: 0.5, 127: np.sqrt(0.75)}),  # L1: 1/4, 3/4
    ({7: 512}, {7: 1.0}),  # one bin holds everything
    ({}, {}),  # no gradient at all: stays zero, no division by zero
])
def test_root_sift_of_known_sift_vectors(entries, expected):
    np.testing.assert_allclose(root_sift(sift(entries)), sift(expected), rtol=0, atol=1e-7)


def test_root_sift_of_no_descriptors_is_empty():
    assert root_sift(np.zeros((0, 128), np.float32)).shape == (0, 128)


def test_vlad_hand_worked():
    # words c0 = (0, 0), c1 = (1, 1); x0 = (0.5, 0) and x1 = (0, -0.25) are nearest c0, x2 = (1, 2) c1.
    # residual sums: c0 (0.5, -0.25), c1 (0, 1) -> signed sqrt (sqrt(.5), -.5, 0, 1), squared norm 1.75
    # -> (sqrt(2/7), -sqrt(1/7), 0, sqrt(4/7))
    codebook = np.array([[0, 0], [1, 1]], np.float32)
    descriptors = np.array([[0.5, 0], [0, -0.25], [1, 2]], np.float32)
    expected = [np.sqrt(2 / 7), -np.sqrt(1 / 7), 0, np.sqrt(4 / 7)]
    np.testing.assert_allclose(vlad(descriptors, codebook), expected, rtol=1e-6)


def test_vlad_of_no_descriptors_is_all_zeros():
    assert np.array_equal(vlad(np.zeros((0, 2), np.float32), np.eye(2, dtype=np.float32)), np.zeros(4))


@pytest.mark.parametrize("seed, expected", [(0, [11, 0, 1]), (1, [3, 11, 0]), (2, [11, 0, 3])])
def test_kmeans_plus_plus_seeding_under_a_seed(seed, expected):
    # recorded from numpy's PCG64 stream: a change here changes every learned codebook
    data = np.array([[0], [1], [3], [10], [11]], np.float32)
    assert _kmeans_plus_plus(data, 3, np.random.default_rng(seed)).ravel().tolist() == expected


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_plus_plus_never_seeds_a_point_twice(seed):
    # once a point is a centre, its copies are at distance 0: probability 0 of being drawn again
    data = np.array([[0, 0], [0, 0], [0, 0], [5, 5], [5, 5], [9, 0]], np.float32)
    centres = _kmeans_plus_plus(data, 3, np.random.default_rng(seed))
    assert sorted(map(tuple, centres.tolist())) == [(0, 0), (5, 5), (9, 0)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_codebook_of_two_separated_clusters_is_their_means(seed):
    # clusters {(0, 0), (0, 2)} and {(10, 10), (10, 12)}: whatever the seeding, Lloyd ends at the means
    data = np.array([[0, 0], [0, 2], [10, 10], [10, 12]], np.float32)
    words = learn_codebook(data, 2, seed)
    assert sorted(map(tuple, words.tolist())) == [(0, 1), (10, 11)]


def test_codebook_needs_as_many_descriptors_as_words():
    with pytest.raises(ValueError, match="cannot learn a 3-word codebook from 2 descriptors"):
        learn_codebook(np.zeros((2, 4), np.float32), 3, 0)


# ---------------------------------------------------------------- artifact helpers


def test_fingerprint_is_stable_and_ignores_key_order():
    # recorded: every manifest holds such hashes, so this value must never change silently
    assert fingerprint({"b": [1, 2.5], "a": "x"}) == "801757ba9961" == fingerprint({"a": "x", "b": [1, 2.5]})


@pytest.mark.parametrize("text, expected", [(None, (1, 1)), ("", (1, 1)), ("1/1", (1, 1)), ("2/4", (2, 4))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "2-4", "a/b", "2/0"])
def test_parse_shard_refuses(text):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


@pytest.mark.parametrize("shard, expected", [((1, 1), list(range(7))), ((1, 3), [0, 3, 6]), ((2, 3), [1, 4]),
                                             ((3, 3), [2, 5]), ((4, 4), [3])])
def test_select_shard(shard, expected):
    assert select_shard(list(range(7)), shard) == expected


def test_select_shard_of_nothing_is_nothing():
    assert select_shard([], (2, 3)) == []


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_json_atomic_writes_sorted_indented_text(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_check_manifest_writes_then_names_each_changed_key(tmp_path):
    path = tmp_path / "manifest.json"
    check_manifest(path, {"settings": {"top_k": 3, "seed": 0}, "rows": 5}, what="thing")
    assert json.loads(path.read_text()) == {"settings": {"top_k": 3, "seed": 0}, "rows": 5}
    check_manifest(path, {"settings": {"top_k": 3, "seed": 0}, "rows": 5}, what="thing")  # same: accepted
    with pytest.raises(ValueError) as error:
        check_manifest(path, {"settings": {"top_k": 4, "seed": 0, "new": 1}, "rows": 5}, what="thing")
    assert str(error.value) == (
        f"thing at {tmp_path} was made with other settings (settings.new: not recorded (older manifest), now 1; "
        "settings.top_k: was 3, now 4). Use --overwrite to rebuild it or choose another output folder.")
