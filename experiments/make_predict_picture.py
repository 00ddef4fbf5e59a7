"""Picture of inference on real H&E (docs/images/predict_overlay.png).

Runs a trained workdir on a few images (the three PanNuke samples by default) and puts each image
above its overlay (nucleus outlines coloured by class), with a class legend and the nuclei
counts underneath.

  python experiments/make_predict_picture.py --workdir runs/demo/train \
      --input ../shared/data/he_samples --out docs/images/predict_overlay.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "he_samples"))
    ap.add_argument("--max-images", type=int, default=3)
    ap.add_argument("--tile", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "predict_overlay.png"))
    args = ap.parse_args()

    from tsfd_jax.checkpoints import restore_variables
    from tsfd_jax.evaluate_run import load_run_config
    from tsfd_jax.overlay import class_colors, overlay
    from tsfd_jax.image_io import list_images, read_image
    from tsfd_jax.predict import make_predict_fn, predict_image

    workdir = Path(args.workdir)
    cfg = load_run_config(workdir)
    variables, step = restore_variables(workdir, args.checkpoint)
    fn = make_predict_fn(cfg, variables, args.tile)
    names = tuple(cfg.data.label_names)
    columns = []
    for path in list_images(args.input)[: args.max_images]:
        image = np.asarray(read_image(path))
        pred = predict_image(image, fn, cfg, tile=args.tile)
        counts = ", ".join(f"{k[:4]} {v}" for k, v in pred.class_counts().items() if v)
        columns.append((image, overlay(image, pred.inst, pred.class_map, names),
                        f"{pred.num_instances} nuclei: {counts}" if counts else "no nuclei"))
    h = max(c[0].shape[0] for c in columns)
    w = sum(c[0].shape[1] for c in columns) + 8 * (len(columns) - 1)
    canvas = Image.new("RGB", (w, 2 * h + 8 + 44), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for image, over, caption in columns:
        canvas.paste(Image.fromarray(image), (x, 0))
        canvas.paste(Image.fromarray(over), (x, h + 8))
        draw.text((x + 2, 2 * h + 10), caption, fill="black")
        x += image.shape[1] + 8
    x = 2
    for name, color in zip(names[1:], class_colors(names)[1:]):
        draw.rectangle([x, 2 * h + 30, x + 10, 2 * h + 40], fill=tuple(color))
        draw.text((x + 14, 2 * h + 29), name, fill="black")
        x += 16 + 7 * len(name) + 10
    draw.text((w - 150, 2 * h + 29), f"{workdir.name} step {step}", fill="gray")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
