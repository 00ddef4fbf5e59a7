"""Any-size data: random training crops (uniform origins, labels aligned with the image, exact
resume), the tile grid and evaluation size of larger images, and the loop on mixed-size folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from configs import tiny
from tsfd_jax.data import pipeline as pl
from tsfd_jax.data.prepare import prepare
from tsfd_jax.data.prepared import open_prepared
from tsfd_jax.data.resolve import eval_view, load_train
from tsfd_jax.errors import UserError

H, W, CROP = 40, 56, 16


class CoordSource:
    """Examples whose pixels encode their own coordinates: image = (y, x, example),
    inst = y * W + x + 1, cls = (y + x) % 5, so any crop can be located and checked."""

    def __init__(self, n: int, h: int = H, w: int = W):
        self.n, self.h, self.w = n, h, w

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        yy, xx = np.mgrid[:self.h, :self.w]
        image = np.stack([yy, xx, np.full_like(yy, int(i))], -1).astype(np.uint8)
        return {"image": image, "inst": (yy * self.w + xx + 1).astype(np.int32),
                "cls": ((yy + xx) % 5).astype(np.uint8), "tissue": np.int32(0), "key": f"k{i}"}


def _iterator(n: int = 4, crop: int | None = CROP, seed: int = 3, **kw):
    return pl.train_iterator(CoordSource(n), 4, seed=seed, prefetch=0, process_index=0,
                             process_count=1, crop_size=crop, **kw)


def _origins(batch: dict) -> np.ndarray:
    return batch["image"][:, 0, 0, :2].astype(int)  # (B, 2) y0, x0


def test_crops_have_the_crop_size_and_labels_aligned_with_the_image():
    it = _iterator()
    for _ in range(20):
        b = next(it)
        assert b["image"].shape == (4, CROP, CROP, 3) and b["inst"].shape == (4, CROP, CROP)
        for j in range(4):
            y = b["image"][j, ..., 0].astype(int)
            x = b["image"][j, ..., 1].astype(int)
            y0, x0 = y[0, 0], x[0, 0]
            np.testing.assert_array_equal(y, y0 + np.arange(CROP)[:, None] + 0 * x)
            np.testing.assert_array_equal(x, x0 + np.arange(CROP)[None, :] + 0 * y)
            np.testing.assert_array_equal(b["inst"][j], y * W + x + 1)
            np.testing.assert_array_equal(b["cls"][j], (y + x) % 5)
            assert (b["image"][j, ..., 2] == b["index"][j]).all()  # the right example


def test_crop_origins_are_uniform_over_every_position():
    it = _iterator(n=8)
    origins = np.concatenate([_origins(next(it)) for _ in range(600)])  # 2400 crops
    for axis, span in ((0, H - CROP + 1), (1, W - CROP + 1)):
        counts = np.bincount(origins[:, axis], minlength=span)
        assert len(counts) == span and (counts > 0).all(), "every origin occurs"
        assert stats.chisquare(counts).pvalue > 1e-4


def test_a_restored_iterator_draws_the_same_crops_and_epochs_draw_new_ones():
    it = _iterator()
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    resumed = _iterator()
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(6)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Same seed from scratch: the same stream; a new epoch crops example 0 elsewhere.
    again = _iterator()
    first = [next(again) for _ in range(4)]
    np.testing.assert_array_equal(first[0]["image"], _iterator().__next__()["image"])
    seen = {}
    for b in first:  # 16 draws = 4 epochs of 4 examples
        for idx, o in zip(b["index"], _origins(b)):
            seen.setdefault(int(idx), set()).add(tuple(o))
    assert all(len(v) > 1 for v in seen.values())


def test_crops_with_a_worker_process_equal_in_process_crops():
    a = [next(_iterator()) for _ in range(1)]
    it = _iterator(num_workers=1)
    try:
        b = [next(it)]
    finally:
        it.close()
    np.testing.assert_array_equal(a[0]["image"], b[0]["image"])


def test_examples_of_the_crop_size_pass_unchanged_and_smaller_ones_are_refused():
    crop = pl.RandomCrop(W)
    ex = CoordSource(1, W, W)[0]
    assert crop.random_map((0, ex), np.random.default_rng(0))[1] is ex
    with pytest.raises(ValueError, match="k0.*smaller than the crop"):
        pl.RandomCrop(64).random_map((0, CoordSource(1)[0]), np.random.default_rng(0))


def test_tiled_source_cuts_the_grid_with_keys_naming_the_origin():
    src = pl.TiledSource(CoordSource(2), [(1, 0, 0), (1, 24, 40)], CROP)
    assert len(src) == 2
    t = src[1]
    assert t["key"] == "k1@24,40" and t["image"].shape == (CROP, CROP, 3)
    assert t["image"][0, 0, :2].tolist() == [24, 40] and t["inst"][-1, -1] == 39 * W + 55 + 1


# ---- prepared folders of mixed sizes ---------------------------------------------------------

def _write_folder(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """Image + npz folder: nuclei are 5 x 5 squares on a grid, class 1 or 2 by column."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("a\nb\n")
    rng = np.random.default_rng(0)
    for stem, (h, w) in sizes.items():
        inst = np.zeros((h, w), np.int32)
        typ = np.zeros((h, w), np.uint8)
        k = 0
        for y in range(2, h - 6, 10):
            for x in range(2, w - 6, 10):
                k += 1
                inst[y:y + 5, x:x + 5] = k
                typ[y:y + 5, x:x + 5] = 1 + (x // 10) % 2
        image = np.full((h, w, 3), 230, np.uint8) - (inst > 0)[..., None].astype(np.uint8) * 150
        image = (image + rng.integers(0, 10, image.shape)).astype(np.uint8)
        Image.fromarray(image).save(root / f"{stem}.png")
        np.savez(root / f"{stem}.npz", inst=inst, type=typ)
    return root


def _folder_config(root: Path, image_size: int = 32):
    cfg = tiny.get_config()
    cfg.data.source, cfg.data.root = "folders", str(root)
    cfg.data.label_names = ("Background", "a", "b")
    cfg.data.tissue_names = ()
    cfg.model.tissue_head = False
    cfg.data.train_split = cfg.data.val_split = cfg.data.test_split = "train"
    cfg.data.image_size, cfg.input.size = image_size, image_size
    cfg.model.arch, cfg.model.unet_features = "unet", (4, 8)
    return cfg


def test_load_train_crops_larger_images_and_refuses_smaller_ones(tmp_path):
    root = _write_folder(tmp_path / "mixed", {"a_1": (48, 40), "b_1": (40, 72)})
    source, crop, _ = load_train(_folder_config(root), tmp_path / "w")
    assert len(source) == 2 and crop == 32
    same = _write_folder(tmp_path / "same", {"a_1": (32, 32), "b_1": (32, 32)})
    assert load_train(_folder_config(same), tmp_path / "w2")[1] is None
    with pytest.raises(UserError, match=r"smaller than data.image_size 64 px \(first: a_1, 48 x 40"):
        load_train(_folder_config(root, image_size=64), tmp_path / "w3")


def test_eval_view_whole_images_when_one_size_else_a_covering_grid(tmp_path):
    root = _write_folder(tmp_path / "mixed", {"a_1": (48, 40), "b_1": (40, 72)})
    prepare("folders", [root], tmp_path / "p", classes=("a", "b"))
    prepared = open_prepared(tmp_path / "p")
    cfg = _folder_config(root)
    ecfg, src = eval_view(cfg, prepared, prepared.source("train"))
    assert ecfg.data.image_size == 32 and isinstance(src, pl.TiledSource)
    # 48 x 40 -> rows (0, 16) x cols (0, 8); 40 x 72 -> rows (0, 8) x cols (0, 32, 40)
    assert [s["key"] for s in (src[i] for i in range(len(src)))] == [
        "a_1@0,0", "a_1@0,8", "a_1@16,0", "a_1@16,8",
        "b_1@0,0", "b_1@0,32", "b_1@0,40", "b_1@8,0", "b_1@8,32", "b_1@8,40"]
    big = _write_folder(tmp_path / "big", {"a_1": (64, 64), "b_1": (64, 64)})
    prepare("folders", [big], tmp_path / "pb", classes=("a", "b"))
    pb = open_prepared(tmp_path / "pb")
    ecfg, src = eval_view(cfg, pb, pb.source("train"))
    assert (ecfg.data.image_size, ecfg.input.size, len(src)) == (64, 64, 2)  # whole images
    cfg.data.eval_size = 32
    assert len(eval_view(cfg, pb, pb.source("train"))[1]) == 8  # 2 images x 2 x 2 tiles
    cfg.data.eval_size = 40  # not a multiple of 32 at this input ratio
    with pytest.raises(UserError, match="eval_size 40"):
        eval_view(cfg, pb, pb.source("train"))


def test_the_loop_trains_on_mixed_sizes_and_evaluates_on_tiles(tmp_path):
    from tsfd_jax.evaluate_run import evaluate_workdir
    from tsfd_jax.loop import train_and_evaluate

    root = _write_folder(tmp_path / "mixed", {"a_1": (48, 40), "b_1": (40, 72), "c_1": (33, 36),
                                                  "d_1": (32, 32)})
    cfg = _folder_config(root)
    cfg.total_steps, cfg.eval_every_steps = 2, 2
    result = train_and_evaluate(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(result["train_loss"]) and "val_bPQ" in result
    out = evaluate_workdir(tmp_path / "run", checkpoint="last", name="t", workers=0)
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["images"] == 4 + 6 + 4 + 1  # grid tiles of the images
