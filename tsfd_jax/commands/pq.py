"""``python -m tsfd_jax pq --true DIR --pred DIR [--out report.json]``: PanNuke PQ, no model.

The official PanNuke-metrics ``run.py`` on two PanNuke-layout folders: ``--true DIR`` holds
masks.npy (N, H, W, C + 1) and types.npy (N,) tissue names, ``--pred DIR`` masks.npy. The
official layout (``DIR/true/masks.npy``, ``DIR/pred/masks.npy``) and an evaluate folder
(``masks.npy`` beside ``true/``) are found too. Prints per-tissue mPQ/bPQ, per-class PQ and the
overall numbers; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tsfd_jax.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--true", required=True,
                   help="folder with masks.npy + types.npy (or its parent)")
    p.add_argument("--pred", required=True, help="folder with masks.npy (or its parent)")
    p.add_argument("--types", default="", help="types.npy to use instead of the one in --true")
    p.add_argument("--out", default="", help="write the numbers to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--match-iou", type=float, default=0.5, help="IoU threshold (official: 0.5)")
    p.add_argument("--class-names", default="",
                   help="comma-separated class names (default: PanNuke's for 5 classes)")
    p.add_argument("--per-image", action="store_true", help="add per-image PQ to the JSON")


def _find(folder: str, sub: str, name: str) -> Path:
    base = Path(folder)
    if base.is_file():
        return base
    if not base.is_dir():
        raise UserError(f"{base}: no such folder")
    for candidate in (base / name, base / sub / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{base}: no {name} (looked in {base} and {base / sub})")


def _load(path: Path, mmap: bool):
    import numpy as np

    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{path}: not a plain numpy array ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_json(path: Path, data: dict) -> None:
    from tsfd_jax import atomic

    atomic.write_json(path, _jsonable(data), indent=2)


def format_table(res: dict) -> str:
    def f(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "   nan"
        return f"{v:.4f}"
    width = max([len(t) for t in res["tissue_mPQ"]] + [len(c) for c in res["class_PQ"]] + [8])
    lines = [f"{'tissue':<{width}}  {'images':>6}  {'mPQ':>6}  {'bPQ':>6}", "-" * (width + 26)]
    for t, v in res["tissue_mPQ"].items():
        lines.append(f"{t:<{width}}  {res['tissue_images'][t]:>6}  {f(v):>6}  "
                     f"{f(res['tissue_bPQ'][t]):>6}")
    lines += ["", f"{'class':<{width}}  {'PQ':>6}  {'DQ':>6}  {'SQ':>6}", "-" * (width + 26)]
    for c, v in res["class_PQ"].items():
        lines.append(f"{c:<{width}}  {f(v):>6}  {f(res['class_DQ'][c]):>6}  "
                     f"{f(res['class_SQ'][c]):>6}")
    lines += ["", f"{res['num_images']} images; averages over tissues:",
              f"  mPQ {f(res['mPQ'])}   bPQ {f(res['bPQ'])}",
              f"  mDQ {f(res['mDQ'])}   mSQ {f(res['mSQ'])}   bDQ {f(res['bDQ'])}   "
              f"bSQ {f(res['bSQ'])}"]
    if res.get("images_outside_tissues"):
        lines.append(f"  ({res['images_outside_tissues']} images of other tissues count for the "
                     "class PQ only)")
    return "\n".join(lines)


def run(args) -> int:
    from tsfd_jax.constants import PANNUKE_CLASSES, PANNUKE_TISSUES
    from tsfd_jax.metrics.pq import pannuke_pq

    true_path = _find(args.true, "true", "masks.npy")
    pred_path = _find(args.pred, "pred", "masks.npy")
    if args.types:
        types_path = Path(args.types)
        if not types_path.is_file():
            raise UserError(f"{types_path}: no such file")
    else:
        types_path = _find(str(true_path.parent), "true", "types.npy")
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.exists() and not args.overwrite:
            raise UserError(f"{out}: already exists; pass --overwrite or another --out")
        if not out.parent.is_dir():
            raise UserError(f"{out.parent}: no such folder")
    true, pred = _load(true_path, True), _load(pred_path, True)
    types = _load(types_path, False)
    for path, arr in ((true_path, true), (pred_path, pred)):
        if arr.ndim != 4 or arr.shape[-1] < 2:
            raise UserError(f"{path}: expected (N, H, W, C+1) masks; got shape {arr.shape}")
    if true.shape[:3] != pred.shape[:3] or true.shape[-1] != pred.shape[-1]:
        raise UserError(f"{pred_path}: shape {pred.shape} does not match {true_path} {true.shape}")
    if types.shape != (true.shape[0],) or types.dtype.kind not in "US":
        raise UserError(f"{types_path}: expected ({true.shape[0]},) tissue names; got "
                        f"{types.dtype} {types.shape}")
    types = types.astype(str)
    C = true.shape[-1] - 1
    if args.class_names:
        names = tuple(s.strip() for s in args.class_names.split(","))
        if len(names) != C:
            raise UserError(f"--class-names: {len(names)} names for {C} class channels")
    else:
        names = PANNUKE_CLASSES if C == len(PANNUKE_CLASSES) else tuple(
            f"class{c}" for c in range(1, C + 1))
    tissues = (PANNUKE_TISSUES if set(types.tolist()) <= set(PANNUKE_TISSUES)
               else tuple(sorted(set(types.tolist()))))
    if not 0.0 <= args.match_iou < 1.0:
        raise UserError(f"--match-iou: must lie in [0, 1); got {args.match_iou}")
    try:
        res = pannuke_pq(true, pred, types, class_names=names, tissue_names=tissues,
                         match_iou=args.match_iou, per_image=args.per_image)
    except ValueError as e:
        raise UserError(f"{true_path} / {pred_path}: {e}") from None
    print(format_table(res))
    if out is not None:
        res["inputs"] = {"true": str(true_path), "pred": str(pred_path), "types": str(types_path)}
        _write_json(out, res)
        print(f"written: {out}")
    return 0
