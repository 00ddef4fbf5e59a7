"""Evaluation speed: PanNuke PQ (ours vs the official per-instance algorithm) and post-processing.

Synthetic PanNuke-layout masks (256 px discs, about 25 nuclei per image over 5 classes, some
touching, some cut by the border) as ground truth and a perturbed copy (shifted, dropped, added,
class-flipped, grown or shrunk nuclei) as prediction.

- PQ: ``tsfd_jax.metrics.pq.pannuke_pq`` on all images against tests/pannuke_reference.py (the
  official run.py/utils.py algorithm with its per-instance loops) on ``--ref-images`` of them,
  per-image times compared; both must agree to 1e-9 on the common images.
- Post-processing: ``postprocess_batch`` on softmax/boundary maps made from the ground truth
  (noisy logits), images/s with 0 and 2 worker processes (pool start-up timed separately).

  python experiments/bench_eval.py --out bench_eval.json

Prints a table and writes the numbers plus the machine (CPU count, platform, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SIZE = 256
C = 5
TISSUES = ("Breast", "Colon", "Lung", "Kidney")


def make_truth(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 256, 256, 6) float64 masks of discs (later discs fill only empty pixels)."""
    masks = np.zeros((n, SIZE, SIZE, C + 1))
    for i in range(n):
        inst = np.zeros((SIZE, SIZE), np.int32)
        cls = np.zeros((SIZE, SIZE), np.int8)
        for k in range(1, rng.poisson(25) + 1):
            r = rng.uniform(4, 12)
            cy, cx = rng.uniform(-r / 2, SIZE + r / 2, 2)
            y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, SIZE)
            x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, SIZE)
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst[y0:y1, x0:x1] == 0)
            inst[y0:y1, x0:x1][disc] = k
            cls[y0:y1, x0:x1][disc] = rng.integers(0, C)
        for c in range(C):
            masks[i, ..., c] = np.where((cls == c) & (inst > 0), inst, 0)
    masks[..., C] = masks[..., :C].sum(-1) == 0
    return masks


def make_prediction(rng: np.random.Generator, true: np.ndarray) -> np.ndarray:
    import scipy.ndimage as ndi

    pred = np.zeros_like(true)
    for i in range(len(true)):
        for c in range(C):
            ch = true[i, ..., c]
            ids = np.unique(ch)[1:]
            drop = ids[rng.random(len(ids)) < 0.1]
            ch = np.where(np.isin(ch, drop), 0, ch)
            ch = np.roll(ch, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
            ch = ndi.grey_dilation(ch, size=3) if rng.random() < 0.5 else np.where(
                ndi.grey_erosion(ch, size=3) == ch, ch, 0)
            flip = np.isin(ch, ids[rng.random(len(ids)) < 0.1])
            target = (c + 1) % C
            pred[i, ..., target] = np.where(flip, ch + 10000, pred[i, ..., target])
            pred[i, ..., c] = np.where(flip, pred[i, ..., c], np.maximum(pred[i, ..., c], ch))
        for _ in range(rng.integers(0, 4)):  # false positives
            y, x = rng.integers(8, SIZE - 8, 2)
            pred[i, y - 4:y + 4, x - 4:x + 4, rng.integers(0, C)] = 20000 + rng.integers(1000)
    pred[..., C] = pred[..., :C].sum(-1) == 0
    return pred


def probabilities(rng: np.random.Generator, true: np.ndarray):
    """Noisy softmax and boundary probabilities whose argmax is the ground truth."""
    from skimage.segmentation import find_boundaries

    from tsfd_jax.metrics.pq import binarize

    n = len(true)
    seg = np.zeros((n, SIZE, SIZE, C + 1), np.float32)
    bdr = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        label = np.where(true[i, ..., C] > 0, 0, np.argmax(true[i, ..., :C] > 0, -1) + 1)
        noise = rng.normal(0, 0.8, (SIZE, SIZE, C + 1))
        logits = np.eye(C + 1, dtype=np.float32)[label] * 4 + noise
        e = np.exp(logits - logits.max(-1, keepdims=True))
        seg[i] = e / e.sum(-1, keepdims=True)
        thick = find_boundaries(binarize(true[i, ..., :C]), connectivity=1, mode="thick")
        bdr[i] = np.clip(thick * 0.9 + rng.normal(0, 0.15, (SIZE, SIZE)), 0, 1)
    return seg, bdr


def bench_pq(true, pred, types, ref_images: int) -> dict:
    from pannuke_reference import ref_pannuke_pq

    from tsfd_jax.constants import PANNUKE_CLASSES
    from tsfd_jax.metrics.pq import pannuke_pq

    t0 = time.perf_counter()
    ours = pannuke_pq(true, pred, types, tissue_names=TISSUES)
    t_ours = time.perf_counter() - t0
    m = min(ref_images, len(true))
    t0 = time.perf_counter()
    ref = ref_pannuke_pq(true[:m], pred[:m], types[:m], PANNUKE_CLASSES, TISSUES)
    t_ref = time.perf_counter() - t0
    sub = pannuke_pq(true[:m], pred[:m], types[:m], tissue_names=TISSUES)
    diff = max(abs(sub[k] - ref[k]) for k in ("mPQ", "bPQ", "mDQ", "mSQ", "bDQ", "bSQ"))
    per_ours, per_ref = t_ours / len(true), t_ref / m
    return {"images": len(true), "ours_s": t_ours, "ours_ms_per_image": 1e3 * per_ours,
            "reference_images": m, "reference_s": t_ref, "reference_ms_per_image": 1e3 * per_ref,
            "speedup": per_ref / per_ours, "max_abs_diff": float(diff),
            "mPQ": ours["mPQ"], "bPQ": ours["bPQ"]}


def bench_postprocess(seg, bdr, workers: int) -> dict:
    from tsfd_jax.postprocess_workers import make_executor, postprocess_batch

    t0 = time.perf_counter()
    pool = make_executor(workers)
    if pool is not None:  # start the workers (imports included) before timing
        postprocess_batch(seg[:workers], bdr[:workers], None, workers, executor=pool)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = postprocess_batch(seg, bdr, None, workers=workers, executor=pool)
    elapsed = time.perf_counter() - t0
    if pool is not None:
        pool.shutdown()
    return {"workers": workers, "images": len(seg), "seconds": elapsed, "startup_s": startup,
            "images_per_s": len(seg) / elapsed,
            "instances_per_image": float(np.mean([o.num_instances for o in out]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="images for our PQ")
    ap.add_argument("--ref-images", type=int, default=100,
                    help="images for the (slow) official algorithm; per-image times compared")
    ap.add_argument("--pp-images", type=int, default=200, help="images for post-processing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the numbers as JSON")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    true = make_truth(rng, args.images)
    pred = make_prediction(rng, true)
    types = np.asarray(TISSUES)[rng.integers(0, len(TISSUES), args.images)]
    seg, bdr = probabilities(rng, true[: args.pp_images])
    print(f"data: {args.images} images, {time.perf_counter() - t0:.1f} s to make")

    pq = bench_pq(true, pred, types, args.ref_images)
    pp = [bench_postprocess(seg, bdr, w) for w in (0, 2)]

    print(f"\n{'PQ (PanNuke protocol)':<34}{'images':>8}{'ms/image':>11}")
    print(f"{'  tsfd_jax.metrics.pq':<34}{pq['images']:>8}{pq['ours_ms_per_image']:>11.2f}")
    print(f"{'  official algorithm (reference)':<34}{pq['reference_images']:>8}"
          f"{pq['reference_ms_per_image']:>11.2f}")
    print(f"  speed-up {pq['speedup']:.1f}x; max |difference| {pq['max_abs_diff']:.1e}; "
          f"mPQ {pq['mPQ']:.4f}, bPQ {pq['bPQ']:.4f}")
    print(f"\n{'post-processing':<34}{'images':>8}{'images/s':>11}{'start-up s':>12}")
    for r in pp:
        print(f"{'  workers=' + str(r['workers']):<34}{r['images']:>8}{r['images_per_s']:>11.1f}"
              f"{r['startup_s']:>12.2f}")
    result = {"pq": pq, "postprocess": pp,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(),
                          "date": datetime.datetime.now().isoformat(timespec="seconds")}}
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)
        print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
