"""Interlinked decoders and output blocks of TSFD-Net (PAPER §3.3, Eqs. 3-4).

The decoders read the outputs P2..P7 of the last BiFPN (docs/model.md, the authors'
``OP_BiFPN``). Every node is a ``FusionNode`` (FR per input, sum, depthwise 3x3, BN, swish)
without dropout.

Segmentation branch, top down (Eq. 3):
    S6 = FF(P6, P7);  Sl = FF(Pl, up(S(l+1)) [, up(P(l+1))])   for l = 5..2
The bracketed third term V3 * B(P_bif3_(l+1)) is in the paper's Eq. 3 but not in the authors'
code; ``seg_third_term`` switches it (default on, the paper). S6 gets no extra term: its second
input P7 already is the upper-level BiFPN map (there is no S7), exactly as in the boundary
branch's top node. So the paper's form adds 4 FR blocks (S5..S2) to the 24 of the code.

Boundary branch, each node fusing the BiFPN map one level above, the previous boundary node and
the segmentation node of the same level (Eq. 4, which the code matches):
    I6 = FF(P7, S6);  Il = FF(up(P(l+1)), up(I(l+1)), Sl)   for l = 5..2

Output block (docs/model.md, the code's ``Upsampling_block``; the paper's "3x3 conv + 1x1
conv" refinement differs, §9.4 item 5): [bilinear x2 -> conv 3x3] + [transposed conv 3x3,
stride 2], swish, depthwise 3x3; no activation, so the heads return logits at half the input
resolution (softmax / sigmoid live in the losses and post-processing).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsfd_jax.models.bifpn import FusionNode, glorot_uniform, level_name, resize_to
from tsfd_jax.models.layers import Layers
from tsfd_jax.ops.resize import upsample2x


class InterlinkedDecoders(nn.Module):
    """P2..P7 (B, H_l, W_l, C) -> (S2, I2), both (B, H_2, W_2, C) (stride 4).

    Node names: ``seg_p6``..``seg_p2`` and ``bdr_p6``..``bdr_p2``; FR blocks ``fr_k`` inside a
    node in the order of the formulas above.
    """

    reweigh: bool = True
    se_ratio: int = 8
    seg_third_term: bool = True
    layers: Layers = Layers()
    node_pointwise: bool = False
    node_conv: str = "depthwise"

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool) -> tuple[jax.Array, jax.Array]:
        p = list(feats)
        n = len(p)
        if n < 2:
            raise ValueError(f"the decoders need at least 2 pyramid levels, got {n}")

        def node(name: str, xs: list[jax.Array], size: tuple[int, int]) -> jax.Array:
            xs = [resize_to(x, size) for x in xs]
            # No dropout in decoder nodes (docs/model.md).
            return FusionNode(self.reweigh, self.se_ratio, 0.0, self.layers,
                              self.node_pointwise, self.node_conv, name=name)(xs, train)

        size = [x.shape[1:3] for x in p]
        # P(l+1) resized once to level l's size for both branches: one backward pass of the
        # resize, its two cotangents summed first.
        p_up = [resize_to(p[i + 1], size[i]) for i in range(n - 1)]
        # Segmentation branch (Eq. 3); the top level's "previous node" is P7 itself.
        seg: list[jax.Array] = [None] * n  # type: ignore[list-item]
        seg[n - 1] = p[n - 1]
        for i in range(n - 2, -1, -1):
            xs = [p[i], seg[i + 1]]
            if self.seg_third_term and i < n - 2:
                xs.append(p_up[i])  # Eq. 3 third term: V3 * B(P_bif3_(l+1))
            seg[i] = node(f"seg_{level_name(i)}", xs, size[i])
        # Boundary branch (Eq. 4).
        bdr = node(f"bdr_{level_name(n - 2)}", [p_up[n - 2], seg[n - 2]], size[n - 2])
        for i in range(n - 3, -1, -1):
            bdr = node(f"bdr_{level_name(i)}", [p_up[i], bdr, seg[i]], size[i])
        return seg[0], bdr


class UpsamplingBlock(nn.Module):
    """Output block: (B, H, W, C_in) -> (B, 2H, 2W, features) logits (docs/model.md).

    Parameters at C_in=160: features=6 -> 8646 + 8646 + 60; features=1 -> 1441 + 1441 + 10.
    The transposed conv with 'SAME' padding places its taps as Keras' Conv2DTranspose does
    (flax kernel = Keras kernel flipped in space with in/out swapped).
    """

    features: int
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: jax.Array, x_up: jax.Array | None = None) -> jax.Array:
        """``x_up``: ``upsample2x(x)`` where the caller has it already (shared with a skip)."""
        a = self.layers.conv(self.features, 3, kernel_init=glorot_uniform,
                             name="conv")(upsample2x(x) if x_up is None else x_up)
        b = self.layers.conv_transpose(self.features, 3, strides=2, kernel_init=glorot_uniform,
                                       name="conv_transpose")(x)
        y = nn.silu(a + b)
        return self.layers.depthwise(3, kernel_init=glorot_uniform, name="dwconv")(y)


class SkipRefine(nn.Module):
    """Not in the paper (``model.stem_skip``, ``model.input_skip``, docs/model.md): a correction
    to an output block's logits from the decoder map and finer features (the backbone's stem at
    stride 2, or the input's own at stride 1). (B, H, W, C) + (B, kH, kW, C_f) -> (B, kH, kW,
    features):
    concat -> [conv 3x3 (``channels``) -> BN -> swish] x ``depth`` -> conv 1x1. The last conv
    starts at zero (``zero_init``), so an untrained refinement leaves the paper's head
    unchanged; without a head to refine (``model.output_blocks=False``) it starts random."""

    features: int
    channels: int
    layers: Layers = Layers()
    depth: int = 1
    zero_init: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, stem: jax.Array, train: bool) -> jax.Array:
        h = jnp.concatenate([resize_to(x, stem.shape[1:3]), stem.astype(x.dtype)], axis=-1)
        h = self.layers.conv_bn_silu_stack(h, self.channels, self.depth, train,
                                           conv_name="conv", bn_name="bn")
        init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        return self.layers.conv(self.features, 1, kernel_init=init, name="out")(h)
