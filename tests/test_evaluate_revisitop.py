"""``delf-pipeline evaluate-revisitop`` end to end on a tiny dataset in the official layout:
scikit-image photos (index: two random views of three landmarks and two distractors; queries:
a third view), and a ground-truth pickle built like gnd_roxford5k.pkl."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from delf_pipeline import cli
from delf_pipeline.evaluate_revisitop import format_table, ranking_lists, score
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.revisitop import read_ground_truth
from delf_pipeline.predict import final_ranking
from delf_pipeline.tools.demo import load_photo, random_view

LANDMARKS, DISTRACTORS = ("astronaut", "coffee", "chelsea"), ("moon", "coins")
BBX = [20.4, 10.0, 480.6, 400.0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("roxf")
    rng = np.random.default_rng(0)
    (root / "jpg").mkdir()
    imlist = []
    for name in LANDMARKS + DISTRACTORS:
        for view in range(2 if name in LANDMARKS else 1):
            imlist.append(f"{name}_{view}")
            Image.fromarray(random_view(load_photo(name), rng)).save(root / "jpg" / f"{imlist[-1]}.jpg", quality=95)
    qimlist = [f"{name}_query" for name in LANDMARKS[:2]]
    for name, query in zip(LANDMARKS, qimlist):
        Image.fromarray(random_view(load_photo(name), rng)).save(root / "jpg" / f"{query}.jpg", quality=95)
    gnd = [{"bbx": np.array(BBX), "easy": np.array([0]), "hard": np.array([1]), "junk": np.array([], np.int64)},
           {"bbx": np.array(BBX), "easy": np.array([2, 3]), "hard": np.array([], np.int64), "junk": np.array([6])}]
    with open(root / "gnd_test.pkl", "wb") as handle:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle, protocol=2)
    return root


def test_command_crops_ranks_and_scores(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["evaluate-revisitop", "--gnd", str(dataset / "gnd_test.pkl"), "--images", str(dataset / "jpg"),
                     "--out", str(out), "--ks", "1", "5", "--set", "extract.vlad_words=16",
                     "--set", "rerank.num_to_rerank=4", "--set", "rerank.first_depth=2",
                     "--set", "rerank.decided_inliers=0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| Medium |" in printed and "mP@5" in printed
    with Image.open(out / "queries" / "astronaut_query.png") as crop:
        assert crop.size == (481 - 20, 400 - 10)  # bbx rounded: (20, 10, 481, 400)
    # the printed numbers are revisited_map of the written rankings, every index image ranked
    truth = read_ground_truth(dataset / "gnd_test.pkl")
    ranking = final_ranking(read_table(out / "shortlist.csv"), read_table(out / "rerank.csv"))
    lists = ranking_lists(ranking, truth.qimlist)
    assert [sorted(ids) for ids in lists] == [sorted(truth.imlist)] * 2
    # AP scores the whole re-ranked order: every one of num_to_rerank verified, never an adaptive first round
    assert read_table(out / "rerank.csv").groupby("query_id").size().tolist() == [4, 4]
    # the default's cascade got the images its asift fallback reads (the cropped queries, the index)
    assert json.loads((out / "rerank.csv.blocks" / "manifest.json").read_text())["fallback_ran"] is True
    expected = score(lists, truth, (1, 5))
    assert format_table(expected) in printed
    saved = json.loads((out / "revisitop.json").read_text())
    assert saved["medium"]["map"] == pytest.approx(expected["medium"]["map"])
    assert saved["hard"]["queries"] == 1  # the coffee query has no hard positive: skipped
    assert expected["medium"]["map"] > 0.5  # the same photos, re-viewed: found above the distractors


def test_format_table_by_hand():
    result = {p: {"map": m, "mp@k": {1: 1.0, 5: 0.4}} for p, m in (("easy", 0.5), ("medium", 0.25), ("hard", 0.125))}
    assert format_table(result).splitlines() == [
        "| protocol | mAP | mP@1 | mP@5 |", "|---|---|---|---|",
        "| Easy | 50.00 | 100.00 | 40.00 |", "| Medium | 25.00 | 100.00 | 40.00 |", "| Hard | 12.50 | 100.00 | 40.00 |"]


def test_missing_query_image_is_named(dataset, tmp_path):
    (tmp_path / "jpg").mkdir()
    code = cli.main(["evaluate-revisitop", "--gnd", str(dataset / "gnd_test.pkl"), "--images", str(tmp_path / "jpg"),
                     "--out", str(tmp_path / "run")])
    assert code == 2
