"""Tests of the match pictures: hand-made stores and images with known matches, for the
descriptor sizes of every backend (DELF v1 40, DELG 128, RootSIFT 128), and the command."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from delf_pipeline import cli
from delf_pipeline.config import load_config
from delf_pipeline.formats.features import ImageFeatures, l2_normalize
from delf_pipeline.formats.images import ImageError
from delf_pipeline.formats.run_folder import RunFolder
from delf_pipeline.formats.store import ExtractedImage, write_part
from delf_pipeline.tools.show_matches import (
    GAP,
    INLIER_RGB,
    TEXT_LINE,
    candidate_table,
    draw_matches,
    open_run,
    render_pair,
    safe_name,
    verify_recorded,
)
from delf_pipeline.verification.pairs import PairResult

SHIFT = np.array([12.0, -20.0])  # (dy, dx) from query to candidate
TRUE, FALSE = 30, 10  # true matches, and putative matches at random places


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """RGB uint8 [height, width, 3] noise, smoothed so it looks like a picture."""
    noise = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 2)


def pair_features(dim: int) -> tuple[ImageFeatures, ImageFeatures]:
    """Query and candidate features: TRUE matches shifted by SHIFT plus FALSE scattered ones."""
    rng = np.random.default_rng(dim)
    descriptors = l2_normalize(rng.normal(size=(TRUE + FALSE, dim)))
    loc_q = rng.uniform(40, 200, size=(TRUE + FALSE, 2)).astype(np.float32)
    loc_c = loc_q + SHIFT.astype(np.float32)
    loc_c[TRUE:] = rng.uniform(40, 200, size=(FALSE, 2))
    return _features(loc_q, descriptors), _features(loc_c, descriptors)


def _features(locations: np.ndarray, descriptors: np.ndarray) -> ImageFeatures:
    n = len(locations)
    return ImageFeatures(locations.astype(np.float32), descriptors, np.ones(n, np.float32), np.ones(n, np.float32),
                         l2_normalize(np.ones(8)))


def write_run(root, dim: int = 128, dtype: str = "float16", query: ImageFeatures | None = None):
    """A run folder (stores only) and an image folder: query "q" 240x260, candidate "c" 300x240."""
    default_q, default_c = pair_features(dim)
    query = default_q if query is None else query
    sizes = {"q": (240, 260), "c": (300, 240)}
    images = root / "images"
    images.mkdir(parents=True)
    for seed, (image_id, (h, w)) in enumerate(sizes.items()):
        cv2.imwrite(str(images / f"{image_id}.png"), texture(h, w, seed))
    for store, image_id, features in (("query", "q", query), ("index", "c", default_c)):
        part = root / "run" / "features" / store / "parts" / "0001-0001-000000"
        write_part(part, [ExtractedImage(image_id, features, sizes[image_id])], [], dtype, dim)
    return root / "run", images


def open_test_run(run_dir, images, **settings):
    overrides = ["rerank.verifier=magsac", "rerank.residual_threshold=4.0", "rerank.min_matches=4"]
    overrides += [f"rerank.{key}={value}" for key, value in settings.items()]
    return open_run(run_dir, images, load_config(overrides=overrides), overrides)


@pytest.mark.parametrize("dim, dtype", [(40, "float32"), (128, "float16"), (128, "float32")])
def test_verify_recorded_counts_the_true_matches(tmp_path, dim, dtype):
    run = open_test_run(*write_run(tmp_path, dim, dtype))
    pair = verify_recorded(run, "q", "c")
    result, query, candidate = pair.result, pair.query, pair.candidate
    assert (result.matches, result.inliers, result.status) == (TRUE + FALSE, TRUE, "ok")
    assert result.inlier_mask[:TRUE].all() and not result.inlier_mask[TRUE:].any()
    assert query.descriptors.shape == candidate.descriptors.shape == (TRUE + FALSE, dim)


@pytest.mark.parametrize("height", [120, 300])
def test_render_pair_writes_a_png_of_the_expected_size(tmp_path, height):
    run = open_test_run(*write_run(tmp_path))
    out = render_pair(run, "q", "c", tmp_path / "pictures" / "q" / "c.png", height=height)
    picture = cv2.imread(str(out))
    margin = 3 * TEXT_LINE + 10
    width = round(260 * height / 240) + GAP + round(240 * height / 300)
    assert picture.shape == (margin + height, width, 3)


def test_render_pair_jpeg(tmp_path):
    run = open_test_run(*write_run(tmp_path))
    out = render_pair(run, "q", "c", tmp_path / "pair.jpg", height=100)
    assert out.read_bytes()[:2] == b"\xff\xd8" and cv2.imread(str(out)).shape[0] == 3 * TEXT_LINE + 10 + 100


def test_render_pair_without_local_features(tmp_path):
    empty = ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros(0, np.float32),
                          np.zeros(0, np.float32), l2_normalize(np.ones(8)))
    run = open_test_run(*write_run(tmp_path, query=empty))
    result = verify_recorded(run, "q", "c").result
    assert (result.matches, result.inliers, result.status) == (0, 0, "too_few_matches")
    assert cv2.imread(str(render_pair(run, "q", "c", tmp_path / "empty.png", height=100))) is not None


def test_draw_matches_inliers_are_green_and_layout_is_exact():
    image_a = np.full((100, 50, 3), 128, np.uint8)
    image_b = np.full((50, 50, 3), 128, np.uint8)
    loc_a = np.array([[10.0, 10.0], [80.0, 40.0]])  # (y, x)
    loc_b = np.array([[5.0, 5.0], [40.0, 40.0]])
    result = PairResult(2, 1, "ok", np.array([[0, 0], [1, 1]]), np.array([True, False]))
    picture = draw_matches(image_a, image_b, loc_a, loc_b, result, caption=["one line"], height=100)
    margin = TEXT_LINE + 10
    assert picture.shape == (margin + 100, 50 + GAP + 100, 3)
    assert tuple(picture[margin + 10, 10]) == INLIER_RGB  # inlier end point in a, scale 1
    assert tuple(picture[margin + 10, 50 + GAP + 10]) == INLIER_RGB  # in b, scaled x2
    assert tuple(picture[margin + 80, 40]) != INLIER_RGB  # the putative match stays faint


@pytest.mark.parametrize("matches", [0, 3])
def test_draw_matches_empty_and_no_caption(matches):
    image = np.zeros((40, 30, 3), np.uint8)
    pairs = np.zeros((matches, 2), np.int64)
    result = PairResult(matches, 0, "too_few_matches", pairs, np.zeros(matches, bool))
    locations = np.full((3, 2), 5.0)
    picture = draw_matches(image, image, locations, locations, result, height=40)
    assert picture.shape == (40, 30 + GAP + 30, 3)


def test_draw_matches_rejects_tiny_height():
    image = np.zeros((40, 30, 3), np.uint8)
    result = PairResult(0, 0, "too_few_matches", np.zeros((0, 2), np.int64), np.zeros(0, bool))
    with pytest.raises(ValueError, match="height"):
        draw_matches(image, image, np.zeros((0, 2)), np.zeros((0, 2)), result, height=4)


def test_settings_come_from_the_rerank_manifest(tmp_path):
    run_dir, images = write_run(tmp_path)
    manifest = run_dir / "rerank.csv.blocks" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"settings": {"verifier": "affine2d", "residual_threshold": 3.0}}))
    run = open_run(run_dir, images, load_config(), ["rerank.max_trials=77"])
    assert (run.settings["verifier"], run.settings["residual_threshold"], run.settings["max_trials"]) == (
        "affine2d", 3.0, 77)


def test_unknown_image_source_and_wrong_image_are_reported(tmp_path):
    run_dir, images = write_run(tmp_path)
    (images / "c.png").unlink()
    run = open_test_run(run_dir, images)
    with pytest.raises(FileNotFoundError, match="no source file known for image 'c'"):
        render_pair(run, "q", "c", tmp_path / "x.png")
    cv2.imwrite(str(images / "c.png"), texture(10 + 300, 240, 0))
    run = open_test_run(run_dir, images)
    with pytest.raises(ImageError, match="not the image the run used"):
        render_pair(run, "q", "c", tmp_path / "x.png")


def test_candidate_table_joins_ranking_and_rerank(tmp_path):
    (tmp_path / "ranking.csv").write_text("query_id,index_id,rank,score\nq,a,1,2.5\nq,b,2,0.4\nq,c,3,0.1\n")
    (tmp_path / "rerank.csv").write_text("query_id,index_id,global_score,matches,inliers,score,status\n"
                                         "q,a,0.5,40,20,2.5,ok\n")
    table = candidate_table(RunFolder(tmp_path), top=2)
    expected = pd.DataFrame({"query_id": ["q", "q"], "index_id": ["a", "b"], "rank": [1, 2], "score": [2.5, 0.4],
                             "global_score": [0.5, 0.4], "matches": [40, -1], "inliers": [20, -1],
                             "status": ["ok", "not verified"]})
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)


def test_candidate_table_empty_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="finished run folder"):
        candidate_table(RunFolder(tmp_path), top=3)


def test_safe_name_keeps_plain_ids_and_separates_others():
    assert safe_name("04ad5b23e2fc5058") == "04ad5b23e2fc5058"
    assert safe_name("a/b") != safe_name("a_b") and "/" not in safe_name("a/b")


def test_command_writes_the_picture(tmp_path):
    run_dir, images = write_run(tmp_path)
    out = tmp_path / "cli.png"
    code = cli.main(["show-matches", "--run", str(run_dir), "--query", "q", "--candidate", "c", "--data", str(images),
                     "--out", str(out), "--height", "150", "--set", "rerank.verifier=magsac"])
    assert code == 0 and cv2.imread(str(out)).shape[0] == 3 * TEXT_LINE + 10 + 150


def test_global_only_index_store_reads_the_candidates_store(tmp_path):
    """extract.local_features=false: local features of candidates live in features/index-candidates."""
    run_dir, images = write_run(tmp_path)
    index = run_dir / "features" / "index"
    shutil.move(index, run_dir / "features" / "index-candidates")
    _, candidate = pair_features(128)
    global_only = ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros(0, np.float32),
                                np.zeros(0, np.float32), candidate.global_descriptor)
    write_part(index / "parts" / "0001-0001-000000", [ExtractedImage("c", global_only, (300, 240))], [], "float16", 128)
    run = open_test_run(run_dir, images)
    assert verify_recorded(run, "q", "c").result.inliers == TRUE
    assert cv2.imread(str(render_pair(run, "q", "c", tmp_path / "pair.png", height=100))) is not None


def test_a_run_matched_by_lighterglue_is_redrawn_by_lighterglue(tmp_path, xfeat_weights_file):
    """rerank.matcher = lighterglue (the xfeat_lighterglue preset's): the picture matches the pair
    again by LighterGlue, with the rerank's numbers (it ran the descriptor matcher's code, which
    refuses that matcher, and stopped)."""
    from support.synthetic_stores import place_view, write_store

    from delf_pipeline.verification.verifier import CandidateVerifier

    run_dir, images = tmp_path / "run", tmp_path / "images"
    views = {"query": {"q": place_view(0, 40, seed=1, global_seed=1)}, "index": {"c": place_view(0, 30, seed=2,
                                                                                              global_seed=2)}}
    for store, stored in views.items():
        write_store(run_dir / "features" / store, stored, 4, local_dim=64, extract_settings={"backend": "xfeat"})
    images.mkdir()
    for seed, image_id in enumerate(("q", "c")):
        cv2.imwrite(str(images / f"{image_id}.png"), texture(480, 640, seed))
    run = open_test_run(run_dir, images, matcher="lighterglue", cascade='""')
    row = CandidateVerifier(run.queries, run.index, run.settings).rerank_query("q", [("c", 0.5)])[0]
    pair = verify_recorded(run, "q", "c", row[6])
    assert (pair.result.matches, pair.counted(run.settings), pair.status) == (row[3], row[4], row[6])
    assert row[4] > 0 and pair.matched_by.startswith("lighterglue")
    assert render_pair(run, "q", "c", tmp_path / "pair.png", recorded={"inliers": row[4], "global_score": 0.5,
                                                                          "status": row[6]}).is_file()
