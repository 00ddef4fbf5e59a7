"""``python -m tsfd_jax demo --out DIR``: the whole job on the embedded synthetic default.

synthesise PanNuke-format folds -> prepare -> picture of a preprocessed batch -> train
``configs/demo.py`` -> evaluate on the held-out fold -> print the report table. Every stage is
resumable: running the command again reuses what is finished.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--config", default=str(PROJECT / "configs" / "demo.py"),
                   help="config file (default configs/demo.py)")
    p.add_argument("--images-per-fold", type=int, default=0,
                   help="synthetic images per fold (default: the config's)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from tsfd_jax.config_files import load_config
    from tsfd_jax.data.synthetic import write_pannuke
    from tsfd_jax.evaluate_run import evaluate_workdir, tune_workdir
    from tsfd_jax.loop import train_and_evaluate

    out = Path(args.out)
    cfg = load_config(args.config, args.config_overrides)
    n = args.images_per_fold or int(cfg.data.get("synth_images_per_fold", 100))
    synthetic = out / "synthetic"
    print(f"[1/5] synthetic PanNuke folds -> {synthetic}")
    # Whole PanNuke-size patches; training crops them to data.image_size (docs/data.md).
    write_pannuke(synthetic, num_images=n, seed=int(cfg.seed), folds=3,
                  image_size=int(cfg.data.get("synth_image_size", 0) or cfg.data.image_size))
    cfg.data.root = str(synthetic)
    cfg.data.prepared_dir = str(out / "prepared")

    print(f"[2/5] prepare -> {cfg.data.prepared_dir}")
    from tsfd_jax.data.resolve import open_data
    open_data(cfg, out)

    picture = out / "batch.png"
    print(f"[3/5] preprocessed batch picture -> {picture}")
    if not picture.exists():
        from tsfd_jax.commands import show_batch
        show_batch.run(argparse.Namespace(
            data=str(out / "prepared"), split=cfg.data.train_split, config=args.config,
            config_overrides=args.config_overrides, num=4, seed=0, out=str(picture),
            overwrite=False))

    workdir = out / "train"
    print(f"[4/5] train {cfg.total_steps} steps -> {workdir}")
    train_and_evaluate(cfg, workdir, progress=not args.no_progress)

    print(f"[5/5] evaluate on {cfg.data.test_split}: the config's post-processing, then the "
          f"one tuned on {cfg.data.val_split}")
    evaluate_workdir(workdir, checkpoint="last", name="demo-untuned", overwrite=True,
                     tuned=False)
    tune_workdir(workdir, checkpoint="last")
    eval_dir = evaluate_workdir(workdir, checkpoint="last", name="demo", overwrite=True)
    print(f"\nreport: {eval_dir / 'report.md'}\noverlays: {eval_dir / 'overlays.png'}")
    return 0
