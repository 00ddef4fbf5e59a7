"""Input speed: host pipeline (grain) images/s and device preprocessing images/s.

Host: ``train_iterator`` over a prepared synthetic PanNuke-format dataset (256 px), global batch
16, with 0 and 2 worker processes; the worker start-up is timed separately. Device:
``make_preprocess_fn`` of the default config jitted (256 -> 512, stain channels, targets) with
``train=True`` (augmentation) and ``train=False``, after a warm-up call (compilation).

  python experiments/bench_input.py --out bench_input.json

Prints a table and writes the numbers plus the machine (CPU count, platform, jax devices, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_dataset(root: Path, num_images: int, image_size: int, seed: int):
    """Synthetic PanNuke folds -> prepared dataset; returns the training-split source."""
    from tsfd_jax.data import prepare, prepared as prepared_lib, synthetic

    raw, prepared = root / "pannuke", root / "prepared"
    synthetic.write_pannuke(raw, num_images, seed, folds=3, image_size=image_size)
    prepare.prepare("pannuke", raw, prepared, progress=False, log=lambda _: None)
    return prepared_lib.open_prepared(prepared).source("fold1")


def bench_host(source, batch: int, workers: int, steps: int) -> dict:
    from tsfd_jax.data.pipeline import train_iterator

    t0 = time.perf_counter()
    it = train_iterator(source, batch, seed=0, num_workers=workers, prefetch=4,
                        process_index=0, process_count=1)
    next(it)  # start-up: worker processes, first reads
    startup = time.perf_counter() - t0
    next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - t0
    if workers:
        it.close()
    return {"workers": workers, "batch": batch, "steps": steps, "startup_s": startup,
            "images_per_s": steps * batch / elapsed}


def bench_device(source, cfg, batch: int, train: bool, steps: int) -> dict:
    import jax
    import numpy as np

    from tsfd_jax.data.pipeline import eval_batches
    from tsfd_jax.ops.preprocess import make_preprocess_fn

    host = next(eval_batches(source, batch, process_index=0, process_count=1))
    host.pop("key")
    device = {k: jax.device_put(np.asarray(v)) for k, v in host.items()}
    fn = jax.jit(lambda b, k: make_preprocess_fn(cfg)(b, k, train))
    key = jax.random.key(0)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(device, key))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(fn(device, jax.random.fold_in(key, 1)))
    t0 = time.perf_counter()
    for i in range(steps):
        out = fn(device, jax.random.fold_in(key, i + 2))
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - t0
    inputs = out[0]
    return {"train": train, "batch": batch, "steps": steps, "input_shape": list(inputs.shape),
            "compile_s": compile_s, "images_per_s": steps * batch / elapsed}


def machine() -> dict:
    import jax

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--num-images", type=int, default=64, help="synthetic images per fold")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--host-steps", type=int, default=30)
    parser.add_argument("--device-steps", type=int, default=5)
    args = parser.parse_args()

    from configs.default import get_config

    cfg = get_config()
    results = {"machine": machine(), "host": [], "device": []}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        source = build_dataset(Path(tmp), args.num_images, int(cfg.data.image_size), seed=0)
        results["dataset"] = {"train_examples": len(source), "image_size": int(cfg.data.image_size),
                              "build_s": time.perf_counter() - t0}
        for w in (int(x) for x in args.workers.split(",")):
            results["host"].append(bench_host(source, args.batch, w, args.host_steps))
        for train in (False, True):
            results["device"].append(
                bench_device(source, cfg, args.batch, train, args.device_steps))

    print(f"{'stage':<34}{'images/s':>10}{'start-up/compile s':>20}")
    for r in results["host"]:
        print(f"{'host grain, ' + str(r['workers']) + ' workers':<34}{r['images_per_s']:>10.1f}"
              f"{r['startup_s']:>20.2f}")
    for r in results["device"]:
        name = f"device preprocess train={r['train']}"
        print(f"{name:<34}{r['images_per_s']:>10.1f}{r['compile_s']:>20.2f}")
    print(f"machine: {results['machine']}")
    out = Path(args.out)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":  # grain workers start with spawn and re-import this module
    main()
