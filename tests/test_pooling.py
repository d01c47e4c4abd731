"""Golden tests of descriptors.pooling: each pooling against its formula on a small map."""
from __future__ import annotations

import numpy as np
import pytest

from delf_pipeline.descriptors.pooling import gem, mac, pool, pool_multiscale, rmac, rmac_regions, spoc

# a 2 x 2 map of 2 channels: channel 0 holds 1, 2, 3, 4; channel 1 holds 0, 0, 0, 8
MAP = np.array([[[1.0, 0.0], [2.0, 0.0]], [[3.0, 0.0], [4.0, 8.0]]])


def test_mac_and_spoc_by_hand():
    np.testing.assert_allclose(mac(MAP), [4.0, 8.0])
    np.testing.assert_allclose(spoc(MAP), [2.5, 2.0])


def test_gem_by_hand():
    """p = 2: channel 0 sqrt((1 + 4 + 9 + 16) / 4) = sqrt(7.5); channel 1 sqrt(64 / 4) = 4."""
    np.testing.assert_allclose(gem(MAP, p=2), [np.sqrt(7.5), 4.0], rtol=1e-6)
    # p = 3: cube root of (1 + 8 + 27 + 64) / 4 = 25, and of 512 / 4 = 128
    np.testing.assert_allclose(gem(MAP, p=3), [25 ** (1 / 3), 128 ** (1 / 3)], rtol=1e-6)
    np.testing.assert_allclose(gem(MAP, p=1), spoc(MAP), rtol=1e-5)  # zeros clip to eps
    np.testing.assert_allclose(gem(MAP, p=200), mac(MAP), rtol=0.01)  # tends to MAC


def test_rmac_regions_square_map():
    """3 x 3 map, 2 levels: level 1 one region of side 3; level 2 four regions of side 2."""
    assert rmac_regions(3, 3, levels=2) == [(0, 0, 3), (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]


def test_rmac_regions_wide_map():
    """4 x 6: level-1 squares of side 4; one extra region (overlap 2/4 = 50%, closest to 40%
    of the candidates 50%, 75%, 83%, ...): starts 0 and 2. Level 2: side 2, 2 rows x 3 columns."""
    assert rmac_regions(4, 6, levels=2) == [(0, 0, 4), (0, 2, 4)] + [
        (top, left, 2) for top in (0, 2) for left in (0, 2, 4)]
    assert rmac_regions(6, 4, levels=1) == [(0, 0, 4), (2, 0, 4)]  # tall: the same along rows


def test_rmac_by_hand():
    """Level 1 of a 2 x 2 map: one region, the whole map (MAC (4, 8)). Level 2: side 1, the
    four single cells (1, 0), (2, 0), (3, 0), (4, 8), each normalised: (1, 0) x 3 and (1, 2)/sqrt(5)."""
    expected = np.array([4.0, 8.0]) / np.sqrt(80) + 3 * np.array([1.0, 0.0]) + np.array([1.0, 2.0]) / np.sqrt(5)
    np.testing.assert_allclose(rmac(MAP, levels=2), expected, rtol=1e-6)
    np.testing.assert_allclose(rmac(MAP, levels=1), mac(MAP) / np.linalg.norm(mac(MAP)), rtol=1e-6)


@pytest.mark.parametrize("method", ["gem", "mac", "spoc", "rmac"])
def test_pool_is_normalised(method):
    out = pool(np.random.default_rng(0).random((5, 7, 3)), method)
    assert out.shape == (3,)
    np.testing.assert_allclose(np.linalg.norm(out), 1.0, rtol=1e-6)


def test_pool_multiscale_by_hand():
    """MAC of two scales (4, 8) and (1, 0): normalised (1, 2)/sqrt(5) + (1, 0), normalised."""
    out = pool_multiscale([MAP, np.array([[[1.0, 0.0]]])], "mac")
    np.testing.assert_allclose(out, (np.array([1, 2]) / np.sqrt(5) + [1, 0]) / np.linalg.norm(
        np.array([1, 2]) / np.sqrt(5) + [1, 0]), rtol=1e-6)


@pytest.mark.parametrize("shape", [(0, 3, 2), (3, 0, 2), (3, 2)])
def test_empty_map_is_refused(shape):
    with pytest.raises(ValueError, match="feature map"):
        pool(np.zeros(shape), "mac")


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="pooling method"):
        pool(MAP, "sum")
    with pytest.raises(ValueError, match="p must be > 0"):
        gem(MAP, p=0)
    with pytest.raises(ValueError, match="levels"):
        rmac_regions(3, 3, levels=0)
    with pytest.raises(ValueError, match="at least one"):
        pool_multiscale([])
