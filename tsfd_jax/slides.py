"""Whole slides: reading pyramids, finding tissue, and nuclei of a slide in constant memory.

docs/predict.md ("Whole slides") has the user's view; the rules in short:

* **Reading.** tiffslide (pure Python on tifffile) opens the TIFF-based formats (SVS, NDPI, SCN,
  BIF, generic pyramidal TIFF, Philips TIFF); OpenSlide (``openslide-bin`` ships the library)
  opens what tiffslide cannot (MRXS, VMS, ...). tiffslide reads level pixels by integer index
  (its zarr view), so tiles of one level never shift by a fraction of a pixel; OpenSlide places
  levels above 0 through level-0 coordinates (exact for power-of-two pyramids). Pixels outside
  the slide read as white glass.
* **Resolution.** ``plan_slide`` takes the coarsest level whose pixels are not coarser than the
  analysis resolution (``mpp``, default the model's), within ``predict.MPP_TOLERANCE``, and
  resamples the rest of the way (Pillow bilinear, per tile, with the filter's support read around
  it). Model pixels map to level 0 by one scale and offset per axis (``SlidePlan``).
* **Tissue.** ``detect_tissue``: the slide reduced to ``MASK_MPP`` (8 um/px) from its coarsest
  usable level, Otsu's threshold on the HSV saturation (clamped to ``SATURATION_RANGE``: glass is
  grey-white, stained tissue is coloured), then holes below ``MAX_HOLE_UM2`` filled and specks
  below ``MIN_TISSUE_UM2`` removed. A tile runs only when the mask, grown by one mask pixel, has
  tissue under it, so background is never read at full resolution.
* **Constant memory.** The region is cut into the tile grid of ``predict.tile_starts`` with the
  cores of ``predict`` and stitched row by row by ``RowStitcher`` (``predict.Stitcher``'s rule,
  unchanged) into a band of 2 tile rows; after each tile row the nuclei that no later tile can
  reach (entirely above the next row's first pixel) are finished and appended to the GeoJSON and
  CSV files. Nothing slide-sized is kept: the band, one batch of probabilities, the nuclei that
  cross the band's lower edge and a fixed-size mask.
* **Label store** (optional, ``label_store``). The instance map on the plan's model-pixel grid as
  a chunked, compressed zarr v3 array (``LABEL_CHUNK`` px a side, int32, 0 = background, id k =
  the k-th nucleus of the CSV and GeoJSON), written as rows are committed: per committed row and
  chunk column, the chunks its kept nuclei touch are read whole, pasted into, written back and
  synced, before the row's table bytes and its state. Pasting is idempotent (the same ids onto the
  same pixels), so a row run again after a kill leaves the store as one run would.
* **Resumable.** After every tile row the appended bytes are flushed and synced, then the state
  (rows done, file lengths, counts, the unfinished nuclei) is written to a temporary file and
  renamed over the old one; a restart with the same arguments (``job``) truncates the files to
  the recorded lengths and continues with the next row, so its output is byte-identical to an
  uninterrupted run's. Different arguments are refused unless ``overwrite``.
* **Pipelined.** Tiles are read (decoded, resampled) in a thread ``PREFETCH`` batches ahead of the
  jitted model; post-processing runs on ``workers`` processes while the model computes the next
  batch (``postprocess_workers.postprocess_stream``); stitching and writing happen in the main thread.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import queue
import shutil
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zarr
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects
from zarr.codecs import ZstdCodec

from tsfd_jax import atomic, exports
from tsfd_jax.errors import UserError
from tsfd_jax.overlay import class_colors
from tsfd_jax.postprocess_workers import postprocess_stream
from tsfd_jax.predict import (MPP_TOLERANCE, PredictFn, Stitcher, _cores, default_overlap,
                              model_mpp, tile_starts)

# Formats only a slide reader opens; .tif/.tiff are slides when pyramidal (``is_slide``).
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
# Opened by OpenSlide first: not TIFF (MRXS, VMS, VMU), or a layout tiffslide only half knows.
OPENSLIDE_FIRST = (".mrxs", ".vms", ".vmu", ".svslide", ".bif")
TIFF_EXTENSIONS = (".tif", ".tiff")
MASK_MPP = 8.0                    # um per tissue-mask pixel
SATURATION_RANGE = (0.03, 0.08)   # Otsu's saturation threshold is clamped to this
MIN_TISSUE_UM2 = 2000.0           # tissue pieces below this are specks (~45 um square)
MAX_HOLE_UM2 = 10000.0            # holes in tissue below this are filled (100 um square)
THUMBNAIL_SIDE = 2048             # longest side of the overlay picture
PREFETCH = 2                      # batches of tiles read ahead of the model
_BLOCK = 2048                     # level pixels per side read at a time when reducing
JOB_VERSION = 1
LABEL_CHUNK = 1024                # label store chunk side (model pixels)


# ---- reading -------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs a warning per damaged page of a bad file and tiffslide warns about vendor
    metadata it half parses: the user gets our one line (or none) instead."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def is_slide(path: str | Path) -> bool:
    """A whole-slide file: a slide extension, or a TIFF holding a pyramid or a scanner's layout
    (a plain TIFF image goes through ``image_io`` instead)."""
    import tifffile

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_EXTENSIONS:
        return True
    if suffix not in TIFF_EXTENSIONS or not path.is_file():
        return False
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tf:
            if tf.is_svs or tf.is_ndpi or tf.is_scn or tf.is_philips or tf.is_bif:
                return True
            if tf.pages.first.subifds:  # reduced levels below level 0, even if cut off
                return True
            return bool(tf.series) and len(tf.series[0].levels) > 1
    except Exception:  # noqa: BLE001 - unreadable: image_io reports it with its own message
        return False


class Slide:
    """An open slide: level sizes, level-0 mpp (None when the file has none) and
    ``read(level, x, y, w, h)`` -> uint8 (h, w, 3) level pixels, white outside the slide."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such file")
        self._ts = self._os = None
        errors = []
        if self.path.suffix.lower() in OPENSLIDE_FIRST:
            order = (self._open_openslide, self._open_tiffslide)
        else:
            order = (self._open_tiffslide, self._open_openslide)
        for opener in order:
            try:
                with _quiet_tifffile():
                    opener()
                break
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - each library raises its own kinds
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        else:
            raise UserError(f"{self.path}: not a readable slide ({'; '.join(errors)})")
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._lib.level_dimensions]
        self.dimensions = self.level_dimensions[0]
        if min(self.dimensions) <= 0:
            raise UserError(f"{self.path}: zero-size slide {self.dimensions}")

    # -- backends --
    def _open_tiffslide(self) -> None:
        import tiffslide

        ts = tiffslide.TiffSlide(self.path)
        props = ts.properties
        axes = props["tiffslide.series-axes"]
        if axes == "YX":
            raise UserError(f"{self.path}: greyscale slide; H&E needs colour (RGB)")
        self._axes = axes
        self._check_tiff_complete(ts.ts_tifffile)
        dtype = ts.ts_tifffile.series[props["tiffslide.series-index"]].dtype
        if np.dtype(dtype) != np.uint8:
            raise UserError(f"{self.path}: {dtype} pixels; only 8-bit RGB slides are supported")
        self._ts, self._lib, self.backend = ts, ts, "tiffslide"
        self.vendor = props.get("tiffslide.vendor") or "generic-tiff"
        self.mpp = _mpp(props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y"))

    def _open_openslide(self) -> None:
        try:
            import openslide
        except ImportError as e:  # the optional backend: only MRXS and friends need it
            raise RuntimeError(f"OpenSlide not installed ({e}); pip install openslide-python "
                               f"openslide-bin") from None
        osl = openslide.OpenSlide(str(self.path))
        self._os, self._lib, self.backend = osl, osl, "openslide"
        props = osl.properties
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
        self.mpp = _mpp(props.get(openslide.PROPERTY_NAME_MPP_X),
                        props.get(openslide.PROPERTY_NAME_MPP_Y))
        self._downsamples = list(osl.level_downsamples)

    def _check_tiff_complete(self, tf) -> None:
        """A truncated file opens (its headers come first) and fails only at some tile deep in
        level 0: compare where every tile's bytes end with the file's size, up front."""
        size = os.path.getsize(self.path)
        end = 0
        pages = list(tf.pages) + [p for s in tf.series for level in s.levels for p in level.pages]
        for page in pages:
            if page is None:
                continue
            offsets, counts = getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ())
            if len(offsets):
                end = max(end, max(int(o) + int(c) for o, c in zip(offsets, counts)))
            end = max([end] + [int(o) + 1 for o in (getattr(page, "subifds", None) or ())])
        if end > size:
            raise UserError(f"{self.path}: truncated slide (its tiles need {end} bytes, the file "
                            f"has {size})")

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3): level pixels [y, y + h) x [x, x + w); white outside the slide."""
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 >= x1 or y0 >= y1:
            return out
        try:
            part = (self._read_tiffslide if self._ts is not None else self._read_openslide)(
                level, x0, y0, x1 - x0, y1 - y0)
        except Exception as e:  # noqa: BLE001 - a corrupt tile, a vanished file, ...
            raise UserError(f"{self.path}: cannot read level {level} at ({x0}, {y0}) "
                            f"({type(e).__name__}: {e})") from None
        out[y0 - y:y1 - y, x0 - x:x1 - x] = part
        return out

    def _read_tiffslide(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        from tiffslide._zarr import get_zarr_selection  # level pixels by index (no rounding)

        if self._axes == "CYX":
            arr = get_zarr_selection(self._ts.zarr_group, level,
                                     (slice(None), slice(y, y + h), slice(x, x + w)))
            arr = np.moveaxis(arr, 0, -1)
        else:
            arr = get_zarr_selection(self._ts.zarr_group, level,
                                     (slice(y, y + h), slice(x, x + w), slice(None)))
        return np.asarray(arr)[..., :3]

    def _read_openslide(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._downsamples[level]
        rgba = np.asarray(self._os.read_region((int(round(x * ds)), int(round(y * ds))), level,
                                               (w, h)))
        alpha = rgba[..., 3:].astype(np.uint16)
        # transparent = not scanned: white glass, as the scanner shows it
        return ((rgba[..., :3] * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)

    def close(self) -> None:
        self._lib.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mpp(x, y) -> float | None:
    try:
        vals = [float(v) for v in (x, y) if v not in (None, "")]
    except (TypeError, ValueError):
        return None
    vals = [v for v in vals if math.isfinite(v) and v > 0]
    return float(np.mean(vals)) if vals else None


def slide_mpp(slide: Slide, override: float | None) -> tuple[float, str]:
    """Level-0 um per pixel: ``override`` (--slide-mpp), else the metadata; UserError without."""
    if override is not None:
        if not override > 0:
            raise UserError(f"--slide-mpp {override}: must be a positive number of micrometres")
        return float(override), "--slide-mpp"
    if slide.mpp is None:
        raise UserError(f"{slide.path}: the slide has no pixel size (mpp) in its metadata; pass "
                        f"--slide-mpp (micrometres per pixel at level 0)")
    return slide.mpp, "metadata"


# ---- resolution and region -----------------------------------------------------------------

@dataclass(frozen=True)
class SlidePlan:
    """Where the model's pixels come from. Model pixel (r, c) of the region is level pixel
    (y0 + r / factor, x0 + c / factor); its corner in level 0 is origin + (c, r) * scale."""
    level: int
    level_mpp: float
    slide_mpp: float
    mpp: float                           # the model pixels' um per pixel (analysis resolution)
    factor: float                        # model pixels per level pixel (1.0: read as they are)
    downsample: tuple[float, float]      # level-0 pixels per level pixel (x, y)
    x0: int                              # region origin in level pixels
    y0: int
    width: int                           # region size in model pixels
    height: int
    region: tuple[int, int, int, int]    # the requested level-0 region x, y, w, h

    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 pixels per model pixel (x, y)."""
        return self.downsample[0] / self.factor, self.downsample[1] / self.factor

    @property
    def origin(self) -> tuple[float, float]:
        return self.x0 * self.downsample[0], self.y0 * self.downsample[1]

    @property
    def identity(self) -> bool:
        """Model pixels are level-0 pixels (integer coordinates everywhere)."""
        return self.scale == (1.0, 1.0)


def _level_downsample(full: int, level: int) -> float:
    """Level-0 pixels per level pixel along one axis: the integer a pyramid was built with when
    the sizes agree with one (a level's size is rounded up or down), else the plain ratio."""
    ratio = full / level
    nominal = round(ratio)
    return float(nominal) if nominal >= 1 and abs(full - nominal * level) < nominal else ratio


def parse_region(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--region {text}: expected x,y,w,h in level-0 pixels (integers)") from None
    if w <= 0 or h <= 0:
        raise UserError(f"--region {text}: width and height must be positive")
    return x, y, w, h


def plan_slide(slide: Slide, mpp0: float, mpp: float | None, region, cfg) -> SlidePlan:
    """The level, resampling and region of a run (module doc): ``mpp`` None = the model's."""
    target = model_mpp(cfg) if mpp is None else float(mpp)
    if not target > 0:
        raise UserError(f"--mpp {mpp}: must be a positive number of micrometres per pixel")
    W0, H0 = slide.dimensions
    x, y, w, h = region if region is not None else (0, 0, W0, H0)
    if x < 0 or y < 0 or x + w > W0 or y + h > H0:
        raise UserError(f"{slide.path}: --region {x},{y},{w},{h} lies outside the slide "
                        f"({W0} x {H0} pixels at level 0)")
    best, best_ds = 0, 0.0
    for level, (lw, lh) in enumerate(slide.level_dimensions):
        ds = (_level_downsample(W0, lw) + _level_downsample(H0, lh)) / 2
        if mpp0 * ds <= target * (1 + MPP_TOLERANCE) and ds > best_ds:
            best, best_ds = level, ds
    lw, lh = slide.level_dimensions[best]
    dsx, dsy = _level_downsample(W0, lw), _level_downsample(H0, lh)
    level_mpp = mpp0 * (dsx + dsy) / 2
    factor = level_mpp / target
    factor = 1.0 if abs(factor - 1.0) <= MPP_TOLERANCE else factor
    lx0, ly0 = int(math.floor(x / dsx)), int(math.floor(y / dsy))
    lx1, ly1 = min(int(math.ceil((x + w) / dsx)), lw), min(int(math.ceil((y + h) / dsy)), lh)
    return SlidePlan(level=best, level_mpp=level_mpp, slide_mpp=mpp0, mpp=target, factor=factor,
                     downsample=(dsx, dsy), x0=lx0, y0=ly0,
                     width=max(1, int(round((lx1 - lx0) * factor))),
                     height=max(1, int(round((ly1 - ly0) * factor))), region=(x, y, w, h))


def read_model_tile(slide: Slide, plan: SlidePlan, y: int, x: int, tile: int) -> np.ndarray:
    """uint8 (tile, tile, 3): model pixels [y, y + tile) x [x, x + tile) of the region."""
    if plan.factor == 1.0:
        return slide.read(plan.level, plan.x0 + x, plan.y0 + y, tile, tile)
    f = plan.factor
    fx, fy, span = plan.x0 + x / f, plan.y0 + y / f, tile / f
    margin = int(math.ceil(max(1.0, 1.0 / f))) + 2   # the bilinear filter's support
    wx, wy = int(math.floor(fx)) - margin, int(math.floor(fy)) - margin
    ww, wh = int(math.ceil(fx + span)) + margin - wx, int(math.ceil(fy + span)) + margin - wy
    window = Image.fromarray(slide.read(plan.level, wx, wy, ww, wh))
    box = (fx - wx, fy - wy, fx - wx + span, fy - wy + span)
    return np.asarray(window.resize((tile, tile), Image.Resampling.BILINEAR, box=box))


def read_reduced(slide: Slide, width: int, height: int,
                 region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """uint8 (height, width, 3): the level-0 ``region`` (default the slide) reduced to this size
    by area averaging, read from the coarsest level that still has enough pixels, in blocks of
    at most ``_BLOCK`` level pixels a side (bounded memory whatever the slide)."""
    W0, H0 = slide.dimensions
    rx, ry, rw, rh = region if region is not None else (0, 0, W0, H0)
    level = 0
    for lv, (lw, lh) in enumerate(slide.level_dimensions):
        if lw * rw / W0 >= width and lh * rh / H0 >= height:
            level = lv
    lw, lh = slide.level_dimensions[level]
    dsx, dsy = _level_downsample(W0, lw), _level_downsample(H0, lh)
    kx, ky = rw / dsx / width, rh / dsy / height          # level pixels per output pixel
    ox, oy = rx / dsx, ry / dsy
    bw, bh = max(1, int(_BLOCK // max(kx, 1))), max(1, int(_BLOCK // max(ky, 1)))
    out = np.empty((height, width, 3), np.uint8)
    for r0 in range(0, height, bh):
        r1 = min(r0 + bh, height)
        for c0 in range(0, width, bw):
            c1 = min(c0 + bw, width)
            fx0, fy0, fx1, fy1 = ox + c0 * kx, oy + r0 * ky, ox + c1 * kx, oy + r1 * ky
            wx, wy = int(math.floor(fx0)), int(math.floor(fy0))
            ww, wh = max(1, int(math.ceil(fx1)) - wx), max(1, int(math.ceil(fy1)) - wy)
            window = Image.fromarray(slide.read(level, wx, wy, ww, wh))
            out[r0:r1, c0:c1] = np.asarray(window.resize(
                (c1 - c0, r1 - r0), Image.Resampling.BOX,
                box=(fx0 - wx, fy0 - wy, fx1 - wx, fy1 - wy)))
    return out


# ---- tissue --------------------------------------------------------------------------------

@dataclass
class TissueMask:
    """bool (h, w) over the whole slide; ``scale`` level-0 pixels per mask pixel (x, y)."""
    mask: np.ndarray
    scale: tuple[float, float]
    source: str                 # "detected" or the user's file

    def tile_has_tissue(self, plan: SlidePlan, y: int, x: int, tile: int) -> bool:
        """Tissue (the mask grown by one pixel) under model tile (y, x)."""
        grown = self._grown()
        (sx, sy), (ox, oy) = plan.scale, plan.origin
        c0 = int(math.floor((ox + x * sx) / self.scale[0]))
        c1 = int(math.ceil((ox + (x + tile) * sx) / self.scale[0]))
        r0 = int(math.floor((oy + y * sy) / self.scale[1]))
        r1 = int(math.ceil((oy + (y + tile) * sy) / self.scale[1]))
        return bool(grown[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)].any())

    def contains(self, x: float, y: float) -> bool:
        """Level-0 point (x, y) on tissue (the mask grown by one pixel)."""
        grown = self._grown()
        c, r = int(x // self.scale[0]), int(y // self.scale[1])
        return 0 <= r < grown.shape[0] and 0 <= c < grown.shape[1] and bool(grown[r, c])

    def _grown(self) -> np.ndarray:
        if getattr(self, "_grown_mask", None) is None:
            self._grown_mask = ndi.binary_dilation(self.mask, np.ones((3, 3), bool))
        return self._grown_mask

    def area_mm2(self, plan: SlidePlan) -> float:
        """Tissue inside the region: mask pixels whose centres fall in it, in mm^2."""
        x, y, w, h = plan.region
        sx, sy = self.scale
        cols = (np.arange(self.mask.shape[1]) + 0.5) * sx
        rows = (np.arange(self.mask.shape[0]) + 0.5) * sy
        inside = self.mask[np.ix_((rows >= y) & (rows < y + h), (cols >= x) & (cols < x + w))]
        return float(inside.sum()) * sx * sy * plan.slide_mpp ** 2 / 1e6


def mask_shape(slide: Slide, mpp0: float) -> tuple[int, int]:
    W0, H0 = slide.dimensions
    k = MASK_MPP / mpp0
    return max(1, int(round(H0 / k))), max(1, int(round(W0 / k)))


def tissue_from_rgb(rgb: np.ndarray, pixel_um2: float) -> np.ndarray:
    """bool mask of stained tissue in a low-resolution RGB picture (module doc)."""
    x = rgb.astype(np.float32)
    hi, lo = x.max(-1), x.min(-1)
    saturation = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0.0)
    if saturation.max() > saturation.min():
        threshold = float(threshold_otsu(saturation))
    else:  # a constant picture: all glass or all tissue, the clamp decides
        threshold = SATURATION_RANGE[1]
    threshold = min(max(threshold, SATURATION_RANGE[0]), SATURATION_RANGE[1])
    mask = saturation > threshold
    mask = remove_small_holes(mask, max_size=int(MAX_HOLE_UM2 / pixel_um2))
    return remove_small_objects(mask, max_size=int(MIN_TISSUE_UM2 / pixel_um2))


def detect_tissue(slide: Slide, mpp0: float) -> TissueMask:
    h, w = mask_shape(slide, mpp0)
    W0, H0 = slide.dimensions
    scale = (W0 / w, H0 / h)
    rgb = read_reduced(slide, w, h)
    return TissueMask(tissue_from_rgb(rgb, scale[0] * scale[1] * mpp0 ** 2), scale, "detected")


def load_tissue_mask(path: str | Path, slide: Slide, mpp0: float) -> TissueMask:
    """A user's mask picture (non-zero = tissue) of the slide's aspect ratio, any size,
    rescaled (nearest) to the mask resolution; UserError naming the file otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            user = np.asarray(im.convert("L")) > 0
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for bad files
        raise UserError(f"{path}: not a readable mask image ({type(e).__name__}: {e})") from None
    W0, H0 = slide.dimensions
    mh, mw = user.shape
    # Same aspect ratio: each side within one mask pixel of the other's scaled size.
    if abs(mh - mw * H0 / W0) > 1 + 0.005 * mh or abs(mw - mh * W0 / H0) > 1 + 0.005 * mw:
        raise UserError(f"{path}: tissue mask of {mw} x {mh} pixels does not have the slide's "
                        f"aspect ratio ({W0} x {H0} pixels at level 0)")
    h, w = mask_shape(slide, mpp0)
    rows = np.minimum(((np.arange(h) + 0.5) * mh / h).astype(np.int64), mh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mw / w).astype(np.int64), mw - 1)
    return TissueMask(user[np.ix_(rows, cols)], (W0 / w, H0 / h), str(path))


def everywhere(slide: Slide, mpp0: float) -> TissueMask:
    """A mask of tissue everywhere (every tile runs)."""
    h, w = mask_shape(slide, mpp0)
    W0, H0 = slide.dimensions
    return TissueMask(np.ones((h, w), bool), (W0 / w, H0 / h), "everywhere")


# ---- stitching row by row ------------------------------------------------------------------

class _RowBand:
    """Rows [top, top + n) of an (H, W) instance map, addressed by image rows: what the
    ``Stitcher`` writes into, a view per slice, as if it were the whole map."""

    def __init__(self, height: int, width: int, rows: int):
        self.shape = (height, width)
        self.buf = np.zeros((min(rows, height), width), np.int32)
        self.top = 0

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key
        start, stop = rows.start - self.top, min(rows.stop, self.shape[0]) - self.top
        if start < 0 or stop > len(self.buf):
            raise IndexError(f"rows {rows.start}:{rows.stop} outside the band "
                             f"{self.top}:{self.top + len(self.buf)}")
        return self.buf[start:stop, cols]

    def move(self, top: int) -> None:
        """Make the band start at row ``top`` (only downwards); rows above are dropped."""
        shift = top - self.top
        if shift <= 0:
            return
        n = len(self.buf)
        # In blocks of ``shift`` rows, which never overlap: one assignment of overlapping rows
        # would make numpy copy them all to a temporary first (the band's size again).
        for r in range(0, n - shift, shift):
            k = min(shift, n - shift - r)
            self.buf[r:r + k] = self.buf[r + shift:r + shift + k]
        self.buf[max(n - shift, 0):] = 0
        self.top = top


@dataclass
class FinishedNucleus:
    """A nucleus no later tile can change: its mask in model pixels at (r0, c0)."""
    r0: int
    c0: int
    mask: np.ndarray
    area: int
    label: int
    probs: np.ndarray
    tissue: np.ndarray | None


class RowStitcher(Stitcher):
    """``predict.Stitcher`` over a band of 2 tile rows: nuclei live in dicts and leave them, in
    id order, once no later tile row can reach them (``finish``)."""

    def __init__(self, height: int, width: int, tile: int, num_labels: int, num_tissues: int):
        self.tile = tile
        super().__init__(_RowBand(height, width, 2 * tile), num_labels, num_tissues)
        self.box, self.area, self.margin, self.cls, self.probs, self.tile_of, self.alive = (
            {}, {}, {}, {}, {}, {}, {})
        self.tissue: dict[int, np.ndarray | None] = {}
        self.next_id = 1
        self.tiles = 0
        self.foreground = 0.0
        self.tissue_weighted = np.zeros(num_tissues, np.float64)
        self.tissue_plain = np.zeros(num_tissues, np.float64)
        self.tissue_tiles = 0
        self._tile_tissue: np.ndarray | None = None

    def start_row(self, y: int) -> None:
        """Before the tiles of the row at ``y``: the band covers [y - tile, y + tile)."""
        self.out.move(max(y - self.tile, 0))

    def _add_tile_stats(self, foreground: int, tissue_prob: np.ndarray | None) -> int:
        self.tiles += 1
        self.foreground += foreground
        self._tile_tissue = None
        if tissue_prob is not None:
            p = np.asarray(tissue_prob, np.float32)
            self._tile_tissue = p
            self.tissue_weighted += foreground * p.astype(np.float64)
            self.tissue_plain += p
            self.tissue_tiles += 1
        return self.tiles - 1

    def _new_nucleus(self, box, area, margin, cls, probs, t_index) -> int:
        e = self.next_id
        self.next_id += 1
        self.box[e] = tuple(int(v) for v in box)
        self.area[e], self.margin[e], self.cls[e], self.probs[e] = area, margin, cls, probs
        self.tissue[e] = self._tile_tissue
        self.alive[e] = True
        return e

    def _remove(self, e: int) -> None:
        super()._remove(e)
        self._forget(e)

    def _forget(self, e: int) -> None:
        for store in (self.box, self.area, self.margin, self.cls, self.probs, self.tissue,
                      self.alive):
            store.pop(e, None)

    def finish(self, y_limit: int) -> list[FinishedNucleus]:
        """Take out (id order) every nucleus lying wholly above row ``y_limit``: later tiles
        start at or below it, and a tile only changes nuclei its pixels overlap."""
        done = []
        for e in sorted(e for e, (r0, r1, c0, c1) in self.box.items() if r1 <= y_limit):
            r0, r1, c0, c1 = self.box[e]
            block = self.out[r0:r1, c0:c1]
            mask = block == e
            block[mask] = 0
            done.append(FinishedNucleus(r0, c0, mask, self.area[e], self.cls[e], self.probs[e],
                                        self.tissue[e]))
            self._forget(e)
        return done

    def image_tissue_prob(self) -> np.ndarray | None:
        if not self.tissue_tiles:
            return None
        if self.foreground > 0:
            return self.tissue_weighted / self.foreground
        return self.tissue_plain / self.tissue_tiles

    # -- the unfinished state, for resuming --
    def state(self) -> dict[str, np.ndarray]:
        ids = sorted(self.box)
        masks = [self.out[self.box[e][0]:self.box[e][1], self.box[e][2]:self.box[e][3]] == e
                 for e in ids]
        T = len(self.tissue_plain)
        return {
            "ids": np.asarray(ids, np.int64),
            "boxes": np.asarray([self.box[e] for e in ids], np.int64).reshape(-1, 4),
            "margins": np.asarray([self.margin[e] for e in ids], np.int64),
            "classes": np.asarray([self.cls[e] for e in ids], np.int64),
            "areas": np.asarray([self.area[e] for e in ids], np.int64),
            "probs": np.asarray([self.probs[e] for e in ids], np.float32).reshape(
                -1, self.num_labels),
            "tissue": np.asarray([self.tissue[e] if self.tissue[e] is not None
                                  else np.full(T, np.nan, np.float32) for e in ids],
                                 np.float32).reshape(-1, T),
            "masks": (np.concatenate([m.ravel() for m in masks]) if masks
                      else np.zeros(0, bool)),
            "scalars": np.asarray([self.next_id, self.tiles, self.tissue_tiles], np.int64),
            "foreground": np.asarray([self.foreground], np.float64),
            "tissue_weighted": self.tissue_weighted, "tissue_plain": self.tissue_plain,
        }

    def restore(self, state: dict[str, np.ndarray], y_next: int) -> None:
        """The state saved after a row, before the row at ``y_next``."""
        self.out.move(max(y_next - self.tile, 0))
        self.next_id, self.tiles, self.tissue_tiles = (int(v) for v in state["scalars"])
        self.foreground = float(state["foreground"][0])
        self.tissue_weighted = state["tissue_weighted"].astype(np.float64)
        self.tissue_plain = state["tissue_plain"].astype(np.float64)
        at = 0
        for i, e in enumerate(int(v) for v in state["ids"]):
            r0, r1, c0, c1 = (int(v) for v in state["boxes"][i])
            n = (r1 - r0) * (c1 - c0)
            mask = state["masks"][at:at + n].reshape(r1 - r0, c1 - c0)
            at += n
            self.out[r0:r1, c0:c1][mask] = e
            self.box[e] = (r0, r1, c0, c1)
            self.margin[e] = int(state["margins"][i])
            self.cls[e] = int(state["classes"][i])
            self.area[e] = int(state["areas"][i])
            self.probs[e] = state["probs"][i].astype(np.float32)
            t = state["tissue"][i]
            self.tissue[e] = None if np.isnan(t).any() else t.astype(np.float32)
            self.alive[e] = True


# ---- outputs -------------------------------------------------------------------------------

SLIDE_OUTPUTS = ("geojson", "csv", "overlay", "tissue", "summary")


def slide_output_paths(out_dir: str | Path, stem: str,
                       label_store: bool = False) -> dict[str, Path]:
    """A job's outputs (with ``label_store``: ``labels``, a zarr folder), the summary last."""
    out_dir = Path(out_dir)
    paths = {"geojson": out_dir / f"{stem}_nuclei.geojson", "csv": out_dir / f"{stem}_nuclei.csv",
             "overlay": out_dir / f"{stem}_overlay.png", "tissue": out_dir / f"{stem}_tissue.png"}
    if label_store:
        paths["labels"] = out_dir / f"{stem}_labels.zarr"
    paths["summary"] = out_dir / f"{stem}_summary.json"
    return paths


def job_with_label_store(job: dict, label_store: bool) -> dict:
    """``job`` with the label store's flag: ``"label_store": True`` when asked for, no key
    otherwise (a job without a store is described as before the option existed, so such runs
    still resume and still count as complete)."""
    job = {k: v for k, v in job.items() if k != "label_store"}
    return {**job, "label_store": True} if label_store else job


def partial_dir(out_dir: str | Path, stem: str) -> Path:
    return Path(out_dir) / f".{stem}.partial"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _differences(saved: dict, job: dict) -> str:
    keys = sorted(k for k in set(saved) | set(job) if saved.get(k) != job.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {job.get(k)!r}" for k in keys[:3])


def slide_status(out_dir: str | Path, stem: str, job: dict, overwrite: bool) -> str:
    """'complete' (the outputs of this very job exist), 'resume' (its unfinished run exists) or
    'fresh'; UserError when a different job's files are in the way and not ``overwrite``."""
    paths = slide_output_paths(out_dir, stem, bool(job.get("label_store")))
    partial = partial_dir(out_dir, stem)
    if partial.exists():
        try:
            saved = json.loads((partial / "job.json").read_text())
        except (OSError, ValueError):
            saved = {}
        if _same(saved, job):
            return "resume"
        if not overwrite:
            raise UserError(f"{partial}: an unfinished run with other arguments "
                            f"({_differences(saved, job)}); pass --overwrite to start again")
        return "fresh"
    if all(p.exists() for p in paths.values()):
        try:
            if _same(json.loads(paths["summary"].read_text()).get("job", {}), job):
                return "complete"
        except (OSError, ValueError, AttributeError):
            pass
    # Any output of this stem is in the way, the label store too when this job writes none.
    existing = [p for p in slide_output_paths(out_dir, stem, True).values() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]}: already exists (another run's, or not ours); pass "
                        f"--overwrite to replace it")
    return "fresh"


class _Prefetch:
    """Runs an iterator in a thread, ``depth`` items ahead (tile reading beside the model)."""

    _END = object()

    def __init__(self, items: Iterator, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(items,), daemon=True,
                                       name="tsfd-slide-reader")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._put(e)

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


# ---- one slide -----------------------------------------------------------------------------

def predict_slide(slide: Slide, predict_fn: PredictFn, cfg, out_dir: str | Path, stem: str, *,
                  plan: SlidePlan, tissue: TissueMask, job: dict, tile: int | None = None,
                  overlap: int | None = None, batch_size: int = 8, workers: int = 0,
                  overwrite: bool = False, label_store: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  stop_after_rows: int | None = None, prefetch: int = PREFETCH) -> dict | None:
    """Nuclei of ``plan``'s region of a slide -> ``<stem>_*`` files in ``out_dir`` (module doc).

    ``job``: what makes two runs the same (the caller's fingerprint of slide, model and
    arguments); a finished job's outputs are returned as they are, an unfinished one continues.
    label_store: also write ``<stem>_labels.zarr`` (module doc); part of the job
    (``job_with_label_store``).
    progress(tiles_done, tiles_total) after every batch. stop_after_rows: return None after
    that many rows of this call (the state saved, as after a kill; for tests). Returns the
    summary (the dict written to ``<stem>_summary.json``).
    """
    out_dir = Path(out_dir)
    tile = int(tile or cfg.data.image_size)
    overlap = default_overlap(tile) if overlap is None else int(overlap)
    if not 0 <= overlap < tile:
        raise UserError(f"--overlap {overlap}: must be at least 0 and below the tile size {tile}")
    job = job_with_label_store(job, label_store)
    status = slide_status(out_dir, stem, job, overwrite)
    paths = slide_output_paths(out_dir, stem, label_store)
    if status == "complete":
        return json.loads(paths["summary"].read_text())
    run = _SlideRun(slide, cfg, out_dir, stem, plan, tissue, job, tile, overlap)
    if status == "fresh":
        run.start()
    else:
        run.load()
    if not run.state.get("finalized"):
        if run.rows_left() and not run.process(predict_fn, batch_size, workers, progress,
                                               stop_after_rows, prefetch):
            return None
        run.prepare_outputs()
    return run.publish()


class _SlideRun:
    """The files and state of one slide's job (``predict_slide``)."""

    def __init__(self, slide: Slide, cfg, out_dir: Path, stem: str, plan: SlidePlan,
                 tissue: TissueMask, job: dict, tile: int, overlap: int):
        self.slide, self.cfg, self.out_dir, self.stem = slide, cfg, out_dir, stem
        self.plan, self.tissue, self.job, self.tile, self.overlap = plan, tissue, job, tile, overlap
        self.label_names = tuple(cfg.data.label_names)
        self.tissue_names = tuple(cfg.data.tissue_names)
        self.colors = class_colors(self.label_names)
        self.dir = partial_dir(out_dir, stem)
        self.label_store = bool(job.get("label_store"))
        self.paths = slide_output_paths(out_dir, stem, self.label_store)
        self.geojson_part = self.dir / "nuclei.geojson.part"
        self.csv_part = self.dir / "nuclei.csv.part"
        self.labels_part = self.dir / "labels.zarr"
        self.labels = None  # the open label store (zarr.Array) while rows are committed
        self.ys = tile_starts(plan.height, tile, overlap)
        self.xs = tile_starts(plan.width, tile, overlap)
        self.row_cores = _cores(self.ys, tile, plan.height)
        self.col_cores = _cores(self.xs, tile, plan.width)
        self.column = {x: j for j, x in enumerate(self.xs)}
        self.stitch = RowStitcher(plan.height, plan.width, tile, len(self.label_names),
                                  len(self.tissue_names))
        self.state: dict[str, Any] = {}
        self.started = time.perf_counter()

    # -- tiles with tissue, per row --
    def row_tiles(self, i: int) -> list[int]:
        y = self.ys[i]
        return [x for x in self.xs
                if self.tissue.tile_has_tissue(self.plan, y, x, self.tile)]

    def rows_left(self) -> bool:
        return self.state["rows_done"] < len(self.ys)

    # -- state --
    def start(self) -> None:
        """A new job folder, built under another name and renamed: a kill while it is being
        made leaves nothing that looks like an unfinished run."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        final, self.dir = self.dir, self.dir.with_name(f"{self.dir.name}.new-{os.getpid()}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        (self.dir / "job.json").write_text(json.dumps(self.job, indent=1, sort_keys=True))
        atomic.save_png(self.dir / "tissue.png", self.tissue.mask.astype(np.uint8) * 255)
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(self.csv_header())
        (self.dir / self.geojson_part.name).write_text(exports.GEOJSON_HEAD, encoding="utf-8")
        (self.dir / self.csv_part.name).write_text(header.getvalue(), encoding="utf-8")
        if self.label_store:
            self._create_labels(self.dir / self.labels_part.name)
        run_tiles = sum(len(self.row_tiles(i)) for i in range(len(self.ys)))
        self.state = {"rows_done": 0, "rows": len(self.ys), "tiles_total": run_tiles,
                      "tiles_done": 0,
                      "geojson_bytes": len(exports.GEOJSON_HEAD.encode("utf-8")),
                      "csv_bytes": len(header.getvalue().encode("utf-8")), "nuclei": 0,
                      "counts": [0] * len(self.label_names), "carry": None,
                      "tissue_source": self.tissue.source}
        self._save_state()
        os.replace(self.dir, final)
        self.dir = final
        self._open_labels()

    def load(self) -> None:
        self.state = json.loads((self.dir / "state.json").read_text())
        if self.state.get("finalized"):
            return  # only the moves into place are left (publish)
        with Image.open(self.dir / "tissue.png") as im:  # the mask this job started with
            mask = np.asarray(im) > 0
        self.tissue = TissueMask(mask, self.tissue.scale, self.state["tissue_source"])
        for part, key in ((self.geojson_part, "geojson_bytes"), (self.csv_part, "csv_bytes")):
            if part.stat().st_size < self.state[key]:  # synced before the state: never, unless
                raise UserError(f"{self.dir}: the unfinished run is damaged ({part.name} is "
                                f"shorter than recorded); pass --overwrite to start again")
            with open(part, "r+b") as f:  # drop what a killed run wrote after its last state
                f.truncate(self.state[key])
        if self.state["carry"]:
            with np.load(self.dir / self.state["carry"]) as carry:
                y_next = self.ys[self.state["rows_done"]] if self.rows_left() else self.plan.height
                self.stitch.restore(dict(carry), y_next)
        # Rows after rows_done may already be in the store (a kill between its write and the
        # state's): running them again pastes the same ids onto the same pixels.
        self._open_labels()

    def _save_state(self) -> None:
        atomic.write_bytes(self.dir / "state.json", json.dumps(self.state, indent=1,
                                                               sort_keys=True))

    def _commit_row(self, done: list[FinishedNucleus]) -> None:
        """Paste the row's kept nuclei into the label store (if any), append them to the tables
        and sync, then record the row. In that order: a kill before the record leaves table
        bytes past the recorded lengths, which a restart cuts off, and store pixels that the
        row, run again, overwrites with the same ids."""
        features, rows = io.StringIO(), io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        k = self.state["nuclei"]
        counts = self.state["counts"]
        kept = []
        for nucleus in done:
            x, y = self.centroid(nucleus)
            if not self.tissue.contains(x, y):
                continue  # a tile at the tissue's edge also sees glass: nothing there counts
            k += 1
            feature, row = self.describe(k, nucleus, x, y)
            features.write(exports.feature_text(feature, k == 1))
            writer.writerow(row)
            counts[nucleus.label] += 1
            kept.append((k, nucleus))
        self._paste_labels(kept)
        for part, text, key in ((self.geojson_part, features.getvalue(), "geojson_bytes"),
                                (self.csv_part, rows.getvalue(), "csv_bytes")):
            with open(part, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                self.state[key] = f.tell()
        self.state["nuclei"] = k
        self.state["rows_done"] += 1
        old = self.state["carry"]
        carry = f"carry-{self.state['rows_done']:06d}.npz"
        with open(self.dir / carry, "wb") as f:
            np.savez(f, **self.stitch.state())
            f.flush()
            os.fsync(f.fileno())
        self.state["carry"] = carry
        self._save_state()
        if old:
            (self.dir / old).unlink(missing_ok=True)

    # -- the label store --
    def _create_labels(self, path: Path) -> None:
        plan = self.plan
        chunks = (min(LABEL_CHUNK, plan.height), min(LABEL_CHUNK, plan.width))
        zarr.create_array(
            store=str(path), shape=(plan.height, plan.width), chunks=chunks, dtype="int32",
            fill_value=0, compressors=ZstdCodec(level=3, checksum=True), zarr_format=3,
            dimension_names=("y", "x"),
            attributes={
                "slide": self.slide.path.name, "mpp": plan.mpp, "slide_mpp": plan.slide_mpp,
                "origin": list(plan.origin), "scale": list(plan.scale), "level": plan.level,
                "region": list(plan.region), "label_names": list(self.label_names),
                "ids": f"0 = background; k = nucleus k of {self.paths['csv'].name} (column id) "
                       f"and {self.paths['geojson'].name} (measurements.id)",
                "pixel": "model pixel (row r, column c) covers level-0 x in [origin_x + c * "
                         "scale_x, origin_x + (c + 1) * scale_x), y likewise with r"})

    def _open_labels(self) -> None:
        if not self.label_store:
            return
        if not (self.labels_part / "zarr.json").exists():
            raise UserError(f"{self.dir}: the unfinished run is damaged ({self.labels_part.name} "
                            f"is missing); pass --overwrite to start again")
        self.labels = zarr.open_array(str(self.labels_part), mode="r+")

    def _paste_labels(self, kept: list[tuple[int, FinishedNucleus]]) -> None:
        """Ids ``k`` onto the pixels of their nuclei, one chunk column at a time: the chunks the
        nuclei touch are read whole, pasted into and written back whole (so zarr never reads a
        chunk again to merge a part), then synced. Pixels of other nuclei are written back as
        they were read, so running a row again changes nothing it has already written."""
        if self.labels is None or not kept:
            return
        height, width = self.labels.shape
        ch, cw = self.labels.chunks
        columns: dict[int, list[tuple[int, FinishedNucleus]]] = {}
        for k, n in kept:
            for j in range(n.c0 // cw, (n.c0 + n.mask.shape[1] - 1) // cw + 1):
                columns.setdefault(j, []).append((k, n))
        touched = []
        for j, members in sorted(columns.items()):
            c0, c1 = j * cw, min((j + 1) * cw, width)
            top = min(n.r0 for _, n in members) // ch * ch
            bottom = min(-(-max(n.r0 + n.mask.shape[0] for _, n in members) // ch) * ch, height)
            block = np.asarray(self.labels[top:bottom, c0:c1])
            for k, n in members:
                h, w = n.mask.shape
                a, b = max(n.c0, c0), min(n.c0 + w, c1)
                view = block[n.r0 - top:n.r0 - top + h, a - c0:b - c0]
                view[n.mask[:, a - n.c0:b - n.c0]] = k
            self.labels[top:bottom, c0:c1] = block
            touched += [(i, j) for i in range(top // ch, -(-bottom // ch))]
        for key in touched:  # durable before the state that counts the row as done
            path = self.labels_part / self.labels.metadata.encode_chunk_key(key)
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    # -- one nucleus in level-0 coordinates --
    def csv_header(self) -> list[str]:
        return exports.table_header(self.label_names) + ["area_um2"]

    def centroid(self, n: FinishedNucleus) -> tuple[float, float]:
        """Level-0 centroid, array-index convention (pixel (r, c) has its centre at (c, r))."""
        (sx, sy), (ox, oy) = self.plan.scale, self.plan.origin
        rows, cols = np.nonzero(n.mask)
        return (ox + (n.c0 + cols.mean() + 0.5) * sx - 0.5,
                oy + (n.r0 + rows.mean() + 0.5) * sy - 0.5)

    def describe(self, k: int, n: FinishedNucleus, x: float, y: float) -> tuple[dict, list]:
        plan = self.plan
        (sx, sy), (ox, oy) = plan.scale, plan.origin
        h, w = n.mask.shape
        bbox = (int(math.floor(ox + n.c0 * sx)), int(math.floor(oy + n.r0 * sy)),
                int(math.ceil(ox + (n.c0 + w) * sx)), int(math.ceil(oy + (n.r0 + h) * sy)))
        if plan.identity and float(ox).is_integer() and float(oy).is_integer():
            area: int | float = int(n.area)
            geometry = exports.mask_geometry(n.mask, n.c0 + int(ox), n.r0 + int(oy))
        else:
            area = round(n.area * sx * sy, 2)
            geometry = exports.mask_geometry(n.mask, n.c0, n.r0, scale=(sx, sy), origin=(ox, oy))
        area_um2 = n.area * sx * sy * plan.slide_mpp ** 2
        tissue = None
        if n.tissue is not None:
            t = int(np.argmax(n.tissue))
            tissue = exports.tissue_of(self.tissue_names, t, n.tissue[t])
        feature = exports.detection_feature(
            geometry, n.label, n.probs, self.label_names, self.colors,
            {"id": k, "area_px": area, "area_um2": round(area_um2, 2)}, tissue)
        row = exports.table_row(k, x, y, area, bbox, n.label, n.probs, self.label_names,
                                tissue) + [f"{area_um2:.2f}"]
        return feature, row

    # -- the rows --
    def _batches(self, first_row: int, batch_size: int) -> Iterator[tuple]:
        """(row, [(y, x)...], uint8 (batch, tile, tile, 3)) for the tissue tiles of each row;
        batches never span two rows, so a resumed run forms the very same batches."""
        for i in range(first_row, len(self.ys)):
            y = self.ys[i]
            xs = self.row_tiles(i)
            for b in range(0, len(xs), batch_size):
                where = [(y, x) for x in xs[b:b + batch_size]]
                tiles = np.zeros((batch_size, self.tile, self.tile, 3), np.uint8)
                for j, (ty, tx) in enumerate(where):
                    tiles[j] = read_model_tile(self.slide, self.plan, ty, tx, self.tile)
                yield i, where, tiles

    def process(self, predict_fn, batch_size: int, workers: int, progress, stop_after_rows,
                prefetch: int) -> bool:
        first = self.state["rows_done"]
        per_row = [len(self.row_tiles(i)) for i in range(first, len(self.ys))]
        reader = _Prefetch(self._batches(first, batch_size), prefetch)
        pending: deque = deque()
        n_labels = len(self.label_names)

        def model_outputs():
            for i, where, tiles in reader:
                out = predict_fn(tiles)
                seg = np.asarray(out["seg_prob"])[:len(where)]
                bdr = np.asarray(out["boundary_prob"])[:len(where)]
                if seg.shape[1:3] != (self.tile, self.tile) or seg.shape[-1] != n_labels:
                    raise ValueError(f"predict_fn returned seg_prob {seg.shape}; expected "
                                     f"(B, {self.tile}, {self.tile}, {n_labels})")
                t = out.get("tissue_prob")
                pending.append((where, None if t is None else np.asarray(t)[:len(where)]))
                yield seg, (bdr[..., 0] if bdr.ndim == 4 else bdr)

        results = postprocess_stream(model_outputs(), self.cfg.postprocess, workers)
        if progress is not None:
            progress(self.state["tiles_done"], self.state["tiles_total"])
        rows_this_call = 0
        try:
            for i, count in enumerate(per_row, start=first):
                y = self.ys[i]
                self.stitch.start_row(y)
                r0, r1 = self.row_cores[i]
                for _ in range(-(-count // batch_size)):
                    batch = next(results)
                    where, tissue = pending.popleft()
                    for j, ((ty, tx), res) in enumerate(zip(where, batch)):
                        self.stitch.add_tile(ty, tx, self.tile, res.inst, res.classes,
                                             res.class_probs,
                                             None if tissue is None else tissue[j],
                                             (r0, r1, *self.col_cores[self.column[tx]]))
                    self.state["tiles_done"] += len(where)
                    if progress is not None:
                        progress(self.state["tiles_done"], self.state["tiles_total"])
                last = i + 1 == len(self.ys)
                self._commit_row(self.stitch.finish(self.plan.height if last
                                                    else self.ys[i + 1]))
                rows_this_call += 1
                if stop_after_rows is not None and rows_this_call >= stop_after_rows and not last:
                    return False
        finally:
            results.close()
            reader.close()
        return True

    # -- the end: pictures, summary, then the files appear --
    def prepare_outputs(self) -> None:
        with open(self.geojson_part, "r+b") as f:
            f.truncate(self.state["geojson_bytes"])
            f.seek(0, os.SEEK_END)
            f.write(exports.GEOJSON_TAIL.encode("utf-8"))
        with open(self.csv_part, "r+b") as f:
            f.truncate(self.state["csv_bytes"])
        atomic.save_png(self.dir / "overlay.png", self.overlay())
        if self.labels is not None:
            self.labels.attrs.update({"nuclei": self.state["nuclei"]})
        atomic.write_json(self.dir / "summary.json", self.summary())
        self.state["finalized"] = True
        self._save_state()

    def publish(self) -> dict:
        """Move the finished files into place (summary last: its presence means complete)."""
        parts = {"geojson": self.geojson_part, "csv": self.csv_part,
                 "overlay": self.dir / "overlay.png", "tissue": self.dir / "tissue.png",
                 "labels": self.labels_part, "summary": self.dir / "summary.json"}
        store = slide_output_paths(self.out_dir, self.stem, True)["labels"]
        if not self.label_store and store.exists():
            self._set_aside(store)  # another job's store (--overwrite): its ids are not ours
        for key, target in self.paths.items():  # the summary comes last
            src = parts[key]
            if src.exists():  # a restart after a kill in here finds some already moved
                if src.is_dir() and target.exists():
                    self._set_aside(target)  # a folder is not renamed over a full one
                os.replace(src, target)
        # Renamed before removal: a half-removed folder must not look like an unfinished run.
        trash = self.dir.with_name(f"{self.dir.name}.done-{os.getpid()}")
        os.replace(self.dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return json.loads(self.paths["summary"].read_text())

    def _set_aside(self, path: Path) -> None:
        """Move an old output out of the way into the job folder (removed with it)."""
        old = self.dir / f"replaced-{path.name}"
        if old.is_dir():
            shutil.rmtree(old)
        old.unlink(missing_ok=True)
        os.replace(path, old)

    def overlay(self) -> np.ndarray:
        """The region at most THUMBNAIL_SIDE px a side, nuclei as dots in their class colour
        (drawn from the table, so a resumed run draws the same picture)."""
        x, y, w, h = self.plan.region
        k = max(w, h) / THUMBNAIL_SIDE
        tw, th = max(1, int(round(w / max(k, 1)))), max(1, int(round(h / max(k, 1))))
        picture = read_reduced(self.slide, tw, th, self.plan.region)
        sx, sy = tw / w, th / h
        colors = np.asarray(self.colors, np.uint8)
        with open(self.csv_part, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                cx, cy = (float(row["x"]) - x + 0.5) * sx, (float(row["y"]) - y + 0.5) * sy
                radius = max(0.5, math.sqrt(float(row["area_px"]) / math.pi) * min(sx, sy))
                c0, c1 = int(max(cx - radius, 0)), int(min(math.ceil(cx + radius), tw))
                r0, r1 = int(max(cy - radius, 0)), int(min(math.ceil(cy + radius), th))
                picture[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = colors[
                    int(row["label"]) % len(colors)]
        return picture

    def summary(self) -> dict:
        plan = self.plan
        counts = dict(zip(self.label_names[1:], self.state["counts"][1:]))
        area = self.tissue.area_mm2(plan)
        total = self.state["nuclei"]
        tissue_prob = self.stitch.image_tissue_prob()
        slide_tissue = None
        if tissue_prob is not None:
            t = int(np.argmax(tissue_prob))
            slide_tissue = {"name": self.tissue_names[t] if t < len(self.tissue_names) else str(t),
                            "prob": round(float(tissue_prob[t]), 4)}
        return {
            "slide": str(self.slide.path), "backend": self.slide.backend,
            "vendor": self.slide.vendor, "dimensions": list(self.slide.dimensions),
            "slide_mpp": plan.slide_mpp,
            "analysis": {"mpp": plan.mpp, "level": plan.level,
                         "level_mpp": round(plan.level_mpp, 6), "resampled": plan.factor != 1.0,
                         "factor": plan.factor, "region": list(plan.region),
                         "model_pixels": [plan.width, plan.height], "tile": self.tile,
                         "overlap": self.overlap},
            "tiles": {"grid": len(self.ys) * len(self.xs), "run": self.state["tiles_total"],
                      "rows": len(self.ys)},
            "tissue": {"area_mm2": round(area, 6), "mask": self.paths["tissue"].name,
                       "source": self.state["tissue_source"],
                       "mask_um_per_px": [round(s * plan.slide_mpp, 4) for s in self.tissue.scale]},
            "nuclei": {"total": total, "per_class": counts,
                       "per_mm2": ({k: round(v / area, 3) for k, v in counts.items()}
                                   if area > 0 else None),
                       "total_per_mm2": round(total / area, 3) if area > 0 else None},
            "slide_tissue": slide_tissue,
            "files": {k: p.name for k, p in self.paths.items()},
            "job": self.job,
        }

