"""EfficientNet B0..B7 backbone with Keras' exact topology, returning a pyramid of tapped features.

TSFD-Net's encoder (the paper's "B4M") is Keras' ``EfficientNetB4(include_top=False)`` with a
6-channel stem (docs/model.md). This module rebuilds that network layer for layer so
that Keras weights (ImageNet, or a Keras-trained TSFD backbone) load by name
(``models/keras_weights.py``):

- every submodule is named like its Keras layer (``stem_conv``, ``stem_bn``, ``block1a_dwconv``,
  ``block2a_expand_conv``, ``block4b_se_reduce``, ``top_bn``, ...), so the parameters are a flat
  dict keyed by Keras layer names;
- compound scaling (width, depth) with Keras' ``round_filters`` / ``round_repeats``;
- MBConv = [expand 1x1 conv + BN + swish] -> depthwise kxk + BN + swish -> squeeze-excite
  (ratio 0.25 of the block's input channels) -> project 1x1 conv + BN -> [stochastic depth +
  residual add when stride 1 and channels in == out];
- stride-2 convs use 'SAME' padding, which equals Keras' explicit ``correct_pad`` zero padding
  followed by a 'valid' conv (docs/FIDELITY.md; tests/test_efficientnet.py checks it);
- BatchNorm momentum 0.99, epsilon 1e-3 (Keras defaults); kernels initialised with Keras'
  ``VarianceScaling(2.0, 'fan_out', 'truncated_normal')``.

``fused_stages = N`` (not the paper; 0 = Keras' EfficientNet) builds the blocks of stages 1..N as
EfficientNetV2's Fused-MBConv (Tan & Le, ICML 2021): the expand 1x1 and the depthwise kxk become
one full kxk conv (+ BN + swish), without squeeze-excite, then the same project 1x1 + BN (a
block with expand ratio 1 is the kxk conv + BN + swish alone). Full convolutions learn faster
than depthwise ones where the maps are large and narrow (docs/learning.md §22); such a
backbone no longer loads Keras' EfficientNet weights.

Not included: Keras' leading ``Rescaling(1/255)`` and ``Normalization`` layers. The Normalization
layer is never adapted in TSFD (mean 0, variance 1 = identity), so the network simply sees x/255:
callers divide by 255 themselves. Keras counts that layer's 2*C+1 statistics as parameters (13 for
6 channels), this module has none.

Taps (docs/model.md): a tap is a block name (``"block2d"``) meaning that block's output (after
the residual add when there is one), ``"stem"`` (stem activation) or ``"top"`` (top activation).
TSFD-Net taps the last block of stages 2..6 and the top; ``stage_end_taps`` gives those names for
any scaling (tiny test configs have fewer blocks per stage).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsfd_jax.models.layers import Layers


class Variant(NamedTuple):
    """Compound scaling of one EfficientNet variant (Keras applications)."""

    width: float
    depth: float
    resolution: int
    dropout: float  # classifier dropout of the Keras model with a top; unused by the backbone


VARIANTS: dict[str, Variant] = {
    "b0": Variant(1.0, 1.0, 224, 0.2),
    "b1": Variant(1.0, 1.1, 240, 0.2),
    "b2": Variant(1.1, 1.2, 260, 0.3),
    "b3": Variant(1.2, 1.4, 300, 0.3),
    "b4": Variant(1.4, 1.8, 380, 0.4),
    "b5": Variant(1.6, 2.2, 456, 0.4),
    "b6": Variant(1.8, 2.6, 528, 0.5),
    "b7": Variant(2.0, 3.1, 600, 0.5),
}

# Base (B0) stages: (kernel, repeats, filters_in, filters_out, expand_ratio, stride); SE ratio 0.25.
BASE_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
STEM_FILTERS = 32
TOP_FILTERS = 1280
SE_RATIO = 0.25

# TSFD-Net's pyramid P2..P7 for B4 (docs/model.md).
DEFAULT_TAPS: tuple[str, ...] = ("block2d", "block3d", "block4f", "block5f", "block6h", "top")

# Keras CONV_KERNEL_INITIALIZER. Depthwise kernels are stored (kh, kw, 1, C) here but
# (kh, kw, C, 1) in Keras, so their fan axes are swapped to give Keras' fan_out = kh * kw.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
depthwise_kernel_init = nn.initializers.variance_scaling(
    2.0, "fan_out", "truncated_normal", in_axis=-1, out_axis=-2)


def round_filters(filters: int, width_mult: float, divisor: int = 8) -> int:
    """Keras ``round_filters``: scale, round to a multiple of 8, never below 90 % of the value."""
    filters = filters * width_mult
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth_mult: float) -> int:
    """Keras ``round_repeats``: ceil(depth_mult * repeats)."""
    return int(math.ceil(depth_mult * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block, named as in Keras (``block{stage}{letter}``)."""

    name: str
    stage: int          # 1..7
    kernel: int
    stride: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    drop_rate: float    # stochastic depth rate = drop_connect_rate * block_index / num_blocks

    @property
    def expanded(self) -> int:
        return self.filters_in * self.expand_ratio

    @property
    def se_filters(self) -> int:
        return max(1, int(self.filters_in * SE_RATIO))

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def block_specs(width_mult: float, depth_mult: float,
                drop_connect_rate: float = 0.2) -> tuple[BlockSpec, ...]:
    """All MBConv blocks of a scaled EfficientNet, in order (Keras ``EfficientNet`` loop)."""
    reps = [round_repeats(r, depth_mult) for _, r, *_ in BASE_BLOCKS]
    total = float(sum(reps))
    specs, b = [], 0
    for stage, ((k, _, f_in, f_out, e, s), n) in enumerate(zip(BASE_BLOCKS, reps), start=1):
        f_in, f_out = round_filters(f_in, width_mult), round_filters(f_out, width_mult)
        for j in range(n):
            # The first block of a stage changes stride and width; the others keep them.
            specs.append(BlockSpec(
                name=f"block{stage}{chr(97 + j)}", stage=stage, kernel=k,
                stride=s if j == 0 else 1, filters_in=f_in if j == 0 else f_out,
                filters_out=f_out, expand_ratio=e, drop_rate=drop_connect_rate * b / total))
            b += 1
    return tuple(specs)


def stage_end_taps(width_mult: float, depth_mult: float) -> tuple[str, ...]:
    """Names of the last block of stages 2..6, then "top": TSFD-Net's P2..P7 for any scaling.

    Width does not change block names; it is accepted so a (width, depth) pair passes through.
    B4 (1.4, 1.8) gives ``DEFAULT_TAPS``.
    """
    del width_mult
    last = {s.stage: s.name for s in block_specs(1.0, depth_mult)}
    return tuple(last[stage] for stage in (2, 3, 4, 5, 6)) + ("top",)


def efficientnet_config(variant: str) -> tuple[float, float]:
    """(width_mult, depth_mult) of "b0".."b7"."""
    key = variant.lower()
    if key not in VARIANTS:
        raise ValueError(f"unknown EfficientNet variant {variant!r}; one of {sorted(VARIANTS)}")
    v = VARIANTS[key]
    return v.width, v.depth


class EfficientNet(nn.Module):
    """EfficientNet without its classifier; returns the requested taps.

    Input (B, H, W, C_in) float, already divided by 255 (any number of channels; the stem conv
    adapts). Output: {tap: (B, H/s, W/s, C_tap)} in the compute dtype. Parameters are float32.
    ``train=True`` uses batch statistics (mutable "batch_stats") and stochastic depth, which needs
    a "dropout" rng.
    """

    width_mult: float
    depth_mult: float
    drop_connect_rate: float = 0.2
    taps: tuple[str, ...] = DEFAULT_TAPS
    layers: Layers = Layers()         # dtype, BatchNorm (Keras: momentum 0.99, eps 1e-3), depthwise
    fused_stages: int = 0             # stages 1..N as Fused-MBConv; 0 = the paper (module doc)

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> "EfficientNet":
        """``EfficientNet.from_variant("b4", layers=...)``; taps default to ``stage_end_taps``."""
        width, depth = efficientnet_config(variant)
        fields = {"width_mult": width, "depth_mult": depth, **overrides}
        fields.setdefault("taps", stage_end_taps(fields["width_mult"], fields["depth_mult"]))
        return cls(**fields)

    def _conv(self, features: int, kernel: int, name: str, stride: int = 1,
              use_bias: bool = False) -> nn.Conv:
        return self.layers.conv(features, kernel, strides=stride, use_bias=use_bias,
                                kernel_init=conv_kernel_init, name=name)

    def _fused_mbconv(self, x: jax.Array, spec: BlockSpec, train: bool) -> jax.Array:
        """EfficientNetV2's Fused-MBConv: one full kxk conv in place of expand + depthwise."""
        n = spec.name + "_"
        norm = self.layers.norm
        expand = spec.expand_ratio != 1
        x = self._conv(spec.expanded if expand else spec.filters_out, spec.kernel,
                       n + "fused_conv", stride=spec.stride)(x)
        x = nn.silu(norm(train, n + "fused_bn")(x))
        if expand:
            x = self._conv(spec.filters_out, 1, n + "project_conv")(x)
            x = norm(train, n + "project_bn")(x)
        return x

    def _residual(self, x: jax.Array, inputs: jax.Array, spec: BlockSpec,
                  train: bool) -> jax.Array:
        if not spec.residual:
            return x
        if spec.drop_rate > 0:
            # Stochastic depth: drop the whole residual branch per example (noise (B,1,1,1)).
            x = nn.Dropout(spec.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train,
                           name=spec.name + "_drop")(x)
        return x + inputs

    def _mbconv(self, x: jax.Array, spec: BlockSpec, train: bool) -> jax.Array:
        """Keras ``efficientnet.block`` (inverted residual with squeeze-excite)."""
        n = spec.name + "_"
        norm = self.layers.norm
        if spec.expand_ratio != 1:
            x = self._conv(spec.expanded, 1, n + "expand_conv")(x)
            x = nn.silu(norm(train, n + "expand_bn")(x))
        x = self.layers.depthwise(spec.kernel, strides=spec.stride, use_bias=False,
                                  kernel_init=depthwise_kernel_init, name=n + "dwconv")(x)
        x = nn.silu(norm(train, n + "bn")(x))
        # Squeeze-excite; the spatial mean is taken in float32.
        se = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        se = nn.silu(self._conv(spec.se_filters, 1, n + "se_reduce", use_bias=True)(se))
        se = nn.sigmoid(self._conv(spec.expanded, 1, n + "se_expand", use_bias=True)(se))
        x = x * se
        x = self._conv(spec.filters_out, 1, n + "project_conv")(x)
        return norm(train, n + "project_bn")(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        specs = block_specs(self.width_mult, self.depth_mult, self.drop_connect_rate)
        known = {"stem", "top", *(s.name for s in specs)}
        unknown = [t for t in self.taps if t not in known]
        if unknown:
            raise ValueError(
                f"unknown EfficientNet taps {unknown}; blocks are {[s.name for s in specs]} "
                f"(plus 'stem', 'top'); stage_end_taps(width, depth) gives TSFD's pyramid")
        feats: dict[str, jax.Array] = {}

        x = self._conv(round_filters(STEM_FILTERS, self.width_mult), 3, "stem_conv", stride=2)(x)
        feats["stem"] = x = nn.silu(self.layers.norm(train, "stem_bn")(x))
        for spec in specs:
            block = self._fused_mbconv if spec.stage <= self.fused_stages else self._mbconv
            feats[spec.name] = x = self._residual(block(x, spec, train), x, spec, train)
        x = self._conv(round_filters(TOP_FILTERS, self.width_mult), 1, "top_conv")(x)
        feats["top"] = nn.silu(self.layers.norm(train, "top_bn")(x))
        return {t: feats[t] for t in self.taps}
