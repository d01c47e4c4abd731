"""The measurement scripts of benchmarks/ start (``--help``), and the dev protocol
(benchmarks/quality.py) runs end to end on a tiny synthetic stand-in for ../shared/data."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.synthetic_images import photo  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py")
TINY = ["extract.vlad_words=4", "extract.max_image_size=96", "extract.max_features=200", "rerank.num_to_rerank=3",
        "shortlist.top_k=4"]


def run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout


def write_labelled(folder: Path, places: int, views: int, unlabelled: int = 0) -> None:
    """PLACE/vV.png photos of synthetic places (and unlabelled ones) with labels.csv."""
    rows = ["image,label"]
    for place in range(places):
        for view in range(views):
            (folder / f"place{place}").mkdir(parents=True, exist_ok=True)
            photo(place, view).save(folder / f"place{place}" / f"v{view}.png")
            rows.append(f"place{place}/v{view}.png,place{place}")
    for k in range(unlabelled):
        (folder / "nonlandmarks").mkdir(parents=True, exist_ok=True)
        photo(50 + k, 0).save(folder / "nonlandmarks" / f"n{k}.png")
        rows.append(f"nonlandmarks/n{k}.png,")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


def synthetic_data(root: Path) -> Path:
    """landmarks_mini, landmarks_dev and evd folders in the shared data's layout."""
    write_labelled(root / "landmarks_mini", places=3, views=3)
    write_labelled(root / "landmarks_dev", places=3, views=3, unlabelled=3)
    for side in ("1", "2", "h"):
        (root / "evd" / side).mkdir(parents=True)
    for pair in range(2):
        photo(20 + pair, 0).save(root / "evd" / "1" / f"pair{pair}.png")
        photo(20 + pair, 1).save(root / "evd" / "2" / f"pair{pair}.png")
        np.savetxt(root / "evd" / "h" / f"pair{pair}.txt", [[1, 0, -7], [0, 1, -7], [0, 0, 1]])
    return root


def test_quality_smoke(tmp_path):
    data = synthetic_data(tmp_path / "data")
    work = tmp_path / "work"
    args = ["--work", str(work), "--data", str(data), "--presets", "--variant", "tiny", "sift_default", *TINY,
            "--bootstrap", "20"]
    result = run_script("quality.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (work / "quality.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {t}" for t in ("dev_split", "dev_loo", "mini_loo",
                                                                                 "hard", "evd")]
    assert all(line.count(" | ") == table[0].count(" | ") for line in table[:1] + table[2:])
    assert table[1].count("|") == table[0].count("|")
    per_query = (work / "quality.csv").read_text().splitlines()
    assert per_query[0].startswith("task,run,query_id")
    assert len(per_query) - 1 == 4 + 9 + 9 + (3 + 2 + 8) + 2  # split 3+1, dev LOO 9, mini 9, hard 13, EVD 2 pairs
    again = run_script("quality.py", *args, "--skip", "tiny:evd", "--pair", "tiny", "tiny")  # resumes
    assert again.returncode == 0, again.stderr[-3000:]
    text = (work / "quality.md").read_text()
    assert "| evd | `tiny` | pending (--skip)" in text
    zero = "GAP +0.0000 [+0.0000, +0.0000], top-1 +0.0000 [+0.0000, +0.0000]"  # a run against itself
    assert text.splitlines()[-4:] == [f"- {t}: `tiny` - `tiny`: {zero}" for t in ("dev_split", "dev_loo", "mini_loo",
                                                                                    "hard")]


def test_quality_evd_of_a_cascade_takes_the_second_stage_where_the_fast_path_is_undecided():
    """quality.cascade_evd: a pair (true or swapped) under cascade_inliers fast inliers takes the
    second stage's count (rule replace), 0 under cascade_min_inliers; one at or above keeps its own."""
    sys.path.insert(0, str(BENCHMARKS))
    import quality
    from delf_pipeline.config import load_config

    conf = load_config(None, None, ["rerank.cascade_inliers=8", "rerank.cascade_min_inliers=6",
                                    "rerank.cascade_rule=replace"]).rerank
    fast = {"pairs": [("a", 5, 6, 0), ("b", 9, 4, 0), ("c", 7, 7, 0)], "wall": 1.0, "cpu": 2.0}
    second = {"pairs": [("a", 40, 5, 0), ("b", 3, 30, 0), ("c", 5, 12, 0)], "wall": 3.0, "cpu": 4.0}
    got = quality.cascade_evd(fast, second, conf)
    assert got["pairs"] == [("a", 40, 0, 0), ("b", 9, 30, 0), ("c", 0, 12, 0)]
    assert (got["max_swapped"], got["above"], got["median_true"]) == (30, 1, 9.0)
    assert (got["wall"], got["cpu"]) == (4.0, 6.0)
