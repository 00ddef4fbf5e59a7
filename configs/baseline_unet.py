"""The reference model: a plain UNet in the same pipeline (docs/learning.md).

Everything but the network and its training recipe is the base config's: data, augmentation,
targets, post-processing and evaluation. The network is ``models/unet.py`` (16-32-64 channels,
about 0.12 M parameters) at the label size (no input upsampling); the recipe is the usual one
for a small UNet: AdamW at 2e-3 with a short warm-up, cross-entropy on the classes plus
3 x binary cross-entropy on the boundary map.

  configs/baseline_unet.py            on configs/demo.py's data (64-px crops of synthetic PanNuke)
  configs/baseline_unet.py:consep     on configs/consep.py's data (real CoNSeP tiles; with its
                                      targets, the 6-px separation bands included)

  python -m tsfd_jax train --config configs/baseline_unet.py --workdir runs/unet \
      --config.data.root runs/demo/synthetic
"""

from configs import consep, demo

BASES = {"": demo, "demo": demo, "consep": consep}


def get_config(arg: str | None = None):
    if (arg or "") not in BASES:
        raise ValueError(f"unknown variant {arg!r} of configs/baseline_unet.py "
                         f"({', '.join(k for k in BASES if k)})")
    c = BASES[arg or ""].get_config()
    apply(c)
    return c


def apply(c) -> None:
    """Turn a config into the reference UNet with its recipe (used by bench_quality too)."""
    c.model.arch = "unet"
    c.model.unet_features = (16, 32, 64)
    c.model.tissue_head = False
    c.model.bn_momentum = 0.9
    c.input.size = c.data.image_size
    c.optim.name = "adamw"
    c.optim.lr = 2e-3
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 10
    c.loss.seg = "ce"
    c.loss.boundary = "bce"
    c.loss.w_boundary = 3.0
    # The yardstick keeps its 2-px contours; configs/demo.py's contact bands (docs/learning.md
    # §25) were not measured on it.
    c.targets.contact_dilation = 0
