"""Evaluation report files: report.json, report.md (paper Tables 8-10 layout) and plots.

Written next to masks.npy in ``<workdir>/eval/<name>/``; every file atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
# Figure without pyplot: no global backend or figure registry (Agg renders savefig).
from matplotlib.figure import Figure

from tsfd_jax import atomic, paper
from tsfd_jax.metrics.pixel import pr_curve
from tsfd_jax.overlay import class_colors, overlay_pannuke


def to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def markdown(report: dict, title: str) -> str:
    pq, det = report["pq"], report["detection"]
    s = report["summary"]
    lines = [f"# {title}", "",
             f"{s['images']} images. Official PanNuke PQ protocol (tissue-averaged mPQ/bPQ); "
             "paper column: TSFD-Net as published (random split, authors' protocol - not directly "
             "comparable).", "",
             "## Overall", "", "| metric | ours | paper |", "|---|---|---|",
             f"| mPQ | {_fmt(s['mPQ'])} | {paper.MPQ} |", f"| bPQ | {_fmt(s['bPQ'])} | {paper.BPQ} |"]
    if "mPQ_tsfd_protocol" in s:
        lines += [f"| mPQ (authors' protocol) | {_fmt(s['mPQ_tsfd_protocol'])} | {paper.MPQ} |",
                  f"| bPQ (authors' protocol) | {_fmt(s['bPQ_tsfd_protocol'])} | {paper.BPQ} |"]
    if "tissue_accuracy" in s:
        lines.append(f"| tissue accuracy | {_fmt(s['tissue_accuracy'])} | - |")
    lines += ["", "## Table 8: PQ per tissue", "",
              "| tissue | mPQ | bPQ | paper mPQ | paper bPQ |", "|---|---|---|---|---|"]
    for t, v in pq["tissue_mPQ"].items():
        lines.append(f"| {t} | {_fmt(v)} | {_fmt(pq['tissue_bPQ'].get(t))} | "
                     f"{_fmt(paper.TISSUE_MPQ.get(t))} | {_fmt(paper.TISSUE_BPQ.get(t))} |")
    lines += ["", "## Table 9: PQ per class", "", "| class | PQ | DQ | SQ | paper PQ |",
              "|---|---|---|---|---|"]
    for c, v in pq["class_PQ"].items():
        lines.append(f"| {c} | {_fmt(v)} | {_fmt(pq.get('class_DQ', {}).get(c))} | "
                     f"{_fmt(pq.get('class_SQ', {}).get(c))} | {_fmt(paper.CLASS_PQ.get(c))} |")
    lines += ["", "## Table 10: detection and classification (HoVer-Net protocol, 12 px)", "",
              "| | P | R | F1 | paper F1 |", "|---|---|---|---|---|",
              f"| detection | {_fmt(det['Pd'])} | {_fmt(det['Rd'])} | {_fmt(det['F1d'])} | "
              f"{paper.DETECTION['F1']} |"]
    for c, v in det["per_class"].items():
        lines.append(f"| {c} | {_fmt(v.get('P'))} | {_fmt(v.get('R'))} | {_fmt(v.get('F1'))} | "
                     f"{_fmt(paper.CLASSIFICATION_F1.get(c))} |")
    t = report["timings"]
    lines += ["", f"Timings: device {t['device_s']:.1f} s, post-processing "
              f"{t['postprocess_s']:.1f} s, metrics {t['metrics_s']:.1f} s "
              f"({t['images_per_s']:.1f} images/s).", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path, title: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in report.items() if k not in ("pr", "examples")}
    written = [out_dir / "report.json", out_dir / "report.md"]
    atomic.write_bytes(written[0], json.dumps(to_jsonable(plain), indent=2))
    atomic.write_bytes(written[1], markdown(report, title))
    written += _plots(report, out_dir)
    return written


def _plots(report: dict, out_dir: Path) -> list[Path]:
    written = []
    label_names = ("background", *report["class_names"])
    if report.get("tissue"):
        cm = np.asarray(report["tissue"]["confusion"], float)
        names = report["tissue"]["names"]
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        fig = Figure(figsize=(8, 7))
        ax = fig.subplots()
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted tissue")
        ax.set_ylabel("true tissue")
        ax.set_title("Tissue confusion (row-normalised)")
        fig.tight_layout()
        written.append(_savefig(fig, out_dir / "tissue_confusion.png"))
    pr = report.get("pr")
    if pr is not None and len(pr["labels"]):
        fig = Figure(figsize=(5, 5))
        ax = fig.subplots()
        colors = class_colors(label_names)
        for c, name in enumerate(label_names[1:], start=1):
            precision, recall, _ = pr_curve(pr["scores"][:, c], pr["labels"] == c)
            ax.plot(recall, precision, label=name, color=np.asarray(colors[c]) / 255)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("Per-class pixel precision-recall")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_savefig(fig, out_dir / "pr_curves.png"))
    if report.get("examples"):
        written.append(_overlay_grid(report["examples"], label_names, out_dir / "overlays.png"))
        if all("seg_prob" in ex for ex in report["examples"]):
            written.append(probability_grid(report["examples"], label_names,
                                            out_dir / "probabilities.png"))
    return written


def _savefig(fig, path: Path) -> Path:
    with atomic.writing(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def probability_picture(image: np.ndarray, seg_prob: np.ndarray, boundary_prob: np.ndarray,
                        label_names: tuple[str, ...]) -> np.ndarray:
    """uint8 (H, 4W, 3), what the network outputs before post-processing: the image, the
    foreground probability 1 - p(background) and the boundary probability (black 0, white 1),
    and the arg-max nucleus class where the foreground probability is above 0.5."""
    seg_prob = np.asarray(seg_prob, np.float32)
    foreground = 1.0 - seg_prob[..., 0]
    grey = [np.repeat(np.round(np.clip(p, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)
            for p in (foreground, np.asarray(boundary_prob, np.float32).reshape(foreground.shape))]
    colors = np.asarray(class_colors(label_names), np.uint8)
    classes = np.where(foreground > 0.5, seg_prob[..., 1:].argmax(-1) + 1, 0)
    return np.concatenate([np.asarray(image[..., :3], np.uint8), *grey, colors[classes]], axis=1)


def probability_grid(examples: list[dict], label_names: tuple[str, ...], path: Path) -> Path:
    """``probability_picture`` of every example, one row each."""
    rows = [probability_picture(ex["image"], ex["seg_prob"], ex["boundary_prob"], label_names)
            for ex in examples]
    atomic.save_png(path, np.concatenate(rows, axis=0))
    return path


def _overlay_grid(examples: list[dict], label_names: tuple[str, ...], path: Path) -> Path:
    """One row per example: the image, the truth and the prediction outlined by class."""
    rows = [np.concatenate([ex["image"], overlay_pannuke(ex["image"], ex["true"], label_names),
                            overlay_pannuke(ex["image"], ex["pred"], label_names)], axis=1)
            for ex in examples]
    atomic.save_png(path, np.concatenate(rows, axis=0))
    return path
