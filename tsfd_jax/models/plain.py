"""A plain convolutional encoder with TSFD-Net's pyramid: the small-data alternative to EfficientNet.

Not the paper (``model.backbone = "plain"``, docs/learning.md §22). TSFD-Net's EfficientNet-B4
starts from ImageNet weights in the paper; trained from scratch at CPU scale it learns far less
per step than the plain encoder of the reference UNet. This encoder is that UNet's: per level two
3x3 conv -> BatchNorm -> ReLU blocks (``unet.ConvBlock``), max-pooling down. It returns the
same taps at the same strides as the EfficientNet, so gating, BiFPNs, decoders and skips are
unchanged:

    stem (stride 2: 3x3 conv stride 2 + BN + ReLU, then a block)  features[0]
      with ``pool_stem``: the 3x3 conv + BN + ReLU at the input resolution, then a 2x2
      max-pool (as the UNet's first level pools its features, not its input's pixels)
    s4, s8 (P2, P3)                                                features[1], features[2]
    s16a, s16b (P4, P5)                                            features[3] each
    s32a, s32b (P6, P7 = "top")                                    features[4] each

Input (B, H, W, C) float (divided by 255 by the caller); output {tap: (B, H/s, W/s, C_tap)}.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from tsfd_jax.models.layers import Layers, max_pool_2x2
from tsfd_jax.models.unet import ConvBlock

# (name, stride relative to the previous level (1 or 2), index into the widths) after the stem.
LEVELS = (("s4", 2, 1), ("s8", 2, 2), ("s16a", 2, 3), ("s16b", 1, 3), ("s32a", 2, 4),
          ("s32b", 1, 4))
TAPS = tuple(name for name, _, _ in LEVELS)           # TSFD-Net's P2..P7
FEATURES = (16, 32, 64, 64, 64)                        # stem, s4, s8, s16, s32


class PlainEncoder(nn.Module):
    """``__call__(x, train) -> {tap: features}`` for taps among "stem" and ``TAPS``."""

    features: tuple[int, ...] = FEATURES
    taps: tuple[str, ...] = TAPS
    layers: Layers = Layers()
    pool_stem: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        unknown = [t for t in self.taps if t not in ("stem",) + TAPS]
        if unknown:
            raise ValueError(f"unknown plain-encoder taps {unknown}; one of {('stem',) + TAPS}")
        stride = 1 if self.pool_stem else 2
        x = self.layers.conv(self.features[0], 3, strides=stride, use_bias=False,
                             name="stem_conv")(x)
        x = nn.relu(self.layers.norm(train, "stem_bn")(x))
        if self.pool_stem:
            x = max_pool_2x2(x)
        feats = {"stem": ConvBlock(self.features[0], self.layers, name="stem")(x, train)}
        x = feats["stem"]
        for name, stride, width in LEVELS:
            if stride == 2:
                x = max_pool_2x2(x)
            feats[name] = x = ConvBlock(self.features[width], self.layers, name=name)(x, train)
        return {t: feats[t] for t in self.taps}
