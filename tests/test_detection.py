"""Detection / classification by HoVer-Net's protocol (tsfd_jax/metrics/detection.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from tsfd_jax.metrics.detection import (centroids_from_instances, detection_stats,
                                        instances_from_pannuke, pair_coordinates)
from tsfd_jax.postprocess import to_pannuke_layout

NAMES = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")


def pts(*rows):
    """(x, y, class) rows -> (centroids, classes)."""
    a = np.asarray(rows, np.float64).reshape(-1, 3)
    return a[:, :2], a[:, 2].astype(int)


EMPTY = (np.zeros((0, 2)), np.zeros(0, int))
# One image: a pair exactly at the radius (12.0, kept), one just beyond (12.5, dropped), a pair
# with the wrong class, an unmatched prediction.
TRUE_1 = pts((10, 10, 1), (50, 50, 2), (100, 100, 3))
PRED_1 = pts((22, 10, 1), (50, 62.5, 2), (100, 100, 1), (200, 200, 4))


def test_hand_computed_case():
    d = detection_stats([TRUE_1], [PRED_1], radius=12.0, num_classes=5)
    assert (d["TP"], d["FP"], d["FN"]) == (2, 2, 1)
    assert d["F1d"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))     # 4/7
    assert d["Pd"] == pytest.approx(2 / 4) and d["Rd"] == pytest.approx(2 / 3)
    assert d["acc_type"] == pytest.approx(1 / 2)
    neo, inf, con, dead, epi = (d["per_class"][n] for n in NAMES)
    # Neoplastic: paired (1,1) TP, (3,1) FP -> F1 = 2*1 / (2*1 + 2*1) = 0.5
    assert (neo["TP"], neo["FP"], neo["FN"], neo["FP_d"], neo["FN_d"]) == (1, 1, 0, 0, 0)
    assert neo["F1"] == pytest.approx(0.5)
    assert neo["P"] == pytest.approx(1 / 3) and neo["R"] == pytest.approx(1.0)
    # Inflammatory: one unpaired GT and one unpaired prediction -> F1 = 0 / (1 + 1) = 0
    assert (inf["FP_d"], inf["FN_d"], inf["F1"]) == (1, 1, 0.0)
    # Connective: its only nucleus was called Neoplastic -> FN 1, F1 0
    assert (con["FN"], con["F1"]) == (1, 0.0)
    assert dead["F1"] == 0.0 and dead["P"] == 0.0 and math.isnan(dead["R"])
    assert all(math.isnan(epi[k]) for k in ("F1", "P", "R"))
    # F1 is the harmonic mean of the derived P and R.
    assert neo["F1"] == pytest.approx(2 * neo["P"] * neo["R"] / (neo["P"] + neo["R"]))


def test_radius_edge():
    t = pts((0, 0, 1))
    assert detection_stats([t], [pts((12, 0, 1))], radius=12.0)["TP"] == 1
    assert detection_stats([t], [pts((12.001, 0, 1))], radius=12.0)["TP"] == 0
    assert detection_stats([t], [pts((12.001, 0, 1))], radius=13.0)["TP"] == 1


def test_empty_images_dummy_centroid():
    # Both empty: HoVer-Net's dummy nuclei (0, 0) pair with each other.
    d = detection_stats([TRUE_1, EMPTY], [PRED_1, EMPTY])
    assert (d["TP"], d["FP"], d["FN"]) == (3, 2, 1)
    assert d["F1d"] == pytest.approx(6 / 9) and d["acc_type"] == pytest.approx(2 / 3)
    # Empty truth, one prediction near the corner: it pairs with the dummy (class 0), which
    # makes it a class false positive instead of an unmatched detection.
    d = detection_stats([EMPTY], [pts((5, 5, 2))])
    assert (d["TP"], d["FP"], d["FN"]) == (1, 0, 0)
    assert d["per_class"]["Inflammatory"]["FP"] == 1
    d = detection_stats([EMPTY], [pts((5, 5, 2))], empty_image_dummy=False)
    assert (d["TP"], d["FP"], d["FN"]) == (0, 1, 0)
    assert d["per_class"]["Inflammatory"]["FP_d"] == 1
    d = detection_stats([EMPTY, TRUE_1], [EMPTY, PRED_1], empty_image_dummy=False)
    assert (d["TP"], d["FP"], d["FN"]) == (2, 2, 1)


# ---- against HoVer-Net's aggregation written out -----------------------------------------------

def hovernet_reference(true_list, pred_list, radius=12.0, types=(1, 2, 3, 4, 5)):
    paired_all, ut_all, up_all, tt_all, pt_all = [], [], [], [], []
    t_off = p_off = 0
    for idx, ((tc, tk), (pc, pk)) in enumerate(zip(true_list, pred_list)):
        tc, pc = np.asarray(tc, np.float32), np.asarray(pc, np.float32)
        tk, pk = np.asarray(tk, np.int32), np.asarray(pk, np.int32)
        if tc.shape[0] == 0:
            tc, tk = np.array([[0, 0]]), np.array([0])
        if pc.shape[0] == 0:
            pc, pk = np.array([[0, 0]]), np.array([0])
        dist = cdist(tc, pc, metric="euclidean")
        a, b = linear_sum_assignment(dist)
        ok = dist[a, b] <= radius
        paired = np.concatenate([a[ok, None], b[ok, None]], -1)
        unpaired_t = np.delete(np.arange(tc.shape[0]), a[ok])
        unpaired_p = np.delete(np.arange(pc.shape[0]), b[ok])
        if idx != 0:
            t_off += tt_all[-1].shape[0]
            p_off += pt_all[-1].shape[0]
        tt_all.append(tk)
        pt_all.append(pk)
        if paired.shape[0]:
            paired_all.append(paired + [t_off, p_off])
        ut_all.append(unpaired_t + t_off)
        up_all.append(unpaired_p + p_off)
    paired_all = np.concatenate(paired_all) if paired_all else np.zeros((0, 2), int)
    tt_all, pt_all = np.concatenate(tt_all), np.concatenate(pt_all)
    ptt, ppt = tt_all[paired_all[:, 0]], pt_all[paired_all[:, 1]]
    utt, upt = tt_all[np.concatenate(ut_all)], pt_all[np.concatenate(up_all)]
    out = {"F1d": 2 * len(ptt) / (2 * len(ptt) + len(upt) + len(utt)),
           "acc_type": (ptt == ppt).sum() / len(ptt)}
    for c in types:
        sel = (ptt == c) | (ppt == c)
        t, p = ptt[sel], ppt[sel]
        tp = ((t == c) & (p == c)).sum()
        tn = ((t != c) & (p != c)).sum()
        fp = ((t != c) & (p == c)).sum()
        fn = ((t == c) & (p != c)).sum()
        den = 2 * (tp + tn) + 2 * fp + 2 * fn + (upt == c).sum() + (utt == c).sum()
        out[c] = 2 * (tp + tn) / den if den else float("nan")
    return out


def test_matches_hovernet_reference_on_random_sets():
    rng = np.random.default_rng(0)
    for _ in range(10):
        true_list, pred_list = [], []
        for _ in range(rng.integers(1, 6)):
            n = rng.integers(0, 15)
            tc = rng.uniform(0, 64, (n, 2))
            tk = rng.integers(1, 6, n)
            keep = rng.random(n) < 0.8
            pc = np.concatenate([tc[keep] + rng.normal(0, 6, (keep.sum(), 2)),
                                 rng.uniform(0, 64, (rng.integers(0, 4), 2))])
            pk = np.concatenate([np.where(rng.random(keep.sum()) < 0.7, tk[keep],
                                          rng.integers(1, 6, keep.sum())),
                                 rng.integers(1, 6, len(pc) - keep.sum())])
            true_list.append((tc, tk))
            pred_list.append((pc, pk))
        ours = detection_stats(true_list, pred_list)
        ref = hovernet_reference(true_list, pred_list)
        assert ours["F1d"] == pytest.approx(ref["F1d"], abs=1e-12)
        assert ours["acc_type"] == pytest.approx(ref["acc_type"], abs=1e-12)
        for c, name in enumerate(NAMES, start=1):
            a, b = ours["per_class"][name]["F1"], ref[c]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def test_pair_coordinates_unpaired_and_empty():
    pairs, ua, ub = pair_coordinates(np.array([[0, 0], [100, 100]]), np.array([[1, 1]]), 12)
    assert pairs.tolist() == [[0, 0]] and ua.tolist() == [1] and ub.tolist() == []
    pairs, ua, ub = pair_coordinates(np.zeros((0, 2)), np.array([[1, 1]]), 12)
    assert pairs.shape == (0, 2) and ua.tolist() == [] and ub.tolist() == [0]


def test_centroids_from_masks():
    inst = np.zeros((20, 30), np.int32)
    inst[2:5, 3:8] = 1          # centre x = 5, y = 3
    inst[10:20, 20:22] = 3      # id 2 absent; centre x = 20.5, y = 14.5
    classes = np.array([4, 1, 2])
    c, k = centroids_from_instances(inst, classes)
    np.testing.assert_allclose(c, [[5, 3], [20.5, 14.5]])
    assert k.tolist() == [4, 2]
    c2, k2 = instances_from_pannuke(to_pannuke_layout(inst, classes, 5))
    order = np.argsort(k2)
    np.testing.assert_allclose(c2[order], [[20.5, 14.5], [5, 3]])
    assert k2[order].tolist() == [2, 4] and c2.dtype == np.float32
    e_c, e_k = instances_from_pannuke(np.zeros((8, 8, 6)))
    assert e_c.shape == (0, 2) and e_k.shape == (0,)


# ---- the report's other metrics (tissue head, pixels) -------------------------------------------

def test_tissue_stats():
    from tsfd_jax.metrics.tissue import tissue_stats

    true = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 1])
    s = tissue_stats(true, pred, ["A", "B", "C", "D"])
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["confusion"] == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert s["recall"] == {"A": 0.5, "B": pytest.approx(2 / 3), "C": 0.0, "D": None}
    assert s["precision"]["B"] == pytest.approx(2 / 4) and s["precision"]["C"] is None
    with pytest.raises(ValueError):
        tissue_stats(np.array([4]), np.array([0]), ["A", "B"])


def test_pixel_metrics_against_brute_force():
    from tsfd_jax.metrics.pixel import dice, pixel_prf, pr_curve

    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    res = pixel_prf(t, p, 3)
    for c in (1, 2, 3):
        tp, fp, fn = ((t == c) & (p == c)).sum(), ((t != c) & (p == c)).sum(), ((t == c) & (p != c)).sum()
        r = res[f"class{c}"]
        assert r["P"] == pytest.approx(tp / (tp + fp)) and r["R"] == pytest.approx(tp / (tp + fn))
        assert r["F1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert dice(t == c, p == c) == pytest.approx(r["F1"])
    scores, labels = np.round(rng.random(300), 2), rng.random(300) < 0.3
    precision, recall, thresholds = pr_curve(scores, labels)
    assert precision[-1] == 1.0 and recall[-1] == 0.0 and np.all(np.diff(thresholds) > 0)
    for P, R, th in zip(precision, recall, thresholds):
        sel = scores >= th
        assert P == pytest.approx((sel & labels).sum() / sel.sum())
        assert R == pytest.approx((sel & labels).sum() / labels.sum())
