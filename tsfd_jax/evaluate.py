"""Model + split -> predictions in the PanNuke layout -> every metric (docs/evaluation.md).

The model runs on device batch by batch; post-processing runs on host workers while the device
computes the next batch; PQ follows the official PanNuke protocol against the real (prepared)
masks, detection/classification F1 the HoVer-Net protocol, plus tissue accuracy and pixel metrics.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np

from tsfd_jax import atomic, parallel
from tsfd_jax.data.pannuke import to_pannuke_masks
from tsfd_jax.data.pipeline import eval_batches, to_global
from tsfd_jax.forward import configured_tta, make_eval_step
from tsfd_jax.metrics.detection import detection_stats, instances_from_pannuke
from tsfd_jax.metrics.pq import pannuke_pq
from tsfd_jax.metrics.tissue import tissue_stats
from tsfd_jax.models.tsfd import build_model
from tsfd_jax.ops.preprocess import make_preprocess_fn
from tsfd_jax.postprocess import rebuild_tsfd_ground_truth, to_pannuke_layout
from tsfd_jax.postprocess_workers import postprocess_stream

# Pixels sampled per image for the per-class precision-recall curves.
PR_PIXELS_PER_IMAGE = 256
# Images kept for the overlay picture of the report.
OVERLAY_EXAMPLES = 6


def eval_batch_size(cfg, mesh) -> int:
    """The configured eval batch rounded up to a multiple of the device count."""
    n = mesh.devices.size
    b = max(int(cfg.data.eval_batch_size), 1)
    return -(-b // n) * n


KEY_BYTES = 512  # example keys travel between processes as fixed-width UTF-8


def gather_host_batch(batch: dict) -> dict:
    """Every process's host batch concatenated in process order (a collective: all call it)."""

    arrays = {k: np.asarray(v) for k, v in batch.items()
              if not isinstance(v, (list, tuple, str)) and np.asarray(v).dtype.kind not in "USO"}
    keys = batch.get("key")
    if keys is not None:
        encoded = np.zeros((len(keys), KEY_BYTES), np.uint8)
        for row, key in enumerate(keys):
            raw = str(key).encode()[:KEY_BYTES]
            encoded[row, :len(raw)] = np.frombuffer(raw, np.uint8)
        arrays["key"] = encoded
    out = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(arrays, tiled=True).items()}
    if keys is not None:
        out["key"] = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in out["key"]]
    return out


# Jitted eval steps by (config without its post-processing, mesh): the untuned and tuned
# evaluations and the tuning of one run differ only in post-processing, which runs on the host,
# so they share one step and trace it once. A few entries: one per config a process evaluates.
_eval_fns: dict[tuple, Any] = {}
EVAL_FN_CACHE_SIZE = 4


def make_eval_fn(cfg, mesh, tta: str | None = None):
    """The jitted eval step of ``cfg`` over ``mesh``: build it once per run and pass it to every
    ``evaluate_source`` / ``predict_batches`` call, so validation compiles once. Calls with
    configs that differ only in ``postprocess`` get the same function. ``tta``: the test-time
    augmentation (``forward.TTA_MODES``), by default the config's ``eval.tta``; validation
    during training passes "none"."""
    tta = configured_tta(cfg) if tta is None else tta
    device_cfg = {k: v for k, v in cfg.to_dict().items() if k != "postprocess"}
    key = (json.dumps(device_cfg, sort_keys=True, default=repr), mesh, tta)
    if key not in _eval_fns:
        if len(_eval_fns) >= EVAL_FN_CACHE_SIZE:
            _eval_fns.pop(next(iter(_eval_fns)))
        repl = parallel.replicated(mesh)
        _eval_fns[key] = jax.jit(
            make_eval_step(cfg, build_model(cfg), make_preprocess_fn(cfg), tta),
            in_shardings=(repl, parallel.batch_sharded(mesh)), out_shardings=repl)
    return _eval_fns[key]


def predict_batches(cfg, variables: dict, source, *, mesh=None, max_images: int | None = None,
                    eval_fn=None) -> Iterator[tuple[dict, dict]]:
    """Yield (host batch, host outputs) with probabilities, only valid examples kept;
    ``eval_fn`` from ``make_eval_fn(cfg, mesh)`` (built here when not given)."""
    mesh = mesh or parallel.make_mesh(tuple(cfg.mesh.axes))
    step = eval_fn or make_eval_fn(cfg, mesh)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    seen = 0
    for batch in eval_batches(source, eval_batch_size(cfg, mesh)):
        if max_images is not None and seen >= max_images:
            break
        out = parallel.fetch(step(variables, to_global(batch, mesh)))
        if jax.process_count() > 1:
            # The outputs are the global batch (every process's rows, in process order): give
            # every process the matching inputs, so all compute the same metrics.
            batch = gather_host_batch(batch)
        valid = np.asarray(batch["valid"], bool)
        if max_images is not None:
            # The first max_images of the source, whichever process's shard they are in.
            valid &= np.asarray(batch["index"]) < max_images
        seen += int(valid.sum())
        host = {k: (np.asarray(v)[valid] if not isinstance(v, list)
                    else [x for x, ok in zip(v, valid) if ok]) for k, v in batch.items()}
        outputs = {k: (v[valid] if np.ndim(v) and len(v) == len(valid) else v)
                   for k, v in out.items()}
        outputs["num_valid"] = int(valid.sum())
        yield host, outputs


@dataclass
class Collected:
    """What one pass of the model over a source leaves for scoring, per image in source order:
    PanNuke-layout predictions and truth (N, H, W, C + 1), tissue names and ids, keys, tissue
    probabilities; sampled pixel scores for the PR curves; a few overlay examples; the mean
    loss and Dice of the eval step; device and post-processing seconds."""

    pred_masks: np.ndarray
    true_masks: np.ndarray
    types: list
    keys: list
    tissue_true: list
    tissue_prob: list
    pr_scores: list = field(default_factory=list)
    pr_labels: list = field(default_factory=list)
    examples: list = field(default_factory=list)
    rebuilt: np.ndarray | None = None
    loss: float = 0.0
    dice: float = 0.0
    timings: dict = field(default_factory=dict)


def _mask_arrays(shape: tuple[int, ...], out_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(pred, true) PanNuke-layout arrays: memory maps under ``out_dir`` (renamed into place by
    ``_finish_masks``), else in memory."""
    if out_dir is None:
        return np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    (out_dir / "true").mkdir(parents=True, exist_ok=True)
    return (np.lib.format.open_memmap(out_dir / ".masks.npy.partial", "w+", np.int32, shape),
            np.lib.format.open_memmap(out_dir / "true" / ".masks.npy.partial", "w+", np.int32,
                                      shape))


def collect(cfg, variables: dict, source, *, mesh=None, max_images: int | None = None,
            out_dir: Path | None = None, workers: int = 0, protocol: str = "official",
            keep_examples: int = 0, eval_fn=None) -> Collected:
    """Run the model over ``source``: post-processing on ``workers`` host processes while the
    device computes the next batch; ``protocol='tsfd'`` also rebuilds the truth the authors'
    way (docs/evaluation.md)."""
    if protocol not in ("official", "tsfd"):
        raise ValueError(f"unknown evaluation protocol {protocol!r} (official | tsfd)")
    tissue_names = tuple(cfg.data.tissue_names)
    num_classes = len(cfg.data.label_names) - 1
    n_total = len(source) if max_images is None else min(len(source), max_images)
    size = int(cfg.data.image_size)
    shape = (n_total, size, size, num_classes + 1)
    pred_masks, true_masks = _mask_arrays(shape, out_dir)
    out = Collected(pred_masks, true_masks, *([None] * n_total for _ in range(4)),
                    rebuilt=np.zeros(shape, np.int32) if protocol == "tsfd" else None,
                    timings={"device_s": 0.0, "postprocess_s": 0.0})
    rng = np.random.default_rng(0)
    pending: deque = deque()  # (host batch, device outputs) awaiting their post-processing

    def probabilities():
        t = time.perf_counter()
        for host, dev in predict_batches(cfg, variables, source, mesh=mesh,
                                         max_images=max_images, eval_fn=eval_fn):
            out.timings["device_s"] += time.perf_counter() - t
            out.loss += float(dev["loss"]) * dev["num_valid"]
            out.dice += float(dev["dice"]) * dev["num_valid"]
            pending.append((host, dev))
            yield dev["seg_prob"], dev["boundary_prob"]
            t = time.perf_counter()

    n = 0
    t_pp = time.perf_counter()
    for results in postprocess_stream(probabilities(), cfg.postprocess, workers):
        host, dev = pending.popleft()
        for j, inst in enumerate(results):
            # Images go to their source position: under several processes they arrive
            # interleaved (each process's shard in turn).
            k = int(host["index"][j])
            out.pred_masks[k] = to_pannuke_layout(inst.inst, inst.classes, num_classes)
            out.true_masks[k] = to_pannuke_masks(host["inst"][j], host["cls"][j], num_classes)
            if out.rebuilt is not None:
                gt = rebuild_tsfd_ground_truth(
                    host["inst"][j], host["cls"][j], cfg.postprocess, num_classes=num_classes,
                    frame_width=int(cfg.targets.frame_width))
                out.rebuilt[k] = to_pannuke_layout(gt.inst, gt.classes, num_classes)
            tissue = int(host["tissue"][j])
            out.types[k] = tissue_names[tissue] if tissue < len(tissue_names) else str(tissue)
            out.keys[k] = host["key"][j] if "key" in host else str(k)
            out.tissue_true[k] = tissue
            if "tissue_prob" in dev:
                out.tissue_prob[k] = dev["tissue_prob"][j]
            if len(out.examples) < keep_examples:
                out.examples.append({"image": np.asarray(host["image"][j]),
                                     "true": out.true_masks[k].copy(),
                                     "pred": out.pred_masks[k].copy(),
                                     "seg_prob": np.array(dev["seg_prob"][j]),
                                     "boundary_prob": np.array(dev["boundary_prob"][j])})
            flat_p = dev["seg_prob"][j].reshape(-1, num_classes + 1)
            pick = rng.choice(len(flat_p), min(PR_PIXELS_PER_IMAGE, len(flat_p)), replace=False)
            out.pr_scores.append(flat_p[pick])
            out.pr_labels.append(np.asarray(host["cls"][j]).reshape(-1)[pick])
            n += 1
    out.timings["postprocess_s"] = time.perf_counter() - t_pp - out.timings["device_s"]
    if n != n_total:
        raise RuntimeError(f"evaluated {n} images, expected {n_total}")
    out.loss, out.dice = out.loss / max(n, 1), out.dice / max(n, 1)
    return out


def score(cfg, c: Collected, with_report: bool = True) -> dict[str, Any]:
    """Every metric of the collected predictions: a flat dict of scalars (mPQ, bPQ, det_F1,
    tissue_accuracy, loss, dice, ...), with ``with_report`` the nested report as well."""
    class_names = tuple(cfg.data.label_names)[1:]
    tissue_names = tuple(cfg.data.tissue_names)
    num_classes, n = len(class_names), len(c.keys)
    match_iou = float(cfg.eval.match_iou)
    t = time.perf_counter()
    types = np.asarray(c.types, dtype=str)
    # Without tissue labels (CoNSeP, image folders) every image is one tissue, "all".
    pq_types, pq_tissues = (types, tissue_names) if tissue_names else (None, None)
    pq = pannuke_pq(c.true_masks, c.pred_masks, pq_types, class_names=class_names,
                    tissue_names=pq_tissues, match_iou=match_iou)
    det = detection_stats([instances_from_pannuke(m) for m in c.true_masks],
                          [instances_from_pannuke(m) for m in c.pred_masks],
                          radius=float(cfg.eval.detection_radius), num_classes=num_classes,
                          class_names=class_names)
    c.timings["metrics_s"] = time.perf_counter() - t
    flat: dict[str, Any] = {"images": n, "mPQ": pq["mPQ"], "bPQ": pq["bPQ"], "loss": c.loss,
                            "dice": c.dice, "det_F1": det["F1d"]}
    tissue = None
    if n and c.tissue_prob[0] is not None:
        tissue = tissue_stats(np.asarray(c.tissue_true), np.stack(c.tissue_prob).argmax(-1),
                              tissue_names)
        flat["tissue_accuracy"] = tissue["accuracy"]
    pq_tsfd = None
    if c.rebuilt is not None:
        pq_tsfd = pannuke_pq(c.rebuilt, c.pred_masks, pq_types, class_names=class_names,
                             tissue_names=pq_tissues, match_iou=match_iou)
        flat["mPQ_tsfd_protocol"], flat["bPQ_tsfd_protocol"] = pq_tsfd["mPQ"], pq_tsfd["bPQ"]
    if not with_report:
        return flat
    report = {"summary": flat, "pq": pq, "detection": det, "tissue": tissue,
              "timings": {**c.timings, "images_per_s": n / max(sum(c.timings.values()), 1e-9)},
              "keys": c.keys, "examples": c.examples,
              "pr": {"scores": np.concatenate(c.pr_scores) if c.pr_scores else np.zeros((0,)),
                     "labels": np.concatenate(c.pr_labels) if c.pr_labels else np.zeros((0,))},
              "class_names": list(class_names), "tissue_names": list(tissue_names)}
    if pq_tsfd is not None:
        report["pq_tsfd_protocol"] = pq_tsfd
    return report


def evaluate_source(cfg, variables: dict, source, *, mesh=None, max_images: int | None = None,
                    with_report: bool = True, out_dir: str | Path | None = None,
                    workers: int | None = None, protocol: str = "official",
                    eval_fn=None) -> dict[str, Any]:
    """Run the model over ``source`` and compute every metric (``collect`` -> ``score``).

    Returns a flat dict of scalars (mPQ, bPQ, det_F1, tissue_accuracy, loss, dice, ...); with
    ``with_report`` also the nested report (per class, per tissue, confusion matrix, timings).
    With ``out_dir`` the predictions are written there as PanNuke-layout ``masks.npy`` (int32)
    plus ``types.npy``, and the ground truth as ``true/masks.npy`` + ``true/types.npy``.
    """
    out_dir = None if out_dir is None else Path(out_dir)
    workers = int(cfg.data.num_workers) if workers is None else workers
    collected = collect(cfg, variables, source, mesh=mesh, max_images=max_images,
                        out_dir=out_dir, workers=workers, protocol=protocol,
                        keep_examples=OVERLAY_EXAMPLES if with_report else 0, eval_fn=eval_fn)
    result = score(cfg, collected, with_report)
    if out_dir is not None:
        _finish_masks(out_dir, collected.pred_masks, collected.true_masks,
                      np.asarray(collected.types, dtype=str))
    return result


def _finish_masks(out_dir: Path, pred, true, types) -> None:
    for arr in (pred, true):
        if isinstance(arr, np.memmap):
            arr.flush()
    os.replace(out_dir / ".masks.npy.partial", out_dir / "masks.npy")
    os.replace(out_dir / "true" / ".masks.npy.partial", out_dir / "true" / "masks.npy")
    for folder in (out_dir, out_dir / "true"):
        atomic.save_npy(folder / "types.npy", types)
