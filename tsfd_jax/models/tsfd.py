"""TSFD-Net assembled from the config: FDB (with tissue classifier) or CBB (PAPER §3, Fig. 2).

FDB = feature distillation block (encoder + BiFPNs + decoders + tissue classifier, TC);
CBB = the same network without the TC head (Table 4). Data flow (docs/model.md):

    x (B, S, S, n_ch) in [0, 1]
    -> EfficientNet ("backbone"), taps P2..P7 (strides 4, 8, 16, 16, 32, 32)
    -> gating blocks ("gating"), every level to C_GB channels
    -> num_bifpn BiFPNs ("bifpn_1", ...)
    -> interlinked decoders ("decoders") -> S2, I2 (stride 4)
    -> output blocks ("seg_head", "boundary_head") -> logits at stride 2
    [not the paper: + stem skip ("seg_skip", "boundary_skip"), at stride 2;
     + input skip ("input_skip", "seg_input_skip", "boundary_input_skip", or one
       "input_skip_refine" for both heads), logits at stride 1; with
       ``output_blocks=False`` the input skip alone gives the logits, no output blocks]
    TC: GAP over the gated P7 -> Dropout(0.3) -> Dense(T) ("classifier"), logits.

Outputs (float32 whatever the compute dtype): ``seg_logits`` (B, S/2, S/2, L) with L = number
of labels including background, ``boundary_logits`` (B, S/2, S/2, 1) ((B, S, S, ...) with the
input skip; 2 channels, HoVer-Net's maps, with ``targets.boundary_kind="hv"``), and
``tissue_logits`` (B, T) for FDB only. The network takes inputs already divided by 255
(Keras' EfficientNet rescales inside; its Normalization layer is never adapted in TSFD,
docs/model.md).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from tsfd_jax.models.bifpn import BiFPN, GatingBlock, glorot_uniform, level_name, resize_to
from tsfd_jax.models.decoders import InterlinkedDecoders, SkipRefine, UpsamplingBlock
from tsfd_jax.errors import ConfigError
from tsfd_jax.models.efficientnet import (BASE_BLOCKS, DEFAULT_TAPS, VARIANTS, EfficientNet,
                                          efficientnet_config, stage_end_taps)
from tsfd_jax.models.layers import DEPTHWISE_IMPLS, Layers
from tsfd_jax.models.plain import TAPS as PLAIN_TAPS
from tsfd_jax.models.plain import PlainEncoder
from tsfd_jax.models.unet import UNet
from tsfd_jax.ops.preprocess import check_boundary_kind, input_channels
from tsfd_jax.ops.resize import upsample2x
from tsfd_jax.ops.targets import BOUNDARY_CHANNELS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PLAIN = "plain"   # model.backbone: the plain encoder (models/plain.py) instead of EfficientNet
NODE_CONVS = ("depthwise", "dense")  # model.node_conv: the paper's, or a dense 3x3 conv
ARCHS = ("tsfd", "unet")  # model.arch: the paper's network, or the reference UNet (unet.py)


def align_to_input(x: jax.Array, input_hw: tuple[int, int]) -> jax.Array:
    """Not in the paper (``model.align_taps``, docs/model.md): a backbone map of stride s moved
    onto the half-pixel grid the resizes of the BiFPN assume.

    A stride-2 convolution with 'SAME' padding of an even map centres output i on input 2i + 1
    (2i + 1/2 on that grid), so pixel k of a map of stride s sees input s k + s - 1 instead of
    s k + (s - 1) / 2: (s - 1) / (2 s) of its own pixel to the bottom right. Linear
    interpolation by that fraction (the first row and column repeated) puts it back.
    """
    for axis in (1, 2):
        s = input_hw[axis - 1] // x.shape[axis]
        f = (s - 1) / (2 * s)
        if f == 0:
            continue
        prev = jnp.concatenate([lax.slice_in_dim(x, 0, 1, axis=axis),
                                lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis)], axis=axis)
        x = (1 - f) * x + f * prev
    return x


class Gating(nn.Module):
    """One ``GatingBlock`` per pyramid level (submodules ``p2``..``p7``)."""

    features: int = 160
    dropout_rate: float = 0.2
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, feats: list[jax.Array], train: bool) -> list[jax.Array]:
        return [GatingBlock(self.features, self.dropout_rate, self.layers, name=level_name(i))(
            x, train) for i, x in enumerate(feats)]


class TSFDNet(nn.Module):
    """TSFD-Net. ``__call__(x (B, S, S, n_ch), train) -> dict`` of logits (see module doc).

    Every field is set by ``build_model`` from the config; the values here are the paper's.
    """

    width_mult: float = 1.4
    depth_mult: float = 1.8
    drop_connect_rate: float = 0.2
    fused_stages: int = 0             # EfficientNetV2's Fused-MBConv in stages 1..N; 0 = the paper
    plain_features: tuple[int, ...] = ()  # widths of a plain encoder instead of EfficientNet
    pool_stem: bool = False           # plain encoder: stem conv at stride 1, then max-pool
    taps: tuple[str, ...] = DEFAULT_TAPS
    gating_channels: int = 160
    gating_dropout: float = 0.2
    num_bifpn: int = 3
    feature_reweighing: bool = True   # CWFF; False = CFF ablation
    se_ratio: int = 8
    node_dropout: float = 0.2
    node_pointwise: bool = False      # 1x1 conv in every fusion node (EfficientDet); not the paper
    node_conv: str = "depthwise"      # the fusion nodes' 3x3 conv; "dense": not the paper
    seg_third_term: bool = True       # PAPER Eq. 3; False = authors' code
    num_labels: int = 6               # segmentation classes including background
    num_tissues: int = 19
    tissue_head: bool = True          # FDB; False = CBB
    classifier_dropout: float = 0.3
    stem_skip: int = 0                # channels of SkipRefine from the stem; 0 = the paper
    input_skip: int = 0               # channels of SkipRefine from the input; 0 = the paper
    skip_depth: int = 1               # 3x3 conv layers in each SkipRefine
    input_depth: int = 1              # 3x3 conv layers on the input before the input skip
    shared_input_skip: bool = False   # one input-skip SkipRefine for both heads
    output_blocks: bool = True        # False: the input skip alone gives the logits
    align_taps: bool = False          # re-centre the backbone's maps (``align_to_input``)
    boundary_channels: int = 1        # 2 for HoVer-Net's maps (targets.boundary_kind="hv")
    layers: Layers = Layers()         # compute dtype, BatchNorm, depthwise lowering

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        layers = self.layers
        taps = tuple(self.taps) + (("stem",) if self.stem_skip and "stem" not in self.taps else ())
        if self.plain_features:
            feats = PlainEncoder(self.plain_features, taps, layers, self.pool_stem,
                                 name="backbone")(x, train)
        else:
            feats = EfficientNet(self.width_mult, self.depth_mult, self.drop_connect_rate,
                                 taps, layers, self.fused_stages, name="backbone")(x, train)
        if self.align_taps:
            feats = {k: align_to_input(v, x.shape[1:3]) for k, v in feats.items()}
        p = [feats[t] for t in self.taps]
        p = Gating(self.gating_channels, self.gating_dropout, layers, name="gating")(p, train)
        gated_top = p[-1]
        for k in range(self.num_bifpn):
            p = BiFPN(self.feature_reweighing, self.se_ratio, self.node_dropout, layers,
                      self.node_pointwise, self.node_conv, name=f"bifpn_{k + 1}")(p, train)
        seg, bdr = InterlinkedDecoders(self.feature_reweighing, self.se_ratio,
                                       self.seg_third_term, layers, self.node_pointwise,
                                       self.node_conv,
                                       name="decoders")(p, train)
        # The decoders' maps upsampled once for the heads and the skips (which resize them on
        # from there): one backward pass of the upsampling per map.
        seg_up, bdr_up = upsample2x(seg), upsample2x(bdr)
        out = {}
        if self.output_blocks:
            out["seg_logits"] = UpsamplingBlock(self.num_labels, layers,
                                                name="seg_head")(seg, seg_up)
            out["boundary_logits"] = UpsamplingBlock(self.boundary_channels, layers,
                                                     name="boundary_head")(bdr, bdr_up)
        if self.stem_skip:
            stem = feats["stem"]
            out["seg_logits"] += SkipRefine(self.num_labels, self.stem_skip, layers,
                                            self.skip_depth, name="seg_skip")(seg_up, stem, train)
            out["boundary_logits"] += SkipRefine(self.boundary_channels, self.stem_skip, layers,
                                                 self.skip_depth,
                                                 name="boundary_skip")(bdr_up, stem, train)
        if self.input_skip:
            # Logits at the input resolution: the bilinear x2 of the heads plus a correction
            # from features of the input itself (docs/model.md, item 10).
            f = layers.conv_bn_silu_stack(x, self.input_skip, self.input_depth, train,
                                          conv_name="input_skip", bn_name="input_skip_bn")
            full = x.shape[1:3]
            # Without output blocks the skips are the heads, as a UNet's last level: their last
            # convolution starts from the usual random weights instead of zero.
            refine = functools.partial(SkipRefine, channels=self.input_skip, layers=layers,
                                       depth=self.skip_depth, zero_init=self.output_blocks)
            if self.shared_input_skip:
                # One refinement of both decoders' maps: the layers at the input resolution
                # are the step's largest cost on a CPU (docs/learning.md §38).
                both = refine(self.num_labels + self.boundary_channels,
                              name="input_skip_refine")(
                    jnp.concatenate([seg_up, bdr_up], axis=-1), f, train)
                seg_fix, bdr_fix = both[..., :self.num_labels], both[..., self.num_labels:]
            else:
                seg_fix = refine(self.num_labels, name="seg_input_skip")(seg_up, f, train)
                bdr_fix = refine(self.boundary_channels, name="boundary_input_skip")(
                    bdr_up, f, train)
            if self.output_blocks:
                seg_fix = resize_to(out["seg_logits"], full) + seg_fix
                bdr_fix = resize_to(out["boundary_logits"], full) + bdr_fix
            out["seg_logits"], out["boundary_logits"] = seg_fix, bdr_fix
        if self.tissue_head:
            # TC on the gated P7 (docs/model.md); the softmax lives in the loss.
            v = jnp.mean(gated_top.astype(jnp.float32), axis=(1, 2))
            v = nn.Dropout(self.classifier_dropout, deterministic=not train)(v)
            out["tissue_logits"] = layers.dense(self.num_tissues, kernel_init=glorot_uniform,
                                                name="classifier")(v)
        return {k: v.astype(jnp.float32) for k, v in out.items()}


def input_shape(cfg, batch: int = 1, size: int | None = None) -> tuple[int, int, int, int]:
    """(B, S, S, n_ch) of the network input of a config (S = input.size unless given)."""
    s = int(size or cfg.input.size)
    return (batch, s, s, input_channels(cfg))


def backbone_scaling(cfg) -> tuple[float, float]:
    """(width_mult, depth_mult): the B-variant's, each overridden where the config's is non-zero
    (B4's for the plain encoder, which has neither)."""
    backbone = str(cfg.model.backbone)
    if backbone != PLAIN and backbone not in VARIANTS:
        raise ConfigError(f"model.backbone must be {PLAIN!r} or one of {sorted(VARIANTS)}, "
                          f"got {backbone!r}")
    width, depth = efficientnet_config("b4" if backbone == PLAIN else backbone)
    return (float(cfg.model.width_mult) or width, float(cfg.model.depth_mult) or depth)


def build_model(cfg) -> nn.Module:
    """The network of a config tree (``cfg.model``, ``cfg.data`` label/tissue names): TSFDNet,
    or with ``model.arch="unet"`` the reference UNet of ``model.unet_features``.

    Taps: the B4 names of ``configs/default.py`` (or an empty tuple) mean "the last block of
    stages 2..6 and the top" at the configured depth (B4: block2d..block6h, top), so width/depth
    overrides keep the same pyramid; any other tuple is used as given.
    """
    m = cfg.model
    arch = str(m.arch)
    if arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    boundary_channels = BOUNDARY_CHANNELS[check_boundary_kind(cfg)]
    if arch == "unet":
        return UNet(features=tuple(int(f) for f in m.unet_features),
                    num_labels=len(cfg.data.label_names), boundary_channels=boundary_channels,
                    layers=model_layers(cfg))
    width, depth = backbone_scaling(cfg)
    if not 0 <= int(m.fused_stages) <= len(BASE_BLOCKS):
        raise ConfigError(f"model.fused_stages must be 0..{len(BASE_BLOCKS)} (EfficientNet's "
                          f"stages), got {m.fused_stages}")
    plain = str(m.backbone) == PLAIN
    if plain and len(m.plain_features) != 5:
        raise ConfigError(f"model.plain_features needs 5 widths (strides 2, 4, 8, 16, 32), got "
                          f"{tuple(m.plain_features)}")
    if bool(m.pool_stem) and not plain:
        raise ConfigError("model.pool_stem changes the plain encoder's stem; it needs "
                          "model.backbone='plain'")
    if int(m.input_depth) < 1:
        raise ConfigError(f"model.input_depth must be at least 1, got {m.input_depth}")
    if str(m.node_conv) not in NODE_CONVS:
        raise ConfigError(f"model.node_conv must be one of {NODE_CONVS}, got {m.node_conv!r}")
    if str(m.node_conv) == "dense" and bool(m.node_pointwise):
        raise ConfigError("model.node_pointwise adds a 1x1 conv after the nodes' depthwise conv; "
                          "with model.node_conv='dense' there is none, set one of the two")
    if bool(m.shared_input_skip) and not int(m.input_skip):
        raise ConfigError("model.shared_input_skip shares the input skip between the heads; it "
                          "needs model.input_skip > 0 (the skip's channels)")
    if not bool(m.output_blocks) and not int(m.input_skip):
        raise ConfigError("model.output_blocks=False leaves the logits to the input skip; it "
                          "needs model.input_skip > 0 (the skip's channels)")
    if not bool(m.output_blocks) and int(m.stem_skip):
        raise ConfigError("model.stem_skip refines the output blocks' logits; with "
                          "model.output_blocks=False there are none, set model.stem_skip=0")
    taps = tuple(m.taps)
    if not taps or taps == DEFAULT_TAPS:
        taps = PLAIN_TAPS if plain else stage_end_taps(width, depth)
    if int(m.stem_skip) and "stem" in taps:
        raise ConfigError("model.stem_skip refines logits at the stem's stride 2, but with 'stem' "
                          "among model.taps the decoders already end there and the heads at the "
                          "input resolution; set model.stem_skip=0")
    num_tissues = len(cfg.data.tissue_names)
    if m.tissue_head and num_tissues < 2:
        raise ConfigError("model.tissue_head needs at least 2 data.tissue_names "
                          f"(got {num_tissues}); set model.tissue_head=False (CBB) instead")
    return TSFDNet(
        width_mult=width, depth_mult=depth, drop_connect_rate=float(m.drop_connect_rate),
        fused_stages=int(m.fused_stages),
        plain_features=tuple(int(f) for f in m.plain_features) if plain else (),
        pool_stem=bool(m.pool_stem), taps=taps, gating_channels=int(m.gating_channels),
        gating_dropout=float(m.gating_dropout), num_bifpn=int(m.num_bifpn),
        feature_reweighing=bool(m.feature_reweighing), se_ratio=int(m.se_ratio),
        node_dropout=float(m.node_dropout), node_pointwise=bool(m.node_pointwise),
        node_conv=str(m.node_conv),
        seg_third_term=bool(m.seg_third_term),
        num_labels=len(cfg.data.label_names), num_tissues=num_tissues,
        tissue_head=bool(m.tissue_head), classifier_dropout=float(m.classifier_dropout),
        stem_skip=int(m.stem_skip), input_skip=int(m.input_skip),
        skip_depth=int(m.skip_depth), input_depth=int(m.input_depth),
        shared_input_skip=bool(m.shared_input_skip), output_blocks=bool(m.output_blocks),
        align_taps=bool(m.align_taps),
        boundary_channels=boundary_channels, layers=model_layers(cfg))


def model_layers(cfg) -> Layers:
    """The ``Layers`` of ``cfg.model``: compute dtype, BatchNorm momentum, depthwise lowering."""
    m = cfg.model
    dtype = str(m.dtype)
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    impl = str(m.depthwise_impl)
    if impl not in DEPTHWISE_IMPLS:
        raise ConfigError(f"model.depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    return Layers(dtype=DTYPES[dtype], bn_momentum=float(m.bn_momentum), depthwise_impl=impl)
