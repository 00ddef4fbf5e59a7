"""Config -> prepared dataset -> split source: what training and evaluation read.

Image sizes (docs/data.md): the network trains on ``data.image_size`` squares. Larger (or
mixed-size) training images are cut by a random crop of that size at every draw
(``pipeline.RandomCrop``); evaluation sees a split whose images share one size at that size
(the model is fully convolutional; the input keeps the trained ratio), other splits as a fixed
grid of ``data.eval_size`` tiles (default ``data.image_size``).

``data.root`` may be an already prepared dataset (used as is) or raw data that is prepared once
into ``data.prepared_dir`` (default ``<workdir>/prepared``): a folder holding PanNuke ``Fold N``
folders (``data.source = 'pannuke'``) or an image + label folder (``'folders'``). Preparing again
with the same input is a no-op, so every run and evaluation can call this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

from tsfd_jax.data.pipeline import TiledSource
from tsfd_jax.data.prepared import COMPLETE, METADATA, PreparedDataset, open_prepared
from tsfd_jax.data.sampling import check_mode, image_labels, sampling_weights
from tsfd_jax.data.split_lists import resolve_split
from tsfd_jax.errors import UserError
from tsfd_jax.ops.preprocess import at_label_size, input_size_at


def is_prepared(path: Path) -> bool:
    return (path / METADATA).exists() and (path / COMPLETE).exists()


def _prepare_once(source: str, root: Path, out: Path, cfg) -> PreparedDataset:
    """Prepare on process 0 while the others wait (one writer per folder)."""
    # Imported here: a run on prepared data starts without it (tfds' writers, ~0.2 s).
    from tsfd_jax.data.prepare import prepare

    if jax.process_index() == 0:
        prepare(source, [root], out, val_fraction=float(cfg.data.get("val_fraction", 0.0)),
                seed=int(cfg.seed), classes=_classes(cfg, source))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"prepared {out}")
    return open_prepared(out)


def _classes(cfg, source: str):
    if source != "folders":
        return None
    names = tuple(cfg.data.label_names)[1:]
    return names or None


def open_data(cfg, workdir: str | Path, data: str | Path = "") -> PreparedDataset:
    """The prepared dataset named by ``data`` (default ``cfg.data.root``), prepared if needed."""
    root = Path(data or cfg.data.root).expanduser()
    if not str(data or cfg.data.root):
        raise UserError("no data given: set --config.data.root to a PanNuke folder, an image + "
                        "label folder or a prepared dataset")
    if not root.exists():
        raise UserError(f"{root}: data folder does not exist")
    if is_prepared(root):
        prepared = open_prepared(root)
    else:
        source = str(cfg.data.source)
        if source == "prepared":
            raise UserError(f"{root}: not a prepared dataset (no {METADATA} and {COMPLETE})")
        if source not in ("pannuke", "folders"):
            raise UserError(f"data.source {source!r}: expected pannuke, folders or prepared")
        base = Path(cfg.data.prepared_dir) if cfg.data.prepared_dir else Path(workdir) / "prepared"
        out = base if not data else base.with_name(f"{base.name}-{root.name}")
        prepared = _prepare_once(source, root, out, cfg)
    check_compatible(prepared, cfg)
    return prepared


def check_compatible(prepared: PreparedDataset, cfg) -> None:
    want = tuple(cfg.data.label_names)
    if tuple(prepared.label_names) != want:
        raise UserError(
            f"{prepared.root}: its classes {list(prepared.label_names)} differ from the config's "
            f"data.label_names {list(want)}; set --config.data.label_names accordingly")
    if cfg.model.tissue_head:
        if not prepared.tissue_names:
            raise UserError(f"{prepared.root}: this dataset has no tissue labels; use a CBB config "
                            "(--config.model.tissue_head=False)")
        if tuple(prepared.tissue_names) != tuple(cfg.data.tissue_names):
            raise UserError(f"{prepared.root}: its tissues differ from data.tissue_names")


def example_shapes(prepared: PreparedDataset, source: Any) -> list[tuple[int, int]]:
    """(H, W) of every example of ``source``: from the metadata when the dataset has one size,
    else read once from the records."""
    size = prepared.metadata.get("image_size")
    if size:
        h, w = (size, size) if isinstance(size, int) else size
        return [(int(h), int(w))] * len(source)
    return [tuple(int(n) for n in source[i]["inst"].shape) for i in range(len(source))]


def _too_small(shapes, keys, size: int, root: Path, what: str) -> None:
    small = [(k, s) for k, s in zip(keys, shapes) if min(s) < size]
    if small:
        (k, (h, w)), n = small[0], len(small)
        raise UserError(f"{root}: {n} image(s) smaller than {what} {size} px (first: {k}, "
                        f"{h} x {w}); lower {what} or pad the images")


def load_split(cfg, workdir: str | Path, role: str):
    """Random-access source of the config's ``role`` split (train | val | test)."""
    return _split(cfg, workdir, role)[1]


def _split(cfg, workdir: str | Path, role: str):
    prepared = open_data(cfg, workdir)
    source = resolve_split(prepared, cfg.data, role)
    if len(source) == 0:
        raise UserError(f"{prepared.root}: the {role} split is empty")
    return prepared, source


def load_train(cfg, workdir: str | Path) -> tuple[Any, int | None, np.ndarray | None]:
    """(training source, crop size or None, sampling weights or None): images larger than
    ``data.image_size`` are cropped at random to it, smaller ones refused; ``data.sampling``
    weights the draws (sampling.py)."""
    prepared, source = _split(cfg, workdir, "train")
    size = int(cfg.data.image_size)
    shapes = example_shapes(prepared, source)
    _too_small(shapes, source.keys, size, prepared.root, "data.image_size")
    mode = check_mode(str(cfg.data.get("sampling", "") or ""))
    weights = None
    if mode:
        if "tissue" in mode and not prepared.tissue_names:
            raise UserError(f"{prepared.root}: data.sampling {mode!r} needs tissue labels, "
                            "which this dataset does not have")
        presence, tissues = image_labels(source, len(cfg.data.label_names) - 1)
        weights = sampling_weights(mode, float(cfg.data.get("sampling_gamma", 0.85)),
                                   presence, tissues)
    return source, (None if set(shapes) == {(size, size)} else size), weights


def eval_view(cfg, prepared: PreparedDataset, source: Any):
    """(config at the evaluation size, source at that size) for evaluating ``source``.

    A split whose images share one square size S is evaluated whole at S where the network
    input fits (``input_size_at``); otherwise, or when ``data.eval_size`` is set, every image is
    cut into a grid of that many pixels (the last tile of a row or column shifted inside).
    """
    label = int(cfg.data.image_size)
    want = int(cfg.data.get("eval_size", 0) or 0)
    shapes = example_shapes(prepared, source)
    if not want:
        one = set(shapes)
        s = next(iter(one))[0] if len(one) == 1 and len(set(next(iter(one)))) == 1 else 0
        want = s if s and input_size_at(cfg, s) else label
    if input_size_at(cfg, want) is None:
        raise UserError(f"data.eval_size {want}: the network input (x {cfg.input.size}/{label}) "
                        "must be a multiple of 32 pixels")
    _too_small(shapes, source.keys, want, prepared.root, "the evaluation size")
    if set(shapes) != {(want, want)}:
        from tsfd_jax.predict import tile_starts  # predict's imports cost training's start-up

        tiles = [(i, y, x) for i, (h, w) in enumerate(shapes)
                 for y in tile_starts(h, want, 0) for x in tile_starts(w, want, 0)]
        source = TiledSource(source, tiles, want)
    return at_label_size(cfg, want), source


def load_eval_split(cfg, workdir: str | Path, role: str):
    """``eval_view`` of the config's ``role`` split."""
    return eval_view(cfg, *_split(cfg, workdir, role))


def eval_source(cfg, workdir: str | Path, data: str | Path, split: str):
    """For ``evaluate``: (config at the evaluation size, source, name for the report) of the
    run's data or another dataset (``eval_view``)."""
    prepared = open_data(cfg, workdir, data)
    if data and split not in prepared.splits and "+" not in split:
        split = "+".join(prepared.splits) if len(prepared.splits) == 1 else split
    try:
        source = prepared.source(split)
    except (KeyError, ValueError) as e:
        raise UserError(f"{prepared.root}: no split {split!r} (have {', '.join(prepared.splits)})"
                        ) from e
    label = f"{Path(data).name}-{split}" if data else split
    return (*eval_view(cfg, prepared, source), label.replace("+", "_"))
