#!/usr/bin/env python
"""Screenshots of the search-by-photo page, made from the demo's own data (no download).

Builds the ``delf-pipeline demo`` landmark set (views of scikit-image photos), an index of
its index views labelled with the photos' names (calibrated on itself: at build, else by
``calibrate`` without the build's time limit), serves it
on loopback, opens the page in headless Chromium, saves it idle (what the index holds), then
uploads one query view and saves the page once it shows the answer.

    python tests/support/service_screenshot.py --out runs/screenshot --shot docs/service_page.jpg \
        --idle-shot docs/service_idle.jpg

(``browser`` is tests/support/browser.py: Python puts this script's folder on its path.)
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from browser import Browser

from delf_pipeline import calibrate, index
from delf_pipeline.config import load_config
from delf_pipeline.formats.index_folder import open_index
from delf_pipeline.formats.images import kaggle_path
from delf_pipeline.service.app import create_app
from delf_pipeline.service.serve import running
from delf_pipeline.tools.demo import LANDMARKS, build_demo_set, demo_id


def demo_index(out: Path) -> Path:
    """The demo set's index views as an index, each labelled with its photo's name."""
    data = out / "data"
    if not (data / "solution.csv").is_file():
        build_demo_set(data)
    with open(data / "train.csv", newline="") as handle:
        rows = [(r["id"], LANDMARKS[int(r["landmark_id"])]) for r in csv.DictReader(handle)]
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows([("id", "landmark_id"), *rows])
    built = index.build(load_config(), data, out / "index", labels=labels)
    if not (built / "calibration.json").is_file():  # the build's time limit left none: fit it without one
        calibrate.run(load_config(), built / "store", open_index(built).labels, built / "calibration.json",
                      work=out / "calibration", table=False)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/screenshot"), help="demo data and index")
    parser.add_argument("--shot", type=Path, default=Path("docs/service_page.jpg"), help="the answer page to write")
    parser.add_argument("--idle-shot", type=Path, help="the idle page (before a photo is chosen) to write")
    parser.add_argument("--photo", default="motorcycle/query/0",
                        help="demo query view to upload (the other camera of the stereo pair by default)")
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    built = demo_index(args.out)
    photo = kaggle_path(args.out / "data", "test", demo_id(args.photo))
    with running(create_app(built)) as url, Browser(args.chromium, height=1480) as page:
        page.navigate(url + "/")
        if args.idle_shot:
            page.wait_for("document.getElementById('status').dataset.holds > 0 && "
                          "[...document.images].every(i => i.complete)")
            page.screenshot(args.idle_shot)
        page.set_files("#photo-input", [photo])
        page.wait_for("['done', 'error'].includes(document.getElementById('status').dataset.state)", timeout=120)
        page.wait_for("[...document.images].every(i => i.complete)")
        state = page.evaluate("document.getElementById('status').dataset.state")
        if state != "done" or page.console_errors:
            sys.exit(f"the page did not show an answer: {state}, console errors {page.console_errors}")
        landmark = page.evaluate("document.getElementById('status').dataset.landmark")
        page.screenshot(args.shot)
    print(f"{args.shot}: {photo.name} -> best landmark {landmark}")


if __name__ == "__main__":
    main()
