"""``delf-pipeline report``: a static HTML page of a run that opens from disk (no server, no network).

Writes, under ``OUT`` (default ``RUN/report``)::

    index.html            metrics table, plots (inline SVG; the training curves too when the run's
                          model is a `delf-pipeline train` folder), per-query rows rendered by a
                          little vanilla JS: filter right/wrong, minimum confidence, sort, pages
    details/chunk-N.js    per-query candidates, CHUNK queries per file, loaded when a page needs them
    thumbs/ID.jpg         thumbnails, made once (existing ones are kept)
    matches/QUERY/ID.jpg  match pictures of each query's best candidates (see show_matches)

``--training MODEL`` writes ``MODEL/report.html`` instead: the model card and the curves of
``MODEL/training.csv`` (validation mAP@100, top-1, GAP and the training loss per epoch).

The page embeds only a short summary per query (id, confidence, verdict, inliers), so it
stays light for many thousands of queries; images use ``loading="lazy"``. A status line at the
bottom (``#status``) counts images loaded and failed and script errors, for people and tests.
"""
from __future__ import annotations

import argparse
import csv
import html
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from ..config import Config, add_config_arguments
from ..evidence.calibration import reliability
from ..formats.images import ImageError, to_rgb
from ..formats.run_folder import RunFolder
from ..formats.run_record import recorded_path
from ..formats.tables import read_solution, read_submission
from ..metrics.recognition import pooled_precision
from ..utils.artifacts import atomic_path, read_json, write_text_atomic
from ..utils.progress import track
from .show_matches import (
    Run,
    candidate_table,
    given_config,
    match_picture_path,
    open_run,
    render_pair,
    safe_name,
)

log = logging.getLogger("delf_pipeline.tools.report")

CHUNK = 500  # queries per details file
ASSETS = Path(__file__).resolve().parent / "report_assets"  # page.html, style.css, report.js
RIGHT, WRONG = "#1a9850", "#d73027"


def build(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    data: str | Path | None = None,
    solution: str | Path | None = None,
    config: Config | None = None,
    overrides: Sequence[str] = (),
    top: int = 5,
    matches: int = 3,
    thumb_size: int = 160,
    match_height: int = 360,
    page_size: int = 50,
    overwrite: bool = False,
) -> Path:
    """Write the report of ``run_dir``; returns the path of its ``index.html``.

    top: candidates shown per query; matches: how many of them get a match picture (0: none).
    data, solution: the images and the ground truth CSV; default: those of the run's ``run.json``.
    """
    if top < 1 or not 0 <= matches <= top:
        raise ValueError(f"need top >= 1 and 0 <= matches <= top, got top={top}, matches={matches}")
    run = open_run(run_dir, data, config, overrides)
    out = Path(out) if out else run.folder.report
    data_dir = Path(data) if data else recorded_path(run.record, "data")
    solution = Path(solution) if solution else recorded_path(run.record, "solution")
    truth = read_solution(solution) if solution else None
    table = candidate_table(run.folder, top)
    queries = query_rows(run, table, read_submission(run.folder.submission), truth)
    _make_thumbnails(run, queries, out / "thumbs", thumb_size, overwrite)
    _make_match_pictures(run, queries, out, matches, match_height, overwrite)
    _write_chunks(out / "details", queries)
    metrics = run_metrics(run.folder, solution, data_dir)
    page = render_page(run, queries, metrics, truth is not None, page_size, training_curves(run.record))
    write_text_atomic(out / "index.html", page)
    log.info("report %s: %d queries", out / "index.html", len(queries))
    return out / "index.html"


def run_metrics(folder: RunFolder, solution: Path | None, data_dir: Path | None) -> dict:
    """Metrics of the run: computed against ``solution`` when given, else its metrics.json ({} if none).

    Retrieval metrics are included when the run has ranking.csv and ``DATA/train.csv`` gives the labels.
    """
    if solution is None:
        return read_json(folder.metrics) if folder.metrics.is_file() else {}
    from ..evaluate import evaluate

    labels = data_dir / "train.csv" if data_dir and (data_dir / "train.csv").is_file() else None
    ranking = folder.ranking if labels and folder.ranking.is_file() else None
    return evaluate(folder.submission, solution, ranking, labels if ranking else None)


# ---------------------------------------------------------------- per-query rows


def query_rows(run: Run, table: pd.DataFrame, predictions: dict, truth: dict | None) -> list[dict]:
    """One dict per query of the submission, in submission order.

    Keys: q (id), truth ([labels] or None), pred (label or ""), conf (float or None),
    ok ("right" | "wrong" | "nonlandmark": a query of no landmark given one | "" when unknown), inliers (of the best candidate of the predicted
    label, -1 if not verified), cands ([{id, label, rank, global, matches, inliers, score, status, ok}]).
    """
    by_query = {q: rows.to_dict("records") for q, rows in table.groupby("query_id", sort=False)}
    result = []
    for query_id, prediction in predictions.items():
        labels = None if truth is None or query_id not in truth else sorted(truth[query_id])
        label, conf = (prediction[0], float(prediction[1])) if prediction else ("", None)
        cands = [_candidate(run, row, labels) for row in by_query.get(query_id, [])]
        voters = [c["inliers"] for c in cands if label and c["label"] == label]
        result.append({"q": query_id, "truth": labels, "pred": label, "conf": conf, "ok": _verdict(label, labels),
                       "inliers": voters[0] if voters else -1, "cands": cands})
    return result


def _candidate(run: Run, row: dict, truth: list[str] | None) -> dict:
    label = run.labels.get(row["index_id"], "")
    ok = "" if truth is None else ("right" if label in truth else "wrong")
    return {"id": row["index_id"], "label": label, "rank": int(row["rank"]), "global": round(float(row["global_score"]), 4),
            "matches": int(row["matches"]), "inliers": int(row["inliers"]), "score": round(float(row["score"]), 4),
            "status": row["status"], "ok": ok}


def _verdict(predicted: str, truth: list[str] | None) -> str:
    """"right" when the prediction is a true landmark, or when a non-landmark query gets none;
    "nonlandmark" when a query of no landmark is given one; else "wrong"."""
    if truth is None:
        return ""
    if not truth:
        return "nonlandmark" if predicted else "right"
    return "right" if predicted in truth else "wrong"


# ---------------------------------------------------------------- images


def make_thumbnail(source: Path, target: Path, size: int) -> None:
    """Write a JPEG of ``source`` fitting in ``size`` x ``size`` (upright by EXIF); ImageError if unreadable."""
    try:
        with Image.open(source) as image:
            image.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale, much faster
            image = to_rgb(ImageOps.exif_transpose(image))
            image.thumbnail((size, size), Image.BILINEAR)
            with atomic_path(target) as tmp:
                image.save(tmp, format="JPEG", quality=82)
                tmp.chmod(0o644)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot make a thumbnail of {source}: {error}") from None


def _make_thumbnails(run: Run, queries: list[dict], folder: Path, size: int, overwrite: bool) -> None:
    """Thumbnails of every shown image (skipping existing ones); sets ``thumb`` on each row/candidate."""
    ids = {row["q"] for row in queries} | {cand["id"] for row in queries for cand in row["cands"]}
    todo = [i for i in sorted(ids) if overwrite or not (folder / f"{safe_name(i)}.jpg").exists()]
    unknown = [i for i in todo if i not in run.images]
    for image_id in track([i for i in todo if i in run.images], len(todo) - len(unknown), "thumbnails"):
        try:
            make_thumbnail(run.images[image_id], folder / f"{safe_name(image_id)}.jpg", size)
        except ImageError as error:
            log.warning("%s", error)
    made = {i: f"{folder.name}/{safe_name(i)}.jpg" for i in ids if (folder / f"{safe_name(i)}.jpg").exists()}
    for row in queries:
        row["thumb"] = made.get(row["q"], "")
        for cand in row["cands"]:
            cand["thumb"] = made.get(cand["id"], "")
    if unknown:
        log.warning("%d image(s) have no thumbnail: their source files are unknown, e.g. %s; give --data",
                    len(unknown), unknown[0])


def _make_match_pictures(run: Run, queries: list[dict], out: Path, count: int, height: int, overwrite: bool) -> None:
    """Match pictures of each query's ``count`` best candidates; sets ``picture`` (relative link or "")."""
    pairs = [(row["q"], cand) for row in queries for cand in row["cands"][:count]]
    todo = [(q, c) for q, c in pairs if overwrite or not match_picture_path(out / "matches", q, c["id"], ".jpg").exists()]
    failed = 0
    for query_id, cand in track(todo, len(todo), "match pictures"):
        try:
            recorded = {"inliers": cand["inliers"], "global_score": cand["global"], "status": cand["status"]}
            render_pair(run, query_id, cand["id"], match_picture_path(out / "matches", query_id, cand["id"], ".jpg"),
                        height, recorded=recorded)
        except (FileNotFoundError, ImageError, KeyError) as error:
            log.warning("no match picture for %s / %s: %s", query_id, cand["id"], error)
            failed += 1
    for query_id, cand in pairs:
        path = match_picture_path(out / "matches", query_id, cand["id"], ".jpg")
        cand["picture"] = path.relative_to(out).as_posix() if path.exists() else ""
    if failed:
        log.warning("%d match picture(s) could not be made", failed)


def _write_chunks(folder: Path, queries: list[dict]) -> None:
    """details/chunk-N.js: the candidates of queries N*CHUNK..; each file calls ``reportChunk(N, rows)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("chunk-*.js"):
        stale.unlink()
    for number, start in enumerate(range(0, len(queries), CHUNK)):
        rows = [[row["thumb"], row["truth"], row["cands"]] for row in queries[start : start + CHUNK]]
        write_text_atomic(folder / f"chunk-{number}.js", f"reportChunk({number}, {_json(rows)});\n")


def _json(value) -> str:
    """JSON safe inside HTML <script> (no "</script>" can appear)."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


# ---------------------------------------------------------------- plots (inline SVG)


def gap_points(queries: list[dict]) -> tuple[list[tuple[float, bool, str]], int]:
    """Predictions with a known truth in query-id order: ([(confidence, right, query id)], M
    landmark queries), as :func:`delf_pipeline.metrics.recognition.pooled_precision` takes them."""
    known = sorted((row for row in queries if row["truth"] is not None), key=lambda row: row["q"])
    points = [(row["conf"], row["pred"] in row["truth"], row["q"]) for row in known if row["pred"]]
    return points, sum(1 for row in known if row["truth"])


def precision_svg(points: list[tuple[float, bool, str]], landmark_queries: int, width: int = 520,
                  height: int = 280) -> str:
    """Precision of the i most confident predictions against i, with GAP's terms marked.

    GAP = (1/M) * sum of precision at the right predictions (green dots); red ticks are wrong
    ones. The grey line is the confidence (right axis), so one sees where precision drops.
    """
    if not points or not landmark_queries:
        return "<p>No predictions with a known truth: nothing to plot.</p>"
    order, precision = pooled_precision(np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    points = [points[i] for i in order]
    right = np.array([p[1] for p in points], float)
    conf = np.array([p[0] for p in points])
    gap = float((precision * right).sum() / landmark_queries)
    frame = _Frame(width, height, (1, len(points)), (0.0, 1.0))
    parts = [frame.axes("predictions, most confident first", "precision"),
             frame.polyline(np.arange(1, len(points) + 1), _scaled(conf), "#999", "confidence"),
             frame.polyline(np.arange(1, len(points) + 1), precision, "#2b5d9c", "precision")]
    if len(points) <= 600:
        parts += [frame.marker(i + 1, precision[i], RIGHT if right[i] else WRONG, bool(right[i]),
                               f"{points[i][2]}: confidence {points[i][0]:.4g}, precision {precision[i]:.3f}")
                  for i in range(len(points))]
    parts.append(frame.right_label(f"confidence {conf.min():.3g} .. {conf.max():.3g}"))
    title = f"GAP {gap:.4f} = sum of precision at right predictions / {landmark_queries} landmark queries"
    return frame.svg(title, parts, "precision-plot")


def reliability_svg(points: list[tuple[float, bool, str]], width: int = 520, height: int = 280,
                    calibrated: bool | None = None) -> str:
    """Reliability diagram: per confidence bin of [0, 1], the fraction of right predictions
    against the mean confidence (dot area ~ predictions in the bin); the diagonal is perfect
    calibration. Scores (``calibrated`` False, or, unknown, values outside [0, 1]) get a note instead."""
    if not points:
        return "<p>No predictions with a known truth: no reliability diagram.</p>"
    conf = np.array([p[0] for p in points])
    if calibrated is False or conf.min() < 0 or conf.max() > 1:
        return (f"<p>No calibration: the submission's numbers ({conf.min():.3g} .. {conf.max():.3g}) are scores, "
                "not probabilities, so no reliability diagram (the run's log says why it was not calibrated; "
                "<code>delf-pipeline calibrate</code> fits one).</p>")
    bins = reliability(conf, np.array([p[1] for p in points]))
    frame = _Frame(width, height, (0.0, 1.0), (0.0, 1.0))
    parts = [frame.axes("predicted probability (mean of the bin)", "observed fraction right"),
             frame.polyline(np.array([0.0, 1.0]), np.array([0.0, 1.0]), "#999", "diagonal")]
    parts += [frame.marker(row.confidence, row.observed, "#2b5d9c", True,
                           f"{row.low:.1f}-{row.high:.1f}: {row.count} predictions, mean {row.confidence:.3f}, "
                           f"{row.observed:.3f} right", radius=2 + 6 * math.sqrt(row.count / len(points)))
              for row in bins.itertuples()]
    return frame.svg("Reliability: predicted probability against observed fraction right", parts, "reliability-plot")


def _scaled(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return np.full(len(values), 0.5) if high == low else (values - low) / (high - low)


def inliers_svg(right: Sequence[int], wrong: Sequence[int], width: int = 520, height: int = 280) -> str:
    """Histogram of the inlier counts of right and of wrong predictions, bars side by side."""
    if not len(right) and not len(wrong):
        return "<p>No verified predictions with a known truth: nothing to plot.</p>"
    top = max([*right, *wrong, 1])
    step = max(1, math.ceil((top + 1) / 20))
    edges = np.arange(0, top + step + 1, step)
    counts_r, _ = np.histogram(right, edges)
    counts_w, _ = np.histogram(wrong, edges)
    frame = _Frame(width, height, (0, float(edges[-1])), (0.0, float(max(counts_r.max(), counts_w.max(), 1))))
    parts = [frame.axes("inliers of the predicted landmark's best candidate", "predictions")]
    for start, n_r, n_w in zip(edges[:-1], counts_r, counts_w):
        label = f"{start}-{start + step - 1} inliers"
        parts.append(frame.bar(start, step / 2, n_r, RIGHT, f"{label}: {n_r} right"))
        parts.append(frame.bar(start + step / 2, step / 2, n_w, WRONG, f"{label}: {n_w} wrong"))
    parts.append(frame.legend([(RIGHT, f"right ({len(right)})"), (WRONG, f"wrong ({len(wrong)})")]))
    return frame.svg("Inliers: right versus wrong predictions", parts, "inliers-plot")


CURVES = "training.csv"  # in a model folder of `delf-pipeline train`
CURVE_LINES = (("val_map@100", "#2b5d9c"), ("val_top1", "#1a9850"), ("val_gap", "#984ea3"),
               ("unseen_map@100", "#e08214"), ("unseen_top1", "#b2df8a"), ("unseen_gap", "#f1a340"))


def read_curves(path: Path) -> list[dict[str, float]]:
    """Rows of a ``training.csv`` (one per epoch), numbers as floats; empty cells are left out."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def training_curves(record: dict) -> list[dict[str, float]]:
    """The curves of the run's model when it is a `delf-pipeline train` folder, else []."""
    model = ((record.get("config") or {}).get("extract") or {}).get("model")
    path = Path(model) / CURVES if model else None
    return read_curves(path) if path is not None and path.is_file() else []


def curves_svg(rows: list[dict[str, float]], width: int = 520, height: int = 280) -> str:
    """Validation figures per epoch (epoch 0: the ImageNet descriptor, before training) and the
    training loss (grey, scaled to the plot's height; its range on the right)."""
    if not rows:
        return "<p>No training curves.</p>"
    epochs = np.array([row["epoch"] for row in rows])
    frame = _Frame(width, height, (float(epochs.min()), float(epochs.max())), (0.0, 1.0))
    parts, legend = [frame.axes("epoch", "validation figure")], []
    for name, color in CURVE_LINES:
        points = [(row["epoch"], row[name]) for row in rows if name in row]
        if points:
            xs, ys = np.array(points).T
            parts.append(frame.polyline(xs, ys, color, name))
            parts += [frame.marker(x, y, color, True, f"epoch {x:.0f}: {name} {y:.4f}") for x, y in points]
            legend.append((color, name))
    losses = [(row["epoch"], row["train_loss"]) for row in rows if "train_loss" in row]
    if losses:
        xs, ys = np.array(losses).T
        parts += [frame.polyline(xs, _scaled(ys), "#999", "train_loss"),
                  frame.right_label(f"training loss {ys.min():.3g} .. {ys.max():.3g}")]
    parts.append(frame.legend(legend))
    return frame.svg("Training curves: validation per epoch (0 = before training), loss in grey", parts,
                     "curves-plot")


class _Frame:
    """Maps data coordinates into an SVG plot area and draws the pieces as SVG strings."""

    LEFT, RIGHT_PAD, TOP, BOTTOM = 48, 24, 28, 40

    def __init__(self, width: int, height: int, xrange: tuple[float, float], yrange: tuple[float, float]):
        self.width, self.height = width, height
        self.x0, self.x1 = xrange[0], xrange[1] if xrange[1] > xrange[0] else xrange[0] + 1
        self.y0, self.y1 = yrange

    def x(self, value: float) -> float:
        span = self.width - self.LEFT - self.RIGHT_PAD
        return self.LEFT + (value - self.x0) / (self.x1 - self.x0) * span

    def y(self, value: float) -> float:
        span = self.height - self.TOP - self.BOTTOM
        return self.height - self.BOTTOM - (value - self.y0) / ((self.y1 - self.y0) or 1) * span

    def axes(self, xlabel: str, ylabel: str) -> str:
        bottom, left = self.y(self.y0), self.x(self.x0)
        ticks = []
        counts = self.y1 > 1  # integer ticks for counts, two decimals for fractions
        step = math.ceil(self.y1 / 4) if counts else 0.25
        for value in np.arange(self.y0, self.y1 + step / 2, step):
            text = f"{value:.0f}" if counts else f"{value:.2f}"
            ticks.append(f'<text x="{left - 6}" y="{self.y(value) + 4:.1f}" text-anchor="end">{text}</text>')
        for value in np.linspace(self.x0, self.x1, 5):
            text = f"{value:.0f}" if self.x1 > 1 else f"{value:.2f}"
            ticks.append(f'<text x="{self.x(value):.1f}" y="{bottom + 16}" text-anchor="middle">{text}</text>')
        return (f'<line x1="{left}" y1="{bottom}" x2="{self.x(self.x1):.1f}" y2="{bottom}" stroke="#333"/>'
                f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{self.y(self.y1):.1f}" stroke="#333"/>'
                + "".join(ticks)
                + f'<text x="{self.width / 2:.0f}" y="{self.height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>'
                + f'<text x="12" y="{self.height / 2:.0f}" transform="rotate(-90 12 {self.height / 2:.0f})" '
                  f'text-anchor="middle">{html.escape(ylabel)}</text>')

    def polyline(self, xs: np.ndarray, ys: np.ndarray, color: str, name: str) -> str:
        keep = np.unique(np.linspace(0, len(xs) - 1, min(len(xs), 1000)).astype(int))  # light for big runs
        coords = " ".join(f"{self.x(xs[i]):.1f},{self.y(ys[i]):.1f}" for i in keep)
        return f'<polyline class="{name}" points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>'

    def marker(self, x: float, y: float, color: str, filled: bool, tip: str, radius: float = 3) -> str:
        cx, cy = self.x(x), self.y(y)
        if filled:
            return (f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{radius:.1f}" fill="{color}">'
                    f'<title>{html.escape(tip)}</title></circle>')
        return (f'<path d="M{cx - 3:.1f},{cy - 3:.1f}L{cx + 3:.1f},{cy + 3:.1f}M{cx - 3:.1f},{cy + 3:.1f}'
                f'L{cx + 3:.1f},{cy - 3:.1f}" stroke="{color}" stroke-width="1.5"><title>{html.escape(tip)}</title></path>')

    def bar(self, x: float, width: float, count: int, color: str, tip: str) -> str:
        left, top = self.x(x), self.y(count)
        return (f'<rect x="{left:.1f}" y="{top:.1f}" width="{max(self.x(x + width) - left - 1, 1):.1f}" '
                f'height="{self.y(self.y0) - top:.1f}" fill="{color}"><title>{html.escape(tip)}</title></rect>')

    def legend(self, entries: list[tuple[str, str]]) -> str:
        x = self.width - self.RIGHT_PAD - 120
        return "".join(f'<rect x="{x}" y="{self.TOP + 16 * i}" width="10" height="10" fill="{color}"/>'
                       f'<text x="{x + 14}" y="{self.TOP + 9 + 16 * i}">{html.escape(text)}</text>'
                       for i, (color, text) in enumerate(entries))

    def right_label(self, text: str) -> str:
        return (f'<text x="{self.width - 4}" y="{self.TOP - 8}" text-anchor="end" fill="#777">'
                f'grey: {html.escape(text)}</text>')

    def svg(self, title: str, parts: list[str], css_id: str) -> str:
        return (f'<figure><svg id="{css_id}" xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
                f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" font-size="11" '
                f'font-family="sans-serif">{"".join(parts)}</svg><figcaption>{html.escape(title)}</figcaption></figure>')


# ---------------------------------------------------------------- the page


def metrics_table(metrics: dict, notes: dict[str, str] | None = None) -> str:
    """HTML table of the flat and the ``retrieval`` numbers of :func:`delf_pipeline.evaluate.evaluate`;
    ``notes``: a few words after some of them (key -> text)."""
    if not metrics:
        return "<p>No metrics: give --solution (or run with a solution) to score this run.</p>"
    rows = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    rows.update({f"retrieval {k}": v for k, v in metrics.get("retrieval", {}).items() if not isinstance(v, (dict, list))})
    notes = notes or {}
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.4f}</td><td class=\"note\">{html.escape(notes.get(k, ''))}</td></tr>"
                    if isinstance(v, float) else f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td>"
                    f"<td class=\"note\">{html.escape(notes.get(k, ''))}</td></tr>" for k, v in rows.items())
    return f'<table class="metrics">{cells}</table>'


def plots(queries: list[dict], has_truth: bool, calibrated: bool | None = None,
          curves: list[dict] | None = None) -> str:
    """The plots (precision, inliers, reliability; the model's training curves when given), or a
    note when there is no ground truth. A non-landmark query given a landmark counts among the
    wrong predictions."""
    trained = curves_svg(curves) if curves else ""
    if not has_truth:
        return f'<p>Plots need the ground truth: give --solution.</p><div class="plots">{trained}</div>'
    points, landmark_queries = gap_points(queries)
    right = [row["inliers"] for row in queries if row["ok"] == "right" and row["pred"] and row["inliers"] >= 0]
    wrong = [row["inliers"] for row in queries if row["ok"] in ("wrong", "nonlandmark") and row["inliers"] >= 0]
    return (f'<div class="plots">{precision_svg(points, landmark_queries)}{inliers_svg(right, wrong)}'
            f'{reliability_svg(points, calibrated=calibrated)}{trained}</div>')


def training_page(model: str | Path, out: str | Path | None = None) -> Path:
    """``MODEL/report.html`` (or ``out``): the model card of a `delf-pipeline train` folder and its curves."""
    model = Path(model)
    if not (model / CURVES).is_file():
        raise FileNotFoundError(f"{model} has no {CURVES}: --training takes a model folder of delf-pipeline train")
    card = read_json(model / "model_card.json") if (model / "model_card.json").is_file() else {}
    flat = {k: v for k, v in card.items() if not isinstance(v, (dict, list))}
    flat.update({f"{group} {k}": v for group in ("data", "validation", "validation_imagenet")
                 for k, v in (card.get(group) or {}).items() if not isinstance(v, (dict, list))})
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>delf_pipeline training: '
            f'{html.escape(str(model.resolve()))}</title><style>{asset("style.css")}</style></head><body>'
            f'<h1>delf_pipeline training</h1><div class="sub">model {html.escape(str(model.resolve()))}</div>'
            f'<div class="top"><section><h2>Model card</h2>{metrics_table(flat)}</section><section><h2>Curves</h2>'
            f'<div class="plots">{curves_svg(read_curves(model / CURVES))}</div></section></div></body></html>')
    target = Path(out) / "report.html" if out else model / "report.html"
    write_text_atomic(target, page)
    return target


def render_page(run: Run, queries: list[dict], metrics: dict, has_truth: bool, page_size: int,
                curves: list[dict] | None = None) -> str:
    """The whole index.html text."""
    summary = [[row["q"], row["pred"], row["conf"], row["ok"], row["inliers"]] for row in queries]
    settings = ", ".join(f"{k}={getattr(run.settings, k)}" for k in ("matcher", "match_threshold", "ratio", "verifier",
                                                                     "residual_threshold", "scoring"))
    calibrated = bool(run.record["calibration"]) if "calibration" in run.record else None  # None: an older run
    counts = verdict_counts(queries)
    notes = {"accuracy": f"{counts['right']} of {counts['landmark']} landmark queries right"} if counts else {}
    body = asset("page.html").format(
        title=html.escape(f"delf_pipeline report: {run.folder.path.resolve()}"),
        run=html.escape(str(run.folder.path.resolve())), settings=html.escape(settings),
        confidence=html.escape(_confidence_note(calibrated)),
        metrics=metrics_table(metrics, notes), plots=plots(queries, has_truth, calibrated, curves),
        counts=html.escape(_counts(queries, counts)),
        data=_json({"queries": summary, "chunk": CHUNK, "pageSize": page_size, "truth": has_truth,
                    "calibrated": calibrated}),
        style=asset("style.css"), script=asset("report.js"),
    )
    return body


def verdict_counts(queries: list[dict]) -> dict[str, int]:
    """Queries with a known truth by kind: landmark (right, wrong, unanswered) and non-landmark
    (given a landmark, left empty); {} when no truth is known."""
    known = [row for row in queries if row["truth"] is not None]
    if not known:
        return {}
    landmark = [row for row in known if row["truth"]]
    return {"landmark": len(landmark), "right": sum(row["ok"] == "right" for row in landmark),
            "wrong": sum(row["ok"] == "wrong" and bool(row["pred"]) for row in landmark),
            "unanswered": sum(not row["pred"] for row in landmark),
            "nonlandmark": len(known) - len(landmark), "given": sum(row["ok"] == "nonlandmark" for row in known)}


def _counts(queries: list[dict], counts: dict[str, int]) -> str:
    """E.g. "22 queries, 22 with a prediction. 16 of a landmark: 16 right, 0 wrong, 0 unanswered;
    6 of no landmark: 6 given a landmark, 0 left empty"."""
    text = f"{len(queries)} queries, {sum(1 for row in queries if row['pred'])} with a prediction"
    if counts:
        text += (f". {counts['landmark']} of a landmark: {counts['right']} right, {counts['wrong']} wrong, "
                 f"{counts['unanswered']} unanswered; {counts['nonlandmark']} of no landmark: {counts['given']} "
                 f"given a landmark, {counts['nonlandmark'] - counts['given']} left empty")
    return text


def _confidence_note(calibrated: bool | None) -> str:
    if calibrated:
        return ("Confidence: P(right), the probability that the predicted landmark is right, fitted on the "
                "index by leave-one-out (docs/confidence.md).")
    if calibrated is False:
        return ("Score: the predicted landmark's pooled evidence, not a probability (the run was not "
                "calibrated: its log says why).")
    return ""


def asset(name: str) -> str:
    """Text of a page asset shipped with the package (``tools/report_assets/NAME``)."""
    return (ASSETS / name).read_text(encoding="utf-8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run folder: OUT of `delf-pipeline run`, OUT/run of demo")
    which.add_argument("--training", metavar="MODEL", help="model folder of `delf-pipeline train`: its card and "
                       "training curves, in MODEL/report.html (or --out/report.html)")
    parser.add_argument("--solution", help="ground truth CSV id,landmarks[,Usage] (default: the run's, if any)")
    parser.add_argument("--data", help="where the images are: Kaggle root, folder or CSV (default: the run's data)")
    parser.add_argument("--out", help="report folder (default: RUN/report)")
    parser.add_argument("--top", type=int, default=5, help="candidates shown per query")
    parser.add_argument("--matches", type=int, default=3, help="candidates per query with a match picture (0: none)")
    parser.add_argument("--page-size", type=int, default=50, help="queries per page")
    parser.add_argument("--overwrite", action="store_true", help="remake thumbnails and match pictures")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if args.training:
        print(f"report: {training_page(args.training, args.out).resolve().as_uri()}")
        return 0
    page = build(args.run, args.out, data=args.data, solution=args.solution, config=given_config(args),
                 overrides=args.overrides,
                 top=args.top, matches=args.matches, page_size=args.page_size, overwrite=args.overwrite)
    print(f"report: {page.resolve().as_uri()}")
    return 0
