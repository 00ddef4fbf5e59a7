"""PanNuke fold files -> prepared examples (memory-mapped, validated).

Reads the official download layout (docs/data.md)::

    <root>/Fold 1/images/fold1/images.npy   (N, H, W, 3) RGB, float64 0..255
    <root>/Fold 1/images/fold1/types.npy    (N,) tissue names (docs/data.md)
    <root>/Fold 1/masks/fold1/masks.npy     (N, H, W, 6) channels 0..4 instance ids per class,
                                            channel 5 background (1 = background)

or a folder holding one fold's three files directly. Arrays are memory-mapped; each example is
read and validated when it is requested, so a fold is never loaded whole.

Conversion to the prepared contract (docs/data.md): ``image`` uint8, ``inst`` int32 contiguous 1..K,
``cls`` uint8 = mask channel + 1. PanNuke masks are not always clean; every repair is counted:

* A pixel set in several class channels keeps the channel holding the LARGEST raw id (ties:
  the lower channel). This is the authors' argmax over the raw mask values, so ``cls``
  reproduces their semantic labels pixel for pixel (docs/preprocessing.md).
* An instance is a (channel, id) pair, as in the official evaluation, which reads every channel
  separately (§6.2): the same id in two channels gives two instances (counted as shared ids).
* Output ids follow the order of (original id, channel), so clean masks (ids 1..K, one channel
  each, no overlaps) keep their ids and ``to_pannuke_masks`` inverts the conversion exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import skimage.measure

from tsfd_jax.constants import PANNUKE_CLASSES, PANNUKE_TISSUES
from tsfd_jax.errors import UserError

NUM_CLASSES = len(PANNUKE_CLASSES)
_FOLD_DIR = re.compile(r"^fold[ _-]?(\d+)$", re.IGNORECASE)

# Counts of repairs made while converting masks (summed over a split by prepare).
RESOLUTION_KEYS: tuple[str, ...] = (
    "overlap_pixels",            # nucleus pixels set in more than one class channel
    "shared_ids",                # ids present in several class channels of one image
    "removed_instances",         # (channel, id) instances that lost every pixel to overlaps
    "disconnected_instances",    # instances in several 8-connected pieces (counted, kept whole)
    "relabelled_images",         # images whose instance ids changed (were not 1..K)
    "background_mismatch_pixels",  # channel 5 disagrees with "no class channel set"
)


@dataclass(frozen=True)
class FoldFiles:
    """The three files of one PanNuke fold."""

    fold: int
    images: Path
    types: Path
    masks: Path


def _fold_files_in(folder: Path, fold: int) -> FoldFiles | None:
    """Official nesting inside ``Fold N`` first, then the three files directly in ``folder``."""
    official = FoldFiles(fold, folder / "images" / f"fold{fold}" / "images.npy",
                         folder / "images" / f"fold{fold}" / "types.npy",
                         folder / "masks" / f"fold{fold}" / "masks.npy")
    flat = FoldFiles(fold, folder / "images.npy", folder / "types.npy", folder / "masks.npy")
    for cand in (official, flat):
        if any(p.exists() for p in (cand.images, cand.types, cand.masks)):
            for p in (cand.images, cand.types, cand.masks):
                if not p.is_file():
                    raise UserError(f"{p}: missing (fold {fold} needs images.npy, types.npy, "
                                    "masks.npy)")
            return cand
    return None


def find_folds(root: str | Path, fold: int = 1) -> dict[int, FoldFiles]:
    """Fold number -> files, for the folder holding the ``Fold N`` folders (any subset), a
    ``Fold N`` folder itself, or a folder holding one fold's three .npy files (number ``fold``)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    folds: dict[int, FoldFiles] = {}
    for d in sorted(root.iterdir()):
        m = _FOLD_DIR.match(d.name)
        if d.is_dir() and m:
            files = _fold_files_in(d, int(m.group(1)))
            if files is None:
                raise UserError(f"{d}: no images/fold{m.group(1)}/images.npy and no images.npy")
            folds[files.fold] = files
    if folds:
        return dict(sorted(folds.items()))
    m = _FOLD_DIR.match(root.name)
    single = _fold_files_in(root, int(m.group(1)) if m else fold)
    if single is None:
        raise UserError(f"{root}: no 'Fold N' folders and no images.npy/types.npy/masks.npy")
    return {single.fold: single}


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        msg = str(e)
        if "Object arrays" in msg or "Python objects" in msg:
            raise UserError(f"{path}: an object array (needs pickle, which is never loaded); "
                            "save it as a string array (np.save(p, a.astype(str)))") from None
        if "pickled" in msg:
            raise UserError(f"{path}: not a .npy array (pickled data or an unknown format)"
                            ) from None
        raise UserError(f"{path}: not a readable .npy file ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})") from None


class PanNukeFold:
    """One fold, memory-mapped. ``raw(i)`` gives the arrays as stored, ``example(i)`` the
    prepared example; both validate example ``i`` (NaN, pixel range, mask ids) when read."""

    def __init__(self, files: FoldFiles):
        self.files, self.fold = files, files.fold
        self.images = _load(files.images)
        self.masks = _load(files.masks)
        types = _load(files.types)
        self._check_arrays(types)
        names = types.astype(str) if types.dtype.kind == "S" else np.asarray(types)
        self.tissues: tuple[str, ...] = tuple(str(t) for t in names)
        known = set(PANNUKE_TISSUES)
        for i, t in enumerate(self.tissues):
            if t not in known:
                raise UserError(f"{files.types}: unknown tissue name {t!r} at index {i} "
                                f"(expected one of {', '.join(PANNUKE_TISSUES)})")
        self.tissue_ids = np.array([PANNUKE_TISSUES.index(t) for t in self.tissues], np.int32)

    def _check_arrays(self, types: np.ndarray) -> None:
        f, im, mk = self.files, self.images, self.masks
        if im.ndim != 4 or im.shape[-1] != 3:
            raise UserError(f"{f.images}: shape {im.shape}, expected (N, H, W, 3)")
        if mk.ndim != 4 or mk.shape[-1] != NUM_CLASSES + 1:
            raise UserError(f"{f.masks}: shape {mk.shape}, expected (N, H, W, {NUM_CLASSES + 1})")
        for path, a in ((f.images, im), (f.masks, mk)):
            if a.dtype.kind not in "fiu":
                raise UserError(f"{path}: dtype {a.dtype}, expected a real number type (float64)")
        if types.ndim != 1 or types.dtype.kind not in "US":
            raise UserError(f"{f.types}: dtype {types.dtype} shape {types.shape}, "
                            "expected (N,) tissue name strings")
        if mk.shape[1:3] != im.shape[1:3]:
            raise UserError(f"{f.masks}: masks are {mk.shape[1]}x{mk.shape[2]} but images are "
                            f"{im.shape[1]}x{im.shape[2]} ({f.images})")
        if not len(im) == len(mk) == len(types):
            raise UserError(f"{f.images.parent}: {len(im)} images, {len(mk)} masks, {len(types)} "
                            f"types ({f.images.name}, {f.masks}, {f.types.name} must have equal "
                            "length)")
        if len(im) == 0:
            raise UserError(f"{f.images}: holds no images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def key(self, i: int) -> str:
        return f"fold{self.fold}/{i:05d}"

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(image (H, W, 3) float64, mask (H, W, 6) float64, tissue name), validated."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} outside fold {self.fold} of {len(self)} examples")
        image = np.asarray(self.images[i], dtype=np.float64)
        mask = np.asarray(self.masks[i], dtype=np.float64)
        if not np.isfinite(image).all():
            raise UserError(f"{self.files.images}: image {i} has NaN or infinite pixels")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 255:
            raise UserError(f"{self.files.images}: image {i} has values in [{lo:g}, {hi:g}], "
                            "outside 0..255")
        if not np.isfinite(mask).all():
            raise UserError(f"{self.files.masks}: mask {i} has NaN or infinite values")
        ids = mask[..., :NUM_CLASSES]
        if (ids < 0).any() or (ids != np.floor(ids)).any():
            raise UserError(f"{self.files.masks}: mask {i} has negative or non-integer "
                            "instance ids")
        return image, mask, self.tissues[i]

    def example_with_counts(self, i: int) -> tuple[dict[str, Any], dict[str, int]]:
        """The prepared example ``i`` and the repairs its mask needed (RESOLUTION_KEYS)."""
        image, mask, _ = self.raw(i)
        inst, cls, counts = masks_to_instances(mask)
        example = {"image": image_to_uint8(image), "inst": inst, "cls": cls,
                   "tissue": np.int32(self.tissue_ids[i]), "key": self.key(i)}
        return example, counts

    def example(self, i: int) -> dict[str, Any]:
        """Prepared example ``i``: image uint8 (H, W, 3), inst int32 (H, W), cls uint8 (H, W),
        tissue int32 (index in constants.PANNUKE_TISSUES), key 'fold{f}/{i:05d}'."""
        return self.example_with_counts(i)[0]


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) values in 0..255 -> uint8 by rounding. PanNuke images hold integer values, so this
    equals the authors' truncating astype(uint8) on the real data."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def count_disconnected(inst: np.ndarray) -> int:
    """Number of instances of ``inst`` (H, W) made of more than one 8-connected piece."""
    pieces = skimage.measure.label(inst, background=0, connectivity=2)
    owner = np.zeros(int(pieces.max()) + 1, np.int64)
    owner[pieces.ravel()] = inst.ravel()
    per_instance = np.bincount(owner[1:], minlength=int(inst.max()) + 1)
    return int((per_instance[1:] > 1).sum())


def masks_to_instances(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """PanNuke mask (H, W, C+1) -> (inst int32 (H, W), cls uint8 (H, W), repair counts).

    Overlaps: the channel with the largest raw id wins, ties to the lower channel (the authors'
    argmax). Instances are (channel, id) pairs numbered 1..K in (id, channel) order.
    """
    num_classes = mask.shape[-1] - 1
    ids = np.asarray(mask[..., :num_classes]).astype(np.int64)
    present = ids > 0
    n_set = present.sum(-1)
    fg = n_set > 0
    win = np.argmax(ids, axis=-1)  # largest id; np.argmax takes the first (lower) channel on ties
    win_id = np.take_along_axis(ids, win[..., None], axis=-1)[..., 0]

    # (id, channel) packed into one sortable integer.
    keys_before = np.unique((ids * num_classes + np.arange(num_classes))[present])
    key_map = win_id * num_classes + win
    keys_after = np.unique(key_map[fg])
    inst = np.zeros(ids.shape[:2], np.int32)
    inst[fg] = np.searchsorted(keys_after, key_map[fg]) + 1
    cls = np.where(fg, win + 1, 0).astype(np.uint8)

    id_before = keys_before // num_classes
    _, channels_per_id = np.unique(id_before, return_counts=True)
    bg = np.asarray(mask[..., num_classes])
    counts = {
        "overlap_pixels": int((n_set > 1).sum()),
        "shared_ids": int((channels_per_id > 1).sum()),
        "removed_instances": int(len(keys_before) - len(keys_after)),
        "disconnected_instances": count_disconnected(inst),
        "relabelled_images": int(not np.array_equal(keys_after // num_classes,
                                                    np.arange(1, len(keys_after) + 1))),
        "background_mismatch_pixels": int(((bg > 0) == fg).sum()),
    }
    return inst, cls, counts


def to_pannuke_masks(inst: np.ndarray, cls: np.ndarray,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Inverse of ``masks_to_instances``: inst (H, W) + cls (H, W) -> (H, W, C+1) float64 with
    channels 0..C-1 the instance ids of class c+1 and channel C background (1 = background)."""
    inst = np.asarray(inst)
    cls = np.asarray(cls)
    if inst.shape != cls.shape:
        raise ValueError(f"inst {inst.shape} and cls {cls.shape} differ in shape")
    if cls.size and int(cls.max()) > num_classes:
        raise ValueError(f"class label {int(cls.max())} beyond num_classes={num_classes}")
    out = np.zeros(inst.shape + (num_classes + 1,), np.float64)
    for c in range(num_classes):
        out[..., c] = np.where((cls == c + 1) & (inst > 0), inst, 0)
    out[..., num_classes] = inst == 0
    return out


def sum_counts(total: Mapping[str, int], add: Mapping[str, int]) -> dict[str, int]:
    """Key-wise sum of two count dicts."""
    out = dict(total)
    for k, v in add.items():
        out[k] = out.get(k, 0) + int(v)
    return out
