"""show-batch: a picture of what the network is fed, to check data, augmentation and targets.

For each example two rows, plain (``train=False``) and augmented (``train=True``; the same as
plain, and labelled so, when the config switches augmentation off), both through the
device-side preprocessing of the config (``tsfd_jax.ops.preprocess``): the RGB input, each stain
channel (H, E, R of colour deconvolution, paper Eq. 13-15) in grey, the semantic target coloured
per class and the boundary target (paper §3.4). Grey panels are stretched to their own range,
written in the panel's label, so faint channels stay visible.

  python -m tsfd_jax show-batch --data PREPARED_DIR --split fold1 --num 4 --out batch.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tsfd_jax.errors import UserError

# Layout of the picture (pixels): row labels on the left, a caption above every panel.
LEFT = 150
GAP = 6
CAPTION = 16
MIN_PANEL = 128  # small datasets are enlarged so that captions fit above their panel
STAIN_NAMES = ("H", "E", "R")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared dataset folder (from `prepare`)")
    parser.add_argument("--split", default=None,
                        help="split expression, e.g. fold1 or fold1+fold2 (default: the config's "
                             "training split)")
    parser.add_argument("--config", default="configs/default.py",
                        help="config file, optionally with :variant; override fields with "
                             "--config.a.b=value (default: %(default)s)")
    parser.add_argument("--num", type=int, default=4, help="examples to show (default: 4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="picks the examples and the augmentation (default: 0)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


# ---- pure picture helpers --------------------------------------------------------------------

def class_palette(label_names: Sequence[str]) -> np.ndarray:
    """(C+1, 3) uint8 colours: black background, PanNuke colours for PanNuke classes, a generic
    palette (matplotlib's tab10 values) for other class lists."""
    from tsfd_jax.constants import PANNUKE_CLASS_COLORS, PANNUKE_CLASSES

    generic = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    colours = [(0, 0, 0)]
    for j, name in enumerate(label_names[1:]):
        if name in PANNUKE_CLASSES:
            colours.append(PANNUKE_CLASS_COLORS[PANNUKE_CLASSES.index(name)])
        else:
            colours.append(generic[j % len(generic)])
    return np.asarray(colours, np.uint8)


def colorize(cls: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class labels -> (H, W, 3) uint8; labels beyond the palette show white."""
    lut = np.concatenate([palette, np.full((256 - len(palette), 3), 255, np.uint8)])
    return lut[np.clip(cls, 0, 255).astype(np.intp)]


def grey(x: np.ndarray) -> tuple[np.ndarray, str]:
    """(H, W) float -> (H, W, 3) uint8 stretched to its own [min, max], and that range as text."""
    x = np.asarray(x, np.float64)
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        g = np.zeros(x.shape, np.uint8)
    else:
        g = np.round((x - lo) / (hi - lo) * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1), f"[{lo:.2f}, {hi:.2f}]"


def compose(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], panel: int):
    """Rows of (row label, [(caption, (h, w, 3) uint8)]) -> one PIL image; panels resized to
    ``panel`` x ``panel`` (nearest neighbour, so labels keep their colours)."""
    from PIL import Image, ImageDraw

    ncols = max(len(cells) for _, cells in rows)
    width = LEFT + ncols * (panel + GAP)
    height = len(rows) * (CAPTION + panel + GAP)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row_label, cells) in enumerate(rows):
        y = r * (CAPTION + panel + GAP)
        for line, text in enumerate(row_label.split("\n")):
            draw.text((4, y + CAPTION + 4 + 14 * line), text, fill=(0, 0, 0))
        for c, (caption, pixels) in enumerate(cells):
            x = LEFT + c * (panel + GAP)
            draw.text((x, y + 2), caption, fill=(0, 0, 0))
            tile = Image.fromarray(np.ascontiguousarray(pixels, np.uint8))
            canvas.paste(tile.resize((panel, panel), Image.Resampling.NEAREST), (x, y + CAPTION))
    return canvas


def example_cells(inputs: np.ndarray, targets: dict, j: int, palette: np.ndarray) -> list:
    """Panels of example ``j``: RGB, stain channels, semantic and boundary targets."""
    cells = [("RGB", np.clip(np.round(inputs[j, ..., :3] * 255), 0, 255).astype(np.uint8))]
    for c in range(3, inputs.shape[-1]):
        name = STAIN_NAMES[c - 3] if c - 3 < len(STAIN_NAMES) else f"ch{c}"
        pixels, rng = grey(inputs[j, ..., c])
        cells.append((f"{name} {rng}", pixels))
    cells.append(("semantic", colorize(np.asarray(targets["cls"][j]), palette)))
    b = np.asarray(targets["boundary"][j], np.float64)
    if b.ndim == 3:  # HoVer-Net's maps in [-1, 1], and the boundary map made of them
        from tsfd_jax.ops.targets import hv_energy
        for c, name in enumerate(("horizontal", "vertical")):
            cells.append((f"{name} map", _unit_grey((b[..., c] + 1) / 2)))
        cells.append(("boundary (hv energy)", _unit_grey(np.asarray(hv_energy(b[None]))[0])))
    else:
        cells.append(("boundary", _unit_grey(b)))
    return cells


def _unit_grey(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as grey RGB uint8, not stretched (a target's 0 stays black)."""
    g = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


# ---- command ---------------------------------------------------------------------------------

class _Subset:
    """The chosen positions of a source, in order (random access, like the source)."""

    def __init__(self, source: Any, positions: Sequence[int]):
        self.source, self.positions = source, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        return self.source[self.positions[i]]


def write_png_atomic(image, out: Path) -> None:
    from tsfd_jax import atomic

    atomic.save_png(out, image)


def run(args: argparse.Namespace) -> int:
    import jax

    from tsfd_jax.config_files import load_config
    from tsfd_jax.data.pipeline import eval_batches
    from tsfd_jax.data.prepared import open_prepared
    from tsfd_jax.ops.preprocess import make_preprocess_fn

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: --out must name a .png file")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: folder does not exist")
    if args.num < 1:
        raise UserError(f"--num {args.num}: must be at least 1")

    cfg = load_config(args.config, getattr(args, "config_overrides", []))
    prepared = open_prepared(args.data)
    split = args.split or cfg.data.train_split
    source = prepared.source(split)
    if len(source) == 0:
        raise UserError(f"{args.data}: split {split!r} holds no examples")
    num = min(args.num, len(source))
    rng = np.random.default_rng(args.seed)
    positions = np.sort(rng.choice(len(source), size=num, replace=False))
    batch = next(eval_batches(_Subset(source, positions), num, process_index=0, process_count=1))
    keys = batch.pop("key")
    device_batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}

    preprocess = make_preprocess_fn(cfg)
    key = jax.random.key(args.seed)
    plain = jax.device_get(jax.jit(lambda b, k: preprocess(b, k, False))(device_batch, key))
    augmented = jax.device_get(jax.jit(lambda b, k: preprocess(b, k, True))(device_batch, key))

    label_names = prepared.metadata.get("label_names") or list(cfg.data.label_names)
    palette = class_palette(label_names)
    rows = []
    # With augmentation off (configs/demo.py) both rows are the same; the label says why.
    train_name = "augmented" if cfg.augment.get("enabled", False) else "training (no augment)"
    for j in range(num):
        for name, (inputs, targets) in (("plain", plain), (train_name, augmented)):
            cells = example_cells(np.asarray(inputs), targets, j, palette)
            rows.append((f"{keys[j]}\n{name}", cells))
    panel = max(int(np.asarray(plain[1]["cls"]).shape[1]), MIN_PANEL)
    write_png_atomic(compose(rows, panel), out)
    print(f"wrote {out} ({num} examples of {split!r}, plain and {train_name} rows)")
    return 0
