"""Colour deconvolution of H&E images into stain channels (PAPER §3.1, Eqs. 13-15; docs/preprocessing.md).

Beer-Lambert: optical density OD = -log(I / I_max) per RGB channel (Eq. 13), stains S = OD . D
with D the inverse of the stain matrix M whose rows are the stains' OD vectors (Eqs. 14-15).

Two matrices:
- ``"hed"`` (paper default): Ruifrok & Johnston's H, E, DAB matrix, computed exactly like
  ``skimage.color.rgb2hed``: input scaled to [0, 1], clamped at 1e-6, OD = log(x) / log(1e-6)
  (DIPlib's normalisation, so the darkest representable value has OD 1), negative stains set to 0.
  The third channel is DAB (the paper calls it "residual").
- ``"authors"``: the authors' code at HEAD: H = [0.65, 0.70, 0.29], E = [0.07, 0.99, 0.11],
  R = H x E (unnormalised cross product); ln(max(rgb, 1e-6)) / ln(1e-6) on 0..255 values, no
  clipping.

Two scalings to network-ready [0, 1] channels (``stain_channels``):
- ``"fixed"`` (default): (S - lo) / (hi - lo) with lo/hi the exact range of each stain over all
  8-bit colours (``stain_range``); dense stain -> high value, as the paper's OD.
- ``"minmax"``: the authors' per-image, per-channel min-max followed by inversion
  (1 - normalised; dense stain -> low value), guarded against constant channels.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

# skimage.color.colorconv: rgb_from_hed rows = H, E, DAB OD vectors.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
# Authors' stain_deconv.py: H, E and R = H x E.
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])
RGB_FROM_HER = np.stack([_H, _E, np.cross(_H, _E)])

MATRICES = ("hed", "authors")
SCALINGS = ("fixed", "minmax")
_LOG_ADJUST = float(np.log(1e-6))  # OD normalisation of skimage and the authors


def conv_matrix(matrix: str) -> np.ndarray:
    """D = inverse of the stain matrix (row = RGB input channel, column = stain), float64."""
    if matrix == "hed":
        return np.linalg.inv(RGB_FROM_HED)
    if matrix == "authors":
        return np.linalg.inv(RGB_FROM_HER)
    raise ValueError(f"unknown stain matrix {matrix!r}; expected one of {MATRICES}")


def deconvolve(rgb: jax.Array, matrix: str = "hed") -> jax.Array:
    """(..., 3) RGB (uint8 or float, values 0..255) -> (..., 3) float32 stains (H, E, DAB|R).

    ``matrix="hed"`` equals ``skimage.color.rgb2hed(rgb / 255)`` (Eqs. 13-15); ``"authors"`` is
    the authors' H/E/HxE deconvolution on 0..255 values (docs/preprocessing.md).
    """
    d = jnp.asarray(conv_matrix(matrix), jnp.float32)
    x = jnp.asarray(rgb).astype(jnp.float32)
    if matrix == "hed":
        x = x / 255.0                       # skimage works on [0, 1]
    od = jnp.log(jnp.maximum(x, 1e-6)) / _LOG_ADJUST   # Eq. 13 (DIPlib-normalised)
    stains = od @ d                          # Eq. 14-15: S = OD . inv(M)
    if matrix == "hed":
        stains = jnp.maximum(stains, 0.0)    # skimage clips negative stain amounts
    return stains


@functools.cache
def stain_range(matrix: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact (lo, hi) per stain of ``deconvolve`` over all 8-bit RGB colours, in float64.

    Per channel the OD takes values in {OD(0)} U [OD(255), OD(1)] (value 0 is clamped to 1e-6),
    and a stain is linear in the three ODs (then clipped at 0 for "hed", a monotone map), so its
    extremes over the 256^3 colours are among the 27 combinations of {0, 1, 255}.
    """
    d = conv_matrix(matrix)
    scale = 255.0 if matrix == "hed" else 1.0
    values = np.array([0.0, 1.0, 255.0]) / scale
    rgb = np.array(list(itertools.product(values, repeat=3)))
    stains = (np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)) @ d
    if matrix == "hed":
        stains = np.maximum(stains, 0.0)
    return tuple(stains.min(0).tolist()), tuple(stains.max(0).tolist())


def _minmax_invert(stains: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Authors' per-image per-channel min-max then 1 - x, over the pixels where mask is True.

    (H, W, 3) -> (H, W, 3). A channel with max == min (no contrast) maps to 1 instead of NaN.
    """
    if mask is None:
        lo = stains.min(axis=(0, 1))
        hi = stains.max(axis=(0, 1))
    else:
        m = mask[..., None]
        lo = jnp.where(m, stains, jnp.inf).min(axis=(0, 1))
        hi = jnp.where(m, stains, -jnp.inf).max(axis=(0, 1))
        # An empty mask leaves inf bounds; fall back to the unmasked range.
        lo = jnp.where(jnp.isfinite(lo), lo, stains.min(axis=(0, 1)))
        hi = jnp.where(jnp.isfinite(hi), hi, stains.max(axis=(0, 1)))
    span = hi - lo
    safe = jnp.where(span > 1e-12, span, 1.0)
    norm = jnp.where(span > 1e-12, (stains - lo) / safe, 0.0)
    return jnp.clip(1.0 - norm, 0.0, 1.0)


def stain_channels(rgb: jax.Array, matrix: str = "hed", scaling: str = "fixed",
                   mask: jax.Array | None = None) -> jax.Array:
    """(..., H, W, 3) RGB 0..255 -> (..., H, W, 3) float32 stain channels in [0, 1].

    ``mask`` (..., H, W) bool marks the valid image content (after a geometric augmentation the
    rest is fill): the min-max statistics use only those pixels and the channels are 0 outside,
    as the authors' warped stain images (filled with 0).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown stain scaling {scaling!r}; expected one of {SCALINGS}")
    stains = deconvolve(rgb, matrix)
    if scaling == "fixed":
        lo, hi = (jnp.asarray(v, jnp.float32) for v in stain_range(matrix))
        out = jnp.clip((stains - lo) / (hi - lo), 0.0, 1.0)
    else:
        lead = stains.shape[:-3]
        flat = stains.reshape((-1,) + stains.shape[-3:])
        if mask is None:
            out = jax.vmap(lambda s: _minmax_invert(s, None))(flat)
        else:
            out = jax.vmap(_minmax_invert)(flat, mask.reshape((-1,) + mask.shape[-2:]))
        out = out.reshape(lead + out.shape[1:])
    if mask is not None:
        out = out * mask[..., None].astype(out.dtype)
    return out.astype(jnp.float32)
