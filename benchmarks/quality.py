#!/usr/bin/env python3
"""The dev protocol (issue 23): every preset on every dev task, one table, one command.

Tasks, all from ``../shared/data``:

* ``dev_split``: landmarks_dev split by place (:func:`common.landmarks_dev_rows`: round(n / 3)
  of each place's photos and of the non-landmarks as queries, drawn with ``--seed``; the other
  landmark photos are the index), a Kaggle-layout folder of symbolic links run end to end by
  ``pipeline.run`` (what ``delf-pipeline run`` does, without its calibration of the index unless
  ``--calibrate``), so its seconds are a user's;
* ``dev_loo``: landmarks_dev leave-one-out: every landmark photo a query against all the other
  photos, the non-landmarks unlabelled distractors in the index (they never vote);
* ``mini_loo``: landmarks_mini leave-one-out (every photo a query);
* ``hard``: the hard task (:func:`common.build_hard_task`) through ``pipeline.run``;
* ``evd``: the 15 EVD pairs (:func:`common.evd_stats`) with the preset's local features and
  rerank section: true pairs whose inliers are above the maximum of the swapped pairs.

Per run (task x preset): GAP, top-1, mAP@100 of the final ranking, GAP / oracle (the GAP of
the same predictions with the confidences reordered so that every right answer comes first),
bootstrap 90% intervals of GAP and top-1 (queries resampled, ``--seed``; the same resamples
for every preset of a task, so the comparison with the task's best preset is paired: "tied"
when the 90% interval of the difference holds 0, i.e. a difference inside the intervals is no
difference), seconds (wall and process CPU of this process's stages, extraction included as
recorded when the store was made), the stored global dimension, and the diagnosis: shortlist
recall@1/5/20/100 (share of landmark queries with a right index image within the first k),
median inliers of the right class's best verified candidate vs the best wrong class's, and the
share of landmark queries whose answer the re-ranking changed (right -> wrong, wrong -> right)
against the global-only prediction.

Everything is cached under ``--work`` (keep it outside the repository): task folders, feature
stores (shared by presets whose extract settings are the same, named by their fingerprint) and
each run's stage outputs, which resume. Writes ``WORK/quality.csv`` (one row per query per run)
and ``WORK/quality.md`` (the table), and prints the table. ``--skip PRESET:TASK`` leaves a row
pending (``xfeat_lighterglue`` re-ranks at ~0.4-1 s per pair: its leave-one-outs take hours
on 2 cores); ``--variant NAME PRESET [SECTION.KEY=VALUE ...]`` adds a row of a preset with
overrides; ``--pair A B`` prints, under the table, run A - run B on every task with the 90%
interval of the paired difference (the same resamples). Example::

    delf-pipeline weights fetch xfeat
    nice -n 10 python benchmarks/quality.py --work /work/cache/quality \\
        --skip xfeat_lighterglue:dev_loo --skip xfeat_lighterglue:mini_loo --skip xfeat_lighterglue:dev_split
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import common
import numpy as np
import pandas as pd

from delf_pipeline import extract, pipeline, predict
from delf_pipeline.cli import setup_logging
from delf_pipeline.config import Config, load_config
from delf_pipeline.evaluate import evaluate
from delf_pipeline.extractors.build import LOCAL_BACKENDS, build, local_extractor, resolve_model
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.images import list_images
from delf_pipeline.formats.store import FeatureStore
from delf_pipeline.formats.tables import read_labels, read_solution, read_submission
from delf_pipeline.utils.artifacts import fingerprint, write_json_atomic, write_text_atomic
from delf_pipeline.verification.cascade import AsiftFallback, combine, counted, fallback_counted
from delf_pipeline.verification.pairs import verify_options

PRESETS = ("sift_default", "xfeat", "xfeat_lighterglue", "efficientnet_lite0_fused", "efficientnet_lite0",
           "efficientnet_lite0_rootsift", "xfeat_lite0", "xfeat_fused")
TASKS = ("dev_split", "dev_loo", "mini_loo", "hard", "evd")
RECALL_AT = (1, 5, 20, 100)
LEVEL = 0.90  # bootstrap interval
PER_QUERY = ("task", "run", "query_id", "truth", "label", "confidence", "right", "global_label",
             "global_confidence", "global_right", "first_right_rank", "right_inliers", "wrong_inliers")


@dataclass
class Outcome:
    """One run: per-query rows (PER_QUERY columns but task and run), seconds, and extras."""

    queries: pd.DataFrame | None
    wall: float = math.nan
    cpu: float = math.nan
    extra: dict = field(default_factory=dict)


# Runs

def store_key(config: Config) -> str:
    """The folder name of a store: the fingerprint of its extract settings (presets that
    extract alike share it)."""
    return extract.store_manifest(config.extract)["fingerprint"]


def recorded(path: Path, fresh: bool, wall: dict, cpu: dict) -> tuple[float, float]:
    """(wall, cpu) seconds of a run's own stages: this call's (recorded in ``path``) when it made
    them from nothing, else those recorded by the call that did (nan when none did)."""
    if fresh:
        write_json_atomic(path, {"wall": sum(wall.values()), "cpu": sum(cpu.values())})
    if path.exists():
        data = json.loads(path.read_text())
        return data["wall"], data["cpu"]
    return math.nan, math.nan


def pipeline_task(name: str, config: Config, run_name: str, args: argparse.Namespace) -> Outcome:
    """A Kaggle-layout task run end to end by ``pipeline.run``; its stores are extracted first
    (the run then skips them) so that their cost is recorded once per store."""
    task = args.work / "tasks" / name
    if not (task / "solution.csv").exists():
        counts = (common.build_dev_split if name == "dev_split" else common.build_hard_task)(task, args.data, args.seed)
        logging.getLogger("quality").warning("%s: %s", name, counts)
    out = args.work / "runs" / name / run_name
    features = args.work / "stores" / name / store_key(config)
    out.mkdir(parents=True, exist_ok=True)
    features.mkdir(parents=True, exist_ok=True)
    if not (out / "features").exists():
        (out / "features").symlink_to(features.resolve())
    index, made_index = common.timed_store(config, task, features / "index", split="train")
    codebook = index / "codebook.npy"
    query_config = config.copy()
    query_config.extract.update(local_features=True, model=FeatureStore(index).manifest()["settings"]["model"])
    _, made_query = common.timed_store(query_config, task, features / "query", split="test",
                                       codebook=codebook if codebook.exists() else None)
    fresh = not (out / "submission.csv").exists()
    wall, cpu = {}, {}
    with common.Timer(wall, cpu, "run"):
        submission = pipeline.run(config, task, out, jobs=args.jobs, calibrate_index=args.calibrate)
    own = recorded(out / "timing.json", fresh, wall, cpu)
    labels = read_labels(task / "train.csv")
    global_sub = predict.run(config, out / "shortlist.csv", labels, predict.query_ids(out / "features" / "query",
                             task / "sample_submission.csv"), out / "global" / "submission.csv")
    rerank_csv = out / "rerank.csv"
    frame = per_query(out / "shortlist.csv", rerank_csv if rerank_csv.exists() else None, global_sub, submission,
                      task / "solution.csv", labels)
    metrics = evaluate(submission, task / "solution.csv", out / "ranking.csv", task / "train.csv")
    return Outcome(frame, made_index["wall"] + made_query["wall"] + own[0], made_index["cpu"] + made_query["cpu"] + own[1],
                   {"map@100": metrics["retrieval"]["map@100"], "dim": global_dim(index, config)})


def loo_task(name: str, config: Config, run_name: str, args: argparse.Namespace) -> Outcome:
    """Leave-one-out on landmarks_dev (landmark photos as queries) or landmarks_mini (all)."""
    folder = args.data / ("landmarks_dev" if name == "dev_loo" else "landmarks_mini")
    queries = {i for i, label, _ in common.labelled_rows(folder) if label} if name == "dev_loo" else None
    out = args.work / "runs" / name / run_name
    store = args.work / "stores" / name / store_key(config)
    fresh = not (out / "reranked" / "submission.csv").exists()
    results = common.leave_one_out(config, folder, out, args.jobs, features=store, queries=queries)
    own = {k: v for k, v in results["seconds"].items() if k not in ("extract", "predict global")}
    own_cpu = {k: v for k, v in results["cpu"].items() if k not in ("extract", "predict global")}
    wall, cpu = recorded(out / "timing.json", fresh, own, own_cpu)
    files = results["files"]
    frame = per_query(files["shortlist"], files["rerank"], files["global"], files["reranked"], files["solution"],
                      read_labels(files["labels"]))
    return Outcome(frame, results["seconds"]["extract"] + wall, results["cpu"]["extract"] + cpu,
                   {"map@100": results["reranked"]["retrieval"]["map@100"], "dim": global_dim(store, config)})


def evd_task(config: Config, args: argparse.Namespace) -> Outcome:
    """The EVD statistics of the preset's local features and verification (cached by both); with
    a lighterglue cascade, each pair's count is the cascade's (:func:`cascade_evd`), then its asift
    fallback's where that is on (:func:`fallback_evd`)."""
    conf = config.extract
    local = conf.local_backend or conf.backend
    if local not in LOCAL_BACKENDS:  # the model's own local features, from the export the hard task's index makes
        task = args.work / "tasks" / "hard"
        if not (task / "solution.csv").exists():
            common.build_hard_task(task, args.data, args.seed)
        conf = replace(resolve_model(conf, list_images(task, "train")[0]), vlad_weight=0.0)  # locals only: no VLAD
    stats = evd_stats(config, conf, local, config.rerank.matcher == "lighterglue", args)
    if config.rerank.cascade == "lighterglue":
        stats = cascade_evd(stats, evd_stats(config, config.extract, "xfeat", True, args), config.rerank)
    if config.rerank.cascade and config.rerank.cascade_fallback:
        stats = fallback_evd(stats, asift_evd(config.rerank, args), config.rerank)
    rows = pd.DataFrame([{"query_id": name, "right_inliers": t, "wrong_inliers": s} for name, t, s, _ in stats["pairs"]])
    return Outcome(rows, stats["wall"], stats["cpu"], {"evd": stats})


def evd_stats(config: Config, conf, local: str, glue: bool, args: argparse.Namespace) -> dict:
    """:func:`common.evd_stats` of the ``local`` features extracted with ``conf``, matched by the
    descriptor matcher or (``glue``) LighterGlue, verified as ``config.rerank`` says; cached."""
    local_keys = {k: v for k, v in conf.items() if k in LOCAL_SETTINGS or local not in LOCAL_BACKENDS}
    key = fingerprint({"local": local, "extract": local_keys, "rerank": config.rerank.to_dict(), "glue": glue})
    cache = args.work / "evd" / f"{key}.json"
    if not cache.exists():
        extractor = local_extractor(conf, local) if local in LOCAL_BACKENDS else build(conf)
        match = common.glue_match(verify_options(config.rerank)) if glue else None
        folder = args.data / "evd"
        names = sorted(p.stem for p in (folder / "1").glob("*.png"))
        wall, cpu = {}, {}
        with common.Timer(wall, cpu, "evd"):
            stats = common.evd_stats(extractor, verify_options(config.rerank), folder, names,
                                     argparse.Namespace(max_image_size=conf.max_image_size), match)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, {**stats, "wall": wall["evd"], "cpu": cpu["evd"]})
    return json.loads(cache.read_text())


def cascade_evd(fast: dict, second: dict, conf) -> dict:
    """EVD statistics of a cascade from those of its ``fast`` path and of its ``second`` stage:
    each pair (true and swapped) whose fast count is under ``cascade_inliers`` takes the counts of
    the rule (``cascade_rule``, the second stage's under ``cascade_min_inliers`` counting 0)."""
    def count(fast_count: int, second_count: int) -> int:
        if fast_count >= conf.cascade_inliers:
            return fast_count
        return combine(fast_count, counted(second_count, conf), conf.cascade_rule)

    pairs = [(name, count(t, t2), count(s, s2), a) for (name, t, s, a), (_, t2, s2, _) in
             zip(fast["pairs"], second["pairs"])]
    return pair_stats(pairs, fast, second)


def pair_stats(pairs: list[tuple], *parts: dict) -> dict:
    """EVD statistics of ``pairs`` (name, true count, swapped count, agreeing), with the wall and
    CPU seconds of the ``parts`` (each stage's statistics) summed."""
    true, swapped = [p[1] for p in pairs], [p[2] for p in pairs]
    return {"median_true": float(np.median(true)), "max_swapped": max(swapped),
            "above": sum(t > max(swapped) for t in true), "pairs": pairs,
            "wall": sum(part["wall"] for part in parts), "cpu": sum(part["cpu"] for part in parts)}


FALLBACK_KEYS = ("fallback_tilts", "fallback_image_size", "fallback_features", "seed")


def asift_evd(conf, args: argparse.Namespace) -> dict:
    """The cascade's asift fallback (:class:`AsiftFallback` of the rerank settings ``conf``) on
    the EVD pairs, image 2 the query as in the hard task: its inliers per pair, true and swapped
    (image 2 of the next pair against image 1), and its CPU seconds; cached."""
    key = fingerprint({"asift_fallback": {k: conf[k] for k in FALLBACK_KEYS}})
    cache = args.work / "evd" / f"{key}.json"
    if not cache.exists():
        fallback, folder = AsiftFallback(conf), args.data / "evd"
        names = sorted(p.stem for p in (folder / "1").glob("*.png"))
        wall, cpu = {}, {}
        with common.Timer(wall, cpu, "evd"):
            pairs = [(name, *(fallback.verify(str(folder / "2" / f"{query}.png"), str(folder / "1" / f"{name}.png")).inliers
                              for query in (name, names[(i + 1) % len(names)])))
                     for i, name in enumerate(names)]
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, {"pairs": pairs, "wall": wall["evd"], "cpu": cpu["evd"]})
    return json.loads(cache.read_text())


def fallback_evd(stats: dict, fallback: dict, conf) -> dict:
    """EVD statistics of a cascade (``stats``, :func:`cascade_evd`'s or the fast path's) with its
    asift fallback: each pair whose count is still under ``cascade_inliers`` takes the larger of
    it and the fallback's (0 under ``fallback_min_inliers``)."""
    def count(before: int, after: int) -> int:
        return before if before >= conf.cascade_inliers else max(before, fallback_counted(after, conf))

    pairs = [(name, count(t, t2), count(s, s2), a) for (name, t, s, a), (_, t2, s2) in
             zip(stats["pairs"], fallback["pairs"])]
    return pair_stats(pairs, stats, fallback)


LOCAL_SETTINGS = ("max_image_size", "max_features", "affine_tilts", "xfeat_weights", "xfeat_threshold", "xfeat_scales")


def global_dim(store: Path, config: Config) -> int:
    """Dimension of the global descriptor searched: the store's, or whitening_dim when set."""
    found = FeatureStore(store)
    dim = int(found.global_matrix(found.ids[:1]).shape[1])
    conf = config.shortlist
    return min(dim, conf.whitening_dim) if conf.whitening and conf.whitening_dim else dim


# Per-query rows and the measures

def per_query(shortlist_csv: Path, rerank_csv: Path | None, global_submission: Path, submission: Path,
              solution_csv: Path, labels: dict[str, str]) -> pd.DataFrame:
    """One row per query of the solution: truth, the re-ranked and global-only predictions and
    whether each is right, the shortlist rank of the first right index image (inf if none), the
    best inliers of a right and of a wrong class among the verified candidates (nan without rerank)."""
    solution = read_solution(solution_csv)
    final, first = read_submission(submission), read_submission(global_submission)
    shortlist = read_table(shortlist_csv, ("query_id", "index_id", "rank"))
    truth = shortlist["query_id"].map(lambda q: solution.get(q, set()))
    shortlist = shortlist.assign(right=[labels.get(i) in t for i, t in zip(shortlist["index_id"], truth)])
    first_right = shortlist[shortlist["right"]].groupby("query_id")["rank"].min()
    inliers = {}
    if rerank_csv is not None:
        verified = read_table(rerank_csv, ("query_id", "index_id", "inliers"))
        verified = verified.assign(label=verified["index_id"].map(labels), inliers=verified["inliers"].astype(int))
        verified = verified.dropna(subset=["label"])
        right = [label in solution.get(q, set()) for q, label in zip(verified["query_id"], verified["label"])]
        best = verified.assign(right=right).groupby(["query_id", "right"])["inliers"].max()
        inliers = best.to_dict()
    rows = []
    for q in sorted(solution):
        label, confidence = final.get(q) or ("", math.nan)
        global_label, global_confidence = first.get(q) or ("", math.nan)
        rows.append({"query_id": q, "truth": " ".join(sorted(solution[q])), "label": label,
                     "confidence": confidence, "right": label in solution[q], "global_label": global_label,
                     "global_confidence": global_confidence, "global_right": global_label in solution[q],
                     "first_right_rank": float(first_right.get(q, math.inf)),
                     "right_inliers": inliers.get((q, True), 0) if rerank_csv is not None else math.nan,
                     "wrong_inliers": inliers.get((q, False), 0) if rerank_csv is not None else math.nan})
    return pd.DataFrame(rows)


def gap_order(frame: pd.DataFrame) -> np.ndarray:
    """Position [N] of each query (rows in query-id order) in GAP's pooling: predictions by
    confidence descending, ties in query-id order; queries without a prediction last."""
    confidence = np.where(frame["label"] != "", frame["confidence"].fillna(-np.inf), -np.inf)
    order = np.argsort(-confidence, kind="stable")
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    return position


def resampled(frame: pd.DataFrame, draws: np.ndarray, position: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(GAP [R], top-1 [R]) of the queries drawn by each row of ``draws`` [R, N] (row indices of
    ``frame``, in query-id order); ``position`` = GAP's pooling order (default :func:`gap_order`)."""
    hits = frame["right"].to_numpy(bool) & (frame["label"] != "").to_numpy()
    landmark = (frame["truth"] != "").to_numpy()
    position = gap_order(frame) if position is None else position
    by_position = np.empty(len(frame), bool)
    by_position[position] = hits
    ranked = by_position[np.sort(position[draws], axis=1)]
    precision = np.cumsum(ranked, axis=1) / np.arange(1, draws.shape[1] + 1)
    queries = np.maximum(landmark[draws].sum(axis=1), 1)
    return (precision * ranked).sum(axis=1) / queries, hits[draws].sum(axis=1) / queries


def measures(frame: pd.DataFrame, draws: np.ndarray) -> dict:
    """The table's numbers of one run's per-query rows (landmark queries for the diagnosis)."""
    every = np.arange(len(frame))[None, :]
    gap, top1 = (float(v[0]) for v in resampled(frame, every))
    oracle_position = gap_order(frame.assign(confidence=frame["right"] * 1e9 + frame["confidence"].fillna(0)))
    oracle = float(resampled(frame, every, oracle_position)[0][0])
    boot_gap, boot_top1 = resampled(frame, draws)
    tail = (1 - LEVEL) / 2
    landmark = frame[frame["truth"] != ""]
    out = {"queries": len(frame), "landmark_queries": len(landmark), "gap": gap, "top1": top1,
           "oracle": oracle, "boot_gap": boot_gap, "boot_top1": boot_top1,
           "gap_ci": tuple(np.quantile(boot_gap, [tail, 1 - tail])),
           "top1_ci": tuple(np.quantile(boot_top1, [tail, 1 - tail]))}
    global_frame = frame.assign(label=frame["global_label"], confidence=frame["global_confidence"],
                                right=frame["global_right"])
    out["global_gap"], out["global_top1"] = (float(v[0]) for v in resampled(global_frame, every))
    for k in RECALL_AT:
        out[f"recall@{k}"] = float((landmark["first_right_rank"] <= k).mean())
    out["right_inliers"] = float(landmark["right_inliers"].median())
    out["wrong_inliers"] = float(landmark["wrong_inliers"].median())
    out["right_to_wrong"] = float((landmark["global_right"] & ~landmark["right"]).mean())
    out["wrong_to_right"] = float((~landmark["global_right"] & landmark["right"]).mean())
    return out


# The table

HEADER = ("| task | run | queries | dim | GAP [90%] | top-1 [90%] | vs best GAP / top-1 | global GAP / top-1 | mAP@100 "
          "| GAP / oracle | R@1 | R@5 | R@20 | R@100 | inliers right / best wrong (median) | changed R→W / W→R "
          "| seconds (CPU) |")


def found_measures(task: str, results: dict[str, Outcome | str], draws: np.ndarray) -> dict[str, dict]:
    """:func:`measures` of every run of the task that has queries (not the EVD pairs)."""
    return {name: measures(o.queries, draws) for name, o in results.items() if isinstance(o, Outcome) and task != "evd"}


def table(task: str, results: dict[str, Outcome | str], found: dict[str, dict]) -> list[str]:
    """The rows of one task: a run's measures (``found``), or its pending reason."""
    best = max(found, key=lambda n: (found[n]["gap"], found[n]["top1"])) if found else None
    lines = []
    for name, outcome in results.items():
        if isinstance(outcome, str):
            lines.append(f"| {task} | `{name}` | " + " | ".join([outcome] + ["–"] * 14) + " |")
        elif task == "evd":
            s = outcome.extra["evd"]
            cells = [f"{len(s['pairs'])} pairs", "–", "–", f"{s['above']}/{len(s['pairs'])} true pairs above max swapped",
                     "–", "–", "–", "–", "–", "–", "–", "–", f"median true {s['median_true']:.0f} / max swapped "
                     f"{s['max_swapped']}", "–", seconds(outcome)]
            lines.append(f"| {task} | `{name}` | " + " | ".join(cells) + " |")
        else:
            m = found[name]
            cells = [f"{m['landmark_queries']}+{m['queries'] - m['landmark_queries']}", str(outcome.extra["dim"]),
                     f"{m['gap']:.3f} [{m['gap_ci'][0]:.3f}, {m['gap_ci'][1]:.3f}]",
                     f"{m['top1']:.3f} [{m['top1_ci'][0]:.3f}, {m['top1_ci'][1]:.3f}]",
                     versus(m, found[best], name == best), f"{m['global_gap']:.3f} / {m['global_top1']:.3f}",
                     f"{outcome.extra['map@100']:.3f}", f"{m['gap'] / m['oracle']:.3f}" if m["oracle"] else "–",
                     *(f"{m[f'recall@{k}']:.3f}" for k in RECALL_AT), inlier_cell(m),
                     f"{m['right_to_wrong']:.3f} / {m['wrong_to_right']:.3f}", seconds(outcome)]
            lines.append(f"| {task} | `{name}` | " + " | ".join(cells) + " |")
    return lines


def versus(m: dict, best: dict, is_best: bool) -> str:
    """"best", else per metric "tied" (the paired 90% interval of the difference to the best run
    holds 0) or "below"."""
    if is_best:
        return "best"
    tail = (1 - LEVEL) / 2
    words = []
    for key in ("boot_gap", "boot_top1"):
        low, high = np.quantile(m[key] - best[key], [tail, 1 - tail])
        words.append("tied" if low <= 0 <= high else ("below" if high < 0 else "above"))
    return " / ".join(words)


def paired_lines(task: str, found: dict[str, dict], pairs: list[list[str]]) -> list[str]:
    """One line per ``--pair A B`` of this task: A - B in GAP and top-1 with the 90% interval of the
    paired difference (the same resamples)."""
    tail = (1 - LEVEL) / 2
    lines = []
    for a, b in pairs:
        if a not in found or b not in found:
            continue
        cells = []
        for key, name in (("gap", "GAP"), ("top1", "top-1")):
            low, high = np.quantile(found[a][f"boot_{key}"] - found[b][f"boot_{key}"], [tail, 1 - tail])
            cells.append(f"{name} {found[a][key] - found[b][key]:+.4f} [{low:+.4f}, {high:+.4f}]")
        lines.append(f"- {task}: `{a}` - `{b}`: " + ", ".join(cells))
    return lines


def inlier_cell(m: dict) -> str:
    return "–" if math.isnan(m["right_inliers"]) else f"{m['right_inliers']:.0f} / {m['wrong_inliers']:.0f}"


def seconds(outcome: Outcome) -> str:
    return "–" if math.isnan(outcome.wall) else f"{outcome.wall:.0f} ({outcome.cpu:.0f})"


# Command

def run_rows(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(run name, preset, overrides) of every row: the presets, then the variants."""
    rows = [(preset, preset, []) for preset in args.presets]
    for name, preset, *overrides in args.variant:
        rows.append((name, preset, overrides))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="work folder, outside the repository (resumed)")
    parser.add_argument("--data", type=Path, default=common.DATA, help="shared data folder (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), help="preset rows (default: %(default)s)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME PRESET [SECTION.KEY=VALUE]",
                        help="an extra row: PRESET with these overrides, named NAME (repeatable)")
    parser.add_argument("--skip", action="append", default=[], metavar="RUN:TASK",
                        help="leave this run's row of this task pending (repeatable)")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="after the table, run A - run B on every task, with the 90%% interval of the paired "
                             "difference (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and of the bootstrap")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--jobs", type=int, default=1, help="rerank worker processes")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=False,
                        help="let pipeline.run calibrate the index as `delf-pipeline run` does (default: off, "
                             "so confidences are the presets' scores and a rerun does not depend on how long "
                             "the run took: the calibration's sample is cut to a fifth of the run's time)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"shared data not found at {args.data}")
    setup_logging(False)
    logging.getLogger("delf_pipeline").setLevel(logging.WARNING)
    logging.getLogger("delf_pipeline.evidence").setLevel(logging.ERROR)  # unlabelled distractors do not vote
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    frames, paired = [], []
    for task in args.tasks:
        results: dict[str, Outcome | str] = {}
        for name, preset, overrides in run_rows(args):
            if f"{name}:{task}" in args.skip:
                results[name] = "pending (--skip)"
                continue
            config = load_config(preset, None, overrides)
            logging.getLogger("quality").warning("%s: %s", task, name)
            if task == "evd":
                results[name] = evd_task(config, args)
            elif task in ("dev_split", "hard"):
                results[name] = pipeline_task(task, config, name, args)
            else:
                results[name] = loo_task(task, config, name, args)
            frames.append(results[name].queries.assign(task=task, run=name))
        size = next((len(o.queries) for o in results.values() if isinstance(o, Outcome)), 0)
        draws = np.random.default_rng(args.seed).integers(0, max(size, 1), size=(args.bootstrap, size))
        found = found_measures(task, results, draws)
        lines += table(task, results, found)
        paired += paired_lines(task, found, args.pair)
    lines += ["", *paired] if paired else []
    write_text_atomic(args.work / "quality.csv", pd.concat(frames).reindex(columns=PER_QUERY).to_csv(index=False))
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.work / "quality.md", text)
    print(text)


if __name__ == "__main__":
    main()
