"""The evaluate stage: recognition metrics (GAP, top-1 accuracy), retrieval metrics
(mAP@100, P@k, R@k, MRR), the Revisited Oxford/Paris protocol, and submission checks.

Files read here:

- submission (Kaggle): ``id,landmarks``; ``landmarks`` is ``"<landmark_id> <confidence>"``
  or empty (no prediction). Labels are kept as strings.
- solution (GLDv2 ``recognition_solution``): ``id,landmarks[,Usage]``; ``landmarks`` is
  space-separated (empty for a non-landmark query); ``Usage`` is Public, Private or
  Ignored (Ignored rows are never scored).
- ranking (shortlist / rerank output): ``query_id,index_id`` plus ``rank`` or ``score``
  (then ``global_score``) giving the order.
- index labels (Kaggle ``train.csv``): ``id,landmark_id``.

Metric definitions follow ``shared/DESIGN.md`` and the official GLDv2 / revisitop code.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .artifacts import write_json_atomic

log = logging.getLogger(__name__)

Prediction = tuple[str, float]
SUBMISSION_HEADER = ["id", "landmarks"]
USAGES = ("Public", "Private", "Ignored")
RETRIEVAL_DEPTH = 100  # mAP@100 of the GLDv2 retrieval challenge
PROTOCOLS = ("easy", "medium", "hard")


# ----------------------------------------------------------------------------- files


def _read_rows(path: str | Path) -> Iterable[tuple[int, list[str]]]:
    """Yield (line number, fields) of a CSV file; line 1 is the header; blank lines skipped."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if row:
                yield reader.line_num, row


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
    return query_id, (tokens[0], confidence)


def _scan_submission(path: str | Path) -> tuple[dict[str, Prediction | None], dict[str, int], list[tuple[int, str]]]:
    """Parse a submission, collecting problems instead of stopping at the first.

    Returns (predictions by id, line of each id, [(line, reason)]).
    """
    predictions: dict[str, Prediction | None] = {}
    lines: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    rows = iter(_read_rows(path))
    first = next(rows, None)
    if first is None:
        return predictions, lines, [(1, "empty file, expected the header 'id,landmarks'")]
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
    return predictions, lines, problems


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


def _solution_rows(path: str | Path) -> list[tuple[str, set[str], str | None]]:
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


def _select_usage(rows: list[tuple[str, set[str], str | None]], usage: str | None) -> dict[str, set[str]]:
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
    return _select_usage(_solution_rows(path), usage)


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
    import pandas as pd

    table = pd.read_csv(path, dtype={"query_id": str, "index_id": str}, keep_default_na=False)
    missing = {"query_id", "index_id"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: ranking lacks column(s) {', '.join(sorted(missing))}")
    if "rank" in table.columns:
        keys, ascending = ["rank"], [True]
    else:
        keys = [name for name in ("score", "global_score") if name in table.columns]
        ascending = [False] * len(keys)
    if not keys:
        raise ValueError(f"{path}: ranking needs a 'rank', 'score' or 'global_score' column to give the order")
    table = table.sort_values(["query_id", *keys], ascending=[True, *ascending], kind="stable")
    return _group_runs(table["query_id"].to_numpy(), table["index_id"].tolist())


def read_index_labels(path: str | Path) -> dict[str, set[str]]:
    """Index labels CSV ``id,landmark_id`` -> {landmark label: set of index image ids}."""
    import pandas as pd

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"id", "landmark_id"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: index labels lack column(s) {', '.join(sorted(missing))}")
    table = table.sort_values("landmark_id", kind="stable")
    runs = _group_runs(table["landmark_id"].to_numpy(), table["id"].tolist())
    return {label: set(images) for label, images in runs.items()}


def relevant_index_images(solution: Mapping[str, set[str]], images_by_label: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """{query id: index images whose landmark is among the query's true landmarks}."""
    empty: set[str] = set()
    return {q: set().union(*(images_by_label.get(label, empty) for label in labels)) for q, labels in solution.items()}


# ----------------------------------------------------------------------------- recognition


def _known_predictions(predictions: Mapping[str, Prediction | None], solution: Mapping[str, set[str]]) -> dict[str, Prediction]:
    """Predictions (not None) of ids in the solution; unknown ids are dropped with a warning."""
    unknown = sorted(q for q in predictions if q not in solution)
    if unknown:
        log.warning("%d submission id(s) not in the solution are ignored, e.g. %s", len(unknown), unknown[:3])
    return {q: p for q, p in predictions.items() if p is not None and q in solution}


def _landmark_query_count(solution: Mapping[str, set[str]]) -> int:
    count = sum(1 for labels in solution.values() if labels)
    if count == 0:
        raise ValueError("the solution has no query with a true landmark: GAP and accuracy are undefined")
    return count


def global_average_precision(
    predictions: Mapping[str, Prediction | None],
    solution: Mapping[str, set[str]],
    ignore_non_landmarks: bool = False,
) -> float:
    """Kaggle GAP (micro-AP): GAP = (1/M) sum_i P(i) rel(i).

    The one (label, confidence) of every predicted query is pooled and sorted by
    confidence descending (ties: query id, then label, ascending); P(i) is the precision
    of the first i pooled predictions, rel(i) whether prediction i is a true landmark of
    its query, M the number of queries with at least one true landmark. Predictions on
    non-landmark queries only add false positives, unless ``ignore_non_landmarks`` drops
    them first. Queries without a prediction add nothing.
    """
    num_landmark_queries = _landmark_query_count(solution)
    scored = _known_predictions(predictions, solution)
    if ignore_non_landmarks:
        scored = {q: p for q, p in scored.items() if solution[q]}
    ids = sorted(scored)  # one prediction per query, so (query id, label) order is query id order
    confidence = np.array([scored[q][1] for q in ids], dtype=np.float64)
    hits = np.array([scored[q][0] in solution[q] for q in ids], dtype=bool)[np.argsort(-confidence, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(np.sum(precision[hits]) / num_landmark_queries)


def accuracy(predictions: Mapping[str, Prediction | None], solution: Mapping[str, set[str]]) -> float:
    """Top-1 accuracy over queries with a true landmark; no prediction counts as wrong."""
    num_landmark_queries = _landmark_query_count(solution)
    scored = _known_predictions(predictions, solution)
    correct = sum(1 for q, labels in solution.items() if labels and q in scored and scored[q][0] in labels)
    return correct / num_landmark_queries


# ----------------------------------------------------------------------------- retrieval


def _hit_matrix(rankings: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], queries: list[str], depth: int) -> np.ndarray:
    """hits [Q, depth] bool: the image at rank k of query q is relevant (repeats of an
    image count once, at its first rank; short rankings are padded with misses)."""
    hits = np.zeros((len(queries), depth), dtype=bool)
    for row, q in enumerate(queries):
        seen: set[str] = set()
        for k, image in enumerate(rankings.get(q, ())[:depth]):
            hits[row, k] = image in relevant[q] and image not in seen
            seen.add(image)
    return hits


def _first_relevant(ranking: Sequence[str], relevant: set[str]) -> int | None:
    """1-based rank of the first relevant image of a whole ranking, None if there is none."""
    return next((k for k, image in enumerate(ranking, start=1) if image in relevant), None)


def retrieval_metrics(
    rankings: Mapping[str, Sequence[str]],
    relevant: Mapping[str, set[str]],
    ks: Sequence[int] = (1, 5, 10, 100),
) -> dict:
    """Retrieval metrics over the queries of ``relevant`` with m_q >= 1 relevant images.

    mAP@100 = (1/Q) sum_q 1/min(m_q, 100) sum_{k<=100} P_q(k) rel_q(k) (GLDv2 retrieval);
    precision@k = hits in top k / k; recall@k = hits in top k / m_q; MRR = mean 1/rank of
    the first relevant image over the whole ranking (0 if none). A query missing from
    ``rankings`` has an empty ranking. Queries with m_q = 0 are skipped and counted.
    Returns {"map@100", "mrr", "precision@k", "recall@k" per k, "queries", "skipped_no_relevant"}.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive ranks, got {tuple(ks)}")
    queries = sorted(q for q, images in relevant.items() if images)
    if not queries:
        raise ValueError("no query has a relevant index image: retrieval metrics are undefined")
    hits = _hit_matrix(rankings, relevant, queries, max(RETRIEVAL_DEPTH, max(ks)))
    found = np.cumsum(hits, axis=1)
    m = np.array([len(relevant[q]) for q in queries], dtype=np.float64)
    ranks = np.arange(1, hits.shape[1] + 1)
    top = slice(0, RETRIEVAL_DEPTH)
    ap = np.sum((found / ranks)[:, top] * hits[:, top], axis=1) / np.minimum(m, RETRIEVAL_DEPTH)
    reciprocal = [1.0 / (_first_relevant(rankings.get(q, ()), relevant[q]) or math.inf) for q in queries]
    out = {"map@100": float(ap.mean()), "mrr": float(np.mean(reciprocal))}
    for k in ks:
        out[f"precision@{k}"] = float(np.mean(found[:, k - 1] / k))
        out[f"recall@{k}"] = float(np.mean(found[:, k - 1] / m))
    out.update(queries=len(queries), skipped_no_relevant=len(relevant) - len(queries))
    return out


# ----------------------------------------------------------------------------- revisited Oxford / Paris


def trapezoidal_ap(positive_ranks: np.ndarray, num_positives: int) -> float:
    """revisitop AP: positive_ranks [P] sorted 0-based ranks (junk removed) of the found
    positives, num_positives all positives. Each positive adds recall 1/num_positives times
    the mean of the precision just before it (j/r, 1 at r = 0) and at it ((j+1)/(r+1))."""
    r = np.asarray(positive_ranks, dtype=np.float64)
    j = np.arange(r.size, dtype=np.float64)
    before = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    return float(np.sum((before + (j + 1) / (r + 1)) / 2) / num_positives) if num_positives else 0.0


def _precision_at(positive_ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """revisitop mP@k of one query [len(ks)]: k is clipped to the last positive's rank."""
    if positive_ranks.size == 0:
        return np.zeros(len(ks))
    one_based = positive_ranks + 1
    cut = np.minimum(one_based.max(), np.asarray(ks))
    return (one_based[None, :] <= cut[:, None]).sum(axis=1) / cut


def _as_list(ids) -> list:
    """Any sequence or array of ids as a flat list of Python scalars (hashable, comparable)."""
    return np.asarray(ids).ravel().tolist()


def _protocol_split(truth: Mapping[str, Sequence], protocol: str) -> tuple[set, set]:
    """(positives, ignored) of one query: easy = (easy, hard+junk), medium = (easy+hard,
    junk), hard = (hard, easy+junk)."""
    easy, hard, junk = (set(_as_list(truth.get(key, ()))) for key in ("easy", "hard", "junk"))
    split = {"easy": (easy, hard | junk), "medium": (easy | hard, junk), "hard": (hard, easy | junk)}
    return split[protocol]


def _query_scores(ranking: list, positives: set, ignored: set, ks: Sequence[int]) -> tuple[float, np.ndarray]:
    """(AP, mP@k [len(ks)]) of one query, ignored images removed from the ranking first."""
    positive_at = np.flatnonzero([image in positives for image in ranking])
    ignored_at = np.flatnonzero([image in ignored for image in ranking])
    adjusted = positive_at - np.searchsorted(ignored_at, positive_at)
    return trapezoidal_ap(adjusted, len(positives)), _precision_at(adjusted, ks)


def _ranked_lists(ranks: np.ndarray | Sequence[Sequence], num_queries: int) -> list[list]:
    """Per query its ranked ids: the columns of a [n_index, n_query] array, or the sequences."""
    if isinstance(ranks, np.ndarray) and ranks.ndim == 2:
        lists = [_as_list(column) for column in ranks.T]
    else:
        lists = [_as_list(ranking) for ranking in ranks]
    if len(lists) != num_queries:
        raise ValueError(f"rankings for {len(lists)} queries but ground truth for {num_queries}")
    return lists


def revisited_map(
    ranks: np.ndarray | Sequence[Sequence],
    ground_truth: Sequence[Mapping[str, Sequence]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict]:
    """Revisited Oxford/Paris evaluation (Radenovic et al. 2018, revisitop protocol).

    ranks: int array [n_index, n_query] (column q: index positions best first, as in
    revisitop) or one ranked sequence of index ids per query (may be partial).
    ground_truth: per query a dict with 'easy', 'hard', 'junk' sequences of index ids.
    Per protocol (easy / medium / hard, see :func:`_protocol_split`) the ignored images
    are removed from the ranking, AP is :func:`trapezoidal_ap` over all positives
    (positives missing from a partial ranking add 0) and mP@k clips k to the last
    positive's rank. Queries with no positive are skipped (AP NaN) and counted.
    Returns {protocol: {"map", "mp@k": {k: value}, "ap": [n_query], "queries", "skipped"}}.
    """
    lists = _ranked_lists(ranks, len(ground_truth))
    return {protocol: _protocol_metrics(lists, ground_truth, protocol, ks) for protocol in PROTOCOLS}


def _protocol_metrics(lists: list[list], ground_truth: Sequence[Mapping], protocol: str, ks: Sequence[int]) -> dict:
    aps = np.full(len(lists), np.nan)
    precisions = np.full((len(lists), len(ks)), np.nan)
    for q, (ranking, truth) in enumerate(zip(lists, ground_truth)):
        positives, ignored = _protocol_split(truth, protocol)
        if positives:
            aps[q], precisions[q] = _query_scores(ranking, positives, ignored, ks)
    valid = ~np.isnan(aps)
    mean_ap = float(aps[valid].mean()) if valid.any() else math.nan
    mean_p = precisions[valid].mean(axis=0) if valid.any() else np.full(len(ks), np.nan)
    return {
        "map": mean_ap,
        "mp@k": {int(k): float(v) for k, v in zip(ks, mean_p)},
        "ap": aps.tolist(),
        "queries": int(valid.sum()),
        "skipped": int((~valid).sum()),
    }


# ----------------------------------------------------------------------------- stage


def evaluate(
    predictions_path: str | Path,
    solution_path: str | Path,
    ranking_path: str | Path | None = None,
    index_labels_path: str | Path | None = None,
    json_path: str | Path | None = None,
    usage: str | None = None,
) -> dict:
    """Score a submission (and optionally a ranking) against a solution; write JSON if asked.

    Returns {"gap", "gap_ignoring_non_landmarks", "accuracy", "queries",
    "landmark_queries", "predicted", "unknown_ids", "usage"} plus "retrieval" (see
    :func:`retrieval_metrics`) when ``ranking_path`` and ``index_labels_path`` are given.
    """
    if (ranking_path is None) != (index_labels_path is None):
        raise ValueError("retrieval metrics need both a ranking and the index labels (--ranking and --index-labels)")
    rows = _solution_rows(solution_path)
    solution = _select_usage(rows, usage)
    predictions = read_submission(predictions_path)
    unknown = predictions.keys() - {q for q, _, _ in rows}
    if unknown:
        log.warning("%d submission id(s) are not in the solution and are ignored, e.g. %s", len(unknown), sorted(unknown)[:3])
    scoped = {q: p for q, p in predictions.items() if q in solution}
    result = {
        "gap": global_average_precision(scoped, solution),
        "gap_ignoring_non_landmarks": global_average_precision(scoped, solution, ignore_non_landmarks=True),
        "accuracy": accuracy(scoped, solution),
        "queries": len(solution),
        "landmark_queries": sum(1 for labels in solution.values() if labels),
        "predicted": sum(1 for p in scoped.values() if p is not None),
        "unknown_ids": len(unknown),
        "usage": usage or "all",
    }
    if ranking_path is not None:
        relevant = relevant_index_images(solution, read_index_labels(index_labels_path))
        result["retrieval"] = retrieval_metrics(read_ranking(ranking_path), relevant)
    if json_path is not None:
        write_json_atomic(Path(json_path), result)
    return result


def print_report(result: dict) -> None:
    """A rich table of the numbers :func:`evaluate` returns."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evaluation ({result['usage']} queries)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = {key: value for key, value in result.items() if key not in ("retrieval", "usage")}
    rows.update({f"retrieval {key}": value for key, value in result.get("retrieval", {}).items()})
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, metavar="SUB.csv", help="submission to score (id,landmarks)")
    parser.add_argument("--solution", required=True, metavar="SOL.csv", help="ground truth (id,landmarks[,Usage])")
    parser.add_argument("--ranking", metavar="R.csv", help="retrieval ranking (query_id,index_id,rank|score)")
    parser.add_argument("--index-labels", metavar="train.csv", help="index labels (id,landmark_id), needed with --ranking")
    parser.add_argument("--usage", choices=["Public", "Private", "all"], default="all", help="solution rows to score")
    parser.add_argument("--json", metavar="OUT.json", help="also write the numbers as JSON")


def main(args: argparse.Namespace) -> int:
    result = evaluate(args.predictions, args.solution, args.ranking, args.index_labels, args.json, args.usage)
    print_report(result)
    return 0
