"""Colour deconvolution (tsfd_jax.ops.stain) against skimage and a float64 transcription."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed

from tsfd_jax.ops.stain import deconvolve, stain_channels, stain_range

# Colours that contain every per-channel extreme (0, 1, 255) and some ordinary values.
LATTICE = np.array(list(itertools.product([0, 1, 2, 7, 64, 128, 200, 254, 255], repeat=3)),
                   np.uint8)[None]


def authors_her_float64(rgb: np.ndarray) -> np.ndarray:
    """docs/preprocessing.md, written out: rows H, E, HxE; S = ln(max(rgb,1e-6))/ln(1e-6) @ inv(M)."""
    h = np.array([0.65, 0.70, 0.29])
    e = np.array([0.07, 0.99, 0.11])
    m = np.stack([h, e, np.cross(h, e)])
    rgb = np.maximum(rgb.astype(np.float64), 1e-6)
    return (np.log(rgb) / np.log(1e-6)) @ np.linalg.inv(m)


def test_hed_equals_skimage_on_random_uint8_and_float():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(deconvolve(x)), rgb2hed(x), atol=1e-5)
    xf = rng.uniform(0, 255, (40, 50, 3))
    np.testing.assert_allclose(np.asarray(deconvolve(jnp.asarray(xf, jnp.float32))),
                               rgb2hed(xf / 255.0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(deconvolve(LATTICE)), rgb2hed(LATTICE), atol=1e-5)


def test_hed_equals_skimage_on_real_images(shared_data):
    files = sorted((shared_data / "he_samples").glob("*.png"))
    files += sorted((shared_data / "consep" / "train").glob("*.jpg"))[:3]
    assert len(files) >= 4
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        np.testing.assert_allclose(np.asarray(deconvolve(img)), rgb2hed(img), atol=1e-5,
                                   err_msg=str(f))


def test_authors_matrix_equals_float64_transcription():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, 30, 3)).astype(np.uint8)
    for arr in (x, LATTICE):
        np.testing.assert_allclose(np.asarray(deconvolve(arr, "authors")),
                                   authors_her_float64(arr), atol=1e-5)


def test_stain_range_is_the_exact_8bit_range():
    # skimage on a lattice containing all per-channel extremes gives the same range.
    hed = rgb2hed(LATTICE)[0]
    lo, hi = stain_range("hed")
    np.testing.assert_allclose(lo, hed.min(0), atol=1e-12)
    np.testing.assert_allclose(hi, hed.max(0), atol=1e-12)
    her = authors_her_float64(LATTICE)[0]
    lo, hi = stain_range("authors")
    np.testing.assert_allclose(lo, her.min(0), atol=1e-12)
    np.testing.assert_allclose(hi, her.max(0), atol=1e-12)
    # No colour falls outside: random colours stay inside the range.
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (1, 20000, 3)).astype(np.uint8)
    h = rgb2hed(x)[0]
    assert (h >= np.array(stain_range("hed")[0]) - 1e-12).all()
    assert (h <= np.array(stain_range("hed")[1]) + 1e-12).all()


@pytest.mark.parametrize("matrix", ["hed", "authors"])
def test_fixed_scaling_spans_unit_range_over_extreme_colours(matrix):
    out = np.asarray(stain_channels(LATTICE, matrix, "fixed"))
    assert out.dtype == np.float32 and out.shape == LATTICE.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Tight: each channel reaches both ends somewhere on the extremes.
    np.testing.assert_allclose(out.reshape(-1, 3).min(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(-1, 3).max(0), 1.0, atol=1e-5)
    # Dense stain -> high value (paper's OD orientation): white is 0 for every stain.
    white = np.asarray(stain_channels(np.full((1, 1, 3), 255, np.uint8), matrix, "fixed"))
    lo, hi = (np.array(v) for v in stain_range(matrix))
    s_white = (authors_her_float64(np.full((1, 1, 3), 255)) if matrix == "authors"
               else rgb2hed(np.full((1, 1, 3), 255, np.uint8)))
    np.testing.assert_allclose(white, (s_white - lo) / (hi - lo), atol=1e-5)


def test_minmax_matches_authors_formula_and_is_guarded():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    out = np.asarray(stain_channels(x, "authors", "minmax"))
    for i in range(2):
        s = authors_her_float64(x[i])
        ref = 1 - (s - s.min((0, 1))) / (s.max((0, 1)) - s.min((0, 1)))
        np.testing.assert_allclose(out[i], ref, atol=1e-5)
    # Constant images: no NaN, values in range (the authors' code divides by zero here).
    for value in (0, 128, 255):
        c = np.asarray(stain_channels(np.full((8, 8, 3), value, np.uint8), "hed", "minmax"))
        assert np.isfinite(c).all() and c.min() >= 0 and c.max() <= 1


def test_minmax_uses_only_masked_pixels_and_zeroes_outside():
    rng = np.random.default_rng(4)
    x = rng.integers(30, 230, (16, 16, 3)).astype(np.uint8)
    x[:, :4] = 0                       # black fill, as after a geometric warp
    mask = np.ones((16, 16), bool)
    mask[:, :4] = False
    out = np.asarray(stain_channels(x, "hed", "minmax", jnp.asarray(mask)))
    assert (out[:, :4] == 0).all()
    inner = np.asarray(stain_channels(x[:, 4:], "hed", "minmax"))
    np.testing.assert_allclose(out[:, 4:], inner, atol=1e-6)
