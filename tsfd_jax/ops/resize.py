"""Exact x2 bilinear resizes as stencils, and the input resize (docs/model.md, §3.2).

TSFD-Net resizes feature maps only by factors of 2 (BiFPN up()/down(), decoder upsampling) and
its 256 px PanNuke patches are resized to the 512 px network input. With TensorFlow's bilinear
resize (half-pixel centres, no antialias) both factors reduce to tiny fixed stencils:

- x1/2: every output pixel sits exactly between 2x2 input pixels, so bilinear = 2x2 average pool.
- x2:   output pixel centres fall at +-1/4 of an input pixel, so each output is
        0.75 * nearest input + 0.25 * next input along each axis, edges clamped.

``jax.image.resize(..., 'bilinear')`` gives the same numbers but lowers to dense matmuls (about
100x the FLOPs, BENCHMARKS.md), so it is only used for factors other than 2 in
``resize_bilinear``. All functions take (..., H, W, C) arrays and keep their dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def downsample2x(x: jax.Array) -> jax.Array:
    """(..., H, W, C) -> (..., H/2, W/2, C): 2x2 mean = bilinear half-pixel x1/2, no antialias.

    H and W must be even (the exact equivalence holds only then).
    """
    *lead, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"downsample2x needs even height and width, got {h}x{w}")
    y = x.reshape(*lead, h // 2, 2, w // 2, 2, c)
    # Sum in float32 at least, so bfloat16 maps are averaged without extra rounding.
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return (y.astype(acc).mean(axis=(-4, -2))).astype(x.dtype)


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
    """x2 bilinear (half-pixel, clamped edges) along one axis."""
    n = x.shape[axis]
    first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
    even = 0.75 * x + 0.25 * prev   # output 2i sits at input i - 1/4
    odd = 0.75 * x + 0.25 * nxt     # output 2i+1 sits at input i + 1/4
    y = jnp.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = 2 * n
    return y.reshape(shape).astype(x.dtype)


def _upsample_axis_transpose(g: jax.Array, axis: int) -> jax.Array:
    """The transpose of ``_upsample_axis``: (.., 2n, ..) -> (.., n, ..).

    Input i feeds outputs 2i and 2i+1 with 0.75, output 2i+2 (its ``prev``) and 2i-1 (its
    ``nxt``) with 0.25, and at the clamped edges output 0 (i = 0) and 2n-1 (i = n-1) once more.
    """
    n = g.shape[axis] // 2
    shape = list(g.shape)
    shape[axis:axis + 1] = [n, 2]
    pairs = g.reshape(shape)
    even = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
    odd = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
    sl = lambda a, start, stop: jax.lax.slice_in_dim(a, start, stop, axis=axis)
    from_prev = jnp.concatenate([sl(even, 0, 1), sl(odd, 0, n - 1)], axis=axis)
    from_next = jnp.concatenate([sl(even, 1, n), sl(odd, n - 1, n)], axis=axis)
    return (0.75 * (even + odd) + 0.25 * (from_prev + from_next)).astype(g.dtype)


@jax.custom_vjp
def upsample2x(x: jax.Array) -> jax.Array:
    """(..., H, W, C) -> (..., 2H, 2W, C), equal to ``jax.image.resize(x, ..., 'bilinear')``.

    Its gradient is the stencil's transpose written out (``_upsample_axis_transpose``): what
    autodiff derives from the slices, pads and stack is the same sum, but XLA:CPU fuses it into
    slower loops (BENCHMARKS.md, "The augmentation's filters and the upsampling's gradient").
    """
    nd = x.ndim
    return _upsample_axis(_upsample_axis(x, nd - 3), nd - 2)


def _upsample2x_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return upsample2x(x), None


def _upsample2x_bwd(_, g: jax.Array) -> tuple[jax.Array]:
    nd = g.ndim
    return (_upsample_axis_transpose(_upsample_axis_transpose(g, nd - 2), nd - 3),)


upsample2x.defvjp(_upsample2x_fwd, _upsample2x_bwd)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """(..., H, W, C) -> (..., size[0], size[1], C), bilinear with half-pixel centres.

    Factor 1 is the identity and factor 2 (PanNuke 256 -> 512) the exact stencil above; any other
    size uses ``jax.image.resize(antialias=False)`` (same values as OpenCV INTER_LINEAR for
    upsampling, which the authors used; it costs dense matmuls but runs once per batch).
    """
    h, w = x.shape[-3:-1]
    th, tw = int(size[0]), int(size[1])
    if (th, tw) == (h, w):
        return x
    if (th, tw) == (2 * h, 2 * w):
        return upsample2x(x)
    if 2 * th == h and 2 * tw == w:
        return downsample2x(x)
    shape = (*x.shape[:-3], th, tw, x.shape[-1])
    return jax.image.resize(x, shape, "bilinear", antialias=False).astype(x.dtype)


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """(..., H, W) -> (..., size[0], size[1]) nearest neighbour, for masks and label maps.

    The last two axes are resized; integer factors repeat pixels.
    """
    h, w = x.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    if (th, tw) == (h, w):
        return x
    if th % h == 0 and tw % w == 0:
        return jnp.repeat(jnp.repeat(x, th // h, axis=-2), tw // w, axis=-1)
    return jax.image.resize(x, (*x.shape[:-2], th, tw), "nearest").astype(x.dtype)
