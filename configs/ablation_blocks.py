"""PAPER Table 4: which blocks of TSFD-Net matter (ablation of FDB, CWFF / CFF and data augmentation).

Names (PAPER §3): FDB = feature distillation block, the encoder trained together with the tissue
classifier (TC) head; CBB = the same encoder without the TC head and loss ("CBB-Net");
CWFF = the BiFPN stack whose fusion nodes reweigh every input with a feature-reweighing (FR) block;
CFF = the same BiFPNs without FR (plain sums); ID = interlinked decoders (segmentation and boundary
branches, PAPER Eq. 3-4). Every row of the table has ID, so the decoders themselves are never
ablated and need no switch. How each row maps to the config (changes to configs/default.py):

| variant | alias       | row (PAPER Table 4)        | model.* / augment.* changed    | mPQ   | bPQ   |
|---------|-------------|----------------------------|--------------------------------|-------|-------|
| exp1    | cbb_id      | CBB + ID                   | tissue_head=False, num_bifpn=0 | .4721 | -     |
| exp2    | fdb_id      | FDB + ID                   | num_bifpn=0                    | .490  | -     |
| exp3    | tsfd        | FDB + CWFF + ID (TSFD-Net) | (none: the paper model)        | .504  | .6377 |
| exp4    | fdb_cff_id  | FDB + CFF + ID (no FR)     | feature_reweighing=False       | .4845 | -     |
| exp5    | cbb_cwff_id | CBB + CWFF + ID (CBB-Net)  | tissue_head=False              | .494  | .623  |
| exp6    | no_da       | TSFD-Net, no augmentation  | augment.enabled=False          | .4636 | -     |

mPQ / bPQ: PAPER Table 4 (docs/evaluation.md; "-": not in the text; exp3's bPQ is the headline
.6377). Readings:
- Rows without CWFF or CFF have no BiFPN at all: the gated pyramid P2..P7 goes straight into the
  interlinked decoders (``model.num_bifpn=0``).
- ``model.feature_reweighing=False`` ("without FR") removes the FR blocks everywhere, in the
  BiFPNs and in the decoders (PAPER Eq. 3-4 weight their inputs with FR too); rows exp1/exp2 keep
  FR in the decoders because only the BiFPNs are absent there.
- The paper repeated every row 5 times and reported the mean (PAPER §4.4): run seeds 0..4.

A variant may be followed by the variants of configs/default.py (``:exp4,fold2``,
``:exp4,tsfd_split``). No variant = exp3.

  python -m tsfd_jax train --config configs/ablation_blocks.py:exp4 \
      --workdir runs/ablations/ablation_blocks-exp4-seed0 --config.data.root /data/pannuke
  python experiments/sweep.py --sweep configs/ablation_blocks.py --root runs/ablations \
      --seeds 0,1,2,3,4 --config.data.root /data/pannuke
  python experiments/tables.py --root runs/ablations --out runs/ablations/tables
(``--sweep configs/ablation_blocks.py:folds``: every row on the official 3-fold rotation;
``:tsfd``: on the authors' split, tabulated with ``tables.py --scheme tsfd``.)

Runtime: as configs/default.py per run (150 epochs; the paper's 512 px runs took 556 s/epoch,
about 23 h, on 3 RTX 2080, PAPER Table 7); exp1/exp2 are cheaper (no BiFPN), exp6 is the same.
"""

from configs.ablation_common import table_functions

TABLE = 4
TITLE = "Ablation of the blocks of TSFD-Net"
PAPER_MODEL = "exp3"  # the row equal to configs/default.py

VARIANTS = {
    "exp1": dict(aliases=("cbb_id",), row="CBB + ID", mpq=0.4721, bpq=None,
                 changes={"model.tissue_head": False, "model.num_bifpn": 0}),
    "exp2": dict(aliases=("fdb_id",), row="FDB + ID", mpq=0.490, bpq=None,
                 changes={"model.num_bifpn": 0}),
    "exp3": dict(aliases=("tsfd", "fdb_cwff_id"), row="FDB + CWFF + ID (TSFD-Net)", mpq=0.504,
                 bpq=0.6377, changes={}),
    "exp4": dict(aliases=("fdb_cff_id",), row="FDB + CFF + ID (without FR)", mpq=0.4845,
                 bpq=None, changes={"model.feature_reweighing": False}),
    "exp5": dict(aliases=("cbb_cwff_id", "cbb_net"), row="CBB + CWFF + ID (CBB-Net)", mpq=0.494,
                 bpq=0.623, changes={"model.tissue_head": False}),
    "exp6": dict(aliases=("no_da",), row="TSFD-Net without data augmentation", mpq=0.4636,
                 bpq=None, changes={"augment.enabled": False}),
}


get_config, split_variant, sweep, sweep_folds, sweep_tsfd = table_functions(
    VARIANTS, PAPER_MODEL, "configs/ablation_blocks.py")
