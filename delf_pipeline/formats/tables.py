"""Readers of the CSV tables the metrics score (one reader per schema).

- submission (Kaggle): ``id,landmarks``; ``landmarks`` is ``"<landmark_id> <confidence>"``
  or empty (no prediction). Labels are kept as strings.
- solution (GLDv2 ``recognition_solution``): ``id,landmarks[,Usage]``; ``landmarks`` is
  space-separated (empty for a non-landmark query); ``Usage`` is Public, Private or
  Ignored (Ignored rows are never scored).
- ranking (shortlist / rerank output): ``query_id,index_id`` plus ``rank`` or ``score``
  (then ``global_score``) giving the order.
- index labels (Kaggle ``train.csv``): ``id,landmark_id``.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

Prediction = tuple[str, float]
SUBMISSION_HEADER = ["id", "landmarks"]
USAGES = ("Public", "Private", "Ignored")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # what a confidence may look like (no 1_000)


class CsvSyntaxError(ValueError):
    """A CSV file that cannot be parsed past ``line`` (e.g. an unterminated quote)."""

    def __init__(self, path: str | Path, line: int, reason: str):
        super().__init__(f"{path} line {line}: {reason}")
        self.line, self.reason = line, reason


def _read_rows(path: str | Path) -> Iterable[tuple[int, list[str]]]:
    """Yield (line number, fields) of a CSV file; line 1 is the header; blank lines skipped.

    A UTF-8 BOM is accepted; text that is not UTF-8 or an unterminated quote raises
    :class:`CsvSyntaxError` naming the file and line.
    """
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            for row in reader:
                if row:
                    yield reader.line_num, row
        except csv.Error as error:
            reason = "unterminated quote" if "end of data" in str(error) else str(error)
            raise CsvSyntaxError(path, reader.line_num, reason) from None
        except UnicodeDecodeError as error:
            raise CsvSyntaxError(path, reader.line_num + 1, f"not UTF-8 text ({error.reason})") from None


def read_csv_frame(path: str | Path, str_columns: Sequence[str], required: Sequence[str] = ()):
    """A CSV table as a pandas frame (``str_columns`` as strings, no NaN for empty cells; a UTF-8
    BOM accepted); ValueError naming ``path`` when it cannot be parsed or lacks a ``required`` column."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype={c: str for c in str_columns}, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; expected a CSV with a header") from None
    except pd.errors.ParserError as error:
        raise ValueError(f"{path} is not a valid CSV table: {_parser_reason(error)}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}")
    return frame


def _parser_reason(error: Exception) -> str:
    """pandas' "Error tokenizing data. C error: Expected 4 fields in line 5, saw 6" -> its last part."""
    return str(error).split("C error: ")[-1].strip()


def _parse_prediction(row: list[str]) -> tuple[str, Prediction | None]:
    """One submission row -> (id, (label, confidence) or None); ValueError says why not."""
    if len(row) != 2:
        raise ValueError(f"expected 2 columns (id,landmarks), found {len(row)}")
    query_id, tokens = row[0].strip(), row[1].split()
    if not query_id:
        raise ValueError("empty id")
    if not tokens:
        return query_id, None
    if len(tokens) > 2 and len(tokens) % 2 == 0:
        raise ValueError(f"more than one label ({len(tokens) // 2}); one '<landmark_id> <confidence>' is allowed")
    if len(tokens) != 2:
        raise ValueError(f"expected '<landmark_id> <confidence>', got {row[1]!r}")
    try:
        confidence = float(tokens[1])
    except ValueError:
        raise ValueError(f"confidence {tokens[1]!r} is not a number") from None
    if not math.isfinite(confidence):
        raise ValueError(f"confidence {tokens[1]!r} is not finite")
    if not NUMBER.fullmatch(tokens[1]):
        raise ValueError(f"confidence {tokens[1]!r} is not a number (digits, '.', exponent only)")
    return query_id, (tokens[0], confidence)


def _scan_submission(path: str | Path) -> tuple[dict[str, Prediction | None], dict[str, int], list[tuple[int, str]]]:
    """Parse a submission, collecting problems instead of stopping at the first.

    Returns (predictions by id, line of each id, [(line, reason)]).
    """
    predictions: dict[str, Prediction | None] = {}
    lines: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    try:
        _scan_rows(iter(_read_rows(path)), predictions, lines, problems)
    except CsvSyntaxError as error:
        problems.append((error.line, error.reason))
    return predictions, lines, problems


def _scan_rows(rows, predictions: dict, lines: dict, problems: list) -> None:
    first = next(rows, None)
    if first is None:
        problems.append((1, "empty file, expected the header 'id,landmarks'"))
        return
    if [field.strip() for field in first[1]] != SUBMISSION_HEADER:
        problems.append((first[0], f"header must be 'id,landmarks', got {','.join(first[1])!r}"))
    for line, row in rows:
        try:
            query_id, prediction = _parse_prediction(row)
        except ValueError as error:
            problems.append((line, str(error)))
            continue
        if query_id in predictions:
            problems.append((line, f"duplicate id {query_id!r} (first on line {lines[query_id]})"))
            continue
        predictions[query_id], lines[query_id] = prediction, line


def _format_problems(problems: list[tuple[int, str]]) -> list[str]:
    ordered = sorted(problems, key=lambda item: item[0])
    return [f"line {line}: {reason}" if line < math.inf else f"end of file: {reason}" for line, reason in ordered]


def read_submission(path: str | Path) -> dict[str, Prediction | None]:
    """Kaggle submission -> {query id: (landmark label, confidence) or None}.

    Raises ValueError listing the first problems (see :func:`validate_submission`).
    """
    predictions, _, problems = _scan_submission(path)
    if problems:
        messages = _format_problems(problems)
        more = f" (and {len(messages) - 5} more)" if len(messages) > 5 else ""
        raise ValueError(f"{path} is not a valid submission: " + "; ".join(messages[:5]) + more)
    return predictions


def validate_submission(path: str | Path, expected_ids: Iterable[str] | None = None) -> list[str]:
    """Everything wrong with a submission file, one "line N: reason" per problem ([] if valid).

    Checks the header, column count, empty or duplicate ids, the label/confidence pair
    (one label, a finite number), and with ``expected_ids`` (e.g. the sample submission):
    ids that are not expected and expected ids that are missing (reported at end of file).
    """
    predictions, lines, problems = _scan_submission(path)
    if expected_ids is not None:
        expected = set(expected_ids)
        problems += [(lines[q], f"id {q!r} is not among the expected ids") for q in predictions if q not in expected]
        missing = sorted(expected - predictions.keys())
        if missing:
            shown = ", ".join(repr(q) for q in missing[:5]) + (", ..." if len(missing) > 5 else "")
            problems.append((math.inf, f"{len(missing)} expected id(s) missing: {shown}"))
    return _format_problems(problems)


def _header_index(header: list[str], required: Sequence[str], path: str | Path) -> dict[str, int]:
    """Column positions by name; ValueError naming the missing required columns."""
    index = {name.strip(): i for i, name in enumerate(header)}
    missing = [name for name in required if name not in index]
    if missing:
        raise ValueError(f"{path}: header {','.join(header)!r} lacks column(s) {', '.join(missing)}")
    return index


def solution_rows(path: str | Path) -> list[tuple[str, set[str], str | None]]:
    """Every row of a solution file as (id, true labels, Usage or None), validated."""
    rows = iter(_read_rows(path))
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{path}: empty file, expected the header 'id,landmarks[,Usage]'")
    column = _header_index(first[1], ("id", "landmarks"), path)
    seen: dict[str, int] = {}
    out = []
    for line, row in rows:
        if len(row) != len(first[1]):
            raise ValueError(f"{path} line {line}: expected {len(first[1])} columns, found {len(row)}")
        query_id = row[column["id"]].strip()
        if not query_id:
            raise ValueError(f"{path} line {line}: empty id")
        if query_id in seen:
            raise ValueError(f"{path} line {line}: duplicate id {query_id!r} (first on line {seen[query_id]})")
        usage = _usage_tag(row[column["Usage"]], path, line) if "Usage" in column else None
        seen[query_id] = line
        out.append((query_id, set(row[column["landmarks"]].split()), usage))
    return out


def _usage_tag(text: str, path: str | Path, line: int) -> str:
    tags = {tag.lower(): tag for tag in USAGES}
    if text.strip().lower() not in tags:
        raise ValueError(f"{path} line {line}: Usage must be one of {', '.join(USAGES)}, got {text!r}")
    return tags[text.strip().lower()]


def select_usage(rows: list[tuple[str, set[str], str | None]], usage: str | None) -> dict[str, set[str]]:
    """Scored rows of the chosen subset: None / "all" keeps Public and Private, never Ignored."""
    if usage is None or usage.lower() == "all":
        return {q: labels for q, labels, tag in rows if tag != "Ignored"}
    wanted = {tag.lower(): tag for tag in USAGES[:2]}.get(usage.lower())
    if wanted is None:
        raise ValueError(f"usage must be Public, Private or all, got {usage!r}")
    if rows and rows[0][2] is None:
        raise ValueError(f"usage {usage!r} asked for, but the solution has no Usage column")
    return {q: labels for q, labels, tag in rows if tag == wanted}


def read_solution(path: str | Path, usage: str | None = None) -> dict[str, set[str]]:
    """GLDv2 recognition solution -> {query id: set of true landmark labels} (empty set:
    non-landmark query). ``usage``: None or "all" (Public + Private), "Public", "Private"."""
    return select_usage(solution_rows(path), usage)


def read_ids(path: str | Path) -> list[str]:
    """The ``id`` column of a CSV with a header (e.g. ``sample_submission.csv``)."""
    rows = iter(_read_rows(path))
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{path}: empty file, expected a header with an 'id' column")
    position = _header_index(first[1], ("id",), path)["id"]
    return [row[position].strip() for _, row in rows if len(row) > position]


def _group_runs(keys: np.ndarray, values: list) -> dict[str, list]:
    """{key: values of its run} for keys [N] sorted so that equal keys are adjacent."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(keys)]
    return {keys[a]: values[a:b] for a, b in zip(starts.tolist(), ends.tolist())}


def read_ranking(path: str | Path) -> dict[str, list[str]]:
    """Ranking CSV -> {query id: index ids, best first}.

    Order: ``rank`` ascending if present, else ``score`` descending then ``global_score``
    descending (either alone also works); equal keys keep file order.
    """
    table = read_csv_frame(path, ("query_id", "index_id"), ("query_id", "index_id"))
    if "rank" in table.columns:
        keys, ascending = ["rank"], [True]
    else:
        keys = [name for name in ("score", "global_score") if name in table.columns]
        ascending = [False] * len(keys)
    if not keys:
        raise ValueError(f"{path}: ranking needs a 'rank', 'score' or 'global_score' column to give the order")
    table = table.sort_values(["query_id", *keys], ascending=[True, *ascending], kind="stable")
    return _group_runs(table["query_id"].to_numpy(), table["index_id"].tolist())


def read_labels(path: str | Path) -> dict[str, str]:
    """Index labels CSV -> {image id: landmark label}: columns ``id`` and ``landmark_id``
    (Kaggle ``train.csv``) or ``label``; or a photo folder's list with ``image`` (a relative
    path: the id is that path without its extension, as a folder source names it) and ``label``,
    as landmarks_mini has. A UTF-8 BOM is accepted. An image listed twice with two labels is a
    ValueError naming both (the same label twice is accepted)."""
    table = read_csv_frame(path, ("id", "image", "landmark_id", "label"))
    column = "landmark_id" if "landmark_id" in table else "label" if "label" in table else None
    if "id" not in table and "image" in table:
        table["id"] = table["image"].map(lambda image: Path(image).with_suffix("").as_posix())
    if "id" not in table or column is None:
        raise ValueError(f"{path}: index labels need columns id and landmark_id (or label); found {list(table)}")
    labels: dict[str, str] = {}
    for line, (image_id, label) in enumerate(zip(table["id"], table[column]), start=2):
        if labels.setdefault(image_id, label) != label:
            raise ValueError(f"{path} line {line}: image {image_id!r} is labelled {labels[image_id]!r} and {label!r}: "
                             "keep one label per image")
    return labels


def read_index_labels(path: str | Path) -> dict[str, set[str]]:
    """Index labels CSV (see :func:`read_labels`) -> {landmark label: set of index image ids}."""
    groups: dict[str, set[str]] = {}
    for image_id, label in read_labels(path).items():
        groups.setdefault(label, set()).add(image_id)
    return groups
