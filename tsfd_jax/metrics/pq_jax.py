"""Per-image panoptic quality as a jittable JAX function (official PanNuke rules, fixed sizes).

The same numbers as ``metrics.pq.per_image_stats`` (DQ, SQ, PQ and TP/FP/FN per image for every
class channel and for the binarised map, NaN where the ground-truth map holds a single value),
computed on device with static shapes, for validation inside a jitted loop or for users who keep
their label maps on the accelerator. One (K, K) contingency table per map by a scatter-add, where
K = ``max_instances``; matching is IoU > ``match_iou`` (>= 0.5, where matches are unique).

Requirements the numpy version does not have (it relabels freely):
- instance ids are integers in 1 .. K - 1; pixels with other ids (negative or >= K) are left out
  and flagged in ``overflow``;
- an id means one instance in the whole image (unique across class channels, as in PanNuke's
  masks and ``postprocess.to_pannuke_layout``): the binarised map keeps, per pixel, the id of its
  last non-zero channel, which is the official ``binarize`` up to renumbering.
Averaging into mPQ / bPQ per tissue stays on the host (``metrics.pq.pannuke_pq``'s order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def binarize_jax(masks: jax.Array, num_classes: int) -> jax.Array:
    """(..., H, W, >= C) instance channels -> (..., H, W): the id of the last non-zero channel."""
    x = masks[..., :num_classes]
    nonzero = x != 0
    last = (num_classes - 1) - jnp.argmax(nonzero[..., ::-1], axis=-1)
    top = jnp.take_along_axis(x, last[..., None], axis=-1)[..., 0]
    return jnp.where(jnp.any(nonzero, axis=-1), top, 0)


def _map_stats(true: jax.Array, pred: jax.Array, k: int, match_iou: float) -> dict:
    """One (H, W) true map against one predicted map."""
    bad = (true < 0) | (true >= k) | (pred < 0) | (pred >= k)
    t = jnp.where((true < 0) | (true >= k), 0, true).ravel()
    p = jnp.where((pred < 0) | (pred >= k), 0, pred).ravel()
    counts = jnp.zeros(k * k, jnp.int32).at[t * k + p].add(1).reshape(k, k)
    area_t, area_p = counts.sum(1)[1:], counts.sum(0)[1:]
    inter = counts[1:, 1:].astype(jnp.float32)
    union = area_t[:, None] + area_p[None, :] - inter
    iou = jnp.where(inter > 0, inter / jnp.maximum(union, 1.0), 0.0)
    matched = iou > match_iou
    tp = jnp.sum(matched)
    kt, kp = jnp.sum(area_t > 0), jnp.sum(area_p > 0)
    fp, fn = kp - tp, kt - tp
    iou_sum = jnp.sum(jnp.where(matched, iou, 0.0))
    # Official NaN rule: np.unique(true) has one value (no instance, or one covering the image).
    single = (kt == 0) | ((kt == 1) & (jnp.max(area_t) == t.size))
    denom = tp + 0.5 * fp + 0.5 * fn
    dq = jnp.where(denom > 0, tp / jnp.maximum(denom, 1e-9), jnp.nan)
    sq = iou_sum / (tp + 1.0e-6)
    nan = jnp.float32(jnp.nan)
    return {"DQ": jnp.where(single, nan, dq), "SQ": jnp.where(single, nan, sq),
            "PQ": jnp.where(single, nan, dq * sq), "tp": tp, "fp": fp, "fn": fn,
            "overflow": jnp.any(bad)}


def per_image_stats_jax(true_masks: jax.Array, pred_masks: jax.Array, num_classes: int,
                        max_instances: int, match_iou: float = 0.5) -> dict[str, jax.Array]:
    """(N, H, W, >= C) PanNuke-layout int maps -> dict of (N, C + 1) arrays: DQ, SQ, PQ (float32,
    NaN by the official rule), tp, fp, fn (int32) and ``overflow`` (bool: ids outside
    1 .. max_instances - 1 were left out). Column C is the binarised map (bPQ's). Jittable with
    ``num_classes``, ``max_instances`` and ``match_iou`` static."""
    if match_iou < 0.5:
        raise ValueError(f"match_iou must be >= 0.5 for the jittable PQ (unique matches); "
                         f"got {match_iou}")
    if true_masks.ndim != 4 or true_masks.shape[:3] != pred_masks.shape[:3]:
        raise ValueError(f"masks must be (N, H, W, C) of one size; got {true_masks.shape} and "
                         f"{pred_masks.shape}")
    C = num_classes
    t = jnp.asarray(true_masks)[..., :C].astype(jnp.int32)
    p = jnp.asarray(pred_masks)[..., :C].astype(jnp.int32)
    t = jnp.concatenate([t, binarize_jax(t, C)[..., None]], axis=-1)
    p = jnp.concatenate([p, binarize_jax(p, C)[..., None]], axis=-1)
    stats = jax.vmap(jax.vmap(lambda a, b: _map_stats(a, b, max_instances, match_iou),
                              in_axes=(-1, -1)))(t, p)
    return stats
