"""The ``validate-submission`` command: check a Kaggle submission file before uploading it.

The checks themselves are :func:`delf_pipeline.formats.tables.validate_submission`.
"""
from __future__ import annotations

import argparse

from ..formats.tables import read_ids, validate_submission


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", metavar="SUB.csv", help="submission to check (id,landmarks)")
    parser.add_argument(
        "--sample", metavar="sample_submission.csv",
        help="CSV whose 'id' column lists the expected query ids (missing or extra ids are errors)",
    )


def main(args: argparse.Namespace) -> int:
    """Print one "line N: reason" per problem; exit status 1 if there is any, else 0."""
    expected = read_ids(args.sample) if args.sample else None
    problems = validate_submission(args.submission, expected)
    for problem in problems:
        print(f"{args.submission}: {problem}")
    print(f"{args.submission}: {len(problems)} problem(s)" if problems else f"{args.submission}: valid")
    return 1 if problems else 0
