"""A plain re-implementation of the official PanNuke evaluation, for tests and benchmarks.

Written from the published algorithm (PanNuke-metrics run.py + utils.py, docs/data.md) in its
loop-per-instance form, sharing no code with tsfd_jax.metrics.pq: one boolean mask per
instance, IoU per overlapping pair, contiguous relabelling by masks. Two departures, both needed
for the official code to run on every valid input: ``binarize`` renumbers its output to
contiguous ids (the official one leaves a gap when an instance is overwritten completely, which
its own ``get_fast_pq`` cannot handle; the TSFD authors' copy renumbers the same way), and a
channel without background does not crash it.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment


def ref_remap_label(x: np.ndarray) -> np.ndarray:
    ids = [v for v in np.unique(x).tolist() if v != 0]
    out = np.zeros(x.shape, np.int32)
    for new, old in enumerate(ids, start=1):
        out[x == old] = new
    return out


def ref_binarize(x: np.ndarray) -> np.ndarray:
    """Channels in order, ids ascending; every instance gets the next number, later ones win."""
    out = np.zeros(x.shape[:2])
    count = 1
    for ch in range(x.shape[2]):
        plane = x[:, :, ch]
        for v in np.unique(plane).tolist():
            if v == 0:
                continue
            m = plane == v
            out = out * (1 - m) + count * m
            count += 1
    return ref_remap_label(out.astype(np.int32))


def ref_get_fast_pq(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5):
    """(dq, sq, pq) of two instance maps with contiguous ids 1..K."""
    true_ids = [v for v in np.unique(true).tolist() if v != 0]
    pred_ids = [v for v in np.unique(pred).tolist() if v != 0]
    true_masks = {t: (true == t).astype(np.uint8) for t in true_ids}
    pred_masks = {p: (pred == p).astype(np.uint8) for p in pred_ids}
    iou = np.zeros((len(true_ids), len(pred_ids)), np.float64)
    for t in true_ids:
        tm = true_masks[t]
        for p in np.unique(pred[tm > 0]).tolist():
            if p == 0:
                continue
            pm = pred_masks[p]
            total = (tm + pm).sum()
            inter = (tm * pm).sum()
            iou[t - 1, p - 1] = inter / (total - inter)
    if match_iou >= 0.5:
        rows, cols = np.nonzero(iou > match_iou)
        paired = iou[rows, cols]
    else:
        rows, cols = linear_sum_assignment(-iou)
        paired = iou[rows, cols]
        keep = paired > match_iou
        rows, cols, paired = rows[keep], cols[keep], paired[keep]
    tp = len(rows)
    fn = len([t for t in true_ids if t - 1 not in set(rows.tolist())])
    fp = len([p for p in pred_ids if p - 1 not in set(cols.tolist())])
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = paired.sum() / (tp + 1.0e-6)
    return dq, sq, dq * sq


def ref_image(true: np.ndarray, pred: np.ndarray, num_classes: int, match_iou: float = 0.5):
    """One image -> (per-class [(dq, sq, pq)], binary (dq, sq, pq)), NaN where GT is empty."""
    nan3 = (np.nan, np.nan, np.nan)
    t_bin = ref_binarize(true[:, :, :num_classes])
    p_bin = ref_binarize(pred[:, :, :num_classes])
    binary = nan3 if len(np.unique(t_bin)) == 1 else ref_get_fast_pq(t_bin, p_bin, match_iou)
    classes = []
    for j in range(num_classes):
        t = ref_remap_label(true[:, :, j].astype(np.int32))
        p = ref_remap_label(pred[:, :, j].astype(np.int32))
        classes.append(nan3 if len(np.unique(t)) == 1 else ref_get_fast_pq(t, p, match_iou))
    return classes, binary


def ref_pannuke_pq(true: np.ndarray, pred: np.ndarray, types, class_names, tissue_names,
                   match_iou: float = 0.5) -> dict:
    """run.py: per image, then per tissue, then the mean over tissues; class PQ over images."""
    C = len(class_names)
    per_class, per_bin = [], []
    for i in range(true.shape[0]):
        classes, binary = ref_image(true[i], pred[i], C, match_iou)
        per_class.append(classes)
        per_bin.append(binary)
    result = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k, metric in enumerate(("PQ", "DQ", "SQ")):
            k = (2, 0, 1)[k]
            m_each = [np.nanmean([c[k] for c in img]) for img in per_class]
            b_each = [np.nanmean([b[k]]) for b in per_bin]
            result[f"class_{metric}"] = {name: np.nanmean([img[j][k] for img in per_class])
                                         for j, name in enumerate(class_names)}
            tm, tb = {}, {}
            for tissue in tissue_names:
                idx = [i for i, x in enumerate(types) if x == tissue]
                tm[tissue] = np.nanmean([m_each[i] for i in idx])
                tb[tissue] = np.nanmean([b_each[i] for i in idx])
            result[f"m{metric}"] = np.nanmean(list(tm.values()))
            result[f"b{metric}"] = np.nanmean(list(tb.values()))
            if metric == "PQ":
                result["tissue_mPQ"], result["tissue_bPQ"] = tm, tb
                result["per_image_bPQ"], result["per_image_mPQ"] = b_each, m_each
    return result
