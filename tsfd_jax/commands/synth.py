"""``synth``: write synthetic PanNuke-format folds (the embedded default dataset).

  python -m tsfd_jax synth --out data/synthetic --num-images 200 --seed 0 [--folds 3]

The folder gets PanNuke's official download layout (``Fold k/images/foldk/images.npy`` ...),
so every command that reads PanNuke reads it unchanged. Running the same command again writes
nothing; different existing files are kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to hold 'Fold 1' .. 'Fold K'")
    parser.add_argument("--num-images", type=int, required=True, help="patches per fold")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument("--folds", type=int, default=3, help="number of folds (default 3)")
    parser.add_argument("--size", type=int, default=256, help="patch size in pixels (default 256)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing fold files that differ from this generation")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tsfd_jax.constants import PANNUKE_CLASSES
    from tsfd_jax.data.synthetic import write_pannuke

    with tqdm(total=args.folds * args.num_images, unit="img", desc="synth", leave=False) as bar:
        def on_fold(k: int, counts) -> None:
            per_class = ", ".join(f"{name} {int(n)}" for name, n in zip(PANNUKE_CLASSES, counts))
            bar.write(f"Fold {k}: {args.num_images} images, {int(counts.sum())} nuclei ({per_class})")

        folders = write_pannuke(args.out, args.num_images, args.seed, folds=args.folds,
                                image_size=args.size, overwrite=args.overwrite,
                                progress=bar.update, on_fold=on_fold)
    print(f"PanNuke layout in {args.out}: {', '.join(f.name for f in folders)}")
    return 0
