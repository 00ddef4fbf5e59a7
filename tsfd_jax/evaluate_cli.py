"""Evaluate a training workdir: restore a checkpoint, run a split, write the report folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import jax
import ml_collections

from tsfd_jax.errors import UserError


# Fields added to the config after runs were trained, with the value that reproduces what those
# runs computed; a run's config.json without them still loads.
ADDED_FIELDS = {("model", "depthwise_impl"): "auto", ("model", "arch"): "tsfd",
                ("model", "unet_features"): (16, 32, 64), ("optim", "name"): "sgd"}


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise UserError(f"{workdir}: not a training workdir (no config.json)")
    try:
        cfg = ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    for (section, key), value in ADDED_FIELDS.items():
        if section in cfg and key not in cfg[section]:
            cfg[section][key] = value
    return cfg


EVAL_SECTIONS = ("postprocess", "eval")


def apply_eval_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``--config.postprocess.*`` / ``--config.eval.*`` to a run's config.

    Post-processing keys added since the run was trained take their defaults first, so an
    older workdir accepts every current switch.
    """
    from dataclasses import asdict

    from tsfd_jax.configs_cli import apply_override, split_overrides
    from tsfd_jax.postprocess import PostprocessParams

    for section in EVAL_SECTIONS:
        if section not in cfg:
            cfg[section] = ml_collections.ConfigDict()
    for key, value in asdict(PostprocessParams()).items():
        if key not in cfg.postprocess:
            cfg.postprocess[key] = value
    pairs, rest = split_overrides(list(overrides))
    if rest:
        raise UserError(f"unrecognized arguments: {' '.join(rest)}")
    for key, raw in pairs:
        if key.split(".")[0] not in EVAL_SECTIONS:
            raise UserError(f"--config.{key}: evaluate changes only postprocess.* and eval.* "
                            "(the model and data settings are the checkpoint's)")
        apply_override(cfg, key, raw)


def evaluate_workdir(workdir: str | Path, *, checkpoint: str = "best", data: str = "",
                     split: str = "", name: str = "", protocol: str = "official",
                     workers: int | None = None, max_images: int | None = None,
                     overwrite: bool = False, overrides: Sequence[str] = ()) -> Path:
    """Evaluate a checkpoint of ``workdir``; ``overrides`` (``--config.postprocess.k=v`` /
    ``--config.eval.k=v``) change only the post-processing and evaluation settings."""
    from tsfd_jax.checkpoints import restore_variables
    from tsfd_jax.data.resolve import eval_source
    from tsfd_jax.evaluate import evaluate_source
    from tsfd_jax.report import write_report

    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    apply_eval_overrides(cfg, overrides)
    variables, step = restore_variables(workdir, checkpoint)
    split = split or cfg.data.test_split
    source, label = eval_source(cfg, workdir, data, split)
    out_dir = workdir / "eval" / (name or f"{label}-step{step}")
    # Under jax.distributed every process evaluates every image; process 0 writes.
    writer = jax.process_index() == 0
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: already exists; pass --overwrite or another --name")
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    if writer:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        if partial.exists():
            shutil.rmtree(partial)
    report = evaluate_source(cfg, variables, source, max_images=max_images, with_report=True,
                             out_dir=partial if writer else None, workers=workers,
                             protocol=protocol)
    report["checkpoint_step"] = step
    report["data"] = {"source": data or cfg.data.root, "split": split}
    if writer:
        write_report(report, partial, f"TSFD-Net evaluation: {label}, checkpoint step {step}")
        partial.rename(out_dir)
    print(summary_table(report))
    return out_dir


def summary_table(report: dict) -> str:
    s = report["summary"]
    rows = [("images", s["images"]), ("mPQ", s["mPQ"]), ("bPQ", s["bPQ"]),
            ("detection F1", s["det_F1"])]
    if "tissue_accuracy" in s:
        rows.append(("tissue accuracy", s["tissue_accuracy"]))
    for c, v in report["pq"]["class_PQ"].items():
        rows.append((f"PQ {c}", v))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in rows)
