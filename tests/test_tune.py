"""Post-processing tuned on validation: the search, the stored file and who uses it."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from tsfd_jax.data.pannuke import masks_to_instances
from tsfd_jax.data.synthetic import generate
from tsfd_jax.errors import UserError
from tsfd_jax.data.pannuke import to_pannuke_masks
from tsfd_jax.evaluate_run import load_run_config
from tsfd_jax.ops.targets import boundaries
from tsfd_jax.postprocess import PostprocessParams, postprocess
from tsfd_jax.tune import TUNED_FILE, score, search


def _uncertain_predictions(n=6, size=64):
    """Probabilities a half-trained model gives: the right nuclei and boundaries, but the
    class probability split between the true class (0.45) and another one (0.35)."""
    images, masks, _ = generate(n, 3, image_size=size)
    seg, bdr, truth = [], [], []
    for m in masks:
        inst, cls = masks_to_instances(m)[:2]
        p = np.zeros((size, size, 6), np.float32)
        fg = inst > 0
        p[..., 0] = np.where(fg, 0.2, 1.0)
        rows, cols = np.nonzero(fg)
        p[rows, cols, cls[fg]] = 0.45
        p[rows, cols, cls[fg] % 5 + 1] = 0.35
        seg.append(p)
        bdr.append(0.9 * np.asarray(boundaries(jnp.asarray(inst)), np.float32))
        truth.append(to_pannuke_masks(inst, cls, 5))
    return {"seg": np.stack(seg), "boundary": np.stack(bdr), "truth": np.stack(truth),
            "tissue": np.zeros(n, np.int64)}


def test_split_class_probabilities_lose_nuclei_in_the_paper_method_not_in_markers():
    data = _uncertain_predictions(2)
    paper = postprocess(data["seg"][0], data["boundary"][0], PostprocessParams())
    markers = postprocess(data["seg"][0], data["boundary"][0],
                          PostprocessParams(method="markers", min_size=8))
    true_count = int(len(np.unique(data["truth"][0][..., :5])) - 1)
    assert paper.num_instances == 0
    assert abs(markers.num_instances - true_count) <= max(2, true_count // 10)


def _disc_probabilities(discs, size=64):
    """Class-1 probability 0.9 on the union of discs (cy, cx, r), no boundary predicted."""
    yy, xx = np.mgrid[:size, :size]
    fg = np.zeros((size, size), bool)
    for cy, cx, r in discs:
        fg |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    seg = np.zeros((size, size, 3), np.float32)
    seg[..., 0] = np.where(fg, 0.1, 0.9)
    seg[..., 1] = 1 - seg[..., 0]
    return seg, np.zeros((size, size), np.float32)


@pytest.mark.parametrize("discs,split", [
    (((32, 20, 9), (32, 36, 9)), 2),             # two touching round nuclei, boundary missed
    (((20, 20, 8), (20, 34, 7), (33, 27, 8)), 3),  # a cluster of three
    (((32, 32, 10),), 1),                        # one round nucleus stays whole
    (((32, 32, 1.5),), 1),                       # thinner than the depth: kept, not split
])
def test_split_depth_separates_touching_round_nuclei(discs, split):
    seg, bdr = _disc_probabilities(discs)
    plain = postprocess(seg, bdr, PostprocessParams(method="markers", min_size=4))
    split_ = postprocess(seg, bdr, PostprocessParams(method="markers", min_size=4,
                                                     split_depth=2.0))
    assert plain.num_instances == 1
    assert split_.num_instances == split
    assert ((split_.inst > 0) == (plain.inst > 0)).all()  # the foreground is only divided
    if split == 2:  # the cut runs along the neck, between the two centres
        left, right = split_.inst[32, 20], split_.inst[32, 36]
        assert left != right and (split_.inst[:, :27] != right).all()
        assert (split_.inst[:, 30:][split_.inst[:, 30:] > 0] == right).all()


def test_split_depth_keeps_an_elongated_nucleus_whole():
    size = 64
    yy, xx = np.mgrid[:size, :size]
    fg = ((yy - 32) / 5.0) ** 2 + ((xx - 32) / 20.0) ** 2 <= 1  # spindle-shaped, 40 x 10 px
    seg = np.zeros((size, size, 3), np.float32)
    seg[..., 0] = np.where(fg, 0.1, 0.9)
    seg[..., 1] = 1 - seg[..., 0]
    out = postprocess(seg, np.zeros((size, size), np.float32),
                      PostprocessParams(method="markers", min_size=4, split_depth=1.0))
    assert out.num_instances == 1


def _ringed_nuclei(contact: float, noise: float = 0.0, seed: int = 0, size: int = 64):
    """Two touching discs in one foreground blob whose boundary map is a ring around each
    nucleus (0.6 on the rims, 0.15 inside, ``noise`` of texture on top) that on the contact
    between them only reaches ``contact``: the map of a gland a small model draws."""
    yy, xx = np.mgrid[:size, :size]
    d1 = np.hypot(yy - 32, xx - 21)
    d2 = np.hypot(yy - 32, xx - 43)
    fg = (d1 <= 11) | (d2 <= 11)
    seg = np.zeros((size, size, 3), np.float32)
    seg[..., 0] = np.where(fg, 0.1, 0.9)
    seg[..., 1] = 1 - seg[..., 0]
    rim = np.minimum(np.abs(d1 - 10), np.abs(d2 - 10)) <= 1.5
    bdr = np.where(rim, 0.6, 0.15).astype(np.float32)
    bdr[rim & (np.abs(xx - 32) <= 3)] = contact
    bdr += noise * np.random.default_rng(seed).standard_normal(bdr.shape).astype(np.float32)
    return seg, bdr


@pytest.mark.parametrize("contact", [0.35, 0.45])
def test_basin_depth_splits_nuclei_at_rings_under_the_boundary_threshold(contact):
    seg, bdr = _ringed_nuclei(contact)
    base = PostprocessParams(method="markers", min_size=4, boundary_threshold=0.9)
    plain = postprocess(seg, bdr, base)
    split = postprocess(seg, bdr, dataclasses.replace(base, basin_depth=0.15))
    assert plain.num_instances == 1  # no boundary pixel above 0.9: one core, one nucleus
    assert split.num_instances == 2
    assert split.inst[32, 21] != split.inst[32, 43]
    assert ((split.inst > 0) == (plain.inst > 0)).all()  # the foreground is only divided
    # the basins deeper than the contact is high keep the nuclei whole (nothing to split)
    deep = postprocess(seg, bdr, dataclasses.replace(base, basin_depth=contact - 0.1))
    assert deep.num_instances == 1


def test_basin_depth_ignores_texture_shallower_than_the_depth():
    seg, bdr = _ringed_nuclei(0.6, noise=0.02, seed=3)
    base = PostprocessParams(method="markers", min_size=4, boundary_threshold=0.9)
    assert postprocess(seg, bdr, dataclasses.replace(base, basin_depth=0.2)).num_instances == 2
    assert postprocess(seg, bdr, dataclasses.replace(base, basin_depth=0.01)).num_instances > 2


def test_basin_and_distance_splitting_are_exclusive_in_config_and_search():
    with pytest.raises(ValueError, match="split_depth and postprocess.basin_depth"):
        PostprocessParams.of({"method": "markers", "split_depth": 2.0, "basin_depth": 0.3})
    seg, bdr = _ringed_nuclei(0.35)
    with pytest.raises(ValueError, match="both set"):
        postprocess(seg, bdr, PostprocessParams(method="markers", split_depth=2.0,
                                                basin_depth=0.3))


def test_max_growth_keeps_nuclei_to_their_cores_where_the_foreground_runs_on():
    # Two nuclei whose boundary rims are predicted, lying in a foreground blob that also covers
    # the tissue between them (a gland): unlimited, the flood gives that tissue to the nuclei.
    size = 64
    yy, xx = np.mgrid[:size, :size]
    seg = np.zeros((size, size, 3), np.float32)
    fg = (np.abs(yy - 32) <= 12) & (np.abs(xx - 32) <= 26)
    seg[..., 0] = np.where(fg, 0.1, 0.9)
    seg[..., 1] = 1 - seg[..., 0]
    bdr = np.ones((size, size), np.float32)
    centres = ((32, 18), (32, 46))
    for cy, cx in centres:
        bdr[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 0.0  # cores of radius 4
    flood = postprocess(seg, bdr, PostprocessParams(method="markers", min_size=4))
    grown = postprocess(seg, bdr, PostprocessParams(method="markers", min_size=4,
                                                    max_growth=3.0))
    assert flood.num_instances == grown.num_instances == 2
    assert ((flood.inst > 0) == fg).all()
    # Brute force: a pixel is kept iff it is foreground within 3 px of some core pixel.
    cores = np.argwhere(bdr == 0)
    near = np.zeros((size, size), bool)
    for y, x in np.argwhere(fg):
        near[y, x] = (((cores - (y, x)) ** 2).sum(1) <= 9).any()
    assert ((grown.inst > 0) == near).all()
    for cy, cx in centres:  # each nucleus a disc of radius 7 around its own centre
        label = grown.inst[cy, cx]
        assert ((grown.inst == label) == near & ((yy - cy) ** 2 + (xx - cx) ** 2 <= 49)).all()


def test_orphan_size_keeps_large_foreground_without_a_core():
    # Three nuclei: one with a boundary-free core, one large and one small whose whole area the
    # model called boundary (no core): by default only the first survives.
    size = 64
    yy, xx = np.mgrid[:size, :size]
    discs = {"cored": (16, 16, 7), "large": (44, 44, 6), "small": (16, 48, 3)}
    masks = {k: (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r for k, (cy, cx, r) in discs.items()}
    fg = masks["cored"] | masks["large"] | masks["small"]
    seg = np.zeros((size, size, 3), np.float32)
    seg[..., 0] = np.where(fg, 0.1, 0.9)
    seg[..., 1] = 1 - seg[..., 0]
    bdr = np.where(fg, 0.9, 0.0).astype(np.float32)
    bdr[(yy - 16) ** 2 + (xx - 16) ** 2 <= 9] = 0.0
    params = PostprocessParams(method="markers", min_size=8)
    plain = postprocess(seg, bdr, params)
    assert plain.num_instances == 1 and ((plain.inst > 0) == masks["cored"]).all()
    # large: 113 px, small: 29 px
    kept = postprocess(seg, bdr, dataclasses.replace(params, orphan_size=64))
    assert kept.num_instances == 2
    assert ((kept.inst > 0) == (masks["cored"] | masks["large"])).all()
    assert len(np.unique(kept.inst[masks["large"]])) == 1
    both = postprocess(seg, bdr, dataclasses.replace(params, orphan_size=16))
    assert both.num_instances == 3 and ((both.inst > 0) == fg).all()


def test_search_finds_settings_that_recover_the_nuclei():
    cfg = default.get_config()  # starts from the paper's post-processing
    data = _uncertain_predictions()
    best, tuned, untuned = search(cfg, data, "mPQ")
    assert untuned["bPQ"] < 0.05
    assert tuned["bPQ"] > 0.75 and tuned["mPQ"] > 0.6
    # The returned scores are those of the returned settings.
    assert score(cfg, data, best) == tuned


def test_search_in_worker_processes_chooses_as_one_process_does():
    cfg = default.get_config()
    data = _uncertain_predictions(4)
    one = search(cfg, data, "mPQ")
    two = search(cfg, data, "mPQ", workers=2)
    assert one == two


def test_search_never_sets_both_ways_of_splitting():
    # Started from distance splitting: the basin candidates are skipped until it is off.
    cfg = default.get_config()
    cfg.postprocess.method, cfg.postprocess.split_depth = "markers", 2.0
    seg, bdr = _ringed_nuclei(0.35)
    inst = np.zeros(bdr.shape, np.int32)
    inst[:, :32], inst[:, 32:] = 1, 2
    inst[seg[..., 0] > 0.5] = 0
    truth = to_pannuke_masks(inst, np.where(inst > 0, 1, 0), 2)
    data = {"seg": seg[None], "boundary": bdr[None], "truth": truth[None],
            "tissue": np.zeros(1, np.int64)}
    cfg.data.label_names = cfg.data.label_names[:3]
    best, tuned, _ = search(cfg, data, "bPQ", methods=("markers",))
    assert best.splits_once() and tuned["bPQ"] > 0.9


def test_fixed_settings_keep_the_config_value_and_unknown_names_are_refused():
    cfg = default.get_config()
    data = _uncertain_predictions(3)
    cfg.postprocess.min_size = 48  # far from what recovers the small synthetic nuclei
    free, _, _ = search(cfg, data, "mPQ", methods=("markers",))
    cfg.eval.tune_fixed = ("min_size", "basin_depth")
    fixed, _, _ = search(cfg, data, "mPQ", methods=("markers",))
    assert free.min_size != 48 and fixed.min_size == 48 and fixed.basin_depth == 0.0
    cfg.eval.tune_fixed = ("min_size", "threshold")
    with pytest.raises(UserError, match="eval.tune_fixed.*threshold"):
        search(cfg, data, "mPQ")


def _workdir(tmp_path, postprocess_json=None):
    (tmp_path / "config.json").write_text(json.dumps(default.get_config().to_dict()))
    if postprocess_json is not None:
        (tmp_path / TUNED_FILE).write_text(postprocess_json)
    return tmp_path


def test_run_config_uses_the_tuned_settings_unless_asked_not_to(tmp_path):
    params = {**default.get_config().postprocess.to_dict(), "method": "markers",
              "seg_threshold": 0.3}
    wd = _workdir(tmp_path, json.dumps({"postprocess": params, "metric": "mPQ"}))
    assert load_run_config(wd).postprocess.method == "markers"
    assert load_run_config(wd).postprocess.seg_threshold == 0.3
    assert load_run_config(wd, tuned=False).postprocess.method == "paper"
    assert load_run_config(wd).eval.tta == "none"  # a file from before tta was recorded


def test_run_config_takes_the_test_time_augmentation_the_settings_were_tuned_with(tmp_path):
    params = default.get_config().postprocess.to_dict()
    wd = _workdir(tmp_path, json.dumps({"postprocess": params, "tta": "flips"}))
    assert load_run_config(wd).eval.tta == "flips"
    assert load_run_config(wd, tuned=False).eval.tta == "none"


@pytest.mark.parametrize("text", ["{", json.dumps({"other": 1}),
                                  json.dumps({"postprocess": {"method": "magic"}}),
                                  json.dumps({"postprocess": default.get_config().postprocess
                                              .to_dict(), "tta": "rot90"})])
def test_a_broken_tuned_file_is_a_one_line_error(tmp_path, text):
    wd = _workdir(tmp_path, text)
    with pytest.raises(UserError, match=TUNED_FILE):
        load_run_config(wd)


def test_tuned_methods_come_from_the_config_and_old_runs_search_both(tmp_path):
    from tsfd_jax.evaluate_run import tune_workdir
    from tsfd_jax.postprocess_params import METHODS
    from tsfd_jax.tune import tuned_methods

    cfg = default.get_config().to_dict()
    del cfg["eval"]["tune_methods"]               # a run trained before the setting existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert tuned_methods(load_run_config(tmp_path)) == METHODS
    with pytest.raises(UserError, match="tune_methods"):  # before any checkpoint is read
        tune_workdir(tmp_path, overrides=["--config.eval.tune_methods=('magic',)"])


def test_search_of_one_method_only_returns_that_method():
    cfg = default.get_config()
    best, _, _ = search(cfg, _uncertain_predictions(3), "mPQ", methods=("paper",))
    assert best.method == "paper"


def test_tuned_metric_is_the_override_else_best_metric_and_a_wrong_name_fails_early(tmp_path):
    from tsfd_jax.evaluate_run import tune_workdir
    from tsfd_jax.tune import tuned_metric

    cfg = default.get_config().to_dict()
    cfg["best_metric"] = "val_bPQ"
    del cfg["eval"]["tune_metric"]                # a run trained before the setting existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    run_cfg = load_run_config(tmp_path)
    assert tuned_metric(run_cfg) == "bPQ"
    run_cfg.eval.tune_metric = "mPQ"
    assert tuned_metric(run_cfg) == "mPQ"
    run_cfg.best_metric = "val_loss"              # not a PQ: the tuner falls back to mPQ
    run_cfg.eval.tune_metric = ""
    assert tuned_metric(run_cfg) == "mPQ"
    with pytest.raises(UserError, match="eval.tune_metric.*'AJI'"):  # before any checkpoint
        tune_workdir(tmp_path, overrides=["--config.eval.tune_metric=AJI"])
