"""Post-processing tuned on the validation split, stored in the workdir (docs/learning.md).

The model runs once over the validation images; the post-processing settings are then searched
on those probabilities for the config's metric (``eval.tune_metric``, else ``best_metric`` without
``val_``: mPQ or bPQ),
as StarDist optimises its thresholds on held-back images. The search is a coordinate descent per
post-processing method over ``GRID`` (each setting in turn takes its best value while the others
stay, two sweeps), started from the config's values; the settings named in ``eval.tune_fixed``
keep them. The result goes to
``<workdir>/postprocess.json``; ``evaluate`` and ``predict`` use it unless told not to
(``--untuned``) and ``--config.postprocess.*`` overrides it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tsfd_jax import atomic
from tsfd_jax.errors import UserError
from tsfd_jax.data.pannuke import to_pannuke_masks
from tsfd_jax.evaluate import predict_batches
from tsfd_jax.forward import TTA_MODES
from tsfd_jax.metrics.pq import pannuke_pq
from tsfd_jax.postprocess import PostprocessParams, to_pannuke_layout
from tsfd_jax.postprocess_params import METHODS
from tsfd_jax.postprocess_workers import make_executor, postprocess_batch, spill_arrays

TUNED_FILE = "postprocess.json"
DATA_KEYS = ("seg", "boundary", "truth", "tissue")  # what ``collect`` returns
# Values searched per setting. Settings a method does not use are not searched for it.
GRID: dict[str, tuple] = {
    "seg_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    "boundary_threshold": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    "min_size": (4, 8, 12, 16, 22, 32, 48, 64, 96, 128),
    "closing_size": (1, 3),
    "erosion_size": (1, 3),
    "dilation_size": (1, 3, 5),
    "vote": ("component", "nucleus"),
    "split_depth": (0.0, 1.0, 2.0, 3.0, 4.0),
    "max_growth": (0.0, 2.0, 3.0, 4.0, 6.0, 8.0),
    "orphan_size": (0, 32, 48, 64, 96, 128),
    "basin_depth": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
}
USED_BY = {"paper": ("seg_threshold", "boundary_threshold", "min_size", "closing_size",
                     "erosion_size", "dilation_size", "vote"),
           "markers": ("seg_threshold", "boundary_threshold", "min_size", "split_depth",
                       "basin_depth", "max_growth", "orphan_size")}
SWEEPS = 2


TUNABLE_METRICS = ("mPQ", "bPQ")


def tuned_metric(cfg) -> str:
    """``eval.tune_metric`` if set (checked), else ``best_metric`` when it names mPQ or bPQ,
    else mPQ."""
    chosen = str(cfg.get("eval", {}).get("tune_metric", "") or "")
    if chosen:
        if chosen not in TUNABLE_METRICS:
            raise UserError(f"eval.tune_metric: {chosen!r} must be one of "
                            f"{', '.join(TUNABLE_METRICS)} (or empty: the config's best_metric)")
        return chosen
    name = str(cfg.best_metric or "").removeprefix("val_")
    return name if name in TUNABLE_METRICS else "mPQ"


def tuned_methods(cfg) -> tuple[str, ...]:
    """The post-processing methods searched (``eval.tune_methods``), checked."""
    methods = tuple(cfg.eval.tune_methods)
    if not methods or any(m not in METHODS for m in methods):
        raise UserError(f"eval.tune_methods: {list(methods)} must name some of "
                        f"{', '.join(METHODS)}")
    return methods


def fixed_settings(cfg) -> tuple[str, ...]:
    """The settings the search leaves at the config's value (``eval.tune_fixed``), checked."""
    fixed = tuple(cfg.eval.get("tune_fixed", ()))
    unknown = [k for k in fixed if k not in GRID]
    if unknown:
        raise UserError(f"eval.tune_fixed: {unknown} are not searched settings "
                        f"({', '.join(GRID)})")
    return fixed


def collect(cfg, variables: dict, source, max_images: int | None = None) -> dict:
    """Probabilities, PanNuke-layout truth and tissue of every image of ``source``."""
    seg, bdr, truth, tissue = [], [], [], []
    num_classes = len(cfg.data.label_names) - 1
    for host, out in predict_batches(cfg, variables, source, max_images=max_images):
        seg.append(out["seg_prob"])
        bdr.append(out["boundary_prob"])
        tissue.extend(int(t) for t in host["tissue"])
        truth.extend(to_pannuke_masks(i, c, num_classes) for i, c in zip(host["inst"], host["cls"]))
    return {"seg": np.concatenate(seg), "boundary": np.concatenate(bdr),
            "truth": np.stack(truth), "tissue": np.asarray(tissue)}


def _scoring(cfg) -> tuple[tuple[str, ...], tuple[str, ...], float]:
    """What scoring needs of the config, as plain values a worker process can take."""
    return (tuple(cfg.data.label_names)[1:], tuple(cfg.data.tissue_names),
            float(cfg.eval.match_iou))


def _pq(data: dict, results: list, class_names, tissue_names, match_iou) -> dict:
    pred = np.stack([to_pannuke_layout(r.inst, r.classes, len(class_names)) for r in results])
    types = None
    if tissue_names:
        types = np.asarray([tissue_names[t] if t < len(tissue_names) else str(t)
                            for t in data["tissue"]])
    pq = pannuke_pq(data["truth"], pred, types, class_names=class_names,
                    tissue_names=tissue_names or None, match_iou=match_iou)
    return {"mPQ": float(pq["mPQ"]), "bPQ": float(pq["bPQ"])}


def _score(data: dict, params: PostprocessParams, scoring: tuple, workers: int = 0) -> dict:
    results = postprocess_batch(data["seg"], data["boundary"], params, workers)
    return _pq(data, results, *scoring)


def score(cfg, data: dict, params: PostprocessParams, workers: int = 0) -> dict:
    """mPQ and bPQ of ``params`` on collected probabilities (the evaluation's averaging)."""
    return _score(data, params, _scoring(cfg), workers)


def _score_spilled(folder: str, params: PostprocessParams, scoring: tuple) -> dict:
    data = {k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r") for k in DATA_KEYS}
    return _score(data, params, scoring)


class _CandidatePool:
    """Scores many settings at once, one whole candidate per worker process: the data is
    spilled once (``spill_arrays``), each worker post-processes and scores every image."""

    def __init__(self, cfg, data: dict, workers: int):
        self.scoring = _scoring(cfg)
        self.folder = spill_arrays({k: data[k] for k in DATA_KEYS})
        self.pool = make_executor(workers)

    def map(self, candidates: list[PostprocessParams]) -> list[dict]:
        futures = [self.pool.submit(_score_spilled, self.folder, p, self.scoring)
                   for p in candidates]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def default_workers() -> int:
    """Processes for tuning: every core (the device is idle by then), none on one core."""
    n = os.cpu_count() or 1
    return 0 if n < 2 else min(n, max(len(v) for v in GRID.values()))


def search(cfg, data: dict, metric: str, workers: int = 0,
           methods: tuple[str, ...] = METHODS) -> tuple[PostprocessParams, dict, dict]:
    """(best params, their scores, the config's own scores) by coordinate descent; the settings
    of ``eval.tune_fixed`` keep the config's values.

    With ``workers`` > 0 the values of one setting are scored side by side in that many
    processes; the choice is the same as scoring them one after the other (each candidate of
    a setting differs from the current settings in that setting only, so all of them are known
    before the sweep over it starts).
    """
    start = PostprocessParams.of(cfg.postprocess)
    fixed = fixed_settings(cfg)
    cache: dict[PostprocessParams, dict] = {}
    pool = _CandidatePool(cfg, data, workers) if workers > 0 else None

    def prefetch(candidates: list[PostprocessParams]) -> None:
        missing = [p for p in dict.fromkeys(candidates) if p not in cache]
        if pool is not None and missing:
            cache.update(zip(missing, pool.map(missing)))

    def value(p: PostprocessParams) -> float:
        if p not in cache:
            cache[p] = score(cfg, data, p)
        v = cache[p][metric]
        return -1.0 if np.isnan(v) else v

    try:
        best = start
        prefetch([start])
        value(start)
        for method in methods:
            current = dataclasses.replace(start, method=method)
            for _ in range(SWEEPS):
                for key in (k for k in USED_BY[method] if k not in fixed):
                    candidates = [dataclasses.replace(current, **{key: v}) for v in GRID[key]]
                    # one way of splitting cores at a time (PostprocessParams.splits_once)
                    candidates = [p for p in candidates if p.splits_once()]
                    prefetch([current] + candidates)
                    for candidate in candidates:
                        if value(candidate) > value(current):
                            current = candidate
            if value(current) > value(best):
                best = current
    finally:
        if pool is not None:
            pool.close()
    return best, cache[best], cache[start]


def save_tuned(workdir: Path, result: dict) -> Path:
    path = Path(workdir) / TUNED_FILE
    atomic.write_json(path, result, indent=2)
    return path


def load_tuned(workdir: str | Path) -> dict[str, Any] | None:
    """The tuned settings of a workdir, or None if it was never tuned: ``{"postprocess":
    {...}, "tta": mode}``, ``tta`` the test-time augmentation the probabilities were tuned
    under ("none" in files written before it was recorded)."""
    path = Path(workdir) / TUNED_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        params = record["postprocess"]
        PostprocessParams.of(params)
        tta = str(record.get("tta", "none"))
        if tta not in TTA_MODES:
            raise ValueError(f"unknown tta {tta!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a tuned post-processing file ({e})") from None
    return {"postprocess": params, "tta": tta}
