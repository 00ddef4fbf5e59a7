"""TSFD-Net on PanNuke: the paper's settings (Ilyas et al., Neural Networks 151, 2022).

Where the paper is silent the authors' code fills the gap; where they disagree the paper is the
default and a switch gives the code's variant (docs/FIDELITY.md lists every point).

Run (one GPU):
  python -m tsfd_jax train --config configs/default.py --workdir runs/tsfd \
      --config.data.root /data/pannuke
Variants: ``configs/default.py:fold2`` / ``:fold3`` pick the official rotation
(train/val/test folds 1/2/3, 2/1/3, 3/2/1), ``:tsfd_split`` the authors' released file lists.
"""

import ml_collections

from tsfd_jax.constants import LABEL_NAMES, PANNUKE_TISSUES

# Official PanNuke 3-fold rotation (train, val, test) - PATHML / CellViT.
ROTATIONS = {"fold1": (1, 2, 3), "fold2": (2, 1, 3), "fold3": (3, 2, 1)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---- data --------------------------------------------------------------------------
    c.data = d = ml_collections.ConfigDict()
    d.source = "pannuke"          # pannuke | folders | prepared (an already prepared dataset)
    d.root = ""                   # PanNuke folder holding 'Fold N', or prepared dataset dir
    d.prepared_dir = ""           # where to prepare; empty = <workdir>/prepared
    d.split_scheme = "official"   # official (prepared split names) | tsfd (authors' file lists)
    d.train_split = "fold1"       # prepared split names; '+' joins several ("fold1+fold2")
    d.val_split = "fold2"
    d.test_split = "fold3"
    d.val_fraction = 0.0          # folders source: share of source images held out as 'val'
    d.label_names = LABEL_NAMES   # project label order: 0 background, PanNuke channel + 1
    d.tissue_names = PANNUKE_TISSUES
    d.image_size = 256            # label resolution (PanNuke patch size); larger images: random
                                  # crops of this size in training (docs/data.md)
    d.sampling = ""               # '' uniform (the paper) | class | tissue | class+tissue:
    d.sampling_gamma = 0.85       # draw images of rare classes / tissues more (docs/data.md)
    d.eval_size = 0               # evaluation tiles of larger images; 0 = whole when a split
                                  # has one size, else image_size
    d.mpp = 0.25                  # micrometres per pixel of the training data (PanNuke 40x)
    d.global_batch_size = 16      # PAPER §4.4
    d.eval_batch_size = 16
    d.num_workers = 2             # grain worker processes (0 = in-process)
    d.prefetch = 4

    # ---- device-side preprocessing ------------------------------------------------------
    c.input = i = ml_collections.ConfigDict()
    i.size = 512                  # network input; PanNuke 256 patches resized bilinearly (§3.2)
    i.channels = "rgb_her"        # rgb | rgb_he | rgb_her (Table 5)
    i.drop_r_at_inference = False # Table 5 row 4: R channel zeroed at evaluation
    i.stain_matrix = "hed"        # hed (paper Eq. 13-15, skimage rgb2hed) | authors (H, E, HxE)
    i.stain_scaling = "fixed"     # fixed unit-range constants | minmax (authors' per-image)
    i.rgb_scaling = "fixed"       # fixed: RGB / 255 (paper) | percentile: per image, 1-99.8 %

    c.augment = a = ml_collections.ConfigDict()
    a.enabled = True              # Table 4 exp 6 switches this off
    a.geometric_ops = 2           # SomeOf(2, ...) (§4.1)
    a.p = 0.9                     # Sometimes(0.9) around every op
    a.flip = True
    a.scale = (0.8, 1.2)
    a.translate = 0.2             # fraction of the size, each axis
    a.rotate = 25.0               # degrees
    a.shear = 8.0                 # degrees
    a.crop = (0.05, 0.25)         # fraction per side, resized back
    a.elastic = True              # PAPER §4.2 (not in the authors' code)
    a.elastic_alpha = 12.0        # displacement in pixels (at 256)
    a.elastic_grid = 8            # coarse random field, upsampled
    a.photometric = True          # PAPER §4.2
    a.median_blur = (3, 7)        # kernel size range (odd)
    a.gaussian_blur = (0.0, 1.0)  # sigma
    a.gaussian_noise = 0.05       # max std as a fraction of 255
    a.hue = 8.0                   # imgaug AddToHue units (of 255 in OpenCV's 0..180 hue) (§4.2)
    a.saturation = 20.0
    a.brightness = 26.0
    a.contrast = (0.75, 1.25)

    c.targets = t = ml_collections.ConfigDict()
    t.frame_width = 2             # 2-px band enclosing nuclei cut by the patch edge (§3.4)
    t.boundary_dilation = 0       # not the paper: widen contours by this many px per side
    t.contact_dilation = 0        # not the paper: widen only contacts between touching nuclei
    t.boundary_kind = "contour"   # contour (paper) | distance: 1 - normalised inner distance
                                  # | hv: HoVer-Net's maps (needs loss.boundary="mse_msge")

    # ---- model -------------------------------------------------------------------------
    c.model = m = ml_collections.ConfigDict()
    m.arch = "tsfd"               # tsfd | unet (the reference model, docs/learning.md)
    m.unet_features = (16, 32, 64)  # unet only: channels per level
    m.backbone = "b4"             # EfficientNet B0..B7 compound scaling; "plain": not the paper
    m.plain_features = (16, 32, 64, 64, 64)  # plain only: widths at strides 2, 4, 8, 16, 32
    m.pool_stem = False           # plain only: stem conv at the input size, then max-pool
    m.width_mult = 0.0            # 0 = from the B-variant; else overrides (tiny configs)
    m.depth_mult = 0.0
    m.drop_connect_rate = 0.2     # Keras default stochastic depth
    m.fused_stages = 0            # not the paper: stages 1..N as Fused-MBConv (EfficientNetV2)
    m.taps = ("block2d", "block3d", "block4f", "block5f", "block6h", "top")  # P2..P7 (§1.2)
    m.gating_channels = 160       # C_GB (PAPER §3.2)
    m.gating_dropout = 0.2        # SpatialDropout2D (§1.3)
    m.num_bifpn = 3
    m.feature_reweighing = True   # FR blocks (CWFF); False = CFF ablation (Table 4)
    m.se_ratio = 8                # FR squeeze ratio (§1.4)
    m.node_dropout = 0.2          # inside BiFPNs only (§1.5)
    m.node_pointwise = False      # not the paper: 1x1 conv after each fusion node's depthwise
    m.node_conv = "depthwise"     # the fusion nodes' 3x3 conv; "dense": not the paper
    m.seg_third_term = True       # PAPER Eq. 3 third term; False = authors' code (§1.7)
    m.tissue_head = True          # FDB (True) or CBB (False)
    m.classifier_dropout = 0.3
    m.stem_skip = 0               # not the paper: stem features into the output heads (channels)
    m.input_skip = 0              # not the paper: logits at the input resolution (channels)
    m.skip_depth = 1              # 3x3 conv layers of each stem / input skip
    m.shared_input_skip = False   # not the paper: one input skip for both heads
    m.output_blocks = True        # False, not the paper: the input skip alone gives the logits
    m.input_depth = 1             # 3x3 conv layers on the input before the input skip's join
    m.align_taps = False          # not the paper: backbone maps re-centred for the BiFPN's resizes
    m.bn_momentum = 0.99          # BatchNorm running-average decay (Keras default, §1.1)
    m.dtype = "float32"           # float32 | bfloat16 (compute; params stay float32)
    m.depthwise_impl = "auto"     # auto (shift on CPU, XLA grouped conv elsewhere) | shift | conv
    m.init_checkpoint = ""        # orbax checkpoint from import-weights (ImageNet backbone)

    # ---- losses (PAPER Eq. 5-12, Table 3) -----------------------------------------------
    c.loss = l = ml_collections.ConfigDict()
    l.form = "paper"              # paper | authors (§2.2: binary focal, global Tversky, gamma direct)
    l.w_tissue = 1.0              # lambda_tc
    l.w_seg = 1.0                 # lambda_seg
    l.w_boundary = 1.0            # lambda_bdr
    l.tissue = "focal"            # focal | ce (Table 6)
    l.focal_alpha = 0.3
    l.focal_gamma = 5.0
    l.seg = "ft_bce_dice"         # ft | ft_bce_dice | ... (Table 6)
    l.seg_ft = (0.3, 0.7, 3.0)    # alpha (FN), beta (FP), gamma
    l.seg_aux_weight = 0.4        # w_seg
    l.boundary = "ft_combo"       # ft | ft_combo | ...
    l.boundary_ft = (0.3, 0.7, 5.0)
    l.boundary_aux_weight = 0.4   # w_bdr
    l.contact_weight = 0.0        # BCE boundary: extra weight between touching nuclei (not the paper)
    l.hv_gradient_weight = 2.0    # mse_msge: weight of the gradient term (HoVer-Net's lambda_b)
    l.combo_alpha = 0.7
    l.combo_ce_ratio = 0.4
    l.border_weight = 3.0         # authors' BCE/Dice border weighting (§2.2)
    l.epsilon = 1e-7

    # ---- optimiser (PAPER §4.4) ---------------------------------------------------------
    c.optim = o = ml_collections.ConfigDict()
    o.name = "sgd"                # sgd | adamw (weight_decay decoupled; docs/learning.md)
    o.lr = 0.16
    o.warmup_steps = 748
    o.momentum = 0.9
    o.nesterov = False
    o.weight_decay = 5e-4         # on conv/dense kernels only
    o.l2_fusion = 0.0             # authors' code 4e-5: L2 on gating + fusion depthwise kernels
    o.grad_clip = 0.0             # 0 = off (paper: none)
    o.ema_decay = 0.0             # evaluate a moving average of the weights; 0 = off (paper)

    # ---- loop ---------------------------------------------------------------------------
    c.total_steps = 150 * 5675 // 16   # 150 epochs of the released train list (authors' code)
    c.log_every_steps = 50
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 2000
    c.keep_checkpoints = 2
    c.best_metric = "val_mPQ"     # kept besides the latest N
    c.eval_max_images = 0         # 0 = whole validation split

    c.mesh = ml = ml_collections.ConfigDict()
    ml.axes = ("data",)
    ml.distributed = False        # jax.distributed.initialize() for multi-host

    # ---- post-processing (PAPER §4.3, docs/evaluation.md) -------------------------------------
    c.postprocess = p = ml_collections.ConfigDict()
    p.seg_threshold = 0.5
    p.boundary_threshold = 0.5
    p.min_size = 22
    p.closing_size = 3
    p.erosion_size = 3
    p.dilation_size = 3
    p.vote = "component"          # Eq. 16 majority per component; "nucleus" = per separated nucleus
    p.method = "paper"            # paper (§4.3) | markers (watershed from boundary-free cores)
    p.split_depth = 0.0           # markers: also split cores at distance peaks this deep (px)
    p.max_growth = 0.0            # markers: grow cores at most this far (px); 0 = no limit
    p.orphan_size = 0             # markers: keep foreground no core reached from this size (px)
    p.basin_depth = 0.0           # markers: split cores at boundary-probability basins this deep

    c.eval = e = ml_collections.ConfigDict()
    e.match_iou = 0.5
    e.detection_radius = 12.0
    e.tune_max_images = 0         # evaluate --tune: first N validation images searched (0 = all)
    e.tune_methods = ("paper", "markers")  # evaluate --tune: post-processing methods searched
    e.tune_fixed = ()             # evaluate --tune: postprocess settings kept, not searched
    e.tune_metric = ""            # evaluate --tune: mPQ | bPQ searched for ("": best_metric's)
    e.tta = "none"                # evaluate and predict: none | flips | dihedral (test-time aug.)

    if arg:
        _apply_variant(c, arg)
    return c


def _apply_variant(c: ml_collections.ConfigDict, arg: str) -> None:
    for part in arg.split(","):
        if part in ROTATIONS:
            tr, va, te = ROTATIONS[part]
            c.data.split_scheme = "official"
            c.data.train_split, c.data.val_split, c.data.test_split = (f"fold{k}" for k in (tr, va, te))
        elif part == "tsfd_split":
            c.data.split_scheme = "tsfd"
        else:
            raise ValueError(f"unknown variant {part!r} of configs/default.py")
