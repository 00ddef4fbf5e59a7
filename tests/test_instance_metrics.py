"""Whole-image instance metrics (tsfd_jax/metrics/instance.py): Dice, AJI, AJI+, per-image PQ.

The reference below is written from the papers' definitions (Kumar et al. 2017 for AJI, Graham
et al. 2019 for AJI+ and PQ) as plain loops over instance ids with one boolean mask per
instance, in float64; it shares no code with the module. The package ``cellseg-metrics``
(requirements-dev.txt) is a second, outside reference for Dice, AJI and PQ; it has no AJI+.
"""

from __future__ import annotations

import glob
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.optimize import linear_sum_assignment

from tsfd_jax.metrics.instance import (aji, aji_plus, binary_scores, dice_binary, mean_scores,
                                       pq_image)

TOL = 1e-9
NAN = float("nan")


# ---- the float64 reference -------------------------------------------------------------------

_TABLES: dict = {}


def ref_tables(t: np.ndarray, p: np.ndarray):
    """Ids, areas and the intersection / union matrices (zero where instances do not
    overlap), one boolean mask per instance. Cached: several metrics read one table."""
    key = (t.shape, t.dtype.str, t.tobytes(), p.dtype.str, p.tobytes())
    if key not in _TABLES:
        t_ids = [int(i) for i in np.unique(t) if i != 0]
        p_ids = [int(j) for j in np.unique(p) if j != 0]
        column = {j: b for b, j in enumerate(p_ids)}
        p_masks = [p == j for j in p_ids]
        inter = np.zeros((len(t_ids), len(p_ids)))
        union = np.zeros((len(t_ids), len(p_ids)))
        t_area = np.zeros(len(t_ids))
        for a, i in enumerate(t_ids):
            mt = t == i
            t_area[a] = mt.sum()
            for j in np.unique(p[mt]):  # the predicted instances this nucleus touches
                if j == 0:
                    continue
                mp = p_masks[column[int(j)]]
                inter[a, column[int(j)]] = np.logical_and(mt, mp).sum()
                union[a, column[int(j)]] = np.logical_or(mt, mp).sum()
        p_area = np.array([m.sum() for m in p_masks], np.float64)
        _TABLES.clear()  # one pair at a time is enough
        _TABLES[key] = (t_ids, p_ids, t_area, p_area, inter, union)
    return _TABLES[key]


def ref_dice(t, p):
    a, b = t != 0, p != 0
    denom = float(a.sum() + b.sum())
    return NAN if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def _aggregate(pairs, inter, union, t_area, p_area):
    """Σ inter / (Σ union + areas of the true and predicted instances in no pair)."""
    if len(t_area) == 0 and len(p_area) == 0:
        return NAN
    c = sum(inter[a, b] for a, b in pairs)
    u = sum(union[a, b] for a, b in pairs)
    used_t = {a for a, _ in pairs}
    used_p = {b for _, b in pairs}
    u += sum(t_area[a] for a in range(len(t_area)) if a not in used_t)
    u += sum(p_area[b] for b in range(len(p_area)) if b not in used_p)
    return c / u


def ref_aji(t, p, criterion: str = "iou"):
    """Kumar et al.: every true instance takes its best overlapping predicted instance.

    criterion "iou" (the paper, HoVer-Net): highest IoU; ties go to the larger intersection,
    then the smaller predicted id (what HoVer-Net's argmax over inter/(union + 1e-6) does).
    criterion "intersection" (cellseg-metrics 0.2.0): largest intersection, and every tied
    predicted instance is taken."""
    _, _, t_area, p_area, inter, union = ref_tables(t, p)
    pairs = []
    for a in range(len(t_area)):
        cands = [b for b in range(len(p_area)) if inter[a, b] > 0]
        if not cands:
            continue
        if criterion == "iou":
            best = max(cands, key=lambda b: (inter[a, b] / union[a, b], inter[a, b], -b))
            pairs.append((a, best))
        else:
            top = max(inter[a, b] for b in cands)
            pairs += [(a, b) for b in cands if inter[a, b] == top]
    return _aggregate(pairs, inter, union, t_area, p_area)


def ref_aji_plus(t, p):
    """Graham et al.: the one-to-one pairing of maximal total IoU (Hungarian on the full
    matrix), pairs without overlap dropped. The weights carry HoVer-Net's +1e-6 in the union,
    which only decides between pairings of equal total IoU."""
    _, _, t_area, p_area, inter, union = ref_tables(t, p)
    if inter.size == 0:
        return _aggregate([], inter, union, t_area, p_area)
    rows, cols = linear_sum_assignment(inter / (union + 1e-6), maximize=True)
    pairs = [(a, b) for a, b in zip(rows, cols) if inter[a, b] > 0]
    return _aggregate(pairs, inter, union, t_area, p_area)


def brute_aji_plus_values(t, p) -> set[Fraction]:
    """Exact AJI+ of every one-to-one pairing of maximal total IoU (all pairings enumerated;
    tiny cases only): an optimum that does not rely on scipy."""
    _, _, t_area, p_area, inter, union = ref_tables(t, p)
    nt, n_p = len(t_area), len(p_area)
    total = int(t_area.sum() + p_area.sum())
    best, values = Fraction(-1), set()
    small, big, swap = (nt, n_p, False) if nt <= n_p else (n_p, nt, True)
    for k in range(small + 1):
        for rows in itertools.combinations(range(small), k):
            for cols in itertools.permutations(range(big), k):
                pairs = [((c, r) if swap else (r, c)) for r, c in zip(rows, cols)]
                if any(inter[a, b] == 0 for a, b in pairs):
                    continue
                s = sum(Fraction(int(inter[a, b]), int(union[a, b])) for a, b in pairs)
                c = sum(int(inter[a, b]) for a, b in pairs)
                value = Fraction(c, total - c)  # Σ unions + unpaired areas = total - c
                if s > best:
                    best, values = s, {value}
                elif s == best:
                    values.add(value)
    return values


def ref_pq(t, p, match_iou=0.5):
    """DQ, SQ, PQ (Graham et al.): pairs of IoU > 0.5 are unique; SQ over TP + 1e-6 as in the
    published code."""
    _, _, t_area, p_area, inter, union = ref_tables(t, p)
    if len(t_area) == 0 and len(p_area) == 0:
        return {"dq": NAN, "sq": NAN, "pq": NAN, "tp": 0, "fp": 0, "fn": 0}
    tp, iou_sum = 0, 0.0
    for a in range(len(t_area)):
        for b in range(len(p_area)):
            iou = inter[a, b] / union[a, b] if union[a, b] else 0.0
            if iou > match_iou:
                tp, iou_sum = tp + 1, iou_sum + iou
    fp, fn = len(p_area) - tp, len(t_area) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / (tp + 1e-6)
    return {"dq": dq, "sq": sq, "pq": dq * sq, "tp": tp, "fp": fp, "fn": fn}


def ref_scores(t, p) -> dict[str, float]:
    pq = ref_pq(t, p)
    return {"dice": ref_dice(t, p), "aji": ref_aji(t, p), "aji_plus": ref_aji_plus(t, p),
            "dq": pq["dq"], "sq": pq["sq"], "pq": pq["pq"]}


def close(a: float, b: float, tol: float = TOL) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def assert_matches_reference(t, p) -> dict[str, float]:
    ours, ref = binary_scores(t, p), ref_scores(t, p)
    for k in ref:
        assert close(ours[k], ref[k]), f"{k}: {ours[k]} vs reference {ref[k]}"
    # The single-metric functions agree with binary_scores.
    assert close(dice_binary(t, p), ours["dice"])
    assert close(aji(t, p), ours["aji"])
    assert close(aji_plus(t, p), ours["aji_plus"])
    pq = pq_image(t, p)
    ref_pq_ = ref_pq(t, p)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (ref_pq_["tp"], ref_pq_["fp"], ref_pq_["fn"])
    return ours


# ---- (a) hand-made cases ---------------------------------------------------------------------

def test_one_prediction_over_two_nuclei():
    # t1 = cols 0-1 (4 px), t2 = cols 3-5 (6 px); one prediction p5 = cols 0-3 (8 px).
    t = np.array([[1, 1, 0, 2, 2, 2],
                  [1, 1, 0, 2, 2, 2]])
    p = np.array([[5, 5, 5, 5, 0, 0],
                  [5, 5, 5, 5, 0, 0]])
    # t1∩p5 = 4, t1∪p5 = 8 (IoU 1/2); t2∩p5 = 2, t2∪p5 = 12 (IoU 1/6).
    # Dice: 2·6 / (10 + 8) = 2/3.
    # AJI: both take p5 -> (4 + 2) / (8 + 12) = 0.3 (p5's pixels counted twice: AJI's
    #      over-penalisation).
    # AJI+: p5 pairs with t1 only -> 4 / (8 + |t2| 6) = 2/7.
    # PQ: IoU 1/2 is not > 1/2 -> TP 0, FP 1, FN 2, all zero.
    s = assert_matches_reference(t, p)
    assert s["dice"] == pytest.approx(2 / 3, abs=TOL)
    assert s["aji"] == pytest.approx(0.3, abs=TOL)
    assert s["aji_plus"] == pytest.approx(2 / 7, abs=TOL)
    assert pq_image(t, p) == {"dq": 0.0, "sq": 0.0, "pq": 0.0, "tp": 0, "fp": 1, "fn": 2}


def test_hungarian_pairing_differs_from_greedy_and_from_aji():
    # t1 = rows 0-3 x cols 0-5 (24 px), t2 = rows 0-3 x cols 6-9 (16 px);
    # p9 = rows 0-3 x cols 2-8 (28 px), p4 = rows 0-5 x cols 0-1 (12 px).
    t = np.zeros((6, 10), np.int32)
    t[:4, :6], t[:4, 6:] = 1, 2
    p = np.zeros((6, 10), np.int32)
    p[:4, 2:9], p[:, :2] = 9, 4
    # IoU(t1,p9) = 16/36, IoU(t1,p4) = 8/28, IoU(t2,p9) = 12/32, IoU(t2,p4) = 0.
    # AJI+: {t1-p4, t2-p9} totals 8/28 + 12/32 = 0.661 > {t1-p9} 0.444 (the greedy pick)
    #       -> (8 + 12) / (28 + 32) = 1/3 (greedy would give 16 / (36 + 16 + 12) = 1/4).
    # AJI: t1 -> p9, t2 -> p9, p4 unused -> (16 + 12) / (36 + 32 + 12) = 0.35.
    # Dice: foregrounds 40 and 40 px, 36 shared -> 72/80 = 0.9. PQ: no IoU > 1/2 -> 0.
    s = assert_matches_reference(t, p)
    assert s["aji_plus"] == pytest.approx(1 / 3, abs=TOL)
    assert s["aji"] == pytest.approx(0.35, abs=TOL)
    assert s["dice"] == pytest.approx(0.9, abs=TOL)
    assert (s["dq"], s["sq"], s["pq"]) == (0.0, 0.0, 0.0)
    assert brute_aji_plus_values(t, p) == {Fraction(1, 3)}


def test_split_nucleus():
    # t1 = 2x6 (12 px) split into p7 = cols 0-3 (8 px) and p8 = cols 4-5 (4 px).
    t = np.ones((2, 6), np.uint16)
    p = np.array([[7, 7, 7, 7, 8, 8],
                  [7, 7, 7, 7, 8, 8]], np.uint16)
    # AJI = AJI+ = 8 / (12 + unused p8 4) = 1/2; Dice 1 (same foreground).
    # PQ: t1-p7 IoU 2/3 -> TP 1, FP 1, FN 0: DQ = 1/1.5, SQ = (2/3)/(1 + 1e-6).
    s = assert_matches_reference(t, p)
    assert s["aji"] == s["aji_plus"] == pytest.approx(0.5, abs=TOL)
    assert s["dice"] == 1.0
    assert s["dq"] == pytest.approx(2 / 3, abs=TOL)
    assert s["sq"] == pytest.approx((2 / 3) / (1 + 1e-6), abs=TOL)
    assert s["pq"] == pytest.approx(s["dq"] * s["sq"], abs=TOL)


def test_aji_iou_tie_goes_to_larger_intersection():
    # t1 = row 0 (12 px). p3 = row 0 cols 0-3 (4 px): ∩ 4, ∪ 12, IoU 1/3.
    # p9 = row 0 cols 4-11 + row 1 (20 px): ∩ 8, ∪ 24, IoU 1/3: a tie, p9 wins (larger
    # intersection, as HoVer-Net's inter/(union + 1e-6) decides; not the smaller id 3).
    t = np.zeros((2, 12), np.int64)
    t[0] = 1
    p = np.full((2, 12), 9, np.int64)
    p[0, :4] = 3
    # AJI = AJI+ = 8 / (24 + unused p3 4) = 2/7 (p3 would give 4 / (12 + 20) = 1/8).
    # Dice = 2·12 / (12 + 24) = 2/3.
    s = assert_matches_reference(t, p)
    assert s["aji"] == s["aji_plus"] == pytest.approx(2 / 7, abs=TOL)
    assert s["dice"] == pytest.approx(2 / 3, abs=TOL)


def test_aji_plus_tie_between_optimal_pairings():
    # A noisy 5x5 case (found by search) where two pairings reach the maximal total IoU.
    t = np.array([[0, 2, 2, 1, 0],
                  [3, 0, 2, 0, 1],
                  [2, 2, 2, 3, 1],
                  [1, 3, 0, 0, 3],
                  [0, 2, 0, 2, 1]])
    p = np.array([[0, 1, 4, 1, 0],
                  [3, 4, 2, 0, 2],
                  [1, 2, 1, 4, 4],
                  [0, 4, 4, 3, 1],
                  [1, 4, 4, 1, 0]])
    # Areas: t 5, 8, 4 and p 7, 3, 2, 8 (37 px in all). Overlaps (∩/∪): t1-p1 1/11,
    # t1-p2 1/7, t1-p4 1/12, t2-p1 4/11, t2-p2 2/9, t2-p4 2/14, t3-p1 1/10, t3-p3 1/5,
    # t3-p4 2/10. Best total IoU 272/385: {t1-p2, t2-p1} with t3-p3 or with t3-p4 (both 1/5).
    # HoVer-Net's weights inter/(union + 1e-6) prefer the larger overlap t3-p4:
    # AJI+ = (1 + 4 + 2) / (37 - 7) = 7/30 (t3-p3 would give 6/31).
    # AJI: t1 -> p2, t2 -> p1, t3 -> p4 (IoU tie, larger intersection) -> 7/30 too.
    s = assert_matches_reference(t, p)
    assert s["aji_plus"] == pytest.approx(7 / 30, abs=TOL)
    assert s["aji"] == pytest.approx(7 / 30, abs=TOL)
    assert brute_aji_plus_values(t, p) == {Fraction(7, 30), Fraction(6, 31)}


def test_identical_maps_and_arbitrary_ids():
    t = np.zeros((8, 8), np.uint64)
    t[1:4, 1:4], t[5:7, 2:8], t[0, 7] = 7, 2**40, 3   # gaps, a 41-bit id, a 1-px nucleus
    s = assert_matches_reference(t, t)
    assert (s["dice"], s["aji"], s["aji_plus"], s["dq"]) == (1.0, 1.0, 1.0, 1.0)
    assert s["sq"] == pytest.approx(3 / (3 + 1e-6), abs=TOL)
    # Relabelling either map changes nothing; a map with no background works too.
    relabelled = np.where(t == 0, 0, t.astype(np.int64) % 1000 + 11)
    assert binary_scores(t, relabelled) == s
    full = np.full((4, 4), 5, np.int32)
    assert binary_scores(full, full)["aji"] == 1.0


def test_empty_maps():
    z = np.zeros((5, 5), np.int32)
    one = z.copy()
    one[1:3, 1:3] = 4
    # Both empty: every score is 0/0 = NaN (HoVer-Net's arithmetic), not 1.
    assert all(math.isnan(v) for v in binary_scores(z, z).values())
    assert math.isnan(dice_binary(z, z)) and math.isnan(aji(z, z)) and math.isnan(aji_plus(z, z))
    pq = pq_image(z, z)
    assert math.isnan(pq["pq"]) and (pq["tp"], pq["fp"], pq["fn"]) == (0, 0, 0)
    # Exactly one empty: every score 0.
    for t, p in ((one, z), (z, one)):
        assert binary_scores(t, p) == {k: 0.0 for k in ("dice", "aji", "aji_plus", "dq", "sq",
                                                         "pq")}
        assert_matches_reference(t, p)
    assert pq_image(one, z)["fn"] == 1 and pq_image(z, one)["fp"] == 1


def test_input_errors():
    a = np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match=r"\(4, 4\) vs \(4, 5\)"):
        aji(a, np.zeros((4, 5), np.int32))
    for bad in (a.astype(np.float32), a.astype(bool)):
        with pytest.raises(ValueError, match="integer"):
            dice_binary(a, bad)
        with pytest.raises(ValueError, match="integer"):
            binary_scores(bad, a)
    with pytest.raises(ValueError, match="2-D"):
        aji_plus(a[None], a[None])
    with pytest.raises(ValueError, match="negative"):
        pq_image(a - 1, a)


def test_mean_scores_is_nan_aware_mean_over_images():
    per_image = [{"dice": 0.5, "aji": NAN}, {"dice": 1.0, "aji": 0.25}, {"dice": NAN,
                                                                        "aji": NAN}]
    out = mean_scores(per_image)
    assert out == {"dice": 0.75, "aji": 0.25}
    assert math.isnan(mean_scores([{"pq": NAN}])["pq"])
    with pytest.raises(ValueError):
        mean_scores([])


# ---- (b) random instance maps ----------------------------------------------------------------

def random_truth(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blobs of smoothed noise, labelled, with random sparse ids (some touching)."""
    x = ndi.gaussian_filter(rng.random((size, size)), rng.uniform(1.0, 2.5))
    lab, n = ndi.label(x > np.quantile(x, rng.uniform(0.45, 0.8)))
    ids = np.concatenate([[0], rng.choice(10**6, n, replace=False) + 1])
    return ids[lab]


def perturb(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A plausible prediction: shifted, merged, split, eroded or dilated, with dropped
    nuclei and spurious ones."""
    kind = rng.integers(0, 5)
    if kind == 0:    # shifted
        p = np.roll(t, tuple(rng.integers(-3, 4, 2)), (0, 1))
    elif kind == 1:  # merged: the dilated foreground relabelled
        p = ndi.label(ndi.binary_dilation(t > 0, iterations=int(rng.integers(1, 3))))[0]
    elif kind == 2:  # split: a stripe of columns gets new ids
        p = t.copy()
        c = int(rng.integers(1, t.shape[1] - 1))
        p[:, c:] = np.where(p[:, c:] > 0, p[:, c:] + 10**7, 0)
    elif kind == 3:  # eroded or dilated
        p = ndi.grey_erosion(t, 2) if rng.random() < 0.5 else ndi.grey_dilation(t, 3)
    else:            # an unrelated blob map
        p = random_truth(rng, t.shape[0])
    ids = [i for i in np.unique(p) if i]
    if ids and rng.random() < 0.5:  # drop some nuclei
        p = np.where(np.isin(p, rng.choice(ids, len(ids) // 4 + 1)), 0, p)
    if rng.random() < 0.3:          # a spurious nucleus
        y, x = rng.integers(0, t.shape[0] - 3, 2)
        p[y:y + 3, x:x + 3] = 2**20
    return p


@pytest.mark.parametrize("seed", range(40))
def test_random_maps_match_reference(seed):
    rng = np.random.default_rng(seed)
    t = random_truth(rng, int(rng.integers(12, 48)))
    assert_matches_reference(t, perturb(rng, t))


@pytest.mark.parametrize("seed", range(300))
def test_tiny_random_maps_aji_plus_is_optimal(seed):
    # Few instances and many IoU ties: the brute-force optimum checks the Hungarian step
    # without scipy, the reference checks the rest.
    rng = np.random.default_rng(1000 + seed)
    s = int(rng.integers(2, 6))
    t = rng.integers(0, int(rng.integers(2, 5)), (s, s)) * 3
    p = rng.integers(0, int(rng.integers(2, 5)), (s, s)) + 100 * (rng.random((s, s)) < 0.2)
    ours = assert_matches_reference(t, p)
    values = brute_aji_plus_values(t, p)
    if values:
        assert any(abs(ours["aji_plus"] - float(v)) <= TOL for v in values)


# ---- (c) real annotations --------------------------------------------------------------------

def consep_tiles(shared_data, n: int) -> list[np.ndarray]:
    files = sorted(glob.glob(str(shared_data / "consep" / "train" / "*.npz")))
    if len(files) < n:
        pytest.skip(f"CoNSeP tiles not found under {shared_data / 'consep' / 'train'}")
    step = len(files) // n
    return [np.load(f)["inst"] for f in files[::step][:n]]


def real_pairs(shared_data):
    rng = np.random.default_rng(7)
    tiles = consep_tiles(shared_data, 4)
    pairs = []
    for k, t in enumerate(tiles):
        # Eroded/dilated, relabelled in reverse order, a quarter of the nuclei dropped.
        p = ndi.grey_dilation(t, 3) if k % 2 else ndi.grey_erosion(t, 3)
        ids = np.unique(p)[1:]
        lut = np.zeros(int(p.max()) + 1, np.int64)
        lut[ids] = 5000 - ids
        lut[rng.choice(ids, len(ids) // 4)] = 0
        pairs.append((t, lut[p].astype(np.uint16)))
        pairs.append((t, tiles[(k + 1) % len(tiles)]))  # another tile's annotation
    return pairs


def test_real_annotations_match_reference(shared_data):
    for t, p in real_pairs(shared_data):
        ours = assert_matches_reference(t, p)
        assert all(0.0 <= v <= 1.0 for v in ours.values())


# ---- cellseg-metrics ---------------------------------------------------------------------------
# Version pinned in requirements-dev.txt (0.2.0). Its definitions against ours:
# - binary Dice: get_stats + dice_coef = 2TP / (2TP + FP + FN + 1e-8): the same up to the 1e-8.
# - panoptic_quality: same pairing (IoU > 0.5); DQ = TP / (TP + FP/2 + FN/2 + 1e-8) and
#   SQ = Σ IoU / (TP + 1e-8) where HoVer-Net has no offset in DQ and 1e-6 in SQ: the offsets are
#   undone before comparing. Its IoU itself is TP / (TP + FP + FN + 1e-8): SQ and PQ agree to
#   1e-7, not 1e-9.
# - aggregated_jaccard_index pairs each true nucleus with the prediction of LARGEST INTERSECTION
#   (all tied ones), not of highest IoU as Kumar et al. and HoVer-Net: it equals our reference
#   with criterion="intersection", and our AJI wherever both criteria pick the same predictions.
# - no AJI+.
# - both maps empty: every score 0 there, NaN here (HoVer-Net's 0/0).

def _same_pairing(t, p) -> bool:
    """Every true nucleus's highest-IoU prediction is its unique largest intersection."""
    _, _, _, _, inter, union = ref_tables(t, p)
    for a in range(inter.shape[0]):
        if inter[a].max() == 0:
            continue
        iou = np.divide(inter[a], union[a], out=np.zeros(len(union[a])), where=union[a] > 0)
        top = np.flatnonzero(inter[a] == inter[a].max())
        if len(top) > 1 or iou[top[0]] != iou.max():
            return False
    return True


def compare_with_cellseg(cs, cases) -> int:
    """Asserts the agreements listed above; returns how many cases compared AJI directly."""
    same = 0
    for t, p in cases:
        ours = binary_scores(t, p)
        pq = pq_image(t, p)
        # Dice
        stats = cs.get_stats((t > 0).astype(np.uint8), (p > 0).astype(np.uint8))
        assert close(float(cs.dice_coef(*stats)), ours["dice"])
        # PQ, its epsilons replaced by HoVer-Net's
        c = cs.panoptic_quality(t, p)
        if t.any() and p.any():
            tp, d = pq["tp"], pq["tp"] + 0.5 * pq["fp"] + 0.5 * pq["fn"]
            assert close(float(c["dq"]) * (d + 1e-8) / d, ours["dq"])
            # Its every IoU also has + 1e-8 in the union (1e-8 / union relative, up to ~1e-9
            # on a few-pixel nucleus), which cannot be undone from the sums: 1e-7 here.
            assert close(float(c["sq"]) * (tp + 1e-8) / (tp + 1e-6), ours["sq"], 1e-7)
            assert close(float(c["pq"]) * (d + 1e-8) / d * (tp + 1e-8) / (tp + 1e-6),
                         ours["pq"], 1e-7)
        elif t.any() or p.any():
            assert float(c["pq"]) == ours["pq"] == 0.0
        # AJI: its own criterion exactly, ours where the criteria agree
        c_aji = float(cs.aggregated_jaccard_index(t, p))
        assert close(c_aji, ref_aji(t, p, criterion="intersection"))
        if _same_pairing(t, p):
            same += 1
            assert close(c_aji, ours["aji"])
    return same


def test_cellseg_metrics_random_maps():
    cs = pytest.importorskip("cellseg_metrics")
    rng = np.random.default_rng(11)
    cases = []
    for _ in range(25):
        t = random_truth(rng, int(rng.integers(16, 48)))
        cases.append((t, perturb(rng, t)))
    assert compare_with_cellseg(cs, cases) >= 5  # the AJI comparison is not vacuous


def test_cellseg_metrics_real_annotations(shared_data):
    cs = pytest.importorskip("cellseg_metrics")
    compare_with_cellseg(cs, real_pairs(shared_data))


def test_cellseg_metrics_disagreements():
    cs = pytest.importorskip("cellseg_metrics")
    # t1 = row 0 (12 px); p3 = row 0 cols 0-4 (∩ 5, ∪ 12, IoU 5/12);
    # p9 = row 0 cols 5-11 + row 1 (19 px; ∩ 7, ∪ 24, IoU 7/24).
    t = np.zeros((2, 12), np.int32)
    t[0] = 1
    p = np.full((2, 12), 9, np.int32)
    p[0, :5] = 3
    # Highest IoU (Kumar, HoVer-Net): p3 -> 5 / (12 + unused p9 19) = 5/31.
    # Largest intersection (cellseg-metrics): p9 -> 7 / (24 + unused p3 5) = 7/29.
    assert aji(t, p) == pytest.approx(5 / 31, abs=TOL)
    assert float(cs.aggregated_jaccard_index(t, p)) == pytest.approx(7 / 29, abs=TOL)
    # Both maps empty: 0 there, NaN here.
    z = np.zeros((4, 4), np.int32)
    assert float(cs.aggregated_jaccard_index(z, z)) == 0.0 and math.isnan(aji(z, z))
    assert float(cs.panoptic_quality(z, z)["pq"]) == 0.0 and math.isnan(pq_image(z, z)["pq"])
    zs = cs.get_stats(z.astype(np.uint8), z.astype(np.uint8))
    assert float(cs.dice_coef(*zs)) == 0.0 and math.isnan(dice_binary(z, z))
