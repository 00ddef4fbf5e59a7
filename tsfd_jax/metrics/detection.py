"""Detection and classification by HoVer-Net's protocol (compute_stats.run_nuclei_type_stat).

Paper Table 10; docs/evaluation.md. Per image, true and predicted nucleus centroids are paired by a
Hungarian assignment on their Euclidean distances, keeping pairs at most ``radius`` (12 px)
apart. Counts are pooled over the whole set:

  detection  F1_d = 2 TP_d / (2 TP_d + FP_d + FN_d),  P_d = TP_d / (TP_d + FP_d),
             R_d = TP_d / (TP_d + FN_d);
  class c    (paired nuclei with true == c or pred == c; TN_c is 0 after that restriction)
             F1_c = 2 (TP_c + TN_c) / (2 (TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d,c + FN_d,c)
             (weights w = [2, 2, 1, 1], Graham et al. 2019); FP_d,c / FN_d,c are the unpaired
             predicted / true nuclei of class c.
  P_c, R_c   not defined by HoVer-Net; the split whose harmonic mean is F1_c (derived here):
             P_c = (TP_c + TN_c) / (TP_c + TN_c + 2 FP_c + FP_d,c),
             R_c = (TP_c + TN_c) / (TP_c + TN_c + 2 FN_c + FN_d,c).
  acc_type   fraction of paired nuclei whose class is right.

Centroids are the pixel means (x, y) of each instance (cv2 moments of the mask), stored as
float32 as HoVer-Net reads them. An image without nuclei gets HoVer-Net's dummy centroid (0, 0)
of class 0 (``empty_image_dummy``), which can pair with a prediction near the corner.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from tsfd_jax.constants import PANNUKE_CLASSES

Points = tuple[np.ndarray, np.ndarray]  # centroids (K, 2) float xy, classes (K,) int 1..C


def centroids_from_instances(inst: np.ndarray, classes: np.ndarray | None = None) -> Points:
    """(H, W) map with ids 1..K (gaps allowed: absent ids are skipped) -> (centroids, classes).

    ``classes`` (K,) gives the label of id k at index k - 1 (default: all 1).
    """
    inst = np.asarray(inst, np.int64)
    H, W = inst.shape
    n = int(inst.max()) + 1 if inst.size else 1
    count = np.bincount(inst.ravel(), minlength=n)
    ys, xs = np.indices((H, W))
    sx = np.bincount(inst.ravel(), weights=xs.ravel(), minlength=n)
    sy = np.bincount(inst.ravel(), weights=ys.ravel(), minlength=n)
    ids = np.flatnonzero(count[1:]) + 1
    cent = np.stack([sx[ids] / count[ids], sy[ids] / count[ids]], -1).astype(np.float32)
    if classes is None:
        labels = np.ones(len(ids), np.int32)
    else:
        labels = np.asarray(classes, np.int32)[ids - 1]
    return cent.reshape(-1, 2), labels


def instances_from_pannuke(mask: np.ndarray, num_classes: int | None = None) -> Points:
    """(H, W, C + 1) PanNuke layout -> (centroids (K, 2) float32 xy, classes (K,) int32 1..C).

    Every distinct non-zero id of class channel j is one nucleus of class j + 1.
    """
    mask = np.asarray(mask)
    C = mask.shape[-1] - 1 if num_classes is None else num_classes
    H, W = mask.shape[:2]
    planes = np.moveaxis(mask[..., :C], -1, 0).reshape(C, H * W).astype(np.int64)
    xs, ys = np.tile(np.arange(W), H), np.repeat(np.arange(H), W)
    cents, labels = [], []
    for j in range(C):
        ids = planes[j]
        if not ids.any():
            continue
        if ids.min() < 0 or ids.max() >= 1 << 22:  # unusual ids: compact them first
            values, inverse = np.unique(ids, return_inverse=True)
            ids = (np.cumsum(values != 0) * (values != 0))[inverse.reshape(-1)]
        count = np.bincount(ids)
        sx, sy = np.bincount(ids, weights=xs), np.bincount(ids, weights=ys)
        keep = np.flatnonzero(count[1:]) + 1
        cents.append(np.stack([sx[keep] / count[keep], sy[keep] / count[keep]], -1))
        labels.append(np.full(len(keep), j + 1))
    if not cents:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int32)
    return np.concatenate(cents).astype(np.float32), np.concatenate(labels).astype(np.int32)


def pair_coordinates(set_a: np.ndarray, set_b: np.ndarray, radius: float):
    """Hungarian pairing on Euclidean distance; pairs farther than ``radius`` are dropped.

    Returns (pairs (M, 2) indices into a and b, unpaired a, unpaired b)."""
    set_a = np.asarray(set_a, np.float64).reshape(-1, 2)
    set_b = np.asarray(set_b, np.float64).reshape(-1, 2)
    if len(set_a) == 0 or len(set_b) == 0:
        return np.zeros((0, 2), np.int64), np.arange(len(set_a)), np.arange(len(set_b))
    dist = cdist(set_a, set_b)
    rows, cols = linear_sum_assignment(dist)
    ok = dist[rows, cols] <= radius
    rows, cols = rows[ok], cols[ok]
    return (np.stack([rows, cols], 1), np.setdiff1d(np.arange(len(set_a)), rows),
            np.setdiff1d(np.arange(len(set_b)), cols))


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def detection_stats(true_list: Sequence[Points], pred_list: Sequence[Points],
                    radius: float = 12.0, num_classes: int = len(PANNUKE_CLASSES),
                    class_names: Sequence[str] | None = None,
                    empty_image_dummy: bool = True) -> dict[str, Any]:
    """Detection P/R/F1, type accuracy and per-class P/R/F1 over a set of images.

    true_list, pred_list: one (centroids (K, 2) xy, classes (K,) labels 1..C) per image.
    Returns Pd, Rd, F1d, acc_type, TP/FP/FN and per_class {name: {P, R, F1, TP, FP, FN, FP_d,
    FN_d}} (NaN where a ratio has no denominator).
    """
    if len(true_list) != len(pred_list):
        raise ValueError(f"{len(true_list)} true images but {len(pred_list)} predicted")
    if class_names is None:
        class_names = (PANNUKE_CLASSES if num_classes == len(PANNUKE_CLASSES)
                       else tuple(f"class{c}" for c in range(1, num_classes + 1)))
    pt, pp, ut, up = [], [], [], []
    for (tc, tk), (pc, pk) in zip(true_list, pred_list):
        tc = np.asarray(tc, np.float32).reshape(-1, 2)
        pc = np.asarray(pc, np.float32).reshape(-1, 2)
        tk, pk = np.asarray(tk, np.int64).reshape(-1), np.asarray(pk, np.int64).reshape(-1)
        if empty_image_dummy:  # HoVer-Net: a dummy nucleus of class 0 at (0, 0)
            if len(tc) == 0:
                tc, tk = np.zeros((1, 2), np.float32), np.zeros(1, np.int64)
            if len(pc) == 0:
                pc, pk = np.zeros((1, 2), np.float32), np.zeros(1, np.int64)
        pairs, unpaired_t, unpaired_p = pair_coordinates(tc, pc, radius)
        pt.append(tk[pairs[:, 0]])
        pp.append(pk[pairs[:, 1]])
        ut.append(tk[unpaired_t])
        up.append(pk[unpaired_p])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    pt, pp, ut, up = cat(pt), cat(pp), cat(ut), cat(up)
    tp_d, fp_d, fn_d = len(pt), len(up), len(ut)
    out: dict[str, Any] = {
        "radius": float(radius), "num_images": len(true_list),
        "TP": tp_d, "FP": fp_d, "FN": fn_d,
        "Pd": _ratio(tp_d, tp_d + fp_d), "Rd": _ratio(tp_d, tp_d + fn_d),
        "F1d": _ratio(2 * tp_d, 2 * tp_d + fp_d + fn_d),
        "acc_type": _ratio(int((pt == pp).sum()), len(pt)),
    }
    per_class = {}
    for c, name in enumerate(class_names, start=1):
        sel = (pt == c) | (pp == c)
        t, p = pt[sel], pp[sel]
        tp = int(((t == c) & (p == c)).sum())
        tn = int(((t != c) & (p != c)).sum())  # always 0 after the restriction (as HoVer-Net)
        fp = int(((t != c) & (p == c)).sum())
        fn = int(((t == c) & (p != c)).sum())
        fpd, fnd = int((up == c).sum()), int((ut == c).sum())
        a = tp + tn
        per_class[name] = {"F1": _ratio(2 * a, 2 * a + 2 * fp + 2 * fn + fpd + fnd),
                           "P": _ratio(a, a + 2 * fp + fpd), "R": _ratio(a, a + 2 * fn + fnd),
                           "TP": tp, "FP": fp, "FN": fn, "FP_d": fpd, "FN_d": fnd}
    out["per_class"] = per_class
    return out
