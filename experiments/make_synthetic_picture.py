"""Picture of synthetic PanNuke patches (docs/images/synthetic.png).

Each column is one patch of a different tissue: the image on top, the same image with the
nucleus outlines coloured by class below (constants.PANNUKE_CLASS_COLORS).

  python experiments/make_synthetic_picture.py --out docs/images/synthetic.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from tsfd_jax import constants
from tsfd_jax.data import synthetic

DEFAULT_TISSUES = ("Breast", "Colon", "Adrenal_gland", "Lung", "Skin", "Thyroid", "Uterus", "Liver")


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(S,S,3) uint8 image with 1-px instance outlines of PanNuke mask (S,S,6) by class."""
    out = image.astype(np.uint8).copy()
    for c, color in enumerate(constants.PANNUKE_CLASS_COLORS):
        edge = find_boundaries(mask[..., c].astype(np.int64), mode="inner")
        out[edge] = color
    return out


def picture(tissues: tuple[str, ...], seed: int, size: int, rows: int = 1) -> Image.Image:
    label_h, pad = 18, 4
    cols = len(tissues)
    canvas = Image.new("RGB", (cols * (size + pad) + pad, rows * (2 * size + label_h + 2 * pad) + pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        for c, tissue in enumerate(tissues):
            # one stream index per panel: panels sharing an index would share their layout
            img, mask, _ = synthetic.generate(1, seed, size, tissues=(tissue,), start_index=r * cols + c)
            x = pad + c * (size + pad)
            y = pad + r * (2 * size + label_h + 2 * pad)
            draw.text((x + 2, y + 3), tissue, fill="black")
            canvas.paste(Image.fromarray(img[0].astype(np.uint8)), (x, y + label_h))
            canvas.paste(Image.fromarray(overlay(img[0], mask[0])), (x, y + label_h + size + pad))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/synthetic.png")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--tissues", default=",".join(DEFAULT_TISSUES))
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img = picture(tuple(args.tissues.split(",")), args.seed, args.size, args.rows)
    # a 256-colour palette (the outline colours exact) halves the file without visible loss
    exact = [c for rgb in constants.PANNUKE_CLASS_COLORS for c in rgb] + [0, 0, 0, 255, 255, 255]
    palette = img.quantize(256 - len(exact) // 3, method=Image.Quantize.MEDIANCUT).getpalette()
    pal = Image.new("P", (1, 1))
    pal.putpalette(palette[: 3 * (256 - len(exact) // 3)] + exact)
    img.quantize(palette=pal, dither=Image.Dither.NONE).save(out, optimize=True)
    print(out)


if __name__ == "__main__":
    main()
