"""Where the nuclei a model gets wrong go: matched, missed, merged, too large or fragmented.

Reads an evaluation folder written by ``evaluate`` (``eval/<name>/masks.npy``, the predictions,
and ``eval/<name>/true/masks.npy``, the truth, both in PanNuke's layout) and sorts every true
nucleus into one kind by the predicted instance that covers most of it:

- matched: that instance has IoU > ``--match-iou`` with it (what PQ counts as a true positive);
- missed: predicted instances cover under ``--missed`` of its pixels;
- merged: that instance is larger than the nucleus and also covers at least ``--missed`` of
  another true nucleus (touching nuclei predicted as one);
- too large: larger, but over no other nucleus (the foreground spills into the background);
- fragmented: that instance is not larger than the nucleus (it is cut into pieces, or the
  prediction is too small).

  python experiments/error_kinds.py --eval runs/consep/eval/val --out runs/consep/error_kinds.json

Then every predicted nucleus, per predicted class, the other way round (``PREDICTED_KINDS``):

- matched: IoU > ``--match-iou`` with a true nucleus of its class;
- wrong class: IoU > ``--match-iou`` with a true nucleus of another class;
- merged: it covers at least ``--missed`` of two or more true nuclei;
- unmatched: it covers at least ``--missed`` of one true nucleus, or at least ``--missed`` of
  its pixels lie on nuclei (too large, a fragment);
- spurious: neither (background, or the rims of nuclei).

Prints two tables (counts and shares; per class when the truth has several) and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("matched", "missed", "merged", "too_large", "fragmented")
PREDICTED_KINDS = ("matched", "wrong_class", "merged", "unmatched", "spurious")


def instance_map(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PanNuke-layout (H, W, C + 1) -> (instance ids (H, W), class index of each pixel 0..C-1,
    -1 on background); ids are made unique across the class channels."""
    nuclei = masks[..., :-1].astype(np.int64)
    offset = (nuclei.max() + 1) * np.arange(nuclei.shape[-1])
    ids = np.where(nuclei > 0, nuclei + offset, 0)
    inst = ids.max(-1)
    cls = np.where(inst > 0, np.argmax(ids, -1), -1)
    values, compact = np.unique(inst, return_inverse=True)
    compact = compact.reshape(inst.shape) + (values[0] != 0)  # 0 stays background
    return compact, cls


def classify_image(true: np.ndarray, pred: np.ndarray, match_iou: float,
                   missed: float) -> list[tuple[str, int]]:
    """(kind, class index) of every true nucleus of one image."""
    ti, tcls = instance_map(true)
    pi, _ = instance_map(pred)
    nt, npred = int(ti.max()) + 1, int(pi.max()) + 1
    overlap = np.bincount((ti * npred + pi).ravel(), minlength=nt * npred).reshape(nt, npred)
    t_area, p_area = overlap.sum(1), overlap.sum(0)
    out = []
    for t in range(1, nt):
        row = overlap[t, 1:]
        cls = int(tcls[ti == t][0])
        if row.sum() < missed * t_area[t]:
            out.append(("missed", cls))
            continue
        p = 1 + int(np.argmax(row))
        inter = overlap[t, p]
        if inter / (t_area[t] + p_area[p] - inter) > match_iou:
            out.append(("matched", cls))
        elif p_area[p] <= t_area[t]:
            out.append(("fragmented", cls))
        else:
            covered = overlap[1:, p] >= missed * t_area[1:]
            covered[t - 1] = False
            out.append(("merged" if covered.any() else "too_large", cls))
    return out


def classify_predictions(true: np.ndarray, pred: np.ndarray, match_iou: float,
                         missed: float) -> list[tuple[str, int, int]]:
    """(kind, predicted class index, area in px) of every predicted nucleus of one image."""
    ti, tcls = instance_map(true)
    pi, pcls = instance_map(pred)
    nt, npred = int(ti.max()) + 1, int(pi.max()) + 1
    overlap = np.bincount((ti * npred + pi).ravel(), minlength=nt * npred).reshape(nt, npred)
    t_area, p_area = overlap.sum(1), overlap.sum(0)
    true_class = np.full(nt, -1)
    true_class[ti.ravel()] = tcls.ravel()
    pred_class = np.full(npred, -1)
    pred_class[pi.ravel()] = pcls.ravel()
    out = []
    for p in range(1, npred):
        col = overlap[1:, p]
        iou = col / (t_area[1:] + p_area[p] - col)
        best = int(np.argmax(iou)) if len(iou) else -1
        cls = int(pred_class[p])
        if best >= 0 and iou[best] > match_iou:
            kind = "matched" if true_class[best + 1] == cls else "wrong_class"
        elif np.sum(col >= missed * t_area[1:]) >= 2:
            kind = "merged"
        elif np.any(col >= missed * t_area[1:]) or col.sum() >= missed * p_area[p]:
            kind = "unmatched"
        else:
            kind = "spurious"
        out.append((kind, cls, int(p_area[p])))
    return out


def summarise_predictions(kinds: list[tuple[str, int, int]], class_names: list[str]) -> dict:
    """Counts and shares of ``PREDICTED_KINDS`` per predicted class (and for all), with the
    median area of the matched and wrong-class ones (how large the model draws nuclei)."""
    def counts(sel):
        n = len(sel)
        areas = [a for k, a in sel if k in ("matched", "wrong_class")]
        return {"predicted": n, **{k: sum(1 for s, _ in sel if s == k) for k in PREDICTED_KINDS},
                **{f"{k}_share": (sum(1 for s, _ in sel if s == k) / n if n else 0.0)
                   for k in PREDICTED_KINDS},
                "median_area_matched": float(np.median(areas)) if areas else 0.0}
    result = {"all": counts([(k, a) for k, _, a in kinds])}
    if len(class_names) > 1:
        for c, name in enumerate(class_names):
            result[name] = counts([(k, a) for k, cc, a in kinds if cc == c])
    return result


def summarise(kinds: list[tuple[str, int]], class_names: list[str]) -> dict:
    def counts(sel):
        n = len(sel)
        return {"nuclei": n, **{k: sum(1 for s in sel if s == k) for k in KINDS},
                **{f"{k}_share": (sum(1 for s in sel if s == k) / n if n else 0.0)
                   for k in KINDS}}
    result = {"all": counts([k for k, _ in kinds])}
    if len(class_names) > 1:
        for c, name in enumerate(class_names):
            result[name] = counts([k for k, cc in kinds if cc == c])
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", required=True, help="an evaluate output folder (eval/<name>)")
    p.add_argument("--match-iou", type=float, default=0.5)
    p.add_argument("--missed", type=float, default=0.3,
                   help="share of a nucleus predicted instances must cover not to be missed")
    p.add_argument("--out", default="", help="JSON file to write")
    args = p.parse_args(argv)

    import json

    folder = Path(args.eval)
    paths = (folder / "masks.npy", folder / "true" / "masks.npy")
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"{path}: not found (an evaluate output folder holds masks.npy "
                             "and true/masks.npy)")
    pred, true = (np.load(path, allow_pickle=False) for path in paths)
    if pred.shape != true.shape or pred.ndim != 4:
        raise SystemExit(f"{folder}: masks.npy {pred.shape} and true/masks.npy {true.shape} "
                         "must be the same (N, H, W, C + 1)")
    report_path = folder / "report.json"
    names = [f"class{c}" for c in range(true.shape[-1] - 1)]
    if report_path.is_file():
        try:
            class_pq = json.loads(report_path.read_text())["pq"]["class_PQ"]
            if len(class_pq) == len(names):
                names = list(class_pq)
        except (KeyError, ValueError, TypeError) as e:
            raise SystemExit(f"{report_path}: unreadable report ({e})") from None
    kinds = [k for t, pr in zip(true, pred)
             for k in classify_image(t, pr, args.match_iou, args.missed)]
    result = summarise(kinds, names)
    print(f"{len(true)} images of {folder}: kinds of the true nuclei")
    print("| nuclei of | count | " + " | ".join(KINDS) + " |")
    print("|---|---:|" + "---:|" * len(KINDS))
    for name, row in result.items():
        print(f"| {name} | {row['nuclei']} | "
              + " | ".join(f"{row[k]} ({100 * row[k + '_share']:.0f} %)" for k in KINDS) + " |")
    predicted = summarise_predictions(
        [k for t, pr in zip(true, pred)
         for k in classify_predictions(t, pr, args.match_iou, args.missed)], names)
    print("kinds of the predicted nuclei")
    print("| predicted as | count | " + " | ".join(PREDICTED_KINDS)
          + " | median px (matched, wrong class) |")
    print("|---|---:|" + "---:|" * (len(PREDICTED_KINDS) + 1))
    for name, row in predicted.items():
        print(f"| {name} | {row['predicted']} | "
              + " | ".join(f"{row[k]} ({100 * row[k + '_share']:.0f} %)"
                           for k in PREDICTED_KINDS)
              + f" | {row['median_area_matched']:.0f} |")
    if args.out:
        from tsfd_jax.atomic import write_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"eval": str(folder), "images": len(true),
                              "match_iou": args.match_iou, "missed": args.missed,
                              "date": datetime.date.today().isoformat(), "kinds": result,
                              "predicted_kinds": predicted})


if __name__ == "__main__":
    main()
