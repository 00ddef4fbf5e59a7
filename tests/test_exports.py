"""Outputs of inference (tsfd_jax/exports.py) and reading user images (tsfd_jax/image_io.py):
GeoJSON polygons against shapely (test-only dependency), the nucleus table against skimage's
regionprops, atomic writes, overlay, PanNuke layout; PNG/JPEG/TIFF/BigTIFF, RGBA, 16-bit,
greyscale and broken files."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from shapely import contains_xy
from shapely.geometry import shape
from skimage.measure import regionprops

from tsfd_jax import exports as E
from tsfd_jax.constants import LABEL_NAMES, PANNUKE_CLASS_COLORS
from tsfd_jax.errors import UserError
from tsfd_jax.overlay import class_colors, outline_mask, overlay, overlay_pannuke
from tsfd_jax.image_io import image_info, list_images, read_image
from tsfd_jax.postprocess import to_pannuke_layout
from tsfd_jax.predict import Prediction, predict_image

TISSUES = ("Breast", "Colon")


def signed_area(ring) -> float:
    """Shoelace in the raw (x, y) numbers; > 0 = counter-clockwise as RFC 7946 reads them."""
    x, y = np.asarray(ring, float).T
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def check_geometry(geometry: dict, mask: np.ndarray, x0: int, y0: int) -> None:
    """The geometry is valid, closed, oriented as documented, and covers exactly the mask."""
    assert geometry["type"] in ("Polygon", "MultiPolygon")
    coords = geometry["coordinates"]
    polygons = [coords] if geometry["type"] == "Polygon" else coords
    for rings in polygons:
        assert signed_area(rings[0]) > 0                     # exterior counter-clockwise
        assert all(signed_area(h) < 0 for h in rings[1:])   # holes clockwise
        for ring in rings:
            assert len(ring) >= 5 and ring[0] == ring[-1]    # closed
            assert len({tuple(p) for p in ring[:-1]}) == len(ring) - 1  # no vertex twice
    g = shape(geometry)
    assert g.is_valid, geometry
    assert g.area == pytest.approx(mask.sum())
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    np.testing.assert_array_equal(contains_xy(g, xx + x0 + 0.5, yy + y0 + 0.5), mask)


# ---- polygons --------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))), st.integers(0, 50),
       st.integers(0, 50))
def test_mask_geometry_covers_exactly_the_pixels(mask, x0, y0):
    if not mask.any():
        return
    check_geometry(E.mask_geometry(mask, x0, y0), mask, x0, y0)


def test_mask_geometry_known_shapes():
    one = E.mask_geometry(np.ones((1, 1), bool), 3, 4)
    assert one == {"type": "Polygon", "coordinates": [[[3, 4], [4, 4], [4, 5], [3, 5], [3, 4]]]}
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False  # a hole
    g = E.mask_geometry(ring)
    assert g["type"] == "Polygon" and len(g["coordinates"]) == 2
    assert shape(g).area == 24
    diagonal = np.eye(2, dtype=bool)  # pixels meeting at a corner only: two pieces
    assert E.mask_geometry(diagonal)["type"] == "MultiPolygon"
    # a 4-connected piece whose pixels meet at a corner encloses a hole touching the outline
    loop = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]], bool)
    check_geometry(E.mask_geometry(loop), loop, 0, 0)


# ---- a prediction to export ------------------------------------------------------------------

def disc_image(shape=(120, 150)) -> np.ndarray:
    img = np.empty(shape + (3,), np.uint8)
    img[:] = (235, 190, 215)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for i, (cy, cx, r) in enumerate([(30, 30, 9), (30, 52, 9), (80, 40, 6), (60, 110, 12),
                                     (100, 90, 7), (118, 140, 6)]):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (60, 40, 60 + 40 * (i % 5))
    return img


def fake_fn(tiles):
    x = tiles.astype(np.float32)
    nucleus = x.mean(-1) < 150
    cls = np.clip(((x[..., 2] - 40) // 40).astype(int) + 1, 1, 5)
    seg = np.zeros(tiles.shape[:3] + (6,), np.float32)
    seg[..., 0] = np.where(nucleus, 0.1, 1.0)
    for c in range(1, 6):
        seg[..., c] = np.where(nucleus & (cls == c), 0.9, 0.0)
    tissue = np.tile(np.array([[0.3, 0.7]], np.float32), (len(tiles), 1))
    return {"seg_prob": seg, "boundary_prob": np.zeros(tiles.shape[:3], np.float32),
            "tissue_prob": tissue}


@pytest.fixture(scope="module")
def pred_and_image():
    from configs import default

    cfg = default.get_config()
    cfg.data.tissue_names = TISSUES
    image = disc_image()
    pred = predict_image(image, fake_fn, cfg, tile=64, overlap=16)
    assert pred.num_instances == 6
    return pred, image


def test_csv_columns_and_values_match_the_instance_map(pred_and_image, tmp_path):
    pred, image = pred_and_image
    paths = E.write_outputs(pred, tmp_path, "s", LABEL_NAMES, image=image)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0].keys())
    assert header == ["id", "x", "y", "area_px", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
                      "label", "class", "class_prob"] + [f"prob_{n}" for n in LABEL_NAMES] + [
                      "tissue", "tissue_prob"]
    inst = np.load(paths["instances"], allow_pickle=False)
    props = {p.label: p for p in regionprops(inst)}  # independent reference
    assert len(rows) == len(props) == pred.num_instances
    for row in rows:
        p = props[int(row["id"])]
        assert int(row["area_px"]) == p.area
        assert float(row["y"]) == pytest.approx(p.centroid[0], abs=0.006)
        assert float(row["x"]) == pytest.approx(p.centroid[1], abs=0.006)
        y0, x0, y1, x1 = p.bbox
        box = [int(row[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
        assert box == [x0, y0, x1, y1]
        label = int(row["label"])
        assert row["class"] == LABEL_NAMES[label]
        assert np.all(pred.class_map[inst == p.label] == label)
        probs = [float(row[f"prob_{n}"]) for n in LABEL_NAMES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-3)
        assert float(row["class_prob"]) == pytest.approx(0.9, abs=1e-4) == probs[label]
        assert row["tissue"] == "Colon" and float(row["tissue_prob"]) == pytest.approx(0.7)


def test_geojson_is_a_qupath_feature_collection(pred_and_image, tmp_path):
    pred, image = pred_and_image
    paths = E.write_outputs(pred, tmp_path, "s", LABEL_NAMES, image=image)
    doc = json.loads(paths["geojson"].read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == pred.num_instances
    inst = np.load(paths["instances"], allow_pickle=False)
    for k, feature in enumerate(doc["features"], start=1):
        assert feature["type"] == "Feature"
        props = feature["properties"]
        assert props["objectType"] == "detection"
        label = int(pred.classes[k - 1])
        assert props["classification"] == {"name": LABEL_NAMES[label],
                                            "color": list(PANNUKE_CLASS_COLORS[label - 1])}
        m = props["measurements"]
        assert m["id"] == k and m["area_px"] == int((inst == k).sum())
        assert set(m) == {"id", "area_px", "class_prob", "tissue_prob"} | {
            f"prob_{n}" for n in LABEL_NAMES}
        assert all(isinstance(v, (int, float)) for v in m.values())  # QuPath: numbers only
        assert props["tissue"] == "Colon"
        check_geometry(feature["geometry"], inst == k, 0, 0)
        poly = shape(feature["geometry"])
        # pixel corners: the polygon centroid is the pixel-centre centroid + half a pixel
        np.testing.assert_allclose([poly.centroid.x, poly.centroid.y],
                                   pred.centroid[k - 1] + 0.5, atol=1e-9)


def test_overlay_outlines_in_class_colours(pred_and_image):
    from skimage.segmentation import find_boundaries

    pred, image = pred_and_image
    out = overlay(image, pred.inst, pred.class_map, LABEL_NAMES)
    edge = find_boundaries(pred.inst, connectivity=1, mode="inner") & (pred.inst > 0)
    np.testing.assert_array_equal(outline_mask(pred.inst), edge)
    assert edge.sum() > 50
    np.testing.assert_array_equal(out[~edge], image[~edge])
    colours = np.array([(0, 0, 0)] + list(PANNUKE_CLASS_COLORS), np.uint8)
    np.testing.assert_array_equal(out[edge], colours[pred.class_map[edge]])


def test_overlay_of_the_pannuke_layout_equals_the_instance_overlay(pred_and_image):
    """The report draws PanNuke-layout masks (ids per class channel, repeated across channels):
    the same picture as predict's overlay of the instance and class maps."""
    pred, image = pred_and_image
    masks = to_pannuke_layout(pred.inst, pred.classes, len(LABEL_NAMES) - 1)
    for c in range(masks.shape[-1] - 1):  # ids 1..n per class channel, as PanNuke's files have
        masks[..., c] = np.unique(masks[..., c], return_inverse=True)[1].reshape(masks.shape[:2])
    assert len(np.unique(masks[..., :-1])) - 1 < pred.num_instances
    np.testing.assert_array_equal(overlay_pannuke(image, masks, LABEL_NAMES),
                                  overlay(image, pred.inst, pred.class_map, LABEL_NAMES))


def test_pannuke_layout_only_for_256_images(tmp_path):
    from configs import default

    cfg = default.get_config()
    img = np.full((256, 256, 3), 235, np.uint8)
    img[100:120, 100:125] = (60, 40, 100)
    img[10:30, 200:220] = (60, 40, 220)
    pred = predict_image(img, fake_fn, cfg)
    paths = E.write_outputs(pred, tmp_path, "p", LABEL_NAMES, image=img)
    layout = np.load(paths["pannuke"], allow_pickle=False)
    assert layout.dtype == np.int32 and layout.shape == (256, 256, 6)
    np.testing.assert_array_equal(layout, to_pannuke_layout(pred.inst, pred.classes, 5))
    assert layout[110, 110, 1] > 0 and layout[20, 210, 4] > 0  # classes 2 and 5
    small = E.output_paths(tmp_path, "q", image_shape=(255, 256))
    assert "pannuke" not in small


def test_probability_picture_shows_what_the_network_outputs():
    """The evaluation's probabilities.png row: image | 1 - p(background) | boundary probability
    (grey levels of 0..1) | the arg-max class in its colour where the foreground is above 0.5."""
    from tsfd_jax.report import probability_picture

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    logits = rng.normal(size=(6, 5, len(LABEL_NAMES))) * 3
    seg = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    bdr = rng.uniform(size=(6, 5))
    pic = probability_picture(image, seg, bdr, LABEL_NAMES)
    assert pic.shape == (6, 20, 3) and pic.dtype == np.uint8
    np.testing.assert_array_equal(pic[:, :5], image)
    np.testing.assert_allclose(pic[:, 5:10, 0], (1 - seg[..., 0]) * 255, atol=0.5)
    np.testing.assert_allclose(pic[:, 10:15, 1], bdr * 255, atol=0.5)
    colors = np.asarray(class_colors(LABEL_NAMES))
    for y, x in np.ndindex(6, 5):
        want = colors[seg[y, x, 1:].argmax() + 1] if seg[y, x, 0] < 0.5 else (0, 0, 0)
        np.testing.assert_array_equal(pic[y, 15 + x], want)


def test_tif_maps_and_no_overlay_without_image(pred_and_image, tmp_path):
    pred, _ = pred_and_image
    paths = E.write_outputs(pred, tmp_path, "t", LABEL_NAMES, instance_format="tif")
    assert "overlay" not in paths and paths["instances"].suffix == ".tif"
    np.testing.assert_array_equal(tifffile.imread(paths["instances"]), pred.inst)
    np.testing.assert_array_equal(tifffile.imread(paths["classes"]), pred.class_map)


def test_writes_are_atomic_and_never_overwrite(pred_and_image, tmp_path, monkeypatch):
    pred, image = pred_and_image
    (tmp_path / "s_nuclei.csv").write_text("mine")
    with pytest.raises(UserError, match="s_nuclei.csv: already exists"):
        E.write_outputs(pred, tmp_path, "s", LABEL_NAMES, image=image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_nuclei.csv"]

    def broken(f, *a):
        f.write('{"type": "FeatureCollection", "features": [')
        raise RuntimeError("disk full")

    monkeypatch.setattr(E, "_write_geojson", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        E.write_outputs(pred, tmp_path, "s", LABEL_NAMES, image=image, overwrite=True)
    # nothing half-written: no new files, no temporaries, the user's file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_nuclei.csv"]
    assert (tmp_path / "s_nuclei.csv").read_text() == "mine"
    monkeypatch.undo()
    paths = E.write_outputs(pred, tmp_path, "s", LABEL_NAMES, image=image, overwrite=True)
    assert (tmp_path / "s_nuclei.csv").read_text() != "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


def test_hand_made_shapes_and_other_label_sets(tmp_path):
    """Holes, corner-touching pieces and a two-class label set (palette colours)."""
    inst = np.zeros((12, 14), np.int32)
    inst[1:6, 1:6] = 1
    inst[3, 3] = 0                      # a hole
    inst[7, 7] = inst[8, 8] = 2         # corner-touching pieces
    inst[2:10, 10:13] = 3
    labels = ("bg", "tumor", "other")
    K = 3
    objs = ndi.find_objects(inst)
    bbox = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in objs])
    pred = Prediction(
        inst=inst, class_map=np.array([0, 1, 2, 1], np.uint8)[inst],
        centroid=np.array(ndi.center_of_mass(inst > 0, inst, range(1, K + 1)))[:, ::-1],
        area=np.bincount(inst.ravel())[1:], bbox=bbox, classes=np.array([1, 2, 1], np.int32),
        class_probs=np.full((K, 3), 1 / 3, np.float32), tissue=np.full(K, -1, np.int32),
        tissue_prob=np.full(K, np.nan, np.float32), image_tissue_prob=None, label_names=labels,
        tissue_names=())
    paths = E.write_outputs(pred, tmp_path, "h", labels)
    doc = json.loads(paths["geojson"].read_text())
    kinds = [f["geometry"]["type"] for f in doc["features"]]
    assert kinds == ["Polygon", "MultiPolygon", "Polygon"]
    assert len(doc["features"][0]["geometry"]["coordinates"]) == 2  # exterior + hole
    for k, f in enumerate(doc["features"], start=1):
        check_geometry(f["geometry"], inst == k, 0, 0)
        assert "tissue" not in f["properties"]
        assert "tissue_prob" not in f["properties"]["measurements"]
    colour = doc["features"][1]["properties"]["classification"]["color"]
    assert colour == list(class_colors(labels)[2])
    rows = list(csv.DictReader(open(paths["csv"], newline="")))
    assert [r["class"] for r in rows] == ["tumor", "other", "tumor"]
    assert rows[0]["tissue"] == "" and rows[0]["tissue_prob"] == ""
    assert "pannuke" not in paths


# ---- reading images --------------------------------------------------------------------------

def png16(path: Path, a: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[r].astype(">u2").tobytes() for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)


def test_read_png_jpeg_palette_rgba(rgb, tmp_path):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), rgb)  # alpha dropped
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    jpg = read_image(tmp_path / "c.jpg")
    assert jpg.shape == rgb.shape and jpg.dtype == np.uint8
    np.testing.assert_array_equal(jpg, np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")))
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "d.png")
    np.testing.assert_array_equal(read_image(tmp_path / "d.png"), np.asarray(pal.convert("RGB")))
    assert image_info(tmp_path / "b.png").channels == 4


def test_read_tiffs(rgb, tmp_path):
    variants = {
        "plain.tif": dict(), "big.tif": dict(bigtiff=True),
        "zlib.tif": dict(compression="zlib", tile=(16, 16)),
    }
    for name, kw in variants.items():
        tifffile.imwrite(tmp_path / name, rgb, **kw)
        np.testing.assert_array_equal(read_image(tmp_path / name), rgb)
    assert isinstance(read_image(tmp_path / "big.tif"), np.memmap)  # no copy of the pixels
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb",
                     planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), rgb)
    Image.fromarray(rgb).save(tmp_path / "lzw.tiff", compression="tiff_lzw")  # via Pillow
    np.testing.assert_array_equal(read_image(tmp_path / "lzw.tiff"), rgb)
    tifffile.imwrite(tmp_path / "rgba.tif", np.concatenate([rgb, rgb[..., :1]], -1),
                     photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif"), rgb)
    assert image_info(tmp_path / "big.tif").height == 37


def test_16_bit_keeps_the_high_byte_in_png_and_tiff(rgb, tmp_path):
    wide = rgb.astype(np.uint16) * 257 + np.uint16(100)  # full 16-bit range
    wide[0, 0] = 65535
    tifffile.imwrite(tmp_path / "w.tif", wide)
    png16(tmp_path / "w.png", wide)
    a, b = read_image(tmp_path / "w.tif"), read_image(tmp_path / "w.png")
    np.testing.assert_array_equal(a, (wide >> 8).astype(np.uint8))
    np.testing.assert_array_equal(a, b)  # same pixels whichever container
    assert np.abs(a.astype(int) - np.round(wide / 257)).max() <= 1
    tifffile.imwrite(tmp_path / "dark.tif", (rgb.astype(np.uint16) * 16))  # 12-bit data
    with pytest.warns(UserWarning, match="12-bit"):
        read_image(tmp_path / "dark.tif")


@pytest.mark.parametrize("make,message", [
    (lambda p: Image.fromarray(np.zeros((9, 9), np.uint8)).save(p / "x.png"), "H&E needs colour"),
    (lambda p: Image.fromarray(np.zeros((9, 9, 2), np.uint8), "LA").save(p / "x.png"),
     "2 channels"),
    (lambda p: tifffile.imwrite(p / "x.png", np.zeros((9, 9), np.uint16)), "H&E needs colour"),
    (lambda p: tifffile.imwrite(p / "x.png", np.zeros((9, 9, 3), np.float32)), "floating-point"),
    (lambda p: tifffile.imwrite(p / "x.png", np.zeros((9, 9, 3), np.int16)), "signed integer"),
    (lambda p: tifffile.imwrite(p / "x.png", np.zeros((2, 9, 9, 3), np.uint8)), "stack"),
    (lambda p: tifffile.imwrite(p / "x.png", np.zeros((9, 9, 5), np.uint8),
                                photometric="minisblack", planarconfig="contig"), "5 channels"),
    (lambda p: (p / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken"), "not a readable image"),
    (lambda p: (p / "x.png").write_bytes(b""), "not a readable image"),
])
def test_bad_images_raise_one_line_naming_the_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        image_info(tmp_path / "x.png")
        read_image(tmp_path / "x.png")
    assert str(e.value).startswith(str(tmp_path / "x.png")) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=message):
        read_image(tmp_path / "x.png")


def test_truncated_image_and_folders(rgb, tmp_path):
    Image.fromarray(rgb).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="t.png"):
        read_image(tmp_path / "t.png")
    with pytest.raises(UserError, match="no such file"):
        read_image(tmp_path / "none.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        list_images(tmp_path / "empty")
    (tmp_path / "sub").mkdir()
    for name in ("b.PNG", "a.tif", "c.txt", ".hidden.png"):
        (tmp_path / "sub" / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path / "sub")] == ["a.tif", "b.PNG"]
