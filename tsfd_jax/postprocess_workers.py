"""Post-processing of many images on host worker processes (``postprocess.postprocess`` per
image): whole batches (``postprocess_batch``) or a stream overlapped with the device
(``postprocess_stream``)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator

import numpy as np

from tsfd_jax.postprocess import Instances, PostprocessParams, postprocess


def _run_many(seg_probs: np.ndarray, boundary_probs: np.ndarray,
              params: PostprocessParams) -> list[Instances]:
    return [postprocess(s, b, params) for s, b in zip(seg_probs, boundary_probs)]


def make_executor(workers: int) -> cf.ProcessPoolExecutor | None:
    """A process pool for post-processing (None for ``workers <= 0``).

    forkserver (spawn where unavailable): forking a process that runs JAX is unsafe.
    """
    if workers <= 0:
        return None
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method))


def _run_spilled(folder: str, a: int, b: int, params: PostprocessParams) -> list[Instances]:
    seg = np.load(os.path.join(folder, "seg.npy"), mmap_mode="r")
    bdr = np.load(os.path.join(folder, "bdr.npy"), mmap_mode="r")
    return _run_many(seg[a:b], bdr[a:b], params)


def spill_arrays(arrays: dict[str, np.ndarray]) -> str:
    """A new temporary folder (memory-backed /dev/shm where present) holding ``<name>.npy`` of
    every array, for worker processes to map instead of receiving pickles. The caller removes
    it (``shutil.rmtree``)."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="tsfd-postprocess-", dir=base)
    try:
        for name, array in arrays.items():
            np.save(os.path.join(folder, f"{name}.npy"), np.asarray(array))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


class _Pending:
    """A batch handed to the pool. The arrays go through a memory-backed temporary folder
    (/dev/shm where present) instead of being pickled into the pipe, which cost more than
    the post-processing itself."""

    def __init__(self, pool: cf.ProcessPoolExecutor, seg_probs, boundary_probs, params,
                 workers: int):
        self.folder = spill_arrays({"seg": seg_probs, "bdr": boundary_probs})
        try:
            n = len(seg_probs)
            step = max(1, -(-n // (4 * workers)))  # several pieces per worker: even load
            self.futures = [pool.submit(_run_spilled, self.folder, a, min(a + step, n), params)
                            for a in range(0, n, step)]
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def result(self) -> list[Instances]:
        try:
            return [inst for f in self.futures for inst in f.result()]
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def postprocess_batch(seg_probs: np.ndarray, boundary_probs: np.ndarray, cfg_pp: Any = None,
                      workers: int = 0,
                      executor: cf.ProcessPoolExecutor | None = None) -> list[Instances]:
    """(N, H, W, C + 1) softmax and (N, H, W[, 1]) boundary probabilities -> N Instances.

    ``workers`` > 0 splits the images over that many processes, started for this call unless
    an ``executor`` (``make_executor``) is given; ``postprocess_stream`` keeps them for many
    batches.
    """
    params = PostprocessParams.of(cfg_pp)
    if workers <= 0 or len(seg_probs) <= 1:
        return _run_many(seg_probs, boundary_probs, params)
    if executor is not None:
        return _Pending(executor, seg_probs, boundary_probs, params, workers).result()
    with make_executor(workers) as pool:
        return _Pending(pool, seg_probs, boundary_probs, params, workers).result()


def postprocess_stream(batches: Iterable[tuple[np.ndarray, np.ndarray]], cfg_pp: Any = None,
                       workers: int = 0) -> Iterator[list[Instances]]:
    """Post-process a stream of (seg_probs, boundary_probs) batches, in order.

    With workers, batch n is handed to the pool before the results of batch n - 1 are
    yielded, so the caller (the device) computes the next batch while the workers run.
    """
    params = PostprocessParams.of(cfg_pp)
    if workers <= 0:
        for seg, bdr in batches:
            yield _run_many(seg, bdr, params)
        return
    with make_executor(workers) as pool:
        pending = None
        try:
            for seg, bdr in batches:
                previous, pending = pending, _Pending(pool, seg, bdr, params, workers)
                if previous is not None:
                    yield previous.result()
            if pending is not None:
                last, pending = pending, None
                yield last.result()
        finally:
            if pending is not None:  # the caller stopped early: drop the spilled arrays
                pending.result()
