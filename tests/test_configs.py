"""Every named experiment config: builds, differs from configs/default.py exactly where its
ablation says, parses variants like the command line, and trains one step when shrunk.

The train step is checked once per distinct model structure (variants that only change the loss,
augmentation or inference switches share one), on a ``configs/tiny.shrink`` copy with
augmentation off (it has its own tests). The default run traces (``jax.eval_shape``, no XLA
compile) preprocessing, model and loss of every structure and one whole train step; the slow run
compiles and runs a train step of every structure on a random batch (compiling even the tiny
model's gradient takes minutes on a busy 2-core CPU).
Loss variants are checked directly on ``tsfd_loss``, against the weighted sum of their terms.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import consep, default, tiny
from tests.train_utils import disc_batch
from tsfd_jax import paper
from tsfd_jax.config_files import load_config
from tsfd_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ("ablation_blocks", "ablation_inputs", "ablation_losses", "ablation_resolution")
MODULES = {name: importlib.import_module(f"configs.{name}") for name in ABLATIONS}
VARIANTS = [(name, v) for name, m in MODULES.items() for v in m.VARIANTS]
SPLIT_FIELDS = ("data.split_scheme", "data.train_split", "data.val_split", "data.test_split")


def flat(cfg: ml_collections.ConfigDict) -> dict:
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, ml_collections.ConfigDict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    walk(cfg, "")
    return out


def diff(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> dict:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys(), set(fa) ^ set(fb)
    return {k: fb[k] for k in fa if fa[k] != fb[k]}


# ---- building and variants -------------------------------------------------------------------

@pytest.mark.parametrize("module,variant", VARIANTS)
def test_variant_changes_exactly_its_fields(module, variant):
    m = MODULES[module]
    spec = m.VARIANTS[variant]
    cfg = m.get_config(variant)
    assert diff(default.get_config(), cfg) == spec["changes"]
    for alias in spec["aliases"]:
        assert m.get_config(alias).to_dict() == cfg.to_dict()
    # The rest of the argument goes to configs/default.py's variants.
    for rest in ("fold2", "fold3", "tsfd_split"):
        want = {**diff(default.get_config(), default.get_config(rest)), **spec["changes"]}
        assert diff(default.get_config(), m.get_config(f"{variant},{rest}")) == want
        assert m.get_config(f"{rest},{variant}").to_dict() == m.get_config(
            f"{variant},{rest}").to_dict()


def test_fold_suffix_gives_the_official_rotation():
    cfg = MODULES["ablation_blocks"].get_config("exp3,fold3")
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) == (
        "fold3", "fold2", "fold1")
    assert MODULES["ablation_blocks"].get_config("cbb_id,tsfd_split").data.split_scheme == "tsfd"


@pytest.mark.parametrize("module", ABLATIONS)
def test_no_variant_is_the_paper_model_and_paper_numbers_agree(module):
    m = MODULES[module]
    assert m.get_config().to_dict() == default.get_config().to_dict()
    assert m.VARIANTS[m.PAPER_MODEL]["changes"] == {}
    assert m.VARIANTS[m.PAPER_MODEL]["mpq"] == paper.MPQ
    assert m.VARIANTS[m.PAPER_MODEL]["bpq"] == paper.BPQ
    names = [a for v in m.VARIANTS.values() for a in v["aliases"]] + list(m.VARIANTS)
    assert len(names) == len(set(names)), "an alias names two rows"


@pytest.mark.parametrize("module", ABLATIONS)
def test_docstring_lists_every_variant_with_the_paper_number(module):
    m = MODULES[module]
    lines = m.__doc__.splitlines()
    for name, v in m.VARIANTS.items():
        row = [ln for ln in lines if ln.startswith(f"| {name} ")]
        assert len(row) == 1, name
        cells = [c.strip() for c in row[0].strip("|").split("|")]
        numbers = [None if c == "-" else float(c) for c in cells[-2:]]
        assert numbers == [v["mpq"], v["bpq"]], (name, cells)
        for alias in v["aliases"][:1]:
            assert alias in row[0]
    assert f"configs/{module}.py" in m.__doc__ and "python -m tsfd_jax train" in m.__doc__


def test_paper_numbers_of_the_ablation_tables():
    # docs/evaluation.md / §3.3 / §2.1, typed once more here.
    got = {(name, v): MODULES[name].VARIANTS[v]["mpq"] for name, v in VARIANTS}
    assert got[("ablation_blocks", "exp1")] == 0.4721
    assert got[("ablation_blocks", "exp4")] == 0.4845
    assert got[("ablation_blocks", "exp6")] == 0.4636
    assert MODULES["ablation_blocks"].VARIANTS["exp5"]["bpq"] == 0.623
    assert got[("ablation_inputs", "rgb")] == 0.4406
    assert got[("ablation_inputs", "rgb_her_drop_r")] == 0.4661
    assert got[("ablation_losses", "focal_ftbd_ftcombo_w09")] == 0.488
    assert got[("ablation_resolution", "res256")] == 0.4912
    assert got[("ablation_resolution", "res768")] == 0.4386


def test_block_switches():
    b = MODULES["ablation_blocks"]
    cbb, fdb = b.get_config("cbb_id"), b.get_config("fdb_id")
    assert not cbb.model.tissue_head and cbb.model.num_bifpn == 0
    assert fdb.model.tissue_head and fdb.model.num_bifpn == 0
    assert not b.get_config("fdb_cff_id").model.feature_reweighing
    assert not b.get_config("no_da").augment.enabled
    assert b.get_config("cbb_net").model.num_bifpn == 3


def test_resolution_keeps_the_epochs_at_batch_9():
    r = MODULES["ablation_resolution"]
    base = default.get_config()
    c = r.get_config("res768")
    assert (c.input.size, c.data.global_batch_size, c.data.image_size) == (768, 9, 256)
    epochs = base.total_steps * base.data.global_batch_size
    assert abs(c.total_steps * 9 - epochs) <= 9
    assert abs(c.optim.warmup_steps * 9 - base.optim.warmup_steps * 16) <= 9
    assert r.get_config("256").input.size == 256


@pytest.mark.parametrize("module", ABLATIONS)
def test_bad_variants_fail_with_a_message(module):
    m = MODULES[module]
    with pytest.raises(ValueError, match="unknown variant"):
        m.get_config("nope")
    first, second = list(m.VARIANTS)[:2]
    with pytest.raises(ValueError, match="one row"):
        m.get_config(f"{first},{second}")
    with pytest.raises(UserError, match="unknown variant"):
        load_config(str(ROOT / "configs" / f"{module}.py") + ":nope")


def test_command_line_spec_and_overrides():
    cfg = load_config(str(ROOT / "configs" / "ablation_blocks.py") + ":cbb_id,fold2",
                      ["--config.seed=3", "--config.data.root", "/data/pannuke"])
    assert (cfg.seed, cfg.data.root, cfg.model.tissue_head, cfg.data.train_split) == (
        3, "/data/pannuke", False, "fold2")


@pytest.mark.parametrize("module", ABLATIONS)
def test_sweep_yields_every_variant(module):
    items = list(MODULES[module].sweep())
    assert [i["config"] for i in items] == [f"configs/{module}.py:{v}"
                                            for v in MODULES[module].VARIANTS]
    folds = [i["config"] for i in MODULES[module].sweep_folds()]
    tsfd = [i["config"] for i in MODULES[module].sweep_tsfd()]
    assert len(folds) == 3 * len(items) and len(tsfd) == len(items)
    for spec in [i["config"] for i in items] + folds + tsfd:
        path, _, variant = spec.partition(":")
        load_config(f"{ROOT / path}:{variant}")
    trains = {load_config(f"{ROOT / s.partition(':')[0]}:{s.partition(':')[2]}").data.train_split
              for s in folds}
    assert trains == {"fold1", "fold2", "fold3"}
    assert all(load_config(f"{ROOT / s.partition(':')[0]}:{s.partition(':')[2]}")
               .data.split_scheme == "tsfd" for s in tsfd)


# ---- CoNSeP ----------------------------------------------------------------------------------

def test_demo_real_variant_switches_augmentation_and_tissue_head_back_on():
    from configs import demo
    synthetic, real = demo.get_config(), demo.get_config("real")
    assert diff(synthetic, real) == {"augment.enabled": True, "model.tissue_head": True}
    assert consep.get_config().augment.enabled  # real tiles keep the paper's augmentation
    with pytest.raises(ValueError, match="unknown variant"):
        demo.get_config("fold2")


def test_consep_config():
    c = consep.get_config()
    assert c.data.source == "folders" and c.data.val_fraction == 0.2
    assert c.data.label_names == ("Background", "other", "inflammatory", "epithelial",
                                  "spindle-shaped")
    assert c.data.tissue_names == () and not c.model.tissue_head
    assert (c.data.train_split, c.data.val_split, c.data.test_split) == ("train", "val", "val")
    # 128-px crops at their own size, logits at the input resolution (docs/learning.md §26)
    assert c.data.image_size == 128 and c.input.size == 128 and c.model.input_skip == 16
    assert c.model.backbone == "plain" and c.model.num_bifpn == 0
    # the decoders from the stem (stride 2) and cross-entropy classes (docs/learning.md §27)
    assert tuple(c.model.taps)[0] == "stem" and c.model.stem_skip == 0 and c.loss.seg == "ce"
    assert c.model.drop_connect_rate == c.model.gating_dropout == c.model.node_dropout == 0.0
    assert c.data.sampling == "class"  # docs/learning.md §29
    p = consep.get_config("paper")
    assert p.data.sampling == ""  # the paper samples uniformly
    assert p.data.image_size == 256 and p.input.size == 512 and p.model.gating_channels == 160 and not p.model.tissue_head
    assert p.total_steps == 150 * consep.TRAIN_TILES // 16
    with pytest.raises(ValueError, match="unknown variant"):
        consep.get_config("fold2")


def test_consep_config_fits_the_real_tiles(shared_data, tmp_path):
    """Classes as in the folder's classes.txt; the config's data prepare into train + val (whole
    source images) and pass the dataset/config compatibility check."""
    from tsfd_jax.data.resolve import load_eval_split, load_split, load_train, open_data

    src = shared_data / "consep" / "train"
    names = [s.strip() for s in (src / "classes.txt").read_text().splitlines() if s.strip()]
    assert consep.get_config().data.label_names == ("Background", *names)
    stems = sorted({p.stem for p in src.glob("train_1_*.npz")} |
                   {p.stem for p in src.glob("train_2_*.npz")})
    assert len(stems) == 32  # two source images of 16 tiles
    sub = tmp_path / "consep"
    sub.mkdir()
    shutil.copy(src / "classes.txt", sub)
    for s in stems:
        shutil.copy(src / f"{s}.npz", sub)
        shutil.copy(src / f"{s}.jpg", sub)
    cfg = consep.get_config()
    cfg.data.root = str(sub)
    prepared = open_data(cfg, tmp_path / "run")
    assert set(prepared.splits) == {"train", "val"}
    assert tuple(prepared.label_names) == cfg.data.label_names
    train, val = load_split(cfg, tmp_path / "run", "train"), load_split(cfg, tmp_path / "run", "val")
    assert len(train) == 16 and len(val) == 16
    assert len(load_split(cfg, tmp_path / "run", "test")) == 16
    # 128-px crops for training; validation on the whole 256-px tiles at their own size
    assert load_train(cfg, tmp_path / "run")[1] == 128
    ecfg, vsrc = load_eval_split(cfg, tmp_path / "run", "val")
    assert (ecfg.data.image_size, ecfg.input.size, len(vsrc)) == (256, 256, 16)


# ---- one train step per model structure ------------------------------------------------------

def _all_configs() -> dict[str, ml_collections.ConfigDict]:
    out = {f"{m}:{v}": MODULES[m].get_config(v) for m, v in VARIANTS}
    out["consep"] = consep.get_config()
    out["consep:paper"] = consep.get_config("paper")
    return out


def shrunk(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """tiny.shrink, keeping the config's input / label size ratio (Table 7), no augmentation."""
    ratio = int(cfg.input.size) / int(cfg.data.image_size)
    c = tiny.shrink(ml_collections.ConfigDict(cfg.to_dict()), batch=2)
    c.input.size = int(round(c.data.image_size * ratio))
    c.augment.enabled = False
    return c


def structure(c: ml_collections.ConfigDict) -> tuple:
    m = c.model
    return (bool(m.tissue_head), int(m.num_bifpn), bool(m.feature_reweighing),
            bool(m.seg_third_term), str(c.input.channels), int(c.input.size),
            int(c.data.image_size), len(c.data.label_names), len(c.data.tissue_names),
            float(m.width_mult), float(m.depth_mult), int(m.gating_channels))


def _structures() -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, cfg in _all_configs().items():
        groups.setdefault(structure(shrunk(cfg)), []).append(name)
    return groups


STRUCTURES = _structures()


def test_structures_are_grouped_as_expected():
    sizes = sorted(len(v) for v in STRUCTURES.values())
    # exp1, exp2, exp4, exp5, rgb, rgb_he, res256, res768 alone; consep (no BiFPN, the tiles'
    # own size) and consep:paper (the x2 input) alone, both with 4 classes and no tissue head;
    # the paper model shared by exp3, exp6, rgb_her, drop_r, the six loss rows and res512.
    assert len(STRUCTURES) == 11 and sizes == [1] * 10 + [11]
    alone = {v[0] for v in STRUCTURES.values() if len(v) == 1}
    assert {"consep", "consep:paper"} <= alone


def _random_state(cfg, model, tx, seed: int = 0):
    """A train state from numpy random variables: running the initialisers would compile them."""
    from tsfd_jax.models.summary import abstract_variables
    from tsfd_jax.models.tsfd import input_shape
    from tsfd_jax.steps import TrainState

    abstract = abstract_variables(model, input_shape(cfg))
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = jax.tree_util.keystr(path[-1:])
        if "var" in name or "scale" in name:
            return jnp.ones(a.shape, a.dtype)
        if "mean" in name or "bias" in name:
            return jnp.zeros(a.shape, a.dtype)
        fan_in = max(int(np.prod(a.shape[:-1])), 1)
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), a.shape), a.dtype)

    v = jax.tree_util.tree_map_with_path(fill, abstract)
    return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                      batch_stats=v.get("batch_stats", {}), opt_state=tx.init(v["params"]),
                      rng=jax.random.key(seed))


def _step_parts(names):
    from tsfd_jax.models.tsfd import build_model
    from tsfd_jax.ops.preprocess import make_preprocess_fn
    from tsfd_jax.steps import create_state, make_optimizer, make_train_step

    cfg = shrunk(_all_configs()[names[0]])
    cfg.optim.warmup_steps = 0  # the learning rate of step 0 is the peak, not 0
    model = build_model(cfg)
    tx = make_optimizer(cfg)
    labels = len(cfg.data.label_names)
    batch = disc_batch(2, int(cfg.data.image_size), seed=0,
                       num_tissues=max(len(cfg.data.tissue_names), 1))
    batch.pop("index")
    batch["cls"] = np.minimum(batch["cls"], labels - 1).astype(np.uint8)
    step = make_train_step(cfg, model, tx, make_preprocess_fn(cfg))
    abstract = jax.eval_shape(lambda r: create_state(cfg, model, tx, r), jax.random.key(0))
    return cfg, model, tx, batch, step, abstract


@pytest.mark.parametrize("names", list(STRUCTURES.values()), ids=lambda n: n[0])
def test_model_and_loss_trace_per_structure(names):
    """The model's parts, and preprocessing -> model (training mode) -> logits resized to the
    labels -> loss traced with the shapes of a batch (``jax.eval_shape``: no XLA compile)."""
    import flax

    from tsfd_jax.losses import tsfd_loss
    from tsfd_jax.ops.preprocess import make_preprocess_fn
    from tsfd_jax.forward import resize_to_labels

    cfg, model, tx, batch, step, abstract = _step_parts(names)
    params = flax.traverse_util.flatten_dict(abstract.params)
    keys = {"/".join(k) for k in params}
    assert any(k.startswith("classifier/") for k in keys) == bool(cfg.model.tissue_head)
    assert any(k.startswith("bifpn_") for k in keys) == (cfg.model.num_bifpn > 0)
    assert any("/fr_" in k for k in keys) == bool(cfg.model.feature_reweighing)
    channels = {"rgb": 3, "rgb_he": 5, "rgb_her": 6}[cfg.input.channels]
    assert params[("backbone", "stem_conv", "kernel")].shape[2] == channels
    preprocess = make_preprocess_fn(cfg)

    def forward_loss(state, batch):
        inputs, targets = preprocess(batch, jax.random.key(0), True)
        out, _ = model.apply(state.variables(), inputs, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(1)})
        total, terms = tsfd_loss(resize_to_labels(out, targets["cls"].shape[1:3]), targets,
                                 cfg.loss)
        return inputs, out, total, terms

    inputs, out, total, terms = jax.eval_shape(forward_loss, abstract, batch)
    s, labels = int(cfg.input.size), len(cfg.data.label_names)
    assert inputs.shape == (2, s, s, channels)
    o = s if cfg.model.input_skip else s // 2  # the input skip: logits at the input size
    assert out["seg_logits"].shape == (2, o, o, labels)
    assert out["boundary_logits"].shape == (2, o, o, 1)
    assert ("tissue_logits" in out) == ("loss_tissue" in terms) == bool(cfg.model.tissue_head)
    assert total.shape == ()


def test_whole_train_step_traces():
    """make_train_step traced whole (forward, backward, optimiser) for CoNSeP's structure (no
    tissue head, 5 labels, logits resized up to the labels); the paper structure's step runs
    compiled in tests/test_train.py."""
    names = next(v for v in STRUCTURES.values() if v[0] == "consep")
    cfg, model, tx, batch, step, abstract = _step_parts(names)
    new, metrics = jax.eval_shape(step, abstract, batch)
    assert jax.tree.structure(new.params) == jax.tree.structure(abstract.params)
    assert {"loss", "loss_seg", "loss_boundary", "grad_norm", "nonfinite"} <= set(metrics)
    assert "loss_tissue" not in metrics


@pytest.mark.slow
@pytest.mark.parametrize("names", list(STRUCTURES.values()), ids=lambda n: n[0])
def test_one_train_step_per_structure(names):
    """One compiled train step on a random batch (compiling the tiny model's gradient takes
    minutes on a busy 2-core CPU, hence slow)."""
    cfg, model, tx, batch, step, _ = _step_parts(names)
    state = _random_state(cfg, model, tx)
    new, metrics = jax.device_get(jax.jit(step)(state, batch))
    assert int(new.step) == 1 and int(metrics["nonfinite"]) == 0
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         new.params, jax.device_get(state.params))
    assert max(jax.tree.leaves(moved)) > 0


# ---- loss rows (Table 6) ---------------------------------------------------------------------

EXPECTED_TERMS = {
    "ce_ft_ft": {"tissue_ce", "seg_ft", "bdr_ft"},
    "focal_ft_ft": {"tissue_focal", "seg_ft", "bdr_ft"},
    "focal_ftbd_ft": {"tissue_focal", "seg_ft", "seg_bce", "seg_dice", "bdr_ft"},
    "focal_ft_ftcombo": {"tissue_focal", "seg_ft", "bdr_ft", "bdr_combo"},
    "focal_ftbd_ftcombo": {"tissue_focal", "seg_ft", "seg_bce", "seg_dice", "bdr_ft", "bdr_combo"},
    "focal_ftbd_ftcombo_w09": {"tissue_focal", "seg_ft", "seg_bce", "seg_dice", "bdr_ft",
                               "bdr_combo"},
}


@pytest.mark.parametrize("variant", list(MODULES["ablation_losses"].VARIANTS))
def test_loss_rows_use_their_terms_and_weights(variant):
    from tsfd_jax.losses import tsfd_loss

    cfg = MODULES["ablation_losses"].get_config(variant)
    rng = np.random.default_rng(0)
    outputs = {"seg_logits": jnp.asarray(rng.normal(size=(2, 16, 16, 6)), jnp.float32),
               "boundary_logits": jnp.asarray(rng.normal(size=(2, 16, 16, 1)), jnp.float32),
               "tissue_logits": jnp.asarray(rng.normal(size=(2, 19)), jnp.float32)}
    targets = {"cls": jnp.asarray(rng.integers(0, 6, (2, 16, 16)), jnp.int32),
               "boundary": jnp.asarray(rng.random((2, 16, 16)) > 0.7, jnp.float32),
               "tissue": jnp.asarray([3, 7], jnp.int32), "weight": jnp.ones((2, 16, 16))}
    total, terms = tsfd_loss(outputs, targets, cfg.loss)
    terms = {k: float(v) for k, v in terms.items()}
    components = {k for k in terms if not k.startswith("loss_")}
    assert components == EXPECTED_TERMS[variant]
    w_seg, w_bdr = cfg.loss.seg_aux_weight, cfg.loss.boundary_aux_weight
    assert w_seg == w_bdr == (0.9 if variant.endswith("w09") else 0.4)
    seg = terms["seg_ft"] + w_seg * (terms.get("seg_bce", 0) + terms.get("seg_dice", 0))
    bdr = terms["bdr_ft"] + w_bdr * terms.get("bdr_combo", 0)
    tissue = terms.get("tissue_ce", terms.get("tissue_focal"))
    np.testing.assert_allclose(float(total), seg + bdr + tissue, rtol=1e-5)


@pytest.mark.parametrize("override,message", [
    ("model.backbone=efficientnet", "model.backbone must be 'plain' or one of"),
    ("optim.name=adam", "optim.name must be one of"),
    ("postprocess.method=marker", "postprocess.method must be one of"),
    ("model.depthwise_impl=fast", "model.depthwise_impl must be one of"),
    ("model.dtype=float8", "model.dtype must be one of")])
def test_train_refuses_a_bad_config_value_in_one_line_before_writing(tmp_path, capsys,
                                                                     override, message):
    from tsfd_jax.cli import main

    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/demo.py", "--workdir", str(workdir),
              f"--config.data.root={tmp_path}", f"--config.{override}",
              "--compilation-cache", "none"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith(f"error: {message}")
    assert len(err.splitlines()) == 1 and not workdir.exists()
