"""PAPER Table 6: the loss functions (PAPER §3.4, Eq. 5-12, Table 3).

Three heads, three losses: the tissue classifier (focal, Eq. 6, or cross-entropy), the
segmentation head (focal Tversky FT, Eq. 8, optionally + w (BCE + Dice), Eq. 7, 9-10) and the
boundary head (FT, optionally + w Combo, Eq. 11-12); w is the auxiliary weight (0.4 in Table 3).
Only the best row (.504) and the w = 0.9 row (.488) are in the text (docs/losses.md); this file
reads the table as an incremental study of one switch at a time (the tissue loss, each auxiliary
term, both, then the weight). Changes to configs/default.py:

| variant (alias)               | tissue / seg / boundary              | loss.* changed                       | mPQ  | bPQ   |
|-------------------------------|--------------------------------------|--------------------------------------|------|-------|
| ce_ft_ft (row1)               | CE / FT / FT                         | tissue="ce", seg="ft", boundary="ft" | -    | -     |
| focal_ft_ft (row2)            | focal / FT / FT                      | seg="ft", boundary="ft"              | -    | -     |
| focal_ftbd_ft (row3)          | focal / FT+.4(BCE+Dice) / FT         | boundary="ft"                        | -    | -     |
| focal_ft_ftcombo (row4)       | focal / FT / FT+.4Combo              | seg="ft"                             | -    | -     |
| focal_ftbd_ftcombo (row5)     | focal / FT+.4(BCE+Dice) / FT+.4Combo | (none: paper model)                  | .504 | .6377 |
| focal_ftbd_ftcombo_w09 (row6) | focal / FT+.9(BCE+Dice) / FT+.9Combo | {seg,boundary}_aux_weight=0.9        | .488 | -     |

mPQ / bPQ: PAPER Table 6 ("-": not in the text; row5's bPQ is the headline .6377). Also accepted:
``best`` / ``w04`` for row5 and ``w09`` for row6. ``loss.form`` stays "paper" (the equations);
``--config.loss.form=authors`` runs the same rows with the authors' coded losses. The paper
repeated every row 5 times (seeds 0..4).

A variant may be followed by the variants of configs/default.py (``:row1,fold2``). No variant =
row5.

  python -m tsfd_jax train --config configs/ablation_losses.py:focal_ft_ft \
      --workdir runs/ablations/ablation_losses-focal_ft_ft-seed0 --config.data.root /data/pannuke
  python experiments/sweep.py --sweep configs/ablation_losses.py --root runs/ablations \
      --seeds 0,1,2,3,4 --config.data.root /data/pannuke
  python experiments/tables.py --root runs/ablations --out runs/ablations/tables
(``--sweep configs/ablation_losses.py:folds``: every row on the official 3-fold rotation;
``:tsfd``: on the authors' split, tabulated with ``tables.py --scheme tsfd``.)

Runtime: as configs/default.py per run (the paper's 512 px runs: 556 s/epoch, about 23 h for 150
epochs on 3 RTX 2080, PAPER Table 7); the losses cost little beside the network.
"""

from configs.ablation_common import table_functions

TABLE = 6
TITLE = "Ablation of the loss functions"
PAPER_MODEL = "focal_ftbd_ftcombo"  # the row equal to configs/default.py

VARIANTS = {
    "ce_ft_ft": dict(aliases=("row1",), row="CE / FT / FT", mpq=None, bpq=None,
                     changes={"loss.tissue": "ce", "loss.seg": "ft", "loss.boundary": "ft"}),
    "focal_ft_ft": dict(aliases=("row2",), row="focal / FT / FT", mpq=None, bpq=None,
                        changes={"loss.seg": "ft", "loss.boundary": "ft"}),
    "focal_ftbd_ft": dict(aliases=("row3",), row="focal / FT + 0.4 (BCE + Dice) / FT", mpq=None,
                          bpq=None, changes={"loss.boundary": "ft"}),
    "focal_ft_ftcombo": dict(aliases=("row4",), row="focal / FT / FT + 0.4 Combo", mpq=None,
                             bpq=None, changes={"loss.seg": "ft"}),
    "focal_ftbd_ftcombo": dict(aliases=("row5", "best", "w04", "tsfd"),
                               row="focal / FT + 0.4 (BCE + Dice) / FT + 0.4 Combo (TSFD-Net)",
                               mpq=0.504, bpq=0.6377, changes={}),
    "focal_ftbd_ftcombo_w09": dict(aliases=("row6", "w09"),
                                   row="focal / FT + 0.9 (BCE + Dice) / FT + 0.9 Combo",
                                   mpq=0.488, bpq=None,
                                   changes={"loss.seg_aux_weight": 0.9,
                                            "loss.boundary_aux_weight": 0.9}),
}


get_config, split_variant, sweep, sweep_folds, sweep_tsfd = table_functions(
    VARIANTS, PAPER_MODEL, "configs/ablation_losses.py")
