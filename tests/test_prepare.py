"""Prepared datasets: prepare -> open_prepared round trips, idempotence and safety, split
schemes (official, TSFD lists), image + label folders, and the prepare command."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pannuke import clean_masks, write_fold

from configs.default import get_config
from tsfd_jax.constants import LABEL_NAMES, PANNUKE_TISSUES
from tsfd_jax.data import folders as folders_lib
from tsfd_jax.data import pannuke, split_lists
from tsfd_jax.data.prepare import prepare
from tsfd_jax.data.prepared import COMPLETE, IN_PROGRESS, open_prepared
from tsfd_jax.errors import UserError

FIELDS = ("image", "inst", "cls", "tissue", "key")


def dirty_masks(n: int, seed: int) -> np.ndarray:
    """Clean masks plus an overlapping nucleus and a shared id in every image."""
    m = clean_masks(n, seed)
    m[:, 30:40, 30:40, 3] = 900           # overlaps whatever is there
    m[:, 50:54, 50:54, 1] = 901
    m[:, 52:56, 52:56, 2] = 901           # same id in another channel, overlapping
    m[..., 5] = m[..., :5].sum(-1) == 0
    return m


@pytest.fixture
def pannuke_root(tmp_path):
    root = tmp_path / "pannuke"
    write_fold(root, 1, 4, masks=dirty_masks(4, 1))
    write_fold(root, 2, 3)
    return root


def assert_examples_equal(a, b):
    for k in FIELDS:
        if k == "key":
            assert isinstance(a[k], str) and a[k] == b[k]
        else:
            assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def file_times(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


# ---- PanNuke round trip ----------------------------------------------------------------------
def test_prepare_pannuke_round_trip(pannuke_root, tmp_path):
    out = tmp_path / "prep"
    meta = prepare("pannuke", pannuke_root, out, progress=False, log=lambda s: None)
    ds = open_prepared(out)
    assert ds.splits == ("fold1", "fold2")
    assert ds.metadata == meta
    assert meta["splits"] == {"fold1": 4, "fold2": 3}
    assert meta["label_names"] == list(LABEL_NAMES)
    assert meta["tissue_names"] == list(PANNUKE_TISSUES) and meta["image_size"] == 64
    folds = pannuke.find_folds(pannuke_root)
    for f, split in ((1, "fold1"), (2, "fold2")):
        reader = pannuke.PanNukeFold(folds[f])
        src = ds.source(split)
        assert len(src) == len(reader)
        repairs: dict[str, int] = {}
        nuclei = Counter()
        tissues = Counter()
        for i in range(len(reader)):
            ref, counts = reader.example_with_counts(i)
            got = src[i]
            assert got["tissue"].dtype == np.int32
            assert_examples_equal(got, ref)
            repairs = pannuke.sum_counts(repairs, counts)
            for k in range(1, ref["inst"].max() + 1):
                nuclei[LABEL_NAMES[ref["cls"][ref["inst"] == k][0]]] += 1
            tissues[reader.tissues[i]] += 1
        assert meta["resolutions"][split] == repairs
        assert {c: n for c, n in meta["nuclei_per_class"][split].items() if n} == dict(nuclei)
        assert meta["images_per_tissue"][split] == dict(tissues)
        assert src.keys == tuple(f"fold{f}/{i:05d}" for i in range(len(reader)))
    assert meta["resolutions"]["fold1"]["overlap_pixels"] > 0
    assert meta["resolutions"]["fold1"]["shared_ids"] == 4


def test_split_expressions_and_pickle(pannuke_root, tmp_path):
    out = tmp_path / "prep"
    prepare("pannuke", pannuke_root, out, progress=False, log=lambda s: None)
    ds = open_prepared(out)
    both = ds.source("fold1+fold2")
    assert len(both) == 7
    assert [both[i]["key"] for i in (0, 3, 4, 6, -1)] == [
        "fold1/00000", "fold1/00003", "fold2/00000", "fold2/00002", "fold2/00002"]
    assert_examples_equal(both[5], ds.source("fold2")[1])
    rev = ds.source("fold2 + fold1")
    assert rev[0]["key"] == "fold2/00000"
    with pytest.raises(IndexError):
        both[7]
    with pytest.raises(UserError, match="no split 'fold3'"):
        ds.source("fold1+fold3")
    # Pickled before and after first use (grain workers pickle the source).
    copy = pickle.loads(pickle.dumps(both))
    assert_examples_equal(copy[4], both[4])
    copy2 = pickle.loads(pickle.dumps(both))
    assert_examples_equal(copy2[6], both[6])
    sub = ds.source_for_keys("fold1+fold2", ["fold2/00001", "fold1/00002", "fold1/00000"])
    assert sub.keys == ("fold2/00001", "fold1/00002", "fold1/00000")
    assert [sub[i]["key"] for i in range(3)] == list(sub.keys)
    assert_examples_equal(pickle.loads(pickle.dumps(sub))[1], ds.source("fold1")[2])
    with pytest.raises(UserError, match="1 of 1 keys"):
        ds.source_for_keys("fold1", ["fold2/00000"])


def test_single_fold_folder(tmp_path):
    write_fold(tmp_path / "f3", 3, 2, flat=True)
    meta = prepare("pannuke", tmp_path / "f3", tmp_path / "prep", fold=3, progress=False,
                   log=lambda s: None)
    assert meta["splits"] == {"fold3": 2}
    assert open_prepared(tmp_path / "prep").source("fold3")[1]["key"] == "fold3/00001"


# ---- idempotence and safety ------------------------------------------------------------------
def test_rerun_is_a_no_op(pannuke_root, tmp_path):
    out = tmp_path / "prep"
    prepare("pannuke", pannuke_root, out, progress=False, log=lambda s: None)
    before = file_times(out)
    logs: list[str] = []
    prepare("pannuke", pannuke_root, out, progress=False, log=logs.append)
    assert any("already prepared" in s for s in logs)
    assert file_times(out) == before


def test_different_input_needs_overwrite(pannuke_root, tmp_path):
    out = tmp_path / "prep"
    prepare("pannuke", pannuke_root, out, progress=False, log=lambda s: None)
    write_fold(pannuke_root, 3, 2)
    with pytest.raises(UserError, match="different input"):
        prepare("pannuke", pannuke_root, out, progress=False, log=lambda s: None)
    assert open_prepared(out).splits == ("fold1", "fold2")  # untouched
    meta = prepare("pannuke", pannuke_root, out, overwrite=True, progress=False, log=lambda s: None)
    assert meta["splits"] == {"fold1": 4, "fold2": 3, "fold3": 2}
    assert open_prepared(out).source("fold3")[1]["key"] == "fold3/00001"


def test_half_written_output_is_redone(pannuke_root, tmp_path):
    out = tmp_path / "prep"
    prepare("pannuke", pannuke_root, out, progress=False, log=lambda s: None)
    # Simulate a run killed half-way: marker present, .complete absent, partial files.
    (out / COMPLETE).unlink()
    (out / IN_PROGRESS).write_text(json.dumps({"format": "tsfd-jax-prepared", "pid": 1,
                                               "host": "elsewhere"}))
    (out / "tfds" / "junk").write_text("partial")
    with pytest.raises(UserError, match="half-written"):
        open_prepared(out)
    logs: list[str] = []
    prepare("pannuke", pannuke_root, out, progress=False, log=logs.append)
    assert any("half-written" in s for s in logs)
    assert (out / COMPLETE).exists() and not (out / IN_PROGRESS).exists()
    assert not (out / "tfds" / "junk").exists()
    assert len(open_prepared(out).source("fold1+fold2")) == 7


def test_failed_prepare_leaves_nothing(tmp_path):
    root = tmp_path / "pannuke"
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.float64)
    images[2, 0, 0, 0] = np.nan  # found when the last example is converted
    write_fold(root, 1, 3, images=images)
    with pytest.raises(UserError, match="image 2 has NaN"):
        prepare("pannuke", root, tmp_path / "prep", progress=False, log=lambda s: None)
    assert not (tmp_path / "prep").exists()


def test_foreign_folder_refused(pannuke_root, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a dataset prepared by tsfd-jax"):
        prepare("pannuke", pannuke_root, out, progress=False, log=lambda s: None)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    with pytest.raises(UserError, match="no .complete"):
        open_prepared(out)
    # A user file inside a finished dataset is never deleted by --overwrite.
    out2 = tmp_path / "prep"
    prepare("pannuke", pannuke_root, out2, progress=False, log=lambda s: None)
    (out2 / "notes.txt").write_text("keep me")
    write_fold(pannuke_root, 3, 1)
    with pytest.raises(UserError, match="notes.txt"):
        prepare("pannuke", pannuke_root, out2, overwrite=True, progress=False, log=lambda s: None)
    assert (out2 / "notes.txt").exists() and (out2 / COMPLETE).exists()


# ---- split schemes ---------------------------------------------------------------------------
def test_tsfd_lists_parse():
    lists = {r: split_lists.tsfd_names(r) for r in split_lists.ROLES}
    assert {r: len(v) for r, v in lists.items()} == {"train": 5675, "val": 303, "test": 1923}
    keys = {r: [k for k, _ in split_lists.tsfd_keys(r)] for r in split_lists.ROLES}
    all_keys = [k for v in keys.values() for k in v]
    assert len(set(all_keys)) == 7901  # disjoint, no duplicates
    parsed = [split_lists.parse_tsfd_name(n) for v in lists.values() for n in v]
    assert {t for t, _, _ in parsed} == set(PANNUKE_TISSUES)
    assert {f for _, f, _ in parsed} == {1, 2, 3}
    # Fold sizes 2,656 / 2,523 / 2,722 with 0-based indices (docs/preprocessing.md).
    for f, n in ((1, 2656), (2, 2523), (3, 2722)):
        assert sorted(i for _, ff, i in parsed if ff == f) == list(range(n))
    per_tissue = Counter(split_lists.parse_tsfd_name(n)[0] for n in lists["train"])
    assert per_tissue["Breast"] == 1692 and per_tissue["Bladder"] == 104
    assert split_lists.parse_tsfd_name("img_Bile-duct_3_00012.png") == ("Bile-duct", 3, 12)
    with pytest.raises(ValueError):
        split_lists.parse_tsfd_name("Bile-duct_3_00012.png")


class FakePrepared:
    """Duck-typed PreparedDataset with hand-made keys (no records)."""

    def __init__(self, tissue_of: dict[str, str], source: str = "pannuke"):
        self.root = Path("fake")
        self.metadata = {"source": source}
        self.tissue_names = PANNUKE_TISSUES
        by_split: dict[str, list[str]] = {}
        for k in sorted(tissue_of):
            by_split.setdefault(k.split("/")[0], []).append(k)
        self.splits = tuple(by_split)
        self._by_split, self._tissue_of = by_split, tissue_of

    def _names(self, expr):
        return expr.split("+")

    def keys(self, expr):
        return [k for s in self._names(expr) for k in self._by_split[s]]

    def tissues(self, expr):
        return np.array([PANNUKE_TISSUES.index(self._tissue_of[k]) for k in self.keys(expr)])

    def source_for_keys(self, expr, keys):
        return ("subset", expr, list(keys))

    def source(self, expr):
        return ("split", expr)


def test_tsfd_scheme_selects_listed_keys():
    tissue_of = {k: t for r in split_lists.ROLES for k, t in split_lists.tsfd_keys(r)}
    prepared = FakePrepared(tissue_of)
    cfg = get_config().data
    cfg.split_scheme = "tsfd"
    kind, expr, keys = split_lists.resolve_split(prepared, cfg, "val")
    assert expr == "fold1+fold2+fold3"
    assert keys == [f"fold{f}/{i:05d}" for _, f, i in map(split_lists.parse_tsfd_name,
                                                           split_lists.tsfd_names("val"))]
    assert len(keys) == 303
    # A tissue that disagrees with the file name is refused.
    bad = dict(tissue_of)
    bad[keys[0]] = "Colon" if tissue_of[keys[0]] != "Colon" else "Skin"
    with pytest.raises(UserError, match=f"{keys[0]} is"):
        split_lists.resolve_split(FakePrepared(bad), cfg, "val")
    # The official scheme just names prepared splits.
    cfg.split_scheme = "official"
    assert split_lists.resolve_split(prepared, cfg, "test") == ("split", cfg.test_split)
    cfg.split_scheme = "random"
    with pytest.raises(UserError, match="split_scheme"):
        split_lists.resolve_split(prepared, cfg, "train")


def test_tsfd_scheme_on_small_data_asks_for_real_pannuke(pannuke_root, tmp_path):
    out = tmp_path / "prep"
    prepare("pannuke", pannuke_root, out, progress=False, log=lambda s: None)
    ds = open_prepared(out)
    cfg = get_config().data
    cfg.split_scheme = "tsfd"
    with pytest.raises(UserError, match="real PanNuke"):
        split_lists.resolve_split(ds, cfg, "train")
    cfg.split_scheme = "official"
    cfg.train_split = "fold1+fold2"
    assert len(split_lists.resolve_split(ds, cfg, "train")) == 7


# ---- image + label folders -------------------------------------------------------------------
def majority_reference(inst: np.ndarray, typ: np.ndarray) -> dict[int, int]:
    """Original id -> majority type (ties: smaller), by plain counting."""
    out = {}
    for i in np.unique(inst[inst > 0]):
        c = Counter(typ[inst == i].tolist())
        c.pop(0, None)
        out[int(i)] = min(c, key=lambda t: (-c[t], t))
    return out


def test_folders_nucls(shared_data, tmp_path):
    nucls = shared_data / "nucls"
    out = tmp_path / "prep"
    meta = prepare("folders", [nucls / "train", nucls / "test"], out, progress=False,
                   log=lambda s: None)
    assert meta["splits"] == {"train": 10, "test": 5}
    assert meta["label_names"] == ["Background", "non-tumor", "tumor"]
    assert meta["tissue_names"] == [] and meta["image_size"] == 256
    ds = open_prepared(out)
    src = ds.source("test")
    for i, stem in enumerate(sorted(p.stem for p in (nucls / "test").glob("*.png"))):
        ex = src[i]
        assert ex["key"] == stem and ex["tissue"] == 0
        image = Image.open(nucls / "test" / f"{stem}.png").convert("RGB")
        np.testing.assert_array_equal(ex["image"], np.asarray(image))
        z = np.load(nucls / "test" / f"{stem}.npz")
        ids = np.unique(z["inst"][z["inst"] > 0])
        ref = majority_reference(z["inst"], z["type"])
        assert ex["inst"].max() == len(ids)
        for new, old in enumerate(ids, start=1):  # ids renumbered in original order
            np.testing.assert_array_equal(ex["inst"] == new, z["inst"] == old)
            assert (ex["cls"][ex["inst"] == new] == ref[int(old)]).all()
        assert (ex["cls"][ex["inst"] == 0] == 0).all()
    with pytest.raises(UserError, match="single source group"):
        prepare("folders", nucls / "train", tmp_path / "p2", val_fraction=0.3, progress=False,
                log=lambda s: None)
    meta = prepare("folders", nucls / "train", tmp_path / "p3", val_fraction=0.3, group_pattern="",
                   progress=False, log=lambda s: None)
    assert meta["splits"] == {"train": 7, "val": 3}


def test_folders_consep_groups_stay_together(shared_data, tmp_path):
    src_dir = shared_data / "consep" / "train"
    inp = tmp_path / "consep"
    inp.mkdir()
    shutil.copy(src_dir / "classes.txt", inp)
    groups = sorted({folders_lib.source_group(p.stem) for p in src_dir.glob("*.jpg")})[:4]
    for g in groups:
        for t in range(3):
            for ext in (".jpg", ".npz"):
                shutil.copy(src_dir / f"{g}_{t:03d}{ext}", inp)
    out = tmp_path / "prep"
    meta = prepare("folders", inp, out, val_fraction=0.25, seed=3, progress=False,
                   log=lambda s: None)
    assert meta["label_names"] == ["Background", "other", "inflammatory", "epithelial",
                                   "spindle-shaped"]
    ds = open_prepared(out)
    train, val = set(ds.keys("train")), set(ds.keys("val"))
    assert len(val) == 3 and len(train) == 9 and not train & val
    g_train = {folders_lib.source_group(k) for k in train}
    g_val = {folders_lib.source_group(k) for k in val}
    assert not g_train & g_val  # no source image in both splits
    stems = sorted(p.stem for p in inp.glob("*.jpg"))
    assert folders_lib.split_by_group(stems, 0.25, 3) == (ds.keys("train"), ds.keys("val"))
    ex = ds.source("val")[0]
    np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(inp / f"{ex['key']}.jpg")))
    z = np.load(inp / f"{ex['key']}.npz")
    ref = majority_reference(z["inst"], z["type"])
    for new, old in enumerate(np.unique(z["inst"][z["inst"] > 0]), start=1):
        assert (ex["cls"][ex["inst"] == new] == ref[int(old)]).all()


def _folder(tmp_path, n=2, *, typ=True, classes=("a", "b")):
    d = tmp_path / "f"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"s_{i}.png")
        inst = np.zeros((32, 32), np.uint16)
        inst[2:8, 2:8] = 7
        inst[10:20, 10:20] = 3
        arrays = {"inst": inst}
        if typ:
            t = np.zeros((32, 32), np.uint8)
            t[inst > 0] = 1
            t[10:20, 10:15] = 2  # id 3: 50 px of label 2, 50 px of label 1 -> tie -> 1
            t[10:11, 15:20] = 2  # ... now 55 px of 2: majority 2
            arrays["type"] = t
        np.savez(d / f"s_{i}.npz", **arrays)
    if classes:
        (d / "classes.txt").write_text("\n".join(classes) + "\n")
    return d


def test_folder_example_and_no_type(tmp_path):
    d = _folder(tmp_path)
    ds = folders_lib.FolderDataset(d)
    assert ds.label_names == ("Background", "a", "b")
    ex, counts = ds.example_with_counts(0)
    assert ex["inst"][12, 12] == 1 and ex["inst"][3, 3] == 2  # id 3 < id 7
    assert ex["cls"][12, 12] == 2 and ex["cls"][3, 3] == 1
    assert counts["relabelled_images"] == 1 and counts["mixed_type_instances"] == 1
    d2 = _folder(tmp_path / "x", typ=False, classes=())
    ds2 = folders_lib.FolderDataset(d2)
    assert ds2.label_names == ("Background", "Nucleus")
    ex2 = ds2.example(1)
    np.testing.assert_array_equal(ex2["cls"], (ex2["inst"] > 0).astype(np.uint8))
    # Explicit classes win over classes.txt.
    assert folders_lib.FolderDataset(d, ["x", "y", "z"]).class_names == ("x", "y", "z")


def test_majority_ties_and_untyped_instances():
    inst = np.array([[5, 5, 5, 5, 0, 9, 9]])
    typ = np.array([[2, 2, 1, 1, 3, 0, 0]])
    out, cls, counts = folders_lib.instances_and_classes(inst, typ, 3)
    np.testing.assert_array_equal(out, [[1, 1, 1, 1, 0, 0, 0]])  # id 9 has no label: dropped
    np.testing.assert_array_equal(cls, [[1, 1, 1, 1, 0, 0, 0]])  # tie 2 vs 1 -> 1
    assert counts["untyped_instances"] == 1 and counts["typed_background_pixels"] == 1
    assert counts["mixed_type_instances"] == 1


def test_rgba_loses_alpha(tmp_path):
    d = _folder(tmp_path, n=1)
    rgba = np.random.default_rng(1).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "s_0.png")
    np.testing.assert_array_equal(folders_lib.FolderDataset(d).example(0)["image"], rgba[..., :3])


@pytest.mark.parametrize("problem,match,culprit", [
    ("no_npz", "no label file", "s_1.png"),
    ("no_image", "no image", "s_1.npz"),
    ("no_inst", "no 'inst'", "s_1.npz"),
    ("shape", "shape", "s_1.npz"),
    ("grey", "greyscale", "s_1.png"),
    ("beyond", "class label 3 beyond", "s_1.npz"),
    ("float_inst", "expected integers", "s_1.npz"),
    ("no_classes", "no classes.txt", "s_"),
    ("pickle", "readable .npz", "s_1.npz"),
])
def test_folder_bad_inputs(tmp_path, problem, match, culprit):
    d = _folder(tmp_path)
    inst = np.ones((32, 32), np.int32)
    if problem == "no_npz":
        (d / "s_1.npz").unlink()
    elif problem == "no_image":
        (d / "s_1.png").unlink()
    elif problem == "no_inst":
        np.savez(d / "s_1.npz", labels=inst, type=inst)
    elif problem == "shape":
        np.savez(d / "s_1.npz", inst=np.ones((31, 32), np.int32), type=np.ones((31, 32), np.int32))
    elif problem == "grey":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "s_1.png")
    elif problem == "beyond":
        np.savez(d / "s_1.npz", inst=inst, type=inst * 3)
    elif problem == "float_inst":
        np.savez(d / "s_1.npz", inst=inst.astype(float), type=inst)
    elif problem == "no_classes":
        (d / "classes.txt").unlink()
    elif problem == "pickle":
        np.savez(d / "s_1.npz", inst=np.array([inst], dtype=object), type=inst)
    with pytest.raises(UserError, match=match) as e:
        ds = folders_lib.FolderDataset(d)
        for i in range(len(ds)):
            ds.example(i)
    assert str(d) in str(e.value) and culprit in str(e.value)


def test_folder_split_options_checked(tmp_path):
    a = _folder(tmp_path / "a")
    b = _folder(tmp_path / "b")
    from tsfd_jax.data.prepare import plan_folders

    with pytest.raises(UserError, match="split name 'a-b'"):
        plan_folders([a], ["a-b"])
    with pytest.raises(UserError, match="--split given 1 times for 2"):
        plan_folders([a, b], ["train"])
    with pytest.raises(UserError, match="keys must be unique"):  # same stems in both folders
        plan_folders([a, b], ["train", "test"])
    with pytest.raises(UserError, match="needs a 'train'"):
        plan_folders([a], ["test"], val_fraction=0.5)
    with pytest.raises(UserError, match="val-fraction"):
        plan_folders([a], None, val_fraction=1.5)
    plan = plan_folders([a], None, val_fraction=0.5, group_pattern="")
    assert {k: len(v) for k, v in plan.splits.items()} == {"train": 1, "val": 1}


# ---- command line ----------------------------------------------------------------------------
def test_prepare_command(pannuke_root, tmp_path, capsys):
    from tsfd_jax.cli import main

    out = tmp_path / "prep"
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--source", "pannuke", "--input", str(pannuke_root), "--out", str(out),
              "--no-progress"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "fold1 4 images" in printed and "resolved: " in printed
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--source", "pannuke", "--input", str(pannuke_root), "--out", str(out)])
    assert e.value.code == 0 and "already prepared" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--source", "pannuke", "--input", str(tmp_path / "nope"), "--out",
              str(tmp_path / "p2")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and err.count("\n") == 1
