"""Atomic file writes: every output appears whole or not at all.

Each writer fills a temporary file ``.tmp-<name>.<random>`` in the target's folder and renames
it over the target (``os.replace``, atomic on POSIX within one file system), so a killed process
never leaves a half-written report, mask or JSON behind; a failed write removes its temporary.
Folders that clean up after themselves recognise the ``.tmp-`` prefix (``data/prepare.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def writing(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``path`` (ending in ``suffix``, for writers that choose
    the format by extension); on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes | str) -> None:
    """``data`` (str as UTF-8) to ``path``."""
    with writing(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    write_bytes(path, json.dumps(obj, indent=indent) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """A plain ``.npy`` (never pickled objects)."""
    with writing(path, ".npy") as tmp:
        np.save(tmp, np.asarray(array), allow_pickle=False)


def save_png(path: str | Path, image: Any) -> None:
    """A PIL image or a uint8 (H, W[, C]) array as PNG."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with writing(path, ".png") as tmp:
        image.save(tmp, format="PNG")
