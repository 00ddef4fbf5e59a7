"""Examples -> a prepared, random-access dataset (TFDS ArrayRecord + metadata.json).

The "prepared records" stage of docs/data.md: PanNuke folds (``pannuke.py``) or image + label
folders (``folders.py``) are converted once, validated, and written by a
``tfds.core.GeneratorBasedBuilder`` in ArrayRecord format (no TensorFlow needed: images are
given to TFDS as PNG bytes, DatasetInfo is built directly). Layout of a prepared folder::

    <out>/tfds/tsfd_nuclei/1.0.0/...   TFDS files (one split per fold, or train/val/...)
    <out>/metadata.json                 label/tissue names, counts, repairs, input fingerprint
    <out>/keys.json                     per split: example keys and tissue ids, in record order
    <out>/.complete                     written last, atomically: the folder is finished

``.prepare-in-progress`` is written first; a folder with it and without ``.complete`` is a
half-written one of ours and is redone. Reading: ``prepared.py`` (``open_prepared``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging as absl_logging
import tensorflow_datasets as tfds
from PIL import Image
from tqdm import tqdm

from tsfd_jax import atomic
from tsfd_jax.constants import LABEL_NAMES, PANNUKE_TISSUES
from tsfd_jax.data import folders as folders_lib
from tsfd_jax.data import pannuke as pannuke_lib
from tsfd_jax.data.prepared import (COMPLETE, FORMAT, IN_PROGRESS, KEYS, METADATA, TFDS_SUBDIR,
                                    PreparedSource, is_complete, read_json)
from tsfd_jax.errors import UserError

FORMAT_VERSION = 1
BUILDER_NAME = "tsfd_nuclei"
_TMP_PREFIX = atomic.TMP_PREFIX
_OURS = {TFDS_SUBDIR, METADATA, KEYS, COMPLETE, IN_PROGRESS}
_HASH_BYTES = 1 << 20  # bytes hashed from each end of a large input file
_SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # TFDS split names; '+' joins them


# ---------------------------------------------------------------------------------------------
# Plans: what goes into which split
@dataclass
class Plan:
    """Everything needed to write a prepared dataset: per split a list of (reader, index)."""

    source: str
    inputs: list[Path]
    options: dict[str, Any]
    label_names: tuple[str, ...]
    tissue_names: tuple[str, ...]
    image_shape: tuple[int, int] | None  # None: sizes vary
    splits: dict[str, list[tuple[Any, int]]]
    files: list[Path] = field(default_factory=list)  # input files that the fingerprint covers

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "source": self.source,
                             "options": self.options}, sort_keys=True).encode())
        for p in sorted(self.files):
            h.update(_file_digest(p).encode())
        return h.hexdigest()


def _file_digest(path: Path) -> str:
    """Name + size + sha256 of the first and last MiB (whole file when small): cheap on 1 GB
    .npy files, unaffected by copies that change modification times."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HASH_BYTES))
        if size > 2 * _HASH_BYTES:
            f.seek(size - _HASH_BYTES)
        h.update(f.read())
    return f"{path.name}:{size}:{h.hexdigest()}"


def plan_pannuke(root: str | Path, fold: int = 1) -> Plan:
    """One split 'fold{N}' per fold found under ``root`` (see pannuke.find_folds)."""
    found = pannuke_lib.find_folds(root, fold)
    readers = {f: pannuke_lib.PanNukeFold(files) for f, files in found.items()}
    shapes = {r.image_size for r in readers.values()}
    files = [p for ff in found.values() for p in (ff.images, ff.types, ff.masks)]
    return Plan(source="pannuke", inputs=[Path(root)], options={"folds": sorted(found)},
                label_names=LABEL_NAMES, tissue_names=PANNUKE_TISSUES,
                image_shape=shapes.pop() if len(shapes) == 1 else None,
                splits={f"fold{f}": [(r, i) for i in range(len(r))] for f, r in readers.items()},
                files=files)


def plan_folders(inputs: Sequence[str | Path], split_names: Sequence[str] | None = None,
                 classes: Sequence[str] | None = None, val_fraction: float = 0.0, seed: int = 0,
                 group_pattern: str = folders_lib.DEFAULT_GROUP_PATTERN,
                 merge: str | None = None) -> Plan:
    """One split per input folder: named by ``split_names``, else 'train' for a single folder
    and the folder names for several. ``val_fraction`` > 0 moves whole source groups of the
    'train' split into a 'val' split (folders.split_by_group). ``merge`` names a class merge
    (folders.MERGES) applied to every folder's class labels."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("prepare: no --input folder")
    if split_names:
        if len(split_names) != len(inputs):
            raise UserError(f"--split given {len(split_names)} times for {len(inputs)} "
                            "--input folders")
        names = list(split_names)
    else:
        names = ["train"] if len(inputs) == 1 else [p.resolve().name for p in inputs]
    if len(set(names)) != len(names):
        raise UserError(f"split names {names} repeat; name each --input with --split")
    for name in names:
        if not _SPLIT_NAME.match(name):
            raise UserError(f"split name {name!r}: use letters, digits and '_' (--split NAME)")
    datasets = [folders_lib.FolderDataset(p, classes, merge) for p in inputs]
    for d in datasets[1:]:
        if d.class_names != datasets[0].class_names:
            raise UserError(f"{d.root}: classes {list(d.class_names)} differ from "
                            f"{list(datasets[0].class_names)} of {datasets[0].root}")
    seen: dict[str, Path] = {}
    for d in datasets:
        for s in d.stems:
            if s in seen:
                raise UserError(f"{d.image_paths[s]}: stem {s!r} also in {seen[s]} "
                                "(keys must be unique)")
            seen[s] = d.root
    splits: dict[str, list[tuple[Any, int]]] = {}
    for name, d in zip(names, datasets):
        splits[name] = [(d, i) for i in range(len(d))]
    if val_fraction:
        if "train" not in splits or "val" in splits:
            raise UserError("--val-fraction carves 'val' out of the 'train' split: needs a 'train' "
                            "split and no 'val' split")
        d = datasets[names.index("train")]
        train, val = folders_lib.split_by_group(d.stems, val_fraction, seed, group_pattern)
        pos = {s: i for i, s in enumerate(d.stems)}
        splits["train"] = [(d, pos[s]) for s in train]
        splits["val"] = [(d, pos[s]) for s in val]
    shapes = {d.image_shape(i) for d in datasets for i in range(len(d))}
    files = [p for d in datasets for s in d.stems for p in (d.image_paths[s], d.label_paths[s])]
    files += [d.root / folders_lib.CLASSES_FILE for d in datasets
              if (d.root / folders_lib.CLASSES_FILE).is_file()]
    options = {"splits": names, "classes": list(datasets[0].class_names),
               "val_fraction": val_fraction, "seed": seed if val_fraction else None,
               "group_pattern": group_pattern if val_fraction else None}
    if merge:  # only when set: folders prepared before --merge existed keep their fingerprint
        options["merge"] = merge
    return Plan(source="folders", inputs=inputs, options=options,
                label_names=datasets[0].label_names, tissue_names=(),
                image_shape=shapes.pop() if len(shapes) == 1 else None, splits=splits, files=files)


# ---------------------------------------------------------------------------------------------
# The TFDS builder
class _Stats:
    """Per-split counts gathered while the examples are generated."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.keys: dict[str, list[str]] = {}
        self.tissues: dict[str, list[int]] = {}
        self.nuclei: dict[str, np.ndarray] = {}
        self.repairs: dict[str, dict[str, int]] = {}

    def add(self, split: str, ex: dict[str, Any], counts: dict[str, int]) -> None:
        num_labels = len(self.plan.label_names)
        self.keys.setdefault(split, []).append(ex["key"])
        self.tissues.setdefault(split, []).append(int(ex["tissue"]))
        inst, cls = ex["inst"], ex["cls"]
        per_inst = np.zeros(int(inst.max()) + 1, np.int64)
        per_inst[inst.ravel()] = cls.ravel()
        n = np.bincount(per_inst[1:], minlength=num_labels)[:num_labels]
        self.nuclei[split] = self.nuclei.get(split, np.zeros(num_labels, np.int64)) + n
        self.repairs[split] = pannuke_lib.sum_counts(self.repairs.get(split, {}), counts)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # lossless
    return buf.getvalue()


class NucleiBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a Plan's splits; examples are kept in generation order (no shuffling), so
    keys.json gives the key of every record without reading the records."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "image PNG, inst int32 + cls uint8 (zlib), tissue int32, key."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Prepared by `python -m tsfd_jax prepare` from local files."

    # TFDS looks for a checksums file beside the builder's code through the `importlib_resources`
    # backport, which this stack does not install (ModuleNotFoundError); there are no downloads.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None

    def __init__(self, *, plan: Plan, stats: _Stats, progress: bool, **kwargs: Any):
        self._plan, self._stats, self._progress = plan, stats, progress
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        h, w = self._plan.image_shape or (None, None)
        f = tfds.features
        return tfds.core.DatasetInfo(
            builder=self, disable_shuffling=True,
            description=f"Nuclei instances and classes ({self._plan.source}), tsfd-jax prepared.",
            features=f.FeaturesDict({
                "image": f.Image(shape=(h, w, 3), encoding_format="png"),
                "inst": f.Tensor(shape=(h, w), dtype=np.int32, encoding="zlib"),
                "cls": f.Tensor(shape=(h, w), dtype=np.uint8, encoding="zlib"),
                "tissue": f.Tensor(shape=(), dtype=np.int32),
                "key": f.Text(),
            }))

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {name: self._generate_examples(name) for name in self._plan.splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        items = self._plan.splits[split]
        bar = tqdm(items, desc=f"prepare {split}", unit="img", disable=not self._progress,
                   dynamic_ncols=True)
        for pos, (reader, i) in enumerate(bar):
            ex, counts = reader.example_with_counts(i)
            self._stats.add(split, ex, counts)
            # The record key is the position: TFDS keeps that order (disable_shuffling).
            yield f"{pos:09d}", {"image": _png(ex["image"]), "inst": ex["inst"], "cls": ex["cls"],
                                 "tissue": np.int32(ex["tissue"]), "key": ex["key"]}


# ---------------------------------------------------------------------------------------------
# Output folder states and atomic writes


def _ours(name: str) -> bool:
    return name in _OURS or name.startswith(_TMP_PREFIX)


def _check_only_ours(out: Path) -> list[str]:
    """The entries of ``out``; UserError if any of them was not written by prepare."""
    names = sorted(os.listdir(out))
    foreign = [n for n in names if not _ours(n)]
    if foreign:
        raise UserError(f"{out}: also holds {', '.join(foreign[:3])} (not written by prepare); "
                        "remove it or choose another --out")
    return names


def _remove_ours(out: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete what prepare wrote into ``out`` (refusing if anything else is there)."""
    names = _check_only_ours(out)
    for n in ([COMPLETE] if COMPLETE in names else []) + [n for n in names if n != COMPLETE]:
        if n in keep:
            continue
        p = out / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _pid_alive(info: Any) -> bool:
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _existing_state(out: Path, fingerprint: str, overwrite: bool,
                    log: Callable[[str], None]) -> str:
    """'done' (same input already prepared) or 'build' (after clearing what we may clear)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return "build"
    names = set(os.listdir(out))
    if COMPLETE in names and is_complete(out):
        meta = read_json(out / METADATA) or {}
        if meta.get("fingerprint") == fingerprint:
            log(f"{out}: already prepared ({meta.get('source')}, splits "
                f"{', '.join(f'{k} {v}' for k, v in meta.get('splits', {}).items())})")
            return "done"
        if not overwrite:
            raise UserError(f"{out}: holds a dataset prepared from different input or options "
                            f"({', '.join(map(str, meta.get('inputs', [])))}); pass --overwrite "
                            "to replace it, or choose another --out")
        _check_only_ours(out)
        log(f"{out}: replacing the prepared dataset (--overwrite)")
        return "build"
    if IN_PROGRESS in names:
        info = read_json(out / IN_PROGRESS)
        if _pid_alive(info):
            raise UserError(f"{out}: being prepared right now by process {info['pid']} (if not, "
                            f"delete {out / IN_PROGRESS})")
        _check_only_ours(out)
        log(f"{out}: removing a half-written preparation and starting again")
        return "build"
    raise UserError(f"{out}: exists and is not a dataset prepared by tsfd-jax; refusing to "
                    "write into it (choose an empty or new --out)")


# ---------------------------------------------------------------------------------------------
# prepare
def prepare(source: str, inputs: str | Path | Sequence[str | Path], out: str | Path, *,
            fold: int = 1, classes: Sequence[str] | None = None,
            splits: Sequence[str] | None = None, val_fraction: float = 0.0, seed: int = 0,
            group_pattern: str = folders_lib.DEFAULT_GROUP_PATTERN, merge: str | None = None,
            overwrite: bool = False,
            progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare ``source`` ('pannuke' | 'folders') from ``inputs`` into ``out``; returns the
    metadata. A finished folder with the same input is left untouched ("already prepared")."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = [Path(p) for p in inputs]
    if source == "pannuke":
        if len(inputs) != 1:
            raise UserError("prepare --source pannuke takes one --input (the folder holding the "
                            "'Fold N' folders, or one fold's .npy files)")
        if splits or val_fraction or classes or merge:
            raise UserError("--split, --val-fraction, --classes and --merge apply to --source "
                            "folders; PanNuke splits are its folds")
        plan = plan_pannuke(inputs[0], fold)
    elif source == "folders":
        plan = plan_folders(inputs, splits, classes, val_fraction, seed, group_pattern, merge)
    else:
        raise UserError(f"--source {source!r}: expected pannuke or folders")
    out = Path(out)
    fingerprint = plan.fingerprint()
    if _existing_state(out, fingerprint, overwrite, log) == "done":
        meta = read_json(out / METADATA)
        return meta
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / IN_PROGRESS, {"format": FORMAT, "pid": os.getpid(),
                                           "host": socket.gethostname(), "started": time.time()})
    try:
        _remove_ours(out, keep=(IN_PROGRESS,))
        meta = _build(plan, out, fingerprint, progress)
        atomic.write_json(out / COMPLETE, {"format": FORMAT, "version": FORMAT_VERSION,
                                            "fingerprint": fingerprint})
        (out / IN_PROGRESS).unlink()
    except Exception:
        if (out / IN_PROGRESS).exists() and not (out / COMPLETE).exists():
            _remove_ours(out)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    log(format_summary(meta))
    return meta


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _build(plan: Plan, out: Path, fingerprint: str, progress: bool) -> dict[str, Any]:
    stats = _Stats(plan)
    tfds.disable_progress_bar()  # our own tqdm bar shows the progress per split
    builder = NucleiBuilder(plan=plan, stats=stats, progress=progress,
                            data_dir=str(out / TFDS_SUBDIR), file_format="array_record")
    # TFDS prints "Downloading and preparing ..." although nothing is downloaded: keep it quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_dir=str(out / TFDS_SUBDIR / "downloads"),
            download_config=tfds.download.DownloadConfig(manual_dir=str(plan.inputs[0]),
                                                         try_download_gcs=False))
    shutil.rmtree(out / TFDS_SUBDIR / "downloads", ignore_errors=True)
    tfds_dir = Path(builder.data_dir).resolve().relative_to(out.resolve())
    for split, items in plan.splits.items():
        keys = stats.keys.get(split, [])
        if len(keys) != len(items):
            raise RuntimeError(f"split {split}: wrote {len(keys)} of {len(items)} examples")
        # keys.json relies on TFDS keeping the generation order: check a few records.
        src = PreparedSource(builder.data_dir, [(split, np.arange(len(keys)))], keys)
        for i in sorted({0, len(keys) // 2, len(keys) - 1} if keys else ()):
            with _quiet_absl():  # TFDS warns that OpenCV is absent (PIL decodes instead)
                got = src[i]["key"]
            if got != keys[i]:
                raise RuntimeError(f"split {split}: record {i} is {got}, not {keys[i]}")
    atomic.write_json(out / KEYS, {s: {"keys": stats.keys.get(s, []),
                                        "tissue": stats.tissues.get(s, [])} for s in plan.splits})
    classes = plan.label_names[1:]
    tissues = plan.tissue_names
    h_w = plan.image_shape
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "source": plan.source, "inputs": [str(p.resolve()) for p in plan.inputs],
        "options": plan.options,
        "label_names": list(plan.label_names), "tissue_names": list(tissues),
        "image_size": (h_w[0] if h_w[0] == h_w[1] else list(h_w)) if h_w else None,
        "splits": {s: len(items) for s, items in plan.splits.items()},
        "nuclei_per_class": {s: {c: int(n) for c, n in zip(classes, stats.nuclei.get(
            s, np.zeros(len(plan.label_names), np.int64))[1:])} for s in plan.splits},
        "images_per_tissue": {s: {t: c for t, c in ((tissues[k], stats.tissues[s].count(k))
                                                    for k in range(len(tissues))) if c}
                              for s in plan.splits if s in stats.tissues},
        "resolutions": {s: stats.repairs.get(s, {}) for s in plan.splits},
        "fingerprint": fingerprint,
        "tfds_dir": tfds_dir.as_posix(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic.write_json(out / METADATA, meta)
    return meta


def format_summary(meta: dict[str, Any]) -> str:
    """A short printable summary: images per split, nuclei per class, images per tissue, repairs."""
    lines = [f"prepared {meta['source']} -> splits: "
             + ", ".join(f"{s} {n} images" for s, n in meta["splits"].items())]
    for s in meta["splits"]:
        nuc = meta["nuclei_per_class"].get(s, {})
        lines.append(f"  {s} nuclei: " + ", ".join(f"{c} {n}" for c, n in nuc.items())
                     + f" (total {sum(nuc.values())})")
        tis = meta["images_per_tissue"].get(s, {})
        if tis:
            lines.append(f"  {s} tissues: " + ", ".join(f"{t} {n}" for t, n in tis.items()))
        rep = {k: v for k, v in meta["resolutions"].get(s, {}).items() if v}
        lines.append(f"  {s} resolved: " + (", ".join(f"{k} {v}" for k, v in rep.items())
                                            if rep else "nothing"))
    return "\n".join(lines)
