"""The persistent compilation cache: where it lives, and that a second process reuses it."""

from __future__ import annotations

import subprocess
import sys

from tsfd_jax import compilation_cache

SCRIPT = """
import sys, time
import jax, jax.numpy as jnp
from tsfd_jax import compilation_cache
folder = compilation_cache.enable(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
def f(x):
    for i in range(40):
        x = jnp.tanh(x @ x.T + i)
    return x
jax.jit(f).lower(jnp.ones((64, 64))).compile()
print(folder)
"""


def test_flag_env_and_default_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    assert compilation_cache.cache_dir() == tmp_path / "xdg" / "tsfd-jax" / "xla"
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))
    assert compilation_cache.cache_dir() == tmp_path / "env"
    assert compilation_cache.cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert compilation_cache.cache_dir("none") is None
    monkeypatch.setenv(compilation_cache.ENV, "none")
    assert compilation_cache.cache_dir() is None


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    folder = tmp_path / "cache"

    def run():
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == str(folder)
        return sorted(p.name for p in folder.iterdir())

    first = run()
    assert any("-cache" in name or len(name) > 20 for name in first), first
    assert run() == first  # a hit writes no new entry
