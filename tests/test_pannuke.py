"""PanNuke fold reader and mask conversion (tsfd_jax/data/pannuke.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

from tsfd_jax.constants import PANNUKE_TISSUES
from tsfd_jax.data import pannuke
from tsfd_jax.errors import UserError

SIZE = 64


def clean_masks(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """(n, size, size, 6) PanNuke masks: disjoint square nuclei with ids 1..K, one class
    channel each, channel 5 = background."""
    rng = np.random.default_rng(seed)
    m = np.zeros((n, size, size, 6))
    for i in range(n):
        k = 0
        for y in range(2, size - 10, 14):
            for x in range(2, size - 10, 14):
                if rng.random() < 0.6:
                    k += 1
                    h, w = rng.integers(4, 11, 2)
                    m[i, y:y + h, x:x + w, rng.integers(0, 5)] = k
    m[..., 5] = m[..., :5].sum(-1) == 0
    return m


def write_fold(root: Path, fold: int, n: int, *, flat: bool = False, seed: int = 0,
               images: np.ndarray | None = None, masks: np.ndarray | None = None,
               types: np.ndarray | None = None) -> pannuke.FoldFiles:
    """Write one fold in the official layout under root ('Fold N/...') or flat into root."""
    rng = np.random.default_rng(seed + 100 * fold)
    if images is None:
        images = rng.integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.float64)
    if masks is None:
        masks = clean_masks(n, seed + fold)
    if types is None:
        types = np.array([PANNUKE_TISSUES[(3 * i + fold) % len(PANNUKE_TISSUES)] for i in range(n)])
    if flat:
        files = pannuke.FoldFiles(fold, root / "images.npy", root / "types.npy", root / "masks.npy")
    else:
        d = root / f"Fold {fold}"
        files = pannuke.FoldFiles(fold, d / "images" / f"fold{fold}" / "images.npy",
                                  d / "images" / f"fold{fold}" / "types.npy",
                                  d / "masks" / f"fold{fold}" / "masks.npy")
    for p, a in ((files.images, images), (files.types, types), (files.masks, masks)):
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, a, allow_pickle=a.dtype == object)
    return files


# ---- finding folds ---------------------------------------------------------------------------
def test_find_folds_official_layout_any_subset(tmp_path):
    write_fold(tmp_path, 1, 3)
    write_fold(tmp_path, 3, 2)
    folds = pannuke.find_folds(tmp_path)
    assert sorted(folds) == [1, 3]
    assert folds[3].masks == tmp_path / "Fold 3" / "masks" / "fold3" / "masks.npy"
    # The 'Fold 3' folder itself also works and keeps its number.
    assert list(pannuke.find_folds(tmp_path / "Fold 3")) == [3]


def test_find_folds_single_flat_folder(tmp_path):
    write_fold(tmp_path, 2, 2, flat=True)
    assert list(pannuke.find_folds(tmp_path)) == [1]  # default fold number
    folds = pannuke.find_folds(tmp_path, fold=2)
    assert list(folds) == [2] and folds[2].images == tmp_path / "images.npy"
    fold = pannuke.PanNukeFold(folds[2])
    assert fold.example(1)["key"] == "fold2/00001"


def test_find_folds_nothing_there(tmp_path):
    with pytest.raises(UserError, match="no 'Fold N' folders"):
        pannuke.find_folds(tmp_path)


# ---- reading ---------------------------------------------------------------------------------
def test_fold_reads_raw_and_example(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.float64)
    masks = clean_masks(4, seed=9)
    types = np.array(["Breast", "Colon", "Adrenal_gland", "Uterus"])
    files = write_fold(tmp_path, 2, 4, images=images, masks=masks, types=types)
    fold = pannuke.PanNukeFold(files)
    assert len(fold) == 4 and fold.image_size == (SIZE, SIZE)
    assert isinstance(fold.images, np.memmap) and isinstance(fold.masks, np.memmap)
    for i in range(4):
        im, mk, tissue = fold.raw(i)
        np.testing.assert_array_equal(im, images[i])
        np.testing.assert_array_equal(mk, masks[i])
        assert tissue == types[i]
        ex = fold.example(i)
        assert ex["key"] == f"fold2/{i:05d}"
        assert ex["tissue"] == PANNUKE_TISSUES.index(types[i]) and ex["tissue"].dtype == np.int32
        assert ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"], images[i].astype(np.uint8))
        # Clean masks keep their ids; cls is channel + 1.
        np.testing.assert_array_equal(ex["inst"], masks[i, ..., :5].max(-1).astype(np.int32))
        np.testing.assert_array_equal(
            ex["cls"], np.where(masks[i, ..., 5] == 1, 0, masks[i, ..., :5].argmax(-1) + 1))
    with pytest.raises(IndexError):
        fold.raw(4)


def test_bytes_tissue_names_accepted(tmp_path):
    files = write_fold(tmp_path, 1, 2, types=np.array([b"Skin", b"Liver"]))
    assert pannuke.PanNukeFold(files).tissues == ("Skin", "Liver")


def _bad(tmp_path, what):
    n = 3
    imgs = np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.float64)
    kw: dict = {}
    if what == "length":
        kw["masks"] = clean_masks(n - 1)
    elif what == "dtype":
        kw["images"] = np.full((n, SIZE, SIZE, 3), "a")
    elif what == "image_shape":
        kw["images"] = np.zeros((n, SIZE, SIZE, 4))
    elif what == "mask_shape":
        kw["masks"] = np.zeros((n, SIZE, SIZE, 5))
    elif what == "mask_size":
        kw["masks"] = np.zeros((n, SIZE, SIZE + 1, 6))
    elif what == "nan":
        imgs[2, 5, 5, 1] = np.nan
        kw["images"] = imgs
    elif what == "range":
        imgs[1, 0, 0, 0] = 255.5
        kw["images"] = imgs
    elif what == "negative":
        imgs[0, 3, 3, 2] = -1
        kw["images"] = imgs
    elif what == "mask_nan":
        m = clean_masks(n)
        m[1, 0, 0, 0] = np.nan
        kw["masks"] = m
    elif what == "mask_fraction":
        m = clean_masks(n)
        m[1, 0, 0, 0] = 2.5
        kw["masks"] = m
    elif what == "tissue":
        kw["types"] = np.array(["Breast", "Brain", "Colon"])
    elif what == "object":
        kw["types"] = np.array(["Breast", "Colon", "Skin"], dtype=object)
    elif what == "types_ints":
        kw["types"] = np.arange(n)
    files = write_fold(tmp_path, 1, n, **kw)
    return files


@pytest.mark.parametrize("what,file_attr,message", [
    ("length", "images", "equal length"),
    ("dtype", "images", "dtype"),
    ("image_shape", "images", "expected \\(N, H, W, 3\\)"),
    ("mask_shape", "masks", "expected \\(N, H, W, 6\\)"),
    ("mask_size", "masks", "masks are"),
    ("nan", "images", "image 2 has NaN"),
    ("range", "images", "outside 0..255"),
    ("negative", "images", "outside 0..255"),
    ("mask_nan", "masks", "mask 1 has NaN"),
    ("mask_fraction", "masks", "non-integer"),
    ("tissue", "types", "unknown tissue name 'Brain' at index 1"),
    ("object", "types", "object array \\(needs pickle"),
    ("types_ints", "types", "tissue name strings"),
])
def test_bad_inputs_name_the_file(tmp_path, what, file_attr, message):
    files = _bad(tmp_path, what)
    with pytest.raises(UserError, match=message) as e:
        fold = pannuke.PanNukeFold(files)
        for i in range(len(fold)):  # pixel checks run lazily, when an example is read
            fold.example(i)
    name = str(getattr(files, file_attr))
    assert name in str(e.value) or str(Path(name).parent) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    files = write_fold(tmp_path, 1, 2)
    files.masks.unlink()
    with pytest.raises(UserError, match="missing") as e:
        pannuke.find_folds(tmp_path)
    assert str(files.masks) in str(e.value)


def test_not_an_npy_file(tmp_path):
    files = write_fold(tmp_path, 1, 2)
    files.images.write_bytes(b"not numpy")
    with pytest.raises(UserError, match="not a .npy array") as e:
        pannuke.PanNukeFold(files)
    assert str(files.images) in str(e.value)


# ---- conversion ------------------------------------------------------------------------------
def test_round_trip_exact_on_clean_masks():
    masks = clean_masks(6, seed=3)
    for m in masks:
        inst, cls, counts = pannuke.masks_to_instances(m)
        assert inst.dtype == np.int32 and cls.dtype == np.uint8
        ids = np.unique(inst[inst > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
        np.testing.assert_array_equal(pannuke.to_pannuke_masks(inst, cls), m)
        assert sum(counts.values()) == 0, counts


def test_noncontiguous_ids_relabelled_in_id_order():
    m = np.zeros((16, 16, 6))
    m[0:3, 0:3, 2] = 40   # connective
    m[5:8, 5:8, 0] = 5    # neoplastic
    m[10:13, 0:3, 4] = 17  # epithelial
    m[..., 5] = m[..., :5].sum(-1) == 0
    inst, cls, counts = pannuke.masks_to_instances(m)
    assert inst[6, 6] == 1 and inst[11, 1] == 2 and inst[1, 1] == 3  # ids 5 < 17 < 40
    assert cls[6, 6] == 1 and cls[11, 1] == 5 and cls[1, 1] == 3
    assert counts["relabelled_images"] == 1
    assert counts["overlap_pixels"] == counts["shared_ids"] == 0


def test_overlap_larger_id_wins_and_is_counted():
    m = np.zeros((20, 20, 6))
    m[2:10, 2:10, 0] = 3    # neoplastic id 3
    m[6:14, 6:14, 2] = 5    # connective id 5 overlaps 4x4 = 16 pixels
    m[15:18, 15:18, 1] = 2  # inflammatory id 2, ...
    m[15:18, 16:19, 3] = 2  # ... and dead id 2: same id, 3x2 overlap, tie -> lower channel
    m[..., 5] = m[..., :5].sum(-1) == 0
    inst, cls, counts = pannuke.masks_to_instances(m)
    assert counts["overlap_pixels"] == 16 + 6
    assert counts["shared_ids"] == 1  # id 2 in channels 1 and 3
    assert (cls[6:10, 6:10] == 3).all()  # id 5 > 3
    assert (cls[15:18, 16:18] == 2).all()  # tie: inflammatory (channel 1) before dead (3)
    # Independent reference: the authors' argmax over all six raw channels, bg channel -> 0.
    ref = np.argmax(m, -1)
    np.testing.assert_array_equal(cls, np.where(ref == 5, 0, ref + 1))
    # (channel, id) instances ordered by (id, channel): (2,ch1)=1, (2,ch3)=2, (3,ch0)=3, (5,ch2)=4
    assert inst[16, 15] == 1 and inst[16, 18] == 2 and inst[3, 3] == 3 and inst[12, 12] == 4
    # Deterministic.
    inst2, cls2, counts2 = pannuke.masks_to_instances(m.copy())
    np.testing.assert_array_equal(inst, inst2)
    np.testing.assert_array_equal(cls, cls2)
    assert counts == counts2


def test_removed_and_disconnected_instances_counted():
    m = np.zeros((20, 20, 6))
    m[2:6, 2:6, 1] = 1      # fully covered by id 9: removed
    m[0:8, 0:8, 0] = 9
    m[10:14, 2:18, 2] = 4   # cut in two by a larger id crossing it
    m[8:16, 9:11, 4] = 7
    m[..., 5] = m[..., :5].sum(-1) == 0
    inst, cls, counts = pannuke.masks_to_instances(m)
    assert counts["removed_instances"] == 1
    assert counts["disconnected_instances"] == 1
    assert counts["shared_ids"] == 0
    # Reference for "disconnected": scipy 8-connected pieces per instance.
    pieces = [ndi.label(inst == k, structure=np.ones((3, 3)))[1] for k in range(1, inst.max() + 1)]
    assert sum(p > 1 for p in pieces) == 1
    assert inst.max() == 3 and set(np.unique(inst)) == {0, 1, 2, 3}


def test_random_dirty_masks_match_argmax_reference():
    rng = np.random.default_rng(11)
    for _ in range(20):
        m = np.zeros((24, 24, 6))
        for _ in range(8):
            y, x = rng.integers(0, 20, 2)
            h, w = rng.integers(2, 8, 2)
            m[y:y + h, x:x + w, rng.integers(0, 5)] = rng.integers(1, 6)
        m[..., 5] = m[..., :5].sum(-1) == 0
        inst, cls, counts = pannuke.masks_to_instances(m)
        ref = np.argmax(m, -1)
        np.testing.assert_array_equal(cls, np.where(ref == 5, 0, ref + 1))
        ids = np.unique(inst[inst > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
        for k in ids:  # one class per instance
            assert len(np.unique(cls[inst == k])) == 1
        assert counts["overlap_pixels"] == int(((m[..., :5] > 0).sum(-1) > 1).sum())
        # Round trip reproduces the resolved mask: each pixel's winning channel holds an id.
        back = pannuke.to_pannuke_masks(inst, cls)
        assert ((back[..., :5] > 0).sum(-1) <= 1).all()
        np.testing.assert_array_equal(back[..., 5] == 1, inst == 0)


def test_background_channel_mismatch_counted():
    m = clean_masks(1, seed=2)[0]
    m[0, 0, 5] = 0  # background pixel not flagged as background
    _, _, counts = pannuke.masks_to_instances(m)
    assert counts["background_mismatch_pixels"] == 1


def test_to_pannuke_masks_rejects_unknown_class():
    with pytest.raises(ValueError, match="beyond"):
        pannuke.to_pannuke_masks(np.ones((2, 2), np.int32), np.full((2, 2), 6, np.uint8))


def test_image_rounding():
    im = np.array([[[0.0, 254.6, 255.0]]])
    np.testing.assert_array_equal(pannuke.image_to_uint8(im), [[[0, 255, 255]]])
