"""PAPER Table 7: the input resolution (256, 512 = the paper model, 768).

PanNuke patches are 256 x 256 and are resized bilinearly to ``input.size`` on device; the labels
stay at 256 (``data.image_size``). The network's outputs are at input / 2 (docs/model.md): 256
for a 512 input, as in the paper. At 256 input the logits are 128 x 128 and at 768 they are
384 x 384; both are resized bilinearly to the 256 labels before the losses and post-processing
(``tsfd_jax.forward.resize_to_labels``, docs/data.md). The paper does not say how its 256 and 768 runs
matched the 256 labels (docs/evaluation.md). Changes to configs/default.py:

| variant | alias | input | batch | changed fields                             | mPQ   | bPQ   |
|---------|-------|-------|-------|--------------------------------------------|-------|-------|
| res256  | 256   | 256   | 16    | input.size=256                             | .4912 | -     |
| res512  | 512   | 512   | 16    | (none: the paper model)                    | .504  | .6377 |
| res768  | 768   | 768   | 9     | input.size=768, data.global_batch_size=9,  | .4386 | -     |
|         |       |       |       | total_steps=94583, optim.warmup_steps=1330 |       |       |

mPQ / bPQ: PAPER Table 7 (docs/evaluation.md; "-": not in the text; res512's bPQ is the headline
.6377; the paper's res256 run has Dead PQ 0). The 768 run used batch 9 (PAPER §4.4, memory);
the training length is kept in epochs, as the authors' code counts it (150 epochs and a 3-epoch
warm-up, docs/data.md): total and warm-up steps x 16/9; the learning rate is unchanged (the
paper gives no other). Batch 9 needs 1, 3 or 9 devices (the paper used 3 GPUs); set
``--config.data.global_batch_size`` otherwise. The paper repeated every row 5 times (seeds 0..4).

A variant may be followed by the variants of configs/default.py (``:res768,fold2``). No variant =
res512.

  python -m tsfd_jax train --config configs/ablation_resolution.py:res768 \
      --workdir runs/ablations/ablation_resolution-res768-seed0 --config.data.root /data/pannuke
  python experiments/sweep.py --sweep configs/ablation_resolution.py --root runs/ablations \
      --seeds 0,1,2,3,4 --config.data.root /data/pannuke
  python experiments/tables.py --root runs/ablations --out runs/ablations/tables
(``--sweep configs/ablation_resolution.py:folds``: every row on the official 3-fold rotation;
``:tsfd``: on the authors' split, tabulated with ``tables.py --scheme tsfd``.)

Runtime: the paper's 3 RTX 2080 took 255 / 556 / 1085 s per epoch at 256 / 512 / 768 (PAPER
Table 7, 150 epochs: about 11 h / 23 h / 45 h); its GFLOPs column (185 / 739 / 1664) over-counts
depthwise convolutions (docs/model.md §4; experiments/bench_model.py measures ours).
"""

from configs import default
from configs.ablation_common import table_functions

TABLE = 7
TITLE = "Ablation of the input resolution"
PAPER_MODEL = "res512"  # the row equal to configs/default.py

_BASE = default.get_config()
_B768 = 9  # PAPER §4.4: the 768 x 768 run used batch 9


def _per_batch(steps: int, batch: int) -> int:
    """Steps for the same number of epochs at another global batch."""
    return round(steps * int(_BASE.data.global_batch_size) / batch)


VARIANTS = {
    "res256": dict(aliases=("256",), row="256 x 256 input", mpq=0.4912, bpq=None,
                   changes={"input.size": 256}),
    "res512": dict(aliases=("512", "tsfd"), row="512 x 512 input (TSFD-Net)", mpq=0.504,
                   bpq=0.6377, changes={}),
    "res768": dict(aliases=("768",), row="768 x 768 input, batch 9", mpq=0.4386, bpq=None,
                   changes={"input.size": 768, "data.global_batch_size": _B768,
                            "total_steps": _per_batch(int(_BASE.total_steps), _B768),
                            "optim.warmup_steps": _per_batch(int(_BASE.optim.warmup_steps),
                                                             _B768)}),
}


get_config, split_variant, sweep, sweep_folds, sweep_tsfd = table_functions(
    VARIANTS, PAPER_MODEL, "configs/ablation_resolution.py")
