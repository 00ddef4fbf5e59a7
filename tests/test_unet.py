"""The reference UNet and the AdamW option: shapes, parameter count, selection by config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import baseline_unet, demo
from tsfd_jax.models.tsfd import build_model
from tsfd_jax.models.unet import UNet
from tsfd_jax.steps import make_optimizer


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_unet_shapes_and_parameter_count():
    feats, labels, n_ch = (8, 16, 32), 5, 6
    model = UNet(features=feats, num_labels=labels)
    x = jnp.zeros((2, 32, 32, n_ch))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out["seg_logits"].shape == (2, 32, 32, labels)
    assert out["boundary_logits"].shape == (2, 32, 32, 1)
    # Written out from the architecture: two bias-free 3x3 convs + BN (scale, bias) per block,
    # 2x2 transposed convs with bias, 1x1 heads with bias.
    def block(cin, c):
        return 9 * cin * c + 2 * c + 9 * c * c + 2 * c
    expected = block(n_ch, 8) + block(8, 16) + block(16, 32)
    expected += (4 * 32 * 16 + 16) + block(32, 16) + (4 * 16 * 8 + 8) + block(16, 8)
    expected += (8 * labels + labels) + (8 + 1)
    assert _count(variables["params"]) == expected


def test_config_selects_the_unet():
    cfg = baseline_unet.get_config()
    model = build_model(cfg)
    assert isinstance(model, UNet)
    assert model.num_labels == len(cfg.data.label_names)
    assert cfg.input.size == cfg.data.image_size
    cfg.model.arch = "resnet"
    with pytest.raises(ValueError, match="model.arch"):
        build_model(cfg)


def test_adamw_decays_kernels_only_and_is_adam_without_decay():
    cfg = demo.get_config()
    cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps, cfg.total_steps = "adamw", 0.1, 0, 10
    params = {"conv": {"kernel": jnp.ones((3,)), "bias": jnp.ones((3,))}}
    grads = jax.tree.map(jnp.zeros_like, params)
    cfg.optim.weight_decay = 0.5
    tx = make_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.5 * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(updates["conv"]["bias"], 0.0)
    cfg.optim.weight_decay = 0.0
    grads = {"conv": {"kernel": jnp.array([1.0, -2.0, 0.5]), "bias": jnp.ones((3,))}}
    tx, ref = make_optimizer(cfg), optax.adam(optax.cosine_decay_schedule(0.1, 10))
    got, _ = tx.update(grads, tx.init(params), params)
    want, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    cfg.optim.name = "lamb"
    with pytest.raises(ValueError, match="optim.name"):
        make_optimizer(cfg)
