"""The training loop: data, mesh, state, steps, logging, validation, checkpoints, resume.

big_vision-style stages in one readable function. A run lives in a workdir; started again on the
same workdir it resumes from the latest checkpoint (train state + data iterator), so a killed run
continues the same curve. A non-finite loss stops the run; the last good checkpoint stays.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tsfd_jax import checkpoints, parallel
from tsfd_jax.data.pipeline import to_global, train_iterator
from tsfd_jax.data.resolve import load_eval_split, load_train
from tsfd_jax.errors import UserError
from tsfd_jax.losses import check_loss_config
from tsfd_jax.models.keras_weights import merge_backbone
from tsfd_jax.models.tsfd import build_model
from tsfd_jax.ops.preprocess import make_preprocess_fn
from tsfd_jax.postprocess_params import PostprocessParams
from tsfd_jax.steps import init_state, make_optimizer, make_train_step, trace_state
from tsfd_jax.writers import MetricWriter


class TrainingDiverged(RuntimeError):
    pass


def train_and_evaluate(cfg, workdir: str | Path, *, overwrite: bool = False,
                       resume_anyway: bool = False, progress: bool = True,
                       stop_at: int | None = None) -> dict:
    """Train ``cfg`` in ``workdir``; returns the last logged and validation metrics.

    ``stop_at``: stop after that step with a checkpoint, so that a later call continues the run
    exactly (runs trained in turns on one machine, experiments/bench_quality.py).
    """
    workdir = Path(workdir)
    # A config the code cannot use fails in one line before anything is written or compiled.
    check_loss_config(cfg.loss)
    PostprocessParams.of(cfg.postprocess)  # else found at the first validation
    # ---- multi-host and workdir ----------------------------------------------------------
    parallel.initialize_distributed(bool(cfg.mesh.distributed))
    model = build_model(cfg)  # checks the model and optimiser fields (after JAX's set-up)
    tx = make_optimizer(cfg)
    checkpoints.check_workdir(workdir, cfg, overwrite=overwrite, resume_anyway=resume_anyway)
    writer = MetricWriter(workdir)

    # ---- mesh ----------------------------------------------------------------------------
    mesh = parallel.make_mesh(tuple(cfg.mesh.axes))
    parallel.check_batch_size(int(cfg.data.global_batch_size), mesh)
    repl = parallel.replicated(mesh)

    # ---- input pipeline ------------------------------------------------------------------
    train_source, crop, weights = load_train(cfg, workdir)
    data_iter = train_iterator(train_source, int(cfg.data.global_batch_size), seed=int(cfg.seed),
                               num_workers=int(cfg.data.num_workers),
                               prefetch=int(cfg.data.prefetch), crop_size=crop, weights=weights)

    # ---- state ---------------------------------------------------------------------------
    rng = jax.random.key(int(cfg.seed))
    initializer = trace_state(cfg, model, tx, rng, repl)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            initializer.out_info)

    manager = checkpoints.make_manager(workdir, int(cfg.keep_checkpoints),
                                       cfg.best_metric or None)
    start = manager.latest_step()
    if start is not None:
        state = checkpoints.restore(manager, start, abstract, data_iter)
        print(f"resumed from {workdir}/checkpoints/{start}")
        step = int(jax.device_get(state.step))
    else:
        state, step = None, 0

    preprocess = make_preprocess_fn(cfg)
    train_step = jax.jit(make_train_step(cfg, model, tx, preprocess),
                         in_shardings=(repl, parallel.batch_sharded(mesh)),
                         out_shardings=(repl, repl), donate_argnums=(0,))
    total = int(cfg.total_steps)
    stop = total if stop_at is None else min(int(stop_at), total)
    first_batch = compiling = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        if step < stop:
            # Compiled ahead of time from the state's shapes: compiling, or loading from the
            # persistent cache, runs in XLA without the GIL, so the state initialiser is traced
            # and compiled beside it (BENCHMARKS.md, "Compilation cache"). Drawn after the
            # restore, the first batch keeps the iterator where an uninterrupted run has it.
            first_batch = to_global(next(data_iter), mesh)
            compiling = pool.submit(train_step.lower(abstract, first_batch).compile)
        if state is None:
            state = _fresh_state(cfg, model, tx, rng, repl, initializer)
        if compiling is not None:
            train_step = compiling.result()

    # ---- loop ----------------------------------------------------------------------------
    log_every = max(int(cfg.log_every_steps), 1)
    bar = tqdm(total=total, initial=step, disable=not progress or jax.process_index() != 0,
               dynamic_ncols=True, unit="step")
    pending: list[dict] = []
    last: dict = {}
    t0, n0 = time.perf_counter(), step
    eval_fn = val = None
    last_val: dict | None = None
    try:
        while step < stop:
            batch = first_batch if first_batch is not None else to_global(next(data_iter), mesh)
            first_batch = None
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            step += 1
            bar.update(1)
            is_ckpt = step % int(cfg.checkpoint_every_steps) == 0 or step == stop
            is_eval = int(cfg.eval_every_steps) > 0 and (
                step % int(cfg.eval_every_steps) == 0 or step == total)
            if step % log_every == 0 or is_ckpt or is_eval:
                last = _summarise(pending)
                pending = []
                if last.pop("nonfinite", 0) > 0:
                    raise TrainingDiverged(
                        f"the loss became NaN or inf before step {step} (updates with a "
                        f"non-finite loss were skipped); the last good checkpoint is "
                        f"{manager.latest_step()} in {workdir}/checkpoints. Lower optim.lr or "
                        f"set optim.grad_clip and resume.")
                rate = (step - n0) * int(cfg.data.global_batch_size) / (time.perf_counter() - t0)
                last["images_per_s"] = rate
                writer.write(step, {f"train_{k}": v for k, v in last.items()})
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.3g}",
                                img_s=f"{rate:.1f}")
                t0, n0 = time.perf_counter(), step
            result = None
            if is_eval:
                if eval_fn is None:  # once per run: validation compiles once
                    # Imported at the first validation, not before the first step.
                    from tsfd_jax.evaluate import make_eval_fn

                    val = load_eval_split(cfg, workdir, "val")
                    # Without test-time augmentation: it would multiply the cost of every
                    # validation; evaluate and predict apply eval.tta.
                    eval_fn = make_eval_fn(val[0], mesh, tta="none")
                result = _validate(*val, state, mesh, eval_fn)
                last_val = result
                writer.write(step, result)
                bar.write(f"step {step}: " + ", ".join(
                    f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
                t0 = time.perf_counter()
            if is_ckpt:
                metrics_for_best = result if result and cfg.best_metric in result else None
                checkpoints.save(manager, step, state, data_iter, metrics_for_best)
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return {**{f"train_{k}": v for k, v in last.items()}, **(last_val or {})}


def _summarise(metrics: list[dict]) -> dict:
    fetched = jax.device_get(metrics)
    out = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    out["nonfinite"] = float(np.sum([m["nonfinite"] for m in fetched]))
    out["lr"] = float(fetched[-1]["lr"])
    return out


def _fresh_state(cfg, model, tx, rng, sharding, traced):
    state = init_state(cfg, model, tx, rng, sharding, traced)
    if cfg.model.init_checkpoint:
        state = _load_init_checkpoint(state, cfg.model.init_checkpoint, sharding)
    return state


def _validate(cfg, source, state, mesh, eval_fn) -> dict:
    """Metrics of ``state`` on the validation source (``cfg`` at its evaluation size)."""
    from tsfd_jax.evaluate import evaluate_source

    result = evaluate_source(cfg, state.eval_variables(), source, mesh=mesh,
                             max_images=int(cfg.eval_max_images) or None, with_report=False,
                             eval_fn=eval_fn)
    return {f"val_{k}": v for k, v in result.items() if isinstance(v, (int, float))}


def _load_init_checkpoint(state, path: str, sharding):
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: model.init_checkpoint does not exist")
    variables = merge_backbone(state.variables(), p)
    variables = jax.device_put(variables, sharding)
    ema = None if state.ema is None else jax.tree.map(jnp.copy, variables)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                         ema=ema)
