"""Class- and tissue-aware sampling weights for training (``data.sampling``; docs/data.md).

CellViT's idea (Hörst et al., 2024): draw images holding rare classes or rare tissues more
often. For image i with class presence P[i, c] (at least one nucleus of class c) and tissue
t(i), with f_c the share of images holding class c and g_t the share of images of tissue t:

    class score   s_i = sum_c P[i, c] / f_c          (0 for an image without nuclei)
    tissue score  u_i = 1 / g_t(i)
    r_i = the mean of the chosen scores, each divided by its mean over the images
    w_i = (1 - gamma) + gamma * r_i

gamma = 0 is uniform sampling; gamma = 1 samples by the scores alone (an image without nuclei is
then never drawn under 'class'). The paper's recipe samples uniformly (``data.sampling = ''``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tsfd_jax.errors import ConfigError, UserError

MODES = ("", "class", "tissue", "class+tissue")


def image_labels(source: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(presence (N, C) bool: image i holds a nucleus of class c + 1, tissue (N,) int64),
    reading every example once."""
    presence = np.zeros((len(source), num_classes), bool)
    tissues = np.zeros(len(source), np.int64)
    for i in range(len(source)):
        ex = source[i]
        labels = np.asarray(ex["cls"])[np.asarray(ex["inst"]) > 0]
        present = np.unique(labels)
        present = present[(present >= 1) & (present <= num_classes)]
        presence[i, present - 1] = True
        tissues[i] = int(ex["tissue"])
    return presence, tissues


def _normalised(score: np.ndarray) -> np.ndarray:
    mean = score.mean()
    return score / mean if mean > 0 else np.ones_like(score)


def check_mode(mode: str) -> str:
    """``mode`` when it is one of MODES, else a UserError naming them."""
    if mode not in MODES:
        raise UserError(f"data.sampling {mode!r}: expected one of {', '.join(map(repr, MODES))}")
    return mode


def sampling_weights(mode: str, gamma: float, presence: np.ndarray | None = None,
                     tissues: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """(N,) float64 weights of the module docstring for ``mode`` in MODES ('' -> all ones)."""
    check_mode(mode)
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"data.sampling_gamma {gamma}: must be in [0, 1]")
    parts = []
    if "class" in mode:
        p = np.asarray(presence, np.float64)
        freq = p.mean(0)
        parts.append(_normalised((p / np.where(freq > 0, freq, 1.0)).sum(1)))
    if "tissue" in mode:
        t = np.asarray(tissues, np.int64)
        counts = np.bincount(t)
        parts.append(_normalised(len(t) / counts[t].astype(np.float64)))
    if not parts:
        n = len(presence) if presence is not None else len(tissues)
        return np.ones(n, np.float64)
    return (1.0 - gamma) + gamma * np.mean(parts, axis=0)
