"""Whole-image evaluation of a folder of labelled images of any size (``evaluate --data FOLDER``).

Each image goes through the tiled, seam-safe predictor of ``predict`` (every nucleus once and
whole) and is scored as one image, the way the CoNSeP and MoNuSeg literature reports
(docs/evaluation.md): per image Dice, AJI, AJI+, DQ/SQ/PQ of the binary map
(``metrics/instance.py``), averaged over images; PanNuke's per-class PQ where the labels carry
classes (mPQ, bPQ, class PQ, averaged as ``metrics/pq.summarize_pq``); HoVer-Net's detection
and per-type F1 pooled over the folder. Labels with instances only (MoNuSeg) are scored as
binary: every nucleus is one class, and mPQ is absent.

The folder is read as ``prepare --source folders`` reads it (npz beside the images, or the
CoNSeP ``Images/`` + ``Labels/*.mat`` layout, docs/data.md). Class names come from its
classes.txt or ``merge``, and must be the model's; typed labels without either are taken to be
in the model's class order.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from tsfd_jax import atomic
from tsfd_jax.data.folders import CLASSES_FILE, FolderDataset
from tsfd_jax.data.pannuke import to_pannuke_masks
from tsfd_jax.errors import UserError
from tsfd_jax.metrics.detection import (centroids_from_instances, detection_stats,
                                         instances_from_pannuke)
from tsfd_jax.metrics.instance import binary_scores, mean_scores
from tsfd_jax.metrics.pq import per_image_stats, summarize_pq
from tsfd_jax.postprocess import to_pannuke_layout
from tsfd_jax.predict import predict_image
from tsfd_jax.report import to_jsonable

INSTANCES_DIR = "instances"  # <stem>_inst.npy (int32 ids) and <stem>_class.npy (uint8 labels)
BINARY_KEYS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")


def open_folder(folder: str | Path, model_classes: tuple[str, ...],
                merge: str | None = None, binary: bool = False) -> FolderDataset:
    """The labelled folder, with class names checked against the model's (not with
    ``binary``: its classes are then ignored)."""
    folder = Path(folder)
    named = merge or (folder / CLASSES_FILE).is_file()
    try:
        dataset = FolderDataset(folder, merge=merge)
    except UserError:
        if named:
            raise
        # Typed labels without names: read them in the model's class order (module doc).
        dataset = FolderDataset(folder, class_names=model_classes)
    if dataset.typed and not binary and tuple(dataset.class_names) != tuple(model_classes):
        raise UserError(f"{folder}: its classes {list(dataset.class_names)} differ from the "
                        f"model's {list(model_classes)} (a classes.txt or --merge naming the "
                        "model's classes, or --binary to score the nuclei without classes)")
    return dataset


def score_image(true_inst: np.ndarray, true_cls: np.ndarray | None, pred_inst: np.ndarray,
                pred_classes: np.ndarray, num_classes: int, match_iou: float) -> dict[str, Any]:
    """One image's binary scores, PanNuke PQ statistics row and detection points."""
    row = {"binary": binary_scores(true_inst, pred_inst)}
    if true_cls is not None:
        true_layout = to_pannuke_masks(true_inst, true_cls, num_classes)
        pred_layout = to_pannuke_layout(pred_inst, pred_classes, num_classes, np.int32)
        row["pq"] = per_image_stats(true_layout[None], pred_layout[None], num_classes, match_iou)
        row["true_points"] = instances_from_pannuke(true_layout, num_classes)
        row["pred_points"] = instances_from_pannuke(pred_layout, num_classes)
    else:
        row["true_points"] = centroids_from_instances(true_inst)
        row["pred_points"] = centroids_from_instances(pred_inst)
    return row


def summarize(rows: list[dict], keys: list[str], class_names: tuple[str, ...] | None,
              radius: float, match_iou: float) -> dict[str, Any]:
    """Per-image rows -> the report (summary, per image, PQ per class, detection)."""
    binary = [r["binary"] for r in rows]
    means = mean_scores(binary)
    typed = class_names is not None
    det = detection_stats([r["true_points"] for r in rows], [r["pred_points"] for r in rows],
                          radius=radius, num_classes=len(class_names) if typed else 1,
                          class_names=class_names if typed else ("Nucleus",))
    summary: dict[str, Any] = {"images": len(rows), **means, "det_F1": det["F1d"],
                               "det_P": det["Pd"], "det_R": det["Rd"]}
    pq: dict[str, Any] = {"class_PQ": {}}
    if typed:
        stats = {k: np.concatenate([r["pq"][k] for r in rows]) for k in rows[0]["pq"]}
        pq = summarize_pq(stats, None, class_names, match_iou=match_iou, per_image=True)
        summary["mPQ"], summary["bPQ"] = pq["mPQ"], pq["bPQ"]
        summary["type_F1"] = {c: v["F1"] for c, v in det["per_class"].items()}
    else:
        summary["bPQ"] = means["pq"]
    per_image = [{"key": k, **{m: r["binary"][m] for m in BINARY_KEYS}}
                 for k, r in zip(keys, rows)]
    return {"summary": summary, "per_image": per_image, "pq": pq, "detection": det,
            "class_names": list(class_names or ())}


def evaluate_folder(cfg, predict_fn: Callable, folder: str | Path, out_dir: Path, *,
                    merge: str | None = None, binary: bool = False, overlap: int | None = None,
                    workers: int = 0, max_images: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Predict and score every image of ``folder``; write ``<stem>_inst.npy`` /
    ``<stem>_class.npy`` under ``out_dir/instances`` and return the report (``summarize``).
    ``binary`` scores the nuclei only, whatever classes the labels carry (other datasets)."""
    model_classes = tuple(cfg.data.label_names)[1:]
    dataset = open_folder(folder, model_classes, merge, binary)
    typed = dataset.typed and not binary
    num_classes = len(model_classes)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    inst_dir = out_dir / INSTANCES_DIR
    inst_dir.mkdir(parents=True, exist_ok=True)
    rows, keys = [], []
    t0 = time.perf_counter()
    for i in tqdm(range(n), desc="evaluate", unit="img", disable=not progress):
        ex = dataset.example(i)
        pred = predict_image(ex["image"], predict_fn, cfg, overlap=overlap, workers=workers)
        atomic.save_npy(inst_dir / f"{ex['key']}_inst.npy", pred.inst.astype(np.int32))
        atomic.save_npy(inst_dir / f"{ex['key']}_class.npy", pred.class_map.astype(np.uint8))
        rows.append(score_image(ex["inst"], ex["cls"] if typed else None, pred.inst,
                                pred.classes, num_classes, float(cfg.eval.match_iou)))
        keys.append(ex["key"])
    if not rows:
        raise UserError(f"{folder}: no images to evaluate")
    report = summarize(rows, keys, model_classes if typed else None,
                       float(cfg.eval.detection_radius), float(cfg.eval.match_iou))
    report["timings"] = {"seconds": time.perf_counter() - t0}
    report["data"] = {"folder": str(Path(folder).resolve()), "typed": typed,
                      "merge": merge, "label_format": dataset.label_format.ext}
    return report


def write_folder_report(report: dict[str, Any], out_dir: Path, title: str) -> None:
    """report.json and report.md (summary, per-class PQ and F1, per image) in ``out_dir``."""
    s = report["summary"]
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k in ("images", "bPQ", "mPQ", "dice", "aji", "aji_plus", "dq", "sq", "pq", "det_F1",
              "det_P", "det_R"):
        if k in s:
            v = s[k]
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if report["class_names"]:
        lines += ["", "| class | PQ | F1 (HoVer-Net) |", "|---|---|---|"]
        for c in report["class_names"]:
            lines.append(f"| {c} | {report['pq']['class_PQ'][c]:.4f} | "
                         f"{report['detection']['per_class'][c]['F1']:.4f} |")
    lines += ["", "| image | Dice | AJI | AJI+ | PQ |", "|---|---|---|---|---|"]
    for r in report["per_image"]:
        lines.append(f"| {r['key']} | {r['dice']:.4f} | {r['aji']:.4f} | {r['aji_plus']:.4f} | "
                     f"{r['pq']:.4f} |")
    atomic.write_json(out_dir / "report.json", to_jsonable(report))
    atomic.write_bytes(out_dir / "report.md", "\n".join(lines) + "\n")
