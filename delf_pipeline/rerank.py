"""Stage 3, rerank: local matching + RANSAC on each query's shortlisted candidates.

For every query, its ``num_to_rerank`` best shortlisted index images are verified with
:func:`delf_pipeline.verification.pairs.verify_pair` and scored:

* ``official`` (DELF/DELG retrieval): order by (inliers, global score). The score column
  is ``inliers + global_score / 2``, which sorts exactly that way since |global| <= 1.
* ``kaggle2020`` (host baseline): ``min(inliers, M) / M + global_score``, M = max_inlier_score.

Inlier counts below ``min_inliers`` count as 0: unrelated pairs still get a handful of
"inliers" from every RANSAC variant (see docs/design.md), which must not raise their score.

Work is split into numbered query blocks (see :mod:`delf_pipeline.utils.blocks`), run in
parallel by joblib processes (``--jobs``) or on a Dask cluster (``--dask ADDRESS``), each
block written atomically, so a killed run resumes and shards can run anywhere.
Each worker keeps the local features of index images it has read in a bounded cache, so
an index image shared by many queries is read from the store once per worker.

Output CSV: ``query_id,index_id,global_score,matches,inliers,score,status``, rows of a
query sorted by score (descending).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from .candidates import SHORTLIST_COLUMNS, top_candidates
from .config import load_config
from .extractors.features import ImageFeatures
from .formats.store import FeatureStore
from .utils.artifacts import fingerprint, parse_shard, settings_manifest
from .utils.blocks import claim_blocks, read_table, run_blocks, write_block
from .utils.parallel import run_tasks, worker_local
from .utils.progress import track
from .verification.pairs import PairResult, verify_matches, verify_options, verify_pair

log = logging.getLogger("delf_pipeline.rerank")

COLUMNS = ("query_id", "index_id", "global_score", "matches", "inliers", "score", "status")
RELEASE_EVERY = 256  # candidates read between two releases of the stores' mapped pages
QUERY_BLOCK = 32  # queries per block: the unit of resume, sharding and parallel work


def run(
    config: dict,
    shortlist_csv: str | Path,
    query_store: str | Path,
    index_store: str | Path,
    out: str | Path,
    *,
    shard: tuple[int, int] = (1, 1),
    overwrite: bool = False,
    jobs: int = 1,
    dask_address: str | None = None,
) -> Path:
    """Verify the shortlisted candidates of every query; writes and returns ``out``.

    ``index_store`` must hold the candidates' local features: a store made with
    ``extract.local_features`` false holds global descriptors only, and then the store of
    ``extract --candidates`` (which :func:`delf_pipeline.pipeline.run` makes itself) is given.
    """
    conf, out = config["rerank"], Path(out)
    shortlist = read_table(Path(shortlist_csv), SHORTLIST_COLUMNS)
    candidates = top_candidates(shortlist, conf["num_to_rerank"])
    require_local_features(Path(index_store))
    paths = (str(query_store), str(index_store))

    def compute(blocks: list[tuple[int, list[str]]]) -> None:
        tasks = [(number, {q: candidates[q] for q in ids}) for number, ids in blocks]
        _run_parallel(tasks, out, paths, conf, jobs, dask_address)

    with claim_blocks(out, shard, "rerank output", rerank_manifest(conf, shortlist), overwrite):
        run_blocks(out, list(candidates), QUERY_BLOCK, shard, COLUMNS, compute)
    if out.exists():
        counts = read_table(out)["status"].value_counts().to_dict()
        log.info("rerank %s: %d pairs verified (%s)", out, sum(counts.values()),
                 ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return out


def rerank_manifest(conf: dict, shortlist: pd.DataFrame) -> dict:
    """Every ``rerank`` key (none of them is runtime-only: ``--jobs`` is not a setting) and the
    whole shortlist's content: any changed row or key gives another manifest."""
    return {**settings_manifest(conf), "shortlist_content": table_fingerprint(shortlist)}


def table_fingerprint(table: pd.DataFrame) -> str:
    """Hash of every cell (and the column names) of ``table``, in row order."""
    rows = pd.util.hash_pandas_object(table, index=False).to_numpy()
    return fingerprint({"columns": list(table.columns), "rows": hashlib.sha1(rows.tobytes()).hexdigest()})


def require_local_features(index_store: Path) -> None:
    """Raise a ValueError saying what to do when ``index_store`` holds no local features."""
    if not FeatureStore(index_store).manifest()["settings"].get("local_features", True):
        raise ValueError(
            f"{index_store} holds global descriptors only. Extract the shortlisted candidates' local features "
            "first with `delf-pipeline extract --candidates SHORTLIST.csv --set extract.local_features=true` "
            "(shardable) and pass that store as --index (`delf-pipeline run` does this itself)."
        )


def _run_parallel(tasks, out: Path, paths, conf: dict, jobs: int, dask_address: str | None) -> None:
    """Run the blocks in this process, in joblib worker processes, or on a Dask cluster."""
    if jobs == 1 and dask_address is None:
        worker = BlockWorker(*paths, conf)
        for number, block in track(tasks, len(tasks), "rerank blocks"):
            write_block(out, number, worker.rerank_block(block))
        return
    tasks = [(number, block, str(out), paths, conf) for number, block in tasks]
    run_tasks(_rerank_and_write, tasks, "rerank blocks", jobs=jobs, dask_address=dask_address)


def _rerank_and_write(number: int, block: dict, out: str, paths: tuple[str, str], conf: dict) -> int:
    """Task run in a worker process: verify one block and write it atomically."""
    worker = worker_local(("rerank", *paths, fingerprint(conf)), lambda: BlockWorker(*paths, conf))
    write_block(Path(out), number, worker.rerank_block(block))
    return number


class BlockWorker:
    """Verifies blocks of queries, keeping recently used index features in memory."""

    def __init__(self, query_store: str | None, index_store: str, conf: dict, cache_images: int = 2000):
        self.queries = FeatureStore(query_store) if query_store is not None else None  # None: queries given in memory
        self.index = FeatureStore(index_store)
        self.conf = conf
        self.options = verify_options(conf)
        self.glue = learned_matcher(conf, [p for p in (query_store, index_store) if p is not None])
        self.cache: OrderedDict[str, ImageFeatures] = OrderedDict()
        self.cache_images = cache_images
        self.reads_since_release = 0

    def index_features(self, image_id: str) -> ImageFeatures:
        """Local features of an index image, read from the store once while cached."""
        if image_id in self.cache:
            self.cache.move_to_end(image_id)
            return self.cache[image_id]
        features = self.index.features(image_id)
        self.cache[image_id] = features
        if len(self.cache) > self.cache_images:
            self.cache.popitem(last=False)
        return features

    def rerank_block(self, block: dict[str, list[tuple[str, float]]]) -> pd.DataFrame:
        """Rows (COLUMNS) for every (query, candidate) of the block."""
        rows = [row for query_id, cands in block.items() for row in self.rerank_query(query_id, cands)]
        return pd.DataFrame(rows, columns=list(COLUMNS))

    def rerank_query(self, query_id: str, candidates: list[tuple[str, float]]) -> list[tuple]:
        """Verify one stored query against its candidates; rows sorted by score descending.

        Every RELEASE_EVERY candidates the stores' mapped pages are released, so the worker's
        resident memory is bounded by that many reads, not by the union of its candidates
        (releasing after every query cost more: each query's candidates were mapped anew)."""
        size = self.queries.size(query_id) if self.glue is not None else None
        rows = self.rerank_features(query_id, self.queries.features(query_id), candidates, size)
        self.reads_since_release += len(candidates)
        if self.reads_since_release >= RELEASE_EVERY:
            self.queries.release()
            self.index.release()
            self.reads_since_release = 0
        return rows

    def rerank_features(self, query_id: str, query: ImageFeatures, candidates: list[tuple[str, float]],
                        query_size: tuple[int, int] | None = None) -> list[tuple]:
        """:meth:`rerank_query` of a query whose features are given (in original-image pixels;
        ``query_size``, its original (height, width), is needed by the lighterglue matcher)."""
        rows = []
        for index_id, global_score in candidates:
            sizes = (query_size, self.index.size(index_id)) if self.glue is not None else None
            result = self.verify(query, self.index_features(index_id), sizes)
            inliers = result.inliers if result.inliers >= self.conf["min_inliers"] else 0
            score = final_score(inliers, global_score, self.conf)
            rows.append((query_id, index_id, global_score, result.matches, inliers, score, result.status))
        return sorted(rows, key=lambda row: (-row[5], row[1]))

    def verify(self, query: ImageFeatures, candidate: ImageFeatures,
               sizes: tuple[tuple[int, int] | None, tuple[int, int]] | None = None) -> PairResult:
        """:func:`verify_pair` of two images; 0 matches when a side has no features (a store
        part whose images all have none holds descriptors [0, 0], of another dimension).
        With the lighterglue matcher, its matches go to the same verifier; it needs ``sizes``,
        the original (height, width) of the query and of the candidate."""
        if not query.num_features or not candidate.num_features:
            return PairResult(0, 0, "too_few_matches", np.zeros((0, 2), np.int64), np.zeros(0, bool))
        if self.glue is not None:
            if sizes is None or sizes[0] is None:
                raise ValueError("rerank.matcher = 'lighterglue' needs the original (height, width) of both images")
            pairs = self.glue.match_stored(query.locations, query.descriptors, sizes[0],
                                           candidate.locations, candidate.descriptors, sizes[1])
            return verify_matches(query.locations, candidate.locations, pairs, **self.options)
        return verify_pair(query.locations, query.descriptors, candidate.locations, candidate.descriptors,
                           **self.options)


def learned_matcher(conf: dict, stores: list[str]):
    """The LighterGlue model when ``conf["matcher"]`` is ``lighterglue`` (else None), once every
    store in ``stores`` is checked to hold XFeat local features (ValueError naming it if not).
    Its weights come from the folder the last store was extracted with (``extract.xfeat_weights``,
    as a Kaggle bundle sets it), else from the cache."""
    if conf["matcher"] != "lighterglue":
        return None
    for path in stores:
        settings = FeatureStore(path).manifest()["settings"]
        local = settings.get("local_backend") or settings.get("backend")
        if local != "xfeat":
            raise ValueError(f"rerank.matcher = 'lighterglue' matches 64-d XFeat local features; {path} holds "
                             f"{local!r} ones (extract.backend / extract.local_backend must be xfeat)")
    from .verification.lighterglue import load_xfeat_lighterglue

    return load_xfeat_lighterglue(settings.get("xfeat_weights") or None)


def final_score(inliers: int, global_score: float, conf: dict) -> float:
    """Score of a verified candidate under ``conf["scoring"]`` (see module docstring)."""
    if conf["scoring"] == "official":
        return inliers + global_score / 2.0
    if conf["scoring"] == "kaggle2020":
        cap = conf["max_inlier_score"]
        return min(inliers, cap) / cap + global_score
    raise ValueError(f"unknown rerank.scoring {conf['scoring']!r}; use official or kaggle2020")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import add_config_arguments, add_run_arguments

    parser.add_argument("--shortlist", required=True, help="shortlist CSV from `delf-pipeline shortlist`")
    parser.add_argument("--queries", required=True, help="feature store of the query images")
    parser.add_argument("--index", required=True, help="feature store of the index images")
    parser.add_argument("--out", required=True, help="rerank CSV to write")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one per core works best)")
    parser.add_argument("--dask", metavar="ADDRESS", help="run the blocks on this dask.distributed scheduler")
    add_run_arguments(parser)
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.config, args.overrides)
    run(config, args.shortlist, args.queries, args.index, args.out, shard=parse_shard(args.shard),
        overwrite=args.overwrite, jobs=args.jobs, dask_address=args.dask)
    return 0
