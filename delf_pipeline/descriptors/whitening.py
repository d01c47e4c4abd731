"""Whitening of global descriptors, learned once on the index and applied to index and queries.

Two ways to learn it, both returning a :class:`Whitening` (``mean`` [D], ``projection`` [d, D]);
applying it is ``normalize((x - mean) @ projection.T)``:

* :func:`learn_pca_whitening`: PCA-whitening (Jegou & Chum 2012), the covariance shrunk
  towards a multiple of the identity, ``(1 - s) C + s (trace(C) / r) I`` over the r principal
  axes kept, so that few images (r close to their number) do not blow up noise directions.
* :func:`learn_supervised_whitening`: Radenovic, Tolias & Chum 2018 ("Fine-tuning CNN image
  retrieval with no human annotation", section learned whitening): the scatter of the
  differences of matching pairs (here every pair of index images with the same label) is
  whitened by the inverse of its Cholesky factor, then the whitened data are rotated onto
  their principal axes (a rotation, no further scaling).

Descriptors of dimension D larger than the number of images N (RootSIFT-VLAD: 32768) are
first projected onto their r <= N - 1 principal axes (computed from the N x N Gram matrix),
so no D x D matrix is ever formed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

EPS = 1e-12


@dataclass(frozen=True)
class Whitening:
    """A learned whitening: ``mean`` [D] float32 and ``projection`` [d, D] float32."""

    mean: np.ndarray
    projection: np.ndarray

    def apply(self, descriptors: np.ndarray) -> np.ndarray:
        """descriptors [N, D] -> whitened, L2-normalised float32 [N, d]."""
        x = np.asarray(descriptors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"whitening learned on {self.mean.shape[0]}-d descriptors, got shape {x.shape}")
        return l2_normalize((x - self.mean) @ self.projection.T)

    def save(self, path: str | Path) -> None:
        """Write ``mean`` and ``projection`` to an ``.npz`` file (the caller makes it atomic)."""
        with open(path, "wb") as handle:
            np.savez(handle, mean=self.mean, projection=self.projection)

    @classmethod
    def load(cls, path: str | Path) -> "Whitening":
        with np.load(path) as data:
            if set(data.files) != {"mean", "projection"}:
                raise ValueError(f"{path}: a whitening file holds mean and projection, found {sorted(data.files)}")
            return cls(data["mean"], data["projection"])


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of x [N, D] divided by their L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)


def learn_pca_whitening(descriptors: np.ndarray, dim: int = 0, shrinkage: float = 0.0) -> Whitening:
    """PCA-whitening of descriptors [N, D] onto their top ``dim`` axes (0: all of the r <= min(D, N-1)).

    With eigenvalues l_i of the covariance on the kept axes, each axis is divided by
    sqrt((1 - shrinkage) l_i + shrinkage mean(l)); shrinkage in [0, 1], 1 gives a plain PCA
    rotation (no whitening). Deterministic: each axis is signed so its largest entry is positive.
    """
    x = _check_descriptors(descriptors)
    _check_fraction(shrinkage, "shrinkage")
    mean = x.mean(axis=0)
    values, axes = _principal_axes(x - mean)
    values, axes = _keep(values, axes, dim)
    shrunk = (1.0 - shrinkage) * values + shrinkage * values.mean()
    return Whitening(mean.astype(np.float32), (axes / np.sqrt(shrunk)[:, None]).astype(np.float32))


def learn_supervised_whitening(descriptors: np.ndarray, labels: np.ndarray, dim: int = 0,
                               shrinkage: float = 0.0) -> Whitening:
    """Radenovic et al. 2018 learned whitening from labels [N] of descriptors [N, D].

    Matching pairs are all pairs of images with the same label (labels of None or "" take
    part in no pair). Their difference scatter S_w (per pair, shrunk by ``shrinkage`` towards
    ``trace(S_w) / r * I``) is whitened by ``inv(cholesky(S_w))``; the whitened data are then
    rotated onto their principal axes, of which the top ``dim`` are kept (0: all).
    """
    x = _check_descriptors(descriptors)
    _check_fraction(shrinkage, "shrinkage")
    labels = np.asarray(labels, dtype=object)
    if labels.shape != (len(x),):
        raise ValueError(f"need one label per descriptor: {len(x)} descriptors, labels of shape {labels.shape}")
    mean = x.mean(axis=0)
    _, basis = _principal_axes(x - mean)  # [r, D]: exact for the data, so nothing is lost
    reduced = (x - mean) @ basis.T
    scatter = pair_scatter(reduced, labels)
    scatter = (1.0 - shrinkage) * scatter + shrinkage * np.trace(scatter) / len(scatter) * np.eye(len(scatter))
    try:
        inverse_factor = np.linalg.inv(np.linalg.cholesky(scatter))
    except np.linalg.LinAlgError:
        raise ValueError("the same-label pairs do not span the descriptors' space: raise shortlist.whitening_shrinkage "
                         "above 0 or label more images") from None
    whitened = reduced @ inverse_factor.T
    values, rotation = _principal_axes(whitened - whitened.mean(axis=0))
    _, rotation = _keep(values, rotation, dim)
    return Whitening(mean.astype(np.float32), (rotation @ inverse_factor @ basis).astype(np.float32))


def pair_scatter(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean of (x_i - x_j)(x_i - x_j)^T over pairs i < j with equal labels: [D, D] from x [N, D].

    Uses sum_{i<j in class}(x_i - x_j)(x_i - x_j)^T = n_c sum_{i in class}(x_i - m_c)(x_i - m_c)^T,
    so no pair is enumerated.
    """
    total, pairs = np.zeros((x.shape[1], x.shape[1])), 0
    for label in set(labels.tolist()) - {None, ""}:
        members = x[labels == label]
        if len(members) > 1:
            centred = members - members.mean(axis=0)
            total += len(members) * centred.T @ centred
            pairs += len(members) * (len(members) - 1) // 2
    if not pairs:
        raise ValueError("supervised whitening needs at least one pair of index images with the same label")
    return total / pairs


def _principal_axes(centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues [r], axes [r, D]) of the covariance of centred [N, D], largest first, r = rank.

    Through the N x N Gram matrix when N < D. Each axis is signed so its largest entry is positive.
    """
    n = len(centred)
    if n < centred.shape[1]:
        values, vectors = np.linalg.eigh(centred @ centred.T / (n - 1))
        axes = (centred.T @ vectors).T
        axes /= np.maximum(np.linalg.norm(axes, axis=1, keepdims=True), EPS)
    else:
        values, vectors = np.linalg.eigh(centred.T @ centred / (n - 1))
        axes = vectors.T
    order = np.argsort(values)[::-1]
    values, axes = values[order], axes[order]
    rank = int(np.sum(values > values[0] * 1e-10)) if len(values) and values[0] > 0 else 0
    if not rank:
        raise ValueError("whitening needs descriptors that are not all equal")
    values, axes = values[:rank], axes[:rank]
    axes *= np.sign(axes[np.arange(rank), np.abs(axes).argmax(axis=1)])[:, None]
    return values, axes


def _keep(values: np.ndarray, axes: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if dim < 0:
        raise ValueError(f"whitening dim must be >= 0 (0 keeps all), got {dim}")
    if dim > len(values):
        raise ValueError(f"whitening to {dim} dims, but the descriptors span only {len(values)}: "
                         "lower shortlist.whitening_dim or use more index images")
    return (values[:dim], axes[:dim]) if dim else (values, axes)


def _check_descriptors(descriptors: np.ndarray) -> np.ndarray:
    x = np.asarray(descriptors, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"whitening needs descriptors [N, D] with N >= 2, got shape {x.shape}")
    return x


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"whitening {name} must be in [0, 1], got {value}")
