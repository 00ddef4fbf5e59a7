"""Model speed and cost: images/s of TSFD-Net forward and forward+backward, and XLA FLOPs.

Rows (each jitted once, then ``--warmup`` untimed and ``--iters`` timed calls):
- the full model (configs/default.py) at ``--size`` (512) in float32 and bfloat16 compute;
- a tiny model (configs/tiny.py widths) at 64 px, for quick comparisons between machines;
- our EfficientNet-B4 backbone alone and Keras' ``EfficientNetB4(include_top=False,
  weights=None)`` (KERAS_BACKEND=jax, jitted ``stateless_call``) at the same size, forward
  only, as a reference ratio; the Keras row is skipped with a note when keras is missing.
Forward = inference (``train=False``); forward+backward = gradient of a scalar of all outputs
with respect to every parameter in training mode (dropout, BN statistics): a train step
without loss and optimiser. Weights are random (the initialisers are not what is timed).

FLOPs: XLA cost analysis of the forward pass of one image at 256/512/768 (and forward+backward
at ``--size``), beside PAPER Table 7 (185 / 739 / 1664 GFLOPs, an over-count: depthwise convs
counted as dense, docs/model.md §4) and the ~23 GFLOPs estimate at 512 from the layer shapes.

  python experiments/bench_model.py --batch 8 --iters 20 --out bench_model.json
  python experiments/bench_model.py --batch 1 --iters 2 --warmup 1 --out bench_model.json  # CPU
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

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAPER_TABLE7_GFLOPS = {256: 185.0, 512: 739.0, 768: 1664.0}
ESTIMATE_512_GFLOPS = 23.0  # docs/model.md §4: ~11.5 GMACs from the authors' summary shapes


def random_variables(abstract, seed: int = 0):
    """Variables of the given shapes: kernels N(0, 1/fan_in), BN identity, small biases."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = jax.tree_util.keystr(path[-1:])
        shape = a.shape
        if "kernel" in name:
            fan_in = shape[0] * shape[1] if len(shape) == 4 and shape[2] == 1 else (
                int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0])
            v = rng.normal(0, 1 / np.sqrt(fan_in), shape)
        elif "scale" in name or "var" in name:
            v = np.ones(shape)
        elif "mean" in name:
            v = np.zeros(shape)
        else:
            v = rng.normal(0, 0.05, shape)
        return jnp.asarray(v, a.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def time_fn(fn, args, warmup: int, iters: int) -> dict:
    """Compile + first call, ``warmup`` more untimed calls, then ``iters`` timed calls."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    per_call = (time.perf_counter() - t0) / max(iters, 1)
    return {"compile_and_first_s": first, "s_per_call": per_call}


def bench_tsfd(cfg, size: int, batch: int, warmup: int, iters: int, backward: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tsfd_jax.models.summary import abstract_variables
    from tsfd_jax.models.tsfd import build_model, input_shape

    model = build_model(cfg)
    shape = input_shape(cfg, batch, size)
    v = random_variables(abstract_variables(model, shape))
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, shape), jnp.float32)
    if not backward:
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
        args = (v, x)
    else:
        def loss(params, rest, x, rng):
            out, _ = model.apply({"params": params, **rest}, x, train=True,
                                 rngs={"dropout": rng}, mutable=["batch_stats"])
            return sum(jnp.mean(o) for o in out.values())

        rest = {k: a for k, a in v.items() if k != "params"}
        fn = jax.jit(jax.grad(loss))
        args = (v["params"], rest, x, jax.random.key(0))
    r = time_fn(fn, args, warmup, iters)
    r["images_per_s"] = batch / r["s_per_call"]
    return r


def bench_backbone(size: int, batch: int, warmup: int, iters: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tsfd_jax.models.efficientnet import EfficientNet

    model = EfficientNet.from_variant("b4", taps=("top",))
    shape = (batch, size, size, 3)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                                 train=False))
    v = random_variables(abstract)
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, shape), jnp.float32)
    r = time_fn(jax.jit(lambda v, x: model.apply(v, x, train=False)), (v, x), warmup, iters)
    r["images_per_s"] = batch / r["s_per_call"]
    return r


def bench_keras_b4(size: int, batch: int, warmup: int, iters: int) -> dict | str:
    """Keras EfficientNetB4 forward (jitted stateless call), or why it was skipped."""
    try:
        import keras
    except ImportError as e:
        return f"skipped: keras not importable ({e})"
    if keras.backend.backend() != "jax":
        return f"skipped: keras backend is {keras.backend.backend()!r}, not jax"
    import jax
    import numpy as np

    model = keras.applications.EfficientNetB4(include_top=False, weights=None,
                                              input_shape=(size, size, 3))
    trainable = [w.value for w in model.trainable_variables]
    frozen = [w.value for w in model.non_trainable_variables]
    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)

    @jax.jit
    def forward(trainable, frozen, x):
        return model.stateless_call(trainable, frozen, x, training=False)[0]

    r = time_fn(forward, (trainable, frozen, x), warmup, iters)
    r["images_per_s"] = batch / r["s_per_call"]
    return r


def flops_rows(cfg, sizes: list[int], backward_size: int) -> list[dict]:
    from tsfd_jax.models.summary import abstract_variables, xla_flops
    from tsfd_jax.models.tsfd import build_model, input_shape

    model = build_model(cfg)
    rows = []
    for size in sizes:
        shape = input_shape(cfg, 1, size)
        v = abstract_variables(model, shape)
        g = xla_flops(model, v, shape) / 1e9
        row = {"size": size, "pass": "forward", "xla_gflops": g,
               "paper_table7_gflops": PAPER_TABLE7_GFLOPS.get(size)}
        rows.append(row)
        if size == backward_size:
            rows.append({"size": size, "pass": "forward+backward",
                         "xla_gflops": xla_flops(model, v, shape, backward=True) / 1e9,
                         "paper_table7_gflops": None})
    return rows


def machine() -> dict:
    import jax

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind}


def write_json(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="input size of the full model")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    p.add_argument("--iters", type=int, default=2, help="timed calls")
    p.add_argument("--tiny-batch", type=int, default=8)
    p.add_argument("--tiny-iters", type=int, default=10)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-backward", action="store_true", help="forward rows only")
    p.add_argument("--no-full", action="store_true", help="skip the full-size rows")
    p.add_argument("--flops-sizes", default="256,512,768")
    p.add_argument("--out", default="", help="JSON file for the results")
    args = p.parse_args()

    from configs import default, tiny

    info = machine()
    passes = [False] if args.no_backward else [False, True]
    speed = []

    def add(name, dtype, size, batch, backward, result):
        row = {"model": name, "dtype": dtype, "size": size, "batch": batch,
               "pass": "forward+backward" if backward else "forward"}
        row.update(result if isinstance(result, dict) else {"note": result})
        speed.append(row)
        print_row(row)

    print(f"{'model':<14} {'dtype':<9} {'size':>4} {'batch':>5} {'pass':<17} "
          f"{'images/s':>9} {'s/call':>8} {'first (s)':>9}")
    tiny_cfg = tiny.shrink(default.get_config())
    for backward in passes:
        add("tiny", "float32", 64, args.tiny_batch, backward,
            bench_tsfd(tiny_cfg, 64, args.tiny_batch, args.warmup, args.tiny_iters, backward))
    if not args.no_full:
        for dtype in args.dtypes.split(","):
            cfg = default.get_config()
            cfg.model.dtype = dtype
            for backward in passes:
                add("tsfd", dtype, args.size, args.batch, backward,
                    bench_tsfd(cfg, args.size, args.batch, args.warmup, args.iters, backward))
        add("b4 (ours)", "float32", args.size, args.batch, False,
            bench_backbone(args.size, args.batch, args.warmup, args.iters))
        add("b4 (keras)", "float32", args.size, args.batch, False,
            bench_keras_b4(args.size, args.batch, args.warmup, args.iters))

    sizes = [int(s) for s in args.flops_sizes.split(",") if s]
    flops = flops_rows(default.get_config(), sizes, args.size)
    print(f"\n{'size':>4} {'pass':<17} {'XLA GFLOPs':>10} {'paper Table 7':>13}")
    for r in flops:
        paper = f"{r['paper_table7_gflops']:.0f}" if r["paper_table7_gflops"] else "-"
        print(f"{r['size']:>4} {r['pass']:<17} {r['xla_gflops']:>10.2f} {paper:>13}")
    print(f"(estimate from the authors' layer shapes at 512: ~{ESTIMATE_512_GFLOPS:.0f} GFLOPs)")

    result = {"machine": info, "args": vars(args), "speed": speed, "flops": flops,
              "estimate_512_gflops": ESTIMATE_512_GFLOPS}
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")


def print_row(r: dict) -> None:
    head = f"{r['model']:<14} {r['dtype']:<9} {r['size']:>4} {r['batch']:>5} {r['pass']:<17}"
    if "note" in r:
        print(f"{head} {r['note']}")
    else:
        print(f"{head} {r['images_per_s']:>9.2f} {r['s_per_call']:>8.3f} "
              f"{r['compile_and_first_s']:>9.1f}")


if __name__ == "__main__":
    main()
