"""``evaluate --data FOLDER``: whole images of any size through the tiled predictor, scored with
Dice, AJI, AJI+, PQ and detection F1; every number checked against the float64 references of
the metric tests and the plain PanNuke re-implementation, on the saved predictions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.pannuke_reference import ref_pannuke_pq
from tests.test_instance_metrics import ref_aji, ref_aji_plus, ref_dice, ref_pq
from tests.test_predict import make_tiny_workdir
from tsfd_jax.constants import PANNUKE_CLASSES
from tsfd_jax.errors import UserError
from tsfd_jax.data.pannuke import to_pannuke_masks
from tsfd_jax.evaluate_run import evaluate_workdir
from tsfd_jax.metrics.detection import centroids_from_instances, detection_stats
from tsfd_jax.postprocess import to_pannuke_layout

SIZE = 1000


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A random tiny TSFD-Net (PanNuke classes) whose tiles are 128 px: fewer tiles per image."""
    path = tmp_path_factory.mktemp("evalimg") / "run"
    make_tiny_workdir(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["data"]["image_size"], cfg["input"]["size"] = 128, 256
    cfg["data"]["num_workers"] = 0
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def mosaic_labels(shared_data: Path, k: int, size: int = SIZE
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A size x size image of real CoNSeP tiles (4 x 4, cut to SIZE) with their instances, each
    nucleus given one of PanNuke's 5 classes at random."""
    files = sorted((shared_data / "consep" / "train").glob("*.npz"))[16 * k:16 * k + 16]
    rng = np.random.default_rng(k)
    image = np.zeros((1024, 1024, 3), np.uint8)
    inst = np.zeros((1024, 1024), np.int32)
    for j, f in enumerate(files):
        y, x = 256 * (j // 4), 256 * (j % 4)
        with np.load(f, allow_pickle=False) as z:
            tile = z["inst"].astype(np.int32)
        image[y:y + 256, x:x + 256] = np.asarray(Image.open(f.with_suffix(".jpg")).convert("RGB"))
        inst[y:y + 256, x:x + 256] = np.where(tile > 0, tile + inst.max(), 0)
    image, inst = image[:size, :size], inst[:size, :size]
    lut = np.concatenate([[0], rng.integers(1, 6, int(inst.max()))])
    return image, inst, lut[inst].astype(np.uint8)


def write_folder(folder: Path, shared_data: Path, typed: bool, n: int,
                 size: int = SIZE) -> list[tuple]:
    folder.mkdir(parents=True)
    if typed:
        (folder / "classes.txt").write_text("\n".join(PANNUKE_CLASSES) + "\n")
    truth = []
    for k in range(n):
        image, inst, cls = mosaic_labels(shared_data, k, size)
        Image.fromarray(image).save(folder / f"img{k}.png")
        np.savez(folder / f"img{k}.npz", inst=inst, **({"type": cls} if typed else {}))
        truth.append((f"img{k}", inst, cls))
    return truth


def close(a, b, tol=1e-9) -> bool:
    return (a is None and (b is None or math.isnan(b))) or abs(a - b) <= tol


def test_typed_folder_report_equals_the_references(workdir, shared_data, tmp_path):
    truth = write_folder(tmp_path / "typed", shared_data, typed=True, n=1)
    out = evaluate_workdir(workdir, checkpoint="last", data=str(tmp_path / "typed"), name="t",
                           workers=0)
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["images"] == 1 and {"bPQ", "mPQ", "dice", "aji", "aji_plus", "det_F1"} <= set(s)
    per = {r["key"]: r for r in report["per_image"]}
    true_layouts, pred_layouts, tp, pp = [], [], [], []
    for key, inst, cls in truth:
        pred = np.load(out / "instances" / f"{key}_inst.npy", allow_pickle=False)
        pcls = np.load(out / "instances" / f"{key}_class.npy", allow_pickle=False)
        assert pred.shape == pcls.shape == (SIZE, SIZE) and pred.max() > 0
        assert close(per[key]["dice"], ref_dice(inst, pred))
        assert close(per[key]["aji"], ref_aji(inst, pred))
        assert close(per[key]["aji_plus"], ref_aji_plus(inst, pred))
        assert close(per[key]["pq"], ref_pq(inst, pred)["pq"])
        # the class of a predicted nucleus is its pixels' label in the saved class map
        classes = np.zeros(int(pred.max()), np.int64)
        classes[pred[pred > 0] - 1] = pcls[pred > 0]
        true_layouts.append(to_pannuke_masks(inst, cls, 5))
        pred_layouts.append(to_pannuke_layout(pred, classes, 5))
        tc = np.zeros(int(inst.max()), np.int64)
        tc[inst[inst > 0] - 1] = cls[inst > 0]
        tp.append(centroids_from_instances(inst, tc))
        pp.append(centroids_from_instances(pred, classes))
    for m in ("dice", "aji", "aji_plus"):
        assert close(s[m], np.mean([per[k][m] for k, _, _ in truth]))
    ref = ref_pannuke_pq(np.stack(true_layouts), np.stack(pred_layouts), ["all"] * len(truth),
                         PANNUKE_CLASSES, ("all",))
    assert close(s["mPQ"], ref["mPQ"]) and close(s["bPQ"], ref["bPQ"])
    det = detection_stats(tp, pp, radius=12.0, num_classes=5, class_names=PANNUKE_CLASSES)
    assert close(s["det_F1"], det["F1d"])
    md = (out / "report.md").read_text()
    assert "aji_plus" in md and "img0" in md


def test_instances_only_labels_are_scored_as_binary(workdir, shared_data, tmp_path):
    truth = write_folder(tmp_path / "plain", shared_data, typed=False, n=2, size=300)
    out = evaluate_workdir(workdir, checkpoint="last", data=str(tmp_path / "plain"), name="b",
                           workers=0, max_images=1)
    assert not (out / "instances" / "img1_inst.npy").exists()  # max_images
    s = json.loads((out / "report.json").read_text())["summary"]
    assert "mPQ" not in s and {"bPQ", "dice", "aji", "aji_plus", "det_F1"} <= set(s)
    pred = np.load(out / "instances" / "img0_inst.npy", allow_pickle=False)
    assert close(s["bPQ"], ref_pq(truth[0][1], pred)["pq"])


def test_bad_folders_give_one_line_errors_and_leave_nothing(workdir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bad / "a.png")
    np.savez(bad / "a.npz", inst=np.zeros((30, 40), np.int32))
    with pytest.raises(UserError, match=r"a\.npz.*shape \(30, 40\).*\(40, 40\)"):
        evaluate_workdir(workdir, checkpoint="last", data=str(bad), name="bad", workers=0)
    assert not (workdir / "eval" / "bad").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "classes.txt").write_text("x\ny\n")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(other / "a.png")
    np.savez(other / "a.npz", inst=np.zeros((40, 40), np.int32), type=np.zeros((40, 40), np.uint8))
    with pytest.raises(UserError, match=r"classes \['x', 'y'\] differ from the model's"):
        evaluate_workdir(workdir, checkpoint="last", data=str(other), name="o", workers=0)
    out = evaluate_workdir(workdir, checkpoint="last", data=str(other), name="o", workers=0,
                           binary=True)  # other classes: the nuclei only
    assert "mPQ" not in json.loads((out / "report.json").read_text())["summary"]
    with pytest.raises(UserError, match="apply to --data FOLDER"):
        evaluate_workdir(workdir, checkpoint="last", name="x", binary=True)
