#!/usr/bin/env python3
"""Leave-one-out recognition and retrieval on a labelled photo folder (default:
../shared/data/landmarks_mini): every photo is a query against all the others.

Runs the real stages (extract, shortlist with exclude_same_id, rerank, predict, evaluate)
and prints a Markdown table of global-only vs re-ranked metrics. Example::

    python benchmarks/leave_one_out.py --out runs/loo --preset sift_default

The folder must hold ``labels.csv`` with ``image,label`` columns (image = relative path).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import common

from delf_pipeline.cli import setup_logging
from delf_pipeline.config import load_config

DEFAULT_DATA = common.DATA / "landmarks_mini"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled photo folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="work folder (stages resume inside it)")
    parser.add_argument("--preset", help="named preset (default: sift_default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="SECTION.KEY=VALUE override")
    parser.add_argument("--features", type=Path, help="feature store to use or make (default: OUT/features)")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    setup_logging(False)
    logging.getLogger("delf_pipeline").setLevel(logging.WARNING)
    if not (args.data / "labels.csv").exists():
        raise SystemExit(f"{args.data}/labels.csv not found: give --data a labelled photo folder")
    results = common.leave_one_out(load_config(args.preset, None, args.overrides), args.data, args.out, args.jobs, args.features)
    print(common.loo_markdown(results))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
