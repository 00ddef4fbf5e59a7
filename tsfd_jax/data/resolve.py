"""Config -> prepared dataset -> split source: what training and evaluation read.

``data.root`` may be an already prepared dataset (used as is) or raw data that is prepared once
into ``data.prepared_dir`` (default ``<workdir>/prepared``): a folder holding PanNuke ``Fold N``
folders (``data.source = 'pannuke'``) or an image + label folder (``'folders'``). Preparing again
with the same input is a no-op, so every run and evaluation can call this.
"""

from __future__ import annotations

from pathlib import Path

import jax

from tsfd_jax.data.prepare import COMPLETE, METADATA, PreparedDataset, open_prepared, prepare
from tsfd_jax.data.splits import resolve_split
from tsfd_jax.errors import UserError


def is_prepared(path: Path) -> bool:
    return (path / METADATA).exists() and (path / COMPLETE).exists()


def _prepare_once(source: str, root: Path, out: Path, cfg) -> PreparedDataset:
    """Prepare on process 0 while the others wait (one writer per folder)."""
    if jax.process_index() == 0:
        prepare(source, [root], out, val_fraction=float(cfg.data.get("val_fraction", 0.0)),
                seed=int(cfg.seed), classes=_classes(cfg, source))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
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
    size = prepared.metadata.get("image_size")
    if size and int(size[0] if isinstance(size, (list, tuple)) else size) != int(cfg.data.image_size):
        raise UserError(f"{prepared.root}: images are {size} px but data.image_size is "
                        f"{cfg.data.image_size}; set --config.data.image_size")


def load_split(cfg, workdir: str | Path, role: str):
    """Random-access source of the config's ``role`` split (train | val | test)."""
    prepared = open_data(cfg, workdir)
    source = resolve_split(prepared, cfg.data, role)
    if len(source) == 0:
        raise UserError(f"{prepared.root}: the {role} split is empty")
    return source


def eval_source(cfg, workdir: str | Path, data: str | Path, split: str):
    """Source for ``evaluate``: the run's data or another dataset, and a name for the report."""
    prepared = open_data(cfg, workdir, data)
    if data and split not in prepared.splits and "+" not in split:
        split = "+".join(prepared.splits) if len(prepared.splits) == 1 else split
    try:
        source = prepared.source(split)
    except (KeyError, ValueError) as e:
        raise UserError(f"{prepared.root}: no split {split!r} (have {', '.join(prepared.splits)})"
                        ) from e
    label = f"{Path(data).name}-{split}" if data else split
    return source, label.replace("+", "_")
