#!/usr/bin/env python3
"""The verification cascade (issue 23.3): accuracy against second-stage pairs per query.

Two tasks, each a Kaggle-layout folder run through ``delf-pipeline run`` (pipeline.run):

- ``hard``: benchmarks/common.build_hard_task (EVD second views, held-out landmarks_mini
  photos, non-landmark photos: 35 + 8 queries);
- ``dev``: the landmarks_dev split of issue 23 (round(n / 3) of each place's photos and of the
  non-landmarks as queries, seed 0: benchmarks/common.build_dev_split, as benchmarks/quality.py
  draws it; the other landmark photos as the index: 424 index photos, 213 + 38 queries).

Steps (each cached under --work, so a rerun reuses what is done):

1. ``pipeline.run`` with the base preset (``--preset``, default ``xfeat``; its fast path only:
   ``rerank.cascade = ""``), without the index calibration, so the confidence is the aggregated
   score the curve's predictions use (the default preset's stores keep the XFeat features its
   lighterglue stage matches);
2. the (query, candidate) pairs the widest setting of the grid selects from the base run's
   rerank rows, verified by each second stage (``views``: the query's XFeat features on simulated
   views, matched view by view; ``lighterglue``; ``STAGE/VERIFIER:PX`` verifies the second stage
   by another verifier than the preset's) with the cascade's own cores
   (:mod:`delf_pipeline.verification.cascade`): inliers and CPU seconds in ``pairs-STAGE.csv``;
3. the curve: for every cascade setting of --pairs / --bands / --margins / --rules / --floors
   (rerank.cascade_min_inliers) / --gates (rerank.cascade_min_global), the rerank
   rows the cascade writes (its select / combine / final_score on those rows and verdicts),
   predicted as ``predict`` does (no calibration): top-1, GAP, their bootstrap 90% intervals
   (queries resampled; the differences to the fast path paired on the same resamples), the
   second-stage pairs run per query (all, and per query showing no landmark), the queries whose
   answer changed, and the second stage's
   CPU seconds per query (the views' extraction included) against the fast path's.

    python benchmarks/bench_cascade.py --work /work/cache/cascade [--tasks hard dev] [--preset xfeat]
        [--stages lighterglue lighterglue/magsac_fundamental:3 views@1,2,4 views@1,0.5,0.25] [--pairs 2 10] [--bands 12 20] [--rules max]
        [--floors 0] [--gates 0]
    python benchmarks/bench_cascade.py --evd [--tilts 1 2 4]  # EVD pair level through the stages
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

import common

from delf_pipeline import pipeline, predict
from delf_pipeline.config import PredictSettings, load_config
from delf_pipeline.evidence.aggregation import best_classes, candidate_table, class_evidence
from delf_pipeline.extractors.build import local_extractor, view_extractor
from delf_pipeline.formats.blocks import read_table
from delf_pipeline.formats.images import list_images, load_image
from delf_pipeline.formats.tables import read_labels
from delf_pipeline.metrics.recognition import gap_of_pooled
from delf_pipeline.verification.cascade import GlueStage, QuerySide, ViewsStage, combine, counted, select
from delf_pipeline.verification.lighterglue import load_xfeat_lighterglue
from delf_pipeline.verification.pairs import verify_options, verify_pair
from delf_pipeline.verification.verifier import CandidateVerifier, final_score

log = logging.getLogger("bench_cascade")


# ------------------------------------------------------------------ tasks

def task_folder(work: Path, task: str) -> Path:
    """The task's Kaggle-layout folder under ``work/tasks`` (built once)."""
    folder = work / "tasks" / task
    if not (folder / "solution.csv").exists():
        data = common.require_data("landmarks_mini", "evd", "landmarks_dev")
        if task == "hard":
            common.build_hard_task(folder, data)
        else:
            common.build_dev_split(folder, data)
    return folder


# ------------------------------------------------------------------ runs

def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_run(work: Path, task: str, name: str, preset: str, overrides: list[str], jobs: int = 1) -> dict:
    """``pipeline.run`` of ``preset`` + ``overrides`` on the task into ``work/runs/TASK/NAME``, the
    index not calibrated; its metrics and wall / CPU seconds (``timing.json``, kept: a finished run
    is not timed again)."""
    folder = task_folder(work, task)
    out = work / "runs" / task / name
    timing = out / "timing.json"
    if timing.exists():
        return json.loads(timing.read_text())
    config = load_config(preset, None, overrides)
    start, cpu = time.perf_counter(), cpu_seconds()
    pipeline.run(config, folder, out, solution=folder / "solution.csv", jobs=jobs, overrides=overrides,
                 calibrate_index=False)
    result = {"wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu, "preset": preset,
              "overrides": overrides, "metrics": json.loads((out / "metrics.json").read_text())}
    timing.write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------ second-stage pairs

PAIR_COLUMNS = ("query_id", "index_id", "fast_inliers", "second_matches", "second_inliers", "status", "fast_cpu",
                "second_cpu", "views_cpu")


def stage_settings(stage: str) -> tuple[str, list[str], str, dict]:
    """(second stage, its config overrides, file name of its pairs, its own verifier options) of a
    stage given as ``views``, ``lighterglue`` or ``views@T1,T2,...`` (views of those tilts; t < 1
    stretches), any of them followed by ``/VERIFIER:PX`` (the second stage verified by VERIFIER
    at PX pixels, the fast path as the preset verifies it)."""
    stage_part, _, verifier = stage.partition("/")
    name, _, tilts = stage_part.partition("@")
    if name not in ("views", "lighterglue") or (tilts and name != "views") or (verifier and ":" not in verifier):
        raise SystemExit(f"unknown stage {stage!r}: views, lighterglue or views@T1,T2,..., then /VERIFIER:PX or not")
    overrides = [f"rerank.cascade={name}"] + ([f"rerank.cascade_tilts=[{tilts}]"] if tilts else [])
    own = {}
    if verifier:
        method, _, pixels = verifier.partition(":")
        own = {"verifier": method, "residual_threshold": float(pixels)}
    file = f"pairs-{stage.replace('@', '-').replace(',', '_').replace('/', '-').replace(':', '_')}.csv"
    return name, overrides, file, own


FAST = ['rerank.cascade=""']  # the base run: the fast path only


def pair_table(work: Path, task: str, stage: str, widest: dict, preset: str) -> pd.DataFrame:
    """Second-stage verdicts (PAIR_COLUMNS) on the candidates the widest cascade setting
    (``widest``: select's pairs, margin, band) picks from the base run's fast rows; resumable
    (pairs already in the file are kept, also those of a wider grid run before).
    ``views_cpu``: CPU seconds of the query's view extraction, on each row computed with it."""
    folder, base = task_folder(work, task), work / "runs" / task / preset
    name, overrides, file, own = stage_settings(stage)
    path = base / file
    done = set()
    if path.exists():
        table = pd.read_csv(path, dtype={"query_id": str, "index_id": str})
        done = set(zip(table["query_id"], table["index_id"]))
    else:
        path.write_text(",".join(PAIR_COLUMNS) + "\n")
    fast_rows = read_table(base / "rerank.csv")
    labels = read_labels(folder / "train.csv")
    conf = load_config(preset, None, overrides).rerank
    worker = CandidateVerifier(str(base / "features" / "query"), str(base / "features" / "index"), conf)
    worker.second.options = {**worker.second.options, **own}
    images = {record.id: str(record.path) for record in list_images(folder, "test")[0]}
    queries = list(fast_rows.groupby("query_id", sort=True))
    for number, (query_id, rows) in enumerate(queries):
        rows = rows.sort_values(["score", "index_id"], ascending=[False, True])
        ids = rows["index_id"].tolist()
        chosen = select(ids, rows["score"].tolist(), rows["inliers"].tolist(), labels, **widest)
        chosen = [p for p in chosen if (query_id, ids[p]) not in done]
        if not chosen:
            continue
        query = worker.stored_query(query_id)
        side = QuerySide(query, worker.queries.size(query_id), lambda: worker.views.of_file(images[query_id]))
        views_cpu = 0.0
        if name == "views":
            start = time.process_time()
            side.view_features()
            views_cpu = time.process_time() - start
        out = []
        for position in chosen:
            index_id = ids[position]
            candidate = worker.second_candidate(index_id)
            start = time.process_time()
            fast = worker.verify(query, candidate)
            fast_cpu = time.process_time() - start
            start = time.process_time()
            result = worker.second.verify(side, candidate, worker.index.size(index_id))
            second_cpu = time.process_time() - start
            out.append((query_id, index_id, fast.inliers, result.matches, result.inliers, result.status,
                        round(fast_cpu, 5), round(second_cpu, 5), round(views_cpu, 5)))
        with open(path, "a", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(out)
        log.info("%s %s: query %d/%d, %d pairs", task, stage, number + 1, len(queries), len(out))
    return pd.read_csv(path, dtype={"query_id": str, "index_id": str})


# ------------------------------------------------------------------ the curve

BOOTSTRAP = 2000


@dataclass
class Outcome:
    """Per query (sorted ids): confidence, prediction right, has a landmark; second-stage pairs."""

    ids: list[str]
    confidence: np.ndarray
    right: np.ndarray
    landmark: np.ndarray
    pairs: np.ndarray
    cpu: np.ndarray  # second-stage CPU seconds per query (views extraction included)

    def top1(self, rows=slice(None)) -> float:
        return float(self.right[rows].sum() / max(self.landmark[rows].sum(), 1))

    def gap(self, rows=slice(None)) -> float:
        return gap_of_pooled(self.confidence[rows], self.right[rows], max(int(self.landmark[rows].sum()), 1))


def outcome(shortlist: pd.DataFrame, rows: pd.DataFrame, labels: dict, solution: dict, conf: PredictSettings,
            pairs: dict[str, int], cpu: dict[str, float]) -> Outcome:
    """Predictions as ``predict`` makes them with the preset's ``conf`` (its runs are not calibrated;
    no max_share or abstain)."""
    best = best_classes(class_evidence(candidate_table(shortlist, rows), labels, conf.top_k, conf.aggregation))
    predicted = dict(zip(best["query_id"], zip(best["label"], predict.confidences(best, conf))))
    ids = sorted(solution)
    confidence = np.array([predicted[q][1] if q in predicted else -np.inf for q in ids])
    right = np.array([q in predicted and predicted[q][0] in solution[q] for q in ids])
    return Outcome(ids, confidence, right, np.array([bool(solution[q]) for q in ids]),
                   np.array([pairs.get(q, 0) for q in ids]), np.array([cpu.get(q, 0.0) for q in ids]))


def best_globals(fast: pd.DataFrame, labels: dict, solution: dict, setting: dict) -> str:
    """One sentence: the best global similarity of the queries ``setting`` (select's pairs, margin,
    band; no gate) sends to the second stage: their number and range, landmark and non-landmark
    queries apart."""
    found = {True: [], False: []}
    for query_id, rows in fast.groupby("query_id", sort=True):
        rows = rows.sort_values(["score", "index_id"], ascending=[False, True])
        if select(rows["index_id"].tolist(), rows["score"].tolist(), rows["inliers"].tolist(), labels, **setting):
            found[bool(solution.get(query_id))].append(float(rows["global_score"].max()))
    parts = []
    for landmark, name in ((True, "landmark"), (False, "non-landmark")):
        values = np.sort(found[landmark])
        spread = f", best global similarity {values.min():.3f}-{values.max():.3f}" if len(values) else ""
        parts.append(f"{len(values)} {name} queries{spread}")
    return f"Undecided at {setting['pairs']} classes, band {setting['band']}: " + "; ".join(parts) + "."


def cascade_rows(fast: pd.DataFrame, second: dict[tuple[str, str], int], labels: dict, conf, setting: dict,
                 rule: str, cpu: dict[tuple[str, str], float], query_cpu: dict[str, float]):
    """The rerank rows the cascade writes (the cores' select / combine / final_score on the fast
    rows and the stored second-stage verdicts), the pairs and CPU seconds spent per query; None
    when the setting selects a pair that was not computed."""
    out, used, seconds = [], {}, {}
    for query_id, rows in fast.groupby("query_id", sort=True):
        rows = rows.sort_values(["score", "index_id"], ascending=[False, True])
        ids, scores = rows["index_id"].tolist(), rows["score"].tolist()
        chosen = select(ids, scores, rows["inliers"].tolist(), labels, **setting,
                        best_global=float(rows["global_score"].max()))
        if any((query_id, ids[p]) not in second for p in chosen):
            return None
        if chosen:
            rows = rows.copy()
            inliers, score = rows["inliers"].to_numpy().copy(), rows["score"].to_numpy().copy()
            for position in chosen:
                key = (query_id, ids[position])
                verdict = counted(second[key], conf)  # as the cores
                inliers[position] = combine(int(inliers[position]), verdict, rule)
                score[position] = final_score(int(inliers[position]), float(rows["global_score"].iloc[position]), conf)
            rows["inliers"], rows["score"] = inliers, score
            used[query_id] = len(chosen)
            seconds[query_id] = query_cpu.get(query_id, 0.0) + sum(cpu[(query_id, ids[p])] for p in chosen)
        out.append(rows)
    return pd.concat(out, ignore_index=True), used, seconds


def interval(values: np.ndarray) -> str:
    low, high = np.percentile(values, [5, 95])
    return f"[{low:.3f}, {high:.3f}]"


def bootstrap(base: Outcome, other: Outcome, seed: int = 0) -> dict[str, np.ndarray]:
    """Top-1 and GAP of ``other`` and their differences to ``base`` over BOOTSTRAP resamples of the
    queries (the same resamples for both: paired)."""
    rng = np.random.default_rng(seed)
    samples = {"top1": [], "gap": [], "d_top1": [], "d_gap": []}
    for _ in range(BOOTSTRAP):
        rows = np.sort(rng.integers(0, len(base.ids), len(base.ids)))
        top1, gap = other.top1(rows), other.gap(rows)
        samples["top1"].append(top1)
        samples["gap"].append(gap)
        samples["d_top1"].append(top1 - base.top1(rows))
        samples["d_gap"].append(gap - base.gap(rows))
    return {key: np.array(value) for key, value in samples.items()}


def curve(work: Path, task: str, stages: list[str], grid: dict[str, list], rules: list[str],
          preset: str) -> list[str]:
    """Markdown lines: one row per cascade setting of the grid (plus the fast path), see module doc."""
    folder, base = task_folder(work, task), work / "runs" / task / preset
    config = load_config(preset, None, FAST)
    labels = read_labels(folder / "train.csv")
    solution = {q: set(v.split()) for q, v in pd.read_csv(folder / "solution.csv", dtype=str,
                                                             keep_default_na=False).set_index("id")["landmarks"].items()}
    shortlist, fast = read_table(base / "shortlist.csv"), read_table(base / "rerank.csv")
    plain = outcome(shortlist, fast, labels, solution, config.predict, {}, {})
    tables = {stage: pd.read_csv(base / stage_settings(stage)[2], dtype={"query_id": str, "index_id": str})
              for stage in stages}
    per_query, verdicts = {}, {}
    for stage, table in tables.items():
        keys = list(zip(table["query_id"], table["index_id"]))
        verdicts[stage] = (dict(zip(keys, table["second_inliers"])), dict(zip(keys, table["second_cpu"])),
                           table.groupby("query_id")["views_cpu"].max().to_dict())
        # the fast path's CPU per query, timed in the same loop as this stage's pairs: its baseline
        per_query[stage] = fast.groupby("query_id").size().mean() * np.median(table["fast_cpu"])
    timing = "; ".join(f"{per_query[s]:.2f} s (timed beside {s})" for s in stages)
    first = {"pairs": grid["pairs"][0], "band": grid["band"][0], "margin": grid["margin"][0]}
    lines = [f"### {task}: {len(plain.ids)} queries ({int(plain.landmark.sum())} with a landmark); fast path top-1 "
             f"{plain.top1():.3f}, GAP {plain.gap():.3f}; fast path CPU per query {timing}", "",
             best_globals(fast, labels, solution, first), "",
             "| second stage | pairs (max) | inliers below | margin below | rule | second under counts 0 "
             "| min global | pairs / query | pairs / non-landmark query | top-1 [90%] | GAP [90%] "
             "| top-1 - fast [90%] | GAP - fast [90%] | changed R->W / W->R | second-stage CPU / query (s) | / fast path |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---|---|---|---|---|---:|---:|"]
    b = bootstrap(plain, plain)
    lines.append(f"| off (fast path only) | | | | | | | 0 | 0 | {plain.top1():.3f} {interval(b['top1'])} "
                 f"| {plain.gap():.3f} {interval(b['gap'])} | | | | 0 | 0 |")
    settings = [(pairs, band, margin, rule, floor, gate) for pairs in grid["pairs"] for band in grid["band"]
                for margin in grid["margin"] for rule in rules for floor in grid["floor"] for gate in grid["gate"]
                if band or margin]
    for stage, (second, cpu, query_cpu) in verdicts.items():
        for pairs, band, margin, rule, floor, gate in settings:
            conf = config.copy().rerank
            conf.cascade_min_inliers = floor
            made = cascade_rows(fast, second, labels, conf, {"pairs": pairs, "margin": margin, "band": band,
                                                             "min_global": gate}, rule, cpu, query_cpu)
            if made is None:
                continue
            result = outcome(shortlist, made[0], labels, solution, config.predict, made[1], made[2])
            b = bootstrap(plain, result)
            lost, won = int((plain.right & ~result.right).sum()), int((~plain.right & result.right).sum())
            spent = result.cpu.mean()
            lines.append(
                f"| {stage} | {pairs} | {band} | {margin:g} | {rule} | {floor} | {gate:g} | {result.pairs.mean():.2f} "
                f"| {result.pairs[~result.landmark].mean() if (~result.landmark).any() else 0:.2f} "
                f"| {result.top1():.3f} {interval(b['top1'])} | {result.gap():.3f} {interval(b['gap'])} "
                f"| {result.top1() - plain.top1():+.3f} {interval(b['d_top1'])} "
                f"| {result.gap() - plain.gap():+.3f} {interval(b['d_gap'])} | {lost} / {won} "
                f"| {spent:.2f} | {spent / per_query[stage]:.1f} |")
    return lines


# ------------------------------------------------------------------ EVD pairs

def evd_lines(tilts: list[float], with_glue: bool) -> list[str]:
    """EVD pair level through the cascade's stages, in both directions (query = image 1, as
    bench_evd_matchers measures, and query = image 2, as the hard task asks): true pairs whose
    inliers exceed the largest swapped-pair count, for the fast path, each second stage alone
    (rule replace) and with rule max."""
    folder = common.require_data("evd/1", "evd/2", "evd/h") / "evd"
    conf = load_config("xfeat")
    extractor = local_extractor(conf.extract, "xfeat")
    views = view_extractor(conf.extract, tilts)
    options = verify_options(conf.rerank)
    stages = {"views": ViewsStage(options)}
    if with_glue:
        stages["lighterglue"] = GlueStage(load_xfeat_lighterglue(), options)
    names = sorted(p.stem for p in (folder / "1").glob("*.png"))
    stored = {}
    for side in ("1", "2"):
        for name in names:
            image, factors = load_image(folder / side / f"{name}.png", conf.extract.max_image_size)
            found = extractor(image)
            stored[side, name] = (replace(found, locations=found.locations * factors.astype(np.float32),
                                          descriptors=found.descriptors.astype(np.float16)),
                                  tuple(int(round(n * f)) for n, f in zip(image.shape[:2], factors)),
                                  (image, factors))
    lines = ["| query side | verification | true pairs above max swapped | median true | max swapped |",
             "|---|---|---:|---:|---:|"]
    for query_side, other in (("1", "2"), ("2", "1")):
        counts = {key: ([], []) for key in ["fast"] + [f"{s} {r}" for s in stages for r in ("replace", "max")]}
        for i, name in enumerate(names):
            features, size, (image, factors) = stored[query_side, name]
            query = QuerySide(features, size, lambda: views.of_image(image, factors))
            for kind, partner in ((0, name), (1, names[(i + 1) % len(names)])):
                candidate, candidate_size, _ = stored[other, partner]
                fast = verify_pair(features.locations, features.descriptors, candidate.locations,
                                   candidate.descriptors, **options).inliers
                counts["fast"][kind].append(fast)
                for stage_name, stage in stages.items():
                    second = stage.verify(query, candidate, candidate_size).inliers
                    for rule in ("replace", "max"):
                        counts[f"{stage_name} {rule}"][kind].append(combine(fast, second, rule))
        for key, (true, swapped) in counts.items():
            top = max(swapped)
            lines.append(f"| image {query_side} | {key} | {sum(t > top for t in true)}/{len(names)} "
                         f"| {np.median(true):.0f} | {top} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/work/cache/cascade"))
    parser.add_argument("--tasks", nargs="+", default=["hard", "dev"], choices=["hard", "dev"])
    parser.add_argument("--base-only", action="store_true", help="step 1 only")
    parser.add_argument("--stages", nargs="+", default=["lighterglue", "views@1,2,4", "views@1,0.5,0.25"],
                        help="second stages: views, lighterglue, views@T1,T2,... (views of those tilts), each "
                        "optionally /VERIFIER:PX (its own verifier, e.g. lighterglue/magsac_fundamental:3)")
    parser.add_argument("--pairs", type=int, nargs="+", default=[2, 10], help="rerank.cascade_pairs values")
    parser.add_argument("--bands", type=int, nargs="+", default=[12, 20], help="rerank.cascade_inliers values")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0],
                        help="rerank.cascade_margin values (kaggle2020 score units)")
    parser.add_argument("--rules", nargs="+", default=["max"], choices=["replace", "max", "sum"])
    parser.add_argument("--floors", type=int, nargs="+", default=[0],
                        help="rerank.cascade_min_inliers values (second-stage counts under them count 0)")
    parser.add_argument("--gates", type=float, nargs="+", default=[0.0],
                        help="rerank.cascade_min_global values (no second stage for a query whose best global "
                        "similarity is under it)")
    parser.add_argument("--preset", default="xfeat", help="the base preset, run with its fast path only (its "
                        "cascade off); the default's stores keep the XFeat features its lighterglue stage matches")
    parser.add_argument("--evd", action="store_true", help="only the EVD pair table (both query sides)")
    parser.add_argument("--tilts", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                        help="views' tilts for --evd (t < 1 stretches by 1 / t)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.evd:
        lines = evd_lines(args.tilts, "lighterglue" in args.stages)  # views of --tilts
        (args.work / f"evd-{'-'.join(f'{t:g}' for t in args.tilts)}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    for task in args.tasks:
        result = timed_run(args.work, task, args.preset, args.preset, FAST)
        log.info("%s %s: wall %.0f s, cpu %.0f s, top-1 %.3f, GAP %.3f", task, args.preset, result["wall"],
                 result["cpu"], result["metrics"]["accuracy"], result["metrics"]["gap"])
    if args.base_only:
        return
    widest = {"pairs": max(args.pairs), "band": max(args.bands), "margin": max(args.margins)}
    for task in args.tasks:
        for stage in args.stages:
            pair_table(args.work, task, stage, widest, args.preset)
    lines = []
    for task in args.tasks:
        grid = {"pairs": args.pairs, "band": args.bands, "margin": args.margins, "floor": args.floors,
                "gate": args.gates}
        lines += curve(args.work, task, args.stages, grid, args.rules, args.preset) + [""]
    report = args.work / f"curve-{args.preset}-{'-'.join(args.tasks)}.md"
    report.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
