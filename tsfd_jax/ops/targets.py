"""Training targets from instance and class maps (PAPER §3.3-3.4; docs/preprocessing.md, §3.4).

- Semantic target: per-pixel class, one-hot over C+1 labels (0 = background).
- Boundary target: the 2-px thick contour of every instance, equal to
  ``skimage.segmentation.find_boundaries(inst, connectivity=1, mode='thick')`` (a pixel is a
  boundary pixel when a 4-neighbour inside the image has a different label), OR-ed with the
  authors' "boundary enclosing": nucleus pixels within ``frame_width`` px of the patch edge, and,
  after a geometric augmentation, within ``frame_width`` px of the edge of the valid (warped)
  content, so nuclei cut by either edge are closed. Not the paper: ``dilation`` > 0 widens the
  contours by that many px on each side (a (2r+1)-px square), the thick separation bands of
  U-Net-style baselines (docs/learning.md §10).
- Not the paper, ``targets.boundary_kind = "distance"``: the boundary channel holds
  1 - (distance to the nucleus' edge / the nucleus' largest such distance) instead of contours,
  StarDist's object probability turned upside down (docs/learning.md §12): 1 on background and
  at every nucleus' rim, 0 at its centre, so every nucleus has a core whatever its size.
- Not the paper, ``targets.boundary_kind = "hv"``: two channels, HoVer-Net's horizontal and
  vertical maps (Graham et al., Medical Image Analysis 58, 2019, §3.2): every nucleus pixel's
  offset from its nucleus' centre of mass, scaled per nucleus and side to [-1, 1]; 0 on
  background. ``hv_energy`` turns such maps into a boundary map (docs/learning.md §14).

All functions take one example (H, W) or a batch (..., H, W) and run under jit/vmap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ``targets.boundary_kind`` -> channels of the boundary target and of the boundary head.
BOUNDARY_CHANNELS = {"contour": 1, "distance": 1, "hv": 2}


def semantic_onehot(cls: jax.Array, num_classes: int) -> jax.Array:
    """(..., H, W) int labels -> (..., H, W, num_classes) float32 one-hot (C+1 with background)."""
    return jax.nn.one_hot(cls, num_classes, dtype=jnp.float32)


def _shift(x: jax.Array, dy: int, dx: int, fill=None) -> jax.Array:
    """out[i, j] = x[i + dy, j + dx] over the last two axes; beyond the image the edge is
    replicated, or ``fill`` when given."""
    h, w = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    xp = (jnp.pad(x, pad, mode="edge") if fill is None
          else jnp.pad(x, pad, constant_values=fill))
    return xp[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def boundaries(inst: jax.Array) -> jax.Array:
    """(..., H, W) labels -> (..., H, W) bool thick boundaries (find_boundaries, connectivity 1).

    skimage computes dilation != erosion with the 4-neighbour cross, ignoring pixels outside the
    image; that is "some in-image 4-neighbour differs". Edge replication makes the missing
    neighbour equal to the pixel itself, so it never counts.
    """
    out = jnp.zeros(inst.shape, bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        out = out | (_shift(inst, dy, dx) != inst)
    return out


def contacts(inst: jax.Array) -> jax.Array:
    """(..., H, W) labels -> (..., H, W) bool: nucleus pixels with a 4-neighbour in another
    nucleus, the part of the boundary target that separates touching nuclei."""
    out = jnp.zeros(inst.shape, bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        other = _shift(inst, dy, dx)
        out = out | ((other != inst) & (other > 0))
    return out & (inst > 0)


def dilate(mask: jax.Array, radius: int) -> jax.Array:
    """(..., H, W) bool -> (..., H, W) bool dilated by a (2 radius + 1)-px square; outside the
    image counts as False (``scipy.ndimage.binary_dilation`` with its default border)."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    pad = [(0, 0)] * (mask.ndim - 2) + [(radius, radius), (radius, radius)]
    return jax.lax.reduce_window(jnp.pad(mask, pad, constant_values=False), False,
                                 jax.lax.bitwise_or, (1,) * (mask.ndim - 2) + (k, k),
                                 (1,) * mask.ndim, "VALID")


def frame_band(h: int, w: int, width: int = 2) -> jax.Array:
    """(h, w) bool: True within ``width`` px of the image edge (authors' 2-px frame, §3.4)."""
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    inner = (ys >= width) & (ys < h - width) & (xs >= width) & (xs < w - width)
    return ~inner


def content_edge_band(content_mask: jax.Array, width: int = 2) -> jax.Array:
    """(..., H, W) content mask -> (..., H, W) bool: content pixels within ``width`` px
    (chessboard distance) of a non-content pixel or of the image edge.

    For an all-ones mask this is ``frame_band``; after a geometric transform it follows the
    warped content edge (the authors pass their frame through the same augmenter, §3.4).
    """
    outside = ~content_mask.astype(bool)
    k = 2 * width + 1
    pad = [(0, 0)] * (outside.ndim - 2) + [(width, width), (width, width)]
    # Outside the image counts as non-content, so the band includes the patch-edge frame.
    near = jax.lax.reduce_window(
        jnp.pad(outside, pad, constant_values=True), False, jax.lax.bitwise_or,
        (1,) * (outside.ndim - 2) + (k, k), (1,) * outside.ndim, "VALID")
    return near & ~outside


def boundary_target(inst: jax.Array, cls: jax.Array, content_mask: jax.Array | None = None,
                    frame_width: int = 2, dilation: int = 0,
                    contact_dilation: int = 0) -> jax.Array:
    """(..., H, W) inst, cls [, content_mask] -> (..., H, W) float32 boundary target in {0, 1}.

    thick boundaries (dilated by ``dilation`` px) OR the contacts between touching nuclei
    dilated by ``contact_dilation`` px (when > 0: wide bands only where nuclei touch, thin
    contours elsewhere, so thin nuclei keep a core) OR nucleus pixels (inst > 0 or cls > 0)
    within ``frame_width`` px of the patch edge OR of the edge of the valid content region
    (docs/preprocessing.md).
    """
    h, w = inst.shape[-2:]
    nucleus = (inst > 0) | (cls > 0)
    band = frame_band(h, w, frame_width) if frame_width > 0 else jnp.zeros((h, w), bool)
    if content_mask is not None and frame_width > 0:
        band = band | content_edge_band(content_mask, frame_width)
    edges = dilate(boundaries(inst), dilation)
    if contact_dilation > 0:
        edges = edges | dilate(contacts(inst), contact_dilation)
    return (edges | (band & nucleus)).astype(jnp.float32)


_EIGHT_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def inner_distance(inst: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(..., H, W) labels -> (distance, its per-nucleus maximum), both (..., H, W) int32.

    distance: chessboard distance from a nucleus pixel to the nearest pixel outside its nucleus
    (another nucleus, background, or beyond the image edge), 1 on the nucleus' rim, 0 on
    background; the number of 3 x 3 erosions of its own nucleus the pixel survives, plus one.
    Maximum: the largest distance within the pixel's 8-connected piece of its nucleus (0 on
    background; a nucleus cut in two gets one per piece), spread by repeated 3 x 3 maxima
    restricted to the nucleus. Both loops run until nothing changes.
    """
    inst = inst.astype(jnp.int32)
    nucleus = inst > 0
    # same[k]: the k-th 8-neighbour lies in this pixel's nucleus.
    same = [(_shift(inst, dy, dx, 0) == inst) & nucleus for dy, dx in _EIGHT_OFFSETS]

    def erode(state):
        alive, dist, _ = state
        nxt = alive
        for k, (dy, dx) in enumerate(_EIGHT_OFFSETS):
            nxt = nxt & same[k] & _shift(alive, dy, dx, False)
        return nxt, dist + nxt.astype(jnp.int32), jnp.any(nxt)

    _, dist, _ = jax.lax.while_loop(lambda s: s[2], erode,
                                    (nucleus, nucleus.astype(jnp.int32), jnp.any(nucleus)))

    def spread(state):
        m, _ = state
        nxt = m
        for k, (dy, dx) in enumerate(_EIGHT_OFFSETS):
            nxt = jnp.maximum(nxt, jnp.where(same[k], _shift(m, dy, dx, 0), 0))
        return nxt, jnp.any(nxt != m)

    peak, _ = jax.lax.while_loop(lambda s: s[1], spread, (dist, jnp.any(nucleus)))
    return dist, peak


def distance_target(inst: jax.Array) -> jax.Array:
    """(..., H, W) labels -> (..., H, W) float32 in [0, 1]: 1 - distance / its per-nucleus
    maximum on nuclei (``inner_distance``), 1 on background (``targets.boundary_kind =
    "distance"``). A nucleus cut by the image edge is measured to that edge."""
    dist, peak = inner_distance(inst)
    frac = dist.astype(jnp.float32) / jnp.maximum(peak, 1).astype(jnp.float32)
    return jnp.where(inst > 0, 1.0 - frac, 1.0).astype(jnp.float32)


def hv_target(inst: jax.Array) -> jax.Array:
    """(..., H, W) labels -> (..., H, W, 2) float32 horizontal and vertical maps (HoVer-Net).

    Channel 0: (column - the nucleus' centre column), divided by the largest such distance on
    the same side of the centre within the nucleus, so it runs from -1 at the nucleus' left
    extreme to +1 at its right; channel 1 the same for rows (top -1, bottom +1). Background 0.
    The centre is the mean of the nucleus' pixels in the given map (a nucleus cut by the image
    edge is centred on its visible part, as HoVer-Net does on its patches).
    """
    inst = inst.astype(jnp.int32)
    lead, (h, w) = inst.shape[:-2], inst.shape[-2:]
    flat = inst.reshape((-1, h * w))
    rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[:, None], (h, w)).reshape(-1)
    cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, :], (h, w)).reshape(-1)

    def one(labels: jax.Array) -> jax.Array:
        # Ids are arbitrary ints: make them 0..K-1 (K <= H*W, so no id is lost).
        _, seg = jnp.unique(labels, size=h * w, fill_value=-1, return_inverse=True)
        seg = seg.reshape(-1)
        count = jnp.maximum(jax.ops.segment_sum(jnp.ones_like(rows), seg, h * w), 1.0)
        maps = []
        for coord in (cols, rows):
            centre = jax.ops.segment_sum(coord, seg, h * w) / count
            d = coord - centre[seg]
            pos = jax.ops.segment_max(d, seg, h * w)[seg]
            neg = -jax.ops.segment_min(d, seg, h * w)[seg]
            scaled = jnp.where(d > 0, d / jnp.maximum(pos, 1e-6),
                               jnp.where(d < 0, d / jnp.maximum(neg, 1e-6), 0.0))
            maps.append(jnp.where(labels > 0, scaled, 0.0))
        return jnp.stack(maps, -1)

    return jax.vmap(one)(flat).reshape(lead + (h, w, 2)).astype(jnp.float32)


def hv_energy(hv: jax.Array) -> jax.Array:
    """(..., H, W, 2) horizontal and vertical maps -> (..., H, W) float32 in [0, 1], high where
    the maps fall: between touching nuclei (one nucleus' +1 meets the next one's -1) and at
    every nucleus' rim. Inside a nucleus the maps rise (offsets grow away from the centre), so
    the energy is 0 there.

    ``max(-dh/dx, -dv/dy)`` by central differences (per pixel of the map), clipped to [0, 1]:
    HoVer-Net's Sobel step (its §3.3) with a fixed scale instead of its per-image min-max
    normalisation, so that a tile's energy does not depend on what else the tile holds. A fall
    of 2 over 2 px (a sharp split) gives 1.
    """
    hv = hv.astype(jnp.float32)
    h, v = hv[..., 0], hv[..., 1]
    fall_x = (_shift(h, 0, -1) - _shift(h, 0, 1)) / 2.0
    fall_y = (_shift(v, -1, 0) - _shift(v, 1, 0)) / 2.0
    return jnp.clip(jnp.maximum(fall_x, fall_y), 0.0, 1.0)
