"""The original CoNSeP / HoVer-Net layout (Images/*.png + Labels/*.mat) read by FolderDataset:
equal to the npz of the same tiles, --merge consep 7 -> 4, inst_map-only files, any image size,
and one-line errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from tsfd_jax.data import folders as folders_lib
from tsfd_jax.data.prepare import plan_folders, prepare
from tsfd_jax.data.prepared import open_prepared
from tsfd_jax.errors import UserError
from tsfd_jax.image_io import read_image

FIELDS = ("image", "inst", "cls", "tissue", "key")
MERGED = ("other", "inflammatory", "epithelial", "spindle-shaped")
quiet = {"progress": False, "log": lambda s: None}


def assert_examples_equal(a: dict, b: dict) -> None:
    for k in FIELDS:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def write_mat_folder(root: Path, items: dict[str, tuple[np.ndarray, np.ndarray,
                                                        np.ndarray | None]],
                     classes: tuple[str, ...] = ()) -> Path:
    """Images/<stem>.png + Labels/<stem>.mat (inst_map as double, as MATLAB saves it)."""
    (root / "Images").mkdir(parents=True, exist_ok=True)
    (root / "Labels").mkdir(exist_ok=True)
    for stem, (image, inst, typ) in items.items():
        Image.fromarray(image).save(root / "Images" / f"{stem}.png")
        arrays = {"inst_map": inst.astype(np.float64)}
        if typ is not None:
            arrays["type_map"] = typ
        scipy.io.savemat(root / "Labels" / f"{stem}.mat", arrays)
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def write_npz_folder(root: Path, items: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                     classes: tuple[str, ...]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, (image, inst, typ) in items.items():
        Image.fromarray(image).save(root / f"{stem}.png")
        np.savez(root / f"{stem}.npz", inst=inst, type=typ)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def unmerge(inst: np.ndarray, typ: np.ndarray) -> np.ndarray:
    """4 merged CoNSeP classes -> 7, varying by instance id: epithelial 3 -> 3|4, spindle
    4 -> 5|6|7. --merge consep must give back ``typ``."""
    out = typ.astype(np.uint8).copy()
    out[typ == 3] = 3 + inst[typ == 3] % 2
    out[typ == 4] = 5 + inst[typ == 4] % 3
    return out


def synthetic_items(n: int = 2, size: tuple[int, int] = (32, 48), typed: bool = True
                    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(0)
    items = {}
    for i in range(n):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        inst = np.zeros(size, np.uint16)
        typ = np.zeros(size, np.uint8)
        for k in range(7):  # nucleus id 10 + k of CoNSeP class k + 1
            inst[2:6, 2 + 6 * k:6 + 6 * k] = 10 + k
            typ[2:6, 2 + 6 * k:6 + 6 * k] = k + 1
        items[f"img_{i}"] = (image, inst, typ if typed else None)
    return items


# ---- synthetic (no shared data) --------------------------------------------------------------
def test_synthetic_mat_layout_classes_and_merge(tmp_path):
    items = synthetic_items()
    d = write_mat_folder(tmp_path / "mat", items, classes=folders_lib.CONSEP_CLASSES)
    (d / "Overlay").mkdir()  # the CoNSeP download's third folder is ignored
    ds = folders_lib.FolderDataset(d)
    assert ds.label_format is folders_lib.MAT_FORMAT and ds.typed
    assert ds.stems == ("img_0", "img_1") and len(ds) == 2 and ds.image_shape(1) == (32, 48)
    assert ds.label_paths["img_0"] == d / "Labels" / "img_0.mat"
    assert ds.label_names == ("Background",) + folders_lib.CONSEP_CLASSES
    image, inst, _ = items["img_0"]
    ex = ds.example(0)
    np.testing.assert_array_equal(ex["image"], image)
    assert ex["inst"].dtype == np.int32 and ex["inst"].max() == 7
    np.testing.assert_array_equal(ex["cls"][3, 3 + 6 * np.arange(7)], np.arange(1, 8))
    # --merge consep: 1 2 | 3 4 -> 3 | 5 6 7 -> 4, named as the merged tiles' classes.txt.
    (d / "classes.txt").unlink()
    merged = folders_lib.FolderDataset(d, merge="consep")
    assert merged.class_names == MERGED
    ex = merged.example(0)
    np.testing.assert_array_equal(ex["cls"][3, 3 + 6 * np.arange(7)], [1, 2, 3, 3, 4, 4, 4])
    np.testing.assert_array_equal(ex["inst"], ds.example(0)["inst"])


def test_merge_table_is_data():
    m = folders_lib.MERGES["consep"]
    np.testing.assert_array_equal(m.lookup(), [0, 1, 2, 3, 3, 4, 4, 4])
    assert len(m.source_names) == 7 and m.names == MERGED
    with pytest.raises(ValueError, match="every id"):
        folders_lib.ClassMerge(("a", "b"), ("x",), {1: 1})


def test_inst_map_only_is_one_class(tmp_path):
    d = write_mat_folder(tmp_path / "monuseg", synthetic_items(typed=False))
    ds = folders_lib.FolderDataset(d)
    assert not ds.typed and ds.label_names == ("Background", "Nucleus")
    ex = ds.example(1)
    np.testing.assert_array_equal(ex["cls"], (ex["inst"] > 0).astype(np.uint8))
    assert ex["inst"].max() == 7


def test_merge_changes_the_fingerprint_and_the_command(tmp_path, capsys):
    from tsfd_jax.cli import main

    d = write_mat_folder(tmp_path / "mat", synthetic_items(), classes=folders_lib.CONSEP_CLASSES)
    assert "merge" not in plan_folders([d]).options  # unchanged for folders prepared before
    assert plan_folders([d], merge="consep").options["merge"] == "consep"
    assert plan_folders([d]).fingerprint() != plan_folders([d], merge="consep").fingerprint()
    out = tmp_path / "prep"
    prepare("folders", d, out, **quiet)
    with pytest.raises(UserError, match="different input or options"):
        prepare("folders", d, out, merge="consep", **quiet)
    (d / "classes.txt").write_text("\n".join(folders_lib.CONSEP_CLASSES) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--source", "folders", "--input", str(d), "--merge", "consep",
              "--out", str(tmp_path / "p2"), "--no-progress"])
    assert e.value.code == 0
    assert "spindle-shaped 6" in capsys.readouterr().out  # 2 images x classes 5, 6, 7
    meta = open_prepared(tmp_path / "p2").metadata
    assert meta["label_names"] == ["Background", *MERGED] and meta["options"]["merge"] == "consep"
    with pytest.raises(UserError, match="--merge apply to --source folders"):
        prepare("pannuke", d, tmp_path / "p3", merge="consep", **quiet)


@pytest.mark.parametrize("problem,match,culprit", [
    ("no_mat", "no label file img_1.mat in", "Images/img_1.png"),
    ("no_image", "no image img_1", "Labels/img_1.mat"),
    ("no_inst_map", r"no 'inst_map' array \(has labels, type_map\)", "Labels/img_1.mat"),
    ("size", r"'inst_map' has shape \(32, 40\) but the image is \(32, 48\)", "Labels/img_1.mat"),
    ("beyond_classes", "class label 7 beyond the 2 classes", "Labels/img_0.mat"),
    ("beyond_merge", "class label 8 beyond --merge consep's input 7 classes", "Labels/img_1.mat"),
    ("unreadable", "not a readable .mat file", "Labels/img_1.mat"),
    ("fractional", "'inst_map' has dtype float64, expected integers", "Labels/img_1.mat"),
    ("negative", "'type_map' has negative values", "Labels/img_1.mat"),
    ("no_classes", "--merge consep for CoNSeP's 7 classes", "Labels/img_0.mat"),
    ("untyped_merge", "no 'type_map' array, but classes", "Labels/img_1.mat"),
    ("merged_tiles", "names 4 classes but --merge consep expects input ids 1..7", "classes.txt"),
    ("classes_and_merge", "--classes and --merge consep both", ""),
    ("unknown_merge", "--merge 'pannuke': expected one of consep", ""),
])
def test_mat_errors_name_the_file(tmp_path, problem, match, culprit):
    items = synthetic_items()
    d = write_mat_folder(tmp_path / "mat", items, classes=folders_lib.CONSEP_CLASSES)
    mat = d / "Labels" / "img_1.mat"
    image, inst, typ = items["img_1"]
    classes, merge = None, None
    if problem == "no_mat":
        mat.unlink()
    elif problem == "no_image":
        (d / "Images" / "img_1.png").unlink()
    elif problem == "no_inst_map":
        scipy.io.savemat(mat, {"labels": inst, "type_map": typ})
    elif problem == "size":
        scipy.io.savemat(mat, {"inst_map": inst[:, :40], "type_map": typ[:, :40]})
    elif problem == "beyond_classes":
        (d / "classes.txt").write_text("a\nb\n")
    elif problem == "beyond_merge":
        (d / "classes.txt").unlink()
        scipy.io.savemat(mat, {"inst_map": inst, "type_map": typ + (typ == 7)})
        merge = "consep"
    elif problem == "unreadable":
        mat.write_bytes(b"not a MATLAB file" * 20)
    elif problem == "fractional":
        scipy.io.savemat(mat, {"inst_map": inst + 0.5, "type_map": typ})
    elif problem == "negative":
        scipy.io.savemat(mat, {"inst_map": inst, "type_map": typ.astype(np.int16) - 1})
    elif problem == "no_classes":
        (d / "classes.txt").unlink()
    elif problem == "untyped_merge":
        scipy.io.savemat(mat, {"inst_map": inst})
        merge = "consep"
    elif problem == "merged_tiles":
        (d / "classes.txt").write_text("\n".join(MERGED) + "\n")
        merge = "consep"
    elif problem == "classes_and_merge":
        classes, merge = ["a", "b"], "consep"
    elif problem == "unknown_merge":
        merge = "pannuke"
    with pytest.raises(UserError, match=match) as e:
        ds = folders_lib.FolderDataset(d, classes, merge)
        for i in range(len(ds)):
            ds.example(i)
    assert "\n" not in str(e.value)
    if culprit:
        assert str(d / culprit) in str(e.value)


# ---- the real CoNSeP tiles ------------------------------------------------------------------
@pytest.fixture(scope="module")
def consep_items(shared_data) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Three real tiles, plus 4 tiles of one source image side by side (512 x 512) and 2 of them
    (256 x 512): images of any size are stored uncut."""
    src = shared_data / "consep" / "train"
    if not (src / "classes.txt").is_file():
        pytest.skip(f"{src}: no CoNSeP tiles")
    assert folders_lib.read_classes(src / "classes.txt") == MERGED  # the names the merge uses

    def tile(stem: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = np.load(src / f"{stem}.npz")
        return read_image(src / f"{stem}.jpg"), z["inst"], z["type"]

    items = {s: tile(s) for s in ("train_10_000", "train_10_005", "train_7_003")}
    parts = []
    offset = 0
    for t in range(4):  # ids shifted so they stay unique across the tiles
        image, inst, typ = tile(f"train_1_{t:03d}")
        parts.append((image, np.where(inst > 0, inst.astype(np.int32) + offset, 0), typ))
        offset += int(inst.max())

    def grid(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.concatenate([np.concatenate([parts[t][k] for t in row], axis=1)
                                     for row in rows]) for k in range(3))  # type: ignore

    items["big_512"] = grid([[0, 1], [2, 3]])
    items["wide_256x512"] = grid([[0, 1]])
    return items


def test_mat_layout_equals_npz_of_the_same_tiles(consep_items, tmp_path):
    npz = write_npz_folder(tmp_path / "npz", consep_items, MERGED)
    mat = write_mat_folder(tmp_path / "mat", consep_items, MERGED)
    meta_npz = prepare("folders", npz, tmp_path / "prep_npz", **quiet)
    meta_mat = prepare("folders", mat, tmp_path / "prep_mat", **quiet)
    for k in ("label_names", "splits", "nuclei_per_class", "resolutions", "image_size"):
        assert meta_mat[k] == meta_npz[k], k
    assert meta_mat["image_size"] is None and meta_mat["label_names"][1:] == list(MERGED)
    a, b = (open_prepared(tmp_path / p).source("train") for p in ("prep_npz", "prep_mat"))
    assert a.keys == b.keys and len(b) == len(consep_items)
    for i in range(len(b)):
        assert_examples_equal(b[i], a[i])
    big = b[b.keys.index("big_512")]
    assert big["image"].shape == (512, 512, 3) and big["inst"].shape == (512, 512)
    assert b[b.keys.index("wide_256x512")]["inst"].shape == (256, 512)


def test_merge_consep_restores_the_merged_tiles(consep_items, tmp_path):
    unmerged = {s: (image, inst, unmerge(inst, typ)) for s, (image, inst, typ)
                in consep_items.items()}
    assert {3, 4, 5, 6, 7} <= set(np.unique(unmerged["big_512"][2]).tolist())
    npz = write_npz_folder(tmp_path / "npz", consep_items, MERGED)
    mat = write_mat_folder(tmp_path / "mat", unmerged)
    prepare("folders", npz, tmp_path / "prep_npz", **quiet)
    meta = prepare("folders", mat, tmp_path / "prep_mat", merge="consep", **quiet)
    assert meta["label_names"] == ["Background", *MERGED]
    a, b = (open_prepared(tmp_path / p).source("train") for p in ("prep_npz", "prep_mat"))
    for i in range(len(b)):
        assert_examples_equal(b[i], a[i])
    # Unmerged, the 7 classes are kept as given.
    seven = folders_lib.FolderDataset(mat, folders_lib.CONSEP_CLASSES)
    ex = seven.example(seven.stems.index("big_512"))
    assert set(np.unique(ex["cls"])) == set(range(8))
