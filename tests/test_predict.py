"""Inference on any-size images (tsfd_jax/predict.py, commands/predict.py): tile grid, stitching
(tiled == untiled with a translation-equivariant fake model, nuclei on seams and corners whole and
once), resampling by mpp, bounded-memory paths, and the real command on a tiny random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from tsfd_jax import predict as P
from tsfd_jax.cli import main
from tsfd_jax.metrics.pq import get_fast_pq
from tsfd_jax.postprocess import postprocess

ROOT = Path(__file__).resolve().parents[1]
C = 5
BACKGROUND = (235, 190, 215)


# ---- a deterministic fake model: a pure per-pixel function (translation-equivariant) -----------

def fake_predict_fn(tiles: np.ndarray, tissue: bool = True) -> dict:
    """Dark pixels are nucleus, their class from the blue channel; pure (near-)black pixels are
    boundary. Tissue probability: a function of the tile's darkness (for the tissue columns)."""
    x = tiles.astype(np.float32)
    grey = x.mean(-1)
    nucleus = (grey < 150) & (grey >= 25)
    cls = np.clip(((x[..., 2] - 40) // 40).astype(int) + 1, 1, C)
    seg = np.zeros(tiles.shape[:3] + (C + 1,), np.float32)
    seg[..., 0] = ~nucleus
    for c in range(1, C + 1):
        seg[..., c] = nucleus & (cls == c)
    out = {"seg_prob": seg, "boundary_prob": (grey < 25).astype(np.float32)}
    if tissue:
        dark = nucleus.mean(axis=(1, 2))
        logits = np.stack([np.full_like(dark, 0.5), dark * 10, np.zeros_like(dark)], -1)
        out["tissue_prob"] = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return out


def untiled(image: np.ndarray, cfg):
    o = fake_predict_fn(image[None])
    return postprocess(o["seg_prob"][0], o["boundary_prob"][0], cfg.postprocess)


def nucleus_colour(c: int) -> tuple[int, int, int]:
    return (60, 40, 60 + 40 * (c - 1))  # grey < 150, blue channel gives class c


@pytest.fixture(scope="module")
def cfg():
    from configs import default

    c = default.get_config()
    c.data.tissue_names = ("pale", "dark", "other")
    return c


def draw_discs(shape, discs) -> np.ndarray:
    """discs: (cy, cx, r, class) -> uint8 RGB image on a pink background."""
    img = np.empty(shape + (3,), np.uint8)
    img[:] = BACKGROUND
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for cy, cx, r, c in discs:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = nucleus_colour(c)
    return img


def same_instances(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# ---- geometry --------------------------------------------------------------------------------

@pytest.mark.parametrize("length,tile,overlap", [(1, 256, 64), (256, 256, 64), (257, 256, 64),
                                                 (1100, 256, 64), (1500, 256, 64), (300, 96, 32),
                                                 (1000, 64, 0), (999, 100, 99)])
def test_tile_starts_cover_with_overlap_and_cores_partition(length, tile, overlap):
    starts = P.tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered[:length].all()
    if length >= tile:
        assert starts[-1] + tile == length  # the last tile ends at the edge: no padding
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap >= o
    cores = P._cores(starts, tile, length)
    assert cores[0][0] == 0 and cores[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))  # a partition
    for s, (lo, hi) in zip(starts, cores):  # every core lies inside its tile
        assert s <= lo < hi <= s + tile


def test_read_tile_mirrors_only_small_images():
    img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    t = P.read_tile(img, 0, 0, 8)
    ref = np.pad(img, ((0, 3), (0, 1), (0, 0)), mode="symmetric")
    np.testing.assert_array_equal(t, ref)
    big = np.arange(20 * 20 * 3).astype(np.uint8).reshape(20, 20, 3)
    np.testing.assert_array_equal(P.read_tile(big, 4, 8, 8), big[4:12, 8:16])


# ---- stitching -------------------------------------------------------------------------------

def test_tiled_equals_untiled_on_synthetic_mosaic(cfg):
    """A 1100 x 1500 mosaic of synthetic H&E patches (flipped/rotated): the stitched nuclei equal
    the untiled post-processing of the whole image (PQ and exact equality)."""
    from tsfd_jax.data import synthetic

    images, _, _ = synthetic.generate(10, 3, 256)
    rng = np.random.default_rng(0)
    mosaic = np.zeros((5 * 256, 6 * 256, 3), np.uint8)
    for r in range(5):
        for c in range(6):
            patch = np.rot90(images[rng.integers(10)].astype(np.uint8), rng.integers(4))
            mosaic[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = patch
    image = np.ascontiguousarray(mosaic[:1100, :1500])
    calls = []

    def counted(tiles):
        calls.append(tiles.shape)
        return fake_predict_fn(tiles)

    pred = P.predict_image(image, counted, cfg, batch_size=7)
    ref = untiled(image, cfg)
    n_tiles = len(P.tile_grid(1100, 1500, 256, 64))
    assert pred.tiles == n_tiles and len(calls) == -(-n_tiles // 7)
    assert all(s == (7, 256, 256, 3) for s in calls)  # a fixed batch shape: one compilation
    assert ref.num_instances > 500
    (dq, sq, pq), _ = get_fast_pq(ref.inst, pred.inst)
    assert pq >= 0.98
    assert same_instances(pred.inst, ref.inst)
    assert pred.num_instances == ref.num_instances
    # ids are contiguous and the table matches the map
    assert np.array_equal(np.unique(pred.inst), np.arange(pred.num_instances + 1))
    np.testing.assert_array_equal(pred.area, np.bincount(pred.inst.ravel())[1:])


def seam_discs(H, W, tile, overlap, r):
    """Discs centred on core cuts (seams), on tile edges and on tile corners."""
    ys, xs = P.tile_starts(H, tile, overlap), P.tile_starts(W, tile, overlap)
    cut_y = [hi for _, hi in P._cores(ys, tile, H)][:-1]
    cut_x = [hi for _, hi in P._cores(xs, tile, W)][:-1]
    edges_y = [y + tile for y in ys[:-1]]
    discs = [(cy, cx, r, 1 + (i % C)) for i, (cy, cx) in
             enumerate([(y, x) for y in cut_y for x in cut_x]                 # seam corners
                       + [(y, 40) for y in cut_y] + [(25, x) for x in cut_x]  # on seams
                       + [(e, W - 30) for e in edges_y]                       # on tile edges
                       + [(ys[1], xs[1])])]                                   # on a tile corner
    return [d for d in discs if r + 2 <= d[0] < H - r - 2 and r + 2 <= d[1] < W - r - 2]


@pytest.mark.parametrize("tile,overlap,r", [(96, 32, 7), (64, 24, 5)])
def test_nuclei_on_seams_and_corners_appear_once_and_whole(cfg, tile, overlap, r):
    H, W = 300, 260
    discs = seam_discs(H, W, tile, overlap, r)
    # Keep discs apart so each is its own nucleus.
    kept = []
    for d in discs:
        if all((d[0] - e[0]) ** 2 + (d[1] - e[1]) ** 2 > (2 * r + 4) ** 2 for e in kept):
            kept.append(d)
    assert len(kept) >= 12
    image = draw_discs((H, W), kept)
    pred = P.predict_image(image, fake_predict_fn, cfg, tile=tile, overlap=overlap, batch_size=5)
    ref = untiled(image, cfg)
    assert pred.num_instances == ref.num_instances == len(kept)
    yy, xx = np.mgrid[:H, :W]
    for cy, cx, rad, c in kept:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad
        ids = np.setdiff1d(pred.inst[disc], [0])  # (the opening trims the disc's rim)
        assert len(ids) == 1, (cy, cx, ids)  # once, never split
        k = ids[0]
        ref_id = ref.inst[cy, cx]
        np.testing.assert_array_equal(pred.inst == k, ref.inst == ref_id)  # whole: same pixels
        assert pred.classes[k - 1] == c
        assert pred.class_probs[k - 1, c] == pytest.approx(1.0)


def test_nucleus_wider_than_the_overlap_is_kept_once(cfg):
    """A nucleus no tile holds whole (diameter 41 > overlap 16) is kept once, not duplicated."""
    image = draw_discs((200, 200), [(100, 100, 20, 2), (30, 30, 6, 1)])
    pred = P.predict_image(image, fake_predict_fn, cfg, tile=64, overlap=16)
    yy, xx = np.mgrid[:200, :200]
    big = (yy - 100) ** 2 + (xx - 100) ** 2 <= 400
    ids, counts = np.unique(pred.inst[big], return_counts=True)
    owners = ids[(ids > 0) & (counts * 2 > big.sum() // 8)]
    assert len(owners) == 1  # one copy (its least-cut one), no duplicates stacked at the seam
    assert counts[ids == owners[0]][0] > 0.4 * big.sum()


def test_stitcher_keeps_the_copy_farthest_from_the_tile_edge():
    """Two tiles report the same nucleus; the copy with the larger margin wins in either order."""
    for order in ((0, 1), (1, 0)):
        out = np.zeros((40, 60), np.int32)
        st = P.Stitcher(out, C + 1, 0)
        tiles = {0: (0, 0), 1: (0, 20)}  # 40 x 40 tiles, overlap 20 (columns 20..39)
        masks = {}
        for t, (y0, x0) in tiles.items():
            inst = np.zeros((40, 40), np.int32)
            # the nucleus at image columns 28..33; tile 1 sees it shifted by one pixel
            c0 = 28 - x0 + (1 if t == 1 else 0)
            inst[10:16, c0:c0 + 6] = 1
            masks[t] = inst
        for t in order:
            y0, x0 = tiles[t]
            probs = np.eye(C + 1, dtype=np.float32)[[1 + t]]
            st.add_tile(y0, x0, 40, masks[t], np.array([1 + t]), probs)
        alive = [i for i, a in enumerate(st.alive) if a]
        assert len(alive) == 1
        # tile 0: 40 - 34 = 6 px from its right (interior) edge; tile 1: 29 - 20 = 9 px from
        # its left edge -> tile 1's copy is kept
        assert st.cls[alive[0]] == 2
        assert (out > 0).sum() == 36 and out[10:16, 29:35].all()


def test_predict_without_tissue_head_and_empty_image(cfg):
    img = draw_discs((90, 70), [(40, 30, 6, 3)])
    pred = P.predict_image(img, lambda t: fake_predict_fn(t, tissue=False), cfg, tile=64,
                           overlap=16)
    assert pred.num_instances == 1 and pred.image_tissue_prob is None
    assert pred.tissue.tolist() == [-1] and np.isnan(pred.tissue_prob).all()
    blank = np.full((50, 40, 3), 240, np.uint8)
    empty = P.predict_image(blank, fake_predict_fn, cfg, tile=64, overlap=16)
    assert empty.num_instances == 0 and empty.inst.shape == (50, 40) and not empty.inst.any()
    assert empty.centroid.shape == (0, 2) and empty.bbox.shape == (0, 4)


def test_tissue_of_each_nucleus_is_its_tiles(cfg):
    """Dark tiles say 'dark'; a nucleus is labelled with the tissue of the tile it came from."""
    crowd = [(y, x, 5, 2) for y in range(80, 190, 14) for x in range(80, 190, 14)]
    discs = [(20, 20, 6, 1)] + crowd
    img = draw_discs((200, 200), discs)
    pred = P.predict_image(img, fake_predict_fn, cfg, tile=64, overlap=16)
    names = [pred.tissue_names[t] for t in pred.tissue]
    k_lonely = pred.inst[20, 20] - 1
    k_crowd = pred.inst[136, 136] - 1
    assert names[k_lonely] == "pale" and names[k_crowd] == "dark"
    assert 1 / 3 < pred.tissue_prob[k_crowd] <= 1
    # image level: weighted by nucleus pixels per tile, so the crowded tiles dominate
    assert pred.image_tissue()[0] == "dark"


def test_memory_mapped_path_equals_in_memory(cfg, monkeypatch, tmp_path):
    img = draw_discs((150, 170), [(40, 40, 7, 1), (64, 64, 6, 2), (100, 130, 8, 4)])
    ref = P.predict_image(img, fake_predict_fn, cfg, tile=64, overlap=16)
    monkeypatch.setattr(P, "LARGE_PIXELS", 1000)
    monkeypatch.setattr(P, "_STRIPE", 17)  # stripes that do not divide the image
    pred = P.predict_image(img, fake_predict_fn, cfg, tile=64, overlap=16,
                           scratch_dir=str(tmp_path))
    assert isinstance(pred.inst, np.memmap) and isinstance(pred.class_map, np.memmap)
    np.testing.assert_array_equal(pred.inst, ref.inst)
    np.testing.assert_array_equal(pred.class_map, ref.class_map)
    np.testing.assert_array_equal(pred.bbox, ref.bbox)
    np.testing.assert_allclose(pred.centroid, ref.centroid)
    assert not list(tmp_path.iterdir())  # anonymous temporary files: nothing left behind


# ---- resolution ------------------------------------------------------------------------------

def test_resample_in_stripes_equals_one_resize(monkeypatch):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (203, 131, 3), dtype=np.uint8)
    monkeypatch.setattr(P, "_STRIPE", 16)
    for factor in (2.0, 0.5, 1.37, 0.61):
        out = P.resample_image(img, factor)
        H2, W2 = round(203 * factor), round(131 * factor)
        ref = np.asarray(Image.fromarray(img).resize((W2, H2), Image.Resampling.BILINEAR))
        assert out.shape == ref.shape
        assert np.abs(out.astype(int) - ref).max() <= 1, factor


def test_mpp_rescales_to_the_model_and_back(cfg):
    """Nuclei drawn at 0.5 um/px (half size): with --mpp 0.5 the model sees them at 0.25 and the
    result comes back on the image's own pixels; within 10 % nothing is resampled."""
    discs = [(30, 30, 2.6, 1), (30, 80, 2.6, 2), (75, 50, 2.6, 3), (90, 100, 2.6, 5)]
    img = draw_discs((120, 130), discs)
    pred = P.predict_image(img, fake_predict_fn, cfg, tile=64, overlap=16, mpp=0.5)
    assert pred.scale == 2.0 and pred.inst.shape == (120, 130)
    assert pred.num_instances == 4
    # independent reference: one whole-image resize, the fake model, nearest back to 120 x 130
    big = np.asarray(Image.fromarray(img).resize((260, 240), Image.Resampling.BILINEAR))
    ref = untiled(big, cfg).inst
    rows = np.minimum(((np.arange(120) + 0.5) * 2).astype(int), 239)
    cols = np.minimum(((np.arange(130) + 0.5) * 2).astype(int), 259)
    assert same_instances(pred.inst, ref[np.ix_(rows, cols)])
    yy, xx = np.mgrid[:120, :130]
    for cy, cx, r, c in discs:
        k = pred.inst[cy, cx]
        assert k > 0 and pred.classes[k - 1] == c
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        assert 0.5 * disc.sum() <= pred.area[k - 1] <= 1.5 * disc.sum()
        np.testing.assert_allclose(pred.centroid[k - 1], (cx, cy), atol=1.0)
    # measured on the returned map
    np.testing.assert_array_equal(pred.area, np.bincount(pred.inst.ravel())[1:])
    # unresampled these nuclei (21 px) fall below min_size (22 px): the resampling matters
    assert P.predict_image(img, fake_predict_fn, cfg, tile=64, overlap=16).num_instances < 4
    near = P.predict_image(img, fake_predict_fn, cfg, tile=64, overlap=16, mpp=0.26)
    assert near.scale == 1.0
    assert P.rescale_factor(0.25 * 1.11, cfg) == pytest.approx(1.11)
    cfg20 = cfg.copy_and_resolve_references()
    cfg20.data.mpp = 0.5
    assert P.rescale_factor(0.5, cfg20) == 1.0 and P.model_mpp(cfg20) == 0.5


# ---- the real model: a tiny random workdir ---------------------------------------------------

def make_tiny_workdir(path: Path):
    """config.json + an orbax checkpoint in the layout of tsfd_jax/checkpoints.py, random weights
    (no compilation: shapes from eval_shape). The output heads are amplified so that the noise
    crosses the 0.5 thresholds and post-processing finds 'nuclei'."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from configs import tiny
    from tsfd_jax.models.tsfd import build_model
    from tsfd_jax.models.tsfd import input_shape

    cfg = tiny.get_config()
    model = build_model(cfg)
    shapes = jax.eval_shape(lambda k: model.init({"params": k, "dropout": k},
                                                 jnp.zeros(input_shape(cfg)), train=False),
                            jax.random.key(0))
    rng = np.random.default_rng(0)

    def fill(key_path, s):
        names = [getattr(k, "key", "") for k in key_path]
        if names[-1] in ("var", "scale"):
            return np.ones(s.shape, s.dtype)
        if names[-1] in ("mean", "bias"):
            return np.zeros(s.shape, s.dtype)
        gain = 1000.0 if any(n in ("seg_head", "boundary_head") for n in names) else 1.0
        fan_in = max(int(np.prod(s.shape[:-1])), 1)
        return (gain * rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(s.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    path.mkdir(parents=True)
    (path / "config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
    manager = ocp.CheckpointManager((path / "checkpoints").absolute(),
                                    item_names=("state", "data_iter"))
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"params": variables["params"], "batch_stats": variables["batch_stats"],
         "step": np.int32(3)})))
    manager.wait_until_finished()
    manager.close()
    return cfg


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("predict") / "workdir"
    make_tiny_workdir(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_workdir):
    from tsfd_jax.checkpoints import restore_variables
    from tsfd_jax.evaluate_run import load_run_config

    cfg = load_run_config(tiny_workdir)
    variables, step = restore_variables(tiny_workdir, "best")
    assert step == 3 and set(variables) == {"params", "batch_stats"}
    return cfg, P.make_predict_fn(cfg, variables, tile=64)


def test_a_checkpoint_is_read_once_until_it_is_saved_again(tiny_workdir, monkeypatch):
    import orbax.checkpoint as ocp

    from tsfd_jax.checkpoints import restore_variables

    first, step = restore_variables(tiny_workdir, "best")
    reads = []
    real = ocp.CheckpointManager.restore
    monkeypatch.setattr(ocp.CheckpointManager, "restore",
                        lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    again, _ = restore_variables(tiny_workdir, "best")
    assert reads == [] and again is not first
    jax.tree.map(np.testing.assert_array_equal, again, first)
    folder = tiny_workdir / "checkpoints" / str(step)  # saved again: a new folder, a new mtime
    st = folder.stat()
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    restore_variables(tiny_workdir, "best")
    assert reads == [1]


def test_make_predict_fn_contract(tiny_model):
    cfg, fn = tiny_model
    tiles = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    out = fn(tiles)
    assert out["seg_prob"].shape == (8, 64, 64, len(cfg.data.label_names))
    assert out["boundary_prob"].shape == (8, 64, 64)
    assert out["tissue_prob"].shape == (8, len(cfg.data.tissue_names))
    np.testing.assert_allclose(out["seg_prob"].sum(-1), 1, atol=1e-5)
    assert ((out["boundary_prob"] >= 0) & (out["boundary_prob"] <= 1)).all()
    from tsfd_jax.errors import UserError

    with pytest.raises(UserError, match="multiple of 32"):
        P.make_predict_fn(cfg, {}, tile=40)  # 40 x 2 = 80 px input: not a multiple of 32


def test_real_images_end_to_end(shared_data, tiny_model, tmp_path):
    """The tiny random model on the real H&E samples and NuCLS tiles: every output is written
    and they agree with each other."""
    from tsfd_jax.exports import write_outputs
    from tsfd_jax.image_io import read_image

    cfg, fn = tiny_model
    files = sorted((shared_data / "he_samples").glob("*.png"))
    files += sorted((shared_data / "nucls" / "test").glob("*.png"))[:2]
    assert len(files) >= 4
    found = 0
    for f in files:
        image = read_image(f)
        pred = P.predict_image(image, fn, cfg, tile=64, batch_size=8)
        paths = write_outputs(pred, tmp_path, f.stem, cfg.data.label_names, image=image)
        assert set(paths) == {"instances", "classes", "csv", "geojson", "overlay", "pannuke"}
        inst = np.load(paths["instances"], allow_pickle=False)
        np.testing.assert_array_equal(inst, pred.inst)
        assert inst.shape == image.shape[:2]
        K = pred.num_instances
        found += K
        assert np.array_equal(np.unique(inst), np.arange(K + 1))
        rows = paths["csv"].read_text().strip().splitlines()
        assert len(rows) == K + 1
        features = json.loads(paths["geojson"].read_text())["features"]
        assert len(features) == K
        layout = np.load(paths["pannuke"], allow_pickle=False)
        assert layout.shape == (256, 256, len(cfg.data.label_names))
        assert np.array_equal(layout[..., -1] == 1, inst == 0)
        assert np.asarray(Image.open(paths["overlay"])).shape == image.shape
    assert found > 0  # the amplified random heads do produce 'nuclei'


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
    """A persistent compilation cache shared by the command runs (the second run skips XLA)."""
    return tmp_path_factory.mktemp("jax_cache")


def _run_cli(args: list[str], cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return subprocess.run([sys.executable, "-m", "tsfd_jax", "predict", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_command_end_to_end(tiny_workdir, tmp_path, jax_cache):
    """The real command on a 300 x 200 image: exit 0, every output, one summary line; a second
    run refuses to overwrite and changes nothing; --overwrite replaces."""
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    discs = [(rng.uniform(0, 200), rng.uniform(0, 300), rng.uniform(4, 9), 1) for _ in range(30)]
    Image.fromarray(draw_discs((200, 300), discs)).save(inp / "slide.png")
    out = tmp_path / "out"
    r = _run_cli(["--workdir", str(tiny_workdir), "--input", str(inp), "--out", str(out),
                  "--tile", "64", "--checkpoint", "last"], jax_cache)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["slide_classes.png", "slide_instances.npy", "slide_nuclei.csv",
                     "slide_nuclei.geojson", "slide_overlay.png"]
    summary = [line for line in r.stdout.splitlines() if line.startswith("slide.png:")]
    assert len(summary) == 1 and "300x200 px" in summary[0] and "nuclei" in summary[0]
    inst = np.load(out / "slide_instances.npy", allow_pickle=False)
    assert inst.shape == (200, 300) and inst.dtype == np.int32
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _run_cli(["--workdir", str(tiny_workdir), "--input", str(inp / "slide.png"),
                      "--out", str(out), "--tile", "64"], jax_cache)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    forced = _run_cli(["--workdir", str(tiny_workdir), "--input", str(inp / "slide.png"),
                       "--out", str(out), "--tile", "64", "--overwrite", "--format", "tif"],
                      jax_cache)
    assert forced.returncode == 0, forced.stderr
    assert (out / "slide_instances.tif").exists() and (out / "slide_classes.tif").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_device_gpu_without_gpu_is_one_line_error(tiny_workdir, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(draw_discs((40, 40), [])).save(img)
    r = _run_cli(["--workdir", str(tiny_workdir), "--input", str(img), "--out",
                  str(tmp_path / "o"), "--device", "gpu"])
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 2 and r.stderr.startswith("error: --device gpu")
        assert r.stderr.strip().count("\n") == 0
        assert not (tmp_path / "o").exists()


# ---- bad input: one line, exit code 2, nothing written ---------------------------------------

def _main_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["predict", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err


@pytest.fixture()
def good_image(tmp_path) -> Path:
    p = tmp_path / "inputs" / "good.png"
    p.parent.mkdir()
    Image.fromarray(draw_discs((64, 64), [(30, 30, 6, 1)])).save(p)
    return p


def test_bad_inputs_fail_before_writing(tiny_workdir, good_image, tmp_path, capsys):
    import tifffile

    out = tmp_path / "out"
    wd = str(tiny_workdir)
    garbage = good_image.parent / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    assert "garbage.png: not a readable image" in _main_error(
        ["--workdir", wd, "--input", str(good_image.parent), "--out", str(out)], capsys)
    garbage.unlink()
    grey = good_image.parent / "grey.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(grey)
    assert "H&E needs colour" in _main_error(
        ["--workdir", wd, "--input", str(grey), "--out", str(out)], capsys)
    zero = tmp_path / "zero.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(zero, np.zeros((0, 5, 3), np.uint8))
    assert "zero-size" in _main_error(["--workdir", wd, "--input", str(zero), "--out", str(out)],
                                      capsys)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty.jpg" in _main_error(["--workdir", wd, "--input", str(empty), "--out", str(out)],
                                      capsys)
    assert "no such file" in _main_error(
        ["--workdir", wd, "--input", str(tmp_path / "missing.png"), "--out", str(out)], capsys)
    assert not out.exists()  # nothing was created for any of these


def test_missing_checkpoint_and_unwritable_output(tiny_workdir, good_image, tmp_path, capsys):
    out = tmp_path / "out"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_workdir / "config.json").read_text())
    assert "no checkpoints" in _main_error(
        ["--workdir", str(bare), "--input", str(good_image), "--out", str(out)], capsys)
    assert "not a training workdir" in _main_error(
        ["--workdir", str(tmp_path / "nowhere"), "--input", str(good_image), "--out", str(out)],
        capsys)
    assert "no checkpoint at step 7" in _main_error(
        ["--workdir", str(tiny_workdir), "--checkpoint", "7", "--input", str(good_image),
         "--out", str(out)], capsys)
    assert not out.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "is not a folder" in _main_error(
        ["--workdir", str(tiny_workdir), "--input", str(good_image), "--out", str(blocker)], capsys)
    assert "cannot write" in _main_error(
        ["--workdir", str(tiny_workdir), "--input", str(good_image), "--out",
         str(blocker / "sub")], capsys)
    assert blocker.read_text() == "x"
    assert "--overlap 64" in _main_error(
        ["--workdir", str(tiny_workdir), "--input", str(good_image), "--out", str(out),
         "--tile", "64", "--overlap", "64"], capsys)
    assert "--tile 40" in _main_error(
        ["--workdir", str(tiny_workdir), "--input", str(good_image), "--out", str(out),
         "--tile", "40"], capsys)
    assert not out.exists()


def test_same_stem_twice_and_existing_outputs_are_refused(tiny_workdir, good_image, capsys):
    folder = good_image.parent
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "good.jpg")
    out = folder.parent / "out"
    assert "same name stem" in _main_error(
        ["--workdir", str(tiny_workdir), "--input", str(folder), "--out", str(out)], capsys)
    (folder / "good.jpg").unlink()
    out.mkdir()
    (out / "good_nuclei.csv").write_text("mine")
    assert "good_nuclei.csv: already exists" in _main_error(
        ["--workdir", str(tiny_workdir), "--input", str(folder), "--out", str(out)], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["good_nuclei.csv"]
    assert (out / "good_nuclei.csv").read_text() == "mine"
