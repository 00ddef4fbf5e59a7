"""Training speed: images/s of the whole jitted train step, and MFU from the XLA FLOP count.

The step timed is the one ``python -m tsfd_jax train`` runs (``train.make_train_step``): on-device
augmentation, stain channels and targets, the model in training mode, the paper losses, the
gradient, the SGD update; jitted over a mesh of all local devices, batch sharded, state
replicated and donated. Rows:
- a tiny model (configs/tiny.py widths) at 64 px, for quick comparisons between machines;
- the full model (configs/default.py) at ``--size`` (512), float32 and bfloat16 compute;
- each ``--config FILE`` at that config's own input size, label size and batch, with the
  ``--config.a.b=value`` overrides of the command line applied to every one; with ``--compare``
  once per depthwise implementation (models/layers.py: the XLA grouped convolution "conv" and the
  shifted multiply-adds "shift"), side by side in one run.
Each row: compile + first step, ``--warmup`` untimed steps, ``--iters`` timed steps. The batch
is synthetic PanNuke (data/synthetic.py) at label size ``--size / 2`` as in the paper (512 input,
256 labels), the same batch every step (the input pipeline is measured by bench_input.py).

FLOPs are XLA's cost analysis of the step for the global batch, as written (lowered, before XLA's
rewrites) and as compiled; their ratio shows work XLA adds (e.g. XLA:CPU lowering depthwise
gradients to dense convolutions).
MFU = achieved FLOP/s / peak FLOP/s of the devices: the peak comes from ``--peak-tflops`` or,
for known accelerators, from the table below (dense bf16 tensor-core peak for bfloat16 rows,
dense TF32 peak for float32 rows on NVIDIA, where XLA uses TF32 for float32 matmuls by default).
CPU rows report FLOP/s only.

  python experiments/bench_train.py --out bench_train.json                  # CPU: tiny + full
  python experiments/bench_train.py --batch 16 --iters 20 --out bench_train_gpu.json
  python experiments/bench_train.py --no-tiny --no-full --config configs/demo.py --compare
  python experiments/bench_train.py --no-tiny --no-full --config configs/demo.py --compare \
      --config.model.backbone=b4 --config.model.num_bifpn=2      # the demo model with BiFPNs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_model import machine, write_json  # noqa: E402

# Peak dense TFLOP/s per device: (bfloat16, float32 as XLA computes it by default).
PEAK_TFLOPS = {
    "H100": (989.0, 494.0),   # SXM; float32 matmuls run as TF32
    "H200": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "TPU v4": (275.0, 275.0),  # TPU float32 matmuls use bf16 passes by default
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5": (459.0, 459.0),
}


def peak_tflops(device_kind: str, dtype: str, override: float) -> float | None:
    if override:
        return override
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def synthetic_batch(batch: int, label_size: int, num_tissues: int, seed: int = 0) -> dict:
    """A host batch in the pipeline's contract (data/pipeline.py) from synthetic PanNuke."""
    import numpy as np

    from tsfd_jax.data.pannuke import image_to_uint8, masks_to_instances
    from tsfd_jax.data.synthetic import generate

    images, masks, _ = generate(batch, seed, image_size=label_size)
    inst, cls = zip(*(masks_to_instances(m)[:2] for m in masks))
    rng = np.random.default_rng(seed)
    return {"image": np.stack([image_to_uint8(im) for im in images]), "inst": np.stack(inst),
            "cls": np.stack(cls), "tissue": rng.integers(0, num_tissues, batch).astype(np.int32),
            "valid": np.ones(batch, bool), "index": np.arange(batch, dtype=np.int32)}


def _flops(cost) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def bench_step(cfg, batch: int, label_size: int, warmup: int, iters: int) -> dict:
    import time

    import jax

    from tsfd_jax import parallel
    from tsfd_jax.data.pipeline import to_global
    from tsfd_jax.models.tsfd import build_model
    from tsfd_jax.ops.preprocess import make_preprocess_fn
    from tsfd_jax.steps import init_state, make_optimizer, make_train_step

    mesh = parallel.make_mesh(("data",))
    parallel.check_batch_size(batch, mesh)
    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    cfg.data.global_batch_size = batch
    model = build_model(cfg)
    tx = make_optimizer(cfg)
    state = init_state(cfg, model, tx, jax.random.key(0), repl)
    host = synthetic_batch(batch, label_size, max(len(cfg.data.tissue_names), 2))
    data = to_global(host, mesh)
    step = jax.jit(make_train_step(cfg, model, tx, make_preprocess_fn(cfg)),
                   in_shardings=(repl, sharded), out_shardings=(repl, repl), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = step.lower(state, data)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # The FLOPs of the program as written (before XLA's rewrites: XLA:CPU turns the depthwise
    # convolutions' gradients into dense ones, which would inflate the count ~10x there).
    flops = _flops(lowered.cost_analysis())
    flops_compiled = _flops(compiled.cost_analysis())
    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(iters):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    per_step = (time.perf_counter() - t0) / max(iters, 1)
    loss = float(jax.device_get(metrics["loss"]))
    return {"compile_s": compile_s, "first_step_s": first_s, "s_per_step": per_step,
            "images_per_s": batch / per_step, "step_gflops": flops / 1e9,
            "flops_written": flops, "flops_compiled": flops_compiled,
            "flop_ratio": flops_compiled / flops if flops else None,
            "achieved_tflops": flops / per_step / 1e12, "devices": mesh.size,
            "last_loss": loss}


def breakdown(cfg, iters: int = 10) -> list[tuple[str, float]]:
    """``(part, ms per step, FLOPs written, FLOPs compiled)`` of each part of the train step,
    each jitted and timed alone: augmentation + stain channels + targets, model forward,
    forward + backward, losses (value and gradient w.r.t. the logits), optimiser update; and the
    whole step."""
    import time

    import jax
    import jax.numpy as jnp
    import optax

    from tsfd_jax.data.pipeline import to_global
    from tsfd_jax import parallel
    from tsfd_jax.losses import tsfd_loss
    from tsfd_jax.models.tsfd import build_model
    from tsfd_jax.ops.preprocess import make_preprocess_fn
    from tsfd_jax.forward import resize_to_labels
    from tsfd_jax.steps import create_state, make_optimizer, make_train_step

    batch = int(cfg.data.global_batch_size)
    host = synthetic_batch(batch, int(cfg.data.image_size), max(len(cfg.data.tissue_names), 2))
    data = to_global(host, parallel.make_mesh(("data",)))
    model, tx = build_model(cfg), make_optimizer(cfg)
    key = jax.random.key(0)
    state = jax.jit(lambda k: create_state(cfg, model, tx, k))(key)
    preprocess = make_preprocess_fn(cfg)
    inputs, targets = jax.jit(lambda b, k: preprocess(b, k, True))(data, key)

    def forward(params, x):
        out, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                             rngs={"dropout": key}, mutable=["batch_stats"])
        return out

    def total(params, x):
        return sum(jnp.sum(v) for v in forward(params, x).values())

    outputs = jax.jit(forward)(state.params, inputs)
    outputs = resize_to_labels(outputs, targets["cls"].shape[1:3])

    def loss(outs):
        return tsfd_loss(outs, targets, cfg.loss)[0]

    grads = jax.jit(jax.grad(total))(state.params, inputs)

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = make_train_step(cfg, model, tx, preprocess)
    parts = [("augmentation, stain channels, targets", lambda b, k: preprocess(b, k, True),
              (data, key)),
             ("model forward", forward, (state.params, inputs)),
             ("model forward + backward", jax.grad(total), (state.params, inputs)),
             ("losses, value + gradient", jax.value_and_grad(loss), (outputs,)),
             ("optimiser update", update, (grads, state.opt_state, state.params)),
             ("whole train step", step, (state, data))]
    rows = []
    for name, fn, args in parts:
        lowered = jax.jit(fn).lower(*args)
        compiled = lowered.compile()
        jax.block_until_ready(compiled(*args))
        t0 = time.perf_counter()
        for _ in range(iters):
            out = compiled(*args)
        jax.block_until_ready(out)
        ms = 1e3 * (time.perf_counter() - t0) / iters
        written, done = _flops(lowered.cost_analysis()), _flops(compiled.cost_analysis())
        rows.append((name, ms, written, done))
        print(f"{name:<40} {ms:8.1f} ms  {written / 1e9:7.2f} GFLOP written, "
              f"{done / 1e9:7.2f} compiled", flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, and in ``overrides`` the ``--config.a.b=value`` pairs for every --config row."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2, help="global batch of the full model")
    p.add_argument("--size", type=int, default=512, help="input size of the full model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    p.add_argument("--iters", type=int, default=3, help="timed steps")
    p.add_argument("--tiny-batch", type=int, default=8)
    p.add_argument("--tiny-iters", type=int, default=10)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-full", action="store_true", help="no full-model rows")
    p.add_argument("--no-tiny", action="store_true", help="no tiny-model row")
    p.add_argument("--config", action="append", default=[], metavar="FILE.py[:variant]",
                   help="add a row for this config at its own sizes and batch (repeatable)")
    p.add_argument("--breakdown", action="store_true",
                   help="--config rows: also time each part of the step alone")
    p.add_argument("--compare", action="store_true",
                   help="--config rows once per depthwise implementation (conv, shift)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak TFLOP/s of one device for MFU (default: known accelerators)")
    p.add_argument("--out", default="", help="JSON file for the results")
    args, rest = p.parse_known_args(argv)
    from tsfd_jax.config_files import split_overrides
    args.overrides, rest = split_overrides(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main() -> None:
    args = parse_args()

    import jax

    from configs import default, tiny
    from tsfd_jax.config_files import load_config
    from tsfd_jax.models.layers import depthwise_impl_for

    info = machine()
    rows = []
    print(f"{'model':<14} {'dwconv':<6} {'dtype':<9} {'size':>4} {'batch':>5} {'images/s':>9} "
          f"{'s/step':>7} {'compile (s)':>11} {'GFLOP written':>13} {'compiled':>9} "
          f"{'ratio':>6} {'TFLOP/s':>8} {'MFU':>6}")

    def run(name: str, cfg, size: int, label_size: int, batch: int, iters: int) -> None:
        cfg.input.size, cfg.data.image_size = size, label_size
        r = bench_step(cfg, batch, label_size, args.warmup, iters)
        dtype = str(cfg.model.dtype)
        impl = depthwise_impl_for(cfg.model.depthwise_impl, jax.default_backend())
        peak = peak_tflops(info["device_kind"], dtype, args.peak_tflops)
        r["mfu"] = r["achieved_tflops"] / (peak * r["devices"]) if peak else None
        row = {"model": name, "depthwise_impl": impl, "dtype": dtype, "size": size,
               "batch": batch, **r}
        rows.append(row)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = f"{r['flop_ratio']:.2f}" if r["flop_ratio"] else "-"
        print(f"{name:<14} {impl:<6} {dtype:<9} {size:>4} {batch:>5} {r['images_per_s']:>9.2f} "
              f"{r['s_per_step']:>7.3f} {r['compile_s']:>11.1f} {r['flops_written'] / 1e9:>13.1f} "
              f"{r['flops_compiled'] / 1e9:>9.1f} {ratio:>6} {r['achieved_tflops']:>8.3f} "
              f"{mfu:>6}", flush=True)

    for spec in args.config:
        for impl in ("conv", "shift") if args.compare else (None,):
            cfg = load_config(spec, args.overrides)
            if impl:
                cfg.model.depthwise_impl = impl
            run(Path(spec.split(":")[0]).stem, cfg, cfg.input.size, cfg.data.image_size,
                cfg.data.global_batch_size, args.tiny_iters)
        if args.breakdown:
            parts = breakdown(load_config(spec, args.overrides), args.tiny_iters)
            rows[-1]["breakdown_ms"] = {name: ms for name, ms, _, _ in parts}
            rows[-1]["breakdown_flops"] = {name: [w, c] for name, _, w, c in parts}
    if not args.no_tiny:
        run("tiny", tiny.shrink(default.get_config()), 64, 32, args.tiny_batch, args.tiny_iters)
    if not args.no_full:
        for dtype in args.dtypes.split(","):
            cfg = default.get_config()
            cfg.model.dtype = dtype
            run("tsfd", cfg, args.size, args.size // 2, args.batch, args.iters)

    if args.out:
        write_json(args.out, {"machine": info, "args": vars(args), "rows": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
