"""The smallest config that runs every part of the model and loop: for tests (seconds per step).

``shrink(cfg)`` turns any config into such a copy, so every config of the project can be checked
to build and run one step on a CPU.
"""

from configs import default


def shrink(c, image_size: int = 32, batch: int = 4):
    c.data.image_size = image_size
    c.input.size = image_size * 2
    c.data.global_batch_size = batch
    c.data.eval_batch_size = batch
    c.data.num_workers = 0
    m = c.model
    m.width_mult, m.depth_mult = 0.1, 0.1
    m.gating_channels = 8
    m.num_bifpn = min(int(m.num_bifpn), 1)
    c.total_steps = 2
    c.optim.warmup_steps = 1
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
    c.eval_max_images = 8
    return c


def get_config(arg: str | None = None):
    c = shrink(default.get_config())
    c.data.train_split, c.data.val_split, c.data.test_split = "fold1", "fold2", "fold2"
    return c
