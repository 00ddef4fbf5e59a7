"""EfficientNet backbone: Keras scaling rules, B4 shapes and parameter count, stochastic depth,
initialisers, bf16, padding. The layer-by-layer comparison with Keras is in test_keras_weights.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsfd_jax.models.efficientnet import (
    DEFAULT_TAPS,
    EfficientNet,
    block_specs,
    efficientnet_config,
    round_filters,
    round_repeats,
    stage_end_taps,
)
from tsfd_jax.models.layers import DepthwiseConv2D, Layers

TINY = (0.25, 0.5)  # width, depth: 10 blocks, three of them residual with stochastic depth
# Keras 3.15.1 EfficientNetB4(include_top=False, weights=None).count_params() at 3 and 6 input
# channels (the 6-channel value is also TSFD's model_summary backbone size, docs/model.md §4).
# Both include the identity Normalization layer's mean, variance (C each) and count (1).
KERAS_B4_PARAMS = {3: 17_673_823, 6: 17_675_125}


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_b4_stages_match_tsfd_summary():
    # docs/model.md: repeats / out channels per stage, stem 48, top 1792, 25 residual blocks.
    specs = block_specs(*efficientnet_config("b4"))
    reps = [sum(s.stage == i for s in specs) for i in range(1, 8)]
    outs = [next(s.filters_out for s in specs if s.stage == i) for i in range(1, 8)]
    kernels = [next(s.kernel for s in specs if s.stage == i) for i in range(1, 8)]
    assert reps == [2, 4, 4, 6, 6, 8, 2]
    assert outs == [24, 32, 56, 112, 160, 272, 448]
    assert kernels == [3, 3, 5, 3, 5, 5, 3]
    assert round_filters(32, 1.4) == 48 and round_filters(1280, 1.4) == 1792
    assert len(specs) == 32 and sum(s.residual for s in specs) == 25
    assert specs[0].drop_rate == 0 and specs[-1].drop_rate == pytest.approx(0.2 * 31 / 32)
    assert specs[0].se_filters == 12  # max(1, int(48 * 0.25)) of the block's *input* channels
    assert [s.stride for s in specs if s.name.endswith("a")] == [1, 2, 2, 2, 1, 2, 1]


def test_round_filters_and_repeats_rules():
    assert round_filters(16, 0.25) == 8          # never below the divisor
    assert round_filters(27, 1.0) == 32          # 24 would be < 90 % of 27: round up instead
    assert round_filters(35, 1.0) == 32          # 32 >= 0.9 * 35: round down is fine
    assert round_filters(112, 1.1) == 120        # B2: 123.2 -> 120
    assert round_repeats(3, 1.8) == 6 and round_repeats(4, 1.1) == 5 and round_repeats(1, 0.25) == 1
    assert efficientnet_config("B7") == (2.0, 3.1)
    with pytest.raises(ValueError, match="b9"):
        efficientnet_config("b9")


def test_stage_end_taps():
    assert stage_end_taps(*efficientnet_config("b4")) == DEFAULT_TAPS
    b0 = ("block2b", "block3b", "block4c", "block5c", "block6d", "top")
    assert stage_end_taps(1.0, 1.0) == b0
    assert stage_end_taps(*TINY) == ("block2a", "block3a", "block4b", "block5b", "block6b", "top")
    assert EfficientNet.from_variant("b0").taps == stage_end_taps(1.0, 1.0)
    assert EfficientNet.from_variant("b4").taps == DEFAULT_TAPS
    assert EfficientNet.from_variant("b4", depth_mult=0.5).taps == stage_end_taps(*TINY)


@pytest.mark.parametrize("channels", [3, 6])
def test_b4_parameter_count_and_names(channels):
    model = EfficientNet.from_variant("b4")
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, channels)),
                                          train=False))
    assert _count(v) + 2 * channels + 1 == KERAS_B4_PARAMS[channels]
    params, stats = v["params"], v["batch_stats"]
    assert {"stem_conv", "stem_bn", "block1a_dwconv", "block1a_se_reduce", "block1a_se_expand",
            "block1a_project_conv", "block2a_expand_conv", "block7b_project_bn", "top_conv",
            "top_bn"} <= set(params)
    assert "block1a_expand_conv" not in params  # expand ratio 1: no expansion conv
    assert set(stats) == {k for k in params if k.endswith("bn")}
    assert params["stem_conv"]["kernel"].shape == (3, 3, channels, 48)
    assert params["block6a_dwconv"]["kernel"].shape == (5, 5, 1, 160 * 6)
    assert params["block6a_se_reduce"]["kernel"].shape == (1, 1, 160 * 6, 40)
    assert jax.tree.leaves(jax.tree.map(lambda x: x.dtype, v)) == [jnp.float32] * len(
        jax.tree.leaves(v))


def test_b4_tap_shapes_64px():
    model = EfficientNet.from_variant("b4")
    x = jnp.zeros((2, 64, 64, 6))
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False)[0])
    assert list(out) == list(DEFAULT_TAPS)
    strides = [4, 8, 16, 16, 32, 32]
    chans = [32, 56, 112, 160, 272, 1792]
    assert [out[t].shape for t in DEFAULT_TAPS] == [
        (2, 64 // s, 64 // s, c) for s, c in zip(strides, chans)]


def test_unknown_tap_is_refused():
    model = EfficientNet(*TINY, taps=("block2d",))
    with pytest.raises(ValueError, match="block2d"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                          train=False))


def _keras_correct_pad(size: int, k: int) -> tuple[int, int]:
    # keras.src.applications.imagenet_utils.correct_pad for a known size.
    adjust = 1 - size % 2
    return k // 2 - adjust, k // 2


@pytest.mark.parametrize("size", [8, 9, 16])
@pytest.mark.parametrize("k", [3, 5])
def test_same_padding_equals_keras_correct_pad(size, k):
    rng = np.random.default_rng(size * k)
    x = jnp.asarray(rng.normal(size=(2, size, size, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 4, 5)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    pad = _keras_correct_pad(size, k)
    ref = jax.lax.conv_general_dilated(jnp.pad(x, ((0, 0), pad, pad, (0, 0))), w, (2, 2),
                                       "VALID", dimension_numbers=dn)
    same = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn)
    np.testing.assert_allclose(same, ref, rtol=1e-5, atol=1e-5)
    # The depthwise stride-2 convs of the MBConv blocks, both implementations.
    wd = jnp.asarray(rng.normal(size=(k, k, 1, 4)), jnp.float32)
    ref_dw = jax.lax.conv_general_dilated(jnp.pad(x, ((0, 0), pad, pad, (0, 0))), wd, (2, 2),
                                          "VALID", dimension_numbers=dn, feature_group_count=4)
    for impl in ("shift", "conv"):
        layer = DepthwiseConv2D(kernel_size=k, strides=2, use_bias=False, impl=impl)
        out = layer.apply({"params": {"kernel": wd}}, x)
        np.testing.assert_allclose(out, ref_dw, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    model = EfficientNet(*TINY, drop_connect_rate=0.5, taps=("block4a", "block4b", "top"))
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (8, 32, 32, 3)), jnp.float32)
    # The 'rbg' generator compiles several times faster than threefry for ~100 initialisers.
    key = jax.random.key(0, impl="rbg")
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(key, x)
    return model, variables, x


def _infer(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def test_stochastic_depth(tiny):
    model, variables, x = tiny
    spec = next(s for s in block_specs(*TINY, 0.5) if s.name == "block4b")
    assert spec.residual and spec.drop_rate > 0

    def train_fn(m):
        return jax.jit(lambda key: m.apply(variables, x, train=True, rngs={"dropout": key},
                                           mutable=["batch_stats"])[0])

    run = train_fn(model)
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    assert not np.allclose(a["top"], b["top"])
    # Per example the residual branch is dropped whole, or kept and scaled by 1/(1 - p).
    branch = train_fn(model.clone(drop_connect_rate=0.0))(jax.random.key(1))
    full = branch["block4b"] - branch["block4a"]
    delta = a["block4b"] - a["block4a"]
    dropped = np.all(delta == 0, axis=(1, 2, 3))
    assert 0 < dropped.sum() < len(x)  # this key drops some examples and keeps others
    np.testing.assert_allclose(delta[~dropped], full[~dropped] / (1 - spec.drop_rate),
                               rtol=1e-4, atol=1e-5)
    # Inference: deterministic whatever the dropout rng, and no rng is needed.
    infer = jax.jit(lambda k: model.apply(variables, x, train=False, rngs={"dropout": k}))
    e1, e2 = infer(jax.random.key(3)), infer(jax.random.key(4))
    e0 = _infer(model, variables, x)
    for t in model.taps:
        np.testing.assert_array_equal(e1[t], e2[t])
        np.testing.assert_allclose(e0[t], e1[t], rtol=1e-5, atol=1e-6)


def test_initialisers_follow_keras(tiny):
    _, variables, _ = tiny
    p, s = variables["params"], variables["batch_stats"]
    # VarianceScaling(2.0, 'fan_out', truncated normal): std = sqrt(2 / fan_out); Keras' fan_out
    # of a depthwise kernel (kh, kw, C, 1) is kh * kw.
    cases = {"top_conv": 2 / 320, "block6a_dwconv": 2 / 25, "block6a_expand_conv": 2 / 192,
             "block6a_se_expand": 2 / 192}
    for name, var in cases.items():
        w = np.asarray(p[name]["kernel"])
        assert w.std() == pytest.approx(math.sqrt(var), rel=0.06), name
        assert np.abs(w).max() <= 2 * math.sqrt(var) / 0.87962566103423978 + 1e-6
    assert p["top_conv"]["kernel"].shape == (1, 1, 80, 320)
    assert p["block6a_dwconv"]["kernel"].shape == (5, 5, 1, 192)
    assert p["block6a_se_expand"]["kernel"].shape == (1, 1, 8, 192)
    np.testing.assert_array_equal(p["block6a_se_reduce"]["bias"], 0)
    np.testing.assert_array_equal(p["block6a_bn"]["scale"], 1)
    np.testing.assert_array_equal(p["block6a_bn"]["bias"], 0)
    np.testing.assert_array_equal(s["block6a_bn"]["mean"], 0)
    np.testing.assert_array_equal(s["block6a_bn"]["var"], 1)


def test_bfloat16_compute_float32_params(tiny):
    model, variables, x = tiny
    m16 = model.clone(layers=Layers(dtype=jnp.bfloat16))
    v16 = jax.eval_shape(lambda: m16.init(jax.random.key(0), x, train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(v16)} == {jnp.dtype(jnp.float32)}
    ref = _infer(model, variables, x)
    out = _infer(m16, variables, x)
    for t in model.taps:
        assert out[t].dtype == jnp.bfloat16
        err = np.abs(np.asarray(out[t], np.float32) - ref[t]).max()
        assert err <= 0.05 * np.abs(ref[t]).max(), t


def test_depthwise_implementations_agree(tiny):
    model, variables, x = tiny
    a = _infer(model.clone(layers=Layers(depthwise_impl="shift")), variables, x)
    b = _infer(model.clone(layers=Layers(depthwise_impl="conv")), variables, x)
    for t in model.taps:
        np.testing.assert_allclose(a[t], b[t], rtol=1e-4, atol=1e-4 * np.abs(b[t]).max())


def test_fused_stages_are_fused_mbconv_blocks():
    """Stages 1..N become EfficientNetV2's Fused-MBConv; checked against scipy's correlate."""
    from scipy.ndimage import correlate

    model = EfficientNet(*TINY, drop_connect_rate=0.0, fused_stages=2, taps=("stem", "block2a"))
    x = jax.random.uniform(jax.random.key(5), (2, 16, 16, 3))
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), x)
    p = variables["params"]
    # Stage 1 (expand 1): one 3x3 conv; stage 2: 3x3 conv to the expanded width, 1x1 project;
    # neither has a depthwise conv or squeeze-excite. Stage 3 is an unchanged MBConv.
    assert p["block1a_fused_conv"]["kernel"].shape == (3, 3, 8, 8)
    assert p["block2a_fused_conv"]["kernel"].shape == (3, 3, 8, 48)
    assert p["block2a_project_conv"]["kernel"].shape == (1, 1, 48, 8)
    assert not any(k.startswith(("block1a_", "block2a_")) and k.endswith(("dwconv", "se_reduce"))
                   for k in p)
    assert "block3a_dwconv" in p and "block3a_fused_conv" not in p

    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    stem = np.asarray(out["stem"], np.float64)

    def conv(a, kernel, stride):  # float64 'SAME' correlation; stride 2 centres on odd pixels
        k = np.asarray(kernel, np.float64)
        pad = k.shape[0] // 2
        a = np.pad(a, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        o = np.stack([sum(correlate(a[..., i], k[None, ..., i, j], mode="constant")
                          for i in range(k.shape[2])) for j in range(k.shape[3])], -1)
        o = o[:, pad:o.shape[1] - pad, pad:o.shape[2] - pad]
        return o[:, stride - 1::stride, stride - 1::stride]

    def bn(a, name):  # evaluation mode: fresh statistics (mean 0, var 1), eps 1e-3
        return a / np.sqrt(1 + 1e-3) * np.asarray(p[name]["scale"]) + np.asarray(p[name]["bias"])

    def silu(a):
        return a / (1 + np.exp(-a))

    b1 = silu(bn(conv(stem, p["block1a_fused_conv"]["kernel"], 1), "block1a_fused_bn")) + stem
    h = silu(bn(conv(b1, p["block2a_fused_conv"]["kernel"], 2), "block2a_fused_bn"))
    b2 = bn(conv(h, p["block2a_project_conv"]["kernel"], 1), "block2a_project_bn")
    np.testing.assert_allclose(out["block2a"], b2, rtol=1e-4, atol=1e-5)


def test_fused_stages_are_validated():
    from configs import tiny
    from tsfd_jax.models.tsfd import build_model

    c = tiny.get_config()
    c.model.fused_stages = 8
    with pytest.raises(ValueError, match="fused_stages must be 0..7"):
        build_model(c)
