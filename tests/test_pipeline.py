"""Tests of ``delf-pipeline run`` on a Kaggle-layout folder of real photos, and of ``delf-pipeline demo``."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from support import SHARED_DATA

from delf_pipeline import __version__
from delf_pipeline.cli import main as cli_main
from delf_pipeline.config import DEFAULT_PRESET, DEFAULTS
from delf_pipeline.formats.images import kaggle_path
from delf_pipeline.formats.store import read_errors
from delf_pipeline.formats.tables import read_submission, validate_submission

MINI = SHARED_DATA / "landmarks_mini"
#: place -> landmark id; 3 photos of each are the index, the next 1-2 the queries
PLACES = {"lund_street": "101", "sacre_coeur": "102", "sceaux_castle": "103", "piazza_san_marco": "104",
          "london_bridge": "105", "maupertuis_castle": "106"}
QUERIES_PER_PLACE = {"lund_street": 2, "sacre_coeur": 2, "sceaux_castle": 2}
DISTRACTOR = "st_pauls_cathedral"  # not in the index: a non-landmark query
FAST = ["--set", "extract.max_image_size=512", "--set", "extract.vlad_words=16"]


def kaggle_id(name: str) -> str:
    """A 16-hex-digit Kaggle-style id for a photo."""
    return hashlib.sha1(name.encode()).hexdigest()[:16]


def link(root: Path, split: str, photo: Path) -> str:
    """Symlink ``photo`` at ROOT/split/a/b/c/ID.jpg; returns the id."""
    image_id = kaggle_id(photo.relative_to(MINI).as_posix())
    path = kaggle_path(root, split, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(photo)
    return image_id


def write_csv(path: Path, header: tuple, rows: list) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def build_kaggle_folder(root: Path) -> dict[str, str]:
    """train/, test/, train.csv, sample_submission.csv, solution.csv; returns {test id: true landmark or ""}."""
    train, truth = [], {}
    for place, landmark in PLACES.items():
        photos = sorted((MINI / place).glob("*.jpg"))
        train += [(link(root, "train", photo), landmark) for photo in photos[:3]]
        truth.update({link(root, "test", photo): landmark for photo in photos[3 : 3 + QUERIES_PER_PLACE.get(place, 1)]})
    truth[link(root, "test", sorted((MINI / DISTRACTOR).glob("*.jpg"))[0])] = ""
    broken = "00000000deadbeef"
    kaggle_path(root, "test", broken).parent.mkdir(parents=True, exist_ok=True)
    kaggle_path(root, "test", broken).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    truth[broken] = ""
    write_csv(root / "train.csv", ("id", "landmark_id"), train)
    write_csv(root / "sample_submission.csv", ("id", "landmarks"), [(i, "") for i in truth])
    write_csv(root / "solution.csv", ("id", "landmarks", "Usage"), [(i, t, "Private") for i, t in truth.items()])
    return truth


@pytest.fixture(scope="module")
def kaggle_run(tmp_path_factory) -> dict:
    """One ``delf-pipeline run`` on 18 index photos of 6 places and 11 test files."""
    if not MINI.is_dir():
        pytest.skip(f"real photos not found at {MINI} (../shared/data/landmarks_mini beside the repository)")
    root = tmp_path_factory.mktemp("kaggle")
    truth = build_kaggle_folder(root / "data")
    args = ["run", "--data", str(root / "data"), "--out", str(root / "out"),
            "--solution", str(root / "data" / "solution.csv"), *FAST]
    return {"root": root, "truth": truth, "args": args, "code": cli_main(args),
            "submission": root / "out" / "submission.csv"}


def test_run_writes_a_valid_submission_with_every_test_id(kaggle_run):
    assert kaggle_run["code"] == 0
    submission = kaggle_run["submission"]
    truth = kaggle_run["truth"]
    assert validate_submission(submission, expected_ids=truth) == []
    predictions = read_submission(submission)
    assert list(predictions) == list(truth)  # sample_submission order, each id once
    assert predictions["00000000deadbeef"] is None  # the broken file: an empty cell
    errors = (kaggle_run["root"] / "out" / "features" / "query" / "errors.csv").read_text()
    assert "00000000deadbeef" in errors
    landmarks = [q for q, t in truth.items() if t]
    assert all(predictions[q] is not None for q in landmarks), "a readable query has no prediction"
    correct = sum(predictions[q][0] == truth[q] for q in landmarks)
    print(f"{correct} of {len(landmarks)} landmark queries recognised")
    assert correct >= len(landmarks) // 2, "the real photos of these places should mostly be recognised"


def test_run_writes_metrics_and_evaluate_prints_them(kaggle_run, capsys):
    out = kaggle_run["root"] / "out"
    written = json.loads((out / "metrics.json").read_text())
    assert 0 <= written["gap"] <= 1 and 0 <= written["accuracy"] <= 1
    assert written["queries"] == 11 and written["landmark_queries"] == 9
    assert "retrieval" in written
    data = kaggle_run["root"] / "data"
    json_path = kaggle_run["root"] / "evaluate.json"
    code = cli_main(["evaluate", "--predictions", str(out / "submission.csv"), "--solution", str(data / "solution.csv"),
                     "--json", str(json_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gap" in printed and "accuracy" in printed and f"{written['gap']:.4f}" in printed
    result = json.loads(json_path.read_text())
    assert result["gap"] == written["gap"] and result["accuracy"] == written["accuracy"]


def test_rerun_skips_every_stage_and_gives_the_same_submission(kaggle_run, caplog):
    first = kaggle_run["submission"].read_bytes()
    with caplog.at_level(logging.INFO, logger="delf_pipeline"):
        assert cli_main(kaggle_run["args"]) == 0
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping")]
    assert len(skipped) == 4, skipped  # index and query extraction, shortlist, rerank
    assert kaggle_run["submission"].read_bytes() == first


# ---------------------------------------------------------------- the run folder: OUT alone is enough


def test_run_records_its_inputs(kaggle_run):
    record = json.loads((kaggle_run["root"] / "out" / "run.json").read_text())
    data = (kaggle_run["root"] / "data").resolve()
    assert record["data"] == str(data) and record["solution"] == str(data / "solution.csv")
    assert record["preset"] == DEFAULT_PRESET and record["overrides"] == FAST[1::2]
    assert record["version"] == __version__ and record["model"] == DEFAULTS.extract.model and record["config_file"] is None
    assert record["config"]["extract"]["max_image_size"] == 512


def test_run_writes_one_errors_csv_of_both_stores(kaggle_run):
    out = kaggle_run["root"] / "out"
    stores = [read_errors(out / "features" / name / "errors.csv") for name in ("index", "query")]
    combined = read_errors(out / "errors.csv")
    assert combined == stores[0] + stores[1] and [e.id for e in combined] == ["00000000deadbeef"]


def test_evaluate_takes_everything_from_the_run_folder(kaggle_run, capsys):
    out = kaggle_run["root"] / "out"
    json_path = kaggle_run["root"] / "evaluate-run.json"
    assert cli_main(["evaluate", "--run", str(out), "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text()) == json.loads((out / "metrics.json").read_text())  # retrieval too
    assert "retrieval map@100" in capsys.readouterr().out


def test_evaluate_of_a_run_without_solution_asks_for_one(kaggle_run, tmp_path, caplog):
    record = json.loads((kaggle_run["root"] / "out" / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**record, "solution": None}))
    assert cli_main(["evaluate", "--run", str(tmp_path)]) == 2
    assert f"{tmp_path} was run without --solution: give --solution" in caplog.text


def test_report_of_a_run_shows_every_image_in_chromium(kaggle_run, tmp_path, caplog):
    from test_report import open_in_chromium, page_status

    out = kaggle_run["root"] / "out"
    with caplog.at_level(logging.WARNING, logger="delf_pipeline"):
        assert cli_main(["report", "--run", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "thumbnail of" in warnings[0] and "00000000deadbeef.jpg" in warnings[0]
    done = open_in_chromium((out / "report" / "index.html").resolve().as_uri(), tmp_path, "--dump-dom")
    status = page_status(done.stdout)
    images = done.stdout.count("<img ")
    assert status["ready"] == "1" and status["rows"] == "11"
    assert (status["errors"], status["failed"]) == ("0", "0"), status
    assert status["loaded"] == str(images) and images == 10 * 6  # 10 readable queries + their 5 candidates each
    assert done.stdout.count('class="noimg"') == 1  # the broken test file only
    assert "CONSOLE" not in done.stderr, done.stderr
    pictures = sorted((out / "report" / "matches").rglob("*.jpg"))
    assert len(pictures) == 10 * 3 and done.stdout.count('title="match picture"') == 10 * 3
    assert "gap" in done.stdout and "retrieval map@100" in done.stdout  # metrics from the recorded solution


def test_show_matches_from_the_run_folder_alone(kaggle_run, tmp_path, capsys):
    query = next(q for q, t in kaggle_run["truth"].items() if t)
    code = cli_main(["show-matches", "--run", str(kaggle_run["root"] / "out"), "--query", query, "--top", "2",
                     "--out", str(tmp_path / "pictures")])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 and all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in printed)


def test_strict_rerun_stops_at_an_image_an_earlier_run_recorded(kaggle_run, caplog):
    before = kaggle_run["submission"].read_bytes()
    assert cli_main([*kaggle_run["args"], "--strict"]) == 1
    assert "--strict: image '00000000deadbeef'" in caplog.text and "by an earlier run" in caplog.text
    assert kaggle_run["submission"].read_bytes() == before


def test_strict_run_stops_at_the_first_unusable_image(kaggle_run, tmp_path, caplog):
    shutil.copytree(kaggle_run["root"] / "out" / "features" / "index", tmp_path / "features" / "index")  # resumed
    args = ["run", "--data", str(kaggle_run["root"] / "data"), "--out", str(tmp_path), "--strict", *FAST]
    assert cli_main(args) == 1
    assert "--strict: image '00000000deadbeef'" in caplog.text and "by an earlier run" not in caplog.text
    assert not (tmp_path / "submission.csv").exists()


@pytest.mark.slow
def test_demo_runs_and_writes_metrics(tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the demo is seeded: its exact metrics (found by running it; fractions of its 22 queries,
    # 16 of them landmarks with 3 index views each)
    assert (metrics["queries"], metrics["landmark_queries"], metrics["predicted"]) == (22, 16, 22)
    assert (metrics["gap"], metrics["gap_ignoring_non_landmarks"], metrics["accuracy"]) == (1.0, 1.0, 1.0)
    retrieval = metrics["retrieval"]
    assert retrieval == pytest.approx({
        "map@100": 1.0, "mrr": 1.0, "precision@1": 1.0, "precision@5": 48 / 80, "precision@10": 48 / 160,
        "precision@100": 3 / 100, "recall@1": 1 / 3, "recall@5": 1.0, "recall@10": 1.0,
        "recall@100": 1.0, "queries": 16, "skipped_no_relevant": 6}, rel=1e-12)
    assert validate_submission(tmp_path / "run" / "submission.csv") == []
    assert "submission" in capsys.readouterr().out
    # with the default features every leave-one-out answer over the demo's index is right: nothing
    # wrong to calibrate on, so no calibration and the confidences are scores (kaggle2020: capped
    # inliers / 70 + global, plus the lead over the next landmark: a landmark alone in the top 3
    # doubles); the right answers (3.54-3.77) score far above the 6 non-landmark queries (the
    # highest of those, 1.62: the fast path leaves the horse photo undecided and the cascade's
    # LighterGlue finds 45 inliers between the horse silhouette and a view of the cameraman)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["calibration"] is None
    truth = {row["id"]: row["landmarks"] for row in csv.DictReader(open(tmp_path / "data" / "solution.csv"))}
    predicted = read_submission(tmp_path / "run" / "submission.csv")
    right = [c for q, (label, c) in predicted.items() if label == truth[q]]
    wrong = [c for q, (label, c) in predicted.items() if label != truth[q]]
    assert len(right) == 16 and len(wrong) == 6
    assert min(right) > 3.0 > 2.0 > max(wrong)
    assert cli_main(["report", "--run", str(tmp_path / "run"), "--matches", "0"]) == 0
    assert (tmp_path / "run" / "report" / "index.html").is_file()


def test_model_with_a_rootsift_preset_is_a_clear_error(tmp_path, caplog):
    code = cli_main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--model", "/some/delg",
                     "--preset", "sift_default"])
    assert code == 2 and "--model needs a model preset" in caplog.text
