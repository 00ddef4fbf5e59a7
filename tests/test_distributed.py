"""Two local processes under jax.distributed (localhost coordinator, gloo CPU collectives) end
with the same parameters as one process on the same global batches, and their evaluation of a
held-out set (each process feeding its shard) gives one process's metrics."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    # One process first, then the pair: three compiling processes on a small CPU at once can
    # starve the pair's coordination heartbeats.
    one = tmp_path / "one.npz"
    single = subprocess.run([sys.executable, str(WORKER), "0", "1", "0", str(one)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert single.returncode == 0, single.stdout.decode()
    port = _free_port()
    two = tmp_path / "two.npz"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), str(two)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outs = [p.communicate(timeout=900)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = np.load(two), np.load(one)
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
    assert float(a["eval/images"]) == 10  # every image, not just process 0's shard
    # Parameters and BN statistics: the largest difference relative to the largest value of the
    # group (float32 sums over 2 vs 4 devices differ in order, ~1e-7 relative per step).
    for group in ("params/", "batch_stats/"):
        names = [k for k in b.files if k.startswith(group)]
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in names)
        scale = max(float(np.abs(b[k]).max()) for k in names)
        assert diff / scale < 1e-5, (group, diff, scale)
    # Metrics: the same images give the same scores (a pixel flipping at a threshold could move
    # a PQ by far less than 1e-3).
    for k in (k for k in b.files if k.startswith("eval/")):
        if np.isnan(b[k]):
            assert np.isnan(a[k]), k
        else:
            assert abs(float(a[k]) - float(b[k])) <= 1e-3 * max(1.0, abs(float(b[k]))), k
