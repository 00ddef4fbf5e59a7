"""Pixel-level metrics: Dice, per-class precision/recall/F1 and precision-recall curves.

The TSFD authors report pixel-wise per-class P/R/F1 and PR curves (paper Fig. 6-7; authors' code,
docs/evaluation.md: sklearn ``precision_recall_fscore_support(average='macro')`` on each binary class map, i.e.
the mean of the foreground and background scores). ``pixel_prf`` gives both the plain
foreground scores and that macro variant.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two binary masks; NaN when both are empty."""
    t, p = np.asarray(true, bool), np.asarray(pred, bool)
    den = int(t.sum()) + int(p.sum())
    return 2.0 * int((t & p).sum()) / den if den else float("nan")


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray):
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
    return p, r, f


def pixel_prf(true: np.ndarray, pred: np.ndarray, num_classes: int,
              class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class pixel scores of label maps (any shape, labels 0..C, 0 = background).

    Returns {name: {P, R, F1, P_macro, R_macro, F1_macro, support}}; an undefined ratio is 0
    (sklearn's zero_division=0). ``*_macro`` average the class and its complement (authors').
    """
    t = np.asarray(true, np.int64).reshape(-1)
    p = np.asarray(pred, np.int64).reshape(-1)
    k = num_classes + 1
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    n = cm.sum()
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    tn = n - tp - fp - fn
    P, R, F = _prf(tp, fp, fn)
    Pn, Rn, Fn = _prf(tn, fn, fp)  # the complement: "not class c" as the positive class
    names = class_names or [f"class{c}" for c in range(1, k)]
    return {name: {"P": float(P[c]), "R": float(R[c]), "F1": float(F[c]),
                   "P_macro": float((P[c] + Pn[c]) / 2), "R_macro": float((R[c] + Rn[c]) / 2),
                   "F1_macro": float((F[c] + Fn[c]) / 2), "support": int(cm[c].sum())}
            for c, name in zip(range(1, k), names)}


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall points of a binary score (sklearn ``precision_recall_curve`` order).

    scores (N,) float, labels (N,) bool -> (precision, recall, thresholds): one point per
    distinct score in increasing threshold order, then the (P=1, R=0) end point.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels, bool).reshape(-1)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.zeros(0, int)
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    positives = tps[-1] if len(tps) else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 1.0)
        recall = tps / positives if positives else np.ones_like(tps)
    # Stop at full recall, reverse to increasing thresholds, append the end point.
    stop = int(np.searchsorted(tps, positives)) + 1 if len(tps) else 0
    sl = slice(stop - 1, None, -1) if stop else slice(0, 0)
    return (np.r_[precision[sl], 1.0], np.r_[recall[sl], 0.0], s[last][sl])
