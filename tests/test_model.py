"""TSFD-Net above the backbone: BiFPN / decoder wiring, output block, sizes, switches, summary.

References: float64 numpy written from the formulas of docs/model.md-§1.8 (BiFPN, decoders,
output block, TF bilinear with half-pixel centres as an interpolation matrix, TF's transposed
convolution), and the parameter counts of the authors' Keras model summary (§1.11).
Full-size models are only traced (``jax.eval_shape``); real forward passes use tiny widths.
Variables are filled with numpy random numbers instead of running the initialisers, whose
compilation alone takes tens of seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import authors_code, default, tiny
from tsfd_jax.errors import UserError
from tsfd_jax.models.bifpn import BiFPN, FusionNode
from tsfd_jax.models.decoders import InterlinkedDecoders, UpsamplingBlock
from tsfd_jax.models.summary import abstract_variables, count_params, xla_flops
from tsfd_jax.models.tsfd import build_model, input_shape

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.py")

# ---- helpers ---------------------------------------------------------------------------------


def random_variables(abstract, seed: int = 0, stats: bool = False) -> dict:
    """Variables of the given shapes: kernels N(0, 1/fan_in), small biases, BN scale ~1.

    ``stats``: random BN moving statistics too (else mean 0, var 1).
    """
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = jax.tree_util.keystr(path[-1:])
        shape = a.shape
        if "kernel" in name:
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
            if len(shape) == 4 and shape[2] == 1:  # depthwise (k, k, 1, C)
                fan_in = shape[0] * shape[1]
            v = rng.normal(0, 1 / np.sqrt(fan_in), shape)
        elif "scale" in name:
            v = rng.uniform(0.7, 1.3, shape)
        elif "mean" in name:
            v = rng.normal(0, 0.3, shape) if stats else np.zeros(shape)
        elif "var" in name:
            v = rng.uniform(0.5, 1.5, shape) if stats else np.ones(shape)
        else:
            v = rng.normal(0, 0.1, shape)
        return jnp.asarray(v, a.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def swish(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_bilinear(x, out_h: int, out_w: int):
    """TF2 bilinear resize of (H, W, C), half-pixel centres, no antialias, float64."""
    def matrix(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        m = np.zeros((n_out, n_in))
        np.add.at(m, (np.arange(n_out), lo), 1 - (src - lo))
        np.add.at(m, (np.arange(n_out), hi), src - lo)
        return m
    return np.einsum("ah,bw,hwc->abc", matrix(x.shape[0], out_h), matrix(x.shape[1], out_w), x)


def up(x):
    return np_bilinear(x, 2 * x.shape[0], 2 * x.shape[1])


def down(x):
    return np_bilinear(x, x.shape[0] // 2, x.shape[1] // 2)


def np_conv_same(x, kernel, bias):
    """Stride-1 'SAME' conv of (H, W, Cin) by (k, k, Cin, Cout)."""
    k = kernel.shape[0]
    h, w, _ = x.shape
    xp = np.pad(x, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = sum(xp[i:i + h, j:j + w] @ kernel[i, j] for i in range(k) for j in range(k))
    return out + bias


def np_depthwise(x, kernel, bias):
    k = kernel.shape[0]
    h, w, _ = x.shape
    xp = np.pad(x, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    return sum(xp[i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k)) + bias


def np_conv_transpose_tf(x, kernel, bias):
    """TF Conv2DTranspose(3x3, stride 2, SAME) of (n, m, Cin) with flax's (3, 3, Cin, Cout) kernel.

    TF: out[2i + a] += x[i] * K[a] (a = 0..2, cropped to 2n), K = the Keras kernel, which is the
    flax kernel flipped in space with in/out swapped.
    """
    n, m, _ = x.shape
    out = np.zeros((2 * n + 2, 2 * m + 2, kernel.shape[-1]))
    for a in range(3):
        for b in range(3):
            out[a:a + 2 * n:2, b:b + 2 * m:2] += x @ kernel[2 - a, 2 - b]
    return out[:2 * n, :2 * m] + bias


def np_bn(x, p, s):
    return (x - s["mean"]) / np.sqrt(s["var"] + 1e-3) * p["scale"] + p["bias"]


def np_fr(x, p, s):
    """FR block (docs/model.md) on one image (H, W, C)."""
    y = swish(np_bn(np_depthwise(x, p["dwconv"]["kernel"], p["dwconv"]["bias"]), p["bn"], s["bn"]))
    v = y.mean(axis=(0, 1))
    v = swish(v @ p["reduce"]["kernel"] + p["reduce"]["bias"])
    v = sigmoid(v @ p["expand"]["kernel"] + p["expand"]["bias"])
    return y * v


def np_node(xs, p, s):
    """Fusion node (docs/model.md) in eval mode: FR per input, sum, dw 3x3, BN, swish."""
    total = sum(np_fr(x, p[f"fr_{k}"], s[f"fr_{k}"]) for k, x in enumerate(xs))
    y = np_depthwise(total, p["dwconv"]["kernel"], p["dwconv"]["bias"])
    return swish(np_bn(y, p["bn"], s["bn"]))


def to_np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def pyramid(batch: int, c: int, seed: int):
    """P2..P7 as a stride-4 backbone at 64 px gives them: 16, 8, 4, 4, 2, 2."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (batch, s, s, c)).astype(np.float32) for s in (16, 8, 4, 4, 2, 2)]


def tiny_cfg(**model):
    cfg = tiny.shrink(default.get_config())
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


_COUNTS: dict[str, dict[str, int]] = {}


def counts_of(cfg) -> dict[str, int]:
    key = cfg.to_json()
    if key not in _COUNTS:
        _COUNTS[key] = count_params(abstract_variables(build_model(cfg), input_shape(cfg)))
    return _COUNTS[key]


# ---- wiring against the formulas ----------------------------------------------------------


def test_bifpn_matches_the_formulas_of_section_1_6():
    feats = pyramid(2, 4, seed=0)
    module = BiFPN(node_dropout=0.2)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), feats, train=False))
    v = random_variables(abstract, seed=1, stats=True)
    got = module.apply(v, feats, train=False)
    prm, st = to_np(v["params"]), to_np(v["batch_stats"])
    assert sorted(prm) == sorted(["td_p6", "td_p5", "td_p4", "td_p3", "td_p2",
                                  "out_p3", "out_p4", "out_p5", "out_p6", "out_p7"])
    for b in range(2):
        P2, P3, P4, P5, P6, P7 = (np.float64(f[b]) for f in feats)

        def N(name, *xs):
            return np_node(list(xs), prm[name], st[name])
        p6td = N("td_p6", P6, P7)
        p5td = N("td_p5", P5, up(p6td))
        p4td = N("td_p4", P4, p5td)
        p3td = N("td_p3", P3, up(p4td))
        p2out = N("td_p2", P2, up(p3td))
        p3out = N("out_p3", P3, p3td, down(p2out))
        p4out = N("out_p4", P4, p4td, down(p3out))
        p5out = N("out_p5", P5, p5td, p4out)
        p6out = N("out_p6", P6, p6td, down(p5out))
        p7out = N("out_p7", P7, p6out)
        for g, want in zip(got, (p2out, p3out, p4out, p5out, p6out, p7out)):
            np.testing.assert_allclose(np.asarray(g[b]), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("third_term", [False, True])
def test_decoders_match_the_formulas_of_section_1_7(third_term):
    feats = pyramid(2, 4, seed=2)
    module = InterlinkedDecoders(seg_third_term=third_term)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), feats, train=False))
    v = random_variables(abstract, seed=3, stats=True)
    seg, bdr = module.apply(v, feats, train=False)
    prm, st = to_np(v["params"]), to_np(v["batch_stats"])
    fr = {name: len([k for k in node if k.startswith("fr_")]) for name, node in prm.items()}
    extra = 1 if third_term else 0
    assert fr == {"seg_p6": 2, "seg_p5": 2 + extra, "seg_p4": 2 + extra, "seg_p3": 2 + extra,
                  "seg_p2": 2 + extra, "bdr_p6": 2, "bdr_p5": 3, "bdr_p4": 3, "bdr_p3": 3,
                  "bdr_p2": 3}
    for b in range(2):
        P2, P3, P4, P5, P6, P7 = (np.float64(f[b]) for f in feats)

        def N(name, *xs):
            return np_node(list(xs), prm[name], st[name])

        def T(x):  # Eq. 3 third term (the upper-level BiFPN map), or nothing
            return (x,) if third_term else ()
        S6 = N("seg_p6", P6, P7)
        S5 = N("seg_p5", P5, up(S6), *T(up(P6)))
        S4 = N("seg_p4", P4, S5, *T(P5))
        S3 = N("seg_p3", P3, up(S4), *T(up(P4)))
        S2 = N("seg_p2", P2, up(S3), *T(up(P3)))
        I6 = N("bdr_p6", P7, S6)
        I5 = N("bdr_p5", up(P6), up(I6), S5)
        I4 = N("bdr_p4", P5, I5, S4)
        I3 = N("bdr_p3", up(P4), up(I4), S3)
        I2 = N("bdr_p2", up(P3), up(I3), S2)
        np.testing.assert_allclose(np.asarray(seg[b]), S2, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(np.asarray(bdr[b]), I2, rtol=2e-4, atol=2e-5)


def test_fusion_node_without_fr_is_sum_dwconv_bn_swish():
    rng = np.random.default_rng(4)
    xs = [rng.normal(0, 1, (1, 8, 8, 4)).astype(np.float32) for _ in range(3)]
    module = FusionNode(reweigh=False)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), xs, train=False))
    assert sorted(abstract["params"]) == ["bn", "dwconv"]  # CFF: no FR parameters
    v = random_variables(abstract, seed=5, stats=True)
    got = module.apply(v, xs, train=False)
    p, s = to_np(v["params"]), to_np(v["batch_stats"])
    want = swish(np_bn(np_depthwise(sum(np.float64(x[0]) for x in xs), p["dwconv"]["kernel"],
                                    p["dwconv"]["bias"]), p["bn"], s["bn"]))
    np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("features", [6, 1])
def test_upsampling_block_matches_tf_semantics(features):
    x = np.random.default_rng(6).normal(0, 1, (2, 5, 4, 3)).astype(np.float32)
    module = UpsamplingBlock(features)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    v = random_variables(abstract, seed=7)
    got = np.asarray(module.apply(v, x))
    assert got.shape == (2, 10, 8, features)
    p = to_np(v["params"])
    for b in range(2):
        xb = np.float64(x[b])
        a = np_conv_same(up(xb), p["conv"]["kernel"], p["conv"]["bias"])
        t = np_conv_transpose_tf(xb, p["conv_transpose"]["kernel"], p["conv_transpose"]["bias"])
        want = np_depthwise(swish(a + t), p["dwconv"]["kernel"], p["dwconv"]["bias"])
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-5)


# ---- sizes (docs/model.md §4) ----------------------------------------------------------------

# Per-block counts derived from the layer formulas: depthwise 3x3 with bias, BN (4 per channel).
def fr_params(c: int, ratio: int = 8) -> int:
    h = c // ratio
    return (9 * c + c) + 4 * c + (c * h + h) + (h * c + c)


def node_params(c: int) -> int:
    return 9 * c + c + 4 * c


AUTHORS_PARTS = {
    # Keras: 17,675,125 including the 13 constants of its unused input Normalization layer.
    "backbone": 17_675_125 - 13,
    "gating": 3_495_360,
    "bifpn_1": 234_080, "bifpn_2": 234_080, "bifpn_3": 234_080,
    "decoders": 234_080,
    "heads": 20_244,
    "classifier": 3_059,
}


def test_block_formulas_agree_with_the_authors_summary():
    assert fr_params(160) == 8_820 and node_params(160) == 2_240
    assert 24 * fr_params(160) + 10 * node_params(160) == 234_080
    assert sum(9 * c * 160 + 160 + 4 * 160 for c in (32, 56, 112, 160, 272, 1792)) == 3_495_360
    assert (9 * 160 * 6 + 6) * 2 + 60 + (9 * 160 + 1) * 2 + 10 == 20_244


def test_authors_code_config_has_the_authors_parameter_count():
    counts = counts_of(authors_code.get_config())
    assert counts["total"] == 22_130_095 == 22_130_108 - 13
    assert {k: v for k, v in counts.items() if k != "total"} == AUTHORS_PARTS


def test_paper_default_adds_four_fr_blocks_of_eq3():
    # S5..S2 get FR(P_bif3_(l+1)); S6 already fuses P7, so 4 (not 5) extra FR blocks.
    paper, authors = counts_of(default.get_config()), counts_of(authors_code.get_config())
    assert paper["decoders"] - authors["decoders"] == 4 * fr_params(160) == 35_280
    assert paper["total"] - authors["total"] == 35_280
    assert paper["total"] == 22_165_375


@pytest.mark.parametrize("third_term", [False, True])
def test_cff_removes_exactly_the_fr_blocks(third_term):
    cfg = authors_code.get_config()
    cfg.model.seg_third_term = third_term
    with_fr = counts_of(cfg)
    cfg.model.feature_reweighing = False
    cff = counts_of(cfg)
    n_fr = 3 * 24 + 24 + (4 if third_term else 0)
    assert with_fr["total"] - cff["total"] == n_fr * fr_params(160)
    assert cff["bifpn_1"] == cff["decoders"] == 10 * node_params(160)


def test_other_widths_follow_the_formulas():
    cfg = authors_code.get_config()
    cfg.model.gating_channels = 64
    cfg.model.num_bifpn = 2
    counts = counts_of(cfg)
    assert counts["bifpn_1"] == counts["bifpn_2"] == counts["decoders"] == (
        24 * fr_params(64) + 10 * node_params(64))
    assert "bifpn_3" not in counts


# ---- outputs ---------------------------------------------------------------------------------


def traced(model, shape) -> tuple[dict, dict]:
    """(outputs, variables) as shapes: one trace of init, no computation."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda x: model.init_with_output(rngs, x, train=False),
                          jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize("size", [256, 512, 768])
def test_full_model_output_shapes(size):
    cfg = default.get_config()
    out, _ = traced(build_model(cfg), input_shape(cfg, 2, size))
    assert {k: (o.shape, o.dtype) for k, o in out.items()} == {
        "seg_logits": ((2, size // 2, size // 2, 6), jnp.float32),
        "boundary_logits": ((2, size // 2, size // 2, 1), jnp.float32),
        "tissue_logits": ((2, 19), jnp.float32)}


def test_cbb_has_no_tissue_head():
    cfg = default.get_config()
    cfg.model.tissue_head = False
    out, v = traced(build_model(cfg), input_shape(cfg))
    assert "classifier" not in v["params"]
    assert sorted(out) == ["boundary_logits", "seg_logits"]


@pytest.mark.parametrize("channels,n", [("rgb", 3), ("rgb_he", 5), ("rgb_her", 6)])
def test_input_channels(channels, n):
    cfg = tiny_cfg()
    cfg.input.channels = channels
    shape = input_shape(cfg, 2, 64)
    assert shape == (2, 64, 64, n)
    out, v = traced(build_model(cfg), shape)
    assert v["params"]["backbone"]["stem_conv"]["kernel"].shape[2] == n
    assert out["seg_logits"].shape == (2, 32, 32, 6)


def _tiny(cfg, size: int, batch: int = 2, seed: int = 0):
    model = build_model(cfg)
    shape = input_shape(cfg, batch, size)
    v = random_variables(abstract_variables(model, shape), seed=seed)
    x = jnp.asarray(np.random.default_rng(seed).uniform(0, 1, shape), jnp.float32)
    return model, v, x


# Compiling a whole network costs seconds on a CPU (most of it in the random-bit generation of
# the dropout layers), so the tests share the compiled evaluation of one tiny model at 64 px and
# use the cheaper 'rbg' generator for dropout rngs.
@pytest.fixture(scope="module")
def tiny64():
    model, v, x = _tiny(tiny_cfg(), 64)
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return model, v, x, evaluate, evaluate(v, x)


@pytest.mark.parametrize("size", [64, 128, 192])
def test_tiny_model_outputs_at_half_the_input_size(size, tiny64):
    if size == 64:  # computed
        out = tiny64[-1]
        assert all(bool(jnp.all(jnp.isfinite(o))) for o in out.values())
    else:  # traced
        cfg = tiny_cfg()
        out, _ = traced(build_model(cfg), input_shape(cfg, 2, size))
    assert out["seg_logits"].shape == (2, size // 2, size // 2, 6)
    assert out["boundary_logits"].shape == (2, size // 2, size // 2, 1)
    assert out["tissue_logits"].shape == (2, 19)
    assert all(o.dtype == jnp.float32 for o in out.values())


def test_dropout_and_stochastic_depth_act_only_in_training(tiny64):
    model, v, x, evaluate, e1 = tiny64
    train = jax.jit(lambda v, x, r: model.apply(v, x, train=True, rngs={"dropout": r},
                                                mutable=["batch_stats"])[0])
    a = train(v, x, jax.random.key(1, impl="rbg"))
    b = train(v, x, jax.random.key(2, impl="rbg"))
    for k in ("seg_logits", "boundary_logits", "tissue_logits"):
        assert float(jnp.max(jnp.abs(a[k] - b[k]))) > 1e-4, k
        # Training mode also differs from evaluation (batch statistics, dropout).
        assert float(jnp.max(jnp.abs(a[k] - e1[k]))) > 1e-4, k
    # Evaluation needs no rng at all and is deterministic.
    e2 = evaluate(v, x)
    for k in e1:
        np.testing.assert_array_equal(np.asarray(e1[k]), np.asarray(e2[k]))
    # Every rate of the model reaches its layer: the backbone's stochastic depth and the
    # channel dropouts are built from the config.
    m = build_model(tiny_cfg(drop_connect_rate=0.0, gating_dropout=0.0, node_dropout=0.0,
                             classifier_dropout=0.0))
    jaxpr = jax.make_jaxpr(lambda v, x, r: m.apply(v, x, train=True, rngs={"dropout": r},
                                                   mutable=["batch_stats"]))(
        v, x, jax.random.key(0)).jaxpr
    assert not any("random" in e.primitive.name for e in _walk(jaxpr))
    jaxpr = jax.make_jaxpr(lambda v, x, r: model.apply(v, x, train=True, rngs={"dropout": r},
                                                       mutable=["batch_stats"]))(
        v, x, jax.random.key(0)).jaxpr
    assert any("random" in e.primitive.name for e in _walk(jaxpr))


@pytest.mark.parametrize("momentum", [0.99, 0.9])
def test_bn_momentum_reaches_every_batch_norm(momentum):
    import flax.linen as nn

    cfg = tiny_cfg(bn_momentum=momentum)
    model = build_model(cfg)
    seen: dict[str, float] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm):
            seen["/".join(context.module.scope.path)] = context.module.momentum
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _, variables = traced(model, input_shape(cfg, 2, 64))
    bn_layers = {"/".join(k[:-1]) for k in
                 (tuple(str(p.key) for p in path) for path, _ in
                  jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0])}
    assert len(bn_layers) > 20 and set(seen) == bn_layers
    assert set(seen.values()) == {momentum}


def test_bfloat16_compute_returns_float32_logits(tiny64):
    _, v, x, _, ref = tiny64
    model = build_model(tiny_cfg(dtype="bfloat16"))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))  # params stay float32
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    for k in out:
        assert out[k].dtype == jnp.float32
        got, want = np.asarray(out[k]), np.asarray(ref[k])
        assert np.all(np.isfinite(got))
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98, k


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def test_resizes_are_exact_x2_ops_not_jax_image_resize(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("jax.image.resize inside the network")

    monkeypatch.setattr(jax.image, "resize", forbidden)
    monkeypatch.setattr(jax.image, "scale_and_translate", forbidden)
    cfg = tiny_cfg()
    model = build_model(cfg)
    shape = input_shape(cfg, 2, 64)
    v = abstract_variables(model, shape)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
        v, jax.ShapeDtypeStruct(shape, jnp.float32)).jaxpr
    dots = [e for e in _walk(jaxpr) if e.primitive.name == "dot_general"]
    # Only the dense layers (FR squeeze-excite, classifier) multiply matrices: (B, C) operands.
    assert dots and all(var.aval.ndim == 2 for e in dots for var in e.invars)


def test_tiny_taps_follow_the_depth():
    cfg = tiny_cfg()
    assert build_model(cfg).taps == ("block2a", "block3a", "block4a", "block5a", "block6a", "top")
    assert build_model(default.get_config()).taps == tuple(default.get_config().model.taps)


def test_build_model_rejects_bad_settings():
    cfg = tiny_cfg(dtype="float16")
    with pytest.raises(ValueError, match="model.dtype"):
        build_model(cfg)
    cfg = tiny_cfg()
    cfg.data.tissue_names = ()
    with pytest.raises(ValueError, match="tissue_head"):
        build_model(cfg)
    cfg.model.tissue_head = False
    assert build_model(cfg).tissue_head is False


# ---- FLOPs and the summary command --------------------------------------------------------


def test_xla_flops_scale_with_pixels_and_backward_costs_more():
    cfg = tiny_cfg()
    model = build_model(cfg)
    v = abstract_variables(model, input_shape(cfg, 1, 64))
    f64 = xla_flops(model, v, input_shape(cfg, 1, 64))
    f128 = xla_flops(model, v, input_shape(cfg, 1, 128))
    both = xla_flops(model, v, input_shape(cfg, 1, 64), backward=True)
    # All but the GAP/dense layers scale with H*W (SAME-padding taps, excluded, weigh more
    # on the 2x2 maps of a 64 px input).
    assert 3.8 < f128 / f64 < 4.3
    assert 2.0 < both / f64 < 4.0


def test_summary_command_prints_parts_and_flops(capsys):
    from tsfd_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["summary", "--config", str(ROOT / "configs" / "tiny.py"),
              "--config.model.num_bifpn=2",
              "--size", "64"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for part in ("backbone", "gating", "bifpn_1", "bifpn_2", "decoders", "heads",
                 "classifier", "total"):
        assert f"\n{part} " in text
    assert "GFLOPs" in text and "at 64x64" in text


# ---- config loading -------------------------------------------------------------------------


def test_load_config_applies_typed_overrides():
    from tsfd_jax.config_files import load_config

    cfg = load_config(DEFAULT + ":fold2", [
        "--config.model.num_bifpn=2", "--config.model.seg_third_term", "False",
        "--config.data.root=/data/123", "--config.optim.lr=1", "--config.model.taps=['a', 'b']",
        "--config.data.image_size", "128"])
    assert cfg.data.train_split == "fold2"
    assert cfg.model.num_bifpn == 2 and cfg.model.seg_third_term is False
    assert cfg.data.root == "/data/123"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.taps == ("a", "b")
    assert cfg.data.image_size == 128


@pytest.mark.parametrize("args,message", [
    (["--config.model.num_bifpn=two"], "expected int"),
    (["--config.model.num_bifpm=2"], "did you mean num_bifpn"),
    (["--config.modle.num_bifpn=2"], "no field 'modle'"),
    (["--config.model.tissue_head=1"], "expected bool"),
])
def test_load_config_rejects_bad_overrides(args, message):
    from tsfd_jax.config_files import load_config

    with pytest.raises(UserError, match=message):
        load_config(DEFAULT, args)


def test_load_config_rejects_missing_files_and_variants(tmp_path):
    from tsfd_jax.config_files import load_config

    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "nope.py"))
    with pytest.raises(UserError, match="unknown variant"):
        load_config(DEFAULT + ":fold9")


def _with_and_without(field: str, channels: int):
    """A tiny model with ``model.<field> = channels`` and the same model without it: (x, plain
    (model, variables, outputs), variant (model, variables, outputs)), both drawn from key 0."""
    cfg = tiny_cfg()
    x = jax.random.uniform(jax.random.key(1), input_shape(cfg, 2, 64))
    out = []
    for value in (0, channels):
        cfg.model[field] = value
        model = build_model(cfg)
        variables = model.init(jax.random.key(0), x, train=False)
        out.append((model, variables, model.apply(variables, x, train=False)))
    return x, out[0], out[1]


def _built(cfg, x):
    """(model, variables) of a config, initialised from key 0 on ``x``."""
    model = build_model(cfg)
    return model, model.init(jax.random.key(0), x, train=False)


def _moved(model, variables, x, head: str) -> dict:
    """Outputs with the last conv of ``head`` (a SkipRefine) set to ones instead of zeros."""
    params = dict(variables["params"])
    params[head] = {**params[head], "out": {**params[head]["out"],
                                            "kernel": jnp.ones_like(params[head]["out"]["kernel"])}}
    return model.apply({**variables, "params": params}, x, train=False)


def test_stem_skip_starts_as_the_paper_head_and_learns_from_the_stem():
    """model.stem_skip adds SkipRefine to both heads: at initialisation the logits equal the
    model without it (its last conv starts at zero); every other parameter is the same draw;
    once that conv is non-zero the stem features change the logits."""
    x, (_, plain, out_plain), (skip_model, skip, out_skip) = _with_and_without("stem_skip", 8)
    assert set(skip["params"]) - set(plain["params"]) == {"seg_skip", "boundary_skip"}
    for name in plain["params"]:
        jax.tree.map(np.testing.assert_array_equal, plain["params"][name], skip["params"][name])
    for k in out_plain:
        np.testing.assert_allclose(out_skip[k], out_plain[k], atol=1e-6)
    moved = _moved(skip_model, skip, x, "seg_skip")
    assert np.abs(moved["seg_logits"] - out_plain["seg_logits"]).max() > 1e-3
    np.testing.assert_allclose(moved["boundary_logits"], out_plain["boundary_logits"], atol=1e-6)


def test_skip_depth_stacks_conv_layers_in_the_skip_and_starts_at_zero():
    """model.skip_depth = 2: each SkipRefine gets a second 3x3 conv + BN (``conv_2``,
    ``bn_2``) on the first's ``channels``; the first layer keeps its names (depth-1 checkpoints
    keep their keys); the logits still start as the paper heads'."""
    cfg = tiny_cfg()
    cfg.model.stem_skip = 8
    x = jax.random.uniform(jax.random.key(1), input_shape(cfg, 2, 64))
    shallow = build_model(cfg).init(jax.random.key(0), x, train=False)
    cfg.model.skip_depth = 2
    deep_model = build_model(cfg)
    deep = deep_model.init(jax.random.key(0), x, train=False)
    for head in ("seg_skip", "boundary_skip"):
        assert set(deep["params"][head]) - set(shallow["params"][head]) == {"conv_2", "bn_2"}
        assert deep["params"][head]["conv_2"]["kernel"].shape == (3, 3, 8, 8)
        assert set(shallow["params"][head]) == {"conv", "bn", "out"}
    cfg.model.stem_skip = 0
    plain = build_model(cfg)
    out_plain = plain.apply(plain.init(jax.random.key(0), x, train=False), x, train=False)
    out_deep = deep_model.apply(deep, x, train=False)
    for k in out_plain:
        np.testing.assert_allclose(out_deep[k], out_plain[k], atol=1e-6)
    moved = _moved(deep_model, deep, x, "boundary_skip")
    assert np.abs(moved["boundary_logits"] - out_plain["boundary_logits"]).max() > 1e-3


def test_input_depth_stacks_conv_layers_on_the_input_before_the_join():
    """model.input_depth = 2: a second 3x3 conv + BN on the input's features (``input_skip_2``,
    ``input_skip_bn_2``, C -> C) before they are joined to the decoder maps; the first layer keeps
    its names and shape; the logits still start as the paper heads' bilinear x2, and the second
    layer's weights reach them once the skip's last conv is non-zero."""
    cfg = tiny_cfg()
    cfg.model.input_skip = 8
    x = jax.random.uniform(jax.random.key(1), input_shape(cfg, 2, 64))
    shallow_model = build_model(cfg)
    shallow = shallow_model.init(jax.random.key(0), x, train=False)
    cfg.model.input_depth = 2
    deep_model = build_model(cfg)
    deep = deep_model.init(jax.random.key(0), x, train=False)
    assert set(deep["params"]) - set(shallow["params"]) == {"input_skip_2", "input_skip_bn_2"}
    assert deep["params"]["input_skip_2"]["kernel"].shape == (3, 3, 8, 8)
    assert (deep["params"]["input_skip"]["kernel"].shape
            == shallow["params"]["input_skip"]["kernel"].shape)
    out_shallow = shallow_model.apply(shallow, x, train=False)
    out_deep = deep_model.apply(deep, x, train=False)
    for k in out_shallow:
        np.testing.assert_allclose(out_deep[k], out_shallow[k], atol=1e-6)
    moved = _moved(deep_model, deep, x, "seg_input_skip")
    kernel = deep["params"]["input_skip_2"]["kernel"]
    params = {**deep["params"], "input_skip_2": {"kernel": -kernel}}
    flipped = _moved(deep_model, {**deep, "params": params}, x, "seg_input_skip")
    assert np.abs(flipped["seg_logits"] - moved["seg_logits"]).max() > 1e-4
    cfg.model.input_depth = 0
    with pytest.raises(ValueError, match="input_depth must be at least 1"):
        build_model(cfg)


def test_input_skip_gives_logits_at_the_input_resolution_starting_from_the_bilinear_heads():
    """model.input_skip: at initialisation the logits are the paper heads' bilinear x2 (its
    last convs start at zero), at the input resolution; a non-zero last conv makes the input's
    own features change them."""
    x, (_, plain, out_plain), (skip_model, skip, out_skip) = _with_and_without("input_skip", 8)
    assert set(skip["params"]) - set(plain["params"]) == {
        "input_skip", "input_skip_bn", "seg_input_skip", "boundary_input_skip"}
    for k in ("seg_logits", "boundary_logits"):
        assert out_plain[k].shape[1:3] == (32, 32) and out_skip[k].shape[1:3] == (64, 64)
        ref = jax.image.resize(out_plain[k], (2, 64, 64, out_plain[k].shape[-1]), "bilinear")
        np.testing.assert_allclose(out_skip[k], ref, atol=1e-5)
    moved = _moved(skip_model, skip, x, "boundary_input_skip")
    assert np.abs(moved["boundary_logits"] - out_skip["boundary_logits"]).max() > 1e-3
    np.testing.assert_allclose(moved["seg_logits"], out_skip["seg_logits"], atol=1e-6)


def test_shared_input_skip_refines_both_heads_with_one_skip():
    """model.shared_input_skip: one SkipRefine (``input_skip_refine``) on [both decoder maps,
    the input's features] gives both heads' corrections (num_labels + boundary channels) in
    place of one skip per head; it starts at zero like them (the logits are the heads' bilinear
    x2), its first columns reach only the segmentation logits; it needs ``input_skip``."""
    cfg = tiny_cfg()
    cfg.model.input_skip = 8
    x = jax.random.uniform(jax.random.key(1), input_shape(cfg, 2, 64))
    apart_model, apart = _built(cfg, x)
    cfg.model.shared_input_skip = True
    shared_model, shared = _built(cfg, x)
    assert set(apart["params"]) - set(shared["params"]) == {"seg_input_skip",
                                                           "boundary_input_skip"}
    assert set(shared["params"]) - set(apart["params"]) == {"input_skip_refine"}
    labels, c_gb = len(cfg.data.label_names), int(cfg.model.gating_channels)
    refine = shared["params"]["input_skip_refine"]
    assert refine["conv"]["kernel"].shape == (3, 3, 2 * c_gb + 8, 8)
    assert refine["out"]["kernel"].shape == (1, 1, 8, labels + 1)
    out_apart = apart_model.apply(apart, x, train=False)
    out_shared = shared_model.apply(shared, x, train=False)
    for k in out_apart:
        np.testing.assert_allclose(out_shared[k], out_apart[k], atol=1e-6)
    kernel = refine["out"]["kernel"]
    seg_only = jnp.zeros_like(kernel).at[..., :labels].set(1.0)
    params = {**shared["params"],
              "input_skip_refine": {**refine, "out": {**refine["out"], "kernel": seg_only}}}
    moved = shared_model.apply({**shared, "params": params}, x, train=False)
    assert np.abs(moved["seg_logits"] - out_shared["seg_logits"]).max() > 1e-3
    np.testing.assert_allclose(moved["boundary_logits"], out_shared["boundary_logits"],
                               atol=1e-6)
    cfg.model.input_skip = 0
    with pytest.raises(ValueError, match="shared_input_skip .* needs model.input_skip"):
        build_model(cfg)


def test_without_output_blocks_the_input_skips_are_the_heads():
    """model.output_blocks=False: no ``seg_head``/``boundary_head``; the logits are the input
    skips' outputs alone (equal to what the skips add to the heads, given the same weights),
    their last conv drawn at random instead of zero; it needs ``input_skip``."""
    cfg = tiny_cfg()
    cfg.model.input_skip = 8
    x = jax.random.uniform(jax.random.key(1), input_shape(cfg, 2, 64))
    with_model, with_blocks = _built(cfg, x)
    cfg.model.output_blocks = False
    model, variables = _built(cfg, x)
    assert set(with_blocks["params"]) - set(variables["params"]) == {"seg_head",
                                                                     "boundary_head"}
    assert set(variables["params"]) <= set(with_blocks["params"])
    for head in ("seg_input_skip", "boundary_input_skip"):
        assert np.abs(variables["params"][head]["out"]["kernel"]).max() > 0
    out = model.apply(variables, x, train=False)
    assert out["seg_logits"].shape == x.shape[:3] + (len(cfg.data.label_names),)
    assert out["boundary_logits"].shape == x.shape[:3] + (1,)
    # The same skip weights in the model with output blocks: its logits minus its heads'
    # bilinear logits (the skips' zero-initialised corrections replaced) are these logits.
    params = {**with_blocks["params"],
              **{h: variables["params"][h] for h in ("seg_input_skip", "boundary_input_skip")}}
    plain = with_model.apply(with_blocks, x, train=False)
    moved = with_model.apply({**with_blocks, "params": params}, x, train=False)
    for k in ("seg_logits", "boundary_logits"):
        np.testing.assert_allclose(moved[k] - plain[k], out[k], atol=1e-5)
    cfg.model.stem_skip = 8
    with pytest.raises(ValueError, match="stem_skip refines the output blocks"):
        build_model(cfg)
    cfg.model.stem_skip, cfg.model.input_skip = 0, 0
    with pytest.raises(ValueError, match="output_blocks=False .* needs model.input_skip"):
        build_model(cfg)


def test_node_pointwise_adds_a_1x1_conv_to_every_fusion_node():
    """model.node_pointwise: one (1, 1, C, C) kernel in every fusion node of the BiFPNs and the
    decoders, nothing else; with those kernels set to the identity the network computes what
    the paper's does with the same other parameters."""
    cfg = tiny_cfg()
    x = jax.random.uniform(jax.random.key(1), input_shape(cfg, 2, 64))
    plain_model = build_model(cfg)
    plain = plain_model.init(jax.random.key(0), x, train=False)
    cfg.model.node_pointwise = True
    pw_model = build_model(cfg)
    pw = pw_model.init(jax.random.key(0), x, train=False)

    p, q = _named_leaves(plain["params"]), _named_leaves(pw["params"])
    assert not set(p) - set(q)
    nodes = _fusion_nodes(p)
    assert nodes and set(q) - set(p) == {f"{n}/pwconv/kernel" for n in nodes}
    channels = int(cfg.model.gating_channels)

    def identity(name, leaf):
        return jnp.eye(channels)[None, None] if name.endswith("pwconv/kernel") else leaf

    _assert_computes_the_same(plain_model, plain, pw_model, pw, identity, x)


def test_node_conv_dense_replaces_every_fusion_nodes_depthwise_conv():
    """model.node_conv='dense': in every fusion node of the BiFPNs and the decoders a (3, 3, C,
    C) kernel ``conv`` in place of the depthwise ``dwconv`` (the FR blocks keep theirs); with
    each dense kernel holding the depthwise one on its diagonal the network computes what the
    paper's does with the same other parameters (the depthwise biases start at zero)."""
    cfg = tiny_cfg()
    x = jax.random.uniform(jax.random.key(1), input_shape(cfg, 2, 64))
    paper_model = build_model(cfg)
    paper = paper_model.init(jax.random.key(0), x, train=False)
    cfg.model.node_conv = "dense"
    dense_model = build_model(cfg)
    dense = dense_model.init(jax.random.key(0), x, train=False)

    p, d = _named_leaves(paper["params"]), _named_leaves(dense["params"])
    nodes = _fusion_nodes(p)
    assert nodes
    assert set(d) - set(p) == {f"{n}/conv/kernel" for n in nodes}
    assert set(p) - set(d) == ({f"{n}/dwconv/kernel" for n in nodes}
                               | {f"{n}/dwconv/bias" for n in nodes})
    channels = int(cfg.model.gating_channels)
    for n in nodes:
        assert d[f"{n}/conv/kernel"].shape == (3, 3, channels, channels)
        assert not np.any(p[f"{n}/dwconv/bias"])

    def diagonal(name, leaf):
        if not name.endswith("/conv/kernel") or name.rsplit("/", 2)[0] not in nodes:
            return leaf
        dw = p[name.rsplit("/", 2)[0] + "/dwconv/kernel"]      # (3, 3, 1, C)
        return dw[:, :, 0, :, None] * jnp.eye(channels)[None, None]

    _assert_computes_the_same(paper_model, paper, dense_model, dense, diagonal, x)
    cfg.model.node_pointwise = True
    with pytest.raises(ValueError, match="node_pointwise"):
        build_model(cfg)
    cfg.model.node_conv, cfg.model.node_pointwise = "full", False
    with pytest.raises(ValueError, match="node_conv"):
        build_model(cfg)


def _named_leaves(tree) -> dict:
    """{"a/b/c": leaf} of a parameter tree."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fusion_nodes(names) -> set[str]:
    """The fusion nodes (BiFPNs and decoders, not their FR blocks) among parameter names."""
    return {k.rsplit("/", 2)[0] for k in names if k.endswith("/dwconv/kernel")
            and "/fr_" not in k and ("bifpn_" in k or k.startswith("decoders/"))}


def _assert_computes_the_same(ref_model, ref, model, variables, set_new, x) -> None:
    """``model`` with ``ref``'s shared leaves and its other parameters set by ``set_new(name,
    leaf)`` gives ``ref_model``'s outputs on ``x``."""
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: set_new("/".join(str(getattr(k, "key", k)) for k in path), leaf),
        variables["params"])
    merged = _copy_shared({**variables, "params": params}, ref)
    out_ref = ref_model.apply(ref, x, train=False)
    out = model.apply(merged, x, train=False)
    for k in out_ref:
        np.testing.assert_allclose(out[k], out_ref[k], rtol=1e-4, atol=1e-5)


def _copy_shared(variables: dict, source: dict) -> dict:
    """``variables`` with every leaf that ``source`` also has taken from ``source``."""
    flat_src = dict(jax.tree_util.tree_flatten_with_path(source)[0])
    leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(variables),
        [flat_src.get(path, leaf) for path, leaf in leaves])


@pytest.mark.parametrize("arch", ["tsfd", "unet"])
def test_hv_targets_give_a_two_channel_boundary_head(arch):
    cfg = tiny_cfg()
    cfg.model.arch = arch
    cfg.model.tissue_head = False
    cfg.targets.boundary_kind, cfg.loss.boundary = "hv", "mse_msge"
    x = jnp.zeros(input_shape(cfg, 1, 64))
    shapes = jax.eval_shape(lambda: build_model(cfg).init_with_output(
        jax.random.key(0), x, train=False)[0])
    assert shapes["boundary_logits"].shape[-1] == 2
    assert shapes["seg_logits"].shape[-1] == len(cfg.data.label_names)
    cfg.loss.boundary = "bce"  # the maps need their own loss
    with pytest.raises(UserError, match="mse_msge"):
        build_model(cfg)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_align_to_input_puts_strided_maps_on_the_half_pixel_grid(levels):
    """A blob seen through ``levels`` stride-2 3x3 'SAME' box filters (the backbone's strided
    convs), upsampled back by the BiFPN's half-pixel resizes, lands (s - 1) / 2 input pixels to
    the top left of where it is; ``align_to_input`` puts it back (scipy centroids)."""
    from scipy import ndimage
    from tsfd_jax.models.bifpn import resize_to
    from tsfd_jax.models.tsfd import align_to_input
    size, centre, s = 256, (121.3, 134.6), 2 ** levels
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * (2.0 * s) ** 2))
    x = jnp.asarray(blob, jnp.float32)[None, ..., None]
    box = jnp.ones((3, 3, 1, 1), jnp.float32) / 9
    for _ in range(levels):
        x = jax.lax.conv_general_dilated(x, box, (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    seen = np.asarray(resize_to(x, (size, size)))[0, ..., 0]
    fixed = np.asarray(resize_to(align_to_input(x, (size, size)), (size, size)))[0, ..., 0]
    np.testing.assert_allclose(ndimage.center_of_mass(seen), np.subtract(centre, (s - 1) / 2),
                               atol=0.02)
    np.testing.assert_allclose(ndimage.center_of_mass(fixed), centre, atol=0.02)


@pytest.mark.parametrize("pool_stem", [False, True])
def test_plain_encoder_matches_conv_bn_relu_blocks_and_tsfd_strides(pool_stem):
    """``model.backbone="plain"``: the reference UNet's conv blocks at EfficientNet's tap strides,
    against a numpy forward pass (evaluation-mode BatchNorm with random statistics); the stem's
    conv at stride 2, or with ``model.pool_stem`` at stride 1 followed by a 2x2 max-pool."""
    from tsfd_jax.models.plain import TAPS, PlainEncoder

    enc = PlainEncoder((4, 4, 6, 8, 8), ("stem",) + TAPS, pool_stem=pool_stem)
    x = np.random.default_rng(1).uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    v = random_variables(jax.eval_shape(lambda: enc.init(jax.random.key(0), x, train=False)),
                         seed=3, stats=True)
    out = {k: np.asarray(a[0], np.float64) for k, a in enc.apply(v, x, train=False).items()}
    p, s = to_np(v["params"]), to_np(v["batch_stats"])

    def block(a, name):
        for k in range(2):
            a = np_conv_same(a, p[name][f"conv{k}"]["kernel"], 0)
            a = np.maximum(np_bn(a, p[name][f"bn{k}"], s[name][f"bn{k}"]), 0)
        return a

    def pool(a):
        h, w, c = a.shape
        return a.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))

    stem = np_conv_same(x[0].astype(np.float64), p["stem_conv"]["kernel"], 0)
    if pool_stem:
        stem = pool(np.maximum(np_bn(stem, p["stem_bn"], s["stem_bn"]), 0))
    else:
        # 'SAME' stride 2 with a 3x3 kernel on an even size: the window centred on odd pixels.
        stem = np.maximum(np_bn(stem[1::2, 1::2], p["stem_bn"], s["stem_bn"]), 0)
    ref = {"stem": block(stem, "stem")}
    ref["s4"] = block(pool(ref["stem"]), "s4")
    ref["s8"] = block(pool(ref["s4"]), "s8")
    ref["s16a"] = block(pool(ref["s8"]), "s16a")
    ref["s16b"] = block(ref["s16a"], "s16b")
    ref["s32a"] = block(pool(ref["s16b"]), "s32a")
    ref["s32b"] = block(ref["s32a"], "s32b")
    for k, r in ref.items():
        np.testing.assert_allclose(out[k], r, rtol=1e-4, atol=1e-4, err_msg=k)
    # TSFD-Net's strides (docs/model.md): P2..P7 at 4, 8, 16, 16, 32, 32.
    assert [32 // out[t].shape[0] for t in TAPS] == [4, 8, 16, 16, 32, 32]

    cfg = tiny_cfg(backbone="plain", plain_features=(4, 4, 6, 8, 8))
    model = build_model(cfg)
    shape = input_shape(cfg, batch=1)
    logits = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros(shape), train=False)[0])
    assert logits["seg_logits"].shape[1] == shape[1] // 2
    cfg.model.plain_features = (4, 4, 6)
    with pytest.raises(ValueError, match="needs 5 widths"):
        build_model(cfg)
    cfg = tiny_cfg(pool_stem=True)
    with pytest.raises(ValueError, match="pool_stem.*backbone='plain'"):
        build_model(cfg)


def test_decoders_from_the_stem_end_at_stride_2_and_refuse_the_stem_skip():
    """``model.taps`` led by "stem" (the paper's P1 level, docs/model.md item 14): the gating
    reads the stem's stride-2 features, the decoders end at stride 2 and the heads' logits come
    out at the input resolution without an input skip. The stem skip, which refines logits at
    stride 2, is refused with a message that names it."""
    widths = (5, 4, 6, 8, 8)  # the stem's 5 channels appear nowhere else
    cfg = tiny_cfg(backbone="plain", plain_features=widths,
                   taps=("stem", "s4", "s8", "s16a", "s16b", "s32a"), stem_skip=0)
    model = build_model(cfg)
    shape = input_shape(cfg, batch=1)
    logits, variables = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros(shape), train=False))
    assert logits["seg_logits"].shape[1:3] == shape[1:3]
    assert logits["boundary_logits"].shape[1:3] == shape[1:3]
    gating = variables["params"]["gating"]
    first = jax.tree.leaves(gating[sorted(gating)[0]])
    assert any(a.ndim == 4 and a.shape[2] == widths[0] for a in first)  # the stem's channels
    default_taps = tiny_cfg(backbone="plain", plain_features=widths)
    half, hv = jax.eval_shape(lambda: build_model(default_taps).init_with_output(
        jax.random.key(0), jnp.zeros(shape), train=False))
    assert half["seg_logits"].shape[1] == shape[1] // 2
    first = jax.tree.leaves(hv["params"]["gating"][sorted(gating)[0]])
    assert not any(a.ndim == 4 and a.shape[2] == widths[0] for a in first)
    cfg.model.stem_skip = 8
    with pytest.raises(ValueError, match="stem_skip"):
        build_model(cfg)
