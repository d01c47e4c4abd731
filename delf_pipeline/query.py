"""Search by photo from the command line: ``delf-pipeline query --index INDEX PHOTO...``.

The front end of :class:`delf_pipeline.search.searcher.Searcher`: each photo's answer as a
short text table (the landmarks' confidence as a percentage when the index is calibrated,
else their "score"), or all of them as the JSON list that ``POST /query`` returns.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .formats.images import ImageError
from .search.searcher import Searcher


def format_answer(answer: dict, landmarks: int = 5) -> str:
    """A query's JSON answer as a short text table."""
    times = ", ".join(f"{step} {ms:.0f}" for step, ms in answer["timings_ms"].items())
    calibrated = answer.get("calibrated", False)
    lines = [f"{answer['photo']}  ({sum(answer['timings_ms'].values()):.0f} ms: {times})",
             f"  {'landmark':<24} {'confidence' if calibrated else 'score':>10}  voters"]
    lines += [f"  {str(m['landmark_id']):<24} {shown(m, calibrated):>10}  {len(m['candidates'])}"
              for m in answer["landmarks"][:landmarks]] or ["  (no landmark)"]
    width = max([len("candidate")] + [len(c["index_id"]) for c in answer["candidates"]])
    lines.append(f"  {'candidate':<{width}} {'landmark':<24} {'global':>7} {'inliers':>7} {'score':>7}")
    lines += [f"  {c['index_id']:<{width}} {str(c['landmark_id']):<24} {c['global_score']:>7.3f} "
              f"{c['inliers'] if c['inliers'] >= 0 else '-':>7} {c['score']:>7.3f}" for c in answer["candidates"]]
    return "\n".join(lines)


def shown(landmark: dict, calibrated: bool) -> str:
    """A landmark's confidence as a percentage (P(right)), or its raw score without a calibration."""
    return percent(landmark["confidence"]) if calibrated else f"{landmark['score']:.3f}"


def percent(probability: float) -> str:
    """``0.873`` -> ``"87.3%"``; never a rounded 100% or 0%: ``">99.9%"``, ``"<0.1%"``."""
    if probability >= 0.9995:
        return ">99.9%"
    return "<0.1%" if probability < 0.0005 else f"{100 * probability:.1f}%"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder from `delf-pipeline index build`")
    parser.add_argument("photos", nargs="+", metavar="PHOTO", help="image files to look up")
    parser.add_argument("--top", type=int, default=5, help="candidates shown per photo")
    parser.add_argument("--json", action="store_true", help="print one JSON list (the answers of POST /query)")


def main(args: argparse.Namespace) -> int:
    searcher = Searcher(args.index, top_candidates=args.top)
    answers, failed = [], 0
    for photo in args.photos:
        try:
            answers.append(searcher.search_file(photo).to_json())
        except (ImageError, OSError) as error:
            failed += 1
            answers.append({"photo": Path(photo).name, "error": str(error)})
    if args.json:
        print(json.dumps(answers, indent=2))
    else:
        print("\n\n".join(f"{a['photo']}: {a['error']}" if "error" in a else format_answer(a) for a in answers))
    return 1 if failed else 0
