"""Reading a prepared folder (written by ``prepare.py``; layout in its docstring and
docs/data.md): split expressions ('fold1+fold2') -> random-access, picklable sources."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tsfd_jax.errors import UserError

FORMAT = "tsfd-jax-prepared"
TFDS_SUBDIR = "tfds"
METADATA = "metadata.json"
KEYS = "keys.json"
COMPLETE = ".complete"
IN_PROGRESS = ".prepare-in-progress"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(out: Path) -> bool:
    info = read_json(out / COMPLETE)
    return isinstance(info, dict) and info.get("format") == FORMAT


class PreparedSource:
    """Random access over records of one or more splits: ``src[i]`` -> prepared example dict
    (image uint8 (H, W, 3), inst int32 (H, W), cls uint8 (H, W), tissue np.int32, key str).

    Picklable (grain worker processes): it pickles only paths and indices, and every process
    opens the ArrayRecord files itself on first access."""

    def __init__(self, tfds_dir: str | Path, parts: Sequence[tuple[str, np.ndarray]],
                 keys: Sequence[str]):
        self.tfds_dir = str(tfds_dir)
        self.parts = [(s, np.asarray(ix, np.int64)) for s, ix in parts]
        self.keys: tuple[str, ...] = tuple(keys)
        self._offsets = np.cumsum([0] + [len(ix) for _, ix in self.parts])
        if self._offsets[-1] != len(self.keys):
            raise ValueError("keys and indices differ in length")
        self._sources: dict[str, Any] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sources"] = {}
        return state

    def _source(self, split: str) -> Any:
        src = self._sources.get(split)
        if src is None:
            src = tfds.builder_from_directory(self.tfds_dir).as_data_source(split=split)
            self._sources[split] = src
        return src

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} outside a source of {n} examples")
        part = int(np.searchsorted(self._offsets, i, side="right")) - 1
        split, ix = self.parts[part]
        rec = self._source(split)[int(ix[i - self._offsets[part]])]
        key = rec["key"]
        return {"image": np.asarray(rec["image"], np.uint8),
                "inst": np.asarray(rec["inst"], np.int32),
                "cls": np.asarray(rec["cls"], np.uint8),
                "tissue": np.int32(rec["tissue"]),
                "key": key.decode("utf-8") if isinstance(key, bytes) else str(key)}

    def __repr__(self) -> str:
        return f"PreparedSource({self.tfds_dir!r}, {[s for s, _ in self.parts]}, n={len(self)})"


class PreparedDataset:
    """A finished prepared folder: ``metadata``, ``splits``, and sources over split expressions
    ('fold1' or 'fold1+fold2')."""

    def __init__(self, root: str | Path):
        self.root = root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root}: not a folder (prepare a dataset first)")
        if not is_complete(root):
            what = ("half-written (prepare was interrupted; run it again)"
                    if (root / IN_PROGRESS).exists() else "not a prepared dataset (no .complete)")
            raise UserError(f"{root}: {what}")
        meta, keys = read_json(root / METADATA), read_json(root / KEYS)
        if not isinstance(meta, dict) or not isinstance(keys, dict):
            raise UserError(f"{root}: {METADATA} or {KEYS} unreadable; prepare it again")
        self.metadata: dict[str, Any] = meta
        self._keys = keys
        self.splits: tuple[str, ...] = tuple(meta["splits"])
        self.tfds_dir = root / meta["tfds_dir"]

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.metadata["label_names"])

    @property
    def tissue_names(self) -> tuple[str, ...]:
        return tuple(self.metadata["tissue_names"])

    def split_names(self, expr: str) -> list[str]:
        names = [s.strip() for s in str(expr).split("+")]
        for s in names:
            if s not in self.splits:
                raise UserError(f"{self.root}: no split {s!r} (has {', '.join(self.splits)})")
        if len(set(names)) != len(names):
            raise UserError(f"split expression {expr!r} names a split twice")
        return names

    def keys(self, expr: str) -> list[str]:
        """Keys of the records of ``expr``, in record order (no record is read)."""
        return [k for s in self.split_names(expr) for k in self._keys[s]["keys"]]

    def tissues(self, expr: str) -> np.ndarray:
        """Tissue id per record of ``expr`` (int32), aligned with ``keys(expr)``."""
        return np.array([t for s in self.split_names(expr) for t in self._keys[s]["tissue"]],
                        np.int32)

    def source(self, expr: str) -> PreparedSource:
        names = self.split_names(expr)
        parts = [(s, np.arange(len(self._keys[s]["keys"]))) for s in names]
        keys = [k for s in names for k in self._keys[s]["keys"]]
        return PreparedSource(self.tfds_dir, parts, keys)

    def source_for_keys(self, expr: str, keys: Sequence[str]) -> PreparedSource:
        """The examples named by ``keys`` (in that order) from the splits of ``expr``."""
        where = {k: (s, j) for s in self.split_names(expr)
                 for j, k in enumerate(self._keys[s]["keys"])}
        missing = [k for k in keys if k not in where]
        if missing:
            raise UserError(f"{self.root}: {len(missing)} of {len(keys)} keys not in {expr} "
                            f"(first: {', '.join(missing[:3])})")
        parts: list[tuple[str, list[int]]] = []
        for k in keys:  # consecutive keys of one split share a part
            s, j = where[k]
            if not parts or parts[-1][0] != s:
                parts.append((s, []))
            parts[-1][1].append(j)
        return PreparedSource(self.tfds_dir, [(s, np.array(ix)) for s, ix in parts], list(keys))


def open_prepared(prepared_dir: str | Path) -> PreparedDataset:
    """Open a finished prepared folder (refuses half-written or foreign folders)."""
    return PreparedDataset(prepared_dir)
