"""``delf-pipeline evaluate-revisitop``: Revisited Oxford / Paris (Radenovic et al. 2018) end to end.

Given the official ground truth (``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``) and the folder
of the dataset's ``.jpg`` images, this

1. crops every query to its ``bbx`` (as the official evaluation does) into ``OUT/queries/``;
2. extracts the index images (``imlist``) and the cropped queries (``OUT/features/``);
3. shortlists every index image for each query (a full ranking: AP needs all positives),
   re-ranks the first ``rerank.num_to_rerank`` unless that is 0 (all of them: an adaptive
   depth, ``rerank.first_depth``, would leave a decided query's other candidates in global
   order, and AP scores the whole order);
4. prints mAP and mP@k of the Easy, Medium and Hard protocols (:func:`revisited_map`) and
   writes them to ``OUT/revisitop.json``.

Every stage resumes as in ``delf-pipeline run``. Example (DELG, GLDv2-clean)::

    delf-pipeline evaluate-revisitop --gnd gnd_roxford5k.pkl --images roxford5k/jpg \\
        --out runs/roxf --preset delg_gldv2 --model DELG_SAVEDMODEL
"""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from PIL import Image

from . import extract, predict, rerank, shortlist
from .config import Config, add_config_arguments, load_config
from .formats.blocks import read_table
from .formats.revisitop import GroundTruth, crop_box, read_ground_truth
from .formats.store import FeatureStore
from .metrics.revisitop import PROTOCOLS, revisited_map
from .utils.artifacts import atomic_path, write_json_atomic

log = logging.getLogger("delf_pipeline.evaluate_revisitop")
IMAGE_SUFFIX = ".jpg"  # the datasets' image files: NAME.jpg


def run(config: Config, gnd: str | Path, images: str | Path, out: str | Path, *, jobs: int = 1,
        ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """All steps above; returns ``revisited_map``'s result (without per-query APs in the JSON)."""
    truth, images, out = read_ground_truth(gnd), Path(images), Path(out)
    index_csv = write_image_list(out / "index.csv", [(name, images / f"{name}{IMAGE_SUFFIX}") for name in truth.imlist])
    queries_csv = write_image_list(out / "queries.csv", crop_queries(truth, images, out / "queries"))
    index = extract.run(config, index_csv, out / "features" / "index")
    codebook = index / "codebook.npy"
    queries = extract.run(extract.query_config(config, FeatureStore(index)), queries_csv, out / "features" / "queries",
                          codebook=codebook if codebook.exists() else None)
    config = config.copy()
    config.shortlist.top_k = len(truth.imlist)
    if config.rerank.first_depth:
        log.info("evaluate-revisitop verifies all %d first candidates of each query (rerank.first_depth=%d ignored: "
                 "AP scores the whole re-ranked order)", config.rerank.num_to_rerank, config.rerank.first_depth)
        config.rerank.first_depth = 0
    shortlist_csv = shortlist.run(config, index, queries, out / "shortlist.csv")
    rerank_csv = None
    if config.rerank.num_to_rerank > 0:
        rerank_csv = rerank.run(config, shortlist_csv, queries, index, out / "rerank.csv", jobs=jobs,
                                query_images=queries_csv, index_images=index_csv)  # a cascade's views and fallback
    ranking = predict.final_ranking(read_table(shortlist_csv), read_table(rerank_csv) if rerank_csv else None)
    result = score(ranking_lists(ranking, truth.qimlist), truth, ks)
    write_json_atomic(out / "revisitop.json", {p: {k: v for k, v in result[p].items() if k != "ap"} for p in result})
    return result


def crop_queries(truth: GroundTruth, images: Path, folder: Path) -> list[tuple[str, Path]]:
    """Each query image cropped to its bbx, saved losslessly as ``folder/NAME.png`` (once)."""
    folder.mkdir(parents=True, exist_ok=True)
    listed = []
    for name, query in zip(truth.qimlist, truth.queries):
        target = folder / f"{name}.png"
        if not target.exists():
            source = images / f"{name}{IMAGE_SUFFIX}"
            if not source.exists():
                raise FileNotFoundError(f"query image {source} of the ground truth is missing")
            with Image.open(source) as image:
                cropped = image.crop(crop_box(query.bbx, *image.size))
            with atomic_path(target) as tmp:
                cropped.save(tmp, format="PNG")
        listed.append((name, target))
    return listed


def write_image_list(path: Path, rows: list[tuple[str, Path]]) -> Path:
    """An image-list CSV (``id,path``) that extract reads."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        csv.writer(handle).writerows([("id", "path"), *((i, str(p)) for i, p in rows)])
    return path


def ranking_lists(ranking, query_names: list[str]) -> list[list[str]]:
    """Per query (in ground-truth order) its index ids, best first (empty if it failed)."""
    ordered = ranking.sort_values(["query_id", "rank"], kind="stable")
    by_query = {q: group["index_id"].tolist() for q, group in ordered.groupby("query_id", sort=False)}
    return [by_query.get(name, []) for name in query_names]


def score(lists: list[list[str]], truth: GroundTruth, ks: tuple[int, ...]) -> dict:
    """Easy / Medium / Hard mAP and mP@k of ranked index ids per query."""
    return revisited_map(lists, [truth.as_ids(q) for q in range(len(truth.qimlist))], ks)


def format_table(result: dict) -> str:
    """A Markdown table: one row per protocol, mAP and mP@k in percent (as the papers print)."""
    ks = list(result[PROTOCOLS[0]]["mp@k"])
    lines = ["| protocol | mAP | " + " | ".join(f"mP@{k}" for k in ks) + " |", "|---" * (2 + len(ks)) + "|"]
    for protocol in PROTOCOLS:
        values = [result[protocol]["map"], *result[protocol]["mp@k"].values()]
        lines.append(f"| {protocol.capitalize()} | " + " | ".join(f"{100 * v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gnd", required=True, help="official ground truth: gnd_roxford5k.pkl or gnd_rparis6k.pkl")
    parser.add_argument("--images", required=True, help="folder of the dataset's NAME.jpg images")
    parser.add_argument("--out", required=True, help="work folder (cropped queries, features, rankings)")
    parser.add_argument("--model", help="DELF/DELG SavedModel folder or hub handle (sets extract.model)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="k of mP@k (default: 1 5 10)")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f'extract.model="{args.model}"'] if args.model else [])
    config = load_config(args.preset, args.config, overrides)
    print(format_table(run(config, args.gnd, args.images, args.out, jobs=args.jobs, ks=tuple(args.ks))))
    return 0
