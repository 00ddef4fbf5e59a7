"""Gating blocks, feature reweighing (FR), fusion nodes and the BiFPN of TSFD-Net (PAPER §3.2).

Names from the paper: CWFF = channel-wise feature fusion (fusion with FR blocks), CFF = plain
feature fusion (the Table 4 ablation without FR), FR = feature reweighing, FF = feature fusion
node ("Conv" in PAPER Eqs. 1-4), C_GB = channels after the gating block.

As built (docs/model.md-§1.6, the authors' ``bifpn.py``):
- ``GatingBlock``: 3x3 conv to C_GB (bias) -> BN -> swish -> channel dropout, one per level.
- ``FeatureReweighing``: depthwise 3x3 (bias) -> BN -> swish -> squeeze-excite (GAP, Dense C/8
  swish, Dense C sigmoid, He-normal kernels) -> channel-wise product with the post-swish map.
  One per input of every node; the paper describes only the weight vector V (§9.4 item 2).
- ``FusionNode``: sum of the (reweighed) inputs -> depthwise 3x3 (bias) -> BN -> swish ->
  channel dropout (inside BiFPNs only). No 1x1 conv: channels mix only in the FR dense layers
  (``model.node_pointwise`` adds EfficientDet's pointwise conv after the depthwise one,
  ``model.node_conv = "dense"`` replaces the depthwise conv by a dense 3x3 one; neither is the
  paper, docs/model.md item 11).
- ``BiFPN``: the top-down / bottom-up wiring of §1.6 (10 nodes, 24 FR blocks on 6 levels).

Resizing happens only where two maps differ in size, decided from the actual shapes (P4/P5 and
P6/P7 share a stride), with the exact x2 operations of ``ops/resize.py``. ``jax.image.resize``
would lower bilinear resizing to dense matmuls (BENCHMARKS.md), so it is never used here.

Initialisers follow Keras: glorot-uniform kernels (also for the depthwise kernels: glorot only
depends on fan_in + fan_out, which is the same for Keras' (3, 3, C, 1) and this (3, 3, 1, C)
layout), zero biases, He-normal for the FR dense layers. BN: momentum 0.99, epsilon 1e-3.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
import flax.linen as nn
import jax
import jax.numpy as jnp

from tsfd_jax.models.layers import Layers
from tsfd_jax.ops.resize import downsample2x, upsample2x

glorot_uniform = nn.initializers.glorot_uniform()
he_normal = nn.initializers.he_normal()  # Keras he_normal: truncated normal, scale 2, fan_in


def channel_dropout(rate: float, train: bool) -> nn.Dropout:
    """Keras SpatialDropout2D: drops whole channels of (B, H, W, C), rng stream 'dropout'."""
    return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)


def resize_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, *size, C) by exact x2 steps (TF bilinear, half-pixel centres).

    Identity when the sizes agree (no resize between P4/P5 or P6/P7).
    """
    h0, w0 = h, w = x.shape[1:3]
    th, tw = size
    while h < th and w < tw:
        x = upsample2x(x)
        h, w = x.shape[1:3]
    while h > th and w > tw and h % 2 == 0 and w % 2 == 0:
        x = downsample2x(x)
        h, w = x.shape[1:3]
    if (h, w) != (th, tw):
        raise ValueError(
            f"cannot resize a {h0}x{w0} feature map to {th}x{tw} by factors of 2; the input "
            f"height and width must be multiples of 32 (the backbone's largest stride)")
    return x


class GatingBlock(nn.Module):
    """3x3 conv to C_GB -> BN -> swish -> channel dropout (docs/model.md).

    (B, H, W, C) -> (B, H, W, C_GB).
    """

    features: int = 160
    dropout_rate: float = 0.2
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = self.layers.conv(self.features, 3, kernel_init=glorot_uniform, name="conv")(x)
        x = nn.silu(self.layers.norm(train, "bn")(x))
        if self.dropout_rate > 0:
            x = channel_dropout(self.dropout_rate, train)(x)
        return x


class FeatureReweighing(nn.Module):
    """FR block (docs/model.md): the per-channel weight vector V of PAPER Eqs. 1-4.

    (B, H, W, C) -> (B, H, W, C). Parameters at C=160: 1600 + 640 (BN) + 3220 + 3360 = 8,820.
    """

    se_ratio: int = 8
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        x = self.layers.depthwise(3, kernel_init=glorot_uniform, name="dwconv")(x)
        x = nn.silu(self.layers.norm(train, "bn")(x))
        # Squeeze-excite; the spatial mean is taken in float32.
        v = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        v = nn.silu(self.layers.dense(max(1, c // self.se_ratio), kernel_init=he_normal,
                                      name="reduce")(v))
        v = nn.sigmoid(self.layers.dense(c, kernel_init=he_normal, name="expand")(v))
        return x * v[:, None, None, :].astype(x.dtype)


class FusionNode(nn.Module):
    """FF node: Conv(sum_k V_k * x_k) of PAPER Eqs. 1-4 (docs/model.md).

    Inputs: a list of (B, H, W, C) maps already resized to a common size. Each input gets its own
    FR block (identity for CFF). Then depthwise 3x3 (bias) [-> 1x1 conv when ``pointwise``]
    -> BN -> swish -> channel dropout; with ``conv = "dense"`` a dense 3x3 conv (no bias,
    ``conv``) in place of the depthwise one.
    """

    reweigh: bool = True
    se_ratio: int = 8
    dropout_rate: float = 0.0
    layers: Layers = Layers()
    pointwise: bool = False
    conv: str = "depthwise"

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array], train: bool) -> jax.Array:
        if self.reweigh:
            inputs = [FeatureReweighing(self.se_ratio, self.layers, name=f"fr_{k}")(x, train)
                      for k, x in enumerate(inputs)]
        x = functools.reduce(jnp.add, [jnp.asarray(v, self.layers.dtype) for v in inputs])
        if self.conv == "dense":
            x = self.layers.conv(x.shape[-1], 3, use_bias=False, kernel_init=glorot_uniform,
                                 name="conv")(x)
        else:
            x = self.layers.depthwise(3, kernel_init=glorot_uniform, name="dwconv")(x)
        if self.pointwise:
            x = self.layers.conv(x.shape[-1], 1, use_bias=False, kernel_init=glorot_uniform,
                                 name="pwconv")(x)
        x = nn.silu(self.layers.norm(train, "bn")(x))
        if self.dropout_rate > 0:
            x = channel_dropout(self.dropout_rate, train)(x)
        return x


def level_name(i: int) -> str:
    """Pyramid index 0..5 -> 'p2'..'p7'."""
    return f"p{i + 2}"


class BiFPN(nn.Module):
    """One BiFPN (docs/model.md); inputs and outputs P2..P7, each (B, H_l, W_l, C_GB).

    Top-down:  P6td = FF(P6, P7); Pltd = FF(Pl, up(P(l+1)td)) for l = 5..3;
               P2out = FF(P2, up(P3td)).
    Bottom-up: Plout = FF(Pl, Pltd, down(P(l-1)out)) for l = 3..6; P7out = FF(P7, P6out).
    ``up``/``down`` only where sizes differ. 10 nodes and 24 FR blocks for 6 levels.
    """

    reweigh: bool = True
    se_ratio: int = 8
    node_dropout: float = 0.2
    layers: Layers = Layers()
    node_pointwise: bool = False
    node_conv: str = "depthwise"

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool) -> list[jax.Array]:
        p = list(feats)
        n = len(p)
        if n < 2:
            raise ValueError(f"a BiFPN needs at least 2 pyramid levels, got {n}")

        def node(name: str, xs: list[jax.Array], size: tuple[int, int]) -> jax.Array:
            xs = [resize_to(x, size) for x in xs]
            return FusionNode(self.reweigh, self.se_ratio, self.node_dropout, self.layers,
                              self.node_pointwise, self.node_conv, name=name)(xs, train)

        size = [x.shape[1:3] for x in p]
        # Top-down path; the top level itself (P7) has no top-down node.
        td: list[jax.Array] = [None] * n  # type: ignore[list-item]
        td[n - 1] = p[n - 1]
        for i in range(n - 2, -1, -1):
            td[i] = node(f"td_{level_name(i)}", [p[i], td[i + 1]], size[i])
        # Bottom-up path; the lowest level (P2) is final after the top-down node.
        out = [td[0]] + [None] * (n - 1)  # type: ignore[list-item]
        for i in range(1, n - 1):
            out[i] = node(f"out_{level_name(i)}", [p[i], td[i], out[i - 1]], size[i])
        out[n - 1] = node(f"out_{level_name(n - 1)}", [p[n - 1], out[n - 2]], size[n - 1])
        return out
