"""``delf-pipeline show-matches``: a picture of the local matches of a (query, candidate) pair.

The pair is verified again from the run's feature stores with the run's own rerank settings
(``rerank.csv.blocks/manifest.json``), by the stage its ``rerank.csv`` row names (a
``lighterglue:...`` row by the cascade's LighterGlue stage on both images' kept XFeat features,
any other by the fast path), so the picture shows exactly what re-ranking counted, for every
feature backend, without extracting anything. Images are read from their source
files: ``--data`` (Kaggle root, folder or CSV with ``id,path``), or by default the data folder
recorded in the run's ``run.json`` (written by ``delf-pipeline run`` and ``demo``).

Layout of a picture: the query (left) and the candidate (right) scaled to one height, every
putative match drawn faint, RANSAC inliers drawn clearly in green, and a margin above with
the ids, counts, scores and verification settings.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from ..config import (
    Config,
    RerankSettings,
    add_config_arguments,
    config_from_dict,
    config_of,
    load_config,
    parse_override_value,
    split_override,
    with_recorded,
)
from ..formats.blocks import blocks_dir, read_table
from ..formats.features import ImageFeatures
from ..formats.images import ImageError, list_images, load_image
from ..formats.run_folder import RunFolder
from ..formats.run_record import read_run_record, recorded_path
from ..formats.store import FeatureStore
from ..utils.artifacts import atomic_path, read_json
from ..verification.cascade import QuerySide
from ..verification.pairs import PairResult
from ..verification.verifier import CandidateVerifier, VerifiedPair, by_glue_stage, final_score

log = logging.getLogger("delf_pipeline.tools.show_matches")

PUTATIVE_RGB = (255, 190, 40)  # amber, blended faintly
INLIER_RGB = (40, 230, 70)  # green, drawn opaque
PUTATIVE_ALPHA = 0.35
MAX_INLIER_LINES = 100  # inliers beyond this get their end points but no line
TEXT_LINE = 22  # pixels per caption line
GAP = 8  # pixels between the two images
CANDIDATE_COLUMNS = ("query_id", "index_id", "rank", "score", "global_score", "matches", "inliers", "status")


@dataclass
class Run:
    """What pictures of a run need.

    folder: the run folder (``OUT`` of ``delf-pipeline run``, its paths).
    queries, index: its feature stores.
    candidates: its candidates store, the local features of shortlisted index images when the
        index store holds global descriptors only (else None).
    images: image id -> source file (index and query images).
    labels: index image id -> landmark id.
    settings: the rerank section used to verify pairs.
    record: the run's ``run.json`` ({} when it has none: a run folder made stage by stage).
    verifiers: (index store path, with the second stage) -> the rerank's verifier over it (:meth:`verifier`).
    """

    folder: RunFolder
    queries: FeatureStore
    index: FeatureStore
    images: dict[str, Path]
    labels: dict[str, str]
    settings: RerankSettings
    candidates: FeatureStore | None = None
    record: dict = field(default_factory=dict)
    verifiers: dict[tuple[Path, bool], CandidateVerifier] = field(default_factory=dict, repr=False)

    def index_store(self, image_id: str) -> FeatureStore:
        """The store with the local features of index image ``image_id``."""
        return self.candidates if self.candidates is not None and image_id in self.candidates else self.index

    def verifier(self, image_id: str, second_stage: bool) -> CandidateVerifier:
        """The rerank's verifier over the store of index image ``image_id``, made once per store:
        with its cascade's second stage when ``second_stage`` (a lighterglue cascade's loads
        LighterGlue's weights), else its fast path alone."""
        store = self.index_store(image_id)
        key = (store.path, second_stage)
        if key not in self.verifiers:
            settings = self.settings if second_stage else replace(self.settings, cascade="")
            self.verifiers[key] = CandidateVerifier(self.queries, store, settings)
        return self.verifiers[key]


def open_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    config: Config | None = None,
    overrides: Sequence[str] = (),
) -> Run:
    """Stores, image paths, labels and rerank settings of ``run_dir``.

    data: where the images are (Kaggle root, folder or CSV); default: the data folder of the
        run's ``run.json``.
    config: fallback settings when the run has no rerank manifest (default: the settings of
        its ``run.json``); ``overrides`` (``rerank.key=value``) apply on top of the run's settings.
    """
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise FileNotFoundError(f"run folder not found: {folder.path}")
    record = read_run_record(folder.path) if folder.record.is_file() else {}
    source = Path(data) if data else recorded_path(record, "data")
    if source is not None and not data and not source.exists():
        raise FileNotFoundError(f"the data folder of {folder.record}, {source}, is gone: give --data")
    images, labels = image_sources(source) if source else ({}, {})
    if source is None:
        log.warning("%s has no %s: give --data (the Kaggle root or image folder the run was made from)",
                    folder.path, folder.record.name)
    recorded = config_from_dict(record["config"], str(folder.record)) if record.get("config") else None
    settings = rerank_settings(folder, config or recorded or load_config(), overrides)
    candidates = folder.store(folder.candidates_store) if folder.candidates_store.is_dir() else None
    return Run(folder, folder.store(folder.query_store), folder.store(folder.index_store), images, labels, settings,
               candidates, record)


def image_sources(source: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """(image id -> path, index image id -> label) of a Kaggle root (train and test), folder or CSV."""
    splits = ("train", "test") if (source / "train.csv").is_file() else ("train",)
    paths: dict[str, Path] = {}
    labels: dict[str, str] = {}
    for split in splits:
        records, _ = list_images(source, split=split)
        paths.update((r.id, r.path) for r in records)
        labels.update((r.id, r.label) for r in records if r.label is not None)
    return paths, labels


def rerank_settings(folder: RunFolder, config: Config, overrides: Sequence[str] = ()) -> RerankSettings:
    """The rerank section the run used (its manifest), else ``config.rerank``; then the
    ``rerank.key=value`` items of ``overrides``."""
    manifest = blocks_dir(folder.rerank) / "manifest.json"
    if manifest.is_file():
        config = with_recorded(config, "rerank", read_json(manifest)["settings"], str(manifest))
    else:
        log.info("%s has no rerank manifest: verifying with the %s settings", folder.path, config.preset)
    rerank = {key: value for key, value in (split_override(item)[1:] for item in overrides
                                            if split_override(item)[0] == "rerank")}
    parsed = {key: parse_override_value("rerank", key, raw, "--set") for key, raw in rerank.items()}
    return with_recorded(config, "rerank", parsed, "--set").rerank


# ---------------------------------------------------------------- pairs and scores


def verify_recorded(run: Run, query_id: str, index_id: str, status: str = "") -> VerifiedPair:
    """Verify a stored pair again as the rerank verified it, by the stage its rerank row's
    ``status`` names (:meth:`.CandidateVerifier.verify_row`): a ``lighterglue:...`` pair by the
    cascade's LighterGlue stage on both images' kept XFeat features, an ``asift:...`` pair by its
    fallback on both images' files, any other by the fast path (the run's matcher, LighterGlue's
    too, and verifier).

    Raises FileNotFoundError naming ``delf-pipeline weights fetch xfeat`` when the LighterGlue
    weights the pair needs are missing.
    """
    second_stage = by_glue_stage(status)
    try:
        worker = run.verifier(index_id, second_stage)
    except FileNotFoundError as error:
        by = f"the cascade's LighterGlue stage ({status} in rerank.csv)" if second_stage else "LighterGlue (rerank.matcher)"
        raise FileNotFoundError(f"{query_id} / {index_id} was matched by {by}, whose weights are missing: fetch them "
                                "with `delf-pipeline weights fetch xfeat`") from error
    path = {image_id: str(run.images[image_id]) for image_id in (query_id, index_id) if image_id in run.images}
    query = QuerySide(worker.stored_query(query_id), run.queries.size(query_id), path=path.get(query_id))
    return worker.verify_row(query, index_id, status, index_path=path.get(index_id))


def global_score(query: ImageFeatures, candidate: ImageFeatures) -> float:
    """Cosine similarity of two global descriptors [G] (0.0 when a backend has none)."""
    if query.global_descriptor is None or candidate.global_descriptor is None:
        return 0.0
    return float(np.dot(query.global_descriptor, candidate.global_descriptor))


def candidate_table(folder: RunFolder, top: int) -> pd.DataFrame:
    """The ``top`` best-ranked candidates of every query with their rerank numbers.

    Columns :data:`CANDIDATE_COLUMNS`; ``matches``/``inliers`` are -1 and ``status`` is
    "not verified" for candidates that were not re-ranked.
    """
    ranked = _first_table(folder, (folder.ranking, folder.rerank, folder.shortlist))
    if "rank" not in ranked:
        ranked = ranked.sort_values(["query_id", "score"], ascending=[True, False], kind="stable")
        ranked["rank"] = ranked.groupby("query_id").cumcount() + 1
    ranked = ranked[ranked["rank"] <= top][["query_id", "index_id", "rank", "score"]]
    verified = _verified_numbers(folder)
    table = ranked.merge(verified, on=["query_id", "index_id"], how="left")
    table = table.fillna({"matches": -1, "inliers": -1, "status": "not verified"})
    table["global_score"] = table["global_score"].fillna(table["score"])
    table = table.astype({"matches": int, "inliers": int})
    return table[list(CANDIDATE_COLUMNS)].sort_values(["query_id", "rank"], kind="stable").reset_index(drop=True)


def _first_table(folder: RunFolder, paths: Sequence[Path]) -> pd.DataFrame:
    for path in paths:
        if path.is_file():
            return read_table(path)
    raise FileNotFoundError(f"{folder.path} has none of {', '.join(p.name for p in paths)}: is it a finished run "
                            "folder?")


def rerank_row(folder: RunFolder, query_id: str, index_id: str) -> dict | None:
    """The pair's row of the run's rerank.csv (its columns: global_score, inliers, status, ...);
    None when the run has no rerank.csv or the pair no row there."""
    if not folder.rerank.is_file():
        return None
    table = read_table(folder.rerank)
    rows = table[(table["query_id"] == query_id) & (table["index_id"] == index_id)]
    return rows.iloc[0].to_dict() if len(rows) else None


def _verified_numbers(folder: RunFolder) -> pd.DataFrame:
    """Rerank rows (global score, matches, inliers, status) or, without a rerank, shortlist scores."""
    columns = ["query_id", "index_id", "global_score", "matches", "inliers", "status"]
    if folder.rerank.is_file():
        return read_table(folder.rerank)[columns]
    if folder.shortlist.is_file():
        return read_table(folder.shortlist).rename(columns={"score": "global_score"}).reindex(columns=columns)
    return pd.DataFrame(columns=columns)


# ---------------------------------------------------------------- drawing


def draw_matches(
    image_a: np.ndarray,
    image_b: np.ndarray,
    loc_a: np.ndarray,
    loc_b: np.ndarray,
    result: PairResult,
    caption: Sequence[str] = (),
    height: int = 480,
) -> np.ndarray:
    """The two images side by side with matches; returns RGB uint8 [margin + height, W, 3].

    image_a, image_b: RGB uint8 [H, W, 3] at the resolution of loc_a / loc_b ([N, 2] (y, x)).
    result: matches of a to b (``match_indices`` [M, 2], ``inlier_mask`` [M]).
    caption: text lines written in the margin above the images.
    """
    if height < 16:
        raise ValueError(f"height must be >= 16 pixels, got {height}")
    scale_a, scale_b = height / image_a.shape[0], height / image_b.shape[0]
    left, right = _resize_to(image_a, height), _resize_to(image_b, height)
    margin = TEXT_LINE * len(caption) + (10 if caption else 0)
    canvas = np.full((margin + height, left.shape[1] + GAP + right.shape[1], 3), 255, np.uint8)
    canvas[margin:, : left.shape[1]] = left
    canvas[margin:, left.shape[1] + GAP :] = right
    xy_a = loc_a[result.match_indices[:, 0], ::-1] * scale_a + (0, margin)
    xy_b = loc_b[result.match_indices[:, 1], ::-1] * scale_b + (left.shape[1] + GAP, margin)
    _draw_lines(canvas, xy_a, xy_b, result.inlier_mask)
    _write_caption(canvas, caption)
    return canvas


def _resize_to(image: np.ndarray, height: int) -> np.ndarray:
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _draw_lines(canvas: np.ndarray, xy_a: np.ndarray, xy_b: np.ndarray, inliers: np.ndarray) -> None:
    """Putative matches faint (blended), then inliers opaque, in place.

    Every inlier gets its two end points; lines are drawn for at most MAX_INLIER_LINES of
    them (evenly spread), so a pair with hundreds of inliers still shows the images.
    """
    points = [(tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int))) for a, b in zip(xy_a, xy_b)]
    overlay = canvas.copy()
    for (a, b), inlier in zip(points, inliers):
        if not inlier:
            cv2.line(overlay, a, b, PUTATIVE_RGB, 1, cv2.LINE_AA)
    cv2.addWeighted(overlay, PUTATIVE_ALPHA, canvas, 1 - PUTATIVE_ALPHA, 0, dst=canvas)
    chosen = np.flatnonzero(inliers)
    with_line = set(chosen[np.linspace(0, len(chosen) - 1, min(len(chosen), MAX_INLIER_LINES)).astype(int)])
    for number in chosen:
        a, b = points[number]
        if number in with_line:
            cv2.line(canvas, a, b, INLIER_RGB, 1, cv2.LINE_AA)
        cv2.circle(canvas, a, 2, INLIER_RGB, -1, cv2.LINE_AA)
        cv2.circle(canvas, b, 2, INLIER_RGB, -1, cv2.LINE_AA)


def _write_caption(canvas: np.ndarray, caption: Sequence[str]) -> None:
    for number, text in enumerate(caption):
        origin = (8, TEXT_LINE * (number + 1))
        cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (20, 20, 20), 1, cv2.LINE_AA)


def pair_caption(run: Run, query_id: str, pair: VerifiedPair, global_: float,
                 recorded: dict | None = None) -> list[str]:
    """Margin text: ids and label, counts and scores, and how the pair was matched (the fast
    path's matcher or the cascade's stage) and verified.

    recorded: the pair's numbers from the run (keys ``inliers``, -1 if not verified, and
    ``global_score``): its global score is shown, and its inlier count when it differs.
    """
    if recorded and recorded.get("global_score") is not None:
        global_ = float(recorded["global_score"])
    conf, result = run.settings, pair.result
    inliers = pair.counted(conf)
    score = final_score(inliers, global_, conf)
    label = run.labels.get(pair.index_id, "?")
    lines = "" if result.inliers <= MAX_INLIER_LINES else f", {MAX_INLIER_LINES} drawn as lines"
    counts = (f"putative matches {result.matches} (faint)   inliers {result.inliers} (green{lines})   "
              f"global {global_:.3f}   final score {score:.3f}   status {pair.status}")
    if recorded and int(recorded["inliers"]) not in (-1, inliers):
        counts += f"   (rerank.csv: {int(recorded['inliers'])} inliers)"
    ratio = f", Lowe ratio {conf.ratio:g}" if conf.ratio > 0 else ""
    matching = pair.matched_by if pair.stage else f"{pair.matched_by}, distance < {conf.match_threshold:g}{ratio}"
    method = (f"{matching}; {conf.verifier}, residual {conf.residual_threshold:g} px, {conf.max_trials} trials, "
              f"seed {conf.seed}; {conf.scoring} scoring")
    return [f"query {query_id}  vs  index {pair.index_id} (landmark {label})", counts, method]


# ---------------------------------------------------------------- pictures of a run


def safe_name(image_id: str) -> str:
    """A file name for an image id (ids may contain '/'); distinct ids give distinct names."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", image_id)
    if cleaned == image_id:
        return image_id
    return f"{cleaned}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def match_picture_path(folder: Path, query_id: str, index_id: str, suffix: str = ".png") -> Path:
    """Where the picture of (query, candidate) goes under ``folder``: ``QUERY/INDEX.png`` (or ``suffix``)."""
    return Path(folder) / safe_name(query_id) / f"{safe_name(index_id)}{suffix}"


def render_pair(run: Run, query_id: str, index_id: str, out: Path, height: int = 480,
                recorded: dict | None = None) -> Path:
    """Verify (query, candidate) from the stores by the stage of its rerank row (``recorded["status"]``,
    see :func:`verify_recorded`) and write the picture ``out`` (.png or .jpg); returns ``out``.

    recorded: the pair's numbers in the run (see :func:`pair_caption`; its ``status``, "" without).
    Raises FileNotFoundError when an image's source file is unknown, ImageError when unreadable.
    """
    pair = verify_recorded(run, query_id, index_id, (recorded or {}).get("status", ""))
    log.debug("%s / %s: matched by %s", query_id, index_id, pair.matched_by)
    # the global descriptors of the index store: a candidates store may have none
    global_ = global_score(run.queries.features(query_id), run.index.features(index_id))
    caption = pair_caption(run, query_id, pair, global_, recorded)
    image_q = _original(run, run.queries, query_id)
    image_c = _original(run, run.index_store(index_id), index_id)
    picture = draw_matches(image_q, image_c, pair.query.locations, pair.candidate.locations, pair.result, caption,
                           height)
    write_picture(Path(out), picture)
    return Path(out)


def write_picture(path: Path, image: np.ndarray) -> None:
    """Write an RGB uint8 [H, W, 3] image, atomically, as PNG or JPEG (quality 88) by the suffix of ``path``."""
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"match pictures are .png or .jpg files, got {path}")
    options = [cv2.IMWRITE_JPEG_QUALITY, 88] if suffix != ".png" else []
    ok, encoded = cv2.imencode(suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), options)
    if not ok:
        raise ValueError(f"OpenCV cannot encode a {image.shape} {image.dtype} image as {suffix}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
        tmp.chmod(0o644)  # readable like any file the user writes (mkstemp makes it private)


def _original(run: Run, store: FeatureStore, image_id: str) -> np.ndarray:
    """The image at the size its stored locations refer to (the original size), RGB [H, W, 3]."""
    if image_id not in run.images:
        raise FileNotFoundError(f"no source file known for image {image_id!r}: give --data (image folder or Kaggle root)")
    image, _ = load_image(run.images[image_id])
    if tuple(image.shape[:2]) != store.size(image_id):
        raise ImageError(f"{run.images[image_id]} is {image.shape[1]}x{image.shape[0]} but the store recorded "
                         f"{store.size(image_id)[1]}x{store.size(image_id)[0]}: not the image the run used")
    return image


def render_query(run: Run, query_id: str, folder: Path, top: int = 3, height: int = 480,
                 overwrite: bool = True, suffix: str = ".png") -> list[Path]:
    """Pictures of a query's ``top`` best-ranked candidates under ``folder``; returns their paths."""
    table = candidate_table(run.folder, top)
    rows = table[table["query_id"] == query_id]
    if rows.empty:
        raise KeyError(f"query {query_id!r} has no candidates in {run.folder.path}")
    paths = []
    for row in rows.to_dict("records"):
        out = match_picture_path(folder, query_id, row["index_id"], suffix)
        if overwrite or not out.exists():
            render_pair(run, query_id, row["index_id"], out, height, recorded=row)
        paths.append(out)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder: OUT of `delf-pipeline run`, OUT/run of demo")
    parser.add_argument("--query", required=True, help="query image id")
    parser.add_argument("--candidate", help="index image id (default: the query's --top best candidates)")
    parser.add_argument("--top", type=int, default=3, help="candidates drawn when --candidate is not given")
    parser.add_argument("--data", help="where the images are: Kaggle root, folder or CSV (default: the run's data)")
    parser.add_argument("--out", help="picture file .png/.jpg (with --candidate) or folder (default: RUN/matches)")
    parser.add_argument("--format", choices=["png", "jpg"], default="png", help="picture format in a folder")
    parser.add_argument("--height", type=int, default=480, help="height of each image in the picture (pixels)")
    add_config_arguments(parser)


def given_config(args: argparse.Namespace) -> Config | None:
    """The settings of --preset/--config when given, else None (the run's own are used)."""
    return config_of(args) if args.preset or args.config else None


def main(args: argparse.Namespace) -> int:
    run = open_run(args.run, args.data, given_config(args), args.overrides)
    folder = Path(args.out) if args.out else run.folder.matches
    suffix = f".{args.format}"
    if args.candidate:
        single = folder.suffix.lower() in (".png", ".jpg", ".jpeg")
        out = folder if single else match_picture_path(folder, args.query, args.candidate, suffix)
        recorded = rerank_row(run.folder, args.query, args.candidate)
        paths = [render_pair(run, args.query, args.candidate, out, args.height, recorded)]
    else:
        paths = render_query(run, args.query, folder, args.top, args.height, suffix=suffix)
    for path in paths:
        print(path)
    return 0
