"""``python -m tsfd_jax import-weights --keras FILE.h5 --variant b4 --in-channels 6 --out DIR``.

Converts Keras EfficientNet weights (e.g. the ImageNet ``efficientnetb4_notop.h5``) into an orbax
checkpoint of the backbone, {'params', 'batch_stats'}, that a config names as
``model.init_checkpoint``. Layers whose shapes differ from the file (the stem of a 6-channel
network) keep a fresh initialisation, as in TSFD-Net (docs/model.md); the report lists them.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keras", required=True, metavar="FILE",
                   help="Keras weights: .h5 (Keras 2 or 3 save_weights) or .keras")
    p.add_argument("--variant", default="b4", help="EfficientNet b0..b7 (default b4)")
    p.add_argument("--width-mult", type=float, default=0.0,
                   help="override the variant's width multiplier (0 = the variant's)")
    p.add_argument("--depth-mult", type=float, default=0.0,
                   help="override the variant's depth multiplier (0 = the variant's)")
    p.add_argument("--in-channels", type=int, default=6,
                   help="input channels of the network (6 = RGB + H,E,R; default 6)")
    p.add_argument("--out", required=True, metavar="DIR", help="new checkpoint folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the layers kept fresh")
    p.add_argument("--load-stem-bn", action="store_true",
                   help="load stem_bn even when the stem conv is kept fresh (TSFD did not)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tsfd_jax.errors import UserError

    if args.in_channels < 1:
        raise UserError(f"--in-channels {args.in_channels}: must be at least 1")
    if Path(args.out).exists():  # checked before the slow model initialisation
        raise UserError(f"{Path(args.out).absolute()}: already exists; choose a new --out")

    import jax
    import jax.numpy as jnp

    from tsfd_jax.models.efficientnet import EfficientNet
    from tsfd_jax.models.keras_weights import load_keras_efficientnet, save_backbone_checkpoint

    overrides = {k: v for k, v in (("width_mult", args.width_mult),
                                    ("depth_mult", args.depth_mult)) if v > 0}
    try:
        model = EfficientNet.from_variant(args.variant, **overrides)
    except ValueError as e:
        raise UserError(f"--variant {args.variant}: {e}") from e
    # Parameter shapes do not depend on the spatial size: initialise on a small input. The 'rbg'
    # generator compiles the few hundred initialisers several times faster than threefry.
    x = jnp.zeros((1, 32, 32, args.in_channels), jnp.float32)
    key = jax.random.key(args.seed, impl="rbg")
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(key, x)
    variables, report = load_keras_efficientnet(
        args.keras, variables, stem_bn_follows_stem_conv=not args.load_stem_bn)
    print(report.summary())
    out = save_backbone_checkpoint(variables, args.out)
    print(f"wrote {out}")
    return 0
