"""Shared pieces of the training tests: a tiny config and deterministic batches."""

from __future__ import annotations

import numpy as np


def tiny_config(image_size: int = 32, batch: int = 8):
    from configs import tiny

    cfg = tiny.get_config()
    tiny.shrink(cfg, image_size=image_size, batch=batch)
    return cfg


def disc_batch(batch: int, size: int, seed: int, num_tissues: int = 19, dark_half: bool = False):
    """Host batch of images with dark discs (nuclei) on a pink background, labelled.

    With ``dark_half`` the second half of the batch is much darker, so per-shard BatchNorm
    statistics would differ strongly from the global ones.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.zeros((batch, size, size, 3), np.uint8)
    inst = np.zeros((batch, size, size), np.int32)
    cls = np.zeros((batch, size, size), np.uint8)
    for b in range(batch):
        img = np.empty((size, size, 3))
        img[:] = (235, 170, 200)
        k = 0
        for _ in range(rng.integers(2, 6)):
            r = rng.uniform(2.5, size / 6)
            cy, cx = rng.uniform(r, size - r, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            disc &= inst[b] == 0
            if disc.sum() < 5:
                continue
            k += 1
            c = int(rng.integers(1, 6))
            inst[b][disc] = k
            cls[b][disc] = c
            img[disc] = (60 + 20 * c, 40, 120 + 10 * c)
        img += rng.normal(0, 6, img.shape)
        if dark_half and b >= batch // 2:
            img *= 0.4
        image[b] = np.clip(img, 0, 255).astype(np.uint8)
    return {"image": image, "inst": inst, "cls": cls,
            "tissue": rng.integers(0, num_tissues, batch).astype(np.int32),
            "valid": np.ones(batch, bool), "index": np.arange(batch, dtype=np.int32)}
