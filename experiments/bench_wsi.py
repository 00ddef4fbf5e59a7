"""Whole-slide inference: tiles/s and peak memory against slide size.

For every ``--sizes`` N a synthetic N x N slide (pyramidal JPEG TIFF, 0.25 um/px, tissue
islands of real CoNSeP H&E tiles on white glass, ``--tissue`` of the 256-px cells;
experiments/wsi_slides.py) is written once into ``--slides`` (kept for the next run), then a
fresh Python process runs ``slides.predict_slide`` on it and reports:

* ``rss_model_mb``: peak RSS (``getrusage``) with the model compiled, before the slide;
* ``peak_rss_mb``: peak RSS of the whole process at the end (the number that must not grow with
  the slide: target 40k^2 within 1.5x of 10k^2);
* ``tiles_per_s`` over the tiles that ran (tissue only), ``detect_s`` (tissue mask), ``wall_s``.

Models (``--model``): ``tiny`` = configs/tiny.py's network with random weights whose output heads
are amplified so the noise crosses the thresholds and post-processing meets 'nuclei' (a real
jitted network at a tenth of the paper's width: the memory is the point, not the quality);
``threshold`` = bench_predict's numpy stand-in (dark pixels are nuclei: real nuclei counts, no
JAX cost). One process per size, so each peak is that size's own.

  python experiments/bench_wsi.py --sizes 10000,20000,40000 --out bench_wsi.json
  python experiments/bench_wsi.py --sizes 5000 --model tiny --tile 128

Prints a table and writes the rows plus the machine (CPU count, platform, date) with ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONSEP = ROOT.parent / "shared" / "data" / "consep" / "train"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def make_slide(path: Path, size: int, tissue: float, seed: int = 0) -> dict:
    from experiments.wsi_slides import consep_tiles, tissue_grid_block, write_pyramid

    t0 = time.perf_counter()
    tiles = consep_tiles(CONSEP, 64, seed)
    block = tissue_grid_block(tiles, size, size, tissue, seed)
    levels = 1
    while size / 2 ** levels >= 1024:
        levels += 1
    tmp = path.with_name(f".{path.name}.tmp")
    write_pyramid(tmp, size, size, block, 0.25, levels=levels, style="tags", compression="jpeg")
    os.replace(tmp, path)
    return {"write_s": time.perf_counter() - t0, "levels": levels,
            "slide_mb": path.stat().st_size / 2 ** 20,
            "tissue_cells": float(block.tissue_cells.mean())}


def tiny_predict_fn(tile: int):
    """configs/tiny.py's network, random weights, output heads x 1000 (module doc)."""
    import jax

    from configs import tiny
    from experiments.bench_predict import random_variables
    from tsfd_jax.predict import make_predict_fn

    cfg = tiny.get_config()
    variables = random_variables(cfg)

    def amplify(path, v):
        names = [getattr(k, "key", "") for k in path]
        heads = any(n in ("seg_head", "boundary_head") for n in names)
        return v * 1000.0 if heads and names[-1] == "kernel" else v

    variables = jax.tree_util.tree_map_with_path(amplify, variables)
    return cfg, make_predict_fn(cfg, variables, tile)


def worker(args) -> dict:
    """One slide in this process (fresh: its peak RSS is this slide's)."""
    from tsfd_jax import slides as S

    if args.model == "tiny":
        cfg, fn = tiny_predict_fn(args.tile)
        t0 = time.perf_counter()
        fn(np.zeros((args.batch, args.tile, args.tile, 3), np.uint8))
        compile_s = time.perf_counter() - t0
    else:
        from configs import default
        from experiments.bench_predict import threshold_fn

        cfg, fn, compile_s = default.get_config(), threshold_fn, 0.0
    rss_model = peak_rss_mb()
    out = Path(tempfile.mkdtemp(prefix="bench-wsi-", dir=args.scratch))
    with S.Slide(args.slide) as slide:
        t0 = time.perf_counter()
        tissue = S.detect_tissue(slide, 0.25)
        detect_s = time.perf_counter() - t0
        plan = S.plan_slide(slide, 0.25, None, None, cfg)
        t0 = time.perf_counter()
        summary = S.predict_slide(slide, fn, cfg, out, "bench", plan=plan, tissue=tissue,
                                  job={"bench": str(args.slide)}, tile=args.tile,
                                  batch_size=args.batch, workers=args.workers)
        wall = time.perf_counter() - t0
    geojson_mb = (out / "bench_nuclei.geojson").stat().st_size / 2 ** 20
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    return {"model": args.model, "tile": args.tile, "batch": args.batch, "workers": args.workers,
            "compile_s": compile_s, "rss_model_mb": rss_model, "detect_s": detect_s,
            "wall_s": wall, "tiles_run": summary["tiles"]["run"],
            "tiles_grid": summary["tiles"]["grid"],
            "tiles_per_s": summary["tiles"]["run"] / wall, "nuclei": summary["nuclei"]["total"],
            "tissue_mm2": summary["tissue"]["area_mm2"], "geojson_mb": geojson_mb,
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,20000,40000", help="slide sides in pixels")
    ap.add_argument("--tissue", type=float, default=0.3, help="fraction of 256-px tissue cells")
    ap.add_argument("--model", choices=("tiny", "threshold"), default="tiny")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--slides", default=str(ROOT / "runs" / "bench_wsi"),
                    help="folder of the synthetic slides (made once, reused)")
    ap.add_argument("--scratch", default=None, help="where the outputs go (deleted after)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--slide", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    folder = Path(args.slides)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        path = folder / f"slide_{size}_t{args.tissue:g}.tif"
        made = make_slide(path, size, args.tissue) if not path.exists() else {}
        cmd = [sys.executable, __file__, "--worker", "--slide", str(path), "--model", args.model,
               "--tile", str(args.tile), "--batch", str(args.batch),
               "--workers", str(args.workers)] + (["--scratch", args.scratch]
                                                  if args.scratch else [])
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS",
                                                                             "cpu")))
        if r.returncode:
            sys.exit(f"worker failed for {size}:\n{r.stderr[-3000:]}")
        row = {"size": size, "tissue": args.tissue, **made,
               **json.loads(r.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{size:>6}^2: {row['tiles_run']:>6} of {row['tiles_grid']} tiles "
              f"{row['tiles_per_s']:6.1f} tiles/s, {row['nuclei']} nuclei, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB (model loaded {row['rss_model_mb']:.0f} MB)",
              flush=True)
    base = rows[0]["peak_rss_mb"]
    print(f"\n| slide | tiles run / grid | tiles/s | nuclei | tissue mm^2 | peak RSS MB "
          f"| vs {rows[0]['size']}^2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}^2 | {r['tiles_run']} / {r['tiles_grid']} | {r['tiles_per_s']:.1f} "
              f"| {r['nuclei']} | {r['tissue_mm2']:.1f} | {r['peak_rss_mb']:.0f} "
              f"| {r['peak_rss_mb'] / base:.2f}x |")
    if args.out:
        import jax

        machine = {"cpus": os.cpu_count(), "platform": platform.platform(),
                   "python": platform.python_version(), "jax": jax.__version__,
                   "date": datetime.date.today().isoformat()}
        Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
