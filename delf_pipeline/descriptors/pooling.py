"""Pooling a convolutional feature map [H, W, C] into a global descriptor [C].

* MAC (Tolias et al. 2016): the maximum of each channel.
* SPoC (Babenko & Lempitsky 2015): the mean of each channel (sum pooling, up to a constant).
* GeM (Radenovic et al. 2018): ``(mean(x ** p)) ** (1 / p)`` per channel, x clipped at eps;
  p = 1 is SPoC, p -> infinity tends to MAC.
* R-MAC (Tolias et al. 2016): MAC of square regions at ``levels`` scales, each L2-normalised,
  summed. Level l has regions of side ``floor(2 min(H, W) / (l + 1))``: l along the shorter
  side and l + e along the longer one, evenly spaced from edge to edge, where e (0..6) is
  chosen once so that two neighbouring level-1 regions overlap as close to 40% as possible.

:func:`pool` returns the pooled vector L2-normalised. :func:`pool_multiscale` pools the maps
of several image scales and combines them as DELG does: each L2-normalised, summed, L2-normalised.
Feature maps are expected non-negative (after a ReLU); GeM clips them at ``eps``.
"""
from __future__ import annotations

import numpy as np

from .whitening import l2_normalize

METHODS = ("gem", "mac", "spoc", "rmac")
RMAC_OVERLAP = 0.4  # target overlap of neighbouring level-1 regions
RMAC_MAX_EXTRA = 6  # most extra level-1 regions along the longer side


def mac(feature_map: np.ndarray) -> np.ndarray:
    """[H, W, C] -> [C]: maximum over positions."""
    return _check_map(feature_map).max(axis=(0, 1))


def spoc(feature_map: np.ndarray) -> np.ndarray:
    """[H, W, C] -> [C]: mean over positions."""
    return _check_map(feature_map).mean(axis=(0, 1))


def gem(feature_map: np.ndarray, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """[H, W, C] -> [C]: generalised mean ``(mean(max(x, eps) ** p)) ** (1 / p)``."""
    if p <= 0:
        raise ValueError(f"GeM p must be > 0, got {p}")
    clipped = np.maximum(_check_map(feature_map), eps)
    return np.mean(clipped**p, axis=(0, 1)) ** (1.0 / p)


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """Square R-MAC regions of an H x W map as (top, left, side), level by level."""
    if levels < 1:
        raise ValueError(f"R-MAC levels must be >= 1, got {levels}")
    short, long_ = min(height, width), max(height, width)
    extra = _extra_regions(short, long_)
    regions = []
    for level in range(1, levels + 1):
        side = max(1, 2 * short // (level + 1))
        along_short = _starts(short, side, level)
        along_long = _starts(long_, side, level + extra if long_ > short else level)
        rows, cols = (along_short, along_long) if height <= width else (along_long, along_short)
        regions += [(top, left, side) for top in rows for left in cols]
    return regions


def _extra_regions(short: int, long_: int) -> int:
    """Extra level-1 regions along the longer side, so neighbours overlap closest to 40%."""
    if long_ == short:
        return 0
    best, best_gap = 1, np.inf
    for extra in range(1, RMAC_MAX_EXTRA + 1):
        step = (long_ - short) / extra  # level 1: extra + 1 regions of side `short`
        gap = abs(max(short - step, 0.0) / short - RMAC_OVERLAP)
        if gap < best_gap:
            best, best_gap = extra, gap
    return best


def _starts(length: int, side: int, count: int) -> list[int]:
    """``count`` region starts evenly spaced so the first touches 0 and the last the far edge."""
    if count <= 1:
        return [max(0, (length - side) // 2)]
    return sorted({int(round(i * (length - side) / (count - 1))) for i in range(count)})


def rmac(feature_map: np.ndarray, levels: int = 3) -> np.ndarray:
    """[H, W, C] -> [C]: sum of the L2-normalised MAC of every :func:`rmac_regions` region."""
    x = _check_map(feature_map)
    vectors = [x[top:top + side, left:left + side].max(axis=(0, 1))
               for top, left, side in rmac_regions(x.shape[0], x.shape[1], levels)]
    return l2_normalize(np.stack(vectors)).sum(axis=0)


def pool(feature_map: np.ndarray, method: str = "gem", p: float = 3.0, levels: int = 3) -> np.ndarray:
    """One map [H, W, C] -> L2-normalised descriptor [C] by ``method`` (gem, mac, spoc, rmac)."""
    if method == "gem":
        vector = gem(feature_map, p)
    elif method == "mac":
        vector = mac(feature_map)
    elif method == "spoc":
        vector = spoc(feature_map)
    elif method == "rmac":
        vector = rmac(feature_map, levels)
    else:
        raise ValueError(f"pooling method must be one of {', '.join(METHODS)}, got {method!r}")
    return l2_normalize(vector[None])[0]


def pool_multiscale(feature_maps: list[np.ndarray], method: str = "gem", p: float = 3.0,
                    levels: int = 3) -> np.ndarray:
    """Maps of several image scales [H_s, W_s, C] -> [C]: each pooled (L2-normalised), summed, L2-normalised."""
    if not feature_maps:
        raise ValueError("multi-scale pooling needs at least one feature map")
    return l2_normalize(np.sum([pool(m, method, p, levels) for m in feature_maps], axis=0)[None])[0]


def _check_map(feature_map: np.ndarray) -> np.ndarray:
    x = np.asarray(feature_map, np.float64)
    if x.ndim != 3 or not x.shape[0] or not x.shape[1]:
        raise ValueError(f"need a feature map [H, W, C] with H, W >= 1, got shape {x.shape}")
    return x
