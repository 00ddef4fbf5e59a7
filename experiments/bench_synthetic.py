"""Speed of the synthetic PanNuke generator (target: >= 30 patches/s at 256 px on one core).

Prints a table (patch size, patches/s by wall clock and by process CPU time, best of
``--repeats``) and writes it as JSON.

  python experiments/bench_synthetic.py --num 100 --out runs/bench_synthetic.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# One core: keep BLAS/OpenMP pools from spreading over the machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from tsfd_jax.data import synthetic  # noqa: E402


def bench(size: int, num: int, repeats: int) -> dict:
    synthetic.generate(2, seed=123, image_size=size)   # warm-up (imports, caches)
    wall, cpu = [], []
    nuclei = []
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        _, masks, _ = synthetic.generate(num, seed=r, image_size=size)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        nuclei += [len(np.unique(m[..., :5])) - 1 for m in masks]
    return {"size": size, "num": num, "patches_per_s_wall": num / min(wall),
            "patches_per_s_cpu": num / min(cpu), "nuclei_mean": float(np.mean(nuclei)),
            "nuclei_max": int(np.max(nuclei))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="256,128")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = [bench(int(s), args.num, args.repeats) for s in args.sizes.split(",")]
    print(f"{'size':>5} {'patch/s wall':>13} {'patch/s cpu':>12} {'nuclei mean':>12} {'max':>5}")
    for r in rows:
        print(f"{r['size']:>5} {r['patches_per_s_wall']:>13.1f} {r['patches_per_s_cpu']:>12.1f} "
              f"{r['nuclei_mean']:>12.1f} {r['nuclei_max']:>5}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
