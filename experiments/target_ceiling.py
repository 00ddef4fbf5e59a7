"""What a boundary target lets the post-processing recover: PQ from ideal maps.

For every labelled image of a folder (the layout of ``prepare --source folders``: images with
``<stem>.npz`` labels, or CoNSeP's ``Images/`` + ``Labels/``), builds the maps a perfect model
would output for a boundary-target setting (one-hot classes; the boundary target of
``ops/targets.boundary_target``, no patch frame) and runs the ``markers`` post-processing on
them. The bPQ / mPQ against the truth is the ceiling that setting puts on any model trained
with it: wide bands on every contour take the whole of a thin nucleus, which then has no core
(docs/preprocessing.md, "Targets"; docs/learning.md §24). Also reports the share of pixels
that are boundary (what the boundary head has to learn).

  python experiments/target_ceiling.py --data ../shared/data/consep/train \\
      --out runs/target_ceiling.json

A setting is ``NAME:BOUNDARY_DILATION,CONTACT_DILATION``; the default rows are thin contours,
4-px and 6-px bands everywhere, and 4-px and 6-px bands only where nuclei touch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SETTINGS = ("contours:0,0", "bands4:1,0", "bands6:2,0", "contacts4:0,1",
                    "contacts6:0,2")


def parse_setting(text: str) -> tuple[str, int, int]:
    name, _, values = text.partition(":")
    try:
        dilation, contact = (int(v) for v in values.split(","))
    except ValueError:
        raise SystemExit(f"--setting {text!r}: expected NAME:BOUNDARY_DILATION,CONTACT_DILATION")
    return name, dilation, contact


def ideal_maps(inst: np.ndarray, cls: np.ndarray, num_classes: int, dilation: int,
               contact_dilation: int) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities one-hot (H, W, C+1), boundary target (H, W)) of the truth."""
    import jax.numpy as jnp

    from tsfd_jax.ops.targets import boundary_target

    seg = np.eye(num_classes + 1, dtype=np.float32)[cls]
    bdr = boundary_target(jnp.asarray(inst), jnp.asarray(cls), None, 0, dilation,
                          contact_dilation)
    return seg, np.asarray(bdr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a labelled image folder")
    p.add_argument("--setting", action="append", default=None,
                   help="NAME:BOUNDARY_DILATION,CONTACT_DILATION (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="the first N images only (0 = all)")
    p.add_argument("--min-size", type=int, default=16, help="postprocess.min_size")
    p.add_argument("--orphan-size", type=int, default=0, help="postprocess.orphan_size")
    p.add_argument("--out", default="", help="JSON file to write")
    args = p.parse_args(argv)

    from tsfd_jax.data.folders import FolderDataset
    from tsfd_jax.data.pannuke import to_pannuke_masks
    from tsfd_jax.metrics.pq import pannuke_pq
    from tsfd_jax.postprocess import PostprocessParams, marker_instances, to_pannuke_layout

    data = FolderDataset(args.data)
    names = tuple(data.class_names)
    count = len(data) if args.limit <= 0 else min(args.limit, len(data))
    examples = [data.example(i) for i in range(count)]
    truth = np.stack([to_pannuke_masks(e["inst"], e["cls"], len(names)) for e in examples])
    params = PostprocessParams(method="markers", seg_threshold=0.5, boundary_threshold=0.5,
                               min_size=args.min_size, orphan_size=args.orphan_size)
    rows = []
    for setting in args.setting or DEFAULT_SETTINGS:
        name, dilation, contact = parse_setting(setting)
        pred, share = [], []
        for e in examples:
            seg, bdr = ideal_maps(e["inst"], e["cls"].astype(np.int32), len(names), dilation,
                                  contact)
            r = marker_instances(seg, bdr, params)
            pred.append(to_pannuke_layout(r.inst, r.classes, len(names)))
            share.append(float(bdr.mean()))
        pq = pannuke_pq(truth, np.stack(pred), None, class_names=names, tissue_names=None,
                        match_iou=0.5)
        rows.append({"setting": name, "boundary_dilation": dilation, "contact_dilation": contact,
                     "bPQ": float(pq["bPQ"]), "mPQ": float(pq["mPQ"]),
                     "boundary_share": float(np.mean(share))})
    print(f"{count} images of {args.data}; markers post-processing, thresholds 0.5, "
          f"min_size {args.min_size}, orphan_size {args.orphan_size}")
    print("| setting | boundary_dilation | contact_dilation | bPQ | mPQ | boundary share |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['boundary_dilation']} | {r['contact_dilation']} | "
              f"{r['bPQ']:.3f} | {r['mPQ']:.3f} | {r['boundary_share']:.3f} |")
    if args.out:
        from tsfd_jax.atomic import write_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"data": str(args.data), "images": count, "rows": rows,
                              "date": datetime.date.today().isoformat(),
                              "machine": platform.platform(), "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
