"""On-device data augmentation, one example at a time (PAPER §4.2; docs/preprocessing.md; docs/preprocessing.md).

Pure functions of (key, arrays) with static shapes: they run under ``jax.jit`` and ``jax.vmap``
(one PRNG key per example). The authors used imgaug on the host; the mapping to JAX is:

Geometric (image bilinear, labels nearest, constant 0 outside; imgaug ``SomeOf(2, ...)`` with
every op in ``Sometimes(p)``): exactly ``geometric_ops`` distinct ops are picked from the enabled
ones {h-flip, v-flip, scale (x, y independent), translate (x, y independent, fraction of the
size), rotate, shear (x), crop (fraction per side, resized back), elastic}, each then applied
with probability p. The picked ops are composed in a fixed order (crop -> flips -> affine ->
elastic; imgaug's order is random) into ONE sampling-coordinate map, so every array is resampled
once by ``jax.scipy.ndimage.map_coordinates`` (order 1 for the image, 0 for ``inst``/``cls``).
Instance ids are never interpolated: the output ids are a subset of the input ids. The content
mask (the warped all-ones image, nearest) marks pixels that came from inside the patch.

Photometric (image only, values 0..255 float, clipped after each op; ``PAPER §4.2``):
OneOf(median blur, Gaussian blur, Gaussian noise) in Sometimes(p), then hue, saturation,
brightness, contrast, each in Sometimes(p), in this fixed order (imgaug: random order).
See docs/preprocessing.md for each imgaug -> JAX mapping.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

GEOMETRIC_OPS = ("hflip", "vflip", "scale", "translate", "rotate", "shear", "crop", "elastic")
PHOTOMETRIC_FILTERS = ("median_blur", "gaussian_blur", "gaussian_noise")
ELASTIC_REFERENCE_SIZE = 256  # cfg.augment.elastic_alpha is in pixels of a 256 px patch


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    """Config value as a Python constant (ConfigDict, dict or attribute object)."""
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    try:
        return getattr(cfg, name)
    except (AttributeError, KeyError):
        return default


def _range(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    lo, hi = (float(v) for v in value)
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Geometric
# ----------------------------------------------------------------------------------------------

def enabled_geometric_ops(cfg: Any) -> tuple[str, ...]:
    """Names of the geometric ops the augment config switches on (the pool of ``SomeOf``)."""
    ops = []
    if _get(cfg, "flip", False):
        ops += ["hflip", "vflip"]
    scale = _range(_get(cfg, "scale"))
    if scale is not None and scale != (1.0, 1.0):
        ops.append("scale")
    if float(_get(cfg, "translate", 0.0) or 0.0) > 0:
        ops.append("translate")
    if float(_get(cfg, "rotate", 0.0) or 0.0) > 0:
        ops.append("rotate")
    if float(_get(cfg, "shear", 0.0) or 0.0) > 0:
        ops.append("shear")
    crop = _range(_get(cfg, "crop"))
    if crop is not None and crop[1] > 0:
        ops.append("crop")
    if _get(cfg, "elastic", False) and float(_get(cfg, "elastic_alpha", 0.0) or 0.0) > 0:
        ops.append("elastic")
    return tuple(ops)


def identity_params(grid: int = 8) -> dict[str, jax.Array]:
    """Geometric parameters that leave every array unchanged.

    hflip, vflip: bool; scale (sy, sx); translate (ty, tx) px; rotate, shear: degrees;
    crop (top, bottom, left, right) px; elastic (grid, grid, 2) displacement (dy, dx) px.
    """
    return {
        "hflip": jnp.asarray(False), "vflip": jnp.asarray(False),
        "scale": jnp.ones(2, jnp.float32), "translate": jnp.zeros(2, jnp.float32),
        "rotate": jnp.zeros((), jnp.float32), "shear": jnp.zeros((), jnp.float32),
        "crop": jnp.zeros(4, jnp.float32), "elastic": jnp.zeros((grid, grid, 2), jnp.float32),
    }


def sample_geometric_params(key: jax.Array, cfg: Any, h: int, w: int) -> dict[str, jax.Array]:
    """Random parameters for one example: ``geometric_ops`` distinct ops, each kept with p.

    Ops not picked (or not kept) get their identity parameters.
    """
    grid = int(_get(cfg, "elastic_grid", 8) or 8)
    params = identity_params(grid)
    ops = enabled_geometric_ops(cfg)
    k = min(int(_get(cfg, "geometric_ops", 2) or 0), len(ops))
    if k == 0:
        return params
    p = float(_get(cfg, "p", 1.0))
    # One uniform draw for everything: each jax.random call inlines a threefry hash, and a
    # dozen small calls cost seconds of XLA compile time per jit.
    sizes = {"pick": len(ops), "keep": len(ops), "scale": 2, "translate": 2, "rotate": 1,
             "shear": 1, "crop": 4, "elastic": grid * grid * 2}
    flat = jax.random.uniform(key, (sum(sizes.values()),), jnp.float32)
    draws, start = {}, 0
    for name, n in sizes.items():
        draws[name] = flat[start:start + n]
        start += n
    # SomeOf(k): the k ops with the smallest random scores (a uniform random k-subset).
    rank = jnp.argsort(jnp.argsort(draws["pick"]))
    on = (rank < k) & (draws["keep"] < p)
    active = {name: on[i] for i, name in enumerate(ops)}
    u = lambda name, lo, hi: lo + (hi - lo) * draws[name]

    sampled: dict[str, jax.Array] = {"hflip": jnp.asarray(True), "vflip": jnp.asarray(True)}
    if "scale" in active:
        sampled["scale"] = u("scale", *_range(_get(cfg, "scale")))
    if "translate" in active:
        t = float(_get(cfg, "translate"))
        sampled["translate"] = u("translate", -t, t) * jnp.array([h, w], jnp.float32)
    if "rotate" in active:
        r = float(_get(cfg, "rotate"))
        sampled["rotate"] = u("rotate", -r, r)[0]
    if "shear" in active:
        s = float(_get(cfg, "shear"))
        sampled["shear"] = u("shear", -s, s)[0]
    if "crop" in active:
        lo, hi = _range(_get(cfg, "crop"))
        sampled["crop"] = u("crop", lo, hi) * jnp.array([h, h, w, w], jnp.float32)
    if "elastic" in active:
        alpha = float(_get(cfg, "elastic_alpha")) * (h + w) / (2 * ELASTIC_REFERENCE_SIZE)
        sampled["elastic"] = u("elastic", -alpha, alpha).reshape(grid, grid, 2)
    for name, flag in active.items():
        params[name] = jnp.where(flag, sampled[name], params[name])
    return params


def sampling_coordinates(params: dict[str, jax.Array], h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """Input (y, x) coordinates, each (h, w) float32, that every output pixel samples from.

    Forward order crop -> flips -> affine -> elastic, so the inverse map applies elastic first.
    Identity parameters give the integer pixel grid exactly (no rounding error).
    """
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
    # Elastic: coarse (grid, grid, 2) field upsampled smoothly to the image.
    field = params["elastic"]
    disp = jax.image.resize(field, (h, w, 2), "cubic")
    y, x = y + disp[..., 0], x + disp[..., 1]
    # Affine about the centre, forward p' = R . Sh . S . (p - c) + c + t; invert step by step.
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    uy = y - cy - params["translate"][0]
    ux = x - cx - params["translate"][1]
    th = jnp.deg2rad(params["rotate"])
    c, s = jnp.cos(th), jnp.sin(th)
    vx, vy = c * ux + s * uy, -s * ux + c * uy          # R^-1
    vx = vx - jnp.tan(jnp.deg2rad(params["shear"])) * vy  # Sh^-1 (x shear)
    y = vy / params["scale"][0] + cy                    # S^-1
    x = vx / params["scale"][1] + cx
    # Flips.
    y = jnp.where(params["vflip"], (h - 1) - y, y)
    x = jnp.where(params["hflip"], (w - 1) - x, x)
    # Crop (top, bottom, left, right) resized back to (h, w): half-pixel centres.
    top, bottom, left, right = (params["crop"][i] for i in range(4))
    y = top + (y + 0.5) * ((h - top - bottom) / h) - 0.5
    x = left + (x + 0.5) * ((w - left - right) / w) - 0.5
    return y, x


def geometric_transform(image: jax.Array, inst: jax.Array, cls: jax.Array,
                        params: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
    """Warp one example with explicit parameters (``identity_params`` gives the identity).

    image (H, W, 3) -> float32 (H, W, 3) bilinear; inst, cls (H, W) -> int32 nearest;
    also returns the content mask (H, W) bool (pixels whose nearest source lies in the patch).
    """
    h, w = inst.shape
    y, x = sampling_coordinates(params, h, w)
    img = image.astype(jnp.float32)
    warp_img = jax.vmap(lambda ch: map_coordinates(ch, [y, x], order=1, mode="constant",
                                                   cval=0.0), in_axes=2, out_axes=2)(img)
    nearest = lambda a: map_coordinates(a.astype(jnp.int32), [y, x], order=0, mode="constant",
                                        cval=0)
    # Same rounding as map_coordinates(order=0): the warped all-ones image, without a gather.
    ry, rx = jax.lax.round(y), jax.lax.round(x)
    content = (ry >= 0) & (ry <= h - 1) & (rx >= 0) & (rx <= w - 1)
    return warp_img, nearest(inst), nearest(cls), content


# ----------------------------------------------------------------------------------------------
# Photometric (image (H, W, 3) float32 in 0..255)
# ----------------------------------------------------------------------------------------------

@functools.cache
def _median_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs that put the median of n values at index n // 2.

    Batcher's odd-even merge sort for the next power of two (the extra inputs act as +inf at
    the end, so comparators touching them never swap and are dropped), pruned backwards to the
    comparators the middle output depends on: 319 for n = 49 (7x7), 113 for 25, 24 for 9.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed, kept = {n // 2}, []
    for a, b in reversed(pairs):
        if a in needed or b in needed:
            kept.append((a, b))
            needed |= {a, b}
    return tuple(reversed(kept))


def median_blur(image: jax.Array, k: jax.Array, max_k: int = 7) -> jax.Array:
    """k x k median per channel (k odd, traced, <= max_k static), replicated edges (cv2).

    One selection network over the max_k^2 taps: taps outside the k x k window are replaced by
    +inf and -inf in equal numbers (checkerboard parity of the offset; max_k^2 - k^2 is even), so
    the middle output is the median of the k x k taps. Element-wise min/max only: XLA fuses it
    into one loop (``jnp.sort`` over the taps was ~50x slower on CPU).
    """
    h, w, _ = image.shape
    r = max_k // 2
    # The barrier keeps XLA from rewriting the 49 slices of the pad into slices of the warp.
    pad = jax.lax.optimization_barrier(jnp.pad(image, ((r, r), (r, r), (0, 0)), mode="edge"))
    half = k // 2
    vals = []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            fill = jnp.inf if (dy + dx) % 2 == 0 else -jnp.inf
            inside = max(abs(dy), abs(dx)) <= half
            vals.append(jnp.where(inside, pad[r + dy:r + dy + h, r + dx:r + dx + w], fill))
    for a, b in _median_network(len(vals)):
        vals[a], vals[b] = jnp.minimum(vals[a], vals[b]), jnp.maximum(vals[a], vals[b])
    return vals[len(vals) // 2]


def gaussian_blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur, traced sigma, static radius, reflect-101 edges (cv2 default)."""
    h, w, _ = image.shape
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    s = jnp.maximum(sigma, 1e-3)  # sigma -> 0 is the identity (all weight on the centre tap)
    kern = jnp.exp(-0.5 * (t / s) ** 2)
    kern = kern / kern.sum()
    pad = jax.lax.optimization_barrier(
        jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect"))
    rows = sum(kern[i] * pad[i:i + h] for i in range(2 * radius + 1))
    return sum(kern[i] * rows[:, i:i + w] for i in range(2 * radius + 1))


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """(..., 3) RGB -> (..., 3) HSV: hue in degrees [0, 360), saturation and value as RGB scale."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = jnp.max(rgb, axis=-1)
    delta = v - jnp.min(rgb, axis=-1)
    s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
    d = jnp.where(delta > 0, delta, 1.0)
    hue = jnp.where(v == r, (g - b) / d, jnp.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    hue = jnp.where(delta > 0, jnp.mod(60.0 * hue, 360.0), 0.0)
    return jnp.stack([hue, s, v], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Inverse of ``rgb_to_hsv``."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]

    def channel(n):
        k = jnp.mod(n + h / 60.0, 6.0)
        return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def _randint(u: jax.Array, lo: int, hi: int) -> jax.Array:
    """Uniform integer in [lo, hi] from a uniform [0, 1) draw."""
    return jnp.clip(lo + jnp.floor(u * (hi - lo + 1)), lo, hi).astype(jnp.int32)


def photometric(key: jax.Array, image: jax.Array, cfg: Any,
                content: jax.Array | None = None) -> jax.Array:
    """(H, W, 3) float 0..255 -> (H, W, 3) float32 0..255, colour/blur/noise ops of PAPER §4.2.

    ``content`` (H, W) bool restricts the contrast mean to the valid pixels.
    """
    p = float(_get(cfg, "p", 1.0))
    img = image.astype(jnp.float32)
    k_u, k_noise = jax.random.split(key)
    # One uniform and one normal draw per example (few threefry calls keep compiles short).
    u = iter(jax.random.uniform(k_u, (16,), jnp.float32))
    on = lambda: next(u) < p

    # OneOf(median blur, Gaussian blur, Gaussian noise), wrapped in Sometimes(p): each filter is
    # a branch of one lax.switch (branch 0: none), so where examples are augmented one at a time
    # (``augment_batch`` on CPU) only the chosen filter runs; under vmap all of them do.
    clipped = lambda f: lambda x: jnp.clip(f(x), 0.0, 255.0)
    branches = [lambda x: x]
    mb = _range(_get(cfg, "median_blur"))
    if mb is not None and mb[1] >= 3:
        lo_j, hi_j = max(int(mb[0]) // 2, 1), int(mb[1]) // 2   # odd sizes 2j+1, j in [lo, hi]
        j = _randint(next(u), lo_j, hi_j)
        branches.append(clipped(lambda x: median_blur(x, 2 * j + 1, 2 * hi_j + 1)))
    gb = _range(_get(cfg, "gaussian_blur"))
    if gb is not None and gb[1] > 0:
        sigma = gb[0] + (gb[1] - gb[0]) * next(u)
        radius = max(1, math.ceil(3 * gb[1]))
        branches.append(clipped(lambda x: gaussian_blur(x, sigma, radius)))
    gn = float(_get(cfg, "gaussian_noise", 0.0) or 0.0)
    if gn > 0:
        std = gn * 255.0 * next(u)
        per_channel = next(u) < 0.5

        def noisy(x):
            noise = jax.random.normal(k_noise, x.shape, jnp.float32)
            # Not per channel: the same value for R, G and B of a pixel.
            return x + std * jnp.where(per_channel, noise, noise[..., :1])

        branches.append(clipped(noisy))
    if len(branches) > 1:
        which = _randint(next(u), 1, len(branches) - 1)
        img = jax.lax.switch(jnp.where(on(), which, 0), branches, img)

    # AddToHue(-a, a): integer a as in imgaug, projected to OpenCV hue units as
    # int(a / 255 * 180) (2 degrees each); AddToSaturation(-b, b): integer added to S on 0..255.
    hue = int(_get(cfg, "hue", 0) or 0)
    sat = int(_get(cfg, "saturation", 0) or 0)
    if hue > 0 or sat > 0:
        a = _randint(next(u), -hue, hue).astype(jnp.float32)
        deg = jnp.where(on(), 2.0 * jnp.trunc(a / 255.0 * 180.0), 0.0)
        b = jnp.where(on(), _randint(next(u), -sat, sat).astype(jnp.float32), 0.0)
        hsv = rgb_to_hsv(img)
        hsv = jnp.stack([jnp.mod(hsv[..., 0] + deg, 360.0),
                         jnp.clip(hsv[..., 1] + b / 255.0, 0.0, 1.0), hsv[..., 2]], axis=-1)
        img = jnp.where((deg != 0) | (b != 0), jnp.clip(hsv_to_rgb(hsv), 0.0, 255.0), img)

    # AddToBrightness(-c, c) in YCrCb: adding to Y with Cr, Cb fixed adds to R, G and B alike.
    br = float(_get(cfg, "brightness", 0.0) or 0.0)
    if br > 0:
        delta = jnp.where(on(), br * (2.0 * next(u) - 1.0), 0.0)
        img = jnp.clip(img + delta, 0.0, 255.0)

    # Contrast: factor around the image mean (the authors' intended add_to_contrast).
    ct = _range(_get(cfg, "contrast"))
    if ct is not None and ct != (1.0, 1.0):
        f = jnp.where(on(), ct[0] + (ct[1] - ct[0]) * next(u), 1.0)
        if content is None:
            mean = img.mean()
        else:
            m = content[..., None].astype(jnp.float32)
            mean = (img * m).sum() / jnp.maximum(m.sum() * img.shape[-1], 1.0)
        img = jnp.where(f != 1.0, jnp.clip(mean + f * (img - mean), 0.0, 255.0), img)
    return img


# ----------------------------------------------------------------------------------------------
# One example
# ----------------------------------------------------------------------------------------------

def augment_example(key: jax.Array, image: jax.Array, inst: jax.Array, cls: jax.Array,
                    cfg_augment: Any) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Geometric then photometric augmentation of one example.

    image (H, W, 3) uint8/float 0..255, inst (H, W) int, cls (H, W) int ->
    (image float32 (H, W, 3) 0..255, inst int32, cls int32, content_mask bool (H, W)).
    Pixels outside the content stay 0 in the image after the photometric ops.
    """
    h, w = inst.shape
    k_geo, k_photo = jax.random.split(key)
    params = sample_geometric_params(k_geo, cfg_augment, h, w)
    image, inst, cls, content = geometric_transform(image, inst, cls, params)
    if _get(cfg_augment, "photometric", False):
        image = photometric(k_photo, image, cfg_augment, content)
        image = image * content[..., None].astype(image.dtype)
    return image, inst, cls, content


def augment_batch(keys: jax.Array, image: jax.Array, inst: jax.Array, cls: jax.Array,
                  cfg_augment: Any, one_at_a_time: bool | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``augment_example`` over a batch (leading axis of every argument), the same numbers either way.

    ``one_at_a_time`` (default: on a single CPU device) runs the examples in a loop
    (``lax.map``): the ``lax.switch`` of the photometric filters then runs only the chosen
    filter, where under ``vmap`` it runs all three (the 7 x 7 median network on every example
    is most of the augmentation's time on CPU; BENCHMARKS.md). On accelerators, and where the
    batch is sharded over several devices, ``vmap`` keeps one kernel per op for the batch.
    """
    fn = lambda k, im, i, c: augment_example(k, im, i, c, cfg_augment)
    if one_at_a_time is None:
        one_at_a_time = jax.default_backend() == "cpu" and jax.device_count() == 1
    if one_at_a_time:
        return jax.lax.map(lambda a: fn(*a), (keys, image, inst, cls))
    return jax.vmap(fn)(keys, image, inst, cls)
