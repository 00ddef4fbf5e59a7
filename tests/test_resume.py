"""Exact resume: a tiny run killed with SIGKILL mid-way and restarted from its workdir ends with
exactly the parameters of an uninterrupted run of the same length (same data order too). The
runs keep a moving average of the weights (``optim.ema_decay``), which the restored variables
are: it depends on every step's parameters, so it equals only if the whole trajectory does, and
it must itself be saved and restored."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tsfd_jax.checkpoints import restore_variables
from tsfd_jax.data.synthetic import write_pannuke

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 2


def _train_cmd(workdir: Path, data: Path, prepared: Path) -> list[str]:
    return [sys.executable, "-m", "tsfd_jax", "train", "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), "--no-progress",
            f"--config.data.root={data}", f"--config.data.prepared_dir={prepared}",
            f"--config.total_steps={STEPS}", f"--config.checkpoint_every_steps={EVERY}",
            "--config.keep_checkpoints=10", "--config.optim.ema_decay=0.9"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _finished_steps(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigkill_resume_equals_uninterrupted(tmp_path):
    data, prepared = tmp_path / "synthetic", tmp_path / "prepared"
    write_pannuke(data, num_images=12, seed=0, folds=2, image_size=32)

    full = tmp_path / "full"
    subprocess.run(_train_cmd(full, data, prepared), env=_env(), check=True, timeout=1800,
                   stdout=subprocess.DEVNULL)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, data, prepared), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1800
    while time.time() < deadline and not [s for s in _finished_steps(killed) if s >= 4]:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_at_kill = _finished_steps(killed)
    assert steps_at_kill and max(steps_at_kill) < STEPS, steps_at_kill

    subprocess.run(_train_cmd(killed, data, prepared), env=_env(), check=True, timeout=1800,
                   stdout=subprocess.DEVNULL)
    a, step_a = restore_variables(full, "last")
    b, step_b = restore_variables(killed, "last")
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
