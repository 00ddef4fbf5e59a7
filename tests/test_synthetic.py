"""Synthetic PanNuke generator: format, determinism, mask invariants, H&E likeness, command."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import skimage.color
import skimage.measure

from tsfd_jax import constants
from tsfd_jax.data import synthetic
from tsfd_jax.errors import UserError
from tsfd_jax.cli import main


@pytest.fixture(scope="module")
def sample():
    """24 patches of 128 px (all tissues): the shared sample of the invariant tests."""
    return synthetic.generate(24, seed=11, image_size=128)


def _instances(mask: np.ndarray) -> dict[float, int]:
    """id -> class channel of one PanNuke mask (S,S,6)."""
    out = {}
    for c in range(5):
        for i in np.unique(mask[..., c]):
            if i:
                out[i] = c
    return out


def test_shapes_dtypes_and_values():
    images, masks, types = synthetic.generate(3, seed=0, image_size=64)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.float64
    assert masks.shape == (3, 64, 64, 6) and masks.dtype == np.float64
    assert types.shape == (3,) and types.dtype.kind == "U"
    assert set(types) <= set(constants.PANNUKE_TISSUES)
    assert images.min() >= 0 and images.max() <= 255
    np.testing.assert_array_equal(images, np.round(images))   # integer-valued like PanNuke
    np.testing.assert_array_equal(masks, np.round(masks))
    assert set(np.unique(masks[..., 5])) <= {0.0, 1.0}


def test_mask_invariants(sample):
    _, masks, _ = sample
    non_contiguous = False
    for m in masks:
        cls = m[..., :5]
        assert ((cls > 0).sum(-1) <= 1).all(), "a pixel in two class channels"
        np.testing.assert_array_equal(m[..., 5], (cls > 0).sum(-1) == 0)
        ids = [set(np.unique(cls[..., c])) - {0.0} for c in range(5)]
        assert sum(map(len, ids)) == len(set().union(*ids)), "an id in two channels"
        inst = cls.max(-1).astype(np.int64)
        all_ids = set().union(*ids)
        for i in all_ids:
            region = inst == i
            # one 4-connected piece per nucleus, never a speck
            assert skimage.measure.label(region, connectivity=1).max() == 1
            assert region.sum() >= synthetic.MIN_AREA
        non_contiguous |= bool(all_ids) and max(all_ids) > len(all_ids)
    assert non_contiguous, "ids should not be 1..K like a relabelled map"


def test_touching_and_border_cut_nuclei(sample):
    _, masks, _ = sample
    inst = masks[..., :5].max(-1)
    a, b = inst[:, :, 1:], inst[:, :, :-1]
    touching = ((a != b) & (a > 0) & (b > 0)).sum()
    assert touching > 0, "no two nuclei share a border"
    edge = np.concatenate([inst[:, 0], inst[:, -1], inst[:, :, 0], inst[:, :, -1]], axis=1)
    assert (edge > 0).sum() > 0, "no nucleus cut by the patch edge"


def test_every_class_appears():
    _, masks, _ = synthetic.generate(16, seed=5, image_size=256)
    per_class = [sum(len(np.unique(m[..., c])) - 1 for m in masks) for c in range(5)]
    assert all(n > 0 for n in per_class), per_class
    total = sum(per_class) / len(masks)
    assert 10 < total < 80, total   # PanNuke: about 24 nuclei per patch


def _connective_fraction(tissue: str) -> np.ndarray:
    """Per patch: the fraction of its nuclei that are connective (patches with nuclei)."""
    _, masks, types = synthetic.generate(24, seed=1, image_size=128, tissues=(tissue,))
    assert set(types) == {tissue}
    out = []
    for m in masks:
        classes = list(_instances(m).values())
        if classes:
            out.append(classes.count(2) / len(classes))
    return np.array(out)


def test_tissue_signal_in_class_mix():
    # the table's direction: breast is tumour-rich, uterus stroma (connective) rich; patches
    # are the independent units (nuclei of one patch share its drawn class mix)
    breast, uterus = _connective_fraction("Breast"), _connective_fraction("Uterus")
    assert uterus.mean() > breast.mean() + 0.1
    assert scipy.stats.mannwhitneyu(uterus, breast, alternative="greater").pvalue < 0.01


def test_haematoxylin_inside_nuclei(sample):
    images, masks, _ = sample
    for img, m in zip(images, masks):
        nuclei = m[..., 5] == 0
        if nuclei.sum() < 50:
            continue
        hed = skimage.color.rgb2hed(img.astype(np.uint8))
        inside, outside = hed[..., 0][nuclei].mean(), hed[..., 0][~nuclei].mean()
        assert inside > 1.5 * outside > 0, (inside, outside)
        # stroma and cytoplasm carry the eosin
        assert hed[..., 1][~nuclei].mean() > 0


def test_determinism_and_chunks():
    a = synthetic.generate(4, seed=7, image_size=64)
    b = synthetic.generate(4, seed=7, image_size=64)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()
    head = synthetic.generate(1, seed=7, image_size=64)
    tail = synthetic.generate(3, seed=7, image_size=64, start_index=1)
    for whole, h, t in zip(a, head, tail):
        np.testing.assert_array_equal(whole, np.concatenate([h, t]))
    other = synthetic.generate(4, seed=8, image_size=64)
    assert not np.array_equal(a[0], other[0])


def test_unknown_tissue():
    with pytest.raises(ValueError, match="Atlantis"):
        synthetic.generate(1, seed=0, image_size=64, tissues=("Atlantis",))


def test_write_layout_matches_generate(tmp_path):
    folders = synthetic.write_pannuke(tmp_path, 3, seed=2, folds=2, image_size=64, chunk=2)
    assert folders == [tmp_path / "Fold 1", tmp_path / "Fold 2"]
    for k in (1, 2):
        images_p, types_p, masks_p = synthetic.fold_paths(tmp_path, k)
        assert images_p == tmp_path / f"Fold {k}" / "images" / f"fold{k}" / "images.npy"
        assert masks_p == tmp_path / f"Fold {k}" / "masks" / f"fold{k}" / "masks.npy"
        images = np.load(images_p, allow_pickle=False)
        types = np.load(types_p, allow_pickle=False)
        masks = np.load(masks_p, allow_pickle=False)
        assert types.dtype.kind == "U"
        ref = synthetic.generate(3, seed=synthetic.fold_seed(2, k), image_size=64)
        np.testing.assert_array_equal(images, ref[0])
        np.testing.assert_array_equal(masks, ref[1])
        np.testing.assert_array_equal(types, ref[2])
    assert synthetic.fold_seed(2, 1) != synthetic.fold_seed(2, 2)
    assert not list(tmp_path.rglob("*.tmp"))


def test_rerun_keeps_files_and_refuses_different(tmp_path):
    synthetic.write_pannuke(tmp_path, 2, seed=1, folds=1, image_size=64)
    paths = synthetic.fold_paths(tmp_path, 1)
    before = [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in paths]
    synthetic.write_pannuke(tmp_path, 2, seed=1, folds=1, image_size=64)   # identical: no-op
    assert [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in paths] == before
    with pytest.raises(UserError, match="overwrite"):
        synthetic.write_pannuke(tmp_path, 2, seed=9, folds=1, image_size=64)
    with pytest.raises(UserError, match="overwrite"):
        synthetic.write_pannuke(tmp_path, 3, seed=1, folds=1, image_size=64)
    assert [p.read_bytes() for p in paths] == [b for _, _, b in before]
    assert not list(tmp_path.rglob("*.tmp"))
    synthetic.write_pannuke(tmp_path, 2, seed=9, folds=1, image_size=64, overwrite=True)
    ref = synthetic.generate(2, seed=synthetic.fold_seed(9, 1), image_size=64)
    np.testing.assert_array_equal(np.load(paths[2], allow_pickle=False), ref[1])


def test_command(tmp_path, capsys):
    argv = ["synth", "--out", str(tmp_path), "--num-images", "2", "--seed", "0", "--folds", "2",
            "--size", "64"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Fold 1: 2 images" in out and "Fold 2: 2 images" in out and "Neoplastic" in out
    images = np.load(synthetic.fold_paths(tmp_path, 2)[0], allow_pickle=False)
    assert images.shape == (2, 64, 64, 3)
    with pytest.raises(SystemExit) as e:
        main(argv[:6] + ["1"] + argv[7:])   # another seed into the same folder
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
    kept = np.load(synthetic.fold_paths(tmp_path, 2)[0], allow_pickle=False)
    np.testing.assert_array_equal(kept, images)
