"""On-device augmentation (tsfd_jax.ops.augment): invariants and independent references."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from configs.default import get_config
from tsfd_jax.ops.augment import (augment_batch, augment_example, gaussian_blur, geometric_transform,
                                  hsv_to_rgb, identity_params, median_blur, rgb_to_hsv,
                                  sample_geometric_params)

S = 64
BG = np.array([225.0, 190.0, 215.0])   # pink background
FG = np.array([70.0, 40.0, 130.0])     # dark purple nuclei

_warp = jax.jit(geometric_transform)


def synthetic_example(seed: int = 0, n: int = 7):
    """Dark discs drawn from an instance map: image, inst (ids 1..n), cls (class per id)."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((S, S), np.int32)
    yy, xx = np.mgrid[:S, :S]
    k = 0
    for _ in range(200):
        if k == n:
            break
        r = rng.uniform(5, 8)
        cy, cx = rng.uniform(r + 2, S - r - 2, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if ndi.binary_dilation(disc, iterations=5)[inst > 0].any():
            continue
        k += 1
        inst[disc] = k
    classes = rng.integers(1, 6, k + 1)
    classes[0] = 0
    cls = classes[inst].astype(np.int32)
    image = np.where(inst[..., None] > 0, FG, BG).astype(np.uint8)
    return image, inst, cls


def params_with(**kw):
    p = identity_params()
    p.update({k: jnp.asarray(v, p[k].dtype) for k, v in kw.items()})
    return p


def aug_config(**overrides):
    a = get_config().augment
    for k, v in overrides.items():
        a[k] = v
    return a


@pytest.fixture(scope="module")
def example():
    return synthetic_example()


def test_identity_params_give_the_identity(example):
    image, inst, cls = example
    img, i, c, content = _warp(image, inst, cls, identity_params())
    np.testing.assert_array_equal(np.asarray(img), image.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(i), inst)
    np.testing.assert_array_equal(np.asarray(c), cls)
    assert np.asarray(content).all()


def test_flips_match_numpy_and_are_involutions(example):
    image, inst, cls = example
    for name, ref in (("hflip", lambda a: a[:, ::-1]), ("vflip", lambda a: a[::-1])):
        p = params_with(**{name: True})
        img, i, c, content = _warp(image, inst, cls, p)
        np.testing.assert_array_equal(np.asarray(img), ref(image).astype(np.float32))
        np.testing.assert_array_equal(np.asarray(i), ref(inst))
        np.testing.assert_array_equal(np.asarray(c), ref(cls))
        assert np.asarray(content).all()
        img2, i2, c2, _ = _warp(img, i, c, p)
        np.testing.assert_array_equal(np.asarray(img2), image.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(i2), inst)


def test_integer_translation_is_a_shift_with_zero_fill(example):
    image, inst, cls = example
    img, i, _, content = _warp(image, inst, cls, params_with(translate=[3.0, -5.0]))
    ref = np.zeros_like(inst)
    ref[3:, :S - 5] = inst[:S - 3, 5:]
    np.testing.assert_array_equal(np.asarray(i), ref)
    ref_img = np.zeros(image.shape, np.float32)
    ref_img[3:, :S - 5] = image[:S - 3, 5:]
    np.testing.assert_array_equal(np.asarray(img), ref_img)
    ref_content = np.zeros((S, S), bool)
    ref_content[3:, :S - 5] = True
    np.testing.assert_array_equal(np.asarray(content), ref_content)


def test_rotation_by_90_degrees_is_rot90(example):
    image, inst, cls = example
    img, i, c, content = _warp(image, inst, cls, params_with(rotate=90.0))
    i = np.asarray(i)
    k = 1 if np.array_equal(i, np.rot90(inst, 1)) else -1
    np.testing.assert_array_equal(i, np.rot90(inst, k))
    np.testing.assert_array_equal(np.asarray(c), np.rot90(cls, k))
    np.testing.assert_allclose(np.asarray(img), np.rot90(image, k).astype(np.float32), atol=1e-3)
    assert np.asarray(content).all()


def test_crop_resizes_back_without_fill(example):
    image, inst, cls = example
    _, i, _, content = _warp(image, inst, cls, params_with(crop=[10.0, 3.0, 0.0, 14.0]))
    assert np.asarray(content).all()
    assert set(np.unique(i)) <= set(np.unique(inst))
    # Zoomed in: the kept nuclei cover more pixels than before.
    kept = [k for k in np.unique(i) if k]
    assert kept and all((np.asarray(i) == k).sum() >= (inst == k).sum() for k in kept
                        if not (inst == k)[:10].any() and not (inst == k)[:, S - 14:].any()
                        and not (inst == k)[S - 3:].any())


def test_image_and_labels_move_together():
    rng = np.random.default_rng(5)
    for seed in range(6):
        image, inst, cls = synthetic_example(seed)
        p = params_with(
            rotate=rng.uniform(-25, 25), shear=rng.uniform(-8, 8),
            scale=rng.uniform(0.8, 1.2, 2), translate=rng.uniform(-6, 6, 2),
            elastic=rng.uniform(-3, 3, (8, 8, 2)), hflip=bool(rng.integers(2)))
        img, i, c, content = (np.asarray(a) for a in _warp(image, inst, cls, p))
        # Fill outside the content is black: only pixels from inside the patch count.
        dark = (img.mean(-1) < (BG.mean() + FG.mean()) / 2) & content
        lab = i > 0
        iou = (dark & lab).sum() / (dark | lab).sum()
        assert iou > 0.9, (seed, iou)
        darkness = np.clip((BG.mean() - img.mean(-1)) / (BG.mean() - FG.mean()), 0, 1)
        inner = ndi.binary_erosion(content, iterations=3)
        checked = 0
        for k in np.unique(i[i > 0]):
            region = i == k
            if region.sum() < 20 or not (region <= inner).all():
                continue
            near = ndi.binary_dilation(region, iterations=2) & ((i == 0) | region)
            ys, xs = np.nonzero(near)
            wgt = darkness[ys, xs]
            dark_c = np.array([(ys * wgt).sum(), (xs * wgt).sum()]) / wgt.sum()
            lab_c = np.array(np.nonzero(region)).mean(1)
            assert np.linalg.norm(dark_c - lab_c) < 1.5, (seed, k, dark_c, lab_c)
            checked += 1
        assert checked >= 2


@pytest.fixture(scope="module")
def batch_augment():
    cfg = aug_config()
    return jax.jit(jax.vmap(lambda k, im, i, c: augment_example(k, im, i, c, cfg)))


def test_random_augmentation_keeps_valid_labels_and_is_deterministic(batch_augment):
    exs = [synthetic_example(s) for s in range(8)]
    images, insts, clss = (np.stack(a) for a in zip(*exs))
    keys = jax.random.split(jax.random.key(0), 8)
    img, i, c, content = (np.asarray(a) for a in batch_augment(keys, images, insts, clss))
    assert img.dtype == np.float32 and i.dtype == np.int32 and c.dtype == np.int32
    assert img.shape == images.shape and i.shape == insts.shape and content.dtype == bool
    assert img.min() >= 0 and img.max() <= 255
    changed = 0
    for b in range(8):
        # Ids are a subset of the input ids and keep their class (no interpolated ids).
        pairs_in = set(zip(insts[b].ravel(), clss[b].ravel()))
        assert set(zip(i[b].ravel(), c[b].ravel())) <= pairs_in
        assert (img[b][~content[b]] == 0).all()
        changed += not np.array_equal(i[b], insts[b])
    assert changed >= 4
    # Same key -> same output; other keys -> other output.
    again = batch_augment(keys, images, insts, clss)
    for a, b_ in zip((img, i, c, content), again):
        np.testing.assert_array_equal(a, np.asarray(b_))
    other = batch_augment(jax.random.split(jax.random.key(1), 8), images, insts, clss)
    assert not np.array_equal(img, np.asarray(other[0]))


def test_augment_batch_one_at_a_time_equals_vmap():
    exs = [synthetic_example(s) for s in range(6)]
    images, insts, clss = (jnp.asarray(np.stack(a)) for a in zip(*exs))
    keys = jax.random.split(jax.random.key(5), 6)
    cfg = aug_config()
    f = jax.jit(lambda k, im, i, c, loop: augment_batch(k, im, i, c, cfg, loop),
                static_argnums=4)
    looped, mapped = f(keys, images, insts, clss, True), f(keys, images, insts, clss, False)
    np.testing.assert_allclose(np.asarray(looped[0]), np.asarray(mapped[0]), atol=1e-3)
    for a, b in zip(looped[1:], mapped[1:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(looped[0]), np.asarray(images, np.float32))


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_the_chosen_filter_alone_is_applied(one_at_a_time):
    # Geometric ops and colour ops off, median blur the only filter, always applied: each
    # example's output is scipy's median of its input at one of the allowed sizes.
    exs = [synthetic_example(s) for s in range(6)]
    images, insts, clss = (np.stack(a) for a in zip(*exs))
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 30, images.shape), 0, 255)
    cfg = aug_config(geometric_ops=0, p=1.0, gaussian_blur=None, gaussian_noise=0.0, hue=0,
                     saturation=0, brightness=0.0, contrast=None)
    out = np.asarray(jax.jit(lambda k, im, i, c: augment_batch(k, im, i, c, cfg, one_at_a_time))(
        jax.random.split(jax.random.key(2), 6), jnp.asarray(noisy, jnp.float32),
        jnp.asarray(insts), jnp.asarray(clss))[0])
    sizes = []
    for b in range(6):
        refs = {k: ndi.median_filter(noisy[b].astype(np.float32), size=(k, k, 1), mode="nearest")
                for k in (3, 5, 7)}
        sizes += [k for k, r in refs.items() if np.array_equal(out[b], r)]
    assert len(sizes) == 6 and len(set(sizes)) > 1


def test_sampled_params_pick_exactly_the_configured_number_of_ops():
    cfg = aug_config(p=1.0)
    ident = identity_params()
    for s in range(20):
        p = sample_geometric_params(jax.random.key(s), cfg, S, S)
        changed = sum(not np.array_equal(np.asarray(p[k]), np.asarray(ident[k])) for k in ident)
        assert changed == 2, s
    none = sample_geometric_params(jax.random.key(0), aug_config(p=0.0), S, S)
    for k in ident:
        np.testing.assert_array_equal(np.asarray(none[k]), np.asarray(ident[k]))


def test_photometric_only_leaves_labels_unchanged(example):
    image, inst, cls = example
    cfg = aug_config(geometric_ops=0, p=1.0)
    f = jax.jit(jax.vmap(lambda k: augment_example(k, image, inst, cls, cfg)))
    img, i, c, content = (np.asarray(a) for a in f(jax.random.split(jax.random.key(3), 4)))
    for b in range(4):
        np.testing.assert_array_equal(i[b], inst)
        np.testing.assert_array_equal(c[b], cls)
        assert content[b].all()
        assert not np.allclose(img[b], image)
    assert img.min() >= 0 and img.max() <= 255


def test_median_blur_equals_scipy():
    x = np.random.default_rng(6).uniform(0, 255, (17, 19, 3)).astype(np.float32)
    # Traced kernel sizes under jit + vmap (as in the photometric pipeline).
    ks = np.array([3, 5, 7])
    f = jax.jit(jax.vmap(lambda k: median_blur(jnp.asarray(x), k, 7)))
    out = np.asarray(f(jnp.asarray(ks)))
    for i, k in enumerate(ks):
        np.testing.assert_array_equal(out[i], ndi.median_filter(x, size=(k, k, 1), mode="nearest"))
    ref = ndi.median_filter(x, size=(5, 5, 1), mode="nearest")
    np.testing.assert_array_equal(np.asarray(median_blur(jnp.asarray(x), 5, 5)), ref)


def test_gaussian_blur_equals_scipy():
    x = np.random.default_rng(7).uniform(0, 255, (17, 19, 3)).astype(np.float32)
    for sigma in (0.3, 0.7, 1.0):
        ref = ndi.gaussian_filter(x, (sigma, sigma, 0), mode="mirror", radius=(3, 3, 0))
        np.testing.assert_allclose(np.asarray(gaussian_blur(jnp.asarray(x), sigma, 3)), ref,
                                   atol=1e-3)
    np.testing.assert_allclose(np.asarray(gaussian_blur(jnp.asarray(x), 0.0, 3)), x, atol=1e-4)


def test_hsv_matches_colorsys_and_round_trips():
    x = np.random.default_rng(8).uniform(0, 255, (200, 3)).astype(np.float32)
    hsv = np.asarray(rgb_to_hsv(jnp.asarray(x)))
    ref = np.array([colorsys.rgb_to_hsv(*(c / 255.0)) for c in x])
    np.testing.assert_allclose(hsv[:, 0], ref[:, 0] * 360, atol=1e-3)
    np.testing.assert_allclose(hsv[:, 1], ref[:, 1], atol=1e-5)
    np.testing.assert_allclose(hsv[:, 2], ref[:, 2] * 255, atol=1e-3)
    np.testing.assert_allclose(np.asarray(hsv_to_rgb(jnp.asarray(hsv))), x, atol=1e-3)
    red = jnp.array([[200.0, 0.0, 0.0]])
    shifted = rgb_to_hsv(red).at[:, 0].add(120.0)
    np.testing.assert_allclose(np.asarray(hsv_to_rgb(shifted)), [[0.0, 200.0, 0.0]], atol=1e-3)
