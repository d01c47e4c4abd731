"""Tests of formats.revisitop: a small ground-truth file built in the official format."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from delf_pipeline.formats.revisitop import crop_box, read_ground_truth


def official_like(path, protocol: int = 2, **changes) -> str:
    """A gnd_*.pkl like the official ones: names, and per query bbx + index rows (numpy arrays)."""
    data = {
        "imlist": ["all_souls_000001", "all_souls_000002", "radcliffe_000003", "magdalen_000004"],
        "qimlist": ["all_souls_000013", "radcliffe_000031"],
        "gnd": [
            {"bbx": [136.5, 34.1, 648.5, 955.7], "easy": np.array([0]), "hard": np.array([1]), "junk": np.array([], int)},
            {"bbx": np.array([10.0, 20.0, 30.0, 40.0]), "easy": [2], "hard": [], "junk": [3]},
        ],
    }
    data.update(changes)
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_reads_official_layout(tmp_path, protocol):
    truth = read_ground_truth(official_like(tmp_path / "gnd.pkl", protocol))
    assert truth.imlist[2] == "radcliffe_000003" and truth.qimlist == ["all_souls_000013", "radcliffe_000031"]
    assert truth.queries[0].bbx == (136.5, 34.1, 648.5, 955.7)
    np.testing.assert_array_equal(truth.queries[1].junk, [3])
    assert truth.as_ids(0) == {"easy": ["all_souls_000001"], "hard": ["all_souls_000002"], "junk": []}


class Payload:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_refuses_code_in_the_pickle(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Payload()]}))
    with pytest.raises(ValueError, match="posix.system is not allowed|nt.system is not allowed"):
        read_ground_truth(path)


def test_refuses_other_classes(tmp_path):
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": np.random.default_rng(0)}))
    with pytest.raises(ValueError, match="not allowed"):
        read_ground_truth(path)


@pytest.mark.parametrize("changes, message", [
    ({"gnd": []}, "gnd has 0 entries for 2 queries"),
    ({"gnd": [{"bbx": [0, 0, 5, 5], "easy": [9]}] * 2}, "outside 0..3"),
    ({"gnd": [{"bbx": [5, 0, 5, 5]}] * 2}, "x2 > x1"),
    ({"gnd": [{"easy": [0]}] * 2}, "must be a dict with bbx"),
])
def test_malformed_files_name_the_problem(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        read_ground_truth(official_like(tmp_path / "gnd.pkl", **changes))


def test_not_a_pickle(tmp_path):
    (tmp_path / "x.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="x.pkl: not a readable"):
        read_ground_truth(tmp_path / "x.pkl")
    (tmp_path / "y.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="a dict with imlist"):
        read_ground_truth(tmp_path / "y.pkl")


@pytest.mark.parametrize("bbx, size, expected", [
    ((136.5, 34.1, 648.5, 955.7), (768, 1024), (136, 34, 648, 956)),  # rounded half to even, like round()
    ((-3.0, -1.0, 120.0, 90.0), (100, 80), (0, 0, 100, 80)),  # clipped to the image
    ((99.6, 10.0, 100.0, 10.2), (100, 80), (99, 10, 100, 11)),  # never empty
])
def test_crop_box(bbx, size, expected):
    assert crop_box(bbx, *size) == expected
