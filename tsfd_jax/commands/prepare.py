"""``python -m tsfd_jax prepare``: PanNuke folds or image + label folders -> a prepared dataset.

  python -m tsfd_jax prepare --source pannuke --input /data/pannuke --out /data/pannuke_prepared
  python -m tsfd_jax prepare --source folders --input consep/train --val-fraction 0.2 --out prep
  python -m tsfd_jax prepare --source folders --input nucls/train --input nucls/test --out prep
  python -m tsfd_jax prepare --source folders --input CoNSeP/Train --merge consep --out prep

Re-running with the same input does nothing; a half-written output is redone. docs/data.md
describes the formats, the repairs and the prepared layout.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=("pannuke", "folders"), required=True,
                        help="pannuke: official fold .npy files; "
                             "folders: <stem>.png|jpg|tif + <stem>.npz, or CoNSeP/HoVer-Net "
                             "Images/<stem>.png + Labels/<stem>.mat")
    parser.add_argument("--input", action="append", required=True, metavar="DIR",
                        help="pannuke: folder holding 'Fold N' folders or one fold's .npy files; "
                             "folders: an image + label folder (repeat for several splits)")
    parser.add_argument("--out", required=True, metavar="DIR", help="prepared dataset folder")
    parser.add_argument("--fold", type=int, default=1,
                        help="fold number of a single-fold PanNuke folder (default 1)")
    parser.add_argument("--classes", default=None, metavar="A,B,C",
                        help="folders: class names of labels 1..C "
                             "(default: the folder's classes.txt)")
    parser.add_argument("--merge", default=None, metavar="NAME",
                        help="folders: merge class labels; 'consep': HoVer-Net's CoNSeP 7 -> 4 "
                             "(other, inflammatory, epithelial, spindle-shaped)")
    parser.add_argument("--split", action="append", default=None, metavar="NAME",
                        help="folders: split name per --input (default 'train' for one folder, "
                             "the folder names for several)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="folders: move this fraction of 'train' into 'val', whole source "
                             "images at a time (default 0)")
    parser.add_argument("--group-pattern", default=r"_\d+$", metavar="REGEX",
                        help="folders: removed from a stem to name its source image, tiles of "
                             r"which stay in one split (default '_\d+$'; '' = every image alone)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val split (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a prepared dataset made from different input")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tsfd_jax.data.prepare import prepare

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    prepare(args.source, args.input, args.out, fold=args.fold, classes=classes, splits=args.split,
            val_fraction=args.val_fraction, seed=args.seed, group_pattern=args.group_pattern,
            merge=args.merge, overwrite=args.overwrite, progress=not args.no_progress)
    return 0
