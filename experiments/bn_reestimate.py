"""BatchNorm statistics re-estimated before evaluation: does the trained model gain from them?

Training keeps each BatchNorm's statistics as an exponential running average
(``model.bn_momentum``: 0.9 in the CPU configs, so mostly the last ~10 batches of training,
augmented and sampled as training draws them). This script freezes a workdir's weights,
measures every BatchNorm's population statistics over ``--batches`` training batches (each
layer's mean and variance pooled over all of them, the network in training mode as in a train
step; "precise BN") and scores the validation split with both sets of statistics, with the
workdir's post-processing (the tuned one where ``evaluate --tune`` wrote it) and, with
``--tune``, tuned again for each. The workdir is not changed.

  python experiments/bn_reestimate.py --workdir runs/consep --batches 200 --augment --tune \\
      --out runs/consep/bn_reestimate.json

Prints a table and writes JSON (docs/learning.md §30).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def population_statistics(batch_statistics: Callable, batches: Iterable) -> dict:
    """Every BatchNorm's mean and variance pooled over ``batches`` (equal-sized).

    ``batch_statistics(batch)`` returns the ``batch_stats`` collection of one batch: the model
    applied in training mode with BatchNorm momentum 0, so each layer holds that batch's own
    mean and (biased) variance. The pooled variance is E[x^2] - E[x]^2 over all batches
    together, not the mean of the per-batch variances (which leaves out how the batch means
    spread).
    """
    import jax

    total_mean = total_square = None
    count = 0
    for batch in batches:
        stats = jax.device_get(batch_statistics(batch))
        mean = jax.tree.map(np.float64, _field(stats, "mean"))
        square = jax.tree.map(lambda m, v: np.float64(v) + np.float64(m) ** 2,
                              _field(stats, "mean"), _field(stats, "var"))
        if total_mean is None:
            total_mean, total_square = mean, square
        else:
            total_mean = jax.tree.map(np.add, total_mean, mean)
            total_square = jax.tree.map(np.add, total_square, square)
        count += 1
    if count == 0:
        raise ValueError("no batches to estimate the statistics from")
    mean = jax.tree.map(lambda s: s / count, total_mean)
    var = jax.tree.map(lambda s, m: np.maximum(s / count - m * m, 0.0), total_square, mean)
    return _merge(mean, var)


def _field(stats: dict, name: str) -> dict:
    """The ``name`` leaves of a batch_stats tree ({..., layer: {mean, var}}), same nesting."""
    if set(stats) == {"mean", "var"}:
        return stats[name]
    return {k: _field(v, name) for k, v in stats.items()}


def _merge(mean, var) -> dict:
    if not isinstance(mean, dict):
        return {"mean": np.float32(mean), "var": np.float32(var)}
    return {k: _merge(mean[k], var[k]) for k in mean}


def reestimated_variables(cfg, variables: dict, workdir: Path, batches: int, augment: bool,
                          sampled: bool, seed: int) -> dict:
    """``variables`` with batch_stats measured over ``batches`` of the run's training split."""
    import jax

    from tsfd_jax.data.pipeline import train_iterator
    from tsfd_jax.data.resolve import load_train
    from tsfd_jax.models.tsfd import build_model
    from tsfd_jax.ops.preprocess import make_preprocess_fn

    stat_cfg = cfg.copy_and_resolve_references()
    stat_cfg.model.bn_momentum = 0.0  # the running "average" becomes the batch's statistics
    model = build_model(stat_cfg)
    preprocess = make_preprocess_fn(stat_cfg)
    source, crop, weights = load_train(stat_cfg, workdir)
    data = train_iterator(source, int(cfg.data.global_batch_size), seed=seed, num_workers=0,
                          prefetch=2, crop_size=crop, weights=weights if sampled else None)

    @jax.jit
    def statistics(batch, key):
        inputs, _ = preprocess(batch, key, augment)
        _, new = model.apply(variables, inputs, train=True, mutable=["batch_stats"],
                             rngs={"dropout": key})
        return new["batch_stats"]

    keys = iter(jax.random.split(jax.random.key(seed), batches))
    stats = population_statistics(
        lambda b: statistics({k: np.asarray(v) for k, v in b.items()}, next(keys)),
        (next(data) for _ in range(batches)))
    return {**variables, "batch_stats": stats}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training workdir")
    p.add_argument("--checkpoint", default="last", help="best | last | a step")
    p.add_argument("--batches", type=int, default=200, help="training batches to pool")
    p.add_argument("--augment", action="store_true",
                   help="augment the batches as training does (default: unaugmented crops)")
    p.add_argument("--sampled", action="store_true",
                   help="draw tiles with the run's data.sampling weights (default: uniform)")
    p.add_argument("--tune", action="store_true",
                   help="also tune the post-processing again for each set of statistics")
    p.add_argument("--seed", type=int, default=123, help="seed of the batches drawn")
    p.add_argument("--out", default="", help="JSON file to write")
    args = p.parse_args(argv)
    if args.batches < 1:
        raise SystemExit(f"--batches {args.batches}: expected at least 1")

    from tsfd_jax.checkpoints import restore_variables
    from tsfd_jax.data.resolve import load_eval_split
    from tsfd_jax.errors import UserError
    from tsfd_jax.evaluate_run import load_run_config
    from tsfd_jax.postprocess import PostprocessParams
    from tsfd_jax.tune import collect, default_workers, score, search, tuned_metric

    workdir = Path(args.workdir)
    try:
        cfg = load_run_config(workdir, tuned=True)
        variables, step = restore_variables(workdir, args.checkpoint)
        reestimated = reestimated_variables(cfg, variables, workdir, args.batches, args.augment,
                                            args.sampled, args.seed)
        eval_cfg, source = load_eval_split(cfg, workdir, "val")
    except UserError as e:
        raise SystemExit(f"error: {e}")
    params = PostprocessParams.of(eval_cfg.postprocess)
    metric, workers = tuned_metric(eval_cfg), default_workers()
    rows, images = [], 0
    for name, v in (("as trained", variables), ("re-estimated", reestimated)):
        data = collect(eval_cfg, v, source)
        images = len(data["seg"])
        row = {"statistics": name, **score(eval_cfg, data, params, workers)}
        if args.tune:
            best, tuned, _ = search(eval_cfg, data, metric, workers)
            row.update({"bPQ_tuned": tuned["bPQ"], "mPQ_tuned": tuned["mPQ"],
                        "postprocess_tuned": dataclasses.asdict(best)})
        rows.append(row)
    print(f"{workdir} step {step}: {images} {eval_cfg.data.val_split} images, tta "
          f"{eval_cfg.eval.tta}; re-estimated over {args.batches} training batches "
          f"({'augmented' if args.augment else 'unaugmented'}, "
          f"{'sampled' if args.sampled else 'uniform'})")
    tuned_cols = args.tune
    print("| statistics | bPQ | mPQ |" + (" bPQ tuned again | mPQ tuned again |" if tuned_cols
                                         else ""))
    print("|---|---:|---:|" + ("---:|---:|" if tuned_cols else ""))
    for r in rows:
        line = f"| {r['statistics']} | {r['bPQ']:.3f} | {r['mPQ']:.3f} |"
        if tuned_cols:
            line += f" {r['bPQ_tuned']:.3f} | {r['mPQ_tuned']:.3f} |"
        print(line)
    if args.out:
        from tsfd_jax.atomic import write_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"workdir": str(workdir), "step": step, "batches": args.batches,
                              "augment": args.augment, "sampled": args.sampled,
                              "postprocess": dataclasses.asdict(params), "rows": rows,
                              "date": datetime.date.today().isoformat(),
                              "machine": platform.platform(), "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
