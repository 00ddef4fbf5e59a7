"""Device preprocessing (tsfd_jax.ops.preprocess) and the exact x2 resizes (tsfd_jax.ops.resize)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.default import get_config
from tsfd_jax.ops.preprocess import (MIN_PERCENTILE_RANGE, PERCENTILES, make_preprocess_fn,
                                     model_inputs, percentile_range)
from tsfd_jax.ops.resize import downsample2x, resize_bilinear, resize_nearest, upsample2x
from tsfd_jax.ops.stain import stain_channels
from tsfd_jax.errors import UserError
from tsfd_jax.ops.targets import boundary_target, contacts, distance_target, hv_target

H = 32
B = 8


# ---- resize ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 16, 16, 5), (4, 1, 2, 1)])
def test_upsample2x_equals_jax_image_resize(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    ref = jax.image.resize(x, (shape[0], 2 * shape[1], 2 * shape[2], shape[3]), "bilinear")
    np.testing.assert_allclose(np.asarray(upsample2x(x)), np.asarray(ref), atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 16, 16, 5), (4, 1, 2, 1)])
def test_upsample2x_gradient_equals_jax_image_resize_gradient(shape):
    # upsample2x has its own backward pass (a custom VJP); jax.image.resize's is autodiff's.
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (shape[0], 2 * shape[1], 2 * shape[2], shape[3]))
    ref = jax.grad(lambda v: jnp.sum(jnp.sin(jax.image.resize(v, w.shape, "bilinear")) * w))(x)
    got = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(upsample2x(v)) * w)))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    assert jax.grad(lambda v: upsample2x(v).astype(jnp.float32).sum())(
        x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(2, 8, 10, 3), (1, 2, 2, 4)])
def test_downsample2x_equals_jax_image_resize_without_antialias(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    ref = jax.image.resize(x, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]), "bilinear",
                           antialias=False)
    np.testing.assert_allclose(np.asarray(downsample2x(x)), np.asarray(ref), atol=1e-6)
    with pytest.raises(ValueError):
        downsample2x(jnp.zeros((1, 3, 4, 1)))


def test_resize_keeps_dtype_and_other_factors():
    x = jax.random.uniform(jax.random.key(2), (1, 8, 8, 3), maxval=255.0)
    assert upsample2x(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert downsample2x(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    for size in (8, 16, 24, 12):
        ref = jax.image.resize(x, (1, size, size, 3), "bilinear", antialias=False)
        np.testing.assert_allclose(np.asarray(resize_bilinear(x, (size, size))), np.asarray(ref),
                                   atol=1e-4)
    m = jnp.arange(6).reshape(1, 2, 3)
    np.testing.assert_array_equal(np.asarray(resize_nearest(m, (4, 6))),
                                  np.repeat(np.repeat(np.asarray(m), 2, 1), 2, 2))


# ---- preprocess --------------------------------------------------------------------------------

def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    inst = np.zeros((B, H, H), np.int32)
    yy, xx = np.mgrid[:H, :H]
    for b in range(B):
        for k in range(1, 5):
            cy, cx = rng.uniform(0, H, 2)
            inst[b][(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(9, 25)] = k
    cls = np.where(inst > 0, (inst % 5) + 1, 0).astype(np.uint8)
    image = np.where(inst[..., None] > 0, [70, 40, 130], [225, 190, 215]).astype(np.float64)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    return {"image": image, "inst": inst, "cls": cls, "tissue": np.arange(B, dtype=np.int32),
            "valid": np.array([True] * (B - 2) + [False] * 2)}


def small_config(**input_overrides):
    cfg = get_config()
    cfg.data.image_size = H
    cfg.input.size = 2 * H
    for k, v in input_overrides.items():
        cfg.input[k] = v
    return cfg


def run(cfg, batch, key, train):
    fn = make_preprocess_fn(cfg)
    return jax.jit(lambda b, k: fn(b, k, train))(batch, key)


@pytest.fixture(scope="module")
def batch():
    return make_batch()


@pytest.mark.parametrize("channels,n", [("rgb", 3), ("rgb_he", 5), ("rgb_her", 6)])
def test_eval_outputs_for_each_channel_set(batch, channels, n):
    cfg = small_config(channels=channels)
    inputs, targets = run(cfg, batch, jax.random.key(0), False)
    assert inputs.shape == (B, 2 * H, 2 * H, n) and inputs.dtype == jnp.float32
    assert {k: (v.shape, v.dtype) for k, v in targets.items()} == {
        "cls": ((B, H, H), jnp.int32), "boundary": ((B, H, H), jnp.float32),
        "tissue": ((B,), jnp.int32),
        "weight": ((B, H, H), jnp.float32)}
    # Without augmentation: RGB = bilinear x2 of the image / 255, stains from that RGB.
    rgb = jax.image.resize(batch["image"].astype(np.float32), (B, 2 * H, 2 * H, 3), "bilinear")
    np.testing.assert_allclose(np.asarray(inputs[..., :3]), np.asarray(rgb) / 255, atol=1e-5)
    if n > 3:
        stains = stain_channels(rgb, "hed", "fixed")
        np.testing.assert_allclose(np.asarray(inputs[..., 3:]), np.asarray(stains)[..., :n - 3],
                                   atol=1e-5)
    np.testing.assert_array_equal(np.asarray(targets["cls"]), batch["cls"].astype(np.int32))
    np.testing.assert_array_equal(np.asarray(targets["boundary"]),
                                  np.asarray(boundary_target(batch["inst"], batch["cls"])))
    np.testing.assert_array_equal(np.asarray(targets["tissue"]), batch["tissue"])
    np.testing.assert_array_equal(np.asarray(targets["weight"]),
                                  np.broadcast_to(batch["valid"][:, None, None], (B, H, H)))
    assert np.asarray(inputs).min() >= 0 and np.asarray(inputs).max() <= 1
    # model_inputs (what evaluation and prediction feed the network) is the same function.
    alone = jax.jit(lambda im: model_inputs(im, cfg))(batch["image"])
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(inputs))


def _percentile_reference(image, content=None):
    """float64 numpy: StarDist's (x - p1) / (p99.8 - p1) per image and channel, over the content
    pixels, the range widened about its middle to MIN_PERCENTILE_RANGE."""
    out = []
    for b in range(image.shape[0]):
        px = image[b].reshape(-1, 3).astype(np.float64)
        if content is not None:
            px = px[content[b].reshape(-1)]
        lo, hi = np.percentile(px, PERCENTILES, axis=0)
        pad = np.maximum(MIN_PERCENTILE_RANGE - (hi - lo), 0) / 2
        out.append((lo - pad, hi + pad))
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def test_percentile_rgb_scaling_matches_numpy(batch):
    rng = np.random.default_rng(3)
    # A low-contrast image (range 40 grey levels: widened), a normal one, a saturated one.
    images = np.stack([rng.integers(180, 220, (H, H, 3)), rng.integers(0, 256, (H, H, 3)),
                       np.clip(rng.normal(128, 90, (H, H, 3)), 0, 255)]).astype(np.uint8)
    content = np.ones((3, H, H), bool)
    content[1, :, : H // 2] = False
    lo, hi = percentile_range(jnp.asarray(images), jnp.asarray(content))
    ref_lo, ref_hi = _percentile_reference(images, content)
    np.testing.assert_allclose(np.asarray(lo)[:, 0, 0], ref_lo, atol=1e-3)
    np.testing.assert_allclose(np.asarray(hi)[:, 0, 0], ref_hi, atol=1e-3)
    assert np.isclose(np.asarray(hi - lo)[0], MIN_PERCENTILE_RANGE).all()

    cfg = small_config(rgb_scaling="percentile")
    inputs = np.asarray(jax.jit(lambda im: model_inputs(im, cfg))(images))
    ref_lo, ref_hi = _percentile_reference(images)
    rgb = np.asarray(jax.image.resize(images.astype(np.float32), (3, 2 * H, 2 * H, 3), "bilinear"))
    expected = (rgb - ref_lo[:, None, None]) / (ref_hi - ref_lo)[:, None, None]
    np.testing.assert_allclose(inputs[..., :3], expected, atol=1e-4)
    # The stain channels stay those of the unscaled RGB.
    np.testing.assert_allclose(inputs[..., 3:], np.asarray(stain_channels(rgb, "hed", "fixed")),
                               atol=1e-5)
    # Training (augmented, with its content mask) and evaluation share the function.
    train_inputs, _ = run(cfg, batch, jax.random.key(0), False)
    np.testing.assert_array_equal(
        np.asarray(train_inputs), np.asarray(jax.jit(lambda im: model_inputs(im, cfg))(batch["image"])))
    augmented, _ = run(cfg, batch, jax.random.key(1), True)
    assert np.isfinite(np.asarray(augmented)).all()


def test_unknown_rgb_scaling_is_refused():
    with pytest.raises(ValueError, match="rgb_scaling"):
        model_inputs(np.zeros((1, H, H, 3), np.uint8), small_config(rgb_scaling="zscore"))


def test_drop_r_at_inference_only(batch):
    cfg = small_config(drop_r_at_inference=True)
    inputs, _ = run(cfg, batch, jax.random.key(0), False)
    assert (np.asarray(inputs[..., 5]) == 0).all()
    assert (np.asarray(inputs[..., 3:5]) > 0).any()
    cfg.augment.enabled = False        # (only the R channel matters here; saves a compile)
    inputs, _ = run(cfg, batch, jax.random.key(0), True)
    assert (np.asarray(inputs[..., 5]) > 0).any()


def test_train_augments_deterministically_and_targets_follow(batch):
    cfg = small_config(stain_scaling="minmax")
    fn = make_preprocess_fn(cfg)
    f = jax.jit(lambda b, k: fn(b, k, True))
    a_in, a_t = f(batch, jax.random.key(7))
    b_in, b_t = f(batch, jax.random.key(7))
    c_in, _ = f(batch, jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a_in), np.asarray(b_in))
    for k in a_t:
        np.testing.assert_array_equal(np.asarray(a_t[k]), np.asarray(b_t[k]))
    assert not np.array_equal(np.asarray(a_in), np.asarray(c_in))
    plain, _ = run(cfg, batch, jax.random.key(7), False)
    assert not np.array_equal(np.asarray(a_in), np.asarray(plain))
    # Class labels stay a subset of the input's; boundary is binary; inputs in range.
    assert set(np.unique(a_t["cls"])) <= set(np.unique(batch["cls"]))
    assert set(np.unique(a_t["boundary"])) <= {0.0, 1.0}
    assert np.isfinite(np.asarray(a_in)).all()
    assert np.asarray(a_in).min() >= 0 and np.asarray(a_in).max() <= 1
    # Augmentation switched off: training preprocessing equals evaluation preprocessing.
    cfg.augment.enabled = False
    off, _ = run(cfg, batch, jax.random.key(7), True)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))


def test_sharded_equals_unsharded(batch):
    assert jax.device_count() == 4
    cfg = small_config()
    fn = make_preprocess_fn(cfg)
    f = jax.jit(lambda b, k: fn(b, k, True))
    key = jax.random.key(3)
    ref_in, ref_t = f(batch, key)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
    out_in, out_t = f(sharded, key)
    assert out_in.sharding.spec == P("data")
    np.testing.assert_allclose(np.asarray(out_in), np.asarray(ref_in), atol=1e-5)
    for k in ref_t:
        np.testing.assert_array_equal(np.asarray(out_t[k]), np.asarray(ref_t[k]))


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="channels"):
        make_preprocess_fn(small_config(channels="rgbx"))
    with pytest.raises(ValueError, match="stain_matrix"):
        make_preprocess_fn(small_config(stain_matrix="nope"))
    cfg = small_config()
    cfg.targets.boundary_kind = "edges"
    with pytest.raises(UserError, match="boundary_kind"):
        make_preprocess_fn(cfg)


def test_boundary_dilation_and_contact_targets_follow_the_config(batch):
    cfg = small_config()
    cfg.targets.boundary_dilation = 2
    cfg.targets.contact_dilation = 3
    cfg.loss.contact_weight = 5.0
    _, targets = run(cfg, batch, jax.random.key(0), False)
    np.testing.assert_array_equal(
        np.asarray(targets["boundary"]),
        np.asarray(boundary_target(batch["inst"], batch["cls"], None, 2, 2, 3)))
    np.testing.assert_array_equal(np.asarray(targets["contact"]),
                                  np.asarray(contacts(jnp.asarray(batch["inst"]))))


def test_hv_boundary_target_follows_the_config(batch):
    cfg = small_config()
    cfg.targets.boundary_kind, cfg.loss.boundary = "hv", "mse_msge"
    _, targets = run(cfg, batch, jax.random.key(0), False)
    assert targets["boundary"].shape == batch["inst"].shape + (2,)
    np.testing.assert_array_equal(np.asarray(targets["boundary"]),
                                  np.asarray(hv_target(jnp.asarray(batch["inst"]))))


def test_distance_boundary_target_follows_the_config(batch):
    cfg = small_config()
    cfg.targets.boundary_kind = "distance"
    _, targets = run(cfg, batch, jax.random.key(0), False)
    np.testing.assert_array_equal(np.asarray(targets["boundary"]),
                                  np.asarray(distance_target(jnp.asarray(batch["inst"]))))
