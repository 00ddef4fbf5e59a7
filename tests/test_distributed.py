"""Two local processes under jax.distributed (localhost coordinator, gloo CPU collectives) end
with the same parameters as one process on the same global batches."""

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
    port = _free_port()
    two = tmp_path / "two.npz"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), str(two)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    one = tmp_path / "one.npz"
    single = subprocess.run([sys.executable, str(WORKER), "0", "1", "0", str(one)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert single.returncode == 0, single.stdout.decode()
    a, b = np.load(two), np.load(one)
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
    for k in a.files:
        scale = max(np.abs(b[k]).max(), 1e-6)
        assert np.abs(a[k] - b[k]).max() / scale < 1e-5, k
