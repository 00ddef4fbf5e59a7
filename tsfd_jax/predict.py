"""Inference on any-size H&E images: tiles -> model -> post-processing -> stitched nuclei.

The network sees tiles of the label size it was trained on (``cfg.data.image_size``, 256 for
PanNuke; it resizes them to ``cfg.input.size`` itself, PAPER §3.2), every tile is post-processed
on its own (PAPER §4.3, ``postprocess.py``), and the tiles' nuclei are stitched into one instance
map of the whole image:

* **Grid.** Tiles overlap by ``overlap`` pixels (default a quarter of the tile: 64 at 256); the
  last tile of a row or column is moved back to end at the image edge, so real pixels fill every
  tile. Only an image smaller than a tile is padded, by mirroring (half-sample symmetric), so the
  network sees tissue-like context rather than a hard edge; what falls in the padding is dropped.
* **Stitching rule.** Every nucleus of every tile is a candidate, except one that comes within
  ``EDGE_BAND`` (4) pixels of an interior tile edge (an edge that is not an image edge): it is
  taken as cut and kept only when its centroid lies in the tile's core (the cores split every
  overlap in the middle and partition the image), which keeps nuclei too big for any tile and
  drops the fragments that morphology leaves along tile edges. Two candidates of different
  tiles that overlap by more than half of the smaller one are the same nucleus: the copy lying
  farthest from its tile's interior edges is kept, whole (ties: the first seen, raster order of
  tiles). A candidate that only touches a kept nucleus keeps its free pixels. Assumption: a
  nucleus narrower than ``overlap - 2 * EDGE_BAND`` (56 px = 14 um at 256 / 64) lies wholly
  inside some tile away from its edges, so it comes out once and uncut; a wider one is kept as
  its least-cut copy but may come out cut or split at a seam.
* **Bounded memory.** Tiles go through ``predict_fn`` in batches and are stitched at once; only
  one batch of probabilities exists at a time. The only image-size arrays are the instance and
  class maps (and a resampled image): memory maps on anonymous temporary files for images above
  ``LARGE_PIXELS``, filled and read in stripes of rows.
* **Resolution.** With ``mpp`` (micrometres per pixel of the image) the image is resampled to
  the model's resolution (``cfg.data.mpp``, else PanNuke's 0.25) when they differ by more than
  ``MPP_TOLERANCE`` (training augmentation already covers scales 0.8-1.2); the instance map comes
  back to the image's pixels by nearest neighbour and areas, centroids and boxes are measured on
  that map.

The model is injected: ``predict_fn(tiles uint8 (B, t, t, 3)) -> {'seg_prob' (B, t, t, C + 1),
'boundary_prob' (B, t, t), optional 'tissue_prob' (B, T)}``; ``make_predict_fn`` builds it from a
config and trained variables.
"""

from __future__ import annotations

import tempfile
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
import scipy.ndimage as ndi
from PIL import Image

from tsfd_jax.constants import PANNUKE_MPP
from tsfd_jax.errors import UserError
from tsfd_jax.forward import configured_tta, make_tile_forward
from tsfd_jax.models.tsfd import build_model
from tsfd_jax.ops.preprocess import at_label_size, input_size_at, model_inputs
from tsfd_jax.postprocess_workers import postprocess_stream

PredictFn = Callable[[np.ndarray], dict]
LARGE_PIXELS = 1 << 26      # above this (8192^2 px) image-size maps are temporary memory maps
MPP_TOLERANCE = 0.10        # relative mpp difference accepted without resampling
_STRIPE = 1024              # rows per pass over image-size maps
_NO_EDGE = 1 << 30          # margin of a tile side that is an image edge
EDGE_BAND = 4               # px: a nucleus this close to an interior tile edge counts as cut


@dataclass
class Prediction:
    """Nuclei of one image.

    inst: (H, W) int32 instance ids, 0 background, 1..K in raster order of their tiles.
    class_map: (H, W) uint8 label of every pixel (0 background).
    Per nucleus k (row k - 1): centroid (K, 2) float64 x, y in pixels; area (K,) int64 pixels;
    bbox (K, 4) int64 x0, y0, x1, y1 with exclusive ends; classes (K,) int32 labels 1..C;
    class_probs (K, C + 1) float32 mean softmax over the nucleus (in the tile it was taken from);
    tissue (K,) int32 the arg-max tissue of that tile (-1 without a tissue head) and
    tissue_prob (K,) float32 its probability (NaN without).
    image_tissue_prob: (T,) tile tissue probabilities averaged with weights = nucleus pixels per
    tile (plain mean when no nuclei), None without a tissue head.
    scale: model pixels per image pixel (1.0 when the image was not resampled).
    """
    inst: np.ndarray
    class_map: np.ndarray
    centroid: np.ndarray
    area: np.ndarray
    bbox: np.ndarray
    classes: np.ndarray
    class_probs: np.ndarray
    tissue: np.ndarray
    tissue_prob: np.ndarray
    image_tissue_prob: np.ndarray | None
    label_names: tuple[str, ...]
    tissue_names: tuple[str, ...]
    scale: float = 1.0
    tiles: int = 0
    info: dict = field(default_factory=dict)

    @property
    def num_instances(self) -> int:
        return int(len(self.classes))

    @property
    def ids(self) -> np.ndarray:
        return np.arange(1, self.num_instances + 1, dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        """Nuclei per class name (every class, zero included)."""
        counts = np.bincount(self.classes, minlength=len(self.label_names))
        return {name: int(counts[i]) for i, name in enumerate(self.label_names) if i > 0}

    def image_tissue(self) -> tuple[str, float] | None:
        if self.image_tissue_prob is None or not len(self.image_tissue_prob):
            return None
        i = int(np.argmax(self.image_tissue_prob))
        name = self.tissue_names[i] if i < len(self.tissue_names) else str(i)
        return name, float(self.image_tissue_prob[i])


# ---- geometry ------------------------------------------------------------------------------

def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride ``tile - overlap``, the last one ending at the edge."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, length - tile, stride)) + [length - tile]


def _cores(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Core interval of every tile along one axis: split at the middle of each overlap, so the
    cores partition [0, length)."""
    cuts = [0] + [(b + a + tile) // 2 for a, b in zip(starts, starts[1:])] + [length]
    return list(zip(cuts[:-1], cuts[1:]))


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(y0, x0) of every tile in raster order."""
    return [(y, x) for y in tile_starts(height, tile, overlap)
            for x in tile_starts(width, tile, overlap)]


def tile_cores(height: int, width: int, tile: int,
               overlap: int) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """(y0, x0) -> core (r0, r1, c0, c1) in image pixels; the cores partition the image."""
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    cy, cx = _cores(ys, tile, height), _cores(xs, tile, width)
    return {(y, x): (*cy[i], *cx[j]) for i, y in enumerate(ys) for j, x in enumerate(xs)}


def default_overlap(tile: int) -> int:
    """A quarter of the tile (64 px at 256 = 16 um at 0.25 um/px, about two nucleus diameters)."""
    return max(tile // 4, 2)


def _mirror(n: int, length: int) -> np.ndarray:
    """Indices 0..n-1 folded into 0..length-1 by half-sample symmetric mirroring."""
    i = np.arange(n) % (2 * length)
    return np.where(i < length, i, 2 * length - 1 - i)


def read_tile(image: np.ndarray, y0: int, x0: int, tile: int) -> np.ndarray:
    """(tile, tile, 3) uint8 at (y0, x0); mirrored beyond the image (only for small images)."""
    H, W = image.shape[:2]
    if y0 + tile <= H and x0 + tile <= W:
        return np.asarray(image[y0:y0 + tile, x0:x0 + tile, :3])
    rows = y0 + _mirror(tile, H - y0) if y0 + tile > H else np.arange(y0, y0 + tile)
    cols = x0 + _mirror(tile, W - x0) if x0 + tile > W else np.arange(x0, x0 + tile)
    block = np.asarray(image[rows.min():rows.max() + 1, cols.min():cols.max() + 1, :3])
    return block[np.ix_(rows - rows.min(), cols - cols.min())]


def _empty_map(shape: tuple[int, ...], dtype, scratch_dir: str | None) -> np.ndarray:
    if int(np.prod(shape)) <= LARGE_PIXELS:
        return np.zeros(shape, dtype)
    # Anonymous temporary file: disappears when closed, also after a crash.
    f = tempfile.TemporaryFile(prefix="tsfd-predict-", dir=scratch_dir)
    return np.memmap(f, dtype=dtype, mode="w+", shape=shape)


# ---- stitching -----------------------------------------------------------------------------

class Stitcher:
    """Writes the nuclei of overlapping tiles into one instance map (rule: module doc)."""

    def __init__(self, out: np.ndarray, num_labels: int, num_tissues: int):
        self.out = out
        self.H, self.W = out.shape
        self.num_labels = num_labels
        self.num_tissues = num_tissues
        # Per id (index = id; id 0 unused): paste box, pasted area, margin, class, probs, tile.
        self.box: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
        self.area: list[int] = [0]
        self.margin: list[int] = [0]
        self.cls: list[int] = [0]
        self.probs: list[np.ndarray] = [np.zeros(num_labels, np.float32)]
        self.tile_of: list[int] = [-1]
        self.alive: list[bool] = [False]
        self.tile_tissue: list[np.ndarray] = []
        self.tile_fg: list[int] = []

    def add_tile(self, y0: int, x0: int, tile: int, inst: np.ndarray, classes: np.ndarray,
                 class_probs: np.ndarray, tissue_prob: np.ndarray | None = None,
                 core: tuple[int, int, int, int] | None = None) -> None:
        """Stitch one post-processed tile at (y0, x0): inst (t, t) ids 1..k, classes (k,),
        class_probs (k, C + 1), tissue_prob (T,); core (r0, r1, c0, c1) in image pixels (default
        the whole tile)."""
        vh, vw = min(tile, self.H - y0), min(tile, self.W - x0)   # the rest is mirror padding
        inst = inst[:vh, :vw]
        core = core or (y0, y0 + vh, x0, x0 + vw)
        # Distances are measured to interior sides only: an image edge cuts nothing.
        interior = (y0 > 0, y0 + tile < self.H, x0 > 0, x0 + tile < self.W)
        t_index = self._add_tile_stats(int(np.count_nonzero(inst)), tissue_prob)
        for k, sl in enumerate(ndi.find_objects(inst), start=1):
            if sl is None:
                continue
            r0, r1, c0, c1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            sides = (r0, tile - r1, c0, tile - c1)
            margin = min((d for d, inner in zip(sides, interior) if inner), default=_NO_EDGE)
            mask = inst[sl] == k
            if margin < EDGE_BAND:
                # Cut by (or too close to) an interior edge: its whole copy lies in a neighbour.
                # Kept only when its centroid is in this tile's core (a nucleus wider than the
                # overlap has no whole copy); this also drops the fragments that the tile
                # edge's morphology leaves behind.
                rows, cols = np.nonzero(mask)
                cy, cx = y0 + r0 + rows.mean(), x0 + c0 + cols.mean()
                if not (core[0] <= cy < core[1] and core[2] <= cx < core[3]):
                    continue
            self._paste(mask, y0 + r0, x0 + c0, margin, int(classes[k - 1]),
                        np.asarray(class_probs[k - 1], np.float32), t_index)

    def _paste(self, mask: np.ndarray, y: int, x: int, margin: int, cls: int,
               probs: np.ndarray, t_index: int) -> None:
        h, w = mask.shape
        region = self.out[y:y + h, x:x + w]
        under = region[mask]
        ids, counts = np.unique(under[under > 0], return_counts=True)
        area = int(mask.sum())
        same = [int(e) for e, n in zip(ids, counts) if 2 * n > min(area, self.area[e])]
        if any(self.margin[e] >= margin for e in same):
            return  # a copy at least as far from its tile's edges is already kept
        for e in same:
            self._remove(e)
        write = mask & (region == 0)
        if not write.any():
            return
        rows, cols = np.nonzero(write)
        box = (y + rows.min(), y + rows.max() + 1, x + cols.min(), x + cols.max() + 1)
        region[write] = self._new_nucleus(box, int(write.sum()), margin, cls, probs, t_index)

    # Storage hooks: a subclass that streams finished nuclei out (slides.RowStitcher) keeps
    # them in dicts it can prune; the rule above never depends on how they are stored.

    def _add_tile_stats(self, foreground: int, tissue_prob: np.ndarray | None) -> int:
        """Record a tile's nucleus pixels and tissue probabilities; returns its index."""
        self.tile_fg.append(foreground)
        if tissue_prob is not None:
            self.tile_tissue.append(np.asarray(tissue_prob, np.float32))
        return len(self.tile_fg) - 1

    def _new_nucleus(self, box: tuple[int, int, int, int], area: int, margin: int, cls: int,
                     probs: np.ndarray, t_index: int) -> int:
        """Store a pasted nucleus; returns its id (> 0)."""
        self.box.append(box)
        self.area.append(area)
        self.margin.append(margin)
        self.cls.append(cls)
        self.probs.append(probs)
        self.tile_of.append(t_index)
        self.alive.append(True)
        return len(self.area) - 1

    def _remove(self, e: int) -> None:
        r0, r1, c0, c1 = self.box[e]
        block = self.out[r0:r1, c0:c1]
        block[block == e] = 0
        self.alive[e] = False

    def image_tissue_prob(self) -> np.ndarray | None:
        if not self.tile_tissue:
            return None
        p = np.stack(self.tile_tissue)
        w = np.asarray(self.tile_fg, np.float64)
        w = w if w.sum() > 0 else np.ones_like(w)
        return (p * w[:, None]).sum(0) / w.sum()


def _finish(stitch: Stitcher, out: np.ndarray, inst_src: np.ndarray,
            factor: tuple[float, float] | None) -> tuple[np.ndarray, dict]:
    """Renumber kept nuclei 1..K into ``out``, mapping ``inst_src`` (model pixels) back to the
    image's pixels when ``factor`` (model pixels per image pixel, y and x) is given; measure
    every nucleus on the result. Returns (out, per-nucleus columns)."""
    alive = np.flatnonzero(np.asarray(stitch.alive))
    lut = np.zeros(len(stitch.alive), np.int32)
    lut[alive] = np.arange(1, len(alive) + 1, dtype=np.int32)
    K = len(alive)
    H, W = out.shape
    area = np.zeros(K + 1, np.int64)
    sx = np.zeros(K + 1)
    sy = np.zeros(K + 1)
    lo_x = np.full(K + 1, np.iinfo(np.int64).max)
    lo_y = lo_x.copy()
    hi_x = np.full(K + 1, -1, np.int64)
    hi_y = hi_x.copy()
    Hs, Ws = inst_src.shape
    for r in range(0, H, _STRIPE):
        if factor is None:
            block = lut[np.asarray(inst_src[r:r + _STRIPE])]
        else:  # nearest neighbour back to the image's pixel grid
            ys = np.arange(r, min(r + _STRIPE, H))
            ys = np.minimum(((ys + 0.5) * factor[0]).astype(np.int64), Hs - 1)
            xs = np.minimum(((np.arange(W) + 0.5) * factor[1]).astype(np.int64), Ws - 1)
            block = lut[np.asarray(inst_src[ys.min():ys.max() + 1])[np.ix_(ys - ys.min(), xs)]]
        out[r:r + block.shape[0]] = block
        yy, xx = np.nonzero(block)
        lab = block[yy, xx]
        area += np.bincount(lab, minlength=K + 1)
        sy += np.bincount(lab, weights=yy + r, minlength=K + 1)
        sx += np.bincount(lab, weights=xx, minlength=K + 1)
        np.minimum.at(lo_x, lab, xx)
        np.minimum.at(lo_y, lab, yy + r)
        np.maximum.at(hi_x, lab, xx)
        np.maximum.at(hi_y, lab, yy + r)
    keep = np.flatnonzero(area[1:] > 0) + 1  # resampling down can lose the smallest nuclei
    if len(keep) < K:
        relabel = np.zeros(K + 1, np.int32)
        relabel[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
        for r in range(0, H, _STRIPE):
            out[r:r + _STRIPE] = relabel[np.asarray(out[r:r + _STRIPE])]
    src = alive[keep - 1]  # stitcher ids of the kept nuclei, in order
    a = area[keep]
    cols = {
        "centroid": np.stack([sx[keep] / a, sy[keep] / a], 1) if len(keep) else np.zeros((0, 2)),
        "area": a,
        "bbox": np.stack([lo_x[keep], lo_y[keep], hi_x[keep] + 1, hi_y[keep] + 1], 1)
        if len(keep) else np.zeros((0, 4), np.int64),
        "classes": np.asarray([stitch.cls[i] for i in src], np.int32),
        "class_probs": (np.stack([stitch.probs[i] for i in src]) if len(src)
                        else np.zeros((0, stitch.num_labels), np.float32)),
        "tile_of": np.asarray([stitch.tile_of[i] for i in src], np.int64),
    }
    return out, cols


# ---- resampling ----------------------------------------------------------------------------

def model_mpp(cfg) -> float:
    """Micrometres per pixel the model was trained at (``cfg.data.mpp``, else PanNuke's)."""
    data = cfg.data if hasattr(cfg, "data") else {}
    value = data.get("mpp", None) if hasattr(data, "get") else None
    return float(value) if value else PANNUKE_MPP


def rescale_factor(mpp: float | None, cfg) -> float:
    """Model pixels per image pixel; 1.0 when ``mpp`` is None or within the tolerance."""
    if mpp is None:
        return 1.0
    if not mpp > 0:
        raise UserError(f"--mpp {mpp}: must be a positive number of micrometres per pixel")
    factor = float(mpp) / model_mpp(cfg)
    return 1.0 if abs(factor - 1.0) <= MPP_TOLERANCE else factor


def resample_image(image: np.ndarray, factor: float, scratch_dir: str | None = None) -> np.ndarray:
    """uint8 (H, W, 3) -> (round(H f), round(W f), 3) by Pillow's bilinear filter (antialiased
    when shrinking), stripe by stripe: each stripe reads its source rows plus the filter support,
    so the result equals one whole-image resize."""
    H, W = image.shape[:2]
    H2, W2 = max(int(round(H * factor)), 1), max(int(round(W * factor)), 1)
    fy = H2 / H
    out = _empty_map((H2, W2, 3), np.uint8, scratch_dir)
    support = int(np.ceil(max(1.0, 1.0 / fy))) + 2
    for r0 in range(0, H2, _STRIPE):
        r1 = min(r0 + _STRIPE, H2)
        s0 = max(int(np.floor(r0 / fy)) - support, 0)
        s1 = min(int(np.ceil(r1 / fy)) + support, H)
        src = Image.fromarray(np.ascontiguousarray(image[s0:s1, :, :3]))
        part = src.resize((W2, r1 - r0), Image.Resampling.BILINEAR,
                          box=(0.0, r0 / fy - s0, float(W), r1 / fy - s0))
        out[r0:r1] = np.asarray(part)
    return out


# ---- the whole image -----------------------------------------------------------------------

def predict_image(image: np.ndarray, predict_fn: PredictFn, cfg, *, tile: int | None = None,
                  overlap: int | None = None, batch_size: int = 8, mpp: float | None = None,
                  progress: Callable[[int, int], None] | None = None, workers: int = 0,
                  scratch_dir: str | None = None) -> Prediction:
    """uint8 RGB (H, W, 3) -> ``Prediction`` (stitching rule and memory: module doc).

    tile: tile side in model pixels (default ``cfg.data.image_size``); overlap: pixels shared by
    neighbouring tiles (default ``default_overlap(tile)``), must be below the tile; mpp: the
    image's micrometres per pixel (None = already at the model's resolution); progress:
    ``progress(tiles_done, tiles_total)`` after every batch; workers: post-processing processes
    (0 = in this process); scratch_dir: where temporary memory maps of large images go.
    """
    image = np.asarray(image) if not isinstance(image, np.memmap) else image
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3); got {image.dtype} {image.shape}")
    H, W = image.shape[:2]
    if H == 0 or W == 0:
        raise UserError(f"zero-size image ({H} x {W})")
    tile = int(tile or cfg.data.image_size)
    overlap = default_overlap(tile) if overlap is None else int(overlap)
    if not 0 <= overlap < tile:
        raise UserError(f"--overlap {overlap}: must be at least 0 and below the tile size {tile}")
    label_names = tuple(cfg.data.label_names)
    tissue_names = tuple(cfg.data.tissue_names)

    scale = rescale_factor(mpp, cfg)
    work = image if scale == 1.0 else resample_image(image, scale, scratch_dir)
    Hm, Wm = work.shape[:2]
    grid = tile_grid(Hm, Wm, tile, overlap)
    cores = tile_cores(Hm, Wm, tile, overlap)
    stitched = _empty_map((Hm, Wm), np.int32, scratch_dir)
    stitch = Stitcher(stitched, len(label_names), len(tissue_names))
    pending: deque = deque()
    done = 0

    def batches():
        for b in range(0, len(grid), batch_size):
            where = grid[b:b + batch_size]
            tiles = np.zeros((batch_size, tile, tile, 3), np.uint8)  # fixed shape: one compile
            for i, (y0, x0) in enumerate(where):
                tiles[i] = read_tile(work, y0, x0, tile)
            out = predict_fn(tiles)
            seg = np.asarray(out["seg_prob"])[:len(where)]
            bdr = np.asarray(out["boundary_prob"])[:len(where)]
            if seg.shape[1:3] != (tile, tile) or seg.shape[-1] != len(label_names):
                raise ValueError(f"predict_fn returned seg_prob {seg.shape}; expected "
                                 f"(B, {tile}, {tile}, {len(label_names)})")
            tissue = out.get("tissue_prob")
            tissue = None if tissue is None else np.asarray(tissue)[:len(where)]
            pending.append((where, tissue))
            yield seg, (bdr[..., 0] if bdr.ndim == 4 else bdr)

    for results in postprocess_stream(batches(), cfg.postprocess, workers):
        where, tissue = pending.popleft()
        for i, ((y0, x0), res) in enumerate(zip(where, results)):
            stitch.add_tile(y0, x0, tile, res.inst, res.classes, res.class_probs,
                            None if tissue is None else tissue[i], cores[(y0, x0)])
        done += len(where)
        if progress is not None:
            progress(done, len(grid))

    out = stitched if scale == 1.0 else _empty_map((H, W), np.int32, scratch_dir)
    inst, cols = _finish(stitch, out, stitched, None if scale == 1.0 else (Hm / H, Wm / W))
    lut = np.concatenate([[0], cols["classes"]]).astype(np.uint8)
    class_map = _empty_map((H, W), np.uint8, scratch_dir)
    for r in range(0, H, _STRIPE):
        class_map[r:r + _STRIPE] = lut[np.asarray(inst[r:r + _STRIPE])]
    K = len(cols["classes"])
    if stitch.tile_tissue:  # each nucleus gets the tissue of the tile it was taken from
        per_tile = np.stack(stitch.tile_tissue)[cols["tile_of"]]
        tissue, tissue_p = per_tile.argmax(-1).astype(np.int32), per_tile.max(-1, initial=0.0)
    else:
        tissue, tissue_p = np.full(K, -1, np.int32), np.full(K, np.nan, np.float32)
    return Prediction(inst=inst, class_map=class_map, centroid=cols["centroid"], area=cols["area"],
                      bbox=cols["bbox"], classes=cols["classes"], class_probs=cols["class_probs"],
                      tissue=tissue, tissue_prob=np.asarray(tissue_p, np.float32),
                      image_tissue_prob=stitch.image_tissue_prob(), label_names=label_names,
                      tissue_names=tissue_names, scale=scale, tiles=len(grid),
                      info={"tile": tile, "overlap": overlap, "model_size": (Hm, Wm)})


# ---- the model as a predict_fn -------------------------------------------------------------

def _inputs_fn(cfg) -> Callable:
    """images uint8 (B, t, t, 3) -> network inputs, exactly as evaluation prepares them."""
    return lambda images: model_inputs(images, cfg)


def check_tile(cfg, tile: int | None = None, overlap: int | None = None) -> int:
    """The tile size (default ``cfg.data.image_size``), checked with the overlap: UserError when
    the network input it needs (tile x input.size / image_size) is not a multiple of 32."""
    label = int(cfg.data.image_size)
    size = int(cfg.input.size)
    tile = int(tile or label)
    if tile < 8 or input_size_at(cfg, tile) is None:
        step = 32 * label // np.gcd(size, 32 * label)
        raise UserError(f"--tile {tile}: the network input (tile x {size}/{label}) must be a "
                        f"multiple of 32 pixels; use a multiple of {step}")
    if overlap is not None and not 0 <= int(overlap) < tile:
        raise UserError(f"--overlap {overlap}: must be at least 0 and below the tile size {tile}")
    return tile


def make_predict_fn(cfg, variables: dict, tile: int | None = None) -> PredictFn:
    """A jitted ``predict_fn`` for tiles of ``tile`` model pixels (default the label size),
    with the test-time augmentation of ``cfg.eval.tta``.

    The network input keeps the trained ratio input.size / image_size (512 / 256 = 2), so a
    different tile size changes the field of view, never the magnification.
    """
    tile = check_tile(cfg, tile)
    tcfg = at_label_size(cfg, tile)
    forward = make_tile_forward(build_model(tcfg), _inputs_fn(tcfg), tile, configured_tta(cfg))
    device_vars = jax.device_put(variables)

    def predict_fn(tiles: np.ndarray) -> dict[str, Any]:
        return {k: np.asarray(v) for k, v in forward(device_vars, tiles).items()}

    predict_fn.tile = tile  # type: ignore[attr-defined]
    return predict_fn
