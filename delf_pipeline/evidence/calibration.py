"""P(prediction right | evidence): a logistic model fitted on leave-one-out queries, and its tables.

Why logistic regression, fitted with ``scipy.optimize`` (no scikit-learn):

* The evidence is several numbers per query (aggregated score, margin over the next class,
  best inliers, agreeing candidates, best global score). Logistic regression combines them
  into one monotone, smooth probability with a handful of weights; isotonic regression
  calibrates a single score only, and as a step function it gives tied confidences (GAP
  breaks ties by query id, not by evidence) and needs many more samples than the few
  hundred leave-one-out queries a calibration affords.
* It is small and well understood: the penalised log-loss is convex, so L-BFGS finds the
  one optimum from any start, with the analytic gradient below. A weak L2 penalty keeps the
  weights finite when a sample is separable (tiny indexes often are).
* scikit-learn would add a dependency for one fifteen-line fit; scipy is already one.

Features are standardised (mean 0, scale 1 on the calibration sample) before the fit, and
the mean and scale are stored with the weights in ``calibration.json``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from ..config import PredictSettings


class CalibrationError(ValueError):
    """The sample cannot be fitted: it lacks right or wrong predictions (``right`` of ``total`` are right)."""

    def __init__(self, right: int, total: int):
        super().__init__(f"calibration needs right and wrong predictions; got {right} right of {total} (sample "
                         "more index images, or an index with repeated places)")
        self.right, self.total = right, total


FEATURES = ("score", "margin", "log_inliers", "agree", "best_global")
L2 = 1.0  # penalty on the standardised weights (not the bias): a prior worth about one sample per weight


def feature_matrix(evidence: pd.DataFrame, names: tuple[str, ...] = FEATURES) -> np.ndarray:
    """[N, F] float64 features of best-class rows (columns of aggregation.EVIDENCE_COLUMNS)."""
    columns = {"score": evidence["score"], "margin": evidence["margin"], "agree": evidence["agree"],
               "log_inliers": np.log1p(evidence["best_inliers"].astype(float)), "best_global": evidence["best_global"]}
    if "nonlandmark" in evidence:  # evidence.nonlandmarks: closeness to non-landmark images
        columns["nonlandmark"] = evidence["nonlandmark"]
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise ValueError(f"unknown calibration feature(s) {unknown}; known: {', '.join(columns)}")
    return np.column_stack([np.asarray(columns[n], np.float64) for n in names]) if names else np.zeros((len(evidence), 0))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float]:
    """Weights [F] and bias minimising sum of log-loss + l2/2 |w|^2 over rows of x [N, F], y [N] in {0, 1}."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"fit_logistic needs x [N, F] and y [N]; got {x.shape} and {y.shape}")

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        value = -np.sum(y * log_expit(z) + (1 - y) * log_expit(-z)) + 0.5 * l2 * w @ w
        residual = expit(z) - y
        return float(value), np.append(x.T @ residual + l2 * w, residual.sum())

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B")
    return result.x[:-1], float(result.x[-1])


@dataclass
class Calibration:
    """A fitted P(right | features): ``expit(((x - mean) / scale) @ weights + bias)``."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    settings: dict = field(default_factory=dict)  # aggregation, top_k, sample size... (what it was fitted with)

    def probability(self, evidence: pd.DataFrame) -> np.ndarray:
        """[N] P(right) of best-class rows of :func:`aggregation.class_evidence`."""
        x = feature_matrix(evidence, tuple(self.features))
        return expit(((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.weights) + self.bias)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """The calibration in ``path``; ValueError naming it when it is not one (not UTF-8 JSON, a
        key missing, lists of other lengths than its features, unknown features)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            kind = "UTF-8 text" if isinstance(error, UnicodeDecodeError) else "JSON"
            raise ValueError(f"{path}: not a calibration file (not {kind}: {error}); make one with "
                             "`delf-pipeline calibrate`") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a calibration file (a JSON {type(data).__name__}, not an object)")
        missing = [k for k in ("features", "mean", "scale", "weights", "bias") if k not in data]
        if missing:
            raise ValueError(f"{path}: not a calibration file, missing {', '.join(missing)}")
        features = data["features"]
        known = (*FEATURES, "nonlandmark")
        if (not isinstance(features, list) or not set(features) <= set(known)
                or any(not isinstance(data[k], list) or len(data[k]) != len(features) for k in ("mean", "scale", "weights"))
                or not isinstance(data["bias"], (int, float))):
            raise ValueError(f"{path}: not a calibration file (features must be some of {', '.join(known)}, with "
                             "one mean, scale and weight each, and a number as bias)")
        return cls(**{k: data[k] for k in ("features", "mean", "scale", "weights", "bias", "settings") if k in data})


def load_checked(path: str | Path, conf: PredictSettings) -> Calibration:
    """The calibration at ``path``, checked against the ``predict`` section ``conf`` it must have
    been fitted with (aggregation, top_k)."""
    fitted = Calibration.load(path)
    for key in ("aggregation", "top_k"):
        if key in fitted.settings and fitted.settings[key] != getattr(conf, key):
            raise ValueError(f"{path} was fitted with predict.{key} = {fitted.settings[key]!r}, not {getattr(conf, key)!r}: "
                             "rerun `delf-pipeline calibrate` with these settings")
    return fitted


def fit(evidence: pd.DataFrame, right: np.ndarray, features: tuple[str, ...] | None = None, l2: float = L2,
        settings: dict | None = None) -> Calibration:
    """Fit on best-class rows ``evidence`` [N] and ``right`` [N] (prediction right: 1, wrong: 0).

    features: default FEATURES, plus ``nonlandmark`` when ``evidence`` has that column.
    """
    if features is None:
        features = FEATURES + (("nonlandmark",) if "nonlandmark" in evidence else ())
    right = np.asarray(right, np.float64)
    if len(right) != len(evidence) or not 0 < right.sum() < len(right):
        raise CalibrationError(int(right.sum()), len(right))
    x = feature_matrix(evidence, features)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    weights, bias = fit_logistic((x - mean) / scale, right, l2)
    return Calibration(list(features), mean.tolist(), scale.tolist(), weights.tolist(), bias, dict(settings or {}))


def threshold_table(confidence: np.ndarray, right: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    """Per threshold t: predictions kept (confidence >= t), precision, recall and F1 of "right".

    precision = right kept / kept (1 when nothing is kept), recall = right kept / right,
    F1 their harmonic mean (0 when both are 0). confidence, right: [N]; thresholds: [T].
    """
    confidence, right = np.asarray(confidence, np.float64), np.asarray(right, bool)
    kept = confidence[None, :] >= np.asarray(thresholds, np.float64)[:, None]  # [T, N]
    n_kept, n_right_kept = kept.sum(axis=1), (kept & right[None, :]).sum(axis=1)
    precision = np.where(n_kept > 0, n_right_kept / np.maximum(n_kept, 1), 1.0)
    recall = n_right_kept / max(int(right.sum()), 1)
    total = precision + recall
    f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    return pd.DataFrame({"threshold": thresholds, "kept": n_kept, "precision": precision, "recall": recall, "f1": f1})


def chosen_thresholds(table: pd.DataFrame) -> dict[str, float]:
    """Per column of precision, recall and F1: the lowest threshold that reaches its maximum.

    The lowest one keeps the most predictions among equally good choices. Maximum recall is
    the lowest threshold and maximum precision often the highest: only F1 weighs both, and
    is the abstain threshold ``calibrate`` suggests.
    """
    ordered = table.sort_values("threshold", kind="stable")
    return {name: float(ordered["threshold"].iloc[int(np.argmax(ordered[name].to_numpy()))])
            for name in ("precision", "recall", "f1")}


def reliability(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Reliability diagram data: per equal-width confidence bin of [0, 1], its count, mean
    confidence and observed fraction right (empty bins left out). confidence, right: [N]."""
    confidence, right = np.asarray(confidence, np.float64), np.asarray(right, np.float64)
    which = np.clip((confidence * bins).astype(int), 0, bins - 1)
    rows = [(b / bins, (b + 1) / bins, int((which == b).sum()), confidence[which == b].mean(), right[which == b].mean())
            for b in range(bins) if (which == b).any()]
    return pd.DataFrame(rows, columns=["low", "high", "count", "confidence", "observed"])


def describe(fitted: Calibration, table: pd.DataFrame, chosen: dict[str, float]) -> str:
    """The weights, the threshold table and the chosen thresholds as text."""
    weights = ", ".join(f"{n} {w:+.3f}" for n, w in zip(fitted.features, fitted.weights))
    lines = [f"P(right) = expit({weights}, bias {fitted.bias:+.3f})  (standardised features)",
             "", "| threshold | kept | precision | recall | F1 |", "|---|---|---|---|---|"]
    lines += [f"| {r.threshold:.2f} | {r.kept} | {r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} |"
              for r in table.itertuples()]
    lines.append("")
    lines.append("best threshold: " + ", ".join(f"{name} {value:.2f}" for name, value in chosen.items())
                 + f"  (suggested abstain threshold: --set predict.abstain={chosen['f1']:.2f})")
    return "\n".join(lines)
