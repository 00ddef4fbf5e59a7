"""``python -m tsfd_jax evaluate --workdir W [--checkpoint best|last|STEP] [--data PATH]``.

``--config.postprocess.KEY=V`` and ``--config.eval.KEY=V`` change the post-processing and the
evaluation settings of the run's config for this evaluation (e.g. ``postprocess.vote=nucleus``);
everything else comes from the workdir's config.json, since the checkpoint fixes the model.

Writes ``W/eval/<name>/``: masks.npy (PanNuke layout, int32) + types.npy, true/masks.npy +
true/types.npy (the ground truth in the same layout, for the official PanNuke-metrics run.py),
report.json, report.md (paper Tables 8-10 layout) and plots. With ``--data FOLDER`` of labelled
images of any size: whole-image scores (Dice, AJI, AJI+, PQ, detection and per-type F1) in
report.json / report.md and each image's predicted maps under ``instances/``.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="a training workdir")
    p.add_argument("--checkpoint", default="best", help="best | last | a step number")
    p.add_argument("--data", default="",
                   help="a folder of labelled images of any size (scored whole, through the "
                        "tiled predictor), a prepared dataset or PanNuke folds (default: the "
                        "run's data)")
    p.add_argument("--split", default="", help="split name (default: the config's test split); "
                   "with a labelled-image folder, prepares it and scores it patch by patch")
    p.add_argument("--merge", default=None, metavar="NAME",
                   help="labelled-image folder: merge its classes first (consep: CoNSeP's 7 "
                        "classes -> HoVer-Net's 4)")
    p.add_argument("--binary", action="store_true",
                   help="labelled-image folder: score the nuclei without classes (a dataset "
                        "with other classes than the model's)")
    p.add_argument("--overlap", type=int, default=None,
                   help="labelled-image folder: pixels shared by neighbouring tiles")
    p.add_argument("--name", default="", help="output folder name under W/eval/")
    p.add_argument("--protocol", choices=("official", "tsfd"), default="official",
                   help="tsfd also reports PQ against ground truth rebuilt the authors' way")
    p.add_argument("--workers", type=int, default=None, help="post-processing processes")
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing eval folder")
    p.add_argument("--tune", action="store_true",
                   help="first tune the post-processing on the validation split and store it "
                        "in W/postprocess.json (used by evaluate and predict from then on)")
    p.add_argument("--untuned", action="store_true",
                   help="the config's post-processing, not W/postprocess.json")
    p.set_defaults(takes_config_overrides=True)


def run(args) -> int:
    from tsfd_jax.evaluate_run import evaluate_workdir, tune_workdir

    if args.tune:
        tune_workdir(args.workdir, checkpoint=args.checkpoint, workers=args.workers,
                     overrides=args.config_overrides)
    out = evaluate_workdir(args.workdir, checkpoint=args.checkpoint, data=args.data,
                           split=args.split, name=args.name, protocol=args.protocol,
                           workers=args.workers, max_images=args.max_images or None,
                           overwrite=args.overwrite, overrides=args.config_overrides,
                           tuned=not args.untuned, merge=args.merge, binary=args.binary,
                           overlap=args.overlap)
    print(f"report: {out / 'report.md'}")
    return 0
