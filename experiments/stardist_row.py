"""StarDist (Schmidt et al. 2018, Weigert et al. 2020) trained for a wall-clock budget: the external
reference row of ``bench_quality.py --dataset consep``.

Runs under a Python that has ``stardist`` and TensorFlow (not the project's venv: StarDist is
no dependency of tsfd-jax; docs/learning.md, "StarDist as an external reference"), so it imports
neither jax nor tsfd_jax, only numpy, scipy, PIL and skimage besides StarDist.

Reads a folder of ``<stem>.png|jpg|jpeg|tif|tiff`` images with ``<stem>.npz`` labels (``inst``
instance ids, ``type`` classes 1..C) and ``classes.txt``, the layout of tsfd_jax/data/folders.py;
holds back ``--val-fraction`` of the training folder's source images (whole source images, as
``folders.split_by_group`` does) for StarDist's validation loss and ``optimize_thresholds``;
trains ``StarDist2D`` (32 rays, grid 2 x 2, one class head of C classes; images normalised to the
1-99.8 percentiles of all channels together, flips and 90-degree rotations, random 128-px
patches, batch 8) until ``--budget-s`` seconds have passed after the first step (the step that
builds the graph is not counted, as bench_quality does not count compilation); then optimises
the probability and NMS thresholds on the held-back tiles and predicts every image of ``--test``.

Writes under ``--out`` only: ``model/`` (StarDist's weights, config, thresholds),
``instances/<stem>_inst.npy`` (int32 instance ids, 0 background, 1..K) and
``instances/<stem>_class.npy`` (uint8 class label of every pixel, 0 background), the files and
meanings ``evaluate --data`` writes (tsfd_jax/evaluate_images.py), and ``stardist.json`` (steps,
seconds, thresholds, versions).

  ../sdenv/bin/python experiments/stardist_row.py --train TRAIN --test TEST \
      --budget-s 1200 --out runs/quality/consep-stardist
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import skimage.segmentation
from PIL import Image

# The rules of tsfd_jax/data/folders.py, restated because this script cannot import tsfd_jax;
# tests/test_experiments.py checks that both give the same split and the same labels.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CLASSES_FILE = "classes.txt"
DEFAULT_GROUP_PATTERN = r"_\d+$"  # consep 'train_10_003' -> source image 'train_10'
INSTANCES_DIR = "instances"  # as evaluate_images.INSTANCES_DIR

N_RAYS, GRID, PATCH, BATCH = 32, (2, 2), 128, 8
STEPS_PER_EPOCH = 100  # validation loss and best-weights checkpoint every 100 steps


def read_classes(path: Path) -> tuple[str, ...]:
    """Class names for labels 1..C: non-empty lines not starting with '#' (folders.read_classes)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#"))


def source_group(stem: str, pattern: str = DEFAULT_GROUP_PATTERN) -> str:
    """The source image a tile comes from: the stem without ``pattern`` (folders.source_group)."""
    return re.sub(pattern, "", stem) if pattern else stem


def split_sources(stems: list[str], fraction: float, seed: int,
                  pattern: str = DEFAULT_GROUP_PATTERN) -> tuple[list[str], list[str]]:
    """(train stems, held-back stems), whole source images held back in a seeded random order
    until at least ``fraction`` of the tiles are; the last source always trains
    (folders.split_by_group)."""
    if fraction == 0 or not stems:
        return list(stems), []
    groups = sorted({source_group(s, pattern) for s in stems})
    if len(groups) < 2:
        raise SystemExit(f"all {len(stems)} tiles come from the one source image {groups[0]!r}: "
                         "nothing to hold back for the thresholds")
    order = [groups[j] for j in np.random.default_rng(seed).permutation(len(groups))]
    size = {g: 0 for g in groups}
    for s in stems:
        size[source_group(s, pattern)] += 1
    target, held, n = fraction * len(stems), set(), 0
    for g in order[:-1]:
        if n >= target:
            break
        held.add(g)
        n += size[g]
    return ([s for s in stems if source_group(s, pattern) not in held],
            [s for s in stems if source_group(s, pattern) in held])


def instances_and_classes(inst: np.ndarray, typ: np.ndarray, num_classes: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(inst int32 1..K, classes (K,) int64 1..C): the prepared labels of folders.py. The class of
    an instance is the majority of its typed pixels (ties: the smaller label); instances without
    a typed pixel are dropped; ids are renumbered in their original order."""
    seq = skimage.segmentation.relabel_sequential(inst.astype(np.int64))[0]
    k, typ = int(seq.max()), typ.astype(np.int64)
    fg = seq > 0
    hist = np.bincount(seq[fg] * (num_classes + 1) + typ[fg],
                       minlength=(k + 1) * (num_classes + 1)).reshape(k + 1, num_classes + 1)
    typed = hist[:, 1:]
    classes = np.argmax(typed, axis=1) + 1
    keep = typed.sum(1) > 0
    keep[0] = True
    seq = np.where(keep[seq], seq, 0)
    seq = skimage.segmentation.relabel_sequential(seq)[0]
    return seq.astype(np.int32), classes[keep][1:]


def image_paths(folder: Path) -> dict[str, Path]:
    """{stem: path} of the images of ``folder``."""
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS}


def read_image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def read_folder(folder: Path, num_classes: int
                ) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(stems, RGB uint8 images, instance maps, per-instance classes) of the labelled images of
    ``folder``."""
    images = image_paths(folder)
    stems = sorted(s for s in images if (folder / f"{s}.npz").is_file())
    xs, ys, cs = [], [], []
    for s in stems:
        xs.append(read_image(images[s]))
        with np.load(folder / f"{s}.npz", allow_pickle=False) as z:
            inst, typ = z["inst"], z["type"]
        y, c = instances_and_classes(inst, typ, num_classes)
        ys.append(y)
        cs.append(c)
    return stems, xs, ys, cs


def dihedral(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A random flip / 90-degree rotation of a patch and its labels (StarDist's random_fliprot)."""
    if np.random.rand() < 0.5:
        x, y = x.transpose(1, 0, 2), y.T
    for ax in (0, 1):
        if np.random.rand() < 0.5:
            x, y = np.flip(x, ax), np.flip(y, ax)
    return x, y


def budget_callback(seconds: float):
    """A Keras callback that stops training once ``seconds`` have passed since the end of the
    first step (graph building not counted); counts the steps."""
    from csbdeep.utils.tf import keras_import

    Callback = keras_import("callbacks", "Callback")

    class Budget(Callback):
        def __init__(self):
            super().__init__()
            self.steps, self.start = 0, None

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            now = time.perf_counter()
            if self.start is None:
                self.start = now
            elif now - self.start >= seconds:
                self.model.stop_training = True

    return Budget()


def versions() -> dict[str, str]:
    import csbdeep
    import stardist
    import tensorflow as tf

    from csbdeep.utils.tf import keras_import

    return {"stardist": stardist.__version__, "csbdeep": csbdeep.__version__,
            "tensorflow": tf.__version__, "keras": keras_import().__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def run(train_dir: Path, test_dir: Path, budget_s: float, out: Path, seed: int = 1,
        val_fraction: float = 0.2) -> dict:
    # StarDist is built on TensorFlow; a KERAS_BACKEND inherited from the caller (the
    # project's bench_model.py sets jax) would make Keras 3 load another backend.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    from csbdeep.utils import normalize
    from csbdeep.utils.tf import keras_import
    from stardist import fill_label_holes
    from stardist.models import Config2D, StarDist2D

    keras_import("utils", "set_random_seed")(seed)
    class_names = read_classes(train_dir / CLASSES_FILE)
    n_classes = len(class_names)

    def norm(x):  # RGB: the channels normalised together, as in StarDist's H&E examples
        return normalize(x, 1, 99.8, axis=(0, 1, 2))

    stems, xs, ys, cs = read_folder(train_dir, n_classes)
    train, held = split_sources(stems, val_fraction, seed)
    pick = {s: i for i, s in enumerate(stems)}
    X = [norm(xs[pick[s]]) for s in train]
    Y = [fill_label_holes(ys[pick[s]]) for s in train]
    C = [{k + 1: int(c) for k, c in enumerate(cs[pick[s]])} for s in train]
    X_val = [norm(xs[pick[s]]) for s in held]
    Y_val = [fill_label_holes(ys[pick[s]]) for s in held]
    C_val = [{k + 1: int(c) for k, c in enumerate(cs[pick[s]])} for s in held]

    conf = Config2D(n_rays=N_RAYS, grid=GRID, n_channel_in=3, n_classes=n_classes,
                    train_patch_size=(PATCH, PATCH), train_batch_size=BATCH,
                    train_tensorboard=False, use_gpu=False)
    out.mkdir(parents=True, exist_ok=True)
    model = StarDist2D(conf, name="model", basedir=str(out))
    model.prepare_for_training()
    budget = budget_callback(budget_s)
    model.callbacks.append(budget)
    t0 = time.perf_counter()
    model.train(X, Y, classes=C, validation_data=(X_val, Y_val, C_val), augmenter=dihedral,
                epochs=10**6, steps_per_epoch=STEPS_PER_EPOCH, seed=seed)
    train_s = time.perf_counter() - t0
    budget_clock_s = time.perf_counter() - (budget.start or t0)

    t0 = time.perf_counter()
    thresholds = model.optimize_thresholds(X_val, Y_val)
    thresholds_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    inst_dir = out / INSTANCES_DIR
    inst_dir.mkdir(exist_ok=True)
    test_images = image_paths(test_dir)
    for stem, path in test_images.items():
        labels, details = model.predict_instances(norm(read_image(path)),
                                                  show_tile_progress=False)
        inst, class_map = to_maps(labels, details["class_prob"])
        np.save(inst_dir / f"{stem}_inst.npy", inst)
        np.save(inst_dir / f"{stem}_class.npy", class_map)
    predict_s = time.perf_counter() - t0

    report = {
        "steps": budget.steps, "batch_size": BATCH, "images_seen": budget.steps * BATCH,
        "patch": PATCH, "budget_s": budget_s, "train_wall_s": train_s,
        "budget_clock_s": budget_clock_s,
        # steps after the first (the clock starts after it), validation included
        "s_per_step": budget_clock_s / max(budget.steps - 1, 1),
        "thresholds": thresholds, "thresholds_s": thresholds_s, "predict_s": predict_s,
        "weights": "best validation loss on the held-back tiles (StarDist's weights_best.h5)",
        "class_names": list(class_names), "train_tiles": len(train), "heldout_tiles": len(held),
        "heldout_sources": sorted({source_group(s) for s in held}), "test_tiles": len(test_images),
        "seed": seed, "config": {"n_rays": N_RAYS, "grid": list(GRID), "n_classes": n_classes},
        "versions": versions(), "instances": str(inst_dir),
    }
    (out / "stardist.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def to_maps(labels: np.ndarray, class_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StarDist's label image (polygon k-1 drawn as id k, lower probabilities first, so some may
    be covered whole) and class probabilities (K, C + 1) -> (inst int32 1..K' contiguous,
    class map uint8). A nucleus takes its most probable non-background class: StarDist's own
    ``class_id`` may be 0 for an object it has detected."""
    inst = skimage.segmentation.relabel_sequential(labels.astype(np.int64))[0]
    classes = np.zeros(len(class_prob) + 1, np.uint8)
    if len(class_prob):
        classes[1:] = np.argmax(np.asarray(class_prob)[:, 1:], axis=1) + 1
    return inst.astype(np.int32), classes[labels].astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="training folder (images + npz + classes.txt)")
    p.add_argument("--test", required=True, help="folder of images to predict")
    p.add_argument("--budget-s", type=float, required=True, help="training seconds")
    p.add_argument("--out", required=True, help="output folder (everything goes under it)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the training source images held back for the thresholds")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise SystemExit(f"--val-fraction {args.val_fraction}: must be in (0, 1)")
    r = run(Path(args.train), Path(args.test), args.budget_s, Path(args.out), args.seed,
            args.val_fraction)
    print(f"stardist: {r['steps']} steps in {r['train_wall_s']:.0f} s, thresholds "
          f"{r['thresholds']}, {r['test_tiles']} test tiles -> {r['instances']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
