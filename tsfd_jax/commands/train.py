"""``python -m tsfd_jax train --config configs/NAME.py[:variant] --workdir W [--config.a.b=v]``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="config file, optionally with :variant")
    p.add_argument("--workdir", required=True, help="run folder (resumed if it holds this run)")
    p.add_argument("--overwrite", action="store_true",
                   help="archive a previous run of another config in the workdir and start afresh")
    p.add_argument("--resume-anyway", action="store_true",
                   help="continue a run in the workdir although its saved config differs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.epilog = "Any config field can be overridden: --config.data.root /data/pannuke"


def run(args) -> int:
    from tsfd_jax.config_files import load_config
    from tsfd_jax.loop import TrainingDiverged, train_and_evaluate

    cfg = load_config(args.config, args.config_overrides)
    try:
        train_and_evaluate(cfg, args.workdir, overwrite=args.overwrite,
                           resume_anyway=args.resume_anyway, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"error: {e}")
        return 3
    return 0
