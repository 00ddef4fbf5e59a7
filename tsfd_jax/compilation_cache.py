"""JAX's persistent compilation cache, on by default for every command that compiles.

Compiling the train step takes about a minute on a CPU (BENCHMARKS.md); with the cache a second
run of the same config, a resumed run or another workdir with the same config loads the compiled
steps from disk instead. The folder is, in order of precedence: the command's
``--compilation-cache DIR`` (``none`` switches the cache off), the standard
``JAX_COMPILATION_CACHE_DIR`` environment variable, then ``$XDG_CACHE_HOME/tsfd-jax/xla`` (default
``~/.cache/tsfd-jax/xla``). Entries are keyed by the program, the backend, the jax version and
the XLA flags, so a stale entry is never used; deleting the folder is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "JAX_COMPILATION_CACHE_DIR"
# Cache everything that took at least this long to compile: the train, eval and predict steps
# (seconds to minutes) and the state initialiser, not the many tiny helper computations.
MIN_COMPILE_SECONDS = 0.5
OFF = ("none", "off", "")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tsfd-jax" / "xla"


def cache_dir(flag: str | None = None) -> Path | None:
    """The folder the cache uses for ``--compilation-cache flag`` (None: switched off)."""
    if flag is not None:
        return None if flag.strip().lower() in OFF else Path(flag).expanduser()
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env).expanduser()
    return default_dir()


def enable(flag: str | None = None) -> Path | None:
    """Switch the persistent cache on (or off) for this process; returns the folder used."""
    folder = cache_dir(flag)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # an unwritable cache only costs time: compile as usual
        print(f"warning: compilation cache {folder} is not usable ({e}); compiling every run")
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
