"""A plain UNet (Ronneberger et al., 2015) with TSFD-Net's two heads: the reference model.

It shares everything of the pipeline but the network (data, augmentation, targets, losses, loop,
post-processing, evaluation), so that a difference in quality between it and TSFD-Net is the
network's (docs/learning.md). Per level two 3x3 conv -> BatchNorm -> ReLU blocks; max-pooling
down, 2x2 transposed convolutions up, skip connections concatenated; 1x1 heads at the input
resolution:

    x (B, S, S, n_ch) -> seg_logits (B, S, S, L), boundary_logits (B, S, S, 1)

Outputs are float32 whatever the compute dtype, as TSFDNet's; no tissue head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsfd_jax.models.layers import Layers, max_pool_2x2


class ConvBlock(nn.Module):
    features: int
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for k in range(2):
            x = self.layers.conv(self.features, 3, use_bias=False, name=f"conv{k}")(x)
            x = nn.relu(self.layers.norm(train, name=f"bn{k}")(x))
        return x


class UNet(nn.Module):
    """``__call__(x (B, S, S, n_ch), train) -> dict`` of logits; S divisible by 2^(levels-1)."""

    features: tuple[int, ...] = (16, 32, 64)
    num_labels: int = 6
    boundary_channels: int = 1        # 2 for HoVer-Net's maps (targets.boundary_kind="hv")
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        x = x.astype(self.layers.dtype)
        skips = []
        for i, f in enumerate(self.features):
            if i:
                x = max_pool_2x2(x)
            x = ConvBlock(f, self.layers, name=f"down{i}")(x, train)
            skips.append(x)
        for i in range(len(self.features) - 2, -1, -1):
            f = self.features[i]
            x = self.layers.conv_transpose(f, 2, strides=2, name=f"up{i}")(x)
            x = jnp.concatenate([x, skips[i]], axis=-1)
            x = ConvBlock(f, self.layers, name=f"dec{i}")(x, train)
        out = {"seg_logits": self.layers.conv(self.num_labels, 1, name="seg_head")(x),
               "boundary_logits": self.layers.conv(self.boundary_channels, 1,
                                                    name="boundary_head")(x)}
        return {k: v.astype(jnp.float32) for k, v in out.items()}
