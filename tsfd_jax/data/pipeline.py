"""Host input pipelines (grain): shuffled, repeated, per-process training batches; ordered,
padded evaluation batches; host-local batches -> global sharded ``jax.Array``.

This is the host half of the data flow of docs/data.md (files -> prepared records -> grain on the
host -> device). Everything here is numpy: augmentation, stain channels and targets run later on
the device (``tsfd_jax.ops.preprocess``). Host batches (docs/data.md):

  image (B, H, W, 3) uint8 RGB     inst (B, H, W) int32     cls (B, H, W) uint8
  tissue (B,) int32                index (B,) int32 (position in the source; -1 for padding)
  valid (B,) bool (False for padding examples)
  key: list of B str (evaluation batches only; host side, never sent to the device)

B is the per-process batch: the global batch divided by the number of processes. Each process
reads only its own shard of the source (multi-host, README, Training) and ``to_global`` assembles the
process-local batches into one global array sharded over the mesh axis ``data``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

# Per-example fields that travel to the device, with their host dtypes. ``key`` (str) does not
# batch into a device array, so training batches carry ``index`` instead to trace examples.
_ARRAY_FIELDS = {"image": np.uint8, "inst": np.int32, "cls": np.uint8, "tissue": np.int32}


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # lazily: grain worker processes unpickle this module and need no jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    return process_index, process_count


def _per_process_batch(batch_size: int, process_count: int, what: str) -> int:
    if batch_size < 1:
        raise ValueError(f"{what} must be positive, got {batch_size}")
    if batch_size % process_count:
        raise ValueError(
            f"{what} {batch_size} is not divisible by the number of processes {process_count}; "
            "every process must read the same number of examples per step")
    return batch_size // process_count


def _ensure_absl_flags_parsed() -> None:
    """grain's worker start-up reads absl flags; outside ``absl.app.run`` they are unparsed and
    grain fails with UnparsedFlagAccessError. Marking them parsed keeps the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _element(example: Mapping[str, Any], index: int, valid: bool) -> dict[str, Any]:
    """One prepared example -> one host batch element (fixed dtypes, ``key`` dropped)."""
    out = {k: np.asarray(example[k], dtype=t) for k, t in _ARRAY_FIELDS.items()}
    out["index"] = np.int32(index)
    out["valid"] = np.bool_(valid)
    return out


class _IndexedSource:
    """Random-access source returning ``(position, example)`` so training batches can carry the
    example's position after shuffling. Top-level and picklable for grain worker processes."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return int(i), self.source[int(i)]

    def __repr__(self) -> str:
        return f"_IndexedSource({self.source!r})"


class RandomCrop(grain.transforms.RandomMap):
    """(position, example) -> the same with image, inst and cls cropped to ``size`` x ``size`` at
    a uniformly drawn origin (every origin of the image equally likely). grain draws the
    generator from the dataset seed and the element's position in the endless stream, so a crop
    depends on (seed, epoch, example) only and a restored iterator draws the same crops. An
    example already of the crop size is returned unchanged."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"crop size must be positive, got {size}")
        self.size = int(size)

    def random_map(self, item: tuple[int, Mapping[str, Any]], rng: np.random.Generator
                   ) -> tuple[int, dict[str, Any]]:
        i, example = item
        h, w = np.shape(example["inst"])
        s = self.size
        if h < s or w < s:
            raise ValueError(f"example {example.get('key', i)!r} is {h} x {w} px, smaller than the "
                             f"crop of {s} px (data.image_size)")
        if (h, w) == (s, s):
            return item
        y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out = dict(example)
        for k in ("image", "inst", "cls"):
            out[k] = np.ascontiguousarray(np.asarray(example[k])[y0:y0 + s, x0:x0 + s])
        return i, out


class TiledSource:
    """Random access over fixed tiles of a source's examples: ``tiles`` lists (example position,
    y0, x0); item ``t`` is that example cut to ``size`` x ``size`` at (y0, x0), keyed
    ``'<key>@<y0>,<x0>'``. Evaluates images larger than the network's tile at a fixed size."""

    def __init__(self, source: Any, tiles: list[tuple[int, int, int]], size: int):
        self.source, self.tiles, self.size = source, list(tiles), int(size)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, t: int) -> dict[str, Any]:
        i, y0, x0 = self.tiles[int(t)]
        example, s = self.source[i], self.size
        out = dict(example)
        for k in ("image", "inst", "cls"):
            out[k] = np.ascontiguousarray(np.asarray(example[k])[y0:y0 + s, x0:x0 + s])
        out["key"] = f"{example['key']}@{y0},{x0}"
        return out

    def __repr__(self) -> str:
        return f"TiledSource({self.source!r}, {len(self.tiles)} tiles of {self.size} px)"


_ENDLESS = 1 << 60  # stream length of weighted sampling: never reached


class _WeightedDraw:
    """Stream position k -> (source position, example), drawn with replacement in proportion to
    ``weights`` over the shard ``positions``: epoch e = k // len(positions) draws its
    len(positions) examples from a generator seeded (seed, e), so a draw depends on (seed, k)
    only and a restored iterator continues the same stream. Picklable for grain workers."""

    def __init__(self, source: Any, positions: np.ndarray, weights: np.ndarray, seed: int):
        self.source, self.positions, self.seed = source, np.asarray(positions), int(seed)
        w = np.asarray(weights, np.float64)
        if w.shape != self.positions.shape or not np.isfinite(w).all() or (w < 0).any() \
                or w.sum() <= 0:
            raise ValueError("sampling weights must be finite, non-negative, one per example, "
                             "and not all zero")
        self.p = w / w.sum()
        self._epoch: tuple[int, np.ndarray] | None = None

    def _draws(self, epoch: int) -> np.ndarray:
        cached = self._epoch
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            cached = (epoch, rng.choice(len(self.p), len(self.p), p=self.p))
            self._epoch = cached
        return cached[1]

    def __call__(self, k: int) -> tuple[int, Any]:
        epoch, j = divmod(int(k), len(self.positions))
        i = int(self.positions[self._draws(epoch)[j]])
        return i, self.source[i]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_epoch": None}


class _ToTrainElement(grain.transforms.Map):
    """(position, prepared example) -> host batch element; every training example is valid."""

    def map(self, item: tuple[int, Mapping[str, Any]]) -> dict[str, Any]:
        i, example = item
        return _element(example, i, True)


def train_iterator(source: Any, global_batch_size: int, seed: int, num_workers: int = 0,
                   prefetch: int = 2, process_index: int | None = None,
                   process_count: int | None = None,
                   crop_size: int | None = None,
                   weights: np.ndarray | None = None) -> grain.DatasetIterator:
    """Endless, shuffled training batches of this process's shard (checkpointable iterator).

    ``source``: random access (``__len__``, ``__getitem__`` -> prepared example dict), picklable
    when ``num_workers > 0``. Process ``p`` of ``n`` reads the strided shard ``source[p::n]``
    (shards are disjoint and together cover the source; they differ in length by at most one).
    The shard is shuffled with ``seed`` and reshuffled each epoch; batches run across epoch
    boundaries, so no example is ever dropped. With ``weights`` (one per example of ``source``)
    each epoch instead draws as many examples as the shard holds, with replacement, in
    proportion to them (``_WeightedDraw``). With ``crop_size`` every example is cut to a random
    ``crop_size`` square (``RandomCrop``; examples may then differ in size). Yields dicts of
    (global_batch_size // n, ...) numpy arrays (module docstring; ``valid`` all True, no ``key``).

    The same seed gives the same batches with any ``num_workers``. The iterator's
    ``get_state()``/``set_state()`` resume it exactly; for orbax use
    ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(fresh_it)`` with
    ``grain.checkpoint.CheckpointHandler()`` (states are per process: resume with the same
    process count). Call ``it.close()`` when done with workers.
    """
    p, n = _process(process_index, process_count)
    local_batch = _per_process_batch(global_batch_size, n, "global batch size")
    if len(source) == 0:
        raise ValueError("the training source is empty")
    if num_workers < 0 or prefetch < 0:
        raise ValueError(f"num_workers ({num_workers}) and prefetch ({prefetch}) must be >= 0")
    ds = grain.MapDataset.source(_IndexedSource(source))
    ds = ds[p::n]
    if len(ds) < local_batch:
        raise ValueError(
            f"process {p} of {n} holds {len(ds)} training examples of {len(source)}, fewer than "
            f"one per-process batch of {local_batch}; use a smaller global batch or more data")
    if weights is None:
        ds = ds.seed(seed).shuffle()
        ds = ds.repeat(None)  # reshuffles each epoch (reseed_each_epoch)
    else:
        positions = np.arange(len(source))[p::n]
        draw = _WeightedDraw(source, positions, np.asarray(weights)[p::n], seed)
        ds = grain.MapDataset.range(_ENDLESS).map(draw)
    if crop_size:
        ds = ds.random_map(RandomCrop(crop_size), seed=seed)
    ds = ds.map(_ToTrainElement())
    ds = ds.batch(local_batch, drop_remainder=True)
    # Each read is a whole batch; `prefetch` threads keep `prefetch` batches ready.
    read = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    it_ds = ds.to_iter_dataset(read)
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)))
    return iter(it_ds)


def eval_shard(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Contiguous, balanced evaluation shard ``[start, stop)`` of process ``p`` of ``n``: sizes
    differ by at most one, and concatenating the shards in process order gives the source order."""
    return (process_index * num_examples // process_count,
            (process_index + 1) * num_examples // process_count)


class _EvalBatch:
    """Batch number -> padded evaluation batch of the shard ``[start, stop)``. Padding repeats
    the shard's (or source's) first example with ``valid`` False, ``index`` -1 and key '' (a copy
    keeps every value finite downstream, unlike an all-zero image)."""

    def __init__(self, source: Any, start: int, stop: int, batch_size: int):
        self.source, self.start, self.stop, self.batch_size = source, start, stop, batch_size

    def __call__(self, b: int) -> dict[str, Any]:
        first = self.start + b * self.batch_size
        positions = range(first, min(first + self.batch_size, self.stop))
        examples = [self.source[i] for i in positions]
        elements = [_element(e, i, True) for e, i in zip(examples, positions)]
        keys = [str(e["key"]) for e in examples]
        if len(elements) < self.batch_size:
            # A batch past the end of the shard (or an empty shard) copies the source's first.
            pad = examples[0] if examples else self.source[0]
            elements += [_element(pad, -1, False)] * (self.batch_size - len(elements))
            keys += [""] * (self.batch_size - len(keys))
        try:
            batch = {k: np.stack([e[k] for e in elements]) for k in elements[0]}
        except ValueError as err:
            raise ValueError(f"examples {keys} cannot be batched together: {err}") from None
        batch["key"] = keys
        return batch


def eval_batches(source: Any, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, num_workers: int = 0) -> Iterator[dict]:
    """Every example of this process's shard once, in source order, in padded batches.

    ``batch_size`` is global, like ``train_iterator``'s: each of the ``n`` processes yields
    batches of ``batch_size // n``. Process ``p`` reads the contiguous shard ``eval_shard(...)``.
    The last partial batch is padded (``valid`` False, ``index`` -1, ``key`` ''), and every process
    yields the same number of batches (fully invalid ones where its shard is shorter), so a
    multi-host jitted eval step runs the same number of times everywhere. Yields dicts of numpy
    arrays (module docstring) plus ``key`` (list of str).
    """
    p, n = _process(process_index, process_count)
    local_batch = _per_process_batch(batch_size, n, "eval batch size")
    if len(source) == 0:
        raise ValueError("the evaluation source is empty")
    start, stop = eval_shard(len(source), p, n)
    longest = max(b - a for a, b in (eval_shard(len(source), q, n) for q in range(n)))
    num_batches = -(-longest // local_batch)
    make = _EvalBatch(source, start, stop, local_batch)
    if num_workers <= 0:
        return (make(b) for b in range(num_batches))
    _ensure_absl_flags_parsed()
    ds = grain.MapDataset.range(num_batches).map(make)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return _owned(iter(it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))))


def _owned(it: grain.DatasetIterator) -> Iterator[dict]:
    """Worker batches as plain arrays (copied out of grain's shared memory, which is then freed
    at once rather than at interpreter exit); the workers stop when the batches run out."""
    try:
        for batch in it:
            yield {k: v if k == "key" else np.array(v) for k, v in batch.items()}
    finally:
        it.close()


def to_global(batch: Mapping[str, Any], mesh: Any, axis: str = "data") -> dict[str, Any]:
    """Host-local numpy batch -> dict of global ``jax.Array`` sharded ``P(axis)`` on ``mesh``.

    Each process passes its own (B_local, ...) arrays; the global batch is their concatenation in
    process order, (B_local * process_count, ...). Non-array entries (``key``, strings) stay on
    the host and are dropped. With one process this is a sharded ``device_put``.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(axis))
    out = {}
    for name, value in batch.items():
        if isinstance(value, (list, tuple, str)):
            continue
        value = np.asarray(value)
        if value.dtype.kind in "USO":
            continue
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % mesh.shape[axis]:
            raise ValueError(
                f"batch field {name!r}: global batch {global_rows} is not divisible by the "
                f"{mesh.shape[axis]} devices of mesh axis {axis!r}")
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out
