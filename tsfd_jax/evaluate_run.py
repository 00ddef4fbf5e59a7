"""Evaluate a training workdir: restore a checkpoint, run a split, write the report folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import jax
import ml_collections

from tsfd_jax.checkpoints import restore_variables, saved_config
from tsfd_jax.config_files import apply_override, split_overrides
from tsfd_jax.data.folders import is_labelled_folder
from tsfd_jax.data.resolve import eval_source, load_eval_split
from tsfd_jax.errors import UserError
from tsfd_jax.evaluate import evaluate_source
from tsfd_jax.evaluate_images import evaluate_folder, write_folder_report
from tsfd_jax.postprocess import PostprocessParams
from tsfd_jax.predict import make_predict_fn
from tsfd_jax.report import write_report
from tsfd_jax.tune import (collect, default_workers, fixed_settings, load_tuned, save_tuned,
                           search, tuned_methods, tuned_metric)


def load_run_config(workdir: Path, tuned: bool = True) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (fields added since at their old behaviour:
    ``checkpoints.saved_config``); with ``tuned`` its post-processing is the one tuned on
    validation (``tune_workdir``) where that exists."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise UserError(f"{workdir}: not a training workdir (no config.json)")
    try:
        cfg = ml_collections.ConfigDict(saved_config(path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    record = load_tuned(workdir) if tuned else None
    if record:
        for key, value in record["postprocess"].items():
            cfg.postprocess[key] = value
        # The tuned thresholds belong to the probabilities they were searched on.
        if "eval" not in cfg:
            cfg.eval = ml_collections.ConfigDict()
        cfg.eval.tta = record["tta"]
    return cfg


def tune_workdir(workdir: str | Path, checkpoint: str = "last", max_images: int | None = None,
                 workers: int | None = None, overrides: Sequence[str] = ()) -> dict:
    """Tune the post-processing on the run's validation split (tune.py), starting from the
    config's settings (with ``overrides``, as ``evaluate_workdir`` takes them); writes
    ``<workdir>/postprocess.json`` and returns the settings."""
    workdir = Path(workdir)
    cfg = load_run_config(workdir, tuned=False)
    apply_eval_overrides(cfg, overrides)
    methods = tuned_methods(cfg)
    fixed_settings(cfg)  # a wrong name fails before the model runs
    metric = tuned_metric(cfg)
    variables, step = restore_variables(workdir, checkpoint)
    cfg, source = load_eval_split(cfg, workdir, "val")
    max_images = max_images or int(cfg.eval.get("tune_max_images", 0)) or None
    workers = default_workers() if workers is None else workers
    data = collect(cfg, variables, source, max_images)
    best, tuned, untuned = search(cfg, data, metric, workers, methods)
    result = {"postprocess": asdict(best), "tta": str(cfg.eval.tta), "metric": metric,
              "split": str(cfg.data.val_split), "images": int(len(data["seg"])),
              "checkpoint_step": step, "untuned": untuned, "tuned": tuned}
    path = save_tuned(workdir, result)
    print(f"post-processing tuned on {result['images']} {result['split']} images for {metric}: "
          f"{untuned[metric]:.4f} -> {tuned[metric]:.4f} ({path})")
    return result["postprocess"]


EVAL_SECTIONS = ("postprocess", "eval")


def apply_eval_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``--config.postprocess.*`` / ``--config.eval.*`` to a run's config.

    Post-processing keys added since the run was trained take their defaults first, so an
    older workdir accepts every current switch.
    """
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
                     overwrite: bool = False, overrides: Sequence[str] = (),
                     tuned: bool = True, merge: str | None = None, binary: bool = False,
                     overlap: int | None = None) -> Path:
    """Evaluate a checkpoint of ``workdir``; ``overrides`` (``--config.postprocess.k=v`` /
    ``--config.eval.k=v``) change only the post-processing and evaluation settings.

    ``data`` a folder of labelled images (folders.is_labelled_folder): whole images through the
    tiled predictor (evaluate_images.py; ``merge``, ``binary`` and ``overlap`` apply there,
    and only there). Otherwise a
    prepared dataset or PanNuke folds, scored patch by patch (evaluate.py)."""
    workdir = Path(workdir)
    cfg = load_run_config(workdir, tuned=tuned)
    apply_eval_overrides(cfg, overrides)
    variables, step = restore_variables(workdir, checkpoint)
    if data and is_labelled_folder(data) and not split:
        out_dir = workdir / "eval" / (name or f"{Path(data).resolve().name}-step{step}")
        partial = _fresh_output(out_dir, overwrite)
        return _evaluate_folder(cfg, variables, step, data, out_dir, partial, merge=merge,
                                binary=binary, overlap=overlap, workers=workers,
                                max_images=max_images)
    if merge or binary or overlap is not None:
        raise UserError("--merge, --binary and --overlap apply to --data FOLDER of labelled "
                        "images only (scored whole, without --split)")
    split = split or cfg.data.test_split
    cfg, source, label = eval_source(cfg, workdir, data, split)
    out_dir = workdir / "eval" / (name or f"{label}-step{step}")
    # Under jax.distributed every process evaluates every image; process 0 writes.
    writer = jax.process_index() == 0
    partial = _fresh_output(out_dir, overwrite, writer)
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


def _fresh_output(out_dir: Path, overwrite: bool, writer: bool = True) -> Path:
    """The hidden partial folder an evaluation writes into before it is renamed ``out_dir``;
    an existing ``out_dir`` is replaced only with ``overwrite``."""
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: already exists; pass --overwrite or another --name")
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    if writer:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        if partial.exists():
            shutil.rmtree(partial)
    return partial


def _evaluate_folder(cfg, variables, step: int, data: str, out_dir: Path, partial: Path, *,
                     merge, binary, overlap, workers, max_images) -> Path:
    if jax.process_count() > 1:
        raise UserError("evaluate --data FOLDER runs on one process; start it without "
                        "jax.distributed")
    partial.mkdir(parents=True)
    report = evaluate_folder(cfg, make_predict_fn(cfg, variables), data, partial, merge=merge,
                             binary=binary, overlap=overlap, max_images=max_images,
                             workers=int(cfg.data.num_workers) if workers is None else workers)
    report["checkpoint_step"] = step
    write_folder_report(report, partial, f"TSFD-Net whole-image evaluation: {Path(data).name}, "
                                  f"checkpoint step {step}")
    partial.rename(out_dir)
    print(summary_table(report))
    return out_dir


def summary_table(report: dict) -> str:
    s = report["summary"]
    rows = [(k, s[k]) for k in ("images", "mPQ", "bPQ", "dice", "aji", "aji_plus") if k in s]
    rows.append(("detection F1", s["det_F1"]))
    if "tissue_accuracy" in s:
        rows.append(("tissue accuracy", s["tissue_accuracy"]))
    for c, v in report["pq"]["class_PQ"].items():
        rows.append((f"PQ {c}", v))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in rows)
