"""Reading user images for inference: any PNG, JPEG or TIFF -> uint8 RGB (H, W, 3).

Rules (docs/predict.md):
* PNG / JPEG (and anything else Pillow opens) are decoded by Pillow. Palette, CMYK and YCbCr
  images are converted to RGB; an alpha channel is dropped. Pillow reduces 16-bit PNGs to their
  high byte.
* TIFF (including BigTIFF) is read by tifffile: the first series at full resolution (level 0 of a
  pyramid). Uncompressed uint8 RGB data is memory-mapped (no copy at all); other large TIFFs are
  decoded into a temporary memory-mapped file instead of RAM. A compression tifffile cannot decode
  without the optional ``imagecodecs`` package (LZW, JPEG) falls back to Pillow.
* 16-bit images keep the high byte (``x >> 8``), the same as Pillow does for 16-bit PNGs, so a
  16-bit TIFF and a 16-bit PNG of one scan give the same pixels (within one grey level of
  ``round(x / 257)``). The mapping never depends on the image content (tiles of one slide map
  alike); an image whose values stay below 4096 (12-bit data) is accepted with a warning that it
  will look dark.
* Refused with one line naming the file (``UserError``): unreadable or unsupported files, zero
  size, greyscale or two-channel images (H&E needs colour), stacks (more than one plane), more
  than 4 channels, CMYK TIFFs, float, signed or 32-bit pixels (their scale is ambiguous: save as
  8- or 16-bit).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from tsfd_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")
# Above this many pixels a TIFF that cannot be memory-mapped is decoded into a temporary
# memory-mapped file rather than RAM.
LARGE_PIXELS = 1 << 26
_STRIPE = 1024  # rows converted at a time (bounded temporary memory)
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: size, channels and sample type, before any pixel is decoded."""
    height: int
    width: int
    channels: int
    dtype: str
    reader: str  # 'tifffile' | 'pillow'


def _is_tiff(path: Path) -> bool:
    if path.suffix.lower() in TIFF_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False


def _check_size_channels(path: Path, h: int, w: int, c: int) -> None:
    if h <= 0 or w <= 0:
        raise UserError(f"{path}: zero-size image ({h} x {w} pixels)")
    if c in (1, 2):
        raise UserError(f"{path}: greyscale image ({c} channel{'s' if c > 1 else ''}); "
                        f"H&E needs colour (RGB)")
    if c not in (3, 4):
        raise UserError(f"{path}: {c} channels; expected RGB or RGBA")


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    if dtype in (np.uint8, np.uint16):
        return
    kinds = {"f": "floating-point", "i": "signed integer", "b": "boolean"}
    kind = kinds.get(dtype.kind, str(dtype))
    raise UserError(f"{path}: {kind} pixels ({dtype}) are not supported (their scale is "
                    f"ambiguous); save the image as 8- or 16-bit RGB")


# ---- TIFF ----------------------------------------------------------------------------------

def _tiff_layout(path: Path, series) -> tuple[tuple[int, ...], str, int | None]:
    """(shape, axes, channel axis) of a series, checked: one plane of Y x X [x channels]."""
    shape, axes = tuple(series.shape), str(series.axes)
    if 0 in shape or not shape:
        raise UserError(f"{path}: zero-size image (TIFF shape {shape})")
    if "Y" not in axes or "X" not in axes:
        raise UserError(f"{path}: TIFF series with axes {axes!r} has no image plane")
    extra = [(a, n) for a, n in zip(axes, shape) if a not in "YXSC" and n > 1]
    if extra:
        raise UserError(f"{path}: TIFF holds a stack ({', '.join(f'{a}={n}' for a, n in extra)}); "
                        f"give one 2-D RGB image")
    chan = [i for i, a in enumerate(axes) if a in "SC" and shape[i] > 1]
    if len(chan) > 1:
        raise UserError(f"{path}: TIFF with several channel axes {axes!r}")
    return shape, axes, (chan[0] if chan else None)


def _tiff_info(path: Path) -> tuple[ImageInfo, dict]:
    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"{path}: not a readable TIFF ({e})") from None
    with tf:
        if not tf.series:
            raise UserError(f"{path}: TIFF holds no image")
        series = tf.series[0]
        if getattr(series, "levels", None):
            series = series.levels[0]
        shape, axes, ch = _tiff_layout(path, series)
        h, w = shape[axes.index("Y")], shape[axes.index("X")]
        c = shape[ch] if ch is not None else 1
        page = series.pages[0] if series.pages else None
        photometric = getattr(getattr(page, "photometric", None), "name", "")
        compression = getattr(getattr(page, "compression", None), "name", "NONE")
        meta = {"axes": axes, "shape": shape, "channel_axis": ch, "photometric": photometric,
                "compression": compression}
        info = ImageInfo(h, w, c, str(np.dtype(series.dtype)), "tifffile")
    _check_size_channels(path, h, w, c)
    if photometric == "SEPARATED":
        raise UserError(f"{path}: CMYK TIFF; convert it to RGB")
    if photometric == "PALETTE":
        raise UserError(f"{path}: palette (indexed colour) TIFF; convert it to RGB")
    _check_dtype(path, np.dtype(info.dtype))
    return info, meta


def _read_tiff(path: Path, info: ImageInfo, meta: dict) -> np.ndarray:
    large = info.height * info.width > LARGE_PIXELS
    arr = None
    if info.dtype == "uint8":
        try:  # uncompressed, contiguous: a read-only view of the file, nothing copied
            arr = tifffile.memmap(path, mode="r", series=0, level=0)
        except Exception:  # noqa: BLE001 - not memory-mappable: decode below
            arr = None
    if arr is None:
        try:
            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                if getattr(series, "levels", None):
                    series = series.levels[0]
                arr = series.asarray(out="memmap" if large else None)
        except ValueError as e:
            if "imagecodecs" in str(e):  # LZW/JPEG without imagecodecs: Pillow decodes these
                return _read_pillow(path)
            raise UserError(f"{path}: cannot decode the TIFF ({e})") from None
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: cannot decode the TIFF ({e})") from None
    arr = np.asarray(arr) if not isinstance(arr, np.memmap) else arr
    arr = arr.reshape(meta["shape"])
    # Keep Y, X and the channel axis (all others have length 1), channels last: views only.
    axes = meta["axes"]
    index = tuple(slice(None) if (a in "YX" or i == meta["channel_axis"]) else 0
                  for i, a in enumerate(axes))
    kept = [a if i != meta["channel_axis"] else "C" for i, a in enumerate(axes)
            if a in "YX" or i == meta["channel_axis"]]
    arr = arr[index]
    order = [kept.index("Y"), kept.index("X")] + ([kept.index("C")] if "C" in kept else [])
    arr = np.transpose(arr, order)
    return _to_rgb8(path, arr)


# ---- Pillow --------------------------------------------------------------------------------

def _open_pillow(path: Path):
    # Whole-slide exports are large; the files are the user's own, not downloads.
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for bad files
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _pillow_info(path: Path) -> ImageInfo:
    with _open_pillow(path) as im:
        w, h = im.size
        mode = im.mode
    if mode in _GREY_MODES:
        c = 2 if mode in ("LA", "La") else 1
    else:
        c = 4 if mode in ("RGBA", "RGBa", "RGBX", "PA") else 3
    _check_size_channels(path, h, w, c)
    return ImageInfo(h, w, c, "uint8", "pillow")


def _read_pillow(path: Path) -> np.ndarray:
    with _open_pillow(path) as im:
        if im.mode in _GREY_MODES:
            _check_size_channels(path, im.size[1], im.size[0], 2 if im.mode in ("LA", "La") else 1)
        try:
            im.load()
            if im.mode not in ("RGB", "RGBA", "RGBX", "RGBa"):
                im = im.convert("RGB")
            arr = np.asarray(im)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data
            raise UserError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from None
    if arr.ndim != 3 or arr.size == 0:
        _check_size_channels(path, *(arr.shape[:2] if arr.ndim >= 2 else (0, 0)), 3)
    return _to_rgb8(path, arr)


# ---- common --------------------------------------------------------------------------------

def _scratch(shape: tuple[int, ...], dtype) -> np.memmap:
    """A writable memory map on an anonymous temporary file (removed when closed)."""
    return np.memmap(tempfile.TemporaryFile(prefix="tsfd-image-"), dtype=dtype, mode="w+",
                     shape=shape)


def _to_rgb8(path: Path, arr: np.ndarray) -> np.ndarray:
    """(H, W[, C]) uint8/uint16 -> uint8 (H, W, 3); a view when already uint8 RGB(A)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    h, w, c = arr.shape
    _check_size_channels(path, h, w, c)
    _check_dtype(path, arr.dtype)
    rgb = arr[..., :3]  # alpha dropped (a view)
    if arr.dtype == np.uint8:
        return rgb
    out = _scratch((h, w, 3), np.uint8) if h * w > LARGE_PIXELS else np.empty((h, w, 3), np.uint8)
    high = 0
    for r in range(0, h, _STRIPE):  # stripes: bounded temporary memory for large images
        part = rgb[r:r + _STRIPE]
        high = max(high, int(part.max(initial=0)))
        out[r:r + _STRIPE] = part >> 8  # the high byte, as Pillow does for 16-bit PNGs
    if high < 4096:
        warnings.warn(f"{path}: 16-bit image with values below 4096 (12-bit data?); it is mapped "
                      f"by its high byte and will look dark: rescale it to the full 16-bit range",
                      stacklevel=2)
    return out


def _image_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an image")
    return path


def image_info(path: str | Path) -> ImageInfo:
    """The header of an image, checked (size, channels, sample type) without decoding pixels."""
    path = _image_file(path)
    if _is_tiff(path):
        return _tiff_info(path)[0]
    return _pillow_info(path)


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 RGB (H, W, 3) (see the module doc for the rules).

    Uncompressed uint8 TIFFs come back as a read-only memory map of the file; everything else as
    an array (large decoded TIFFs: a temporary memory map). Problems raise ``UserError``.
    """
    path = _image_file(path)
    if _is_tiff(path):
        info, meta = _tiff_info(path)
        return _read_tiff(path, info, meta)
    return _read_pillow(path)


def list_images(path: str | Path) -> list[Path]:
    """A file -> [file]; a folder -> its images (by extension, sorted); UserError when none."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files
