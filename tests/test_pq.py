"""Official PanNuke PQ protocol (tsfd_jax/metrics/pq.py) and the ``pq`` command.

The reference is tests/pannuke_reference.py: the published algorithm in its per-instance loop
form, sharing no code with the module under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, given, settings

from pannuke_reference import (ref_binarize, ref_get_fast_pq, ref_pannuke_pq,
                               ref_remap_label)
from tsfd_jax.constants import PANNUKE_CLASSES
from tsfd_jax.metrics.pq import binarize, get_fast_pq, pannuke_pq, remap_label

TISSUES = ("Breast", "Colon", "Lung", "Skin")  # Skin never drawn: an absent tissue


def assert_same(ours: dict, ref: dict, tol: float = 1e-9) -> None:
    for key in ("mPQ", "bPQ", "mDQ", "mSQ", "bDQ", "bSQ"):
        _close(ours[key], ref[key], key, tol)
    for group in ("class_PQ", "class_DQ", "class_SQ", "tissue_mPQ", "tissue_bPQ"):
        assert set(ours[group]) == set(ref[group]), group
        for k in ref[group]:
            _close(ours[group][k], ref[group][k], f"{group}[{k}]", tol)


def _close(a, b, what, tol):
    a = float("nan") if a is None else float(a)
    b = float(b)
    if math.isnan(b):
        assert math.isnan(a), f"{what}: {a} vs NaN"
    else:
        assert abs(a - b) <= tol, f"{what}: {a} vs {b}"


# ---- random PanNuke-layout cases ---------------------------------------------------------------

def random_truth(rng: np.random.Generator, n: int, size: int, C: int = 5) -> np.ndarray:
    """Discs/rectangles with random (non-contiguous) ids in random class channels; some touch,
    some are cut by the border, some overlap across channels, some images/classes are empty."""
    masks = np.zeros((n, size, size, C + 1))
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        if rng.random() < 0.15:
            continue  # empty image
        classes = rng.choice(C, size=rng.integers(1, C + 1), replace=False)
        for _ in range(rng.integers(1, 14)):
            c = rng.choice(classes)
            cy, cx = rng.integers(-3, size + 3, 2)
            r = rng.integers(1, 9)
            if rng.random() < 0.5:
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                m = (abs(yy - cy) <= r) & (abs(xx - cx) <= rng.integers(1, 9))
            masks[i, ..., c][m] = rng.integers(1, 1000)
    masks[..., C] = masks[..., :C].sum(-1) == 0
    return masks


def perturb(rng: np.random.Generator, true: np.ndarray, C: int = 5) -> np.ndarray:
    pred = true.copy()
    n, size = true.shape[:2]
    for i in range(n):
        mode = rng.integers(0, 8)
        for c in range(C):
            ch = pred[i, ..., c]
            ids = [v for v in np.unique(ch) if v != 0]
            if mode == 0 and ids:  # drop instances
                for v in rng.choice(ids, size=rng.integers(0, len(ids) + 1), replace=False):
                    ch[ch == v] = 0
            elif mode == 1 and len(ids) > 1:  # merge two instances
                a, b = rng.choice(ids, 2, replace=False)
                ch[ch == b] = a
            elif mode == 2:  # grow or shrink everything
                grown = ndi.grey_dilation(ch, size=3) if rng.random() < 0.5 else ch
                shrunk = ndi.grey_erosion(ch, size=3)
                ch[...] = grown if rng.random() < 0.5 else np.where(shrunk == ch, ch, 0)
            elif mode == 3:  # shift
                ch[...] = np.roll(ch, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
            elif mode == 4 and ids:  # relabel with new non-contiguous ids
                lut = dict(zip(ids, rng.choice(5000, len(ids), replace=False) + 1))
                ch[...] = np.vectorize(lambda v: lut.get(v, 0))(ch)
        if mode == 5:  # class flips: move a channel's instances to another channel
            a, b = rng.choice(C, 2, replace=False)
            pred[i, ..., b] = np.where(pred[i, ..., a] > 0, pred[i, ..., a] + 2000, pred[i, ..., b])
            pred[i, ..., a] = 0
        if mode == 6:  # an unrelated prediction with extra classes
            pred[i] = random_truth(rng, 1, size, C)[0]
        if mode == 7:  # negative ids count as instances too (official remap_label)
            pred[i, ..., rng.integers(0, C)] *= -1
    if rng.random() < 0.1:
        pred[rng.integers(0, n)] = 0  # an empty prediction
    pred[..., C] = pred[..., :C].sum(-1) == 0
    return pred


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5), size=st.sampled_from([32, 48]),
       low_iou=st.booleans(), as_int=st.booleans())
def test_matches_official_on_random_cases(seed, n, size, low_iou, as_int):
    rng = np.random.default_rng(seed)
    true = random_truth(rng, n, size)
    pred = perturb(rng, true)
    if as_int:
        true, pred = true.astype(np.int32), pred.astype(np.int32)
    types = rng.choice(TISSUES[:3], n)
    match_iou = 0.3 if low_iou else 0.5
    ours = pannuke_pq(true, pred, types, tissue_names=TISSUES, match_iou=match_iou)
    ref = ref_pannuke_pq(true, pred, types, PANNUKE_CLASSES, TISSUES, match_iou)
    assert_same(ours, ref)
    assert math.isnan(ours["tissue_mPQ"]["Skin"])


def consep_layout(path: Path) -> np.ndarray:
    """CoNSeP tile (inst + 4-class type map) -> (H, W, 5) PanNuke-style layout."""
    z = np.load(path)
    inst, typ = z["inst"].astype(np.int64), z["type"].astype(np.int64)
    out = np.zeros(inst.shape + (5,))
    for c in range(1, 5):
        out[..., c - 1] = np.where(typ == c, inst, 0)
    out[..., 4] = inst == 0
    return out


def test_matches_official_on_real_annotations(shared_data):
    files = sorted((shared_data / "consep" / "train").glob("*.npz"))[::70][:6]
    assert len(files) >= 4
    true = np.stack([consep_layout(f) for f in files])
    preds = []
    for i, t in enumerate(true):
        p = t.copy()
        for c in range(4):
            ch = p[..., c]
            ids = [v for v in np.unique(ch) if v != 0]
            if i % 3 == 0:  # erosion / dilation
                ch[...] = ndi.grey_dilation(ch, size=3) if c % 2 else ndi.grey_erosion(ch, size=3)
            if i % 3 == 1 and len(ids) > 4:  # dropped and merged instances
                for v in ids[::4]:
                    ch[ch == v] = 0
                ch[ch == ids[1]] = ids[2]
            if i % 3 == 2 and ids:  # class flips
                flip = np.isin(ch, ids[::3])
                p[..., (c + 1) % 4][flip] = ch[flip] + 500
                ch[flip] = 0
        preds.append(p)
    pred = np.stack(preds)
    types = np.array(["Colon", "Breast"] * 3)[: len(files)]
    names = ("Other", "Inflammatory", "Epithelial", "Spindle")
    ours = pannuke_pq(true, pred, types, class_names=names, tissue_names=("Colon", "Breast"))
    ref = ref_pannuke_pq(true, pred, types, names, ("Colon", "Breast"))
    assert_same(ours, ref)
    assert 0.3 < ours["bPQ"] < 1.0


# ---- the building blocks -----------------------------------------------------------------------

def test_remap_and_binarize_match_reference():
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = rng.choice([0, 0, 0, 3, 7, 7, 12, 900], size=(16, 16, 3)) * (rng.random((16, 16, 3)) < 0.5)
        np.testing.assert_array_equal(remap_label(x[..., 0]), ref_remap_label(x[..., 0]))
        np.testing.assert_array_equal(binarize(x), ref_binarize(x))
    neg = np.array([[0, -4, 5], [5, 0, 2]])
    np.testing.assert_array_equal(remap_label(neg), [[0, 1, 3], [3, 0, 2]])


def test_binarize_later_channels_overwrite_and_order():
    x = np.zeros((4, 6, 2), np.int32)
    x[:, :3, 0] = 9      # instance A (channel 0)
    x[:, 2:5, 1] = 4     # instance B (channel 1) overwrites column 2
    x[0, 5, 0] = 2       # instance C (channel 0, smaller id than A -> numbered first)
    out = binarize(x)
    assert out[0, 5] == 1 and out[0, 0] == 2 and out[0, 2] == 3 and out[0, 4] == 3
    x[:, :3, 1] = 4      # A fully overwritten: ids stay contiguous
    assert sorted(np.unique(binarize(x))) == [0, 1, 2]


def test_get_fast_pq_hand_computed():
    true = np.zeros((10, 10), int)
    pred = np.zeros((10, 10), int)
    true[0:4, 0:4] = 1                       # 16 px
    pred[0:4, 1:4] = 5                       # 12 px inside: IoU 12/16 = 0.75
    true[6:10, 6:10] = 2                     # 16 px
    pred[6:10, 8:10] = 7                     # 8 px: IoU 8/16 = 0.5 exactly -> not a match
    (dq, sq, pq), (pt, pp, ut, up) = get_fast_pq(true, pred)
    assert list(pt) == [1] and list(pp) == [5] and list(ut) == [2] and list(up) == [7]
    assert dq == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert sq == pytest.approx(0.75 / (1 + 1e-6), abs=1e-15)
    assert pq == pytest.approx(dq * sq)
    # Below 0.5 the Hungarian assignment pairs both (0.5 > 0.3).
    (dq, sq, _), _ = get_fast_pq(true, pred, match_iou=0.3)
    assert dq == 1.0 and sq == pytest.approx(1.25 / (2 + 1e-6))
    assert ref_get_fast_pq(remap_label(true), remap_label(pred), 0.3)[1] == pytest.approx(sq)
    assert all(math.isnan(v) for v in get_fast_pq(np.zeros((3, 3)), np.zeros((3, 3)))[0])


def test_nan_rules_and_averaging_order():
    size = 8
    true = np.zeros((3, size, size, 6))
    pred = np.zeros_like(true)
    true[0, :2, :2, 0] = 1; pred[0, :2, :2, 0] = 1      # image 0: class 0 perfect
    pred[0, 5:, 5:, 1] = 3                              # ... FP in class 1 with empty GT: ignored
    true[1, :2, :2, 0] = 1                              # image 1: class 0 missed -> 0
    true[1, 4:, 4:, 2] = 2; pred[1, 4:, 4:, 2] = 8      # ... class 2 perfect -> 1
    pred[2, :3, :3, 3] = 1                              # image 2: no GT nuclei -> NaN
    types = np.array(["A", "B", "B"])
    res = pannuke_pq(true, pred, types, tissue_names=("A", "B", "C"), per_image=True)
    one = 1 / (1 + 1e-6)
    assert res["per_image"]["class_PQ"][0] == pytest.approx([one, None, None, None, None])
    assert res["per_image"]["mPQ"] == pytest.approx([one, one / 2, None])
    assert res["per_image"]["bPQ"][2] is None
    assert res["tissue_mPQ"]["A"] == pytest.approx(one)
    assert res["tissue_mPQ"]["B"] == pytest.approx(one / 2)
    assert math.isnan(res["tissue_mPQ"]["C"])
    assert res["mPQ"] == pytest.approx(0.75 * one)            # mean over tissues A, B
    assert res["class_PQ"]["Neoplastic"] == pytest.approx(one / 2)  # mean over images
    assert math.isnan(res["class_PQ"]["Dead"])
    json.dumps(res["per_image"], allow_nan=False)


def test_chunking_and_sparse_fallback_give_the_same_numbers(monkeypatch):
    import tsfd_jax.metrics.pq as pq_module

    rng = np.random.default_rng(5)
    true = random_truth(rng, 7, 32)
    pred = perturb(rng, true)
    types = rng.choice(TISSUES[:3], 7)
    expected = pannuke_pq(true, pred, types, tissue_names=TISSUES, match_iou=0.3)
    monkeypatch.setattr(pq_module, "_CHUNK", 3)          # several chunks, a short last one
    monkeypatch.setattr(pq_module, "_DENSE_LIMIT", 4)    # contingency tables by sorting
    assert_same(pannuke_pq(true, pred, types, tissue_names=TISSUES, match_iou=0.3), expected, 0)


def test_single_instance_covering_the_image_counts_as_empty():
    # run.py skips a map whose np.unique has one value, also when that value is an instance.
    true = np.zeros((1, 4, 4, 6))
    true[0, ..., 0] = 3
    res = pannuke_pq(true, true.copy(), ["A"], tissue_names=("A",))
    ref = ref_pannuke_pq(true, true.copy(), ["A"], PANNUKE_CLASSES, ("A",))
    assert math.isnan(res["mPQ"]) and math.isnan(ref["mPQ"])


def test_rejects_bad_inputs():
    t = np.zeros((2, 8, 8, 6))
    with pytest.raises(ValueError):
        pannuke_pq(t, np.zeros((2, 8, 9, 6)), ["A", "A"])
    with pytest.raises(ValueError):
        pannuke_pq(t, t + 0.5, ["A", "A"])
    with pytest.raises(ValueError):
        pannuke_pq(t, t, ["A"])


# ---- the command -------------------------------------------------------------------------------

def _run_cli(argv):
    from tsfd_jax.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_pq_command(tmp_path, capsys):
    rng = np.random.default_rng(3)
    true = random_truth(rng, 6, 32)
    pred = perturb(rng, true)
    types = np.array(["Breast", "Colon", "Lung", "Breast", "Colon", "Lung"])
    (tmp_path / "true").mkdir()
    (tmp_path / "pred").mkdir()
    np.save(tmp_path / "true" / "masks.npy", true)
    np.save(tmp_path / "true" / "types.npy", types)
    np.save(tmp_path / "pred" / "masks.npy", pred)
    out = tmp_path / "report.json"
    # Official layout: both folders under one root.
    assert _run_cli(["pq", "--true", str(tmp_path), "--pred", str(tmp_path),
                     "--out", str(out), "--per-image"]) == 0
    printed = capsys.readouterr().out
    assert "Neoplastic" in printed and "Breast" in printed and "mPQ" in printed
    report = json.loads(out.read_text())
    ref = ref_pannuke_pq(true, pred, types, PANNUKE_CLASSES,
                         tuple(__import__("tsfd_jax.constants").constants.PANNUKE_TISSUES))
    _close(report["mPQ"], ref["mPQ"], "mPQ", 1e-9)
    _close(report["bPQ"], ref["bPQ"], "bPQ", 1e-9)
    assert report["tissue_mPQ"]["Adrenal_gland"] is None  # absent tissue -> NaN -> null
    assert len(report["per_image"]["bPQ"]) == 6
    # Existing output is not overwritten without --overwrite.
    assert _run_cli(["pq", "--true", str(tmp_path / "true"), "--pred", str(tmp_path / "pred"),
                     "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_pq_command_user_errors(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    assert _run_cli(["pq", "--true", str(tmp_path / "t"), "--pred", str(tmp_path / "p")]) == 2
    assert "masks.npy" in capsys.readouterr().err
    np.save(tmp_path / "t" / "masks.npy", np.zeros((2, 8, 8, 6)))
    np.save(tmp_path / "t" / "types.npy", np.array(["A", "B"]))
    np.save(tmp_path / "p" / "masks.npy", np.zeros((2, 8, 4, 6)))
    assert _run_cli(["pq", "--true", str(tmp_path / "t"), "--pred", str(tmp_path / "p")]) == 2
    assert "does not match" in capsys.readouterr().err
    np.save(tmp_path / "p" / "masks.npy", np.array([{"a": 1}, None], dtype=object))
    assert _run_cli(["pq", "--true", str(tmp_path / "t"), "--pred", str(tmp_path / "p")]) == 2
    assert "not a plain numpy array" in capsys.readouterr().err
