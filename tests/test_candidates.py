"""The shortlist -> candidates hand-over."""
from __future__ import annotations

from support.synthetic_stores import shortlist_frame

from delf_pipeline.formats.candidates import candidate_ids, read_candidates, top_candidates


def test_top_candidates_takes_the_best_ranked():
    frame = shortlist_frame({"q1": [("x", 0.9), ("y", 0.8), ("z", 0.1)], "q0": [("z", 0.5)]})
    frame = frame.iloc[::-1]  # the order of rows in the file does not matter, rank does
    assert top_candidates(frame, 2) == {"q0": [("z", 0.5)], "q1": [("x", 0.9), ("y", 0.8)]}
    assert top_candidates(frame, 0) == {}


def test_candidate_ids_are_the_union_of_every_query_s_candidates(tmp_path):
    shortlist_frame({"q1": [("x", 0.9), ("y", 0.8), ("z", 0.1)], "q0": [("z", 0.5), ("w", 0.4)]}).to_csv(
        tmp_path / "shortlist.csv", index=False)
    assert candidate_ids(read_candidates(tmp_path / "shortlist.csv", 2)) == {"x", "y", "z", "w"}
    assert candidate_ids(read_candidates(tmp_path / "shortlist.csv", 1)) == {"x", "z"}
