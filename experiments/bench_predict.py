"""Inference speed end to end: model + post-processing + stitching, per tile and per image area.

Rows:
- ``demo`` and ``default`` (the paper model, 512 input): ``predict_image`` with the jitted
  model (random weights; the weights do not change the cost of the network, only how many
  nuclei post-processing and stitching meet) on a synthetic H&E mosaic of ``--demo-size`` /
  ``--full-size`` pixels, tiles of the config's label size (128 / 256) with the default overlap.
- ``host``: the same pipeline with a numpy threshold "model" on a ``--host-size`` mosaic (real
  nuclei counts), i.e. the host-side cost (tile reading, post-processing, stitching) alone.

Times: ``compile_s`` (first call), then one timed run split into model (the ``predict_fn``
calls, synchronised), stitching (``Stitcher.add_tile``) and the rest (post-processing, tile
reading, the final renumbering pass). ``ms_per_tile`` = wall / tiles; ``ms_per_256px`` = wall
per 256 x 256 pixels of image (tiles overlap, so this is the number to compare with other tools).

  python experiments/bench_predict.py --out bench_predict.json
  python experiments/bench_predict.py --configs demo --demo-size 1024 --out bench_predict.json
  python experiments/bench_predict.py --configs consep --tta none,flips --host-size 0

Prints a table and writes the numbers plus the machine (CPU count, platform, JAX devices, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mosaic(size: int, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8 of synthetic 256 px H&E patches, rotated at random."""
    from tsfd_jax.data import synthetic

    n = -(-size // 256)
    patches, _, _ = synthetic.generate(min(n * n, 12), seed, 256)
    rng = np.random.default_rng(seed)
    out = np.zeros((n * 256, n * 256, 3), np.uint8)
    for r in range(n):
        for c in range(n):
            p = patches[rng.integers(len(patches))].astype(np.uint8)
            out[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = np.rot90(p, rng.integers(4))
    return np.ascontiguousarray(out[:size, :size])


def random_variables(cfg) -> dict:
    """Random variables of the config's model from shapes only (no compiled init)."""
    import jax
    import jax.numpy as jnp

    from tsfd_jax.models.tsfd import build_model
    from tsfd_jax.models.tsfd import input_shape

    model = build_model(cfg)
    shapes = jax.eval_shape(lambda k: model.init({"params": k, "dropout": k},
                                                 jnp.zeros(input_shape(cfg)), train=False),
                            jax.random.key(0))
    rng = np.random.default_rng(0)

    def fill(path, s):
        name = getattr(path[-1], "key", "")
        if name in ("var", "scale"):
            return np.ones(s.shape, s.dtype)
        if name in ("mean", "bias"):
            return np.zeros(s.shape, s.dtype)
        fan_in = max(int(np.prod(s.shape[:-1])), 1)
        return (rng.standard_normal(s.shape) * np.sqrt(1.0 / fan_in)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def threshold_fn(tiles: np.ndarray) -> dict:
    """A numpy stand-in for the network: dark pixels are nuclei (class from the blue channel)."""
    x = tiles.astype(np.float32)
    nucleus = x.mean(-1) < 150
    cls = np.clip(((x[..., 2] - 40) // 40).astype(int) + 1, 1, 5)
    seg = np.zeros(tiles.shape[:3] + (6,), np.float32)
    seg[..., 0] = ~nucleus
    for c in range(1, 6):
        seg[..., c] = nucleus & (cls == c)
    return {"seg_prob": seg, "boundary_prob": np.zeros(tiles.shape[:3], np.float32)}


def timed_run(name, image, fn, cfg, batch, workers, compile_s=None) -> dict:
    from tsfd_jax import predict as P

    t = {"model": 0.0, "stitch": 0.0}

    def model(tiles):
        t0 = time.perf_counter()
        out = fn(tiles)  # returns numpy: synchronised
        t["model"] += time.perf_counter() - t0
        return out

    add = P.Stitcher.add_tile

    def add_timed(self, *a, **k):
        t0 = time.perf_counter()
        add(self, *a, **k)
        t["stitch"] += time.perf_counter() - t0

    P.Stitcher.add_tile = add_timed
    try:
        t0 = time.perf_counter()
        pred = P.predict_image(image, model, cfg, batch_size=batch, workers=workers)
        wall = time.perf_counter() - t0
    finally:
        P.Stitcher.add_tile = add
    H, W = image.shape[:2]
    return {"row": name, "tile": pred.info["tile"], "overlap": pred.info["overlap"],
            "input": int(cfg.input.size) * pred.info["tile"] // int(cfg.data.image_size),
            "image_px": f"{H}x{W}", "tiles": pred.tiles, "nuclei": pred.num_instances,
            "batch": batch, "workers": workers, "compile_s": compile_s, "wall_s": wall,
            "model_s": t["model"], "stitch_s": t["stitch"],
            "other_s": wall - t["model"] - t["stitch"],
            "ms_per_tile": 1000 * wall / pred.tiles,
            "ms_per_256px": 1000 * wall / (H * W / 65536),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def model_row(config: str, size: int, batch: int, workers: int, tta: str = "none") -> dict:
    import importlib

    from tsfd_jax.predict import make_predict_fn

    cfg = importlib.import_module(f"configs.{config}").get_config()
    cfg.eval.tta = tta
    image = mosaic(size)
    fn = make_predict_fn(cfg, random_variables(cfg))
    tile = int(cfg.data.image_size)
    t0 = time.perf_counter()
    fn(np.zeros((batch, tile, tile, 3), np.uint8))
    compile_s = time.perf_counter() - t0
    name = config if tta == "none" else f"{config}+{tta}"
    return timed_run(name, image, fn, cfg, batch, workers, compile_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="demo,default", help="comma-separated config modules")
    ap.add_argument("--demo-size", type=int, default=512, help="image side for the demo model")
    ap.add_argument("--full-size", type=int, default=256, help="image side for the paper model")
    ap.add_argument("--host-size", type=int, default=2048,
                    help="image side for the host row (0 = off)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--full-batch", type=int, default=1, help="batch for the paper model")
    ap.add_argument("--workers", type=int, default=0, help="post-processing processes")
    ap.add_argument("--tta", default="none",
                    help="comma-separated test-time augmentations, a model row for each "
                         "(none, flips, dihedral)")
    ap.add_argument("--out", default="", help="write the numbers to this JSON file")
    args = ap.parse_args()

    import jax
    from configs import default

    rows = []
    if args.host_size:
        rows.append(timed_run("host", mosaic(args.host_size), threshold_fn, default.get_config(),
                              args.batch, args.workers))
    for config in [c for c in args.configs.split(",") if c]:
        full = config == "default"
        for tta in [t for t in args.tta.split(",") if t]:
            rows.append(model_row(config, args.full_size if full else args.demo_size,
                                  args.full_batch if full else args.batch, args.workers, tta))

    cols = ("row", "tile", "input", "image_px", "tiles", "nuclei", "batch", "compile_s", "model_s",
            "stitch_s", "other_s", "ms_per_tile", "ms_per_256px", "peak_rss_mb")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    if args.out:
        info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "cpus": os.cpu_count(), "platform": platform.platform(),
                "devices": [str(d) for d in jax.devices()], "args": vars(args), "rows": rows}
        Path(args.out).write_text(json.dumps(info, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
