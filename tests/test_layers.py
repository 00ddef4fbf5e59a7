"""The depthwise convolution with its own gradient, against XLA's grouped convolution.

Reference: ``lax.conv_general_dilated(..., 'SAME', feature_group_count=C)`` and its autodiff
gradients, which equal Keras' DepthwiseConv2D with 'same' padding (tests/test_efficientnet.py
checks SAME against Keras' explicit padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsfd_jax.models import layers
from tsfd_jax.models.layers import DepthwiseConv2D, depthwise_conv, depthwise_impl_for


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
