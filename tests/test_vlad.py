"""The stored VLAD model (extractors/vlad.py): words, and the PCA that reduces the VLAD packed after them."""
from __future__ import annotations

import numpy as np
import pytest

from delf_pipeline.extractors.vlad import learn_reduction, pack_codebook, unpack_codebook, vlad, vlad_global


def unit_rows(count, dim, seed):
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_pack_unpack_round_trip():
    words = unit_rows(4, 3, 0)
    assert unpack_codebook(pack_codebook(words), 4)[1] is None  # no reduction: the words alone
    mean, axes = np.arange(12, dtype=np.float32), unit_rows(2, 12, 1)
    packed = pack_codebook(words, mean, axes)
    assert packed.shape == (4 + 3 * 4, 3)
    got_words, got_mean, got_axes = unpack_codebook(packed, 4)
    np.testing.assert_array_equal(got_words, words)
    np.testing.assert_array_equal(got_mean, mean)
    np.testing.assert_array_equal(got_axes, axes)


@pytest.mark.parametrize("rows", [3, 6, 9])
def test_unpack_refuses_another_word_count(rows):
    with pytest.raises(ValueError, match="vlad_words"):
        unpack_codebook(np.zeros((rows, 3), np.float32), 4)


def test_reduction_is_the_principal_axes():
    rng = np.random.default_rng(2)
    vlads = rng.standard_normal((6, 10)) * np.array([5, 3, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    mean, axes = learn_reduction(vlads, 8)
    assert axes.shape == (5, 10)  # at most N - 1 axes
    np.testing.assert_allclose(mean, vlads.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(axes @ axes.T, np.eye(5), atol=1e-5)
    variance = ((vlads - mean) @ axes.T).var(axis=0)
    assert np.all(np.diff(variance) <= 1e-6)  # largest first
    assert learn_reduction(vlads, 2)[1].shape == (2, 10)
    with pytest.raises(ValueError, match="at least 2"):
        learn_reduction(vlads[:1], 2)


def test_vlad_global_projects_and_normalises():
    words, descriptors = unit_rows(4, 3, 3), unit_rows(20, 3, 4)
    full = vlad(descriptors, words)
    np.testing.assert_array_equal(vlad_global(descriptors, pack_codebook(words), 4), full)
    mean, axes = learn_reduction(np.stack([vlad(unit_rows(20, 3, s), words) for s in range(5, 10)]), 3)
    reduced = vlad_global(descriptors, pack_codebook(words, mean, axes), 4)
    expected = (full - mean) @ axes.T
    np.testing.assert_allclose(reduced, expected / np.linalg.norm(expected), atol=1e-6)
    assert np.array_equal(vlad_global(np.zeros((0, 3), np.float32), pack_codebook(words, mean, axes), 4), np.zeros(3))
