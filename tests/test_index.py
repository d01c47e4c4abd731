"""The portable index (build, add, info, moved copies) and the query command, on a tiny set of
views of scikit-image photos (the demo's), plus the in-memory helpers they use."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from delf_pipeline import cli, index
from delf_pipeline.config import load_config
from delf_pipeline.formats.index_folder import open_index
from delf_pipeline.retrieval.search import select_matmul, top_k_in_memory
from delf_pipeline.search.searcher import Searcher

PRESET = "xfeat"  # a VLAD codebook in the store; the default preset's index: test_a_builtin_model_index_*
SMALL = ["extract.max_image_size=320", "extract.max_features=300", "extract.vlad_words=8",
         "rerank.num_to_rerank=4", "shortlist.top_k=8"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def write_views(folder: Path, names: tuple[str, ...], views: int, seed: int) -> Path:
    """``folder/NAME/vK.jpg`` views of scikit-image photos (320 px wide); returns ``folder``."""
    from delf_pipeline.tools.demo import load_photo, random_view

    rng = np.random.default_rng(seed)
    for name in names:
        photo = cv2.resize(load_photo(name), (320, 240), interpolation=cv2.INTER_AREA)
        (folder / name).mkdir(parents=True, exist_ok=True)
        for view in range(views):
            cv2.imwrite(str(folder / name / f"v{view}.jpg"), cv2.cvtColor(random_view(photo, rng), cv2.COLOR_RGB2BGR))
    return folder


def labels_csv(folder: Path, out: Path) -> Path:
    """``image,label`` rows (the landmarks_mini layout) for every view under ``folder``."""
    rows = [f"{p.relative_to(folder).as_posix()},{p.parent.name}" for p in sorted(folder.rglob("*.jpg"))]
    out.write_text("image,label\n" + "\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> dict:
    """Index views of three photos, more views of a fourth (to add), and query views of all four."""
    root = tmp_path_factory.mktemp("views")
    first = write_views(root / "first", PHOTOS[:3], 3, seed=1)
    more = write_views(root / "more", PHOTOS[3:], 3, seed=2)
    queries = write_views(root / "queries", PHOTOS, 1, seed=3)
    return {"root": root, "first": first, "more": more, "queries": queries}


@pytest.fixture(scope="module")
def built(views, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    labels = labels_csv(views["first"], views["root"] / "first.csv")
    return index.build(load_config(PRESET, overrides=SMALL), views["first"], out, labels=labels, previews=128)


def answer_without_timings(searcher: Searcher, photo: Path) -> dict:
    answer = searcher.search_file(photo).to_json()
    answer.pop("timings_ms")
    return answer


def test_build_writes_a_self_contained_index(built, views):
    for name in ("manifest.json", "config.json", "labels.csv", "store/manifest.json", "store/codebook.npy"):
        assert (built / name).is_file(), name
    facts = index.info(built)
    assert (facts["images"], facts["landmarks"], facts["labelled_images"], facts["errors"]) == (9, 3, 9, 0)
    assert facts["package_version"] == cli.__version__ and facts["codebook_words"] == 8
    assert len(list((built / "previews").glob("*.jpg"))) == 9
    assert max(cv2.imread(str(open_index(built).preview("coffee/v0"))).shape[:2]) == 128
    for name in ("manifest.json", "config.json", "labels.csv"):
        assert str(views["root"]) not in (built / name).read_text(), f"{name} names a path outside the index"


def test_a_moved_copy_answers_the_same(built, views, tmp_path):
    copy = shutil.copytree(built, tmp_path / "elsewhere" / "copy")
    original, moved = Searcher(built), Searcher(copy)
    for query in sorted(views["queries"].glob("*/v0.jpg")):
        assert answer_without_timings(original, query) == answer_without_timings(moved, query)


def test_query_finds_each_indexed_photo(built, views):
    searcher = Searcher(built, top_candidates=3)
    for name in PHOTOS[:3]:
        answer = searcher.search_file(views["queries"] / name / "v0.jpg")
        assert answer.landmarks[0]["landmark_id"] == name
        assert answer.candidates[0]["landmark_id"] == name and answer.candidates[0]["inliers"] > 10
        assert len(answer.candidates) == 3 and set(answer.timings) == {"decode", "extract", "shortlist", "rerank",
                                                                       "answer"}


def test_query_answers_with_the_index_calibration(built, views, tmp_path):
    """A calibration kept in the index makes each landmark's confidence P(right) of its
    evidence, as predict's confidences are (hand-made fit: a weight on log_inliers only)."""
    from delf_pipeline.evidence.calibration import FEATURES, Calibration

    conf = load_config(PRESET, overrides=SMALL).predict
    fitted = Calibration(list(FEATURES), [0.0] * 5, [1.0] * 5, [0.0, 0.0, 1.0, 0.0, 0.0], -2.0,
                         {"aggregation": conf["aggregation"], "top_k": conf["top_k"]})
    calibrated = shutil.copytree(built, tmp_path / "calibrated")
    (calibrated / "calibration.json").write_text(fitted.to_json())
    raw, searcher = Searcher(built), Searcher(calibrated)
    photo = views["queries"] / "coffee" / "v0.jpg"
    answer = searcher.search_file(photo)
    inliers = answer.candidates[0]["inliers"]
    best = answer.landmarks[0]
    assert best["landmark_id"] == "coffee" and raw.search_file(photo).landmarks[0]["landmark_id"] == "coffee"
    assert best["confidence"] == pytest.approx(1 / (1 + np.exp(2.0 - np.log1p(inliers))), abs=1e-6)


def test_query_applies_the_index_whitening_and_expansion(built, views, tmp_path):
    """A Searcher with shortlist whitening + query expansion scores the photo as that maths by hand."""
    from delf_pipeline.descriptors.expansion import expand_queries
    from delf_pipeline.descriptors.whitening import learn_pca_whitening

    copy = shutil.copytree(built, tmp_path / "whitened")
    config = json.loads((copy / "config.json").read_text())
    config["shortlist"].update({"whitening": "pca", "whitening_shrinkage": 0.5, "qe_top_n": 2, "qe_alpha": 1.0})
    (copy / "config.json").write_text(json.dumps(config))
    searcher = Searcher(copy)
    answer = searcher.search_file(views["queries"] / "coffee" / "v0.jpg")
    assert list((copy / "store" / "derived").glob("whitened-*/whitening.npz"))
    whitening = learn_pca_whitening(open_index(built).store.global_matrix(), 0, 0.5)
    matrix = whitening.apply(open_index(built).store.global_matrix())
    query = whitening.apply(answer.features.global_descriptor[None])
    first = np.argsort(-(matrix @ query[0]), kind="stable")[:2]
    expanded = expand_queries(query, matrix[first][None], (matrix[first] @ query[0])[None], alpha=1.0)[0]
    expected = np.sort(matrix @ expanded)[::-1][:8]  # shortlist.top_k = 8 of the 9 images, all candidates here
    found = sorted((c["global_score"] for c in answer.candidates), reverse=True)
    np.testing.assert_allclose(found, expected, atol=1e-5)


def test_add_appends_parts_and_keeps_what_was_there(built, views, tmp_path):
    grown = shutil.copytree(built, tmp_path / "grown")
    before = {p.relative_to(grown): p.read_bytes() for p in (grown / "store").rglob("*.npy")}
    index.add(grown, views["more"], labels=labels_csv(views["more"], tmp_path / "more.csv"))
    store = open_index(grown).store
    assert len(store.parts) == 2 and len(store) == 12
    for name, data in before.items():  # first part and codebook untouched: nothing rebuilt
        assert (grown / name).read_bytes() == data, name
    facts = index.info(grown)
    assert (facts["landmarks"], [h["command"] for h in facts["history"]]) == (4, ["build", "add"])
    answer = Searcher(grown).search_file(views["queries"] / "rocket" / "v0.jpg")
    assert answer.landmarks[0]["landmark_id"] == "rocket"


def test_add_keeps_known_ids_as_they_were(built, views, tmp_path):
    again = shutil.copytree(built, tmp_path / "again")
    index.add(again, views["first"], labels=labels_csv(views["first"], tmp_path / "other.csv"))
    assert len(open_index(again).store.parts) == 1


def test_query_command_json_and_bad_photo(built, views, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    code = cli.main(["query", "--index", str(built), str(views["queries"] / "coffee" / "v0.jpg"), str(bad), "--json"])
    answers = json.loads(capsys.readouterr().out)
    assert code == 1
    assert answers[0]["landmarks"][0]["landmark_id"] == "coffee"
    assert answers[1] == {"photo": "notes.jpg", "error": "cannot decode image: cannot identify image file "
                                                          "(not an image, or an unsupported format)"}


def test_query_command_table(built, views, capsys):
    assert cli.main(["query", "--index", str(built), str(views["queries"] / "chelsea" / "v0.jpg"), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("v0.jpg  (") and "extract" in lines[0]
    assert lines[2].split()[0] == "chelsea" and len(lines) == 6  # head, 1+ landmark rows, head, 2 candidates


@pytest.mark.slow
def test_a_builtin_model_index_answers_and_grows_with_the_build_export(views, xfeat_weights_file, tmp_path,
                                                                      monkeypatch):
    """The default preset (a built-in model whose local PCA is learned from the index images, its
    global fused with the VLAD of XFeat features over the index's codebook): query and add use the
    export the build made, so the local descriptors keep their size; the index carries a copy of
    it (INDEX/model), so a copied index answers on a machine without the build's cache; with
    neither, a clear error."""
    monkeypatch.setenv("DELF_PIPELINE_CACHE", str(tmp_path / "cache"))
    labels = labels_csv(views["first"], views["root"] / "first.csv")
    config = load_config(overrides=SMALL + [f'extract.xfeat_weights="{xfeat_weights_file.parent.as_posix()}"'])
    built = index.build(config, views["first"], tmp_path / "idx", labels=labels, previews=0)
    assert open_index(built).store.manifest()["settings"]["vlad_backend"] == "xfeat"
    export = Path(open_index(built).store.manifest()["settings"]["model"])
    assert export.parent == tmp_path / "cache" / "exports" and open_index(built).config.extract.model.startswith("builtin:")
    answer = Searcher(built).search_file(views["queries"] / "coffee" / "v0.jpg")
    assert answer.landmarks[0]["landmark_id"] == "coffee" and answer.candidates[0]["inliers"] > 10
    index.add(built, views["more"], labels=labels_csv(views["more"], tmp_path / "more.csv"))
    assert len(open_index(built).store.parts) == 2 and sorted((tmp_path / "cache" / "exports").iterdir()) == [export]
    assert Searcher(built).search_file(views["queries"] / "rocket" / "v0.jpg").landmarks[0]["landmark_id"] == "rocket"
    assert (built / "model" / "saved_model.pb").is_file()
    moved = Path(shutil.copytree(built, tmp_path / "elsewhere" / "idx"))
    shutil.rmtree(export)  # the build machine's cache is not where the copy goes
    answer = Searcher(moved).search_file(views["queries"] / "coffee" / "v0.jpg")
    assert answer.landmarks[0]["landmark_id"] == "coffee" and answer.candidates[0]["inliers"] > 10
    shutil.rmtree(moved / "model")
    with pytest.raises(FileNotFoundError, match="export the index store was made with .* rebuild the index"):
        Searcher(moved)


def test_index_info_command(built, capsys):
    assert cli.main(["index", "info", str(built), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 9


@pytest.mark.parametrize("text, expected", [
    ("id,landmark_id\na/1,7\n", {"a/1": "7"}),
    ("id,label\na,x\n", {"a": "x"}),
    ("image,label\nplace/p1.jpg,place\n", {"place/p1": "place"}),
    ("image,label\n", {}),
])
def test_read_labels(tmp_path, text, expected):
    (tmp_path / "labels.csv").write_text(text)
    assert index.read_labels(tmp_path / "labels.csv") == expected


def test_read_labels_names_the_missing_columns(tmp_path):
    (tmp_path / "labels.csv").write_text("name,place\na,b\n")
    with pytest.raises(ValueError, match="labels.csv: index labels need columns id and landmark_id"):
        index.read_labels(tmp_path / "labels.csv")


def test_open_index_refuses_what_is_not_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index at"):
        open_index(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a delf_pipeline index"):
        open_index(tmp_path)


def test_build_refuses_an_index_without_local_features(tmp_path):
    with pytest.raises(ValueError, match="needs local features"):
        index.build(load_config(overrides=["extract.local_features=false"]), tmp_path, tmp_path / "idx")


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_top_k_in_memory(top_k):
    # scores of the one query: rows 0..4 -> 0.1, 0.9, 0.5, 0.9, -1 (tie at 0.9: lower row first)
    matrix = np.array([[0.1], [0.9], [0.5], [0.9], [-1.0]], np.float32)
    rows, scores = top_k_in_memory(np.ones((1, 1), np.float32), matrix, top_k, select_matmul("cpu"))
    assert rows.tolist() == [[1, 3, 2, 0, 4][:top_k]]
    np.testing.assert_allclose(scores, [[0.9, 0.9, 0.5, 0.1, -1.0][:top_k]])


def test_top_k_in_memory_empty_index():
    rows, scores = top_k_in_memory(np.ones((1, 4), np.float32), np.zeros((0, 4), np.float32), 5, select_matmul("cpu"))
    assert rows.shape == scores.shape == (1, 0)


def test_serve_command_binds_loopback_by_default():
    args = cli.build_parser().parse_args(["serve", "--index", "somewhere"])
    assert (args.host, args.port, args.workers, args.queue) == ("127.0.0.1", 8000, 2, 16)


def test_build_from_place_folders_takes_the_folder_names_as_labels(built, views, tmp_path, capsys):
    """PHOTOS/PLACE/photo.jpg without --labels: the same labels as the CSV that built ``built`` gives."""
    assert cli.main(["index", "build", "--images", str(views["first"]), "--out", str(tmp_path / "idx"),
                     "--previews", "0", "--preset", PRESET, *[a for item in SMALL for a in ("--set", item)]]) == 0
    assert open_index(tmp_path / "idx").labels == open_index(built).labels
    assert set(open_index(built).labels.values()) == {"astronaut", "coffee", "chelsea"}
    assert "landmarks: 3" in capsys.readouterr().out


def test_photos_outside_place_folders_have_no_label(tmp_path, caplog):
    write_views(tmp_path / "photos", ("coffee",), 2, seed=4)
    loose = tmp_path / "photos" / "coffee"
    with pytest.raises(ValueError, match=r"one folder per place \(PHOTOS/PLACE/photo.jpg\) or give --labels"):
        index.build(load_config(PRESET, overrides=SMALL), loose, tmp_path / "idx", previews=0)
    assert not (tmp_path / "idx" / "store").exists()  # refused before extracting anything
    shutil.copy(loose / "v0.jpg", tmp_path / "photos" / "stray.jpg")
    found = index._labels_of(index._listed(tmp_path / "photos", "train"), None, tmp_path / "photos")
    assert found == {"coffee/v0": "coffee", "coffee/v1": "coffee"}
    assert "1 of 3 images have no label (e.g. stray)" in caplog.text


def test_an_index_of_place_folders_answers_a_held_out_photo_with_a_percentage(tmp_path, capsys, monkeypatch):
    """4 places of 3 photos and 2 of one (what a leave-one-out can get wrong), labels from the
    folders, calibrated at build with no flag; a new view of a place is answered with P(right)
    in percent. (The calibration's time limit is lifted: test_calibrate tests it.)"""
    from delf_pipeline import calibrate

    monkeypatch.setattr(calibrate, "AUTO_SHARE", 1000.0)
    photos = write_views(tmp_path / "photos", PHOTOS, 3, seed=5)
    write_views(photos, ("hubble_deep_field", "camera"), 1, seed=6)
    held_out = write_views(tmp_path / "new", ("chelsea",), 1, seed=7) / "chelsea" / "v0.jpg"
    sets = ["--preset", PRESET, *[a for item in SMALL for a in ("--set", item)]]
    assert cli.main(["index", "build", "--images", str(photos), "--out", str(tmp_path / "idx"), *sets]) == 0
    assert "calibration: True" in capsys.readouterr().out
    assert cli.main(["query", "--index", str(tmp_path / "idx"), str(held_out)]) == 0
    best = capsys.readouterr().out.splitlines()[2].split()
    assert best[0] == "chelsea" and best[1].endswith("%") and float(best[1].strip("%<>")) > 50, best
    assert cli.main(["query", "--index", str(tmp_path / "idx"), "--json", str(held_out)]) == 0
    answer = json.loads(capsys.readouterr().out)[0]
    assert answer["calibrated"] and 0.5 < answer["landmarks"][0]["confidence"] <= 1
    assert answer["landmarks"][0]["score"] > 0
