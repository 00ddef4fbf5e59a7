"""Workdir and checkpoints: orbax CheckpointManager with train state + grain iterator (README, Training).

Layout of a workdir::

    config.json          the run's config (a workdir never silently runs another config)
    checkpoints/<step>/  orbax: state/ (TrainState) and data_iter/ (grain iterator per process)
    metrics.jsonl        one JSON object per logged step / evaluation
    tb/                  TensorBoard event files
    archive/<time>/      what --overwrite moved aside (nothing a user made is deleted)

The latest N checkpoints and the best one by the validation metric are kept (orbax preservation
policies; ``max_to_keep`` with ``best_fn`` would delete the latest).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from tsfd_jax import atomic
from tsfd_jax.errors import UserError

CONFIG_FILE = "config.json"
# Workdir entries written by training; --overwrite moves these into archive/<time>/.
RUN_ENTRIES = ("config.json", "checkpoints", "metrics.jsonl", "tb", "eval", "postprocess.json")
# Config fields added since runs were first saved, each with the value that does what runs
# saved before it did: an older workdir's config.json is read with these filled in.
ADDED_FIELDS = {("model", "depthwise_impl"): "auto", ("model", "arch"): "tsfd",
                ("model", "unet_features"): (16, 32, 64), ("optim", "name"): "sgd",
                ("model", "stem_skip"): 0, ("targets", "boundary_dilation"): 0,
                ("targets", "contact_dilation"): 0,
                ("model", "input_skip"): 0, ("targets", "boundary_kind"): "contour",
                ("loss", "hv_gradient_weight"): 2.0, ("eval", "tune_methods"): ("paper", "markers"),
                ("model", "node_pointwise"): False, ("input", "rgb_scaling"): "fixed",
                ("eval", "tta"): "none", ("postprocess", "max_growth"): 0.0,
                ("postprocess", "orphan_size"): 0, ("postprocess", "basin_depth"): 0.0,
                ("eval", "tune_fixed"): (), ("eval", "tune_metric"): "",
                ("model", "skip_depth"): 1, ("model", "align_taps"): False,
                ("model", "fused_stages"): 0,
                ("model", "plain_features"): (16, 32, 64, 64, 64),
                ("optim", "ema_decay"): 0.0, ("model", "input_depth"): 1,
                ("model", "pool_stem"): False, ("model", "node_conv"): "depthwise",
                ("model", "shared_input_skip"): False, ("model", "output_blocks"): True}


def config_json(cfg) -> str:
    return cfg.to_json_best_effort(indent=2, sort_keys=True)


def saved_config(text: str) -> dict:
    """A saved config.json as a dict, with the ``ADDED_FIELDS`` it predates filled in (as
    JSON values: tuples become lists, as in every saved config)."""
    config = json.loads(text)
    for (section, key), value in ADDED_FIELDS.items():
        if isinstance(config.get(section), dict) and key not in config[section]:
            config[section][key] = json.loads(json.dumps(value))
    return config


def _normalise(text: str) -> Any:
    return json.loads(text)


def check_workdir(workdir: Path, cfg, overwrite: bool = False, resume_anyway: bool = False) -> None:
    """Refuse a workdir holding a run of another config; ``overwrite`` archives that run first."""
    workdir.mkdir(parents=True, exist_ok=True)
    saved = workdir / CONFIG_FILE
    new = config_json(cfg)
    if saved.exists():
        # A run saved before a field existed ran with the field's old behaviour: the same run.
        same = saved_config(saved.read_text()) == _normalise(new)
        if not same and overwrite:
            archive = workdir / "archive" / time.strftime("%Y%m%d-%H%M%S")
            if jax.process_index() == 0:
                archive.mkdir(parents=True)
                for name in RUN_ENTRIES:
                    if (workdir / name).exists():
                        os.replace(workdir / name, archive / name)
                print(f"moved the previous run in {workdir} to {archive}")
        elif not same and not resume_anyway:
            diff = _config_diff(saved_config(saved.read_text()), _normalise(new))
            raise UserError(
                f"{saved}: this workdir holds a run of another config ({diff}); use another "
                f"--workdir, --resume-anyway to continue it with the new config, or --overwrite "
                f"to archive the old run and start afresh")
    if jax.process_index() == 0:
        atomic.write_bytes(saved, new)


def _config_diff(old: dict, new: dict, prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _config_diff(a, b, f"{prefix}{key}.")
            if sub:
                diffs.append(sub)
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")




def make_manager(workdir: Path, keep: int, best_metric: str | None) -> ocp.CheckpointManager:
    policies = [ocp.checkpoint_managers.LatestN(n=max(int(keep), 1))]
    if best_metric:
        policies.append(ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda m: m[best_metric], reverse=False, n=1,
            keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(), options=options, item_names=("state", "data_iter"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state, data_iter,
         metrics: dict | None = None) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter)),
        metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter):
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    except ValueError as e:
        if "structure" not in str(e).lower():
            raise
        first = str(e).split(". ")[0]
        raise UserError(f"{manager.directory}/{step}: the saved train state does not fit this "
                        f"config's model and optimiser ({first}); resume it with the version "
                        f"and config that wrote it, or train in a new workdir") from None
    return restored["state"]


def resolve_step(manager: ocp.CheckpointManager, which: str | int) -> int:
    """'last', 'best' or a step number -> an existing step (UserError otherwise)."""
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"{manager.directory}: no checkpoint found")
    if which in ("last", "latest"):
        return manager.latest_step()
    if which == "best":
        best = manager.best_step()
        return best if best is not None else manager.latest_step()
    step = int(which)
    if step not in steps:
        raise UserError(f"{manager.directory}: no checkpoint at step {step} (have {sorted(steps)})")
    return step


# The variables restored last, by (checkpoint folder, step, the step folder's mtime): evaluating,
# tuning and evaluating again in one process (the demo) reads the checkpoint once. A step saved
# again gets a new folder, hence a new key.
_last_restored: dict[tuple, dict] = {}


def _restored_key(ckpt: Path, step: int) -> tuple | None:
    try:
        return (str(ckpt.absolute()), step, (ckpt / str(step)).stat().st_mtime_ns)
    except OSError:
        return None


def restore_variables(workdir: Path, which: str | int = "best") -> tuple[dict, int]:
    """Model variables (params, batch_stats) of a finished or running workdir, for evaluation:
    the moving average of them where the run kept one (``optim.ema_decay``)."""
    ckpt = workdir / "checkpoints"
    if not ckpt.is_dir():
        raise UserError(f"{workdir}: not a training workdir (no checkpoints/ folder)")
    manager = ocp.CheckpointManager(ckpt.absolute(), item_names=("state", "data_iter"))
    try:
        step = resolve_step(manager, which)
        key = _restored_key(ckpt, step)
        if key is not None and key in _last_restored:
            return dict(_last_restored[key]), step
        # BestN metrics live in the manager; reading only the state needs no grain handler.
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    state = restored["state"]
    # A run with optim.ema_decay is evaluated with its moving average, as its validations were.
    variables = state.get("ema") or {"params": state["params"], "batch_stats": state["batch_stats"]}
    _last_restored.clear()
    if key is not None:
        _last_restored[key] = variables
    return dict(variables), step
