"""Synthetic PanNuke-format H&E patches: the project's embedded default dataset.

Real PanNuke (docs/data.md) cannot ship with the project, so ``demo``, the tests and any machine
without the download train and evaluate on patches drawn by this generative model instead. The
output has exactly PanNuke's format (§8.1): images (N, S, S, 3) float64 RGB holding integers
0..255, masks (N, S, S, 6) float64 with one instance-id map per class in channels 0..4
(Neoplastic, Inflammatory, Connective, Dead, Epithelial; ids unique within an image, not
contiguous) and the background in channel 5, and the tissue name of every patch.

The model (docs/synthetic.md):
* Tissue architecture per patch from a per-tissue table (``TISSUE_STYLES``): a cellular
  compartment (tumour nests, epithelial sheets, gland and tubule rings, hepatic/adrenal cords),
  eosinophilic fibrous stroma with wavy collagen, white space (lumina, alveoli, sinusoids,
  tears) and, in thyroid, colloid.
* Nuclei per class with a distinct morphology: star-shaped outlines (an ellipse times a few
  random harmonics), a soft edge, chromatin texture, nucleoli, a nuclear rim. Neighbours may
  overlap; the shared pixels go to the nucleus in which they lie deeper (relative to its
  radius), so touching nuclei share a border. Nuclei are cut by the patch edge.
* Rendering by Beer-Lambert: optical densities of haematoxylin and eosin, ``rgb = I0 *
  exp(-OD @ stains)``, per-patch stain vectors between Ruifrok-Johnston's and a typical
  Macenko estimate, slight optical blur and sensor noise.
Patch ``i`` depends only on ``(seed, start_index + i)`` (``np.random.default_rng([seed, i])``),
so folds can be generated in chunks, in parallel, or partly, with identical bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as sk_label

from tsfd_jax import constants
from tsfd_jax.errors import UserError

NUM_CLASSES = len(constants.PANNUKE_CLASSES)
NEO, INF, CON, DEAD, EPI = range(NUM_CLASSES)  # PanNuke mask channels
MIN_AREA = 4  # px; smaller leftovers of a nucleus (after overlaps or the patch edge) are dropped

# Stain vectors (OD per unit concentration, rows R, G, B). Ruifrok & Johnston (skimage rgb2hed)
# and a typical Macenko estimate on scanned slides, whose eosin absorbs more blue (pinker).
_H_RJ, _E_RJ = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])
_H_MAC, _E_MAC = np.array([0.5626, 0.7201, 0.4062]), np.array([0.2159, 0.8012, 0.5581])


class TissueStyle(NamedTuple):
    """Per-tissue generative parameters (documented as a table in docs/synthetic.md)."""

    props: tuple[float, float, float, float, float]  # class mix: neo, inf, con, dead, epi
    density: float     # mean nuclei per 256x256 patch
    scale: float       # nucleus size multiplier
    arch: str          # sheet | squamous | gland | cords | alveolar | stromal
    stroma_e: float    # eosin OD of collagen
    cyto_e: float      # eosin OD of cytoplasm in the cellular compartment
    cyto_h: float      # haematoxylin OD of cytoplasm (amphophilia)
    white: float       # fraction of white space (lumina, fat, tears) outside glands
    fibre: float       # collagen fibre contrast 0..1


#                   neo   inf   con   dead  epi  dens scale arch         strE  cytE  cytH  white fibre
TISSUE_STYLES: dict[str, TissueStyle] = {k: TissueStyle(tuple(v[:5]), *v[5:]) for k, v in {
    "Adrenal_gland": (0.46, 0.05, 0.20, 0.01, 0.28, 28, 1.10, "cords",    0.32, 0.15, 0.10, 0.06, 0.40),
    "Bile-duct":     (0.36, 0.12, 0.32, 0.01, 0.19, 24, 1.00, "gland",    0.39, 0.21, 0.08, 0.08, 0.70),
    "Bladder":       (0.52, 0.14, 0.28, 0.02, 0.04, 14, 1.00, "sheet",    0.35, 0.24, 0.10, 0.12, 0.60),
    "Breast":        (0.58, 0.14, 0.24, 0.02, 0.02, 32, 1.05, "sheet",    0.49, 0.21, 0.12, 0.06, 0.80),
    "Cervix":        (0.40, 0.20, 0.20, 0.01, 0.19, 26, 0.95, "squamous", 0.39, 0.29, 0.06, 0.06, 0.60),
    "Colon":         (0.46, 0.18, 0.16, 0.02, 0.18, 34, 1.00, "gland",    0.35, 0.21, 0.12, 0.05, 0.50),
    "Esophagus":     (0.28, 0.14, 0.26, 0.01, 0.31, 24, 0.95, "squamous", 0.42, 0.34, 0.05, 0.05, 0.70),
    "HeadNeck":      (0.46, 0.24, 0.20, 0.02, 0.08, 28, 1.05, "squamous", 0.39, 0.32, 0.07, 0.05, 0.60),
    "Kidney":        (0.40, 0.10, 0.18, 0.01, 0.31, 24, 0.95, "gland",    0.32, 0.32, 0.05, 0.08, 0.40),
    "Liver":         (0.42, 0.10, 0.13, 0.01, 0.34, 26, 1.10, "cords",    0.35, 0.35, 0.06, 0.06, 0.40),
    "Lung":          (0.40, 0.24, 0.28, 0.03, 0.05, 20, 1.00, "alveolar", 0.35, 0.21, 0.08, 0.40, 0.50),
    "Ovarian":       (0.44, 0.07, 0.42, 0.01, 0.06, 30, 0.95, "stromal",  0.32, 0.20, 0.10, 0.04, 0.60),
    "Pancreatic":    (0.36, 0.11, 0.25, 0.01, 0.27, 26, 0.95, "gland",    0.39, 0.27, 0.14, 0.06, 0.60),
    "Prostate":      (0.36, 0.09, 0.28, 0.01, 0.26, 24, 0.95, "gland",    0.42, 0.20, 0.06, 0.10, 0.60),
    "Skin":          (0.34, 0.26, 0.26, 0.01, 0.13, 22, 0.95, "squamous", 0.49, 0.32, 0.06, 0.06, 0.80),
    "Stomach":       (0.42, 0.21, 0.18, 0.02, 0.17, 28, 1.00, "gland",    0.35, 0.22, 0.10, 0.06, 0.50),
    "Testis":        (0.45, 0.05, 0.34, 0.02, 0.14, 26, 1.05, "gland",    0.32, 0.21, 0.12, 0.06, 0.50),
    "Thyroid":       (0.40, 0.08, 0.21, 0.01, 0.30, 22, 0.95, "gland",    0.35, 0.24, 0.08, 0.04, 0.50),
    "Uterus":        (0.34, 0.12, 0.46, 0.01, 0.07, 28, 0.90, "stromal",  0.42, 0.21, 0.08, 0.05, 0.70),
}.items()}


# ------------------------------------------------------------------------------------------
# Random fields
# ------------------------------------------------------------------------------------------

def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """White noise, uniform in [-0.5, 0.5): 4x cheaper than normal draws and Gaussian anyway
    once filtered (central limit)."""
    return rng.random(shape, np.float32) - np.float32(0.5)


def _smooth(rng: np.random.Generator, size: int, sigma: float, n: int = 1) -> np.ndarray:
    """(n, size, size) smooth Gaussian noise, unit std, correlation length ``sigma`` px.

    Filtered on a grid ``sigma/3`` coarser and interpolated bilinearly: the same look as a
    full-resolution Gaussian filter at a fraction of the cost.
    """
    step = max(1, int(sigma // 3))
    pad = int(np.ceil(2 * sigma / step)) + 1
    coarse = int(np.ceil(size / step)) + 2 * pad + 2
    z = ndi.gaussian_filter(rng.standard_normal((n, coarse, coarse), np.float32),
                            (0, sigma / step, sigma / step), mode="reflect")
    pos = pad + (np.arange(size) + 0.5) / step
    i0 = np.floor(pos).astype(int)
    w = (pos - i0).astype(np.float32)
    z = z[:, i0, :] * (1 - w)[:, None] + z[:, i0 + 1, :] * w[:, None]   # rows (no BLAS:
    f = z[:, :, i0] * (1 - w) + z[:, :, i0 + 1] * w                      # cheap, thread-free)
    f -= f.mean(axis=(1, 2), keepdims=True)
    return f / (f.std(axis=(1, 2), keepdims=True) + 1e-6)


def _fine(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """(size, size) fine noise (chromatin, granules), unit std."""
    f = _noise(rng, (size, size))
    if sigma < 2:
        f = ndi.gaussian_filter(f, sigma)
    else:   # two box passes approximate the Gaussian at a cost independent of sigma
        k = _box(sigma)
        f = ndi.uniform_filter(ndi.uniform_filter(f, k), k)
    return f / (f.std() + 1e-6)


def _box(sigma: float) -> int:
    """Box width whose two-fold repetition has standard deviation ``sigma``."""
    return max(1, int(round(np.sqrt(6 * sigma * sigma + 1))))


def _fibres(rng: np.random.Generator, size: int, theta: float, warp: np.ndarray) -> np.ndarray:
    """(size, size) wavy collagen: bundles and fibrils along ``theta``, bent by ``warp`` (px).

    The source field is streaked along its rows; image pixel (y, x) reads the source at
    row = y' + warp, col = x' with (x', y') the pixel rotated by -theta about the centre.
    Fibrils are a finer filtering of the same noise, so they run inside the bundles.
    """
    c, s = np.cos(theta), np.sin(theta)
    extent = size * (abs(c) + abs(s)) + 4
    shape = (int(extent + 2 * np.abs(warp).max()) + 2, int(extent) + 2)
    z = _noise(rng, shape)
    out = []
    bundle = (int(rng.integers(21, 33)), rng.uniform(2.0, 3.5))   # (length, width) of the streaks
    fibril = (int(rng.integers(9, 17)), 0.8)
    for length, across in (bundle, fibril):
        f = z
        for axis, width in ((1, length), (0, _box(across))):
            f = ndi.uniform_filter1d(ndi.uniform_filter1d(f, width, axis=axis), width, axis=axis)
        out.append(f / (f.std() + 1e-6))
    z = out[0] + 0.5 * out[1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - size / 2
    rows = shape[0] / 2 - s * xx + c * yy + warp
    cols = shape[1] / 2 + c * xx + s * yy
    f = ndi.map_coordinates(z, [rows, cols], order=1, prefilter=False)
    return f / (f.std() + 1e-6)


def _quantile_mask(field: np.ndarray, frac: float, soft: float = 0.12) -> np.ndarray:
    """Soft mask of the ``frac`` highest values of a smooth unit-std field."""
    if frac <= 0:
        return np.zeros_like(field)
    thr = np.quantile(field[::4, ::4], 1 - min(frac, 1.0))
    return np.clip((field - thr) / soft + 0.5, 0, 1)


# ------------------------------------------------------------------------------------------
# Nuclei
# ------------------------------------------------------------------------------------------

class _Nuclei(NamedTuple):
    """Shape and appearance of n nuclei of one class (arrays of length n)."""

    a: np.ndarray        # semi-axis along the orientation (px)
    b: np.ndarray        # other semi-axis (px)
    harm: np.ndarray     # (n, 3) amplitudes of harmonics 2, 3, 5 of the outline
    phase: np.ndarray    # (n, 3)
    bend: np.ndarray     # curvature of the long axis (spindles)
    dens: np.ndarray     # haematoxylin OD scale
    interior: np.ndarray # OD of the nucleoplasm relative to dens
    rim: np.ndarray      # extra OD at the nuclear membrane
    chrom: np.ndarray    # chromatin texture amplitude
    nucleoli: np.ndarray # number of nucleoli (0..2)
    soft: np.ndarray     # edge blur (px)


def _sample_nuclei(rng: np.random.Generator, cls: int, n: int, scale: float,
                   grade: float) -> _Nuclei:
    """Morphology per class; ``grade`` in [0, 1] raises neoplastic size and atypia."""
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    harm = rng.uniform(0, 1, (n, 3)) * np.array([1.0, 0.6, 0.3])
    phase = rng.uniform(0, 2 * np.pi, (n, 3))
    zeros = np.zeros(n)
    if cls == NEO:      # large, pale, irregular, vesicular, nucleoli, coarse chromatin
        a = u(10, 15) * (1 + 0.35 * grade) * np.exp(rng.normal(0, 0.12, n))
        b = a * u(0.6, 0.95)
        harm = harm * (0.06 + 0.10 * grade)
        vesic = rng.random(n) < 0.75          # some tumours are hyperchromatic instead
        interior = np.where(vesic, u(0.35, 0.6), u(0.8, 1.0))
        rim = np.where(vesic, u(0.4, 0.7), 0.15)
        return _Nuclei(a, b, harm, phase, zeros, u(1.0, 1.5), interior, rim, u(0.45, 0.65),
                       rng.choice(3, n, p=[0.2, 0.55, 0.25]) * vesic, u(0.8, 1.3))
    if cls == INF:      # small, round, dark, dense
        a = u(6.0, 8.0)
        return _Nuclei(a, a * u(0.85, 1.0), harm * 0.03, phase, zeros, u(1.7, 2.3), u(0.9, 1.0),
                       u(0.0, 0.1), u(0.08, 0.15), zeros.astype(int), u(0.5, 0.8))
    if cls == CON:      # elongated spindles, slightly bent, fairly dark
        a = u(12, 21)
        return _Nuclei(a, u(3.0, 4.4), harm * 0.08, phase, rng.normal(0, 0.004, n), u(1.0, 1.6),
                       u(0.8, 1.0), u(0.0, 0.15), u(0.25, 0.4), zeros.astype(int), u(0.8, 1.1))
    if cls == DEAD:     # pyknotic / karyorrhectic: tiny, very dark, lobulated
        a = u(3.0, 5.0)
        return _Nuclei(a, a * u(0.7, 1.0), harm * u(0.1, 0.35)[:, None], phase, zeros, u(2.3, 3.0),
                       np.ones(n), zeros, u(0.03, 0.08), zeros.astype(int), u(0.4, 0.6))
    a = u(8.0, 11.0)    # epithelial: medium, round-oval, regular, fine chromatin
    return _Nuclei(a, a * u(0.65, 0.9), harm * 0.03, phase, zeros, u(1.0, 1.3), u(0.6, 0.8),
                   u(0.15, 0.3), u(0.25, 0.4), (rng.random(n) < 0.2).astype(int), u(0.7, 1.0))


def _draw_nucleus(h: np.ndarray, e: np.ndarray, score: np.ndarray, inst: np.ndarray,
                  chrom: np.ndarray, x: float, y: float, angle: float, nuc: _Nuclei, i: int,
                  nid: int, halo: bool, rng: np.random.Generator) -> None:
    """Paint nucleus ``i`` of ``nuc`` into the OD maps and claim its pixels in ``inst``."""
    size = h.shape[0]
    a, b = nuc.a[i], nuc.b[i]
    reach = a * (1 + nuc.harm[i].sum()) * (1.9 if halo else 1.0) + 3
    x0, x1 = max(int(x - reach), 0), min(int(x + reach) + 2, size)
    y0, y1 = max(int(y - reach), 0), min(int(y + reach) + 2, size)
    if x0 >= x1 or y0 >= y1:
        return
    yy = (np.arange(y0, y1, dtype=np.float32) - y)[:, None]
    xx = (np.arange(x0, x1, dtype=np.float32) - x)[None, :]
    c, s = np.cos(angle), np.sin(angle)
    uu = xx * c + yy * s
    vv = -xx * s + yy * c - nuc.bend[i] * uu * uu
    rho = np.hypot(uu, vv) + 1e-4
    t = np.arctan2(vv, uu)
    rad = a * b / np.hypot(b * uu / rho, a * vv / rho)
    p, q = nuc.harm[i], nuc.phase[i]
    rad = rad * (1 + p[0] * np.cos(2 * t + q[0]) + p[1] * np.cos(3 * t + q[1])
                 + p[2] * np.cos(5 * t + q[2]))
    depth = rad - rho                              # px inside the outline (radially)
    alpha = np.clip(0.5 + depth / (2 * nuc.soft[i]), 0, 1)
    od = nuc.interior[i] + nuc.rim[i] * np.exp(-np.maximum(depth, 0) / 1.6)
    od = nuc.dens[i] * od * np.maximum(1 + nuc.chrom[i] * chrom[y0:y1, x0:x1], 0.2)
    eo = None
    for _ in range(nuc.nucleoli[i]):               # nucleoli: dark, amphophilic dots
        r = rng.uniform(0, 0.45) * b
        ang = rng.uniform(0, 2 * np.pi)
        sig = rng.uniform(1.0, 1.7)
        dot = np.exp(-((uu - r * np.cos(ang)) ** 2 + (vv - r * np.sin(ang)) ** 2) / (2 * sig * sig))
        od = od + 1.1 * dot
        eo = 0.5 * dot if eo is None else eo + 0.5 * dot
    hb = h[y0:y1, x0:x1]
    np.maximum(hb, alpha * od, out=hb)
    if eo is not None:
        e[y0:y1, x0:x1] += alpha * eo
    if halo:                                       # apoptotic body: hypereosinophilic cytoplasm
        e[y0:y1, x0:x1] += 0.35 * np.clip(0.5 + (1.8 * rad - rho) / 2.0, 0, 1)
    rel = depth / rad
    sb, ib = score[y0:y1, x0:x1], inst[y0:y1, x0:x1]
    win = (depth > 0) & (rel > sb)
    sb[win] = rel[win]
    ib[win] = nid


def _candidates(rng: np.random.Generator, density: np.ndarray, n: int, margin: float) -> np.ndarray:
    """(n, 2) points (x, y) drawn from a density map; the domain extends ``margin`` px past the
    patch edge so that nuclei cut by the edge occur."""
    size = density.shape[0]
    sub = density[2::4, 2::4]
    d = sub.ravel().astype(np.float64)
    if n == 0 or d.sum() <= 0:
        return np.zeros((0, 2))
    idx = rng.choice(d.size, size=n, p=d / d.sum())
    g = sub.shape[1]
    pts = np.stack([idx % g, idx // g], 1) * 4.0 + rng.uniform(0, 4, (n, 2))
    return pts * (size + 2 * margin) / size - margin


# ------------------------------------------------------------------------------------------
# One patch
# ------------------------------------------------------------------------------------------

def _stain_matrix(rng: np.random.Generator) -> np.ndarray:
    """(2, 3) haematoxylin and eosin OD vectors of one patch (rows normalised)."""
    t = rng.uniform(0.2, 1.0)
    m = np.stack([(1 - t) * _H_RJ + t * _H_MAC, (1 - t) * _E_RJ + t * _E_MAC])
    m = np.abs(m + rng.normal(0, 0.03, m.shape))
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def _glands(rng: np.random.Generator, size: int, count: int, small: bool
            ) -> list[tuple[float, float, float, float, float, float]]:
    """Non-overlapping glands (cx, cy, lumen semi-axes la, lb, angle, epithelium thickness)."""
    out: list[tuple[float, float, float, float, float, float]] = []
    for _ in range(8 * count):
        if len(out) == count:
            break
        la = rng.uniform(5, 14) if small else rng.uniform(9, 32)
        lb = la * rng.uniform(0.5, 1.0)
        th = rng.uniform(16, 28)
        cx, cy = rng.uniform(-0.15, 1.15, 2) * size
        outer = la + th
        if all(np.hypot(cx - g[0], cy - g[1]) > 0.95 * (outer + g[2] + g[5]) for g in out):
            out.append((cx, cy, la, lb, rng.uniform(0, np.pi), th))
    return out


class _Fields(NamedTuple):
    """Random fields of one patch, all (S, S) float32 with unit std."""

    low: np.ndarray      # (4, S, S) scale 22 px: compartments, white space, clusters/haze, walls
    warp: np.ndarray     # collagen waviness (px, not normalised)
    theta: float         # mean collagen direction
    fib: np.ndarray      # collagen bundles and fibrils
    mid: np.ndarray      # 3 px mottling
    gran: np.ndarray     # 1.2 px granularity of stroma and cytoplasm
    chrom: np.ndarray    # 1 px chromatin texture


def _fields(rng: np.random.Generator, size: int) -> _Fields:
    low = _smooth(rng, size, 22.0, 4)
    warp = _smooth(rng, size, 40.0, 1)[0] * rng.uniform(6, 20)
    theta = rng.uniform(0, np.pi)
    fib = _fibres(rng, size, theta, warp)
    return _Fields(low, warp, theta, fib, _fine(rng, size, 3.0), _fine(rng, size, 1.2),
                   _fine(rng, size, 1.0))


class _Layout(NamedTuple):
    """Tissue compartments of one patch (soft masks in [0, 1], (S, S) float32) and the gland
    linings (x, y, orientation) per class."""

    cell: np.ndarray      # epithelial / tumour cells (nests, sheets, gland walls, cords)
    lumen: np.ndarray     # white space
    colloid: np.ndarray   # thyroid follicle content
    rings: dict[int, list[tuple[float, float, float]]]


def _layout(rng: np.random.Generator, st: TissueStyle, tissue: str, f: _Fields, counts: np.ndarray,
            props: np.ndarray, scale: float, grade: float) -> _Layout:
    """Compartments sized by the nuclei they hold; glands lined with NEO or EPI nuclei."""
    S = f.mid.shape[0]
    area = (S / 256.0) ** 2
    low = f.low
    # the cellular compartment is as large as its nuclei and their cytoplasm need
    reach = {"sheet": 1.35, "squamous": 2.1, "cords": 1.9}.get(st.arch, 1.4) * rng.uniform(0.85, 1.15)
    r_neo, r_epi = 12.5 * scale * (1 + 0.35 * grade), 9.5 * scale

    def cell_frac(n_neo: float, n_epi: float) -> float:
        return min(0.95, np.pi * reach ** 2 * (n_neo * r_neo ** 2 + n_epi * r_epi ** 2) / S ** 2)

    cell = np.zeros((S, S), np.float32)
    lumen = np.zeros((S, S), np.float32)
    colloid = np.zeros((S, S), np.float32)
    rings: dict[int, list[tuple[float, float, float]]] = {NEO: [], EPI: []}
    if st.arch == "gland":
        small = tissue in ("Kidney", "Testis", "Thyroid") and rng.random() < 0.7
        count = max(int(area > 0.5), int(rng.poisson((4.0 if small else 2.5) * area)))
        # as many glands as their nuclei allow (none in a patch drawn empty)
        budget = 1.3 * (counts[NEO] + counts[EPI]) + 12 * (counts.sum() > 0)
        for cx, cy, la, lb, ang, th in _glands(rng, S, count, small):
            # tumour glands: crowded, stratified, irregular; benign: one regular basal row
            kind = NEO if rng.random() < props[NEO] / max(props[NEO] + props[EPI], 1e-6) else EPI
            pts = _gland_lining(rng, S, cx, cy, la, lb, ang, th, kind, scale)
            if len(pts) > budget:
                continue
            budget -= len(pts)
            rings[kind] += pts
            _paint_gland(colloid if tissue == "Thyroid" else lumen, cell, cx, cy, la, lb, ang, th)
        solid = cell_frac(max(counts[NEO] - len(rings[NEO]), 0), max(counts[EPI] - len(rings[EPI]), 0))
        cell = np.maximum(cell, _quantile_mask(low[0], solid))
    else:
        cell = _quantile_mask(low[0], cell_frac(counts[NEO], counts[EPI]))
        if st.arch == "cords":       # sinusoids: zero crossings of a smooth field, thin channels
            lumen = np.clip(1.5 - np.abs(low[3]) / 0.12, 0, 1) * rng.uniform(0.3, 0.6)
        elif st.arch == "alveolar":  # thin walls around air spaces
            lumen = 1 - np.clip(1.3 - np.abs(low[3]) / 0.6, 0, 1)
    holes = _quantile_mask(low[1] + 0.3 * f.mid, st.white * rng.uniform(0.2, 1.5), 0.3)  # ragged tears
    lumen = np.maximum(lumen, holes * (1 - cell)).astype(np.float32)
    return _Layout(cell, lumen, colloid, rings)


def _gland_lining(rng: np.random.Generator, S: int, cx: float, cy: float, la: float, lb: float,
                  ang: float, th: float, kind: int, scale: float) -> list[tuple[float, float, float]]:
    """Nuclei (x, y, orientation across the wall) along the wall of one gland, inside the patch."""
    c, s = np.cos(ang), np.sin(ang)
    rbar = 0.5 * (la + lb)
    layers = (0.7,) if kind == EPI else (0.55, 0.8)[: 1 + int(rng.random() < 0.3)]
    step = (9.0 if kind == EPI else 11.0) * scale
    pts = []
    ts = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    for depth in layers:
        rn = 1 + depth * th / rbar
        px, py = la * rn * np.cos(ts), lb * rn * np.sin(ts)
        arc = np.concatenate([[0], np.cumsum(np.hypot(np.diff(px), np.diff(py)))])
        for k in np.searchsorted(arc, np.arange(rng.uniform(0, step), arc[-1], step)):
            jit = 1 + rng.normal(0, 0.02 if kind == EPI else 0.08)
            gx, gy = px[k] * jit, py[k] * jit
            x, y = cx + gx * c - gy * s, cy + gx * s + gy * c
            if -8 < x < S + 8 and -8 < y < S + 8:
                pts.append((x, y, ang + np.arctan2(gy * la * la, gx * lb * lb)))
    return pts


def _paint_gland(lumen: np.ndarray, cell: np.ndarray, cx: float, cy: float, la: float, lb: float,
                 ang: float, th: float) -> None:
    """Elliptic lumen (into ``lumen``) and its epithelial wall of thickness ``th`` (into ``cell``)."""
    S = cell.shape[0]
    c, s = np.cos(ang), np.sin(ang)
    rbar = 0.5 * (la + lb)
    r = int(la + th + 4)
    x0, x1, y0, y1 = max(int(cx) - r, 0), min(int(cx) + r, S), max(int(cy) - r, 0), min(int(cy) + r, S)
    if x0 >= x1 or y0 >= y1:
        return
    gy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
    gx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
    q = np.hypot((gx * c + gy * s) / la, (-gx * s + gy * c) / lb)
    inner = np.clip((1 - q) * rbar / 1.5 + 0.5, 0, 1)
    np.maximum(lumen[y0:y1, x0:x1], inner, out=lumen[y0:y1, x0:x1])
    wall = np.clip((1 + th / rbar - q) * rbar / 1.5 + 0.5, 0, 1) * (1 - inner)
    np.maximum(cell[y0:y1, x0:x1], wall, out=cell[y0:y1, x0:x1])


_Placed = tuple[int, float, float, float, int]   # class, x, y, orientation, shape index

# Minimum centre distance, as a multiple of the summed mean radii (< 1: overlapping neighbours).
_SPACING = {NEO: 0.78, INF: 0.92, CON: 0.9, DEAD: 1.2, EPI: 0.9}
_SPACING_ARCH = {"squamous": (1.5, 1.7), "cords": (1.4, 1.6)}  # NEO, EPI: cytoplasm between


def _place(rng: np.random.Generator, st: TissueStyle, f: _Fields, lay: _Layout, counts: np.ndarray,
           scale: float, grade: float) -> tuple[list[_Placed], dict[int, _Nuclei]]:
    """Greedy placement with a minimum centre distance: gland linings first, then candidates
    drawn from each class's density map. Returns (class, x, y, orientation, shape index) per
    nucleus and the sampled shapes per class."""
    S = f.mid.shape[0]
    low = f.low
    tissue_m = 1 - np.maximum(lay.lumen, lay.colloid)
    stroma = tissue_m * (1 - lay.cell)
    spacing = dict(_SPACING)
    if st.arch in _SPACING_ARCH:
        spacing[NEO], spacing[EPI] = _SPACING_ARCH[st.arch]
    cluster = np.exp(1.2 * low[2])                # inflammatory aggregates
    dens_maps = {NEO: lay.cell * tissue_m, EPI: lay.cell * tissue_m, CON: stroma,
                 INF: (stroma + 0.25 * lay.cell * tissue_m) * cluster, DEAD: tissue_m * (0.3 + lay.cell)}
    cap = int(counts.sum()) + sum(map(len, lay.rings.values())) + 8
    px, py, pr, pf = (np.zeros(cap) for _ in range(4))
    placed: list[_Placed] = []
    shapes: dict[int, _Nuclei] = {}
    for cls in (NEO, EPI, INF, CON, DEAD):
        ring = lay.rings.get(cls, [])
        n_c = max(int(counts[cls]), len(ring))   # accepted glands are lined completely
        if n_c == 0:
            continue
        pts = _candidates(rng, dens_maps[cls], 5 * n_c + 20, 8.0)
        angles = rng.uniform(0, np.pi, len(pts))
        if cls == CON:   # spindles follow the local fibre direction (normal of the warped rows)
            ix = np.clip(pts[:, 0].astype(int), 1, S - 2)
            iy = np.clip(pts[:, 1].astype(int), 1, S - 2)
            if st.arch == "alveolar":   # along the alveolar walls (level lines of low[3])
                gx = low[3][iy, ix + 1] - low[3][iy, ix - 1]
                gy = low[3][iy + 1, ix] - low[3][iy - 1, ix]
            else:
                gx = -np.sin(f.theta) + 0.5 * (f.warp[iy, ix + 1] - f.warp[iy, ix - 1])
                gy = np.cos(f.theta) + 0.5 * (f.warp[iy + 1, ix] - f.warp[iy - 1, ix])
            angles = np.arctan2(-gx, gy) + rng.normal(0, 0.12, len(pts))
        cand = list(ring) + list(zip(pts[:, 0], pts[:, 1], angles))
        nuc = _sample_nuclei(rng, cls, len(cand), scale, grade)
        nuc = nuc._replace(a=nuc.a * scale, b=nuc.b * scale)
        shapes[cls] = nuc
        if ring:   # lining nuclei are elongated across the gland wall (columnar cells)
            k = len(ring)
            nuc.b[:k] = nuc.a[:k] * rng.uniform(0.45, 0.65 if cls == EPI else 0.8, k)
        got = 0
        for i, (x, y, t) in enumerate(cand):
            if got == n_c:
                break
            r = 0.5 * (nuc.a[i] + nuc.b[i])
            m = len(placed)
            if m and np.any(np.hypot(px[:m] - x, py[:m] - y)
                            < np.minimum(pf[:m], spacing[cls]) * (pr[:m] + r)):
                continue
            px[m], py[m], pr[m], pf[m] = x, y, r, spacing[cls]
            placed.append((cls, x, y, t, i))
            got += 1
    return placed, shapes


def _background(rng: np.random.Generator, st: TissueStyle, tissue: str, f: _Fields, lay: _Layout,
                placed: list[_Placed]) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin OD (S, S) of everything but the nuclei: collagen, cytoplasm with
    cell borders, lumina, colloid, haze and out-of-focus nuclei."""
    S = f.mid.shape[0]
    tissue_m = 1 - np.maximum(lay.lumen, lay.colloid)
    stroma = tissue_m * (1 - lay.cell)
    mid, gran = f.mid, f.gran
    bundles = np.clip(0.5 + 0.4 * f.fib + 0.15 * mid, 0, 1.4)   # 0 in the pale gaps
    fibre = st.fibre * rng.uniform(0.4, 1.0)
    e_str = st.stroma_e * rng.uniform(0.7, 1.3) * (1 + 0.3 * gran) * (
        (1 - fibre) * (0.85 + 0.12 * mid) + fibre * (0.2 + 0.9 * bundles))
    e_cyt = st.cyto_e * rng.uniform(0.75, 1.25) * (1 + 0.25 * gran + 0.15 * mid) * (1 + 0.1 * f.low[3])
    if tissue == "Adrenal_gland":   # clear, vacuolated cortical cytoplasm
        e_cyt = e_cyt * np.clip(0.7 + 0.6 * _fine(rng, S, 2.0), 0.1, 1.5)
    # cell borders: edges of the Voronoi tessellation of the epithelial / tumour nuclei
    seeds = [(int(y), int(x)) for c, x, y, *_ in placed if c in (NEO, EPI) and 0 <= x < S and 0 <= y < S]
    if len(seeds) > 1:
        free = np.ones((S, S), bool)
        free[tuple(np.array(seeds).T)] = False
        iy, ix = ndi.distance_transform_edt(free, return_distances=False, return_indices=True)
        owner = iy * S + ix
        border = np.zeros((S, S), np.float32)
        border[:, 1:] += owner[:, 1:] != owner[:, :-1]
        border[1:, :] += owner[1:, :] != owner[:-1, :]
        e_cyt = e_cyt + rng.uniform(0.08, 0.25) * np.minimum(border, 1)
    haze = rng.uniform(0.07, 0.18) * (1 + 0.35 * mid + 0.2 * f.low[2])
    e = (stroma * e_str + lay.cell * tissue_m * e_cyt + lay.lumen * rng.uniform(0.0, 0.06)
         + lay.colloid * rng.uniform(0.45, 0.8) * (1 + 0.05 * gran)).astype(np.float32)
    h = (tissue_m * (haze + lay.cell * st.cyto_h * (1 + 0.3 * gran))).astype(np.float32)
    # out-of-focus nuclei of other planes: faint, blurred, unlabelled (as in PanNuke)
    area = (S / 256.0) ** 2
    for gx, gy, amp, sig in rng.uniform([0, 0, 0.2, 3], [S, S, 0.45, 5], (rng.poisson(6 * area), 4)):
        x0, y0 = max(int(gx - 3 * sig), 0), max(int(gy - 3 * sig), 0)
        x1, y1 = min(int(gx + 3 * sig) + 1, S), min(int(gy + 3 * sig) + 1, S)
        blob = np.exp(-((np.arange(y0, y1)[:, None] - gy) ** 2 + (np.arange(x0, x1) - gx) ** 2)
                      / (2 * sig * sig))
        h[y0:y1, x0:x1] += (amp * tissue_m[y0:y1, x0:x1] * blob).astype(np.float32)
    # red blood cells (a vessel or a haemorrhage): strongly eosinophilic discs with a pale
    # centre, unlabelled, as in PanNuke
    if rng.random() < 0.35:
        cx, cy = rng.uniform(0, S, 2)
        spread = rng.uniform(6, 22)
        for x, y, r in zip(*rng.normal([cx, cy, 0], [spread, spread, 1], (rng.integers(3, 25), 3)).T):
            r = 5.0 + 0.6 * r
            x0, y0 = max(int(x - r - 2), 0), max(int(y - r - 2), 0)
            x1, y1 = min(int(x + r + 3), S), min(int(y + r + 3), S)
            if x0 >= x1 or y0 >= y1:
                continue
            d = np.hypot(np.arange(y0, y1)[:, None] - y, np.arange(x0, x1) - x)
            disc = np.clip(r - d + 0.5, 0, 1) * (1 - 0.35 * np.exp(-(d / (0.45 * r)) ** 2))
            eb = e[y0:y1, x0:x1]
            np.maximum(eb, (rng.uniform(0.8, 1.2) * disc).astype(np.float32), out=eb)
    return h, e


def _one_piece(inst: np.ndarray) -> None:
    """Keep, in place, the largest 4-connected piece of every instance if it has at least
    MIN_AREA px (overlaps and the patch edge can leave slivers)."""
    pieces = sk_label(inst, background=0, connectivity=1)
    owner = np.zeros(pieces.max() + 1, np.int32)
    owner[pieces.ravel()] = inst.ravel()
    sizes = np.bincount(pieces.ravel(), minlength=owner.size)
    order = np.lexsort((-sizes, owner))
    keep = np.zeros(owner.size, bool)
    keep[order[np.r_[True, owner[order][1:] != owner[order][:-1]]]] = True
    keep &= (sizes >= MIN_AREA) & (owner > 0)
    inst[~keep[pieces]] = 0


def _render(rng: np.random.Generator, h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Beer-Lambert: RGB uint8 (S, S, 3) = I0 exp(-(h, e) @ stains), optical blur, sensor noise."""
    stains = _stain_matrix(rng)
    h = h * rng.uniform(0.8, 1.3)    # per-patch stain strength
    e = e * rng.uniform(0.7, 1.35)
    od = h[..., None] * stains[0] + e[..., None] * stains[1]
    white = rng.uniform(232, 250) + rng.normal(0, 2.5, 3)
    rgb = (white * np.exp(-od)).astype(np.float32)
    rgb = ndi.gaussian_filter(rgb, (rng.uniform(0.5, 0.9),) * 2 + (0,), truncate=3.0)
    rgb += 5.2 * _noise(rng, rgb.shape)   # sensor noise, std 1.5
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _patch(seed: int, index: int, size: int, tissues: Sequence[str]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """One patch: RGB uint8 (S,S,3), instance map int32 (S,S) with ids 1..n (internal order),
    class of every internal id int8 (n+1,) (index 0 unused), tissue name."""
    rng = np.random.default_rng([seed, index])
    tissue = tissues[int(rng.integers(len(tissues)))]
    st = TISSUE_STYLES[tissue]
    area = (size / 256.0) ** 2
    # class mix around the tissue's (Dirichlet: patches differ), counts, size, atypia
    props = rng.dirichlet(np.asarray(st.props) * 6 + 0.05)
    empty = rng.random() < 0.03
    n_total = 0 if empty else rng.poisson(st.density * area * np.exp(rng.normal(0, 0.5)))
    counts = rng.multinomial(min(n_total, int(90 * area) + 1), props)
    scale = st.scale * rng.uniform(0.92, 1.08)
    grade = rng.uniform(0, 1)

    f = _fields(rng, size)
    lay = _layout(rng, st, tissue, f, counts, props, scale, grade)
    placed, shapes = _place(rng, st, f, lay, counts, scale, grade)
    h, e = _background(rng, st, tissue, f, lay, placed)
    hn = np.zeros((size, size), np.float32)
    score = np.zeros((size, size), np.float32)
    inst = np.zeros((size, size), np.int32)
    cls_of = np.zeros(len(placed) + 1, np.int8)
    for nid, (cls, x, y, t, i) in enumerate(placed, start=1):
        _draw_nucleus(hn, e, score, inst, f.chrom, x, y, t, shapes[cls], i, nid, cls == DEAD, rng)
        cls_of[nid] = cls
    h = np.maximum(h, hn) + 0.15 * hn * (h > hn)  # nucleus over cytoplasm: a little extra OD
    if placed:
        _one_piece(inst)
    return _render(rng, h, e), inst, cls_of, tissue


def _to_pannuke(inst: np.ndarray, cls_of: np.ndarray, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Internal instance map -> PanNuke mask written into zeroed ``out`` (S,S,6) float64;
    returns the nuclei per class (5,)."""
    present = np.bincount(inst.ravel(), minlength=cls_of.size) > 0
    present[0] = False
    counts = np.bincount(cls_of[present], minlength=NUM_CLASSES)
    flat = inst.ravel()
    fg = np.flatnonzero(flat)
    pix = out.reshape(-1, NUM_CLASSES + 1)
    pix[:, NUM_CLASSES] = flat == 0
    pix[fg, cls_of[flat[fg]]] = np.concatenate([[0.0], ids])[flat[fg]]   # one scatter
    return counts


def _one(seed: int, index: int, size: int, tissues: Sequence[str], image_out: np.ndarray,
         mask_out: np.ndarray) -> tuple[str, np.ndarray]:
    """Patch ``index`` of stream ``seed`` written into zeroed outputs; (tissue, nuclei per class)."""
    rgb, inst, cls_of, tissue = _patch(seed, index, size, tissues)
    image_out[...] = rgb
    # Ids like PanNuke's: unique in the patch, not contiguous (own stream: shape-independent).
    n = cls_of.size - 1
    ids = np.random.default_rng([seed, index, 1]).choice(np.arange(1, 4 * n + 200), n, replace=False)
    return tissue, _to_pannuke(inst, cls_of, ids, mask_out)


def _check_tissues(tissues: Sequence[str]) -> tuple[str, ...]:
    tissues = tuple(tissues)
    unknown = [t for t in tissues if t not in TISSUE_STYLES]
    if not tissues or unknown:
        raise ValueError(f"unknown tissue names {unknown}; expected some of {', '.join(TISSUE_STYLES)}")
    return tissues


def generate(num_images: int, seed: int, image_size: int = 256,
             tissues: Sequence[str] = constants.PANNUKE_TISSUES, start_index: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic PanNuke patches ``start_index .. start_index + num_images - 1`` of stream ``seed``.

    Returns images (N, S, S, 3) float64 RGB with integer values 0..255, masks (N, S, S, 6)
    float64 (channels 0..4 instance ids per class, 5 background) and types (N,) tissue names
    (numpy unicode). The tissue of each patch is drawn uniformly from ``tissues``.
    """
    tissues = _check_tissues(tissues)
    images = np.zeros((num_images, image_size, image_size, 3), np.float64)
    masks = np.zeros((num_images, image_size, image_size, NUM_CLASSES + 1), np.float64)
    types = [_one(seed, start_index + k, image_size, tissues, images[k], masks[k])[0]
             for k in range(num_images)]
    return images, masks, np.array(types, dtype=f"<U{max(map(len, tissues))}")


# ------------------------------------------------------------------------------------------
# PanNuke folder layout
# ------------------------------------------------------------------------------------------

def fold_seed(seed: int, fold: int) -> int:
    """Seed of fold ``fold`` (1-based) for stream ``seed``: distinct, reproducible streams."""
    return int(np.random.SeedSequence([seed, 0x9A77, fold]).generate_state(1, np.uint32)[0])


def fold_paths(out_dir: str | Path, fold: int) -> tuple[Path, Path, Path]:
    """images.npy, types.npy, masks.npy of fold ``fold`` in the official download layout."""
    root = Path(out_dir) / f"Fold {fold}"
    return (root / "images" / f"fold{fold}" / "images.npy",
            root / "images" / f"fold{fold}" / "types.npy",
            root / "masks" / f"fold{fold}" / "masks.npy")


def _same(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """The existing array at ``path`` memory-mapped if its shape and dtype match, else None."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.shape == shape and arr.dtype == dtype else None


def write_pannuke(out_dir: str | Path, num_images: int, seed: int, folds: int = 3,
                  image_size: int = 256, overwrite: bool = False,
                  progress: Callable[[int], None] | None = None,
                  on_fold: Callable[[int, np.ndarray], None] | None = None,
                  chunk: int = 16) -> list[Path]:
    """Write ``folds`` synthetic folds of ``num_images`` patches in PanNuke's download layout.

    ``out_dir/Fold k/images/foldk/{images,types}.npy`` and ``out_dir/Fold k/masks/foldk/masks.npy``
    for k = 1..folds, fold k from stream ``fold_seed(seed, k)``. Files are written through
    temporary files and ``os.replace``. Existing identical files are left untouched (a complete
    identical generation writes nothing); a different existing file raises UserError, before
    anything is written, unless ``overwrite``. ``progress(n)`` is called after every n
    patches, ``on_fold(k, nuclei per class (5,))`` for every fold once all are written.
    Returns the ``Fold k`` folders.
    """
    out_dir = Path(out_dir)
    if num_images < 1 or folds < 1 or image_size < 16 or seed < 0:
        raise UserError(f"{out_dir}: need num_images >= 1, folds >= 1, image size >= 16, seed >= 0")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    n, s = num_images, image_size
    width = max(map(len, constants.PANNUKE_TISSUES))
    specs = [((n, s, s, 3), np.dtype(np.float64)), ((n,), np.dtype(f"<U{width}")),
             ((n, s, s, NUM_CLASSES + 1), np.dtype(np.float64))]
    def conflict(path: Path) -> UserError:
        return UserError(f"{path}: exists and differs from this generation (seed {seed}, {n} images "
                         f"of {s} px per fold); pass --overwrite (overwrite=True) to replace it")

    pending: list[tuple[Path, Path]] = []   # (temporary, final) still to be moved into place
    summaries: list[tuple[int, np.ndarray]] = []
    try:
        for k in range(1, folds + 1):
            paths = fold_paths(out_dir, k)
            old = [_same(p, *spec) if p.exists() else None for p, spec in zip(paths, specs)]
            for p, o in zip(paths, old):
                if p.exists() and o is None and not overwrite:
                    raise conflict(p)
            same = [o is not None for o in old]
            tmps = []
            for p, (shape, dtype) in zip(paths, specs):
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
                pending.append((tmp, p))
                tmps.append(np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape))
            counts = np.zeros(NUM_CLASSES, np.int64)
            fs = fold_seed(seed, k)
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                for j in range(lo, hi):
                    tmps[1][j], cnt = _one(fs, j, s, constants.PANNUKE_TISSUES, tmps[0][j], tmps[2][j])
                    counts += cnt
                for f in range(3):
                    if same[f] and not np.array_equal(old[f][lo:hi], tmps[f][lo:hi]):
                        same[f] = False
                        if not overwrite:
                            raise conflict(paths[f])
                if progress is not None:
                    progress(hi - lo)
            for t in tmps:
                t.flush()
            del tmps, old
            for p, eq in zip(paths, same):   # identical files stay untouched
                if eq:
                    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
                    pending.remove((tmp, p))
                    tmp.unlink()
            summaries.append((k, counts))
        for tmp, p in pending:
            os.replace(tmp, p)
        pending = []
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
    if on_fold is not None:
        for k, counts in summaries:
            on_fold(k, counts)
    return [out_dir / f"Fold {k}" for k in range(1, folds + 1)]
