"""The training loop end to end in seconds: a tiny UNet, 2 steps, validation, then evaluate,
tune and resume; what the loop returns and what it leaves in the workdir."""

from __future__ import annotations

import json

import pytest

from configs import tiny
from tsfd_jax.data.synthetic import write_pannuke
from tsfd_jax.evaluate_run import evaluate_workdir, load_run_config, tune_workdir
from tsfd_jax.loop import train_and_evaluate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    write_pannuke(root / "synthetic", num_images=8, seed=0, folds=3, image_size=32)
    cfg = tiny.get_config()
    cfg.data.root = str(root / "synthetic")
    cfg.model.arch, cfg.model.unet_features = "unet", (4, 8)
    cfg.input.size = 32
    cfg.eval_every_steps = 2
    workdir = root / "run"
    return cfg, workdir, train_and_evaluate(cfg, workdir, progress=False)


def test_loop_returns_training_and_validation_metrics(run):
    cfg, workdir, result = run
    assert {"train_loss", "train_lr", "val_bPQ", "val_mPQ", "val_loss"} <= set(result)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "val_bPQ" in rows[-1]
    assert (workdir / "checkpoints" / "2").is_dir()


def test_tune_then_evaluate_uses_the_tuned_settings(run):
    cfg, workdir, _ = run
    tuned = tune_workdir(workdir, checkpoint="last", workers=0)
    assert load_run_config(workdir).postprocess.to_dict() == tuned
    saved = json.loads((workdir / "postprocess.json").read_text())
    assert saved["tuned"][saved["metric"]] >= saved["untuned"][saved["metric"]]
    out = evaluate_workdir(workdir, checkpoint="last", name="t", workers=0)
    assert json.loads((out / "report.json").read_text())["summary"]["images"] == 8
    for name in ("overlays.png", "probabilities.png"):
        assert (out / name).stat().st_size > 0, name


def test_finished_run_started_again_does_nothing(run):
    cfg, workdir, _ = run
    again = train_and_evaluate(cfg, workdir, progress=False)
    assert "val_bPQ" not in again  # no step ran, so nothing was validated


def test_a_run_trained_in_turns_equals_one_trained_straight(run, tmp_path):
    """``stop_at`` ends a call with a checkpoint; the next call continues the same run exactly
    (bench_quality trains its runs in turns)."""
    import copy

    import jax
    import numpy as np

    from tsfd_jax.checkpoints import restore_variables

    cfg = copy.deepcopy(run[0])
    cfg.total_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps = 4, 0, 100
    train_and_evaluate(cfg, tmp_path / "straight", progress=False)
    turns = tmp_path / "turns"
    train_and_evaluate(cfg, turns, progress=False, stop_at=1)
    assert sorted(p.name for p in (turns / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    train_and_evaluate(cfg, turns, progress=False, stop_at=3)
    train_and_evaluate(cfg, turns, progress=False)
    straight, s_step = restore_variables(tmp_path / "straight", "last")
    turned, t_step = restore_variables(turns, "last")
    assert s_step == t_step == 4
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(turned)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
