"""Class colours and nucleus outlines drawn on images: the one palette of every picture
(predict's overlay, the evaluation report, slide thumbnails, GeoJSON colours)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from tsfd_jax.constants import PANNUKE_CLASS_COLORS, PANNUKE_CLASSES

# Colours for label sets other than PanNuke's (Tableau 10).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
# Rows drawn at a time, so a whole-slide-sized image never needs a second full-size mask.
_STRIPE = 1024


def class_colors(label_names: Iterable[str]) -> list[tuple[int, int, int]]:
    """RGB per label (index 0 background = black): PanNuke's colours for PanNuke labels."""
    names = tuple(label_names)
    if names[1:] == PANNUKE_CLASSES:
        return [(0, 0, 0)] + list(PANNUKE_CLASS_COLORS)
    return [(0, 0, 0)] + [PALETTE[i % len(PALETTE)] for i in range(len(names) - 1)]


def outline_mask(inst: np.ndarray) -> np.ndarray:
    """Pixels of a nucleus with a 4-neighbour outside it (inner outline), (H, W) bool."""
    inst = np.asarray(inst)
    edge = np.zeros(inst.shape, bool)
    edge[1:] |= inst[1:] != inst[:-1]
    edge[:-1] |= inst[:-1] != inst[1:]
    edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    edge[:, :-1] |= inst[:, :-1] != inst[:, 1:]
    return edge & (inst > 0)


def overlay(image: np.ndarray, inst: np.ndarray, class_map: np.ndarray,
            label_names: Iterable[str]) -> np.ndarray:
    """uint8 (H, W, 3): the image with each nucleus outlined in its class colour."""
    colors = np.asarray(class_colors(label_names), np.uint8)
    H = image.shape[0]
    out = np.empty(image.shape[:2] + (3,), np.uint8)
    for r in range(0, H, _STRIPE):  # stripes with one row of context each side
        a, b = max(r - 1, 0), min(r + _STRIPE + 1, H)
        edge = outline_mask(np.asarray(inst[a:b]))[r - a:r - a + min(_STRIPE, H - r)]
        part = np.array(image[r:r + _STRIPE, :, :3])
        cls = np.asarray(class_map[r:r + _STRIPE])
        part[edge] = colors[np.minimum(cls[edge], len(colors) - 1)]
        out[r:r + _STRIPE] = part
    return out


def overlay_pannuke(image: np.ndarray, mask: np.ndarray, label_names: Iterable[str]) -> np.ndarray:
    """``overlay`` of a PanNuke-layout mask (H, W, C+1): channel c holds the ids of class c + 1."""
    mask = np.asarray(mask)
    inst = np.zeros(mask.shape[:2], np.int64)
    class_map = np.zeros(mask.shape[:2], np.int32)
    offset = 0
    for c in range(mask.shape[-1] - 1):
        ids = mask[..., c].astype(np.int64)
        inside = ids > 0
        inst[inside] = ids[inside] + offset
        class_map[inside] = c + 1
        offset += int(ids.max()) if inside.any() else 0
    return overlay(image, inst, class_map, label_names)
