"""The layers computed in a form fast on XLA:CPU, against XLA's own.

- The depthwise convolution with its own gradient, against
  ``lax.conv_general_dilated(..., 'SAME', feature_group_count=C)`` and its autodiff gradients,
  which equal Keras' DepthwiseConv2D with 'same' padding (tests/test_efficientnet.py checks SAME
  against Keras' explicit padding).
- The transposed convolution as a sub-pixel convolution, against ``lax.conv_transpose`` and
  ``nn.ConvTranspose`` (tests/test_model.py checks the output block against a numpy
  transposed convolution placed as TensorFlow's).
- 2 x 2 max-pooling as a reshape, against ``nn.max_pool``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsfd_jax.models import layers
import flax.linen as nn

from tsfd_jax.models.layers import (ConvTranspose2D, DepthwiseConv2D, conv_transpose_phases,
                                   depthwise_conv, depthwise_impl_for, max_pool_2x2)


def grouped(x, kernel, stride):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


def vjp(fn, x, kernel, stride, cotangent):
    out, pull = jax.vjp(lambda a, b: fn(a, b, stride), x, kernel)
    return (out, *pull(cotangent))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("hw", [(12, 12), (11, 13), (7, 10)])
@pytest.mark.parametrize("rows", [8, 3])
def test_forward_and_gradients_equal_grouped_conv(stride, k, hw, rows, monkeypatch):
    # Few rows per chunk make the kernel gradient loop over several (and uneven) row chunks.
    monkeypatch.setattr(layers, "_ROWS", rows)
    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.normal(size=(3, *hw, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, 1, 5)), jnp.float32)
    out_shape = grouped(x, kernel, stride).shape
    cot = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    want = jax.jit(lambda x, w, c: vjp(grouped, x, w, stride, c))(x, kernel, cot)
    got = jax.jit(lambda x, w, c: vjp(depthwise_conv, x, w, stride, c))(x, kernel, cot)
    for name, g, w in zip(("output", "d input", "d kernel"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()),
                                   err_msg=name)


def test_second_order_and_bfloat16():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 3)), jnp.float32)
    loss = lambda f: (lambda w: jnp.sum(jnp.tanh(f(x, w, 2)) ** 2))  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss(depthwise_conv))(kernel),
                               jax.grad(loss(grouped))(kernel), rtol=1e-4, atol=1e-5)
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    out, dx, dk = vjp(depthwise_conv, xb, kb, 1, jnp.ones((2, 8, 8, 3), jnp.bfloat16))
    assert out.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    ref = vjp(grouped, x, kernel, 1, jnp.ones((2, 8, 8, 3)))
    for g, w in zip((out, dx, dk), ref):
        assert float(jnp.abs(g.astype(jnp.float32) - w).max()) <= 0.05 * float(jnp.abs(w).max())


def test_module_implementations_agree_and_auto_follows_the_backend():
    assert depthwise_impl_for("auto", "cpu") == "shift"
    assert depthwise_impl_for("auto", "gpu") == "conv"
    assert depthwise_impl_for("auto", "tpu") == "conv"
    assert depthwise_impl_for("conv", "cpu") == "conv"
    with pytest.raises(ValueError, match="depthwise"):
        depthwise_impl_for("fast")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 9, 4)), jnp.float32)
    outs = {}
    for impl in ("shift", "conv"):
        layer = DepthwiseConv2D(3, strides=2, impl=impl)
        v = layer.init(jax.random.key(0), x)
        outs[impl] = jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2))(v)
    for a, b in zip(jax.tree.leaves(outs["shift"]), jax.tree.leaves(outs["conv"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# Every kernel size at the networks' stride 2, and strides 1 and 3; even and odd sizes.
@pytest.mark.parametrize("k, stride, hw", [(1, 2, (5, 7)), (2, 2, (8, 8)), (3, 2, (8, 8)),
                                           (3, 2, (5, 7)), (4, 2, (5, 7)), (5, 2, (8, 8)),
                                           (3, 1, (5, 7)), (2, 3, (8, 8)), (3, 3, (5, 7))])
def test_transposed_conv_phases_equal_lax_conv_transpose(k, stride, hw):
    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.normal(size=(2, *hw, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, 3, 4)), jnp.float32)

    def reference(a, b):
        return jax.lax.conv_transpose(a, b, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out_shape = reference(x, kernel).shape
    assert out_shape == (2, stride * hw[0], stride * hw[1], 4)
    cot = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    want = vjp(lambda a, b, s: reference(a, b), x, kernel, stride, cot)
    got = vjp(conv_transpose_phases, x, kernel, stride, cot)
    for name, g, w in zip(("output", "input gradient", "kernel gradient"), got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4, err_msg=name)


def test_transposed_conv_module_equals_flax_with_the_same_parameters():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
    ours = ConvTranspose2D(5, 3, 2)
    params = ours.init(jax.random.key(0), x)
    flax_conv = nn.ConvTranspose(5, (3, 3), strides=(2, 2), padding="SAME")
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, flax_conv.init(jax.random.key(0), x))
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_max_pool_2x2_equals_flax_max_pool_with_its_gradient(hw):
    # After a ReLU, as in the networks: windows of zeros have ties, where the gradient is 0.
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, *hw, 3)))
    cot = jax.random.normal(jax.random.key(1), (2, hw[0] // 2, hw[1] // 2, 3))

    def flax_pool(a):
        return nn.max_pool(a, (2, 2), strides=(2, 2))

    for fn in (max_pool_2x2, flax_pool):
        out, pull = jax.vjp(lambda a: fn(jax.nn.relu(a)), x)
        if fn is max_pool_2x2:
            got = (out, pull(cot)[0])
        else:
            want = (out, pull(cot)[0])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-7)
