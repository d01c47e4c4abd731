"""The run folder that ``delf-pipeline run --out OUT`` writes, its paths known in one place::

    OUT/run.json                      what the run was given (:mod:`.run_record`)
    OUT/features/index, query         feature stores (extract)
    OUT/features/index-candidates     local features of shortlisted index images, when the
                                      index store holds global descriptors only
    OUT/features/calibration.json     the confidence calibration fitted on the index
    OUT/calibration/                  its leave-one-out work
    OUT/errors.csv                    every image of every store that could not be used
    OUT/shortlist.csv, rerank.csv     the stages' tables
    OUT/submission.csv, ranking.csv   predictions
    OUT/metrics.json                  with a solution
    OUT/report/, matches/             the HTML report and match pictures

``run``, ``report``, ``show-matches`` and ``evaluate --run`` all find the pieces here; a store
is opened once per :class:`RunFolder` (:meth:`RunFolder.store`), after the stage that writes it.
"""
from __future__ import annotations

from pathlib import Path

from .run_record import RECORD_NAME
from .store import FeatureStore, candidates_path


class RunFolder:
    """The paths of the run folder ``path`` (see the module docstring) and its opened stores."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.record = self.path / RECORD_NAME
        features = self.path / "features"
        self.index_store, self.query_store = features / "index", features / "query"
        self.candidates_store, self.calibration = candidates_path(self.index_store), features / "calibration.json"
        self.shortlist, self.rerank, self.submission, self.ranking, self.errors, self.metrics = (
            self.path / name for name in ("shortlist.csv", "rerank.csv", "submission.csv", "ranking.csv", "errors.csv",
                                          "metrics.json"))
        self.calibration_work, self.report, self.matches = (self.path / name for name in ("calibration", "report",
                                                                                           "matches"))
        self._stores: dict[Path, FeatureStore] = {}

    def store(self, path: Path) -> FeatureStore:
        """The store at ``path`` (one of this folder's), opened on first use and kept: ask for
        it once the stage that writes it has finished."""
        if path not in self._stores:
            self._stores[path] = FeatureStore(path)
        return self._stores[path]
