"""Whole slides (tsfd_jax/slides.py, the slide path of commands/predict.py).

Pyramidal tiled TIFF slides are written with tifffile (experiments/wsi_slides.py) from real H&E
tiles (CoNSeP, 0.25 um/px) placed on white glass, in the two ways a reader learns the pixel size
(an Aperio SVS description, resolution tags). With the translation-equivariant fake model of
test_predict the row-by-row slide path gives exactly the nuclei of ``predict_image`` on the
level-0 picture, in level-0 coordinates (also for a region and a resampled level); a run stopped
after some rows and restarted writes byte-identical files; bad slides fail with one line naming
the file. The real command runs the tiny random model; the SIGKILL test is marked slow. The
optional label store (zarr) holds exactly the table's nuclei under the table's ids, and a run
stopped or killed between the store's write and the state's resumes to the very same array.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from scipy import ndimage as ndi

from experiments.wsi_slides import consep_mosaic_block, consep_tiles, write_pyramid
# tiny_workdir and jax_cache are test_predict's module fixtures, reused here.
from test_predict import _main_error, fake_predict_fn, jax_cache, tiny_workdir  # noqa: F401
from tsfd_jax import exports
from tsfd_jax import predict as P
from tsfd_jax import slides as S
from tsfd_jax.errors import UserError
from tsfd_jax.overlay import class_colors

ROOT = Path(__file__).resolve().parents[1]
H, W = 1000, 1200                                           # level-0 size of the test slides
PLACES = [(100, 130, 0), (100, 386, 1), (600, 700, 2), (650, 100, 3)]   # (y, x, tile) of H&E
FILES = ("geojson", "csv", "overlay", "tissue", "summary")


@pytest.fixture(scope="module")
def cfg():
    from configs import default

    c = default.get_config()
    c.data.tissue_names = ("pale", "dark", "other")
    return c


@pytest.fixture(scope="module")
def block(shared_data):
    tiles = consep_tiles(shared_data / "consep" / "train", 4)
    assert len(tiles) == 4
    return consep_mosaic_block(tiles, PLACES)


@pytest.fixture(scope="module")
def slides(block, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    return {"aperio": write_pyramid(d / "aperio.svs", H, W, block, 0.25, style="aperio", tile=128),
            "tags": write_pyramid(d / "tags.tif", H, W, block, 0.25, style="tags", tile=128),
            "none": write_pyramid(d / "nompp.tif", H, W, block, None, style="none", tile=128)}


def on_tissue(x: float, y: float, margin: float) -> bool:
    return any(ty - margin <= y < ty + 256 + margin and tx - margin <= x < tx + 256 + margin
               for ty, tx, _ in PLACES)


def run_fake(slide, cfg, out, tissue=None, mpp=None, region=None, **kw):
    plan = S.plan_slide(slide, 0.25, mpp, region, cfg)
    tissue = tissue if tissue is not None else S.detect_tissue(slide, 0.25)
    return plan, S.predict_slide(slide, fake_predict_fn, cfg, out, "s", plan=plan, tissue=tissue,
                                 job={"test": 1, "mpp": mpp, "region": region}, tile=64,
                                 overlap=16, batch_size=4, **kw)


def geometries(path: Path) -> set[str]:
    return {json.dumps(f["geometry"]) for f in json.loads(path.read_text())["features"]}


def reference_geometries(image, cfg, scale=1, offset=(0, 0)) -> set[str]:
    """predict_image on an in-memory picture, polygons moved to level 0."""
    pred = P.predict_image(image, fake_predict_fn, cfg, tile=64, overlap=16, batch_size=4)
    colors = class_colors(cfg.data.label_names)
    out = set()
    for k in range(pred.num_instances):
        g = exports.nucleus_feature(pred, k, cfg.data.label_names, colors)["geometry"]
        if scale != 1 or offset != (0, 0):
            x0, y0, x1, y1 = (int(v) for v in pred.bbox[k])
            g = exports.mask_geometry(np.asarray(pred.inst[y0:y1, x0:x1]) == k + 1, x0, y0,
                                      scale=(scale, scale), origin=offset)
        out.add(json.dumps(g))
    return out


# ---- reading and planning ------------------------------------------------------------------

@pytest.mark.parametrize("style", ["aperio", "tags"])
def test_reader_levels_mpp_and_pixels(slides, block, style):
    assert S.is_slide(slides[style])
    with S.Slide(slides[style]) as slide:
        assert slide.backend == "tiffslide" and slide.mpp == pytest.approx(0.25)
        assert slide.level_dimensions == [(W, H), (W // 2, H // 2), (W // 4, H // 4)]
        np.testing.assert_array_equal(slide.read(0, 0, 0, W, H), block(0, 0, H, W))
        part = slide.read(0, W - 10, -5, 30, 20)  # off the slide: white glass
        np.testing.assert_array_equal(part[5:, :10], block(0, W - 10, 15, 10))
        assert (part[:5] == 255).all() and (part[:, 10:] == 255).all()
        level1 = block(0, 0, H, W).reshape(H // 2, 2, W // 2, 2, 3).mean((1, 3))
        assert np.abs(slide.read(1, 0, 0, W // 2, H // 2) - level1).max() <= 1


def test_openslide_reads_the_same_svs(slides):
    openslide = pytest.importorskip("openslide")
    with S.Slide(slides["aperio"]) as ts:
        ref = ts.read(1, 40, 30, 200, 100)
    osl = S.Slide.__new__(S.Slide)
    osl.path = slides["aperio"]
    osl._ts = None
    osl._open_openslide()
    osl.level_dimensions = [tuple(d) for d in osl._lib.level_dimensions]
    assert osl.mpp == pytest.approx(0.25) and osl.vendor == "aperio"
    np.testing.assert_array_equal(osl.read(1, 40, 30, 200, 100), ref)
    osl.close()
    assert openslide.__library_version__


def test_plan_picks_the_level_and_resamples_the_rest(slides, cfg):
    with S.Slide(slides["tags"]) as slide:
        p = S.plan_slide(slide, 0.25, None, None, cfg)       # the model's 0.25: level 0 as is
        assert (p.level, p.factor, p.width, p.height, p.identity) == (0, 1.0, W, H, True)
        p = S.plan_slide(slide, 0.25, 0.5, None, cfg)        # level 1 exactly
        assert (p.level, p.factor, p.width, p.height, p.scale) == (1, 1.0, W // 2, H // 2,
                                                                   (2.0, 2.0))
        p = S.plan_slide(slide, 0.25, 0.8, None, cfg)        # level 1 (0.5), shrunk by 0.625
        assert p.level == 1 and p.factor == pytest.approx(0.625) and p.width == 375
        p = S.plan_slide(slide, 0.25, 0.125, None, cfg)      # finer than level 0: enlarged
        assert p.level == 0 and p.factor == 2.0 and p.width == 2 * W
        p = S.plan_slide(slide, 0.25, 0.52, None, cfg)       # within 10 %: read as it is
        assert p.level == 1 and p.factor == 1.0
        p = S.plan_slide(slide, 0.25, 0.5, (101, 51, 300, 200), cfg)   # snapped outwards
        assert (p.x0, p.y0, p.width, p.height, p.origin) == (50, 25, 151, 101, (100.0, 50.0))
        with pytest.raises(UserError, match=r"tags\.tif: --region 1000,0,300,10 lies outside"):
            S.plan_slide(slide, 0.25, None, (1000, 0, 300, 10), cfg)


def test_tissue_detection_and_user_masks(slides, tmp_path):
    with S.Slide(slides["tags"]) as slide:
        tm = S.detect_tissue(slide, 0.25)
        mh, mw = tm.mask.shape
        assert (mh, mw) == (31, 38)  # 8 um/px
        for ty, tx, _ in PLACES:     # tissue under most of every H&E tile, glass elsewhere
            r0, r1 = int(np.ceil(ty / tm.scale[1])), int((ty + 256) / tm.scale[1])
            c0, c1 = int(np.ceil(tx / tm.scale[0])), int((tx + 256) / tm.scale[0])
            assert tm.mask[r0:r1, c0:c1].mean() > 0.7
        far = np.array([[not on_tissue((x + 0.5) * tm.scale[0], (y + 0.5) * tm.scale[1], 16)
                         for x in range(mw)] for y in range(mh)])
        assert not tm.mask[far].any() and tm.mask.sum() >= 4 * 40
        assert tm.area_mm2(S.plan_slide(slide, 0.25, None, None, _cfg())) == pytest.approx(
            4 * 0.064 ** 2, rel=0.3)
        # a user's mask: any size of the slide's aspect ratio, rescaled
        user = np.zeros((100, 120), np.uint8)
        user[10:30, 10:40] = 255
        Image.fromarray(user).save(tmp_path / "mask.png")
        m = S.load_tissue_mask(tmp_path / "mask.png", slide, 0.25)
        assert m.mask.shape == (mh, mw) and m.contains(250, 200) and not m.contains(900, 800)
        Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "square.png")
        with pytest.raises(UserError, match=r"square\.png: tissue mask of 100 x 100 pixels "
                                            r"does not have the slide's aspect ratio"):
            S.load_tissue_mask(tmp_path / "square.png", slide, 0.25)


def _cfg():
    from configs import default

    return default.get_config()


# ---- the slide path equals the whole-image path ---------------------------------------------

def test_slide_nuclei_equal_whole_image_prediction(slides, block, cfg, tmp_path):
    """Row by row, with and without tissue detection, through both metadata styles: the very
    polygons predict_image finds on the level-0 picture, all on tissue."""
    ref = reference_geometries(block(0, 0, H, W), cfg)
    assert len(ref) > 200
    for style in ("aperio", "tags"):
        with S.Slide(slides[style]) as slide:
            _, summary = run_fake(slide, cfg, tmp_path / style / "all",
                                  tissue=S.everywhere(slide, 0.25))
            assert geometries(tmp_path / style / "all" / "s_nuclei.geojson") == ref
            _, summary = run_fake(slide, cfg, tmp_path / style / "detected")
    got = geometries(tmp_path / "tags" / "detected" / "s_nuclei.geojson")
    assert got == ref  # the fake model finds nothing on glass; detection skips no nucleus
    assert summary["tiles"]["run"] < 0.6 * summary["tiles"]["grid"]   # glass is never read
    rows = (tmp_path / "tags" / "detected" / "s_nuclei.csv").read_text().splitlines()
    assert len(rows) == len(ref) + 1 and summary["nuclei"]["total"] == len(ref)
    header = rows[0].split(",")
    for line in rows[1:]:
        v = dict(zip(header, line.split(",")))
        assert on_tissue(float(v["x"]), float(v["y"]), 0)
    assert sum(summary["nuclei"]["per_class"].values()) == len(ref)


def test_region_polygons_are_in_level0_coordinates(slides, block, cfg, tmp_path):
    """A region at an offset: the nuclei of predict_image on that crop, moved to level 0; away
    from the region's edges they are the whole slide's (the offset is a multiple of the tile
    stride, so the tiles there are the same tiles)."""
    region = (48, 96, 960, 816)
    x, y, w, h = region
    ref = reference_geometries(block(y, x, h, w), cfg, offset=(x, y))
    with S.Slide(slides["tags"]) as slide:
        run_fake(slide, cfg, tmp_path / "r", region=region)
    got = geometries(tmp_path / "r" / "s_nuclei.geojson")
    assert got == ref and len(got) > 200
    full = reference_geometries(block(0, 0, H, W), cfg)
    far = 128  # two tiles: the region's edge tiles and its moved-back last tiles differ
    inside = [g for g in got if json.loads(g)["type"] == "Polygon" and all(
        x + far <= px <= x + w - far and y + far <= py <= y + h - far
        for px, py in json.loads(g)["coordinates"][0])]
    assert len(inside) > 50 and set(inside) <= full


def test_resampled_level_polygons_scale_to_level0(slides, block, cfg, tmp_path):
    """--mpp 0.5: level 1 is read as it is; polygons are its pixel edges times 2."""
    with S.Slide(slides["tags"]) as slide:
        level1 = slide.read(1, 0, 0, W // 2, H // 2)
        plan, summary = run_fake(slide, cfg, tmp_path / "half", mpp=0.5,
                                 tissue=S.everywhere(slide, 0.25))
    assert plan.level == 1 and summary["analysis"]["level"] == 1
    ref = reference_geometries(level1, cfg, scale=2.0)
    assert geometries(tmp_path / "half" / "s_nuclei.geojson") == ref and len(ref) > 20
    feature = json.loads((tmp_path / "half" / "s_nuclei.geojson").read_text())["features"][0]
    m = feature["properties"]["measurements"]
    assert m["area_um2"] == pytest.approx(m["area_px"] * 0.25 ** 2)


# ---- resuming ------------------------------------------------------------------------------

def test_stopped_and_resumed_run_is_byte_identical(slides, cfg, tmp_path):
    with S.Slide(slides["tags"]) as slide:
        run_fake(slide, cfg, tmp_path / "a")
        plan, first = run_fake(slide, cfg, tmp_path / "b", stop_after_rows=4)
        assert first is None
        partial = S.partial_dir(tmp_path / "b", "s")
        state = json.loads((partial / "state.json").read_text())
        assert state["rows_done"] == 4 and not (tmp_path / "b" / "s_nuclei.geojson").exists()
        # a kill in the middle of a row leaves bytes after the recorded lengths
        with open(partial / "nuclei.geojson.part", "a") as f:
            f.write(',\n{"half a feature')
        with open(partial / "nuclei.csv.part", "a") as f:
            f.write("999,1.0,")
        calls = 0
        while run_fake(slide, cfg, tmp_path / "b", stop_after_rows=5)[1] is None:
            calls += 1
        assert calls >= 2
    for key in FILES:
        a = S.slide_output_paths(tmp_path / "a", "s")[key].read_bytes()
        b = S.slide_output_paths(tmp_path / "b", "s")[key].read_bytes()
        assert a == b, key
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        p.name for p in (tmp_path / "a").iterdir())  # the partial folder is gone
    json.loads((tmp_path / "b" / "s_nuclei.geojson").read_text())  # valid JSON


def test_other_arguments_are_refused_and_complete_is_skipped(slides, cfg, tmp_path):
    out = tmp_path / "o"
    with S.Slide(slides["tags"]) as slide:
        run_fake(slide, cfg, out, stop_after_rows=2)
        with pytest.raises(UserError, match=r"\.s\.partial: an unfinished run with other "
                                            r"arguments"):
            run_fake(slide, cfg, out, mpp=0.5)
        run_fake(slide, cfg, out)
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        _, again = run_fake(slide, cfg, out)    # complete: returned, nothing rewritten
        assert again["nuclei"]["total"] > 0
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
        with pytest.raises(UserError, match=r"s_nuclei\.geojson: already exists"):
            run_fake(slide, cfg, out, mpp=0.5)
        _, half = run_fake(slide, cfg, out, mpp=0.5, overwrite=True)
        assert half["analysis"]["level"] == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "s_nuclei.csv").write_text("a user's table")
    with S.Slide(slides["tags"]) as slide, pytest.raises(UserError, match="already exists"):
        run_fake(slide, cfg, mine)
    assert (mine / "s_nuclei.csv").read_text() == "a user's table"


# ---- the label store (--label-store) -------------------------------------------------------

def read_table(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def labels_of(out: Path) -> tuple[np.ndarray, dict]:
    store = zarr.open_array(str(out / "s_labels.zarr"), mode="r")
    return store[:], store.attrs.asdict()


def check_store_against_table(labels: np.ndarray, attrs: dict, table: list[dict]) -> None:
    """Every id 1..N has the pixels of the table's row N: area, centroid and box."""
    n = len(table)
    assert n > 20 and attrs["nuclei"] == n
    assert labels.dtype == np.int32 and labels.min() == 0 and labels.max() == n
    assert set(np.unique(labels)) == set(range(n + 1))  # no id outside 1..N, none missing
    (ox, oy), (sx, sy) = attrs["origin"], attrs["scale"]
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)
    r_mean = np.bincount(flat, rows.ravel(), n + 1) / np.maximum(count, 1)
    c_mean = np.bincount(flat, cols.ravel(), n + 1) / np.maximum(count, 1)
    boxes = ndi.find_objects(labels)
    for row in table:
        k = int(row["id"])
        assert float(row["area_px"]) == pytest.approx(count[k] * sx * sy, abs=0.006), k
        assert float(row["x"]) == pytest.approx(ox + (c_mean[k] + 0.5) * sx - 0.5, abs=0.006)
        assert float(row["y"]) == pytest.approx(oy + (r_mean[k] + 0.5) * sy - 0.5, abs=0.006)
        ys, xs = boxes[k - 1]
        assert [int(row[c]) for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")] == [
            int(np.floor(ox + xs.start * sx)), int(np.floor(oy + ys.start * sy)),
            int(np.ceil(ox + xs.stop * sx)), int(np.ceil(oy + ys.stop * sy))], k


def test_label_store_holds_the_table_nuclei(slides, block, cfg, tmp_path, monkeypatch):
    """A region at an offset, chunks of 100 px (not the tile grid's: nuclei straddle chunk
    edges): ids and pixels are the CSV's nuclei, and the map is predict_image's on the crop
    (one store id per reference nucleus, pixel for pixel). Then a resampled grid (scale 2)."""
    monkeypatch.setattr(S, "LABEL_CHUNK", 100)
    region = (48, 96, 960, 816)
    x, y, w, h = region
    out = tmp_path / "r"
    with S.Slide(slides["tags"]) as slide:
        plan, summary = run_fake(slide, cfg, out, region=region, label_store=True)
    store = zarr.open_array(str(out / "s_labels.zarr"), mode="r")
    assert store.shape == (plan.height, plan.width) == (h, w) and store.chunks == (100, 100)
    labels, attrs = labels_of(out)
    assert attrs["origin"] == [x, y] and attrs["scale"] == [1.0, 1.0]
    assert attrs["mpp"] == 0.25 and attrs["slide"] == "tags.tif"
    assert attrs["label_names"] == list(cfg.data.label_names)
    assert summary["files"]["labels"] == "s_labels.zarr" and summary["job"]["label_store"]
    table = read_table(out / "s_nuclei.csv")
    check_store_against_table(labels, attrs, table)
    features = json.loads((out / "s_nuclei.geojson").read_text())["features"]
    assert [f["properties"]["measurements"]["id"] for f in features] == list(
        range(1, len(table) + 1))
    ref = P.predict_image(block(y, x, h, w), fake_predict_fn, cfg, tile=64, overlap=16,
                          batch_size=4).inst
    ref = np.asarray(ref)
    assert ((labels > 0) == (ref > 0)).all()
    pairs = np.unique(np.stack([labels[labels > 0], ref[labels > 0]]), axis=1)
    assert pairs.shape[1] == len(table) == len(np.unique(ref)) - 1  # a bijection of nuclei
    # --mpp 0.5: level 1 as it is, every grid pixel 2 x 2 level-0 pixels
    with S.Slide(slides["tags"]) as slide:
        plan, _ = run_fake(slide, cfg, tmp_path / "half", mpp=0.5,
                           tissue=S.everywhere(slide, 0.25), label_store=True)
    labels, attrs = labels_of(tmp_path / "half")
    assert labels.shape == (H // 2, W // 2) and attrs["scale"] == [2.0, 2.0]
    assert attrs["mpp"] == 0.5 and attrs["origin"] == [0.0, 0.0]
    check_store_against_table(labels, attrs, read_table(tmp_path / "half" / "s_nuclei.csv"))


class _Killed(Exception):
    pass


def test_label_store_resumes_to_the_same_array(slides, cfg, tmp_path, monkeypatch):
    """Stopped after some rows, then 'killed' after a row's store write but before its state:
    the store is ahead of the state, the row runs again, and the finished store equals an
    uninterrupted run's (and so do the tables)."""
    monkeypatch.setattr(S, "LABEL_CHUNK", 128)
    with S.Slide(slides["tags"]) as slide:
        run_fake(slide, cfg, tmp_path / "a", label_store=True)
        assert run_fake(slide, cfg, tmp_path / "b", label_store=True, stop_after_rows=4)[1] is None
        partial = S.partial_dir(tmp_path / "b", "s")
        assert (partial / "labels.zarr" / "zarr.json").exists()
        on_disk = lambda: json.loads((partial / "state.json").read_text())  # noqa: E731
        save = S._SlideRun._save_state

        def killed(run):  # the first row from the 6th on that adds nuclei dies before its state
            if run.state["rows_done"] >= 6 and run.state["nuclei"] > on_disk()["nuclei"]:
                raise _Killed
            save(run)

        monkeypatch.setattr(S._SlideRun, "_save_state", killed)
        with pytest.raises(_Killed):
            run_fake(slide, cfg, tmp_path / "b", label_store=True)
        monkeypatch.setattr(S._SlideRun, "_save_state", save)
        state = on_disk()
        ahead = zarr.open_array(str(partial / "labels.zarr"), mode="r")[:]
        assert state["rows_done"] >= 5 and ahead.max() > state["nuclei"] > 0  # the store is ahead
        calls = 0
        while run_fake(slide, cfg, tmp_path / "b", label_store=True,
                       stop_after_rows=5)[1] is None:
            calls += 1
        assert calls >= 1
    a, attrs_a = labels_of(tmp_path / "a")
    b, attrs_b = labels_of(tmp_path / "b")
    assert np.array_equal(a, b) and attrs_a == attrs_b and a.max() == attrs_a["nuclei"] > 20
    for key in ("geojson", "csv", "summary"):
        assert (S.slide_output_paths(tmp_path / "a", "s")[key].read_bytes()
                == S.slide_output_paths(tmp_path / "b", "s")[key].read_bytes()), key
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        p.name for p in (tmp_path / "a").iterdir())  # the partial folder is gone


def test_label_store_only_when_asked_and_part_of_the_job(slides, cfg, tmp_path):
    out = tmp_path / "o"
    with S.Slide(slides["tags"]) as slide:
        run_fake(slide, cfg, out, stop_after_rows=2)
        assert not (S.partial_dir(out, "s") / "labels.zarr").exists()
        with pytest.raises(UserError, match=r"unfinished run with other arguments "
                                            r"\(label_store: None -> True\)"):
            run_fake(slide, cfg, out, label_store=True)
        _, summary = run_fake(slide, cfg, out)
        assert "labels" not in summary["files"] and "label_store" not in summary["job"]
        assert sorted(p.name for p in out.iterdir()) == sorted(
            S.slide_output_paths(out, "s")[k].name for k in FILES)  # no store without the flag
        with pytest.raises(UserError, match=r"s_nuclei\.geojson: already exists"):
            run_fake(slide, cfg, out, label_store=True)  # complete, but not with a store
        _, summary = run_fake(slide, cfg, out, label_store=True, overwrite=True)
        assert summary["files"]["labels"] == "s_labels.zarr"
        assert labels_of(out)[0].max() == summary["nuclei"]["total"] > 0
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        run_fake(slide, cfg, out, label_store=True)      # complete with its store: skipped
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
        run_fake(slide, cfg, out, label_store=True, overwrite=True)  # a store over a store
        assert labels_of(out)[0].max() == summary["nuclei"]["total"]
        run_fake(slide, cfg, out, overwrite=True)        # another job: its old store goes too
        assert not (out / "s_labels.zarr").exists()
        assert sorted(p.name for p in out.iterdir()) == sorted(before.keys() - {"s_labels.zarr"})
        # a store folder of this stem is in the way of a new job like any other output
        (tmp_path / "mine" / "s_labels.zarr").mkdir(parents=True)
        with pytest.raises(UserError, match=r"s_labels\.zarr: already exists"):
            run_fake(slide, cfg, tmp_path / "mine")
        # an unfinished run that lost its store is damaged, not silently continued
        run_fake(slide, cfg, tmp_path / "lost", label_store=True, stop_after_rows=2)
        shutil.rmtree(S.partial_dir(tmp_path / "lost", "s") / "labels.zarr")
        with pytest.raises(UserError, match=r"damaged \(labels\.zarr is missing\)"):
            run_fake(slide, cfg, tmp_path / "lost", label_store=True)


# ---- bad slides: one line naming the file --------------------------------------------------

def test_bad_slides(slides, tmp_path):
    truncated = tmp_path / "cut.svs"
    data = slides["aperio"].read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.svs: truncated slide"):
        S.Slide(truncated)
    garbage = tmp_path / "junk.ndpi"
    garbage.write_bytes(b"not a slide at all" * 100)
    with pytest.raises(UserError, match=r"junk\.ndpi: not a readable slide"):
        S.Slide(garbage)
    with S.Slide(slides["none"]) as slide:
        assert slide.mpp is None
        with pytest.raises(UserError, match=r"nompp\.tif: the slide has no pixel size .* "
                                            r"--slide-mpp"):
            S.slide_mpp(slide, None)
        assert S.slide_mpp(slide, 0.5) == (0.5, "--slide-mpp")


# ---- the command ---------------------------------------------------------------------------


def cli(args: list[str], cache: Path, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    cmd = [sys.executable, "-m", "tsfd_jax", "predict", *args]
    if kw.get("background"):
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_command_on_slides(slides, tiny_workdir, jax_cache, tmp_path):
    """The tiny random model through the command: every output, nuclei only near the H&E,
    QuPath-shaped GeoJSON; a list file with --shard; a finished slide is skipped."""
    out = tmp_path / "out"
    common = ["--workdir", str(tiny_workdir), "--out", str(out), "--tile", "64"]
    r = cli([*common, "--input", str(slides["tags"])], jax_cache)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tags_nuclei.csv", "tags_nuclei.geojson", "tags_overlay.png",
                     "tags_summary.json", "tags_tissue.png"]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("tags.tif:")]
    assert len(line) == 1 and "nuclei" in line[0] and "mm^2" in line[0]
    summary = json.loads((out / "tags_summary.json").read_text())
    fc = json.loads((out / "tags_nuclei.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == summary["nuclei"]["total"]
    assert summary["nuclei"]["total"] > 0 and summary["tissue"]["area_mm2"] > 0
    for f in fc["features"]:
        p = f["properties"]
        assert p["objectType"] == "detection" and p["classification"]["name"]
        assert {"id", "area_px", "area_um2", "class_prob"} <= set(p["measurements"])
        xs = [v[0] for v in f["geometry"]["coordinates"][0]] if f["geometry"]["type"] == \
            "Polygon" else [v[0] for poly in f["geometry"]["coordinates"] for v in poly[0]]
        assert all(0 <= x <= W for x in xs)
    rows = (out / "tags_nuclei.csv").read_text().splitlines()
    header = rows[0].split(",")
    # Random weights find 'nuclei' on glass too, but only those on the tissue mask (grown by
    # one mask pixel; a mask pixel is 32 level-0 pixels) are kept.
    for line in rows[1:]:
        v = dict(zip(header, line.split(",")))
        assert on_tissue(float(v["x"]), float(v["y"]), 64)
    assert np.asarray(Image.open(out / "tags_overlay.png")).shape == (H, W, 3)
    assert Image.open(out / "tags_tissue.png").size == (38, 31)
    # a list file, split in two shards: each takes its own slide, the finished one is skipped
    listing = tmp_path / "slides.txt"
    listing.write_text(f"{slides['tags']}\n# a comment\n\n{slides['aperio']}\n")
    shard0 = cli([*common, "--input", str(listing), "--shard", "0/2"], jax_cache)
    assert shard0.returncode == 0 and "skipped" in shard0.stdout, shard0.stderr
    shard1 = cli([*common, "--input", str(listing), "--shard", "1/2", "--label-store"],
                 jax_cache)
    assert shard1.returncode == 0, shard1.stderr
    assert (out / "aperio_summary.json").exists() and not (out / "tags_labels.zarr").exists()
    store = zarr.open_array(str(out / "aperio_labels.zarr"), mode="r")
    assert store.shape == (H, W) and store.attrs["slide"] == "aperio.svs"
    assert store[:].max() == summary["nuclei"]["total"]
    assert json.loads((out / "aperio_summary.json").read_text())["job"]["label_store"] is True
    a = json.loads((out / "aperio_nuclei.geojson").read_text())["features"]
    t = fc["features"]
    assert [f["geometry"] for f in a] == [f["geometry"] for f in t]  # same pixels, same nuclei


def test_command_errors_are_one_line(slides, tiny_workdir, tmp_path, capsys):
    out = tmp_path / "out"
    wd = ["--workdir", str(tiny_workdir), "--out", str(out), "--tile", "64"]
    assert "nompp.tif: the slide has no pixel size" in _main_error(
        [*wd, "--input", str(slides["none"])], capsys)
    assert "lies outside the slide" in _main_error(
        [*wd, "--input", str(slides["tags"]), "--region", "0,0,5000,10"], capsys)
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "m.png")
    assert "m.png: tissue mask of 50 x 50 pixels" in _main_error(
        [*wd, "--input", str(slides["tags"]), "--tissue-mask", str(tmp_path / "m.png")], capsys)
    cut = tmp_path / "cut.tif"
    data = slides["tags"].read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    assert "cut.tif: truncated slide" in _main_error([*wd, "--input", str(cut)], capsys)
    assert "--shard 2/2" in _main_error([*wd, "--input", str(slides["tags"]), "--shard", "2/2"],
                                        capsys)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "plain.png")
    assert "--label-store apply to whole slides; the input has none" in _main_error(
        [*wd, "--input", str(tmp_path / "plain.png"), "--label-store"], capsys)
    assert not out.exists()  # nothing written for any of these


def _rows_done(out: Path, stem: str) -> int:
    try:
        return json.loads((S.partial_dir(out, stem) / "state.json").read_text())["rows_done"]
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_sigkill_mid_slide_then_restart_gives_identical_outputs(slides, tiny_workdir, jax_cache,
                                                                tmp_path):
    common = ["--workdir", str(tiny_workdir), "--tile", "64", "--input", str(slides["tags"])]
    whole = cli([*common, "--out", str(tmp_path / "whole")], jax_cache)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    proc = cli([*common, "--out", str(out)], jax_cache, background=True)
    deadline = time.time() + 300
    while _rows_done(out, "tags") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _rows_done(out, "tags")
    assert 3 <= done < 21 and not (out / "tags_nuclei.geojson").exists()
    again = cli([*common, "--out", str(out)], jax_cache)
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout
    for name in ("tags_nuclei.geojson", "tags_nuclei.csv", "tags_summary.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_inputs_folders_lists_and_shards(slides, tmp_path):
    from tsfd_jax.commands.predict import list_inputs, my_share, parse_shard

    folder = slides["tags"].parent
    assert [p.name for p in list_inputs(folder)] == ["aperio.svs", "nompp.tif", "tags.tif"]
    listing = tmp_path / "list.txt"
    relative = os.path.relpath(slides["aperio"], tmp_path)  # from the list's folder
    listing.write_text(f"# cohort\n{slides['tags']}\n\n{relative}\n")
    assert list_inputs(listing) == [slides["tags"], tmp_path / relative]
    listing.write_text("missing.svs\n")
    with pytest.raises(UserError, match=r"missing\.svs: no such file \(listed in"):
        list_inputs(listing)
    files = list(range(10))
    shards = [my_share(files, parse_shard(f"{k}/3"), (p, 2)) for k in range(3) for p in range(2)]
    assert sorted(sum(shards, [])) == files  # disjoint, and together everything
    assert parse_shard(None) == (0, 1)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)
