"""Image + label folders (CoNSeP-style) -> prepared examples.

Two layouts, told apart by the folder's contents:

- npz: the folder holds ``<stem>.png|jpg|jpeg|tif|tiff`` images, each with a ``<stem>.npz``
  holding ``inst`` (H, W) instance ids of any integer dtype (0 = background) and optionally
  ``type`` (H, W) class labels (0 = background, 1..C);
- mat (the original CoNSeP / HoVer-Net download): the folder holds ``Images/<stem>.png`` and
  ``Labels/<stem>.mat`` with ``inst_map`` and optionally ``type_map``, same meanings.

Class names for labels 1..C come from a ``classes.txt`` in the folder (one name a line), are
given explicitly, or are those of a class merge (``MERGES``, e.g. HoVer-Net's 7 -> 4 for
CoNSeP); without ``type`` every nucleus is class 1 of the single class "Nucleus".

Prepared contract (docs/data.md): ``image`` uint8 RGB, ``inst`` int32 contiguous 1..K (original id
order), ``cls`` uint8 = the majority ``type`` over the instance's labelled pixels (ties: the
smaller label), ``tissue`` 0 (folders carry no tissue), ``key`` = the stem. An instance without
any labelled pixel is dropped (it has no class to learn); every such repair is counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import skimage.segmentation

from tsfd_jax.constants import BACKGROUND
from tsfd_jax.data.pannuke import count_disconnected
from tsfd_jax.errors import UserError
from tsfd_jax.image_io import image_info, read_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CLASSES_FILE = "classes.txt"
NO_TYPE_CLASS = "Nucleus"
DEFAULT_GROUP_PATTERN = r"_\d+$"  # consep 'train_10_003' -> source image 'train_10'
MAT_IMAGES_DIR, MAT_LABELS_DIR = "Images", "Labels"  # subfolders of the CoNSeP/HoVer-Net layout

FOLDER_RESOLUTION_KEYS: tuple[str, ...] = (
    "relabelled_images",       # images whose instance ids were not already 1..K
    "disconnected_instances",  # instances in several 8-connected pieces (counted, kept whole)
    "mixed_type_instances",    # instances whose pixels carry more than one class label
    "untyped_instances",       # instances without any labelled pixel: dropped
    "typed_background_pixels",  # type > 0 where inst == 0: ignored
)


def read_classes(path: Path) -> tuple[str, ...]:
    """Class names for labels 1..C, one per non-empty line ('#' starts a comment line)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    names = tuple(s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#"))
    if not names:
        raise UserError(f"{path}: no class names")
    if len(set(names)) != len(names):
        raise UserError(f"{path}: repeated class names")
    return names


def source_group(stem: str, pattern: str = DEFAULT_GROUP_PATTERN) -> str:
    """The source image a tile comes from: the stem without ``pattern`` (empty: the stem)."""
    return re.sub(pattern, "", stem) if pattern else stem


def split_by_group(stems: Sequence[str], val_fraction: float, seed: int,
                   pattern: str = DEFAULT_GROUP_PATTERN) -> tuple[list[str], list[str]]:
    """(train stems, val stems): whole source groups go to val, in a seeded random group order,
    until val holds at least ``val_fraction`` of the images. Tiles of one image stay together."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if val_fraction == 0 or not stems:
        return list(stems), []
    groups = sorted({source_group(s, pattern) for s in stems})
    if len(groups) < 2:
        raise UserError(f"all {len(stems)} images form the single source group {groups[0]!r}; "
                        "a validation split needs two groups (set --group-pattern '' to split "
                        "by image, or --val-fraction 0)")
    order = [groups[j] for j in np.random.default_rng(seed).permutation(len(groups))]
    size = {g: 0 for g in groups}
    for s in stems:
        size[source_group(s, pattern)] += 1
    target, val_groups, n = val_fraction * len(stems), set(), 0
    for g in order[:-1]:  # the last group always stays in train
        if n >= target:
            break
        val_groups.add(g)
        n += size[g]
    train = [s for s in stems if source_group(s, pattern) not in val_groups]
    val = [s for s in stems if source_group(s, pattern) in val_groups]
    return train, val


# ---------------------------------------------------------------------------------------------
# Class merges: input class ids -> fewer output classes
@dataclass(frozen=True)
class ClassMerge:
    """Input class ids 1..len(source_names) -> output ids 1..len(names), by ``table``."""

    source_names: tuple[str, ...]
    names: tuple[str, ...]
    table: dict[int, int]

    def __post_init__(self) -> None:
        n_in, n_out = len(self.source_names), len(self.names)
        if sorted(self.table) != list(range(1, n_in + 1)) or not set(
                self.table.values()) <= set(range(1, n_out + 1)):
            raise ValueError(f"merge table {self.table} must map every id 1..{n_in} to an id "
                             f"in 1..{n_out}")

    def lookup(self) -> np.ndarray:
        """Lookup array: ``lookup()[type]`` is the merged type (background stays 0)."""
        lut = np.zeros(len(self.source_names) + 1, np.int64)
        for k, v in self.table.items():
            lut[k] = v
        return lut


CONSEP_CLASSES = ("other", "inflammatory", "healthy epithelial",
                  "dysplastic/malignant epithelial", "fibroblast", "muscle", "endothelial")
# The names are those of the merged CoNSeP tiles' classes.txt, so a model prepared from the tiles
# and one prepared from the .mat files share class names.
MERGES: dict[str, ClassMerge] = {
    "consep": ClassMerge(  # HoVer-Net's merge (its dataset.py): 3, 4 -> 3; 5, 6, 7 -> 4
        source_names=CONSEP_CLASSES,
        names=("other", "inflammatory", "epithelial", "spindle-shaped"),
        table={1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}),
}


def class_merge(name: str) -> ClassMerge:
    try:
        return MERGES[name]
    except KeyError:
        raise UserError(f"--merge {name!r}: expected one of {', '.join(sorted(MERGES))}") from None


# ---------------------------------------------------------------------------------------------
# Label file formats: each reads its arrays; FolderDataset validates them all alike
def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None


def _read_npz(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {n: np.asarray(z[n]) for n in names if n in z.files}
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None


def _mat_error(path: Path, e: Exception) -> UserError:
    hint = " (MATLAB v7.3 files are HDF5: re-save them with save(..., '-v7'))" \
        if isinstance(e, NotImplementedError) else ""
    return UserError(f"{path}: not a readable .mat file ({e}){hint}")


def _mat_keys(path: Path) -> list[str]:
    try:
        return [name for name, _, _ in scipy.io.whosmat(path)]  # header only, no arrays read
    except Exception as e:  # scipy raises many types for broken files
        raise _mat_error(path, e) from None


def _read_mat(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named arrays; MATLAB's default class is double, so whole-number float maps become
    int64 (anything else is left for the integer check)."""
    try:
        found = scipy.io.loadmat(path, variable_names=list(names))
    except Exception as e:
        raise _mat_error(path, e) from None
    arrays = {}
    for n in names:
        if n not in found:
            continue
        a = np.asarray(found[n])
        if a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all():
            a = a.astype(np.int64)
        arrays[n] = a
    return arrays


@dataclass(frozen=True)
class LabelFormat:
    """A label file format: its extension, the names of its two arrays, and its readers."""

    ext: str
    inst_key: str
    type_key: str
    keys: Callable[[Path], list[str]]  # the array names, cheaply
    read: Callable[[Path, Sequence[str]], dict[str, np.ndarray]]  # those of the names it holds


NPZ_FORMAT = LabelFormat(".npz", "inst", "type", _npz_keys, _read_npz)
MAT_FORMAT = LabelFormat(".mat", "inst_map", "type_map", _mat_keys, _read_mat)


# ---------------------------------------------------------------------------------------------
def is_labelled_folder(root: str | Path) -> bool:
    """Whether ``root`` looks like a folder ``FolderDataset`` reads: ``Images/`` + ``Labels/``,
    or at least one image with a ``.npz`` of the same stem beside it."""
    root = Path(root)
    if (root / MAT_IMAGES_DIR).is_dir() and (root / MAT_LABELS_DIR).is_dir():
        return True
    if not root.is_dir():
        return False
    return any(p.suffix.lower() in IMAGE_EXTS and p.with_suffix(".npz").is_file()
               for p in root.iterdir())


class FolderDataset:
    """One folder of images + labels (npz beside the images, or the CoNSeP / HoVer-Net
    ``Images/`` + ``Labels/*.mat`` layout); ``example(i)`` validates and converts example i."""

    def __init__(self, root: str | Path, class_names: Sequence[str] | None = None,
                 merge: str | None = None):
        self.root = root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root}: not a folder")
        if (root / MAT_IMAGES_DIR).is_dir() and (root / MAT_LABELS_DIR).is_dir():
            image_dir, label_dir = root / MAT_IMAGES_DIR, root / MAT_LABELS_DIR
            self.label_format = fmt = MAT_FORMAT
        else:
            image_dir = label_dir = root
            self.label_format = fmt = NPZ_FORMAT
        images: dict[str, Path] = {}
        labels: dict[str, Path] = {}
        for p in sorted(image_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                if p.stem in images:
                    raise UserError(f"{p}: a second image for stem {p.stem!r} "
                                    f"({images[p.stem].name})")
                images[p.stem] = p
        for p in sorted(label_dir.iterdir()):
            if p.is_file() and p.suffix.lower() == fmt.ext:
                labels[p.stem] = p
        same_dir = image_dir == label_dir
        for stem, p in images.items():
            if stem not in labels:
                raise UserError(f"{p}: no label file {stem}{fmt.ext} "
                                + ("beside it" if same_dir else f"in {label_dir}"))
        for stem, p in labels.items():
            if stem not in images:
                raise UserError(f"{p}: no image {stem}.png|jpg|jpeg|tif "
                                + ("beside it" if same_dir else f"in {image_dir}"))
        if not images:
            raise UserError(f"{image_dir}: no images ({', '.join(IMAGE_EXTS)}) with {fmt.ext} "
                            "labels")
        self.stems: tuple[str, ...] = tuple(sorted(images))
        self.image_paths = images
        self.label_paths = labels
        self.merge_name = merge
        self.merge: ClassMerge | None = class_merge(merge) if merge else None
        has_type = {s: fmt.type_key in fmt.keys(labels[s]) for s in self.stems}
        classes_file = root / CLASSES_FILE
        if self.merge is not None:
            if class_names is not None:
                raise UserError(f"--classes and --merge {merge} both name the classes; give one")
            if classes_file.is_file():
                # classes.txt names the input ids: a count other than the merge's means the
                # labels are not what the merge expects (e.g. tiles that are merged already).
                n = len(read_classes(classes_file))
                if n != len(self.merge.source_names):
                    raise UserError(f"{classes_file}: names {n} classes but --merge {merge} "
                                    f"expects input ids 1..{len(self.merge.source_names)} "
                                    f"({', '.join(self.merge.source_names)})")
            class_names = self.merge.names
        elif class_names is None and classes_file.is_file():
            class_names = read_classes(classes_file)
        if class_names is None:
            typed = [s for s, t in has_type.items() if t]
            if typed:
                raise UserError(f"{labels[typed[0]]}: holds '{fmt.type_key}' but {root} has no "
                                f"{CLASSES_FILE} (name the classes: --classes a,b,c"
                                + (", or --merge consep for CoNSeP's 7 classes)"
                                   if fmt is MAT_FORMAT else ")"))
            self.class_names: tuple[str, ...] = (NO_TYPE_CLASS,)
            self.typed = False
        else:
            self.class_names = tuple(class_names)
            untyped = [s for s, t in has_type.items() if not t]
            if untyped:
                raise UserError(f"{labels[untyped[0]]}: no '{fmt.type_key}' array, but classes "
                                f"{', '.join(self.class_names)} are given")
            self.typed = True
        self.label_names: tuple[str, ...] = (BACKGROUND,) + self.class_names

    def __len__(self) -> int:
        return len(self.stems)

    def image_shape(self, i: int) -> tuple[int, int]:
        info = image_info(self.image_paths[self.stems[i]])
        return info.height, info.width

    def _labels(self, stem: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Validated (inst, type or None) of ``stem``, type already merged; same checks for
        every label format."""
        path, fmt = self.label_paths[stem], self.label_format
        wanted = (fmt.inst_key, fmt.type_key) if self.typed else (fmt.inst_key,)
        arrays = fmt.read(path, wanted)
        for key in wanted:
            if key not in arrays:
                raise UserError(f"{path}: no '{key}' array "
                                f"(has {', '.join(fmt.keys(path)) or 'none'})")
        inst, typ = arrays[fmt.inst_key], arrays.get(fmt.type_key)
        for name, a in ((fmt.inst_key, inst), (fmt.type_key, typ)):
            if a is None:
                continue
            if a.dtype.kind not in "iu":
                raise UserError(f"{path}: '{name}' has dtype {a.dtype}, expected integers")
            if a.shape != shape:
                raise UserError(f"{path}: '{name}' has shape {a.shape} but the image is {shape}")
            if a.size and int(a.min()) < 0:
                raise UserError(f"{path}: '{name}' has negative values")
        if typ is not None:
            # With a merge the ids are the merge's input classes, checked before merging.
            known = self.merge.source_names if self.merge else self.class_names
            if typ.size and int(typ.max()) > len(known):
                what = f"--merge {self.merge_name}'s input" if self.merge else "the"
                raise UserError(f"{path}: class label {int(typ.max())} beyond {what} "
                                f"{len(known)} classes ({', '.join(known)})")
            if self.merge:
                typ = self.merge.lookup()[typ]
        return inst, typ

    def example_with_counts(self, i: int) -> tuple[dict[str, Any], dict[str, int]]:
        """The prepared example ``i`` and the repairs it needed (FOLDER_RESOLUTION_KEYS)."""
        stem = self.stems[i]
        image = np.ascontiguousarray(read_image(self.image_paths[stem]))
        inst, typ = self._labels(stem, image.shape[:2])
        inst, cls, counts = instances_and_classes(inst, typ, len(self.class_names))
        example = {"image": image, "inst": inst, "cls": cls, "tissue": np.int32(0), "key": stem}
        return example, counts

    def example(self, i: int) -> dict[str, Any]:
        """Prepared example ``i``: image uint8 (H, W, 3), inst int32, cls uint8, tissue 0,
        key = stem."""
        return self.example_with_counts(i)[0]


def instances_and_classes(inst: np.ndarray, typ: np.ndarray | None, num_classes: int
                          ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """inst (H, W) any ids + type (H, W) or None -> (inst int32 1..K, cls uint8, repair counts).

    Class of an instance = majority of its labelled (type > 0) pixels, ties -> smaller label;
    instances without a labelled pixel are dropped. Ids are renumbered in original id order.
    """
    inst = inst.astype(np.int64)
    seq, _, _ = skimage.segmentation.relabel_sequential(inst)
    k = int(seq.max())
    counts = dict.fromkeys(FOLDER_RESOLUTION_KEYS, 0)
    fg = seq > 0
    if typ is None:
        labels = np.ones(k + 1, np.int64)
    else:
        typ = typ.astype(np.int64)
        counts["typed_background_pixels"] = int(((typ > 0) & ~fg).sum())
        hist = np.bincount(seq[fg] * (num_classes + 1) + typ[fg],
                           minlength=(k + 1) * (num_classes + 1)).reshape(k + 1, num_classes + 1)
        labelled = hist[:, 1:]
        labels = np.argmax(labelled, axis=1) + 1  # first maximum = smaller label on ties
        untyped = labelled.sum(1) == 0
        untyped[0] = False
        counts["mixed_type_instances"] = int(((labelled > 0).sum(1) > 1).sum())
        counts["untyped_instances"] = int(untyped.sum())
        if untyped.any():
            seq = np.where(untyped[seq], 0, seq)
            seq, _, _ = skimage.segmentation.relabel_sequential(seq)
            labels = labels[~untyped]
            fg = seq > 0
    labels[0] = 0
    ids = np.unique(inst[inst > 0])
    counts["relabelled_images"] = int(counts["untyped_instances"] > 0
                                      or not np.array_equal(ids, np.arange(1, len(ids) + 1)))
    out_inst = seq.astype(np.int32)
    counts["disconnected_instances"] = count_disconnected(out_inst)
    cls = labels[out_inst].astype(np.uint8)
    return out_inst, cls, counts
