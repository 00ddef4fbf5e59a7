"""Whole-image instance metrics of the nuclei literature: Dice, AJI, AJI+ and per-image PQ.

Inputs are one image's instance maps: 2-D integer arrays of one shape, 0 = background, every
other value one instance (ids arbitrary non-negative integers, gaps allowed). T_i are the true
instances, P_j the predicted ones, |.| counts pixels.

- **Dice** (HoVer-Net's ``get_dice_1``) of the foregrounds A = {t > 0}, B = {p > 0}:
  2 |A ∩ B| / (|A| + |B|).
- **AJI** (Kumar et al., IEEE TMI 2017): every true instance T_i takes the predicted instance
  P_j* of highest IoU among those it overlaps (a predicted instance may serve several true
  ones); the unused predicted instances U join the denominator:
  AJI = Σ_i |T_i ∩ P_j*| / (Σ_i |T_i ∪ P_j*| + Σ_{P ∈ U} |P|).
  A true instance that overlaps nothing adds |T_i| to the denominator only. IoU ties go to the
  larger intersection, then to the smaller predicted id: the choice HoVer-Net's
  ``get_fast_aji`` makes (its argmax over inter / (union + 1e-6)).
- **AJI+** (Graham et al., HoVer-Net, MedIA 2019): the same sums over a one-to-one pairing,
  the assignment of maximal total IoU (Hungarian); pairs of zero IoU are dropped, and all
  unpaired true and predicted instances join the denominator. As in HoVer-Net's
  ``get_fast_aji_plus`` the assignment weights are inter / (union + 1e-6): between pairings
  of equal total IoU that favours the larger overlaps.
- **DQ, SQ, PQ** per image: ``tsfd_jax.metrics.pq.get_fast_pq`` (the official HoVer-Net /
  PanNuke ``get_fast_pq``, pairs of IoU > ``match_iou``).

Empty maps. Both empty: Dice, AJI, AJI+, DQ, SQ and PQ are NaN (HoVer-Net divides 0 by 0;
the image says nothing about segmentation, and ``mean_scores`` skips it). Exactly one empty:
all are 0.

Speed: one sparse contingency table (the overlapping (true, pred) pairs and their pixel
counts, from one bincount or sort of the pixels where both maps are set) replaces the
per-instance full-image masks of the reference code; the Hungarian step of AJI+ runs per
connected group of overlapping instances, not on the whole (K_true, K_pred) matrix.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tsfd_jax.metrics.pq import get_fast_pq

__all__ = ["dice_binary", "aji", "aji_plus", "pq_image", "binary_scores", "mean_scores"]

# Largest (K_true x K_pred) table counted densely by one bincount; larger ones by a sort.
_DENSE_LIMIT = 1 << 22
# Ids up to this value are counted with a bincount look-up table; larger ones by a sort.
_LUT_LIMIT = 1 << 24
# HoVer-Net's IoU denominator offset, kept in the AJI+ assignment weights (tie-breaking only).
_EPS = 1.0e-6
# get_fast_pq works on ids that fit in 32 bits (signed).
_PQ_ID_LIMIT = (1 << 31) - 1


# ---- input checks ------------------------------------------------------------------------------

def _check(true_inst: np.ndarray, pred_inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as flat int64 arrays, after the checks every public function makes."""
    true_inst, pred_inst = np.asarray(true_inst), np.asarray(pred_inst)
    for name, x in (("true_inst", true_inst), ("pred_inst", pred_inst)):
        # bool is not an instance map (a semantic mask would silently become one instance).
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{name} must be an integer instance map; got dtype {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (H, W); got shape {x.shape}")
    if true_inst.shape != pred_inst.shape:
        raise ValueError(f"true_inst and pred_inst shapes differ: {true_inst.shape} vs "
                         f"{pred_inst.shape}")
    out = []
    for name, x in (("true_inst", true_inst), ("pred_inst", pred_inst)):
        if x.size and x.dtype.kind == "i" and x.min() < 0:
            raise ValueError(f"{name} has negative ids; instance ids must be >= 0")
        if x.size and x.dtype.kind == "u" and int(x.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name} has ids beyond int64")
        out.append(x.astype(np.int64, copy=False).reshape(-1))
    return out[0], out[1]


# ---- the sparse core ---------------------------------------------------------------------------

class _Instances:
    """The instances of one flat map: sorted ids, their pixel counts, and a rank look-up."""

    def __init__(self, flat: np.ndarray):
        fg = flat[flat != 0]
        hi = int(fg.max()) if fg.size else 0
        self.lut = None
        if hi <= _LUT_LIMIT:
            counts = np.bincount(fg, minlength=hi + 1)
            self.ids = np.flatnonzero(counts)  # counts[0] == 0: fg holds no background
            self.size = counts[self.ids]
            self.lut = np.zeros(hi + 1, np.int64)
            self.lut[self.ids] = np.arange(len(self.ids))
        else:
            self.ids, self.size = np.unique(fg, return_counts=True)
        self.n = len(self.ids)

    def rank(self, values: np.ndarray) -> np.ndarray:
        """0-based rank of each (present, non-zero) id among the sorted ids."""
        if self.lut is not None:
            return self.lut[values]
        return np.searchsorted(self.ids, values)


class _Table:
    """Sparse contingency table of one image: every overlapping (true, pred) pair with its
    intersection and union, plus the instance sizes. Pairs are ordered by (true, pred) rank."""

    def __init__(self, t: np.ndarray, p: np.ndarray):
        self.t, self.p = _Instances(t), _Instances(p)
        both = (t != 0) & (p != 0)
        rt, rp = self.t.rank(t[both]), self.p.rank(p[both])
        key = rt * self.p.n + rp                     # (true rank, pred rank) of every pixel
        cells = self.t.n * self.p.n
        if cells <= _DENSE_LIMIT:
            counts = np.bincount(key, minlength=cells)
            cell = np.flatnonzero(counts)
            inter = counts[cell]
        else:                                        # too many cells for a dense count
            cell, inter = np.unique(key, return_counts=True)
        self.a, self.b = np.divmod(cell, max(self.p.n, 1))
        self.inter = inter.astype(np.int64)
        self.union = self.t.size[self.a] + self.p.size[self.b] - self.inter
        # Orders pairs exactly: distinct ratios of pixel counts (< 10^7 px) differ far above
        # float64 rounding, and equal ratios give equal (correctly rounded) quotients.
        self.iou = self.inter / self.union

    def score(self, keep: np.ndarray) -> float:
        """Σ inter / (Σ union + unpaired true and pred areas) for the chosen pairs ``keep``
        (indices into the table; a predicted instance may appear in several pairs)."""
        if self.t.n == 0 and self.p.n == 0:
            return float("nan")
        used_t = np.zeros(self.t.n, bool)
        used_t[self.a[keep]] = True
        used_p = np.zeros(self.p.n, bool)
        used_p[self.b[keep]] = True
        inter = int(self.inter[keep].sum())
        union = (int(self.union[keep].sum()) + int(self.t.size[~used_t].sum())
                 + int(self.p.size[~used_p].sum()))
        return inter / union


def _best_per_group(group: np.ndarray, iou: np.ndarray, inter: np.ndarray, a: np.ndarray,
                    b: np.ndarray) -> np.ndarray:
    """Index of the best pair within each group of table entries: highest IoU, then largest
    intersection, then smallest true and predicted rank (for AJI, whose groups are the true
    instances, HoVer-Net's argmax over inter / (union + 1e-6) picks the same pair)."""
    order = np.lexsort((b, a, -inter, -iou, group))
    g = group[order]
    first = np.ones(len(g), bool)
    first[1:] = g[1:] != g[:-1]
    return order[first]


def _aji(table: _Table) -> float:
    keep = _best_per_group(table.a, table.iou, table.inter, table.a, table.b)
    return table.score(keep)


def _aji_plus(table: _Table) -> float:
    """Maximal-IoU one-to-one pairing, solved per connected component of the overlap graph:
    pairs of zero IoU never count, so the components' optima together are the global one."""
    nt, n_p, m = table.t.n, table.p.n, len(table.a)
    if m == 0:
        return table.score(np.zeros(0, np.int64))
    graph = coo_matrix((np.ones(m), (table.a, nt + table.b)), shape=(nt + n_p, nt + n_p))
    _, label = connected_components(graph, directed=False)
    comp = label[table.a]                                  # component of every pair
    k_true = np.bincount(label[:nt], minlength=label.max() + 1)[comp]
    k_pred = np.bincount(label[nt:], minlength=label.max() + 1)[comp]
    # Stars (one true or one predicted instance): the optimum is the single best pair.
    star = (k_true == 1) | (k_pred == 1)
    star_idx = np.flatnonzero(star)
    chosen = [star_idx[_best_per_group(comp[star], table.iou[star], table.inter[star],
                                       table.a[star], table.b[star])]]
    # Larger components: Hungarian on their dense IoU matrix (rows and columns in id order).
    rest = np.flatnonzero(~star)
    if len(rest):
        rest = rest[np.argsort(comp[rest], kind="stable")]
        bounds = np.flatnonzero(np.diff(comp[rest])) + 1
        for idx in np.split(rest, bounds):
            rows, ri = np.unique(table.a[idx], return_inverse=True)
            cols, ci = np.unique(table.b[idx], return_inverse=True)
            dense = np.zeros((len(rows), len(cols)))
            # HoVer-Net's weights: the 1e-6 only breaks ties of total IoU (towards larger
            # overlaps), as it does there.
            dense[ri, ci] = table.inter[idx] / (table.union[idx] + _EPS)
            lookup = np.full(dense.shape, -1, np.int64)
            lookup[ri, ci] = idx
            r, c = linear_sum_assignment(dense, maximize=True)
            picked = lookup[r, c]
            chosen.append(picked[picked >= 0])             # drop zero-IoU assignments
    keep = np.concatenate(chosen)
    return table.score(keep)


def _dice(t: np.ndarray, p: np.ndarray) -> float:
    ft, fp = t != 0, p != 0
    denom = int(ft.sum()) + int(fp.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(ft & fp)) / denom


def _pq(t: np.ndarray, p: np.ndarray, shape: tuple[int, ...], match_iou: float) -> dict:
    # get_fast_pq takes 32-bit ids; larger ones are renumbered (PQ does not depend on ids).
    maps = []
    for x in (t, p):
        if x.size and int(x.max()) > _PQ_ID_LIMIT:
            x = np.where(x != 0, np.unique(x, return_inverse=True)[1].reshape(-1) + 1, 0)
        maps.append(x.reshape(shape))
    (dq, sq, pq), (paired_true, _, unpaired_true, unpaired_pred) = get_fast_pq(
        maps[0], maps[1], match_iou)
    return {"dq": float(dq), "sq": float(sq), "pq": float(pq), "tp": int(len(paired_true)),
            "fp": int(len(unpaired_pred)), "fn": int(len(unpaired_true))}


# ---- public API --------------------------------------------------------------------------------

def dice_binary(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Dice of the two foregrounds, 2 |A ∩ B| / (|A| + |B|) (HoVer-Net's ``get_dice_1``).

    Both maps empty: NaN (HoVer-Net's 0/0; not 1.0, so that ``mean_scores`` leaves such an
    image out instead of counting it as perfect). One empty: 0.0.
    """
    t, p = _check(true_inst, pred_inst)
    return _dice(t, p)


def aji(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) as HoVer-Net's ``get_fast_aji``.

    Each true instance takes the overlapping predicted instance of highest IoU (ties: larger
    intersection, then smaller predicted id); a predicted instance may be taken several times;
    predicted instances taken by none and true instances that overlap nothing add their areas
    to the union. Both maps empty: NaN. One empty: 0.0 (HoVer-Net's code fails when only the
    prediction is empty; the formula gives 0).
    """
    t, p = _check(true_inst, pred_inst)
    return _aji(_Table(t, p))


def aji_plus(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """AJI+ (Graham et al. 2019) as HoVer-Net's ``get_fast_aji_plus``: the pairing is the
    one-to-one assignment of maximal total IoU (Hungarian on inter / (union + 1e-6), which
    among pairings of equal total IoU favours larger overlaps; remaining exact ties are the
    solver's choice), pairs of zero IoU dropped; every unpaired true and predicted instance
    adds its area to the union. Both maps empty: NaN. One empty: 0.0."""
    t, p = _check(true_inst, pred_inst)
    return _aji_plus(_Table(t, p))


def pq_image(true_inst: np.ndarray, pred_inst: np.ndarray, match_iou: float = 0.5) -> dict:
    """DQ, SQ, PQ and TP, FP, FN of one image by ``tsfd_jax.metrics.pq.get_fast_pq`` (pairs of
    IoU > ``match_iou``; DQ = TP / (TP + FP/2 + FN/2), SQ = Σ IoU / (TP + 1e-6)). Both maps
    empty: dq, sq, pq NaN; one empty: 0.0."""
    t, p = _check(true_inst, pred_inst)
    return _pq(t, p, np.shape(true_inst), match_iou)


def binary_scores(true_inst: np.ndarray, pred_inst: np.ndarray) -> dict[str, float]:
    """{"dice", "aji", "aji_plus", "dq", "sq", "pq"} of one image (PQ at IoU > 0.5), the
    instance scores HoVer-Net reports per image for CoNSeP/Kumar; one contingency table serves
    AJI and AJI+."""
    t, p = _check(true_inst, pred_inst)
    table = _Table(t, p)
    pq = _pq(t, p, np.shape(true_inst), 0.5)
    return {"dice": _dice(t, p), "aji": _aji(table), "aji_plus": _aji_plus(table),
            "dq": pq["dq"], "sq": pq["sq"], "pq": pq["pq"]}


def mean_scores(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean over images of per-image score dicts (as HoVer-Net reports CoNSeP: the mean of the
    per-image values, not a pooled ratio). NaN-aware: an image whose value is NaN (both maps
    empty) or missing is left out of that key's mean; a key NaN in every image stays NaN.
    HoVer-Net's own script takes a plain mean, which agrees whenever no value is NaN."""
    if len(scores) == 0:
        raise ValueError("mean_scores needs at least one image")
    keys: list[str] = []
    for s in scores:
        keys += [k for k in s if k not in keys]
    out = {}
    for k in keys:
        values = np.array([float(s.get(k, np.nan)) for s in scores], np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: NaN, as intended
            out[k] = float(np.nanmean(values))
    return out
