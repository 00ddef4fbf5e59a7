"""Panoptic quality by the official PanNuke protocol (PanNuke-metrics run.py + utils.py).

PQ = DQ x SQ with DQ = TP / (TP + FP/2 + FN/2) and SQ = sum of matched IoUs / (TP + 1e-6);
a ground-truth and a predicted instance match when their IoU > ``match_iou`` (0.5: such pairs are
unique, no assignment needed; below 0.5 a Hungarian assignment on the IoU matrix comes first).

Per image ``i``: bPQ_i on the binarised masks (all class channels merged, later channels overwrite
earlier ones), NaN if the ground truth has no nucleus; PQ_ij per class channel ``j``, NaN if the
ground-truth channel is empty (false positives in it are then ignored), 0 if only the prediction
is empty. mPQ_i = nanmean_j PQ_ij. A tissue's value is the nanmean over its images, the reported
mPQ / bPQ the nanmean over the tissues; the per-class PQ is the nanmean over all images.

The official code loops over instances and builds one full-size mask per instance. Here only the
nucleus pixels of a chunk of images are gathered once; instances are numbered by one sort of
their (image, channel, id) keys and every contingency table of the chunk comes from one
``np.bincount``. The numbers are the official ones (tests/pannuke_reference.py checks it).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from tsfd_jax.constants import PANNUKE_CLASSES, PANNUKE_TISSUES

# Largest dense contingency table (entries) built in one bincount; larger inputs use a sort.
_DENSE_LIMIT = 1 << 22
# Images handled together (bounds the (chunk, H, W, C) temporaries).
_CHUNK = 32
# Instance keys: (segment << 33) + (id + 2**32); ids must fit in 32 bits (signed).
_SHIFT = 33
_OFFSET = 1 << 32


def _as_int(x: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
        x = x.astype(np.int64, copy=False)
    else:
        if not np.all(np.isfinite(x)) or np.any(x != np.trunc(x)):
            raise ValueError("instance masks must hold whole numbers")
        x = x.astype(np.int64)
    if x.size and (x.min() < -_OFFSET or x.max() >= _OFFSET):
        raise ValueError("instance ids must fit in 32 bits")
    return x


# ---- instance maps ---------------------------------------------------------------------------

def remap_label(pred: np.ndarray) -> np.ndarray:
    """Contiguous ids 1..K keeping the order of the original ids, 0 stays 0 (official
    ``remap_label(by_size=False)``; any non-zero value, negative ones included, is an instance).
    (H, W) int -> (H, W) int32."""
    pred = np.asarray(pred)
    values, inverse = np.unique(pred, return_inverse=True)
    nonzero = values != 0
    rank = np.cumsum(nonzero) * nonzero
    return rank[inverse.reshape(pred.shape)].astype(np.int32)


def binarize(x: np.ndarray) -> np.ndarray:
    """Official PanNuke ``binarize``: (H, W, C) per-class instance channels -> (H, W) int32
    map of all nuclei, ids renumbered 1..K.

    The official loop walks channel 0..C-1 and each channel's ids in ascending order, giving
    every instance the next number and overwriting earlier ones: a pixel keeps the instance of
    its LAST non-zero channel. Instances overwritten completely would leave gaps, which the
    official ``get_fast_pq`` cannot handle; they are closed here (as the TSFD authors' copy does).
    """
    x = _as_int(np.asarray(x))
    H, W, C = x.shape
    key = np.where(x != 0, (np.arange(C) << _SHIFT) + x + _OFFSET, 0)  # (channel, id) order
    nonzero = x != 0
    last = (C - 1) - np.argmax(nonzero[..., ::-1], axis=-1)
    top = np.where(nonzero.any(-1), np.take_along_axis(key, last[..., None], -1)[..., 0], 0)
    return remap_label(top)


# ---- the sparse core -------------------------------------------------------------------------

def _unique_inverse(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(key, return_inverse=True)`` for int64 keys that come nearly sorted (runs of
    one instance): a stable argsort (timsort) is about 10x faster here than unique's sort."""
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    new = np.ones(len(key), bool)
    new[1:] = ordered[1:] != ordered[:-1]
    inverse = np.empty(len(key), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


class _Sparse:
    """The non-zero class entries of a chunk of masks (n, H, W, >= C).

    Entries are (image, pixel, channel) sorted; every distinct (image, channel, id) is an
    instance, numbered 0..G-1 in (image, channel, id) order = the official numbering.
    """

    def __init__(self, chunk: np.ndarray, C: int):
        chunk = np.ascontiguousarray(chunk)
        n, H, W, ct = chunk.shape
        self.flat, self.ct, self.C, self.P, self.n = chunk.reshape(-1), ct, C, H * W, n
        # A contiguous comparison and a strided clear are ~3x faster than comparing the
        # strided channel slice; the result indexes the original (n, H, W, ct) layout.
        nonzero = chunk != 0
        nonzero[..., C:] = False
        f = np.flatnonzero(nonzero)
        self.values = _as_int(self.flat[f])
        self.pix, self.ch = f // ct, f % ct                                # global pixel, channel
        self.seg = self.pix // self.P * C + self.ch                        # image * C + channel
        self.keys, self.g = _unique_inverse((self.seg << _SHIFT) + self.values + _OFFSET)
        self.seg_of = self.keys >> _SHIFT                                 # (G,)
        self.K = np.bincount(self.seg_of, minlength=n * C)                # per (image, channel)
        self.start = np.cumsum(self.K) - self.K
        self.size = np.bincount(self.g, minlength=len(self.keys))
        # Binarised map: the entry of a pixel's last non-zero channel wins (official overwrite).
        pix = self.pix
        win = np.ones(len(pix), bool)
        win[:-1] = pix[1:] != pix[:-1]
        self.bin_pix, self.bin_g = pix[win], self.g[win]
        bsize = np.bincount(self.bin_g, minlength=len(self.keys))
        present = np.flatnonzero(bsize)                                   # closes the gaps
        self.bin_lut = np.full(len(self.keys), -1, np.int64)
        self.bin_lut[present] = np.arange(len(present))
        self.bin_size = bsize[present]
        self.bin_K = np.bincount(self.seg_of[present] // C, minlength=n)
        self.bin_start = np.cumsum(self.bin_K) - self.bin_K


def _contingency(nseg, kt, kp, seg, rt, rp):
    """Sparse contingency tables: (segment, true rank, pred rank, count) of every overlapping
    pair, from one entry per overlapping pixel; ordered by segment, true rank, pred rank."""
    table = kt.astype(np.int64) * kp
    total = int(table.sum())
    if total <= _DENSE_LIMIT:
        off = np.cumsum(table) - table
        counts = np.bincount(off[seg] + rt * kp[seg] + rp, minlength=total)
        k = np.flatnonzero(counts)
        s = np.searchsorted(off, k, side="right") - 1  # 'right': skips empty tables
        r = k - off[s]
        return s, r // kp[s], r % kp[s], counts[k]
    keys, counts = np.unique(np.stack([seg, rt, rp]), axis=1, return_counts=True)
    return keys[0], keys[1], keys[2], counts


def _match(nseg, kt, kp, size_t, size_p, start_t, start_p, seg, rt, rp, match_iou, pairs=False):
    """TP and sum of matched IoU per segment (official pairing rule)."""
    s, a, b, inter = _contingency(nseg, kt, kp, seg, rt, rp)
    iou = inter / (size_t[start_t[s] + a] + size_p[start_p[s] + b] - inter)
    if match_iou >= 0.5:
        hit = iou > match_iou  # such pairs are unique: no assignment needed
    else:
        hit = np.zeros(len(iou), bool)
        bounds = np.searchsorted(s, np.arange(nseg + 1))
        for seg_id in np.flatnonzero(np.diff(bounds)):  # Hungarian on the dense IoU matrix
            lo, hi = bounds[seg_id], bounds[seg_id + 1]
            dense = np.zeros((int(kt[seg_id]), int(kp[seg_id])))
            dense[a[lo:hi], b[lo:hi]] = iou[lo:hi]
            rows, cols = linear_sum_assignment(-dense)
            chosen = dense[rows, cols] > match_iou
            where = {(x, y): lo + j for j, (x, y) in enumerate(zip(a[lo:hi], b[lo:hi]))}
            for x, y in zip(rows[chosen], cols[chosen]):
                hit[where[(x, y)]] = True
    tp = np.bincount(s[hit], minlength=nseg)
    iou_sum = np.bincount(s[hit], weights=iou[hit], minlength=nseg)
    if pairs:
        return tp, iou_sum, (s[hit], a[hit], b[hit])
    return tp, iou_sum


def _chunk_stats(true: np.ndarray, pred: np.ndarray, C: int, match_iou: float):
    """(n, C + 1) TP, FP, FN, IoU sum and the 'single value' flag for one chunk of images."""
    t, p = _Sparse(true, C), _Sparse(pred, C)
    n, P = t.n, t.P
    # Class maps: the predicted id at every true entry, looked up among the predicted instances.
    pv = _as_int(p.flat[t.pix * p.ct + t.ch])
    both = pv != 0
    seg = t.seg[both]
    gp = np.searchsorted(p.keys, (seg << _SHIFT) + pv[both] + _OFFSET)
    gt = t.g[both]
    tp_c, iou_c = _match(n * C, t.K, p.K, t.size, p.size, t.start, p.start,
                         seg, gt - t.start[seg], gp - p.start[seg], match_iou)
    # Binarised maps: the predicted winner at every true winner pixel (both pixel lists sorted).
    at = np.minimum(np.searchsorted(p.bin_pix, t.bin_pix), max(len(p.bin_pix) - 1, 0))
    hit = p.bin_pix[at] == t.bin_pix if len(p.bin_pix) else np.zeros(len(t.bin_pix), bool)
    q = p.bin_lut[p.bin_g[at[hit]]]
    bt = t.bin_lut[t.bin_g[hit]]
    img = t.bin_pix[hit] // P
    tp_b, iou_b = _match(n, t.bin_K, p.bin_K, t.bin_size, p.bin_size, t.bin_start, p.bin_start,
                         img, bt - t.bin_start[img], q - p.bin_start[img], match_iou)
    kt = np.concatenate([t.K.reshape(n, C), t.bin_K[:, None]], 1)
    kp = np.concatenate([p.K.reshape(n, C), p.bin_K[:, None]], 1)
    tp = np.concatenate([tp_c.reshape(n, C), tp_b[:, None]], 1)
    iou_sum = np.concatenate([iou_c.reshape(n, C), iou_b[:, None]], 1)
    # Official NaN rule: the ground-truth map holds a single value (np.unique(...) == 1),
    # i.e. no instance, or one instance covering the whole image.
    cover_c = np.zeros(n * C, bool)
    one = np.flatnonzero(t.K == 1)
    cover_c[one] = t.size[t.start[one]] == P
    cover_b = np.zeros(n, bool)
    one = np.flatnonzero(t.bin_K == 1)
    cover_b[one] = t.bin_size[t.bin_start[one]] == P
    single = (kt == 0) | np.concatenate([cover_c.reshape(n, C), cover_b[:, None]], 1)
    return tp, kp - tp, kt - tp, iou_sum, single


def _pq_terms(tp, fp, fn, iou_sum):
    with np.errstate(divide="ignore", invalid="ignore"):
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / (tp + 1.0e-6)
    return dq, sq, dq * sq


def get_fast_pq(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5):
    """PQ of two (H, W) instance maps: ``([dq, sq, pq], [paired_true, paired_pred,
    unpaired_true, unpaired_pred])`` as the official function (ids are those of the inputs,
    which need not be contiguous here). Both maps empty: NaN (the official code divides by 0)."""
    if match_iou < 0:
        raise ValueError("match_iou can't be negative")
    true, pred = np.asarray(true), np.asarray(pred)
    t, p = _Sparse(true[None, ..., None], 1), _Sparse(pred[None, ..., None], 1)
    pv = _as_int(p.flat[t.pix])
    both = pv != 0
    gp = np.searchsorted(p.keys, pv[both] + _OFFSET)
    tp, iou_sum, (_, a, b) = _match(1, t.K, p.K, t.size, p.size, t.start, p.start,
                                    np.zeros(int(both.sum()), np.int64), t.g[both], gp,
                                    match_iou, pairs=True)
    dq, sq, pq = (float(v[0]) for v in _pq_terms(tp, p.K - tp, t.K - tp, iou_sum))
    if t.K[0] == 0 and p.K[0] == 0:
        dq = sq = pq = float("nan")
    t_ids, p_ids = t.keys - _OFFSET, p.keys - _OFFSET
    return ([dq, sq, pq], [t_ids[a], p_ids[b], np.delete(t_ids, a), np.delete(p_ids, b)])


# ---- the protocol ----------------------------------------------------------------------------

def per_image_stats(true_masks: np.ndarray, pred_masks: np.ndarray, num_classes: int,
                    match_iou: float = 0.5) -> dict[str, np.ndarray]:
    """Per image and map (class channels 0..C-1, then the binarised map at index C): DQ, SQ, PQ
    (N, C + 1) float64 with the official NaN rule, and TP/FP/FN (N, C + 1) int64.

    ``true_masks``/``pred_masks``: (N, H, W, >= C) PanNuke layout (extra channels ignored);
    memory-mapped arrays are read a chunk of images at a time.
    """
    if true_masks.ndim != 4 or pred_masks.ndim != 4:
        raise ValueError(f"masks must be (N, H, W, C); got {true_masks.shape} and "
                         f"{pred_masks.shape}")
    if true_masks.shape[:3] != pred_masks.shape[:3]:
        raise ValueError(f"true and pred shapes differ: {true_masks.shape} vs {pred_masks.shape}")
    C = num_classes
    if true_masks.shape[-1] < C or pred_masks.shape[-1] < C:
        raise ValueError(f"masks need at least {C} class channels; got {true_masks.shape[-1]} "
                         f"and {pred_masks.shape[-1]}")
    N = true_masks.shape[0]
    names = ("tp", "fp", "fn")
    out = {k: np.zeros((N, C + 1), np.int64) for k in names}
    iou_sum = np.zeros((N, C + 1))
    single = np.zeros((N, C + 1), bool)
    for a in range(0, N, _CHUNK):
        b = min(a + _CHUNK, N)
        tp, fp, fn, isum, one = _chunk_stats(np.asarray(true_masks[a:b]),
                                             np.asarray(pred_masks[a:b]), C, match_iou)
        out["tp"][a:b], out["fp"][a:b], out["fn"][a:b] = tp, fp, fn
        iou_sum[a:b], single[a:b] = isum, one
    dq, sq, pq = _pq_terms(out["tp"], out["fp"], out["fn"], iou_sum)
    for v in (dq, sq, pq):
        v[single] = np.nan
    return {"DQ": dq, "SQ": sq, "PQ": pq, **out}


def _nanmean(x, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, as intended
        return np.nanmean(np.asarray(x, dtype=np.float64), axis=axis)


def _jsonable(values: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.ravel(values)]


def pannuke_pq(true_masks: np.ndarray, pred_masks: np.ndarray,
               types: Sequence[str] | np.ndarray | None,
               class_names: Sequence[str] = PANNUKE_CLASSES,
               tissue_names: Sequence[str] | None = PANNUKE_TISSUES,
               match_iou: float = 0.5, per_image: bool = False) -> dict[str, Any]:
    """The official PanNuke evaluation of a whole split.

    true_masks, pred_masks: (N, H, W, >= C) PanNuke layout (channels 0..C-1 instance ids per
    class; extra channels such as background ignored). types: (N,) tissue name per image (None:
    one tissue "all"). tissue_names: the tissues averaged, in order (None: the sorted distinct
    types); images of other tissues count for the class PQ only, as in run.py.

    Returns mPQ, bPQ (tissue-averaged), mDQ, mSQ, bDQ, bSQ (same averaging), class_PQ/DQ/SQ
    {class: nanmean over all images}, tissue_mPQ/bPQ {tissue: value}, tissue_images {tissue:
    count}, num_images and, with ``per_image``, per-image bPQ, mPQ and class PQ lists (None for
    NaN). Scalars are floats (NaN where undefined).
    """
    stats = per_image_stats(true_masks, pred_masks, len(class_names), match_iou)
    return summarize_pq(stats, types, class_names, tissue_names, match_iou, per_image)


def summarize_pq(stats: dict[str, np.ndarray], types: Sequence[str] | np.ndarray | None,
                 class_names: Sequence[str], tissue_names: Sequence[str] | None = None,
                 match_iou: float = 0.5, per_image: bool = False) -> dict[str, Any]:
    """``pannuke_pq``'s averaging of per-image statistics (``per_image_stats`` rows, which may
    come from images of different sizes, concatenated)."""
    C = len(class_names)
    N = len(stats["PQ"])
    if types is None:
        types = np.full(N, "all")
        tissue_names = ("all",)
    types = np.asarray(types).astype(str)
    if types.shape != (N,):
        raise ValueError(f"types must be ({N},); got {types.shape}")
    if tissue_names is None:
        tissue_names = tuple(sorted(set(types.tolist())))
    result: dict[str, Any] = {"num_images": N, "match_iou": float(match_iou)}
    for metric in ("PQ", "DQ", "SQ"):
        values = stats[metric]
        m_img, b_img = _nanmean(values[:, :C], axis=1), values[:, C]
        tissue_m, tissue_b = {}, {}
        for t in tissue_names:
            sel = types == t
            tissue_m[t] = float(_nanmean(m_img[sel])) if sel.any() else float("nan")
            tissue_b[t] = float(_nanmean(b_img[sel])) if sel.any() else float("nan")
        result[f"m{metric}"] = float(_nanmean(list(tissue_m.values())))
        result[f"b{metric}"] = float(_nanmean(list(tissue_b.values())))
        result[f"class_{metric}"] = {c: float(_nanmean(values[:, j]))
                                     for j, c in enumerate(class_names)}
        if metric == "PQ":
            result["tissue_mPQ"], result["tissue_bPQ"] = tissue_m, tissue_b
            if per_image:
                result["per_image"] = {"bPQ": _jsonable(b_img), "mPQ": _jsonable(m_img),
                                       "class_PQ": [_jsonable(r) for r in values[:, :C]]}
    result["tissue_images"] = {t: int((types == t).sum()) for t in tissue_names}
    result["images_outside_tissues"] = int(N - np.isin(types, list(tissue_names)).sum())
    return result
