"""Host input pipeline (tsfd_jax.data.pipeline): determinism, epochs, per-process shards,
checkpointable iterator state, padded evaluation batches, global sharded arrays, show-batch."""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tsfd_jax.data import pipeline as pl

SIZE = 32
ROOT = Path(__file__).resolve().parents[1]


class ToySource:
    """In-memory prepared examples whose pixels encode their position (so batches can be checked
    against the source independently of the ``index`` field). Top-level: picklable for workers."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(i)
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        image[..., 0] = i
        image[..., 1] = np.arange(SIZE, dtype=np.uint8)[None, :]
        inst = np.zeros((SIZE, SIZE), np.int32)
        inst[4:10, 4:10] = 1
        inst[20:28, 12:18] = 2
        return {"image": image, "inst": inst, "cls": ((inst > 0) * (1 + i % 5)).astype(np.uint8),
                "tissue": np.int32(i % 19), "key": f"fold1/{i:05d}"}


def _take(it, k: int) -> list[dict]:
    return [next(it) for _ in range(k)]


def _indices(batches: list[dict]) -> np.ndarray:
    return np.concatenate([b["index"] for b in batches])


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batch_format_matches_source():
    src = ToySource(20)
    b = next(pl.train_iterator(src, 8, seed=0, process_index=0, process_count=1))
    assert set(b) == {"image", "inst", "cls", "tissue", "index", "valid"}
    assert b["image"].shape == (8, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
    assert b["inst"].dtype == np.int32 and b["cls"].dtype == np.uint8
    assert b["tissue"].shape == (8,) and b["tissue"].dtype == np.int32
    assert b["valid"].dtype == np.bool_ and b["valid"].all()
    for j, i in enumerate(b["index"]):
        ref = src[int(i)]
        for k in ("image", "inst", "cls", "tissue"):
            np.testing.assert_array_equal(b[k][j], ref[k])


def test_same_seed_same_batches_different_seed_differs():
    src = ToySource(24)

    def run(seed):
        return _take(pl.train_iterator(src, 4, seed=seed, process_index=0, process_count=1), 9)

    a, b, c = run(3), run(3), run(4)
    _assert_same(a, b)
    assert not np.array_equal(_indices(a), _indices(c))


def test_two_workers_give_the_same_batches_as_in_process():
    src = ToySource(24)
    ref = _take(pl.train_iterator(src, 4, seed=5, process_index=0, process_count=1), 8)
    it = pl.train_iterator(src, 4, seed=5, num_workers=2, process_index=0, process_count=1)
    try:
        got = _take(it, 8)
    finally:
        it.close()
    _assert_same(ref, got)


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 3)])
def test_each_epoch_is_a_fresh_permutation_of_the_shard(process_index, process_count):
    n = 30
    shard = np.arange(process_index, n, process_count)
    local = 4  # does not divide the shard: batches run across epoch boundaries
    it = pl.train_iterator(ToySource(n), local * process_count, seed=1,
                           process_index=process_index, process_count=process_count)
    epochs = 3
    idx = _indices(_take(it, -(-epochs * len(shard) // local)))[: epochs * len(shard)]
    orders = idx.reshape(epochs, len(shard))
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), shard)
    assert not np.array_equal(orders[0], orders[1]), "repeat(None) should reshuffle each epoch"


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_are_disjoint_and_cover_the_split(process_count):
    n = 31
    seen = []
    for p in range(process_count):
        size = len(range(p, n, process_count))
        it = pl.train_iterator(ToySource(n), 2 * process_count, seed=0,
                               process_index=p, process_count=process_count)
        seen.append(_indices(_take(it, -(-size // 2)))[:size])
        assert len(set(seen[-1].tolist())) == size
    together = np.concatenate(seen)
    assert len(together) == n
    np.testing.assert_array_equal(np.sort(together), np.arange(n))


def test_iterator_state_resumes_exactly():
    src = ToySource(22)
    make = lambda: pl.train_iterator(src, 4, seed=2, process_index=0, process_count=1)
    it = make()
    _take(it, 7)  # crosses an epoch boundary
    state = it.get_state()
    want = _take(it, 5)
    fresh = make()
    fresh.set_state(state)
    _assert_same(want, _take(fresh, 5))


def test_iterator_state_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    src = ToySource(22)
    make = lambda: pl.train_iterator(src, 4, seed=2, process_index=0, process_count=1)
    it = make()
    _take(it, 3)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",),
                                 item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()})
    mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = _take(it, 4)
    fresh = make()
    mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(want, _take(fresh, 4))


def test_train_iterator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
        pl.train_iterator(ToySource(20), 4, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="empty"):
        pl.train_iterator(ToySource(0), 4, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="fewer than one per-process batch"):
        pl.train_iterator(ToySource(7), 8, seed=0, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        pl.train_iterator(ToySource(7), 2, seed=0, process_index=2, process_count=2)


def test_eval_single_process_in_order_with_padding():
    src = ToySource(23)
    batches = list(pl.eval_batches(src, 4, process_index=0, process_count=1))
    assert len(batches) == 6
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(valid, np.arange(24) < 23)
    np.testing.assert_array_equal(_indices(batches)[valid], np.arange(23))
    assert (_indices(batches)[~valid] == -1).all()
    keys = sum((b["key"] for b in batches), [])
    assert keys[:23] == [src[i]["key"] for i in range(23)] and keys[23] == ""
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(images[:23, 0, 0, 0], np.arange(23))  # pixels, not just index
    assert all(b["image"].shape == (4, SIZE, SIZE, 3) for b in batches)


@pytest.mark.parametrize("n,batch,process_count", [(23, 6, 3), (5, 3, 3), (9, 2, 2)])
def test_eval_processes_cover_everything_once_with_equal_batch_counts(n, batch, process_count):
    src = ToySource(n)
    per_process = [list(pl.eval_batches(src, batch, process_index=p, process_count=process_count))
                   for p in range(process_count)]
    assert len({len(b) for b in per_process}) == 1, "every process must run the same steps"
    got = []
    for batches in per_process:
        assert all(b["image"].shape[0] == batch // process_count for b in batches)
        idx = _indices(batches)
        valid = np.concatenate([b["valid"] for b in batches])
        assert (idx[~valid] == -1).all()
        got.append(idx[valid])
    # Contiguous shards: process order concatenated is the source order.
    np.testing.assert_array_equal(np.concatenate(got), np.arange(n))
    if (n, batch, process_count) == (5, 3, 3):  # shards of 1, 2, 2: process 0 pads a whole batch
        assert not per_process[0][1]["valid"].any()


def test_eval_rejects_a_batch_not_divisible_by_processes():
    with pytest.raises(ValueError, match="not divisible"):
        list(pl.eval_batches(ToySource(5), 3, process_index=0, process_count=2))


def test_to_global_shards_over_data_axis():
    assert jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = next(iter(pl.eval_batches(ToySource(10), 8, process_index=0, process_count=1)))
    out = pl.to_global(batch, mesh)
    assert "key" not in out and set(out) == {"image", "inst", "cls", "tissue", "index", "valid"}
    for k, v in out.items():
        assert v.shape == batch[k].shape and v.dtype == batch[k].dtype
        assert v.sharding.spec == P("data")
        assert len(v.addressable_shards) == 4
        assert all(s.data.shape[0] == 2 for s in v.addressable_shards)
        np.testing.assert_array_equal(np.asarray(v), batch[k])
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        pl.to_global({"x": np.zeros((6, 2))}, mesh)



def test_show_batch_palette_uses_pannuke_colours_and_a_generic_fallback():
    from tsfd_jax.commands import show_batch
    from tsfd_jax.constants import LABEL_NAMES, PANNUKE_CLASS_COLORS

    pal = show_batch.class_palette(LABEL_NAMES)
    cls = np.array([[0, 1], [5, 9]])
    rgb = show_batch.colorize(cls, pal)
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[0, 1].tolist() == list(PANNUKE_CLASS_COLORS[0])  # label 1 = Neoplastic
    assert rgb[1, 0].tolist() == list(PANNUKE_CLASS_COLORS[4])  # label 5 = Epithelial
    assert rgb[1, 1].tolist() == [255, 255, 255]                # outside the label list
    other = show_batch.class_palette(["Background", "Nucleus", "Other"])
    assert len({tuple(c) for c in other}) == 3


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    from tsfd_jax.data import prepare, synthetic

    root = tmp_path_factory.mktemp("show_batch")
    synthetic.write_pannuke(root / "raw", 3, seed=0, folds=1, image_size=32)
    prepare.prepare("pannuke", root / "raw", root / "prepared", progress=False, log=lambda _: None)
    return root / "prepared"


def test_show_batch_writes_the_picture_and_refuses_to_overwrite(prepared_dir, tmp_path, capsys):
    from PIL import Image

    from tsfd_jax.commands import show_batch
    from tsfd_jax.cli import main

    out = tmp_path / "batch.png"
    argv = ["show-batch", "--data", str(prepared_dir), "--split", "fold1", "--num", "2",
            "--config", str(ROOT / "configs" / "tiny.py"), "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    image = Image.open(out)
    panel = max(32, show_batch.MIN_PANEL)   # tiny config: 32 px labels, RGB + H, E, R channels
    cols, rows = 1 + 3 + 2, 2 * 2           # + semantic, boundary; plain and augmented rows
    assert image.size == (show_batch.LEFT + cols * (panel + show_batch.GAP),
                          rows * (show_batch.CAPTION + panel + show_batch.GAP))
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas
    before = out.read_bytes()
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["batch.png"]  # no temporary file left


def test_show_batch_draws_hv_maps_and_their_boundary_map(prepared_dir, tmp_path):
    from PIL import Image

    from tsfd_jax.commands import show_batch
    from tsfd_jax.cli import main

    out = tmp_path / "batch.png"
    with pytest.raises(SystemExit) as done:
        main(["show-batch", "--data", str(prepared_dir), "--split", "fold1", "--num", "1",
              "--config", str(ROOT / "configs" / "tiny.py"), "--out", str(out),
              "--config.targets.boundary_kind=hv", "--config.loss.boundary=mse_msge"])
    assert done.value.code == 0
    panel = max(32, show_batch.MIN_PANEL)
    cols = 1 + 3 + 1 + 3                    # + semantic, horizontal, vertical, energy
    assert Image.open(out).size[0] == show_batch.LEFT + cols * (panel + show_batch.GAP)
