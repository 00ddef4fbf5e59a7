"""Device-side preprocessing: host batch -> (network inputs, targets) (PAPER §3.1, §4.2; docs/data.md).

Order, per batch (inside the jitted train/eval step):
1. (train and ``augment.enabled``) ``augment_example`` per example (``augment_batch``) with
   ``jax.random.split(key, B)``: geometric on image + labels, then photometric on the image.
2. Boundary target from the (augmented) ``inst``/``cls`` and content mask (docs/preprocessing.md).
3. RGB resized bilinearly from the label size H to ``input.size`` (256 -> 512 by the exact x2
   stencil of ``ops/resize.py``); labels stay at H.
4. Stain channels from the augmented, resized RGB (``input.stain_matrix``/``stain_scaling``).
5. inputs = concat(RGB / 255, stains) by ``input.channels``: rgb (3), rgb_he (5), rgb_her (6);
   with ``input.drop_r_at_inference`` the R stain is zeroed when not training (Table 5 row 4).

The config is read once, when the function is made: its values are Python constants of the trace.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from tsfd_jax.errors import UserError
from tsfd_jax.ops.augment import augment_batch
from tsfd_jax.ops.resize import resize_bilinear, resize_nearest
from tsfd_jax.ops.stain import MATRICES, SCALINGS, stain_channels
from tsfd_jax.ops.targets import (BOUNDARY_CHANNELS, boundary_target, contacts, distance_target,
                                  hv_target)

CHANNEL_SETS = {"rgb": 3, "rgb_he": 5, "rgb_her": 6}  # PAPER Table 5's input variants
# How the RGB channels are scaled: /255 (the paper) or per image and channel between their
# 1st and 99.8th percentiles (StarDist's normalisation; not the paper, docs/learning.md §17).
RGB_SCALINGS = ("fixed", "percentile")
PERCENTILES = (1.0, 99.8)
# A percentile range under this many grey levels is widened to it: an empty (white) tile
# is stretched at most 255 / 64 = 4x instead of turning its noise into contrast.
MIN_PERCENTILE_RANGE = 64.0


def input_channels(cfg) -> int:
    """Number of network input channels of ``cfg.input.channels`` (rgb 3, rgb_he 5, rgb_her 6)."""
    channels = str(cfg.input.channels)
    if channels not in CHANNEL_SETS:
        raise ValueError(f"unknown input.channels {channels!r}; expected one of {list(CHANNEL_SETS)}")
    return CHANNEL_SETS[channels]


def _input_settings(cfg) -> dict:
    """The ``cfg.input`` values the network input depends on, checked."""
    input_channels(cfg)
    channels = str(cfg.input.channels)
    matrix = str(cfg.input.stain_matrix)
    if matrix not in MATRICES:
        raise ValueError(f"unknown input.stain_matrix {matrix!r}; expected one of {MATRICES}")
    scaling = str(cfg.input.stain_scaling)
    if scaling not in SCALINGS:
        raise ValueError(f"unknown input.stain_scaling {scaling!r}; expected one of {SCALINGS}")
    rgb_scaling = str(cfg.input.rgb_scaling)
    if rgb_scaling not in RGB_SCALINGS:
        raise ValueError(f"unknown input.rgb_scaling {rgb_scaling!r}; expected one of "
                         f"{RGB_SCALINGS}")
    return {"channels": channels, "matrix": matrix, "scaling": scaling, "rgb_scaling": rgb_scaling,
            "size": int(cfg.input.size), "drop_r": bool(cfg.input.drop_r_at_inference)}


def percentile_range(image: jax.Array, content: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """Per image and channel (lo, hi) of ``image`` (B, H, W, C) at ``PERCENTILES``, over the
    pixels where ``content`` (B, H, W) is true (all when None); each (B, 1, 1, C), with hi - lo
    at least ``MIN_PERCENTILE_RANGE`` (widened about the middle)."""
    x = image.astype(jnp.float32)
    if content is not None:
        x = jnp.where(content[..., None] > 0, x, jnp.nan)
    lo, hi = jnp.nanpercentile(x, jnp.asarray(PERCENTILES), axis=(1, 2), keepdims=True)
    # An image without content pixels gets the fixed range.
    lo = jnp.where(jnp.isnan(lo), 0.0, lo)
    hi = jnp.where(jnp.isnan(hi), 255.0, hi)
    pad = jnp.maximum(MIN_PERCENTILE_RANGE - (hi - lo), 0.0) / 2
    return lo - pad, hi + pad


def _network_inputs(image: jax.Array, content: jax.Array | None, train: bool, channels: str,
                    matrix: str, scaling: str, rgb_scaling: str, size: int, drop_r: bool
                    ) -> jax.Array:
    """Steps 3-5: float RGB (B, H, W, 3) at label size -> inputs (B, S, S, n_ch) float32."""
    rgb = resize_bilinear(image, (size, size))
    if rgb_scaling == "percentile":
        # The range is taken at the label size: the resize is linear, so it maps the same way.
        lo, hi = percentile_range(image, content)
        parts = [(rgb - lo) / (hi - lo)]
    else:
        parts = [rgb / 255.0]
    if channels != "rgb":
        mask = None if content is None else resize_nearest(content, (size, size))
        stains = stain_channels(rgb, matrix, scaling, mask)
        if channels == "rgb_he":
            stains = stains[..., :2]
        elif drop_r and not train:
            stains = stains.at[..., 2].set(0.0)
        parts.append(stains)
    return jnp.concatenate(parts, axis=-1).astype(jnp.float32)


NETWORK_STRIDE = 32  # EfficientNet's total stride: network inputs are multiples of it


def input_size_at(cfg, label_size: int) -> int | None:
    """The network input for labels of ``label_size`` px at the trained ratio input.size /
    data.image_size (512 / 256 = 2), or None where that is not a whole multiple of 32. The
    ratio fixes the magnification, so another label size changes only the field of view."""
    label, size = int(cfg.data.image_size), int(cfg.input.size)
    if label_size < 1 or (label_size * size) % label:
        return None
    s = label_size * size // label
    return s if s % NETWORK_STRIDE == 0 else None


def at_label_size(cfg, label_size: int):
    """A copy of ``cfg`` whose network sees labels of ``label_size`` px (``input_size_at``);
    ValueError where no whole input size fits."""
    s = input_size_at(cfg, label_size)
    if s is None:
        raise ValueError(f"labels of {label_size} px need a network input of {label_size} x "
                         f"{cfg.input.size}/{cfg.data.image_size} px, not a multiple of "
                         f"{NETWORK_STRIDE}")
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.data.image_size, out.input.size = int(label_size), s
    return out


# What the boundary channel is trained to hold (ops/targets.py): the paper's contours,
# 1 - the normalised distance to each nucleus' edge (docs/learning.md §12), or HoVer-Net's
# horizontal and vertical maps (two channels, §14).
BOUNDARY_KINDS = tuple(BOUNDARY_CHANNELS)
# The regression target of "hv" has its own loss, which fits no other target.
HV_LOSS = "mse_msge"


def check_boundary_kind(cfg) -> str:
    """``targets.boundary_kind`` of a config, checked against the kinds and the boundary loss."""
    kind = str(cfg.targets.get("boundary_kind", "contour"))
    if kind not in BOUNDARY_KINDS:
        raise UserError(f"unknown targets.boundary_kind {kind!r}; expected one of {BOUNDARY_KINDS}")
    if (kind == "hv") != (str(cfg.loss.boundary) == HV_LOSS):
        raise UserError(f"targets.boundary_kind={kind!r} with loss.boundary="
                        f"{cfg.loss.boundary!r}: the 'hv' maps are trained with loss.boundary="
                        f"{HV_LOSS!r}, and that loss fits no other target")
    return kind


def model_inputs(images: jax.Array, cfg) -> jax.Array:
    """Network inputs of un-augmented images, as evaluation and prediction feed the model.

    images: (B, H, W, 3) RGB, uint8 or float in 0..255, at the label size ``data.image_size``.
    Returns (B, S, S, n_ch) float32 with S = ``input.size``; equal to
    ``make_preprocess_fn(cfg)(batch, key, train=False)[0]``.
    """
    settings = _input_settings(cfg)
    return _network_inputs(jnp.asarray(images).astype(jnp.float32), None, False, **settings)


def make_preprocess_fn(cfg) -> Callable[[dict, jax.Array, bool], tuple[jax.Array, dict]]:
    """``fn(batch, key, train) -> (inputs, targets)`` for the config ``cfg``.

    batch: image uint8 (B, H, W, 3), inst int (B, H, W), cls int (B, H, W), tissue int32 (B,),
    valid bool (B,). Returns inputs float32 (B, S, S, n_ch) and targets
    {cls int32 (B, H, W), boundary float32 (B, H, W) ((B, H, W, 2) for "hv"), tissue int32 (B,),
    weight float32 (B, H, W)}, and contact float32 (B, H, W) (``contacts``) when
    ``loss.contact_weight`` > 0.
    Same key -> same output; works with the batch sharded over a mesh axis (AxisType.Auto).
    """
    settings = _input_settings(cfg)
    augment_cfg = cfg.augment.to_dict() if hasattr(cfg.augment, "to_dict") else dict(cfg.augment)
    augment_on = bool(augment_cfg.get("enabled", False))
    frame_width = int(cfg.targets.frame_width)
    dilation = int(cfg.targets.get("boundary_dilation", 0))
    contact_dilation = int(cfg.targets.get("contact_dilation", 0))
    kind = check_boundary_kind(cfg)
    # The contact map is only a loss weight; skip it when that weight is off.
    with_contact = float(cfg.loss.get("contact_weight", 0.0)) > 0

    def preprocess(batch: dict, key: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        image = jnp.asarray(batch["image"])
        inst = jnp.asarray(batch["inst"]).astype(jnp.int32)
        cls = jnp.asarray(batch["cls"]).astype(jnp.int32)
        b, h, w = inst.shape
        valid = batch.get("valid")
        valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid)

        if train and augment_on:
            keys = jax.random.split(key, b)
            image, inst, cls, content = augment_batch(keys, image, inst, cls, augment_cfg)
        else:
            image = image.astype(jnp.float32)
            content = None

        if kind == "distance":
            boundary = distance_target(inst)
        elif kind == "hv":
            boundary = hv_target(inst)
        else:
            boundary = boundary_target(inst, cls, content, frame_width, dilation,
                                       contact_dilation)
        inputs = _network_inputs(image, content, train, **settings)
        targets = {
            "cls": cls,
            "boundary": boundary,
            "tissue": jnp.asarray(batch["tissue"]).astype(jnp.int32),
            "weight": jnp.broadcast_to(valid.astype(jnp.float32)[:, None, None], (b, h, w)),
        }
        if with_contact:
            targets["contact"] = contacts(inst).astype(jnp.float32)
        return inputs, targets

    return preprocess
