"""Tests of the HTML report: plots and verdicts on hand-worked inputs, and the page of a real
small demo run opened in headless Chromium as a person would (no console errors, no missing
images, filters working), with a screenshot."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest

from delf_pipeline import cli
from delf_pipeline.metrics.recognition import global_average_precision
from delf_pipeline.tools import report
from delf_pipeline.tools.report import (
    gap_points,
    inliers_svg,
    precision_svg,
    query_rows,
    reliability_svg,
)

SMALL = ["extract.max_image_size=256", "extract.max_features=300", "extract.vlad_words=16",
         "rerank.num_to_rerank=5", "shortlist.top_k=10"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """A finished small demo run (OUT/data, OUT/run) and its report; about 15 s on 2 cores."""
    from delf_pipeline.config import load_config
    from delf_pipeline.pipeline import run
    from delf_pipeline.tools.demo import build_demo_set

    root = tmp_path_factory.mktemp("demo")
    solution = build_demo_set(root / "data")
    run(load_config(overrides=SMALL), root / "data", root / "run", solution=solution)
    page = report.build(root / "run", top=4, matches=2, page_size=10)
    return {"root": root, "run": root / "run", "page": page}


# ---------------------------------------------------------------- hand-worked pieces


def test_precision_plot_states_gap():
    # ranked: right (P 1), wrong, right (P 2/3); M = 3 landmark queries: GAP = (1 + 2/3) / 3
    points = [(0.9, True, "a"), (0.8, False, "b"), (0.7, True, "c")]
    svg = precision_svg(points, landmark_queries=3)
    assert "GAP 0.5556" in svg
    assert svg.count("<circle") == 2 and svg.count("<path") == 1


@pytest.mark.parametrize("points, landmarks", [([], 3), ([(0.5, True, "a")], 0)])
def test_precision_plot_empty(points, landmarks):
    assert "nothing to plot" in precision_svg(points, landmarks)


def test_inlier_histogram_counts():
    svg = inliers_svg([30, 31, 80], [2, 3])
    assert "right (3)" in svg and "wrong (2)" in svg
    tips = re.findall(r"<title>([^<]*)</title>", svg)
    assert "0-4 inliers: 2 wrong" in tips and "30-34 inliers: 2 right" in tips  # step ceil(81 / 20) = 5
    assert "nothing to plot" in inliers_svg([], [])


def test_gap_points_order_and_landmark_count():
    queries = [
        {"q": "b", "truth": ["1"], "pred": "1", "conf": 0.5},
        {"q": "a", "truth": ["2"], "pred": "3", "conf": 0.5},
        {"q": "c", "truth": [], "pred": "1", "conf": 0.9},  # non-landmark: a false positive
        {"q": "d", "truth": ["4"], "pred": "", "conf": None},
        {"q": "e", "truth": None, "pred": "1", "conf": 1.0},  # not in the solution: ignored
    ]
    points, landmarks = gap_points(queries)
    assert points == [(0.5, False, "a"), (0.5, True, "b"), (0.9, False, "c")]  # query-id order, as GAP takes them
    assert landmarks == 3
    # pooled by confidence, ties by query id: c (wrong), a (wrong), b (right, P = 1/3): GAP = (1/3) / 3
    assert "GAP 0.1111" in precision_svg(points, landmarks)
    predictions = {row["q"]: (row["pred"], row["conf"]) for row in queries if row["pred"] and row["truth"] is not None}
    solution = {row["q"]: set(row["truth"]) for row in queries if row["truth"] is not None}
    assert global_average_precision(predictions, solution) == pytest.approx(1 / 9)


class _Run:
    labels = {"x": "1", "y": "2"}


def test_query_rows_verdicts():
    import pandas as pd

    table = pd.DataFrame({"query_id": ["q1", "q1"], "index_id": ["y", "x"], "rank": [1, 2], "score": [3.0, 1.0],
                          "global_score": [0.3, 0.1], "matches": [50, -1], "inliers": [20, -1],
                          "status": ["ok", "not verified"]})
    predictions = {"q1": ("2", 3.0), "q2": None, "q3": None}
    truth = {"q1": {"1"}, "q2": set(), "q3": {"5"}}
    rows = query_rows(_Run(), table, predictions, truth)
    assert [r["ok"] for r in rows] == ["wrong", "right", "wrong"]  # q2: non-landmark without prediction
    assert rows[0]["inliers"] == 20 and [c["ok"] for c in rows[0]["cands"]] == ["wrong", "right"]
    assert [r["ok"] for r in query_rows(_Run(), table, predictions, None)] == ["", "", ""]


def test_counts_keep_non_landmark_queries_apart():
    """Landmark queries are right, wrong or unanswered (accuracy's terms); a query of no landmark
    given one is counted on its own, not as a wrong answer."""
    rows = [{"q": "a", "truth": ["1"], "pred": "1"}, {"q": "b", "truth": ["2"], "pred": "3"},
            {"q": "c", "truth": ["2"], "pred": ""}, {"q": "d", "truth": [], "pred": "1"},
            {"q": "e", "truth": [], "pred": ""}, {"q": "f", "truth": None, "pred": "1"}]
    for row in rows:
        row["ok"] = report._verdict(row["pred"], row["truth"])
    assert [row["ok"] for row in rows] == ["right", "wrong", "wrong", "nonlandmark", "right", ""]
    counts = report.verdict_counts(rows)
    assert counts == {"landmark": 3, "right": 1, "wrong": 1, "unanswered": 1, "nonlandmark": 2, "given": 1}
    assert report._counts(rows, counts) == ("6 queries, 4 with a prediction. 3 of a landmark: 1 right, 1 wrong, "
                                            "1 unanswered; 2 of no landmark: 1 given a landmark, 1 left empty")


def test_demo_report_separates_non_landmark_queries_and_says_scores(demo_run):
    """The small demo run: its 6 distractor queries are given a landmark, which the counts say apart
    from the 16 landmark queries, beside the accuracy they make; its numbers are scores or P(right)
    as its run.json says."""
    import json

    text = demo_run["page"].read_text()
    metrics = json.loads((demo_run["run"] / "metrics.json").read_text())
    right = round(metrics["accuracy"] * metrics["landmark_queries"])
    assert f"accuracy</th><td>{metrics['accuracy']:.4f}</td><td class=\"note\">{right} of 16 landmark queries right" in text
    assert f"16 of a landmark: {right} right" in text and "6 of no landmark: " in text
    calibrated = json.loads((demo_run["run"] / "run.json").read_text())["calibration"]
    assert (f'"calibrated":{"true" if calibrated else "false"}') in text
    assert ("Confidence: P(right)" in text) == bool(calibrated) and ("Score: " in text) != bool(calibrated)


def test_reliability_diagram_by_hand():
    points = [(0.95, True, "a"), (0.91, True, "b"), (0.15, False, "c"), (0.12, True, "d")]
    svg = reliability_svg(points)
    assert 'id="reliability-plot"' in svg and svg.count("<circle") == 2  # bins 0.1-0.2 and 0.9-1.0
    assert "0.1-0.2: 2 predictions, mean 0.135, 0.500 right" in svg and "0.9-1.0: 2 predictions, mean 0.930, 1.000 right" in svg


@pytest.mark.parametrize("points, note", [([], "no reliability diagram"), ([(2.5, True, "a")], "scores, not probabilities")])
def test_reliability_diagram_needs_probabilities(points, note):
    assert note in reliability_svg(points) and "<svg" not in reliability_svg(points)


# ---------------------------------------------------------------- the page of a real run


@pytest.fixture(scope="module")
def calibrated_run(demo_run) -> dict:
    """The demo run predicted again with a calibration (P(right) from the best inliers, weights by
    hand) so its confidences are probabilities, and its report."""
    import numpy as np

    from delf_pipeline import predict
    from delf_pipeline.config import load_config
    from delf_pipeline.evidence.calibration import Calibration
    from delf_pipeline.formats.blocks import read_table

    run = demo_run["root"] / "calibrated"
    shutil.copytree(demo_run["run"], run, ignore=shutil.ignore_patterns("report"))
    (run / "calibration.json").write_text(
        Calibration(["log_inliers"], [float(np.log(11))], [1.0], [2.0], 0.0, {"aggregation": "max", "top_k": 3}).to_json())
    config = load_config(overrides=SMALL + [f'predict.calibration="{run / "calibration.json"}"'])
    data = demo_run["root"] / "data"
    predict.run(config, run / "shortlist.csv", predict.read_labels(data / "train.csv"),
                read_table(data / "sample_submission.csv")["id"].tolist(), run / "submission.csv",
                rerank_csv=run / "rerank.csv")
    record = json.loads((run / "run.json").read_text())  # what run writes once it has calibrated
    (run / "run.json").write_text(json.dumps({**record, "calibration": str(run / "calibration.json")}))
    return {"run": run, "page": report.build(run, top=4, matches=1, page_size=10)}


def test_report_files(demo_run):
    folder = demo_run["page"].parent
    text = demo_run["page"].read_text()
    queries = len((demo_run["root"] / "data" / "solution.csv").read_text().splitlines()) - 1
    assert len(list((folder / "thumbs").glob("*.jpg"))) >= queries
    pictures = list((folder / "matches").glob("*/*.jpg"))
    assert len(pictures) == 2 * queries and cv2.imread(str(pictures[0])) is not None
    assert 'id="precision-plot"' in text and 'id="inliers-plot"' in text and "https://" not in text
    for src in re.findall(r'(?:thumb|picture)":"([^"]+)"', (folder / "details" / "chunk-0.js").read_text()):
        assert (folder / src).is_file(), src


def test_report_gap_matches_evaluate(demo_run):
    import json

    metrics = json.loads((demo_run["run"] / "metrics.json").read_text())
    assert f"GAP {metrics['gap']:.4f}" in demo_run["page"].read_text()


def test_thumbnails_are_cached(demo_run):
    folder = demo_run["page"].parent / "thumbs"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert cli.main(["report", "--run", str(demo_run["run"]), "--top", "4", "--matches", "2", "--page-size", "10"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return found


def open_in_chromium(url: str, tmp_path: Path, *extra: str, height: int = 12000) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``, no network, a fresh profile; the page gets 5 s of virtual time."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000", f"--window-size=1280,{height}", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)


def page_status(dom: str) -> dict:
    tag = re.search(r'<div id="status"([^>]*)>', dom)
    assert tag, "the page has no status line: did its script run?"
    return dict(re.findall(r'data-([a-z]+)="([^"]*)"', tag.group(1)))


def test_report_in_chromium_loads_every_image_without_errors(demo_run, tmp_path):
    url = demo_run["page"].resolve().as_uri() + "#page=1"
    done = open_in_chromium(url, tmp_path, "--dump-dom")  # the window is taller than the page: no lazy image waits
    status = page_status(done.stdout)
    images = done.stdout.count("<img ")
    assert status["ready"] == "1" and status["rows"] == "10"
    assert (status["errors"], status["failed"]) == ("0", "0"), status
    assert images == 10 * 5 and status["loaded"] == str(images)
    assert "CONSOLE" not in done.stderr, done.stderr


def test_report_filter_from_the_address(demo_run, tmp_path):
    rows = query_rows_of(demo_run)
    wrong = sum(1 for ok in rows if ok == "wrong")
    done = open_in_chromium(demo_run["page"].resolve().as_uri() + "#filter=wrong", tmp_path, "--dump-dom")
    assert page_status(done.stdout)["rows"] == str(min(wrong, 10))
    assert f"({wrong} of {len(rows)} queries)" in done.stdout


def query_rows_of(demo_run) -> list[str]:
    """Verdicts of the report's queries, read back from the page's embedded summary."""
    import json

    text = demo_run["page"].read_text()
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text).group(1))
    return [row[3] for row in data["queries"]]


def test_reliability_diagram_renders_in_chromium(calibrated_run, tmp_path):
    done = open_in_chromium(calibrated_run["page"].resolve().as_uri(), tmp_path, "--dump-dom")
    assert page_status(done.stdout)["errors"] == "0"
    plot = re.search(r'<svg id="reliability-plot".*?</svg>', done.stdout, re.S)
    assert plot and plot.group(0).count("<circle") >= 2, "the reliability diagram has no bins"
    assert "CONSOLE" not in done.stderr, done.stderr


def test_report_screenshot(demo_run, tmp_path):
    shot = tmp_path / "report.png"
    open_in_chromium(demo_run["page"].resolve().as_uri(), tmp_path, f"--screenshot={shot}", height=900)
    assert cv2.imread(str(shot)).shape == (900, 1280, 3)


def test_page_pieces_without_ground_truth():
    assert "give --solution" in report.plots([], has_truth=False)
    assert "give --solution" in report.metrics_table({})
    table = report.metrics_table({"gap": 0.5, "queries": 3, "retrieval": {"mrr": 0.25, "ap": [1.0]}})
    assert "<td>0.5000</td>" in table and "<td>3</td>" in table and "retrieval mrr" in table and "retrieval ap" not in table


# --------------------------------------------------------------------------- training curves


CURVES_CSV = """epoch,train_loss,learning_rate,seconds,images_per_second,val_map@100,val_top1,val_gap,unseen_map@100,unseen_top1,unseen_gap
0,,,,,0.5,0.8,0.75,,,
1,4.0,0.001,10,40,0.6,0.9,0.85,,,
2,1.0,0.0005,10,40,0.7,0.95,0.9,,,
"""


def test_training_curves_are_read_and_plotted(tmp_path):
    (tmp_path / "training.csv").write_text(CURVES_CSV)
    rows = report.read_curves(tmp_path / "training.csv")
    assert rows[0] == {"epoch": 0.0, "val_map@100": 0.5, "val_top1": 0.8, "val_gap": 0.75}
    svg = report.curves_svg(rows)
    assert svg.count('class="val_map@100"') == 1 and svg.count("<circle") == 9  # three figures x three epochs
    assert 'class="train_loss"' in svg and "training loss 1 .. 4" in svg and "unseen" not in svg
    assert report.training_curves({"config": {"extract": {"model": str(tmp_path)}}}) == rows
    assert report.training_curves({"config": {"extract": {"model": ""}}}) == []
    assert report.training_curves({}) == []
    assert 'id="curves-plot"' in report.plots([], has_truth=False, curves=rows)


def test_training_page_shows_the_card_and_the_curves(tmp_path, capsys):
    (tmp_path / "training.csv").write_text(CURVES_CSV)
    (tmp_path / "model_card.json").write_text('{"best_epoch": 2, "validation": {"val_map@100": 0.7}}')
    assert cli.main(["report", "--training", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert 'id="curves-plot"' in page and "<th>best_epoch</th><td>2</td>" in page
    assert "<th>validation val_map@100</th><td>0.7000</td>" in page
    assert "report.html" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="has no training.csv"):
        report.training_page(tmp_path / "nothing")
