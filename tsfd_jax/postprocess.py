"""Probabilities -> nucleus instances with a class each (paper §4.3, docs/evaluation.md).

The steps of the authors' code (scripts/morphology.py), every threshold and size from
``cfg.postprocess``, without their denoising check (which can wipe images with few small nuclei):

1. binarise every softmax channel with p > seg_threshold;
2. per class channel remove 4-connected objects smaller than min_size, then a closing
   (closing_size square);
3. argmax over the binary channels, background first (ties -> lowest index; nothing set ->
   background);
4. majority class per 8-connected component (PAPER Eq. 16; ties -> smaller class label);
   ``vote="nucleus"`` instead votes per region after step 5 has removed the boundaries, so two
   touching nuclei of different classes are not merged into one class (not the paper's);
5. boundary probability > boundary_threshold, thinned to 1 px (``thin``: Guo & Hall's
   two-subiteration thinning, the authors' ``bwmorph_thin`` = skimage ``thin``, zero padding),
   boundary pixels -> background;
6. per class: erosion (erosion_size square), 8-connected labelling, then a grey dilation
   (dilation_size square) of the label map.

Morphology follows OpenCV's border convention (the image edge neither erodes nor dilates), i.e.
max / min filters over odd square windows clipped to the image (scipy ``mode='nearest'``). The
per-class erosion is "the window holds one class only", which is the erosion of every one-hot
class plane at once. The per-class labels become one instance map: ids run class by class
(PanNuke channel order), raster order within a class, the order of the official ``binarize``.
The dilation fills background pixels only (the largest id in the window wins). With the default
sizes this equals the authors' per-channel result exactly: components of different classes are
never 8-adjacent after the majority step, so after the erosion any two instances are >= 3 px
apart and their 1-px dilations never meet.

Many images run in parallel on host worker processes: ``postprocess_workers.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from tsfd_jax.postprocess_params import PostprocessParams

_FOUR = ndi.generate_binary_structure(2, 1)

# In-plane structures for labelling a (C, H, W) stack of class planes independently.
_PLANE4 = np.zeros((3, 3, 3), bool)
_PLANE4[1] = ndi.generate_binary_structure(2, 1)
_PLANE8 = np.zeros((3, 3, 3), bool)
_PLANE8[1] = True
_EIGHT = np.ones((3, 3), bool)


def _thinning_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of Guo & Hall (1989) over the 8-neighbour code.

    Bit k-1 of the code is neighbour x_k, counter-clockwise from east (x1 E, x2 NE, x3 N, x4 NW,
    x5 W, x6 SW, x7 S, x8 SE). Delete when G1 (one 8-connected crossing), G2 (2 <= min(n1, n2)
    <= 3) and G3 (first subiteration) or G3' (second) hold.
    """
    code = np.arange(256)
    x = [None] + [(code >> (k - 1)) & 1 for k in range(1, 9)]
    X = lambda i: x[(i - 1) % 8 + 1]  # noqa: E731
    crossings = sum(((X(2 * i - 1) == 0) & ((X(2 * i) == 1) | (X(2 * i + 1) == 1))).astype(int)
                    for i in range(1, 5))
    n1 = sum(X(2 * k - 1) | X(2 * k) for k in range(1, 5))
    n2 = sum(X(2 * k) | X(2 * k + 1) for k in range(1, 5))
    g12 = (crossings == 1) & (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
    g3 = ((X(2) | X(3) | (1 - X(8))) & X(1)) == 0
    g3p = ((X(6) | X(7) | (1 - X(4))) & X(5)) == 0
    return g12 & g3, g12 & g3p


_THIN_LUTS = _thinning_luts()


def thin(image: np.ndarray) -> np.ndarray:
    """Thinning to 1-px lines until nothing changes: (H, W) bool -> (H, W) bool.

    Equals ``skimage.morphology.thin`` (and the authors' ``bwmorph_thin``); written with array
    slices instead of ``ndi.correlate``, about 2.5x faster on 256 px boundary maps.
    """
    H, W = image.shape
    pad = np.zeros((H + 2, W + 2), np.uint8)
    pad[1:-1, 1:-1] = np.asarray(image, bool)
    core = pad[1:-1, 1:-1]
    count = int(core.sum())
    while True:
        for lut in _THIN_LUTS:
            code = (pad[1:-1, 2:] + (pad[:-2, 2:] << 1) + (pad[:-2, 1:-1] << 2)
                    + (pad[:-2, :-2] << 3) + (pad[1:-1, :-2] << 4) + (pad[2:, :-2] << 5)
                    + (pad[2:, 1:-1] << 6) + (pad[2:, 2:] << 7))
            core[lut[code]] = 0
        new = int(core.sum())
        if new == count:
            return core.astype(bool)
        count = new


@dataclass
class Instances:
    """Post-processed instances of one image.

    inst: (H, W) int32, 0 background, ids 1..K contiguous.
    classes: (K,) int32 label (1..C) of instance k at index k - 1.
    class_probs: (K, C + 1) float32 mean softmax over the instance's pixels.
    """
    inst: np.ndarray
    classes: np.ndarray
    class_probs: np.ndarray

    @property
    def num_instances(self) -> int:
        return int(len(self.classes))

    def to_pannuke_layout(self, num_classes: int | None = None) -> np.ndarray:
        n = self.class_probs.shape[1] - 1 if num_classes is None else num_classes
        return to_pannuke_layout(self.inst, self.classes, n)


def to_pannuke_layout(inst: np.ndarray, classes: np.ndarray, num_classes: int,
                      dtype=np.float64) -> np.ndarray:
    """Instance map + class per instance -> (H, W, C + 1) PanNuke layout.

    Channel label-1 holds the ids of that class's instances (the instance ids of ``inst``, unique
    in the image), the last channel is 1 on background. float64 as PanNuke's masks.npy.
    """
    inst = np.asarray(inst)
    classes = np.asarray(classes, np.int64)
    lut = np.concatenate([[0], classes])
    pix_cls = lut[inst]
    out = np.zeros(inst.shape + (num_classes + 1,), dtype)
    for c in range(1, num_classes + 1):
        out[..., c - 1] = np.where(pix_cls == c, inst, 0)
    out[..., num_classes] = inst == 0
    return out


# ---- the pipeline --------------------------------------------------------------------------------

def _window(x: np.ndarray, size: int, op) -> np.ndarray:
    """Max (op=np.maximum) or min filter over a size x size window of the last two axes, the
    image edge neutral (OpenCV's border; = scipy mode='nearest' for odd sizes).

    Repeated 3-wide slice operations: for these small windows several times faster than
    ``ndi.maximum_filter``.
    """
    out = np.array(x, copy=True)
    for axis in (-2, -1):
        for _ in range(size // 2):
            src = out.copy()
            lo = [slice(None)] * out.ndim
            hi = [slice(None)] * out.ndim
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            op(out[tuple(lo)], src[tuple(hi)], out=out[tuple(lo)])
            op(out[tuple(hi)], src[tuple(lo)], out=out[tuple(hi)])
    return out


def _max(x: np.ndarray, size: int) -> np.ndarray:
    return _window(x, size, np.maximum)


def _min(x: np.ndarray, size: int) -> np.ndarray:
    return _window(x, size, np.minimum)


def semantic_map(seg_prob: np.ndarray, params: PostprocessParams) -> np.ndarray:
    """Steps 1-4: (H, W, C + 1) softmax -> (H, W) int32 class map, one class per component."""
    p = np.asarray(seg_prob)
    C = p.shape[-1] - 1
    binary = p > params.seg_threshold
    planes = np.ascontiguousarray(np.moveaxis(binary[..., 1:], -1, 0))  # (C, H, W)
    if params.min_size > 1:
        # skimage remove_small_objects(min_size=...) semantics: 4-connected, drop size < min_size.
        lab, _ = ndi.label(planes, structure=_PLANE4)
        keep = np.bincount(lab.ravel()) >= params.min_size
        keep[0] = False
        planes = keep[lab]
    if params.closing_size > 1:
        planes = _min(_max(planes, params.closing_size), params.closing_size)
    sem = np.zeros(p.shape[:2], np.int64)
    for c in range(C, 0, -1):  # argmax over binary channels: the lowest set index wins
        sem[planes[c - 1]] = c
    sem[binary[..., 0]] = 0
    if params.vote == "component":
        sem = majority_vote(sem, _EIGHT, C)  # Eq. 16, before the boundaries split components
    return sem.astype(np.int32)


def majority_vote(sem: np.ndarray, structure: np.ndarray, num_classes: int) -> np.ndarray:
    """Every connected component of ``sem > 0`` gets its most frequent class (ties: smaller)."""
    C = num_classes
    comp, n = ndi.label(sem > 0, structure=structure)
    if not n:
        return sem
    counts = np.bincount((comp * (C + 1) + sem).ravel(), minlength=(n + 1) * (C + 1))
    counts = counts.reshape(n + 1, C + 1)[:, 1:]
    majority = np.argmax(counts, axis=1) + 1
    majority[0] = 0
    return majority[comp]


def separate_instances(sem: np.ndarray, boundary: np.ndarray, params: PostprocessParams,
                       num_classes: int, seg_prob: np.ndarray | None = None) -> Instances:
    """Step 6 on a class map (H, W) and a thin boundary (H, W) bool -> Instances.

    Without ``seg_prob`` the class probabilities are one-hot of each instance's class.
    """
    C = num_classes
    t = np.where(boundary, 0, sem)
    if params.erosion_size > 1:
        # Per-class erosion of the one-hot planes == the window holds a single class value.
        k = params.erosion_size
        core = (_min(t, k) == _max(t, k)) & (t > 0)
    else:
        core = t > 0
    ys, xs = np.nonzero(core)
    if params.erosion_size >= 3:
        # After the erosion no two classes touch (8-connected), so one labelling is enough;
        # renumber class by class (raster order within a class, as ``ndi.label`` numbers).
        lab, K = ndi.label(core, structure=_EIGHT)
        cls_of = np.zeros(K + 1, np.int64)
        cls_of[lab[ys, xs]] = t[ys, xs]
        order = np.argsort(cls_of[1:], kind="stable") + 1
        relabel = np.zeros(K + 1, np.int32)
        relabel[order] = np.arange(1, K + 1)
        inst = relabel[lab]
    else:
        planes = np.zeros((C,) + t.shape, bool)
        planes[t[ys, xs] - 1, ys, xs] = True
        lab3, K = ndi.label(planes, structure=_PLANE8)  # ids: class by class, raster order
        inst = lab3.max(axis=0)
    classes = np.zeros(K + 1, np.int32)
    classes[inst[ys, xs]] = t[ys, xs]
    if params.dilation_size > 1 and K:
        grown = _max(inst, params.dilation_size)
        inst = np.where(inst > 0, inst, grown)
    inst = inst.astype(np.int32)
    area = np.bincount(inst.ravel(), minlength=K + 1)[1:]
    if seg_prob is None:
        probs = np.zeros((K, C + 1), np.float32)
        probs[np.arange(K), classes[1:]] = 1.0
    else:
        probs = mean_probs(inst, seg_prob, K, area)
    return Instances(inst=inst, classes=classes[1:].copy(), class_probs=probs)


def mean_probs(inst: np.ndarray, seg_prob: np.ndarray, K: int, area: np.ndarray) -> np.ndarray:
    """(K, C + 1) float32 mean softmax over each instance's pixels (ids 1..K, ``area`` (K,))."""
    C1 = seg_prob.shape[-1]
    fg = inst > 0
    p = np.asarray(seg_prob, np.float64)[fg]                        # (pixels, C + 1)
    key = ((inst[fg] - 1)[:, None] * C1 + np.arange(C1)).ravel()
    sums = np.bincount(key, weights=p.ravel(), minlength=K * C1).reshape(K, C1)
    return (sums / np.maximum(area, 1)[:, None]).astype(np.float32)


def postprocess(seg_prob: np.ndarray, boundary_prob: np.ndarray, cfg_pp: Any = None) -> Instances:
    """One image: softmax (H, W, C + 1), boundary probability (H, W) or (H, W, 1) -> Instances."""
    params = PostprocessParams.of(cfg_pp)
    seg_prob = np.asarray(seg_prob)
    boundary_prob = np.asarray(boundary_prob)
    if boundary_prob.ndim == 3:
        boundary_prob = boundary_prob[..., 0]
    if seg_prob.ndim != 3 or boundary_prob.shape != seg_prob.shape[:2]:
        raise ValueError(f"expected seg_prob (H, W, C+1) and boundary_prob (H, W); got "
                         f"{seg_prob.shape} and {boundary_prob.shape}")
    if params.method == "markers":
        return marker_instances(seg_prob, boundary_prob, params)
    sem = semantic_map(seg_prob, params)
    boundary = thin(boundary_prob > params.boundary_threshold)
    if params.vote == "nucleus":
        # One class per nucleus: the vote runs on the regions the 1-px boundaries separate
        # (4-connected, since an 8-connected thin line only separates 4-connected regions), so
        # touching nuclei of different classes keep their own classes.
        sem = majority_vote(np.where(boundary, 0, sem), _FOUR, seg_prob.shape[-1] - 1)
    return separate_instances(sem, boundary, params, seg_prob.shape[-1] - 1, seg_prob)


def marker_instances(seg_prob: np.ndarray, boundary_prob: np.ndarray,
                     params: PostprocessParams) -> Instances:
    """``method="markers"`` (docs/learning.md): instances grown from boundary-free cores.

    1. foreground = 1 - p(background) > seg_threshold (the paper's per-class thresholds lose
       pixels whose nucleus probability is split between classes);
    2. markers = 8-connected components of foreground without boundary_prob >
       boundary_threshold, those under max(min_size // 4, 1) px dropped; with ``split_depth``
       > 0 a core is split further at the peaks of its distance transform that stand at least
       ``split_depth`` px above the saddle between them (h-maxima), so touching round nuclei
       whose shared boundary was predicted too weakly still come apart; with ``basin_depth`` > 0
       a core is split at the basins of the boundary probability inside it that lie at least
       ``basin_depth`` below the lowest ridge between them (h-minima): the ring a model draws
       around each nucleus separates touching nuclei even where it stays under
       ``boundary_threshold``;
    3. a watershed floods the foreground from the markers on the boundary probability (minus
       the distance to the core's edge in px, with ``split_depth``), so touching nuclei split
       along the predicted boundary ridge or the core's neck; with ``max_growth`` > 0 only
       the foreground within that many px (Euclidean) of a core is flooded, so nuclei keep the
       shape of their cores where the foreground runs on between them (glands, docs/learning.md
       §19);
    4. with ``orphan_size`` > 0 the foreground no core reached (a nucleus whose whole area the
       model gave a high boundary probability, or foreground beyond ``max_growth``) is split into
       8-connected pieces, and each piece of at least ``orphan_size`` px becomes a nucleus of its
       own instead of being dropped;
    5. instances under min_size px are dropped; each instance's class is the arg-max of its mean
       class probability (background excluded).
    closing, erosion, dilation and vote are not used.
    """
    from skimage.segmentation import watershed  # only here: keeps worker start-up light

    p = np.asarray(seg_prob, np.float32)
    elevation = np.asarray(boundary_prob, np.float32)
    fg = (1.0 - p[..., 0]) > params.seg_threshold
    core = fg & ~(elevation > params.boundary_threshold)
    markers, n = ndi.label(core, structure=_EIGHT)
    if n:
        small = np.bincount(markers.ravel()) < max(params.min_size // 4, 1)
        small[0] = False
        markers[small[markers]] = 0
    region = fg
    if n and params.max_growth > 0:
        region = fg & (ndi.distance_transform_edt(markers == 0) <= params.max_growth)
    if not params.splits_once():
        raise ValueError("postprocess: split_depth and basin_depth both set")
    if n and params.basin_depth > 0:
        markers, n = split_at_basins(markers, elevation, float(params.basin_depth))
    if n and params.split_depth > 0:
        markers, n, dist = split_markers(markers, float(params.split_depth))
        elevation = elevation - dist
    inst = watershed(elevation, markers, mask=region) if n else markers
    if params.orphan_size > 0:
        orphans, m = ndi.label(fg & (inst == 0), structure=_EIGHT)
        if m:
            large = np.bincount(orphans.ravel()) >= params.orphan_size
            large[0] = False
            inst = np.where(large[orphans], orphans + inst.max(), inst)
    area = np.bincount(inst.ravel())
    keep = area >= max(params.min_size, 1)
    keep[0] = False
    ids = np.nonzero(keep)[0]
    relabel = np.zeros(len(area), np.int32)
    relabel[ids] = np.arange(1, len(ids) + 1)
    inst = relabel[inst]
    K = len(ids)
    probs = mean_probs(inst, p, K, area[ids])
    classes = (np.argmax(probs[:, 1:], axis=1) + 1).astype(np.int32) if K else np.zeros(0, np.int32)
    return Instances(inst=inst, classes=classes, class_probs=probs)


def split_at_basins(markers: np.ndarray, elevation: np.ndarray,
                    depth: float) -> tuple[np.ndarray, int]:
    """Core components -> (markers, count): one marker per h-minimum (height ``depth``) of the
    boundary probability ``elevation`` inside each core (the pixels outside the cores as a wall
    of height 1), or the core itself where it has none."""
    from skimage.morphology import local_minima, reconstruction  # keeps worker start-up light

    core = markers > 0
    # Integer levels (1/1024): the reconstruction on floats is sensitive to rounding.
    walled = np.round(np.where(core, np.clip(elevation, 0.0, 1.0), 1.0) * 1024)
    # The h-minima transform (basins filled up to ``depth``, Soille 2003 §6.3.3) and its
    # regional minima: two basins whose ridge lies less than ``depth`` above them become one
    # flat minimum. (skimage's h_minima instead keeps the bottoms of such a merged basin, two
    # markers where its floor is level.)
    filled = reconstruction(walled + round(depth * 1024), walled, method="erosion")
    basins = local_minima(filled, connectivity=2, allow_borders=True) & core
    has_basin = np.zeros(int(markers.max()) + 1, bool)
    has_basin[markers[basins]] = True
    has_basin[0] = False
    out, n = ndi.label(basins | (core & ~has_basin[markers]), structure=_EIGHT)
    return out, n


def split_markers(markers: np.ndarray, depth: float) -> tuple[np.ndarray, int, np.ndarray]:
    """Core components -> (markers, count, distance to the core's edge in px): each component
    gives one marker per h-maximum (height ``depth``) of its Euclidean distance transform, or
    itself where it has none (a core thinner than ``depth`` stays one nucleus)."""
    from skimage.morphology import h_maxima  # only here: keeps worker start-up light

    core = markers > 0
    dist = ndi.distance_transform_edt(core).astype(np.float32)
    # Integer-scaled distances: h_maxima on floats is sensitive to rounding of sqrt values.
    peaks = h_maxima(np.round(dist * 16).astype(np.int32), int(round(depth * 16))) > 0
    has_peak = np.zeros(int(markers.max()) + 1, bool)
    has_peak[markers[peaks & core]] = True
    has_peak[0] = False
    seeds = (peaks & core) | (core & ~has_peak[markers])
    out, n = ndi.label(seeds, structure=_EIGHT)
    return out, n, dist


def rebuild_tsfd_ground_truth(inst: np.ndarray, cls: np.ndarray, cfg_pp: Any = None,
                              frame_width: int = 2, num_classes: int | None = None) -> Instances:
    """Ground truth rebuilt the TSFD authors' way (docs/evaluation.md), for ``--protocol tsfd``.

    Semantic map + thick instance boundaries (find_boundaries, 4-connectivity, 'thick') + the
    frame band enclosing nuclei within ``frame_width`` px of the edge, thinned, then the same
    subtract / erode / label / dilate steps as the predictions. inst (H, W) ids, cls (H, W)
    labels; ``num_classes`` (default max(cls)) only sizes the one-hot ``class_probs``.
    """
    from skimage.segmentation import find_boundaries  # only here: keeps worker start-up light

    params = PostprocessParams.of(cfg_pp)
    inst = np.asarray(inst)
    sem = np.where(inst > 0, np.asarray(cls), 0).astype(np.int32)
    num_classes = max(int(sem.max()), 1) if num_classes is None else num_classes
    if len(np.unique(sem)) == 1:  # the authors' loader zeroes single-valued masks
        z = np.zeros(inst.shape, np.int32)
        return Instances(z, np.zeros(0, np.int32), np.zeros((0, num_classes + 1), np.float32))
    boundary = find_boundaries(inst, connectivity=1, mode="thick")
    frame = np.ones(inst.shape, bool)
    if frame_width > 0:
        frame[frame_width:-frame_width, frame_width:-frame_width] = False
        boundary |= frame & (sem > 0)
    return separate_instances(sem, thin(boundary), params, num_classes)
