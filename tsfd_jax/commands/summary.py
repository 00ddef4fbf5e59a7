"""``python -m tsfd_jax summary --config configs/default.py [--size N] [--config.model.x=v]``.

Prints the parameters of each part of the config's model (params + BN statistics, as Keras
counts them) and the XLA FLOPs of one image at the config's input size. Nothing is computed at
full size: shapes come from ``jax.eval_shape`` and FLOPs from the lowered program.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tsfd_jax.config_files import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--size", type=int, default=0,
                   help="input size in pixels (default: the config's input.size)")
    p.add_argument("--backward", action="store_true",
                   help="also count the FLOPs of a training forward + backward pass")
    p.add_argument("--no-flops", action="store_true", help="parameters only")
    p.epilog = "Any config field can be overridden: --config.model.seg_third_term=False"


def format_table(counts: dict[str, int], flops: dict[str, float], size: int,
                 title: str) -> str:
    lines = [title, f"{'part':<12} {'params':>12}", "-" * 25]
    for part, n in counts.items():
        if part == "total":
            lines.append("-" * 25)
        lines.append(f"{part:<12} {n:>12,}")
    for name, value in flops.items():
        lines.append(f"{name} at {size}x{size}, 1 image: {value / 1e9:,.2f} GFLOPs (XLA)")
    return "\n".join(lines)


def run(args) -> int:
    from tsfd_jax.config_files import load_config
    from tsfd_jax.models.summary import abstract_variables, count_params, xla_flops
    from tsfd_jax.models.tsfd import build_model, input_shape
    from tsfd_jax.errors import UserError

    cfg = load_config(args.config, getattr(args, "config_overrides", []))
    size = int(args.size or cfg.input.size)
    if size <= 0 or size % 32:
        raise UserError(f"--size {size}: the input size must be a positive multiple of 32")
    try:
        model = build_model(cfg)
    except ValueError as e:
        raise UserError(f"{args.config}: {e}") from None
    shape = input_shape(cfg, 1, size)
    variables = abstract_variables(model, shape)
    counts = count_params(variables)
    flops: dict[str, float] = {}
    if not args.no_flops:
        flops["forward"] = xla_flops(model, variables, shape)
        if args.backward:
            flops["forward+backward"] = xla_flops(model, variables, shape, backward=True)
    kind = "FDB" if cfg.model.tissue_head else "CBB"
    backbone = (f"plain encoder {tuple(model.plain_features)}" if model.plain_features else
                f"EfficientNet-{str(cfg.model.backbone).upper()} w={model.width_mult:g} "
                f"d={model.depth_mult:g}")
    title = (f"TSFD-Net ({kind}, {backbone}, {shape[-1]}-channel input, "
             f"C_GB={model.gating_channels}, {model.num_bifpn} BiFPNs, "
             f"FR {'on' if model.feature_reweighing else 'off (CFF)'}, "
             f"Eq. 3 third term {'on' if model.seg_third_term else 'off'}, {cfg.model.dtype})")
    print(format_table(counts, flops, size, title))
    return 0
