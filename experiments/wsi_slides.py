"""Synthetic whole slides for tests and benchmarks: pyramidal tiled TIFF written block by block.

``write_pyramid`` writes any size (40k x 40k included) without holding level 0 in memory: every
level is produced tile by tile from ``block(y, x, h, w)``, which returns level-0 pixels; a level
of downsample d takes its tiles as the d x d block mean of level 0 (numpy), so all levels agree.

Two metadata styles, the two ways a generic reader learns the pixel size:

* ``"aperio"``: Aperio SVS layout (level 0, then the reduced levels, as main-chain pages) with
  the ImageDescription ``Aperio Image Library ... |MPP = 0.25`` (tiffslide and OpenSlide read it);
* ``"tags"``: a generic pyramidal TIFF, levels as SubIFDs of level 0, mpp only in the resolution
  tags (XResolution/YResolution per centimetre);
* ``"none"``: as ``"tags"`` without resolution: a slide without mpp.

``consep_mosaic_block`` builds level-0 content from real H&E tiles (CoNSeP, 256 x 256 at
0.25 um/px) placed on a white background, as a slide scanner's glass around tissue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

Block = Callable[[int, int, int, int], np.ndarray]  # (y, x, h, w) -> uint8 (h, w, 3) level 0
_CHUNK = 2048  # level-0 pixels a side generated at once for a reduced level's tile


def _level_tiles(block: Block, height: int, width: int, factor: int,
                 tile: int) -> Iterator[np.ndarray]:
    """Tiles (raster order) of the level with integer downsample ``factor``."""
    lh, lw = -(-height // factor), -(-width // factor)
    step = max(1, _CHUNK // factor) * factor  # level-0 pixels reduced at a time (bounded memory)
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            out = np.full((tile, tile, 3), 255, np.uint8)
            y, x = ty * factor, tx * factor
            h, w = min(tile * factor, height - y), min(tile * factor, width - x)
            for cy in range(0, h, step):
                for cx in range(0, w, step):
                    ch, cw = min(step, h - cy), min(step, w - cx)
                    src = block(y + cy, x + cx, ch, cw)
                    if factor > 1:
                        ph, pw = -(-ch // factor) * factor, -(-cw // factor) * factor
                        src = np.pad(src, ((0, ph - ch), (0, pw - cw), (0, 0)), mode="edge")
                        src = src.reshape(ph // factor, factor, pw // factor, factor, 3).mean(
                            (1, 3), dtype=np.float32)
                        src = np.round(src).astype(np.uint8)
                    oy, ox = cy // factor, cx // factor
                    out[oy:oy + src.shape[0], ox:ox + src.shape[1]] = src
            yield out


def _rows(tiles: Iterator[np.ndarray], shape: tuple[int, int], tile: int):
    per_row = -(-shape[1] // tile)
    tiles = list(tiles)
    return [tiles[i:i + per_row] for i in range(0, len(tiles), per_row)]


def write_pyramid(path: str | Path, height: int, width: int, block: Block, mpp: float | None,
                  *, levels: int = 3, tile: int = 256, style: str = "aperio",
                  compression: str | None = "zlib") -> Path:
    """A pyramidal tiled RGB TIFF; level k has downsample 2^k. ``mpp`` (level 0) goes into the
    metadata of ``style`` (module doc); None writes no pixel size at all."""
    import tifffile

    path = Path(path)
    big = height * width * 3 > (1 << 31) - (1 << 25)
    dims = [(-(-height // 2 ** k), -(-width // 2 ** k)) for k in range(levels)]
    opts = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression=compression,
                metadata=None)
    with tifffile.TiffWriter(path, bigtiff=big) as tif:
        if style == "aperio":
            desc = (f"Aperio Image Library v12.0.0 \r\n{width}x{height} [0,0 {width}x{height}] "
                    f"({tile}x{tile}) |AppMag = 40" + (f"|MPP = {mpp}" if mpp else ""))
            # SVS page order: level 0, a stripped thumbnail, then the reduced levels (tiled)
            tif.write(_level_tiles(block, height, width, 1, tile), shape=(height, width, 3),
                      description=desc, **opts)
            k = levels - 1
            thumb = np.concatenate([np.concatenate(list(row), 1) for row in _rows(
                _level_tiles(block, height, width, 2 ** k, tile), dims[k], tile)], 0)
            tif.write(thumb[:dims[k][0], :dims[k][1]], photometric="rgb", metadata=None,
                      description=f"Aperio Image Library v12.0.0 \r\n{width}x{height} -> "
                                  f"{dims[k][1]}x{dims[k][0]} - ")
            for k, (h, w) in enumerate(dims[1:], start=1):
                tif.write(_level_tiles(block, height, width, 2 ** k, tile), shape=(h, w, 3),
                          description=f"Aperio level {k}", **opts)
        elif style in ("tags", "none"):
            res = ({} if style == "none" or not mpp else
                   {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"})
            tif.write(_level_tiles(block, height, width, 1, tile), shape=(height, width, 3),
                      subifds=levels - 1, **res, **opts)
            for k, (h, w) in enumerate(dims[1:], start=1):
                lres = ({} if not res else
                        {"resolution": (1e4 / (mpp * 2 ** k),) * 2, "resolutionunit": "CENTIMETER"})
                tif.write(_level_tiles(block, height, width, 2 ** k, tile), shape=(h, w, 3),
                          subfiletype=1, **lres, **opts)
        else:
            raise ValueError(f"style {style!r}: expected aperio, tags or none")
    return path


def saturation(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float32)
    hi, lo = x.max(-1), x.min(-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0.0)


def consep_tiles(folder: str | Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` CoNSeP training tiles (uint8 (256, 256, 3)), drawn reproducibly; colourless
    tiles (CoNSeP has a few nearly grey ones, median saturation below 0.08) are passed over, as
    tissue detection would rightly pass over them."""
    from PIL import Image

    files = sorted(Path(folder).glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .jpg tiles")
    rng = np.random.default_rng(seed)
    tiles = []
    for i in rng.permutation(len(files)):
        t = np.asarray(Image.open(files[i]).convert("RGB"))
        if np.median(saturation(t)) >= 0.08:
            tiles.append(t)
        if len(tiles) == count:
            break
    return tiles


def consep_mosaic_block(tiles: list[np.ndarray], placements: list[tuple[int, int, int]]) -> Block:
    """Level-0 content: white glass with tile ``i`` at every (y, x, i) of ``placements``."""
    boxes = [(y, x, tiles[i]) for y, x, i in placements]

    def block(y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        for ty, tx, t in boxes:
            th, tw = t.shape[:2]
            y0, y1 = max(y, ty), min(y + h, ty + th)
            x0, x1 = max(x, tx), min(x + w, tx + tw)
            if y0 < y1 and x0 < x1:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = t[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
        return out

    return block


def tissue_grid_block(tiles: list[np.ndarray], height: int, width: int, fraction: float = 0.5,
                      seed: int = 0) -> Block:
    """A large slide for benchmarks: tissue islands made of real H&E tiles (a 256-px grid, each
    cell tissue with probability ``fraction``, islands clumped by a coarse random field) on white;
    the cell contents are drawn from ``tiles`` (flipped and rotated) by a hash of the cell, so
    any block is generated on its own in O(block) memory."""
    cell = 256
    ny, nx = -(-height // cell), -(-width // cell)
    rng = np.random.default_rng(seed)
    coarse = rng.random((-(-ny // 8) + 1, -(-nx // 8) + 1))
    fine = rng.random((ny, nx))
    field = 0.6 * np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:ny, :nx] + 0.4 * fine
    tissue = field < np.quantile(field, fraction)
    choice = rng.integers(0, len(tiles) * 8, (ny, nx))

    def cell_image(cy: int, cx: int) -> np.ndarray:
        c = int(choice[cy, cx])
        t = np.rot90(tiles[c // 8], c % 4)
        return t[:, ::-1] if (c // 4) % 2 else t

    def block(y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        for cy in range(y // cell, min(-(-(y + h) // cell), ny)):
            for cx in range(x // cell, min(-(-(x + w) // cell), nx)):
                if not tissue[cy, cx]:
                    continue
                ty, tx = cy * cell, cx * cell
                y0, y1 = max(y, ty), min(y + h, ty + cell)
                x0, x1 = max(x, tx), min(x + w, tx + cell)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = cell_image(cy, cx)[y0 - ty:y1 - ty,
                                                                        x0 - tx:x1 - tx]
        return out

    block.tissue_cells = tissue  # type: ignore[attr-defined]
    return block
