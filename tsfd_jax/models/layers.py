"""Shared layers: a depthwise convolution that is fast on every backend.

Depthwise convs are everywhere in TSFD-Net (every MBConv, FR block and fusion node).
``DepthwiseConv2D`` keeps exactly the parameters of ``nn.Conv(features=C, feature_group_count=C)``
(``kernel`` (kh, kw, 1, C), ``bias`` (C,)) and computes either with XLA's grouped convolution
('conv', the default) or as k*k shifted multiply-adds ('shift'). On XLA:CPU the shifted form runs
the forward pass about 3x faster, but its gradient compiles about 5x slower (measured: 231 s vs
51 s for a tiny TSFD-Net train step), so training uses the grouped conv everywhere.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def default_depthwise_impl() -> str:
    """XLA's grouped 'conv' (see the module docstring for why not 'shift' on CPU)."""
    return "conv"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Flax 'SAME' padding (the extra pixel goes after), = Keras' correct_pad on even sizes."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def depthwise_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise 'SAME' convolution of (B, H, W, C) by (kh, kw, 1, C) as shifted multiply-adds."""
    kh, kw = kernel.shape[:2]
    _, h, w, _ = x.shape
    ph, pw = same_padding(h, kh, stride), same_padding(w, kw, stride)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    oh, ow = -(-h // stride), -(-w // stride)
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = jax.lax.slice(
                xp, (0, i, j, 0),
                (xp.shape[0], i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, xp.shape[3]),
                (1, stride, stride, 1))
            term = patch * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class DepthwiseConv2D(nn.Module):
    """Depthwise k x k convolution, 'SAME' padding, parameters as ``nn.Conv`` with groups = C."""

    kernel_size: int = 3
    strides: int = 1
    use_bias: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros
    dtype: Any = None
    impl: str = "auto"  # auto | shift | conv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, c), jnp.float32)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        kernel = kernel.astype(dtype)
        impl = default_depthwise_impl() if self.impl == "auto" else self.impl
        if impl == "shift":
            y = depthwise_shift(x, kernel, self.strides)
        elif impl == "conv":
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.strides, self.strides), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        else:
            raise ValueError(f"unknown depthwise implementation {impl!r}")
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (c,), jnp.float32).astype(dtype)
        return y
