"""The run record ``OUT/run.json``: what ``delf-pipeline run`` was given, so that ``report``,
``show-matches`` and ``evaluate`` need nothing but ``--run OUT``.

    {
      "format_version": 1,
      "version": "0.1.0",                    package version that made the run
      "data": "/abs/DATA",                   Kaggle-layout folder (absolute)
      "solution": "/abs/solution.csv",       or null when run without --solution
      "preset": "sift_default",
      "config_file": "/abs/my.toml",         or null
      "overrides": ["rerank.num_to_rerank=50"],
      "model": "/abs/delg" | "hub handle" | "",
      "config": {"extract": {...}, ...},     every setting the run used
      "calibration": "/abs/OUT/features/calibration.json" | null
    }

Paths are absolute so the record stays right whatever the working folder of a later command.
It is written atomically when the run starts, so a killed run's folder knows its inputs too,
and again once the run knows its calibration (then ``calibration`` is set: the file whose
P(right) the submission's confidences are, or null when they are raw scores; a record
without the key is of an older run or one that stopped before).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .. import __version__
from ..config import Config
from ..utils.artifacts import read_json, write_json_atomic

RECORD_NAME = "run.json"
FORMAT_VERSION = 1
KEYS = ("format_version", "version", "data", "solution", "preset", "config_file", "overrides", "model", "config")


def run_record(
    config: Config,
    data: str | Path,
    *,
    solution: str | Path | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """The record of a run of ``config`` on ``data`` (see the module docstring for the keys)."""
    model = config.extract.model
    return {
        "format_version": FORMAT_VERSION,
        "version": __version__,
        "data": _absolute(data),
        "solution": _absolute(solution),
        "preset": config.preset,
        "config_file": _absolute(config_file),
        "overrides": list(overrides),
        "model": _absolute(model) if model and Path(model).exists() else model,
        "config": config.to_dict(),
    }


def _absolute(path: str | Path | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def write_run_record(run_dir: str | Path, record: dict) -> Path:
    """Write ``record`` to ``run_dir/run.json`` atomically; returns its path."""
    path = Path(run_dir) / RECORD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return path


def read_run_record(run_dir: str | Path) -> dict:
    """The record of ``run_dir``; FileNotFoundError when it has none, ValueError when it is not one."""
    path = Path(run_dir) / RECORD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a folder written by `delf-pipeline run` "
                                "(or was written before runs recorded their inputs)")
    record = read_json(path)  # DamagedArtifact (a ValueError) naming the file when it is not JSON
    missing = [key for key in KEYS if key not in record] if isinstance(record, dict) else list(KEYS)
    if missing:
        raise ValueError(f"{path}: not a run record, missing key(s) {', '.join(missing)}")
    if record["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {record['format_version']} is newer than this package reads "
                         f"({FORMAT_VERSION}); upgrade delf_pipeline")
    return record


def recorded_path(record: dict, key: str) -> Path | None:
    """``record[key]`` ("data", "solution", ...) as a Path, or None when the run had none."""
    return Path(record[key]) if record.get(key) else None
