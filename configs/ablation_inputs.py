"""PAPER Table 5: the network input, RGB alone or with the colour-deconvolved stain channels.

The stain channels come from colour deconvolution (PAPER Eq. 13-15, docs/preprocessing.md): h
(haematoxylin), e (eosin) and r (the third, residual stain). They are computed on device from the
(augmented) RGB image and stacked after it (``input.channels``). The last row trains on all six
channels and zeroes the r channel at evaluation (``input.drop_r_at_inference``), to show how much
the trained network relies on it. Changes to configs/default.py:

| variant        | alias | row (PAPER Table 5)        | changed fields                 | mPQ   | bPQ   |
|----------------|-------|----------------------------|--------------------------------|-------|-------|
| rgb            | exp1  | RGB                        | input.channels="rgb"           | .4406 | -     |
| rgb_he         | exp2  | RGB + h + e                | input.channels="rgb_he"        | .4916 | -     |
| rgb_her        | exp3  | RGB + h + e + r (TSFD-Net) | (none: the paper model)        | .504  | .6377 |
| rgb_her_drop_r | exp4  | r dropped at inference     | input.drop_r_at_inference=True | .4661 | -     |

mPQ / bPQ: PAPER Table 5 (docs/preprocessing.md, §9.1; "-": not in the text; rgb_her's bPQ is the
headline .6377). Only the first convolution (the stem) changes with the number of channels;
``drop_r`` is also accepted for the last row. The paper repeated every row 5 times (seeds 0..4).

A variant may be followed by the variants of configs/default.py (``:rgb,fold2``). No variant =
rgb_her.

  python -m tsfd_jax train --config configs/ablation_inputs.py:rgb \
      --workdir runs/ablations/ablation_inputs-rgb-seed0 --config.data.root /data/pannuke
  python experiments/sweep.py --sweep configs/ablation_inputs.py --root runs/ablations \
      --seeds 0,1,2,3,4 --config.data.root /data/pannuke
  python experiments/tables.py --root runs/ablations --out runs/ablations/tables
(``--sweep configs/ablation_inputs.py:folds``: every row on the official 3-fold rotation;
``:tsfd``: on the authors' split, tabulated with ``tables.py --scheme tsfd``.)

Runtime: as configs/default.py per run (the paper's 512 px runs: 556 s/epoch, about 23 h for 150
epochs on 3 RTX 2080, PAPER Table 7). rgb_her_drop_r trains exactly as rgb_her; it is its own
run because evaluation reads the switch from the run's config (its validation during training,
and so its best checkpoint, already sees the r channel dropped).
"""

from configs.ablation_common import table_functions

TABLE = 5
TITLE = "Ablation of the input channels"
PAPER_MODEL = "rgb_her"  # the row equal to configs/default.py

VARIANTS = {
    "rgb": dict(aliases=("exp1",), row="RGB", mpq=0.4406, bpq=None,
                changes={"input.channels": "rgb"}),
    "rgb_he": dict(aliases=("exp2",), row="RGB + h + e", mpq=0.4916, bpq=None,
                   changes={"input.channels": "rgb_he"}),
    "rgb_her": dict(aliases=("exp3", "tsfd"), row="RGB + h + e + r (TSFD-Net)", mpq=0.504,
                    bpq=0.6377, changes={}),
    "rgb_her_drop_r": dict(aliases=("exp4", "drop_r"), row="RGB + h + e + r, r dropped at inference",
                           mpq=0.4661, bpq=None, changes={"input.drop_r_at_inference": True}),
}


get_config, split_variant, sweep, sweep_folds, sweep_tsfd = table_functions(
    VARIANTS, PAPER_MODEL, "configs/ablation_inputs.py")
