"""The embedded default: a compound-scaled-down TSFD-Net on synthetic PanNuke, for a 2-core CPU.

Everything of the paper model is there (EfficientNet taps, gating, BiFPNs with FR blocks,
interlinked decoders, tissue head, paper losses, augmentation, warm-up + cosine SGD), only
narrower, shallower and smaller: synthetic 64 px patches (a 40x field of view of 16 um) resized
to a 128 input, so the outputs (input / 2) are at the label size as in the paper (512 -> 256).
Sized for a 2-core CPU: the train step compiles in a few minutes; see README for the measured run.

  python -m tsfd_jax demo --out runs/demo          # synth -> prepare -> train -> evaluate -> report
  python -m tsfd_jax train --config configs/demo.py --workdir runs/demo/train \
      --config.data.root runs/demo/synthetic
"""

from configs import default


def get_config(arg: str | None = None):
    c = default.get_config()
    c.seed = 0
    d = c.data
    d.source = "pannuke"
    d.root = ""                      # set by the demo command or --config.data.root
    d.train_split, d.val_split, d.test_split = "fold1+fold2", "fold3", "fold3"
    d.image_size = 64
    d.global_batch_size = 8
    d.eval_batch_size = 16
    d.num_workers = 0                # grain workers cost seconds to start; the data is tiny
    c.input.size = 128

    m = c.model
    m.width_mult = 0.25              # EfficientNet channels / 4
    m.depth_mult = 0.3               # one block per stage
    m.drop_connect_rate = 0.1
    m.gating_channels = 32
    m.num_bifpn = 2
    m.gating_dropout = 0.1
    m.node_dropout = 0.1
    m.bn_momentum = 0.9              # 300 steps: 0.99 leaves the running statistics far behind

    c.optim.lr = 0.05
    c.optim.warmup_steps = 30
    c.total_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 100
    c.eval_max_images = 64
    c.keep_checkpoints = 1

    # Synthetic data of the demo (written by the demo command).
    c.data.synth_images_per_fold = 240
    if arg:
        raise ValueError(f"configs/demo.py takes no variant, got {arg!r}")
    return c
