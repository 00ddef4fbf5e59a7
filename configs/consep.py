"""TSFD-Net on real H&E: the CoNSeP tiles (colorectal adenocarcinoma, 40x), sized for a 2-core CPU.

A second dataset beside PanNuke, with its own classes (HoVer-Net's 4-class merge of CoNSeP, from
the folder's classes.txt): background, other, inflammatory, epithelial, spindle-shaped. 432 tiles
of 256 x 256 from 27 source images (16 tiles each); 20 % of the source images are held out as
'val' (``data.val_fraction``: 6 images, 96 tiles; tiles of one image stay together; the images
are drawn with ``seed``, so every seed validates on its own images). CoNSeP has no tissue labels, so the
network is CBB (no tissue classifier, ``model.tissue_head=False``, ``data.tissue_names=()``).

The default model is configs/demo.py's network (docs/learning.md §21-23, §26-27): TSFD-Net's
gating, FR blocks and interlinked decoders at C_GB = 16 on the plain convolutional encoder,
without BiFPNs, its pyramid started at the stem (``model.taps``: six levels at strides 2..32, so
the decoders end at stride 2, the paper's P1, instead of the authors' stride 4), run at the
tiles' own size: random 128-px crops at a 128 input, the output blocks giving logits at the
input, i.e. the label, resolution (the input skip, ``model.input_skip = 16``, two 3 x 3 layers
deep since section 32, ``model.skip_depth = 2``, refining them), so
no x2 input; validated on the whole 256-px tiles; cross-entropy for the classes instead of the
paper's class loss that ``demo.small_data_recipe`` keeps (with these decoders +0.022 tuned bPQ
and +0.033 mPQ at 10 minutes). Against the same network with the authors' pyramid and the
paper's class loss (the config before), on held-out images at 10 minutes: 0.295 / 0.184 ->
0.360 / 0.219 tuned bPQ / mPQ, the reference UNet 0.354 / 0.214 and 0.392 / 0.248 in two runs
(§27); at 3800 steps, 40 minutes, on the config's own validation images 0.339 / 0.268 -> 0.393 /
0.334. The second layer in the input skip (§32): +0.009 to +0.012 tuned bPQ at 10 minutes on
held-out images, 0.402 / 0.318 -> 0.405 / 0.320 at 40 minutes (untuned 0.326 / 0.265 -> 0.344 /
0.275).
Changed from the paper as well, each from the ablations at equal budget on held-out source
images (docs/learning.md): ``demo.small_data_recipe`` (AdamW 2e-3 instead of SGD, 3 x BCE on the
boundary instead of focal Tversky + Combo; the 'markers' post-processing, tuned on validation
by ``evaluate --tune``), BatchNorm momentum 0.9; 6-px separation bands between touching nuclei
(``targets.boundary_dilation = 2``, sections 9-10); no dropout or drop-connect (the paper: 0.2
each): 0.242 -> 0.272 bPQ and 0.198 -> 0.229 mPQ at 40 minutes (section 16); evaluated and
predicted with the four flips of each tile averaged (``eval.tta = "flips"``; not in the paper):
+0.02-0.03 bPQ and +0.01-0.02 mPQ (section 18). Its tuning also searches how far nuclei grow
from their cores and from what size foreground without a core is kept
(``postprocess.max_growth``, ``postprocess.orphan_size``, section 19) and at what depth the
cores split at the basins of the boundary map (``postprocess.basin_depth``, section 28), for
binary PQ (``best_metric``, section 31: +0.008 bPQ and -0.002 mPQ at 40 minutes). Like
configs/demo.py it draws tiles holding rare classes more often (``data.sampling = 'class'``;
section 29: at 10 minutes on held-out images +0.035 tuned bPQ and +0.07 mPQ, inflammatory PQ
0.24 -> 0.41; level at 40 minutes, 0.394 / 0.320 against 0.393 / 0.320). What configs/demo.py
gained from and this config did not (section 24): the boundary BCE weighted 30 and separation
bands only where nuclei touch (``targets.contact_dilation``), each 0.01-0.02 bPQ below at 40
minutes; the boundary BCE weighted 10 (section 35) gains at 10 minutes on one seed of two and
ends 0.007 / 0.005 tuned bPQ / mPQ below at 40 minutes (0.398 / 0.315).
Dense 3 x 3 convolutions in the decoders' fusion nodes instead of the paper's
depthwise ones (``model.node_conv = "dense"``, sections 36-37: with C_GB = 16 the depthwise
nodes mix channels only through the FR blocks' global vectors): they merge fewer touching
nuclei on both seeds measured at 10 minutes (+0.050 / +0.037 untuned bPQ, +0.048 / +0.004
tuned), at the same step cost; level at 40 minutes (0.401 / 0.323 tuned against 0.405 / 0.320,
untuned 0.344 / 0.282 against 0.344 / 0.275).
One input skip for both heads (``model.shared_input_skip``, section 38) is not used: ahead
untuned at 10 minutes on two seeds, tuned on one of them; at 40 minutes 0.326 / 0.258 untuned
against 0.344 / 0.282 and 0.407 / 0.321 tuned against 0.401 / 0.323.
No output blocks (``model.output_blocks=False``, section 39, not the paper): the input
skips give the logits, as a UNet's last level: the nuclei it calls inflammatory are right
more often and merged less; at 10 minutes on two seeds +0.017 / +0.022 and +0.014 / +0.045
tuned bPQ / mPQ, the step 10 % cheaper; at 40 minutes 0.427 / 0.331 tuned against 0.401 /
0.323, 0.353 / 0.275 untuned against 0.344 / 0.282.

  python -m tsfd_jax train --config configs/consep.py --workdir runs/consep \
      --config.data.root ../shared/data/consep/train
  python -m tsfd_jax evaluate --workdir runs/consep --tune --name val

Speed on the 2 CPU cores: about 0.4-0.5 s per train step of 8 crops (0.55-0.65 s before the
cheaper augmentation and upsampling gradient of docs/learning.md §37); the 3800 steps took 36-42
minutes before it, compile and validations included (RESULTS.md).
The model stays far below HoVer-Net: a CPU starting point for measuring what helps on real data,
not a usable CoNSeP model.

Variant ``:paper`` is the paper's network (B4, C_GB = 160, 3 BiFPNs, 512 input, batch 16,
150 epochs of the training tiles, 3-epoch warm-up) on the same data, for a GPU. The variants of
configs/default.py do not apply (CoNSeP has no folds).
"""

from configs import default, demo
from tsfd_jax.constants import BACKGROUND

# classes.txt of the CoNSeP folder, labels 1..4 (0 = background).
CONSEP_CLASSES = ("other", "inflammatory", "epithelial", "spindle-shaped")
TRAIN_TILES = 336  # 432 tiles minus 6 held-out source images (96 tiles) at val_fraction 0.2


def get_config(arg: str | None = None):
    c = default.get_config()
    d = c.data
    d.source = "folders"
    d.root = ""                      # --config.data.root .../consep/train
    d.val_fraction = 0.2             # by source image (folders.split_by_group)
    d.train_split, d.val_split, d.test_split = "train", "val", "val"
    d.label_names = (BACKGROUND,) + CONSEP_CLASSES
    d.tissue_names = ()
    d.image_size = 256
    c.model.tissue_head = False      # CBB: no tissue labels in CoNSeP

    if arg == "paper":
        epochs = 150
        c.total_steps = epochs * TRAIN_TILES // int(d.global_batch_size)
        c.optim.warmup_steps = 3 * TRAIN_TILES // int(d.global_batch_size)
        c.eval_every_steps = c.checkpoint_every_steps = 300
        return c
    if arg:
        raise ValueError(f"unknown variant {arg!r} of configs/consep.py (paper)")

    d.global_batch_size = 8
    d.eval_batch_size = 16
    d.num_workers = 0                # reading prepared records is cheap; workers cost start-up
    # Random 128-px crops of the 256-px tiles (docs/learning.md section 6); validation on the
    # whole 256-px tiles.
    d.image_size = 128

    demo.cpu_model(c)
    demo.small_data_recipe(c, min_size=16)
    # Class-aware sampling (tiles holding rare classes drawn more often), as configs/demo.py:
    # +0.035 tuned bPQ and +0.07 mPQ at 10 minutes on held-out images, inflammatory PQ 0.24 ->
    # 0.41; level at 40 minutes (docs/learning.md §29).
    d.sampling = "class"
    # Not the paper, measured at 10 minutes on held-out source images (docs/learning.md §10):
    # 6-px separation bands between touching nuclei.
    c.targets.boundary_dilation = 2
    # The small network underfits 336 tiles: without dropout and drop-connect it gains +0.03
    # bPQ and mPQ at 40 minutes and +0.02 at 10 (docs/learning.md §16).
    c.model.drop_connect_rate = 0.0
    c.model.gating_dropout = 0.0
    c.model.node_dropout = 0.0
    # The demo's model (plain encoder, no BiFPN, C_GB 16) at the tiles' own size, the input
    # skip giving logits at the label size: +0.025 bPQ and +0.017 mPQ at 38 minutes, +0.06 /
    # +0.04 at 10 (docs/learning.md §26).
    c.model.backbone = "plain"
    c.model.num_bifpn = 0
    c.model.gating_channels = 16
    c.input.size = d.image_size
    c.model.input_skip = 16
    # The decoders from the stem (stride 2: the paper's pyramid starts at P1, the authors' code
    # at P2), so the heads' logits come out at the input resolution (no stem skip: nothing left
    # at stride 2 to refine), and cross-entropy for the classes: +0.065 tuned bPQ and +0.035 mPQ
    # at 10 minutes, +0.054 / +0.066 at 40 (docs/learning.md §27).
    c.model.taps = ("stem", "s4", "s8", "s16a", "s16b", "s32a")
    c.loss.seg = "ce"
    # Two 3x3 layers instead of one in the input skip, the only layers at the input resolution:
    # at 10 minutes on held-out images +0.009 to +0.012 tuned bPQ, at the same step cost; at 40
    # minutes 0.405 / 0.320 tuned against 0.402 / 0.318 (docs/learning.md §32).
    c.model.skip_depth = 2
    # Dense 3x3 convolutions in the fusion nodes (not the paper): fewer merged nuclei at 10
    # minutes on two seeds, level at 40 (docs/learning.md §36-37).
    c.model.node_conv = "dense"
    # The input skips as the heads, without the paper's output blocks: at 10 minutes on two
    # seeds +0.017 / +0.022 and +0.014 / +0.045 tuned bPQ / mPQ, the step 10 % cheaper; at 40
    # minutes 0.427 / 0.331 tuned against 0.401 / 0.323 (docs/learning.md §39).
    c.model.output_blocks = False
    # Post-processing tuned (and the best checkpoint kept) for binary PQ, CoNSeP's headline
    # instance metric (HoVer-Net reports it with per-type F1, not mPQ): on the 40-minute model
    # 0.402 / 0.318 bPQ / mPQ tuned against 0.394 / 0.320 tuned for mPQ (docs/learning.md §31).
    c.best_metric = "val_bPQ"
    c.total_steps = 3800             # 38-40 minutes on the 2 CPU cores (RESULTS.md)
    c.log_every_steps = 50
    c.eval_every_steps = 950
    c.checkpoint_every_steps = 950
    c.keep_checkpoints = 1
    c.eval_max_images = 0            # the whole validation split (96 tiles)
    # evaluate and predict average the model over the four flips of each tile: +0.02-0.03 bPQ
    # and +0.01-0.02 mPQ on two 40-minute models, 4x the inference time (docs/learning.md §18).
    c.eval.tta = "flips"
    return c
