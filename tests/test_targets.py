"""Targets (tsfd_jax.ops.targets) against skimage find_boundaries and the authors' enclosing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage.segmentation import find_boundaries

from tsfd_jax.ops.targets import (boundaries, boundary_target, contacts, content_edge_band,
                                  distance_target, frame_band, hv_energy, hv_target,
                                  inner_distance, semantic_onehot)

_boundaries = jax.jit(boundaries)


def authors_frame(h, w, width=2):
    """docs/preprocessing.md: ones with the interior [2:-2, 2:-2] zeroed."""
    f = np.ones((h, w), bool)
    f[width:h - width, width:w - width] = False
    return f


def test_semantic_onehot_matches_eye():
    cls = np.random.default_rng(0).integers(0, 6, (2, 5, 7))
    np.testing.assert_array_equal(np.asarray(semantic_onehot(cls, 6)), np.eye(6)[cls])


@settings(max_examples=30, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 12), st.integers(1, 12)),
              elements=st.integers(0, 4)))
def test_boundaries_equal_skimage_on_random_maps(inst):
    ref = find_boundaries(inst, connectivity=1, mode="thick")
    np.testing.assert_array_equal(np.asarray(boundaries(jnp.asarray(inst))), ref)


def contacts_loop(inst):
    """Loop reference: a nucleus pixel with a 4-neighbour in another nucleus."""
    h, w = inst.shape
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and inst[y, x] > 0 and inst[yy, xx] > 0 \
                        and inst[yy, xx] != inst[y, x]:
                    out[y, x] = True
    return out


@settings(max_examples=30, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 12), st.integers(1, 12)),
              elements=st.integers(0, 4)))
def test_contacts_equal_a_loop_reference(inst):
    got = np.asarray(contacts(jnp.asarray(inst)))
    np.testing.assert_array_equal(got, contacts_loop(inst))
    assert not (got & ~np.asarray(boundaries(jnp.asarray(inst)))).any()  # part of the boundary


def test_boundaries_equal_skimage_on_real_maps(shared_data):
    files = sorted((shared_data / "consep" / "train").glob("*.npz"))[:6]
    files += sorted((shared_data / "nucls").glob("*/*.npz"))
    assert len(files) >= 10
    for f in files:
        inst = np.load(f, allow_pickle=False)["inst"].astype(np.int32)
        ref = find_boundaries(inst, connectivity=1, mode="thick")
        np.testing.assert_array_equal(np.asarray(_boundaries(inst)), ref, err_msg=str(f))


def test_boundaries_batched():
    inst = np.random.default_rng(1).integers(0, 3, (3, 9, 11))
    out = np.asarray(boundaries(jnp.asarray(inst)))
    for i in range(3):
        np.testing.assert_array_equal(out[i], find_boundaries(inst[i], connectivity=1, mode="thick"))


def test_frame_band_is_the_authors_frame():
    for h, w, width in ((256, 256, 2), (10, 13, 2), (8, 8, 3)):
        np.testing.assert_array_equal(np.asarray(frame_band(h, w, width)), authors_frame(h, w, width))
        # An all-ones content mask gives the same band.
        np.testing.assert_array_equal(np.asarray(content_edge_band(jnp.ones((h, w)), width)),
                                      authors_frame(h, w, width))


def test_nucleus_touching_the_edge_is_enclosed():
    inst = np.zeros((32, 32), np.int32)
    inst[0:8, 10:18] = 1           # touches the top edge
    inst[12:22, 12:22] = 2         # interior nucleus
    cls = (inst > 0).astype(np.int32) * 3
    b = np.asarray(boundary_target(inst, cls)).astype(bool)
    thick = find_boundaries(inst, connectivity=1, mode="thick")
    np.testing.assert_array_equal(b, thick | (authors_frame(32, 32) & (inst > 0)))
    # The cut side of nucleus 1 is boundary in the 2-px band and nowhere deeper.
    assert b[0:2, 10:18].all()
    assert not b[2:6, 12:16].any()
    # The interior nucleus is untouched by the frame.
    assert not b[14:20, 14:20].any()


def test_content_edge_encloses_nuclei_cut_by_the_warped_edge():
    rng = np.random.default_rng(2)
    inst = np.zeros((40, 40), np.int32)
    inst[5:15, 20:32] = 1
    inst[25:35, 5:15] = 2
    content = np.ones((40, 40), bool)
    content[:, 26:] = False        # content cut through nucleus 1
    inst[~content] = 0
    cls = np.where(inst > 0, rng.integers(1, 6), 0)
    raw = np.asarray(boundary_target(inst, cls, jnp.asarray(content), 2))
    assert raw.dtype == np.float32 and set(np.unique(raw)) <= {0.0, 1.0}
    out = raw.astype(bool)
    # Reference: thick | ((frame | content pixels within 2 px of non-content) & nucleus).
    near = ndi.binary_dilation(~content, np.ones((5, 5), bool), border_value=1)
    band = authors_frame(40, 40) | (near & content)
    ref = find_boundaries(inst, connectivity=1, mode="thick") | (band & (inst > 0))
    np.testing.assert_array_equal(out, ref)
    assert out[5:15, 24:26].all()  # the cut side of nucleus 1 is a 2-px boundary


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_dilated_boundaries_equal_scipy_dilation_of_skimage(radius):
    rng = np.random.default_rng(radius)
    inst = rng.integers(0, 5, size=(2, 30, 26)).repeat(3, axis=1)[:, :30]  # blocky labels
    cls = (inst > 0).astype(np.int32)
    out = np.asarray(boundary_target(jnp.asarray(inst), jnp.asarray(cls), None, 0, radius))
    square = np.ones((2 * radius + 1,) * 2, bool)
    for i in range(2):
        ref = ndi.binary_dilation(find_boundaries(inst[i], connectivity=1, mode="thick"), square)
        np.testing.assert_array_equal(out[i].astype(bool), ref)
    # Wider than the plain contours, and radius 0 is the plain target.
    plain = np.asarray(boundary_target(jnp.asarray(inst), jnp.asarray(cls), None, 0, 0))
    assert out.sum() > plain.sum()
    for i in range(2):
        np.testing.assert_array_equal(plain[i].astype(bool),
                                      find_boundaries(inst[i], connectivity=1, mode="thick"))


def distance_reference(inst):
    """scipy: per nucleus, the chessboard distance transform of its mask with the image edge
    counting as outside, and that distance's maximum over the nucleus."""
    dist = np.zeros(inst.shape, np.int32)
    peak = np.zeros(inst.shape, np.int32)
    for i in np.unique(inst[inst > 0]):
        mask = inst == i
        d = ndi.distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[1:-1, 1:-1]
        dist[mask] = d[mask]
        peak[mask] = d[mask].max()
    return dist, peak


def touching_blobs(rng, h, w, n):
    """Voronoi cells of n seeds cut to discs: touching, convex nuclei of various sizes."""
    seeds = rng.integers(0, (h, w), (n, 2))
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    inst = (d2.argmin(-1) + 1).astype(np.int32)
    inst[d2.min(-1) > rng.integers(36, 150)] = 0
    return inst


@pytest.mark.parametrize("seed", range(4))
def test_inner_distance_equals_scipy_per_nucleus(seed):
    rng = np.random.default_rng(seed)
    inst = np.stack([touching_blobs(rng, 48, 40, 9) for _ in range(2)])
    dist, peak = jax.jit(inner_distance)(jnp.asarray(inst))
    for i in range(2):
        ref_d, ref_p = distance_reference(inst[i])
        assert ref_d.max() >= 4  # deep enough to exercise several erosions
        np.testing.assert_array_equal(np.asarray(dist[i]), ref_d)
        np.testing.assert_array_equal(np.asarray(peak[i]), ref_p)


def test_inner_distance_on_real_maps(shared_data):
    files = sorted((shared_data / "consep" / "train").glob("*.npz"))[:3]
    assert files
    for f in files:
        inst = np.load(f, allow_pickle=False)["inst"].astype(np.int32)
        dist, peak = jax.jit(inner_distance)(inst)
        ref_d, ref_p = distance_reference(inst)
        np.testing.assert_array_equal(np.asarray(dist), ref_d, err_msg=str(f))
        np.testing.assert_array_equal(np.asarray(peak), ref_p, err_msg=str(f))


def test_distance_target_marks_every_nucleus_centre():
    inst = touching_blobs(np.random.default_rng(7), 40, 40, 7)
    t = np.asarray(distance_target(jnp.asarray(inst)))
    ref_d, ref_p = distance_reference(inst)
    np.testing.assert_allclose(t[inst > 0], 1 - ref_d[inst > 0] / ref_p[inst > 0], atol=1e-6)
    assert (t[inst == 0] == 1).all() and t.min() >= 0
    for i in np.unique(inst[inst > 0]):
        assert t[inst == i].min() == 0  # each nucleus has a core at 0, small ones included
    # Edge pixels of touching nuclei are high, so thresholding separates them.
    rim = np.asarray(contacts(jnp.asarray(inst)))
    assert rim.any() and (t[rim] >= 1 - 1 / ref_p[rim] - 1e-6).all()


def test_distance_peak_is_per_piece_of_a_split_nucleus():
    # One label in two pieces (a nucleus cut by an augmentation's fill): each piece is
    # normalised by its own depth, so the small piece also gets a core at 0.
    inst = np.zeros((20, 30), np.int32)
    inst[2:17, 2:17] = 1     # 15 x 15: depth 8
    inst[5:8, 22:25] = 1     # 3 x 3: depth 2
    dist, peak = inner_distance(jnp.asarray(inst))
    assert int(peak[9, 9]) == 8 and int(peak[6, 23]) == 2
    t = np.asarray(distance_target(jnp.asarray(inst)))
    assert t[9, 9] == 0 and t[6, 23] == 0


def hv_reference(inst):
    """HoVer-Net's horizontal and vertical maps in float64, written from its definition: per
    nucleus, offsets from scipy's centre of mass, negative and positive sides each divided by
    their largest magnitude."""
    out = np.zeros(inst.shape + (2,), np.float64)
    rows, cols = np.mgrid[:inst.shape[0], :inst.shape[1]]
    for i in np.unique(inst[inst > 0]):
        mask = inst == i
        cy, cx = ndi.center_of_mass(mask)
        for c, d in enumerate((cols - cx, rows - cy)):
            d = d[mask].astype(np.float64)
            neg, pos = d < 0, d > 0
            if neg.any():
                d[neg] /= -d[neg].min()
            if pos.any():
                d[pos] /= d[pos].max()
            out[..., c][mask] = d
    return out


@pytest.mark.parametrize("seed", range(3))
def test_hv_target_equals_a_float64_reference(seed):
    rng = np.random.default_rng(seed)
    inst = np.stack([touching_blobs(rng, 48, 40, 9) for _ in range(2)])
    # Ids need not be contiguous or small.
    inst = np.where(inst > 0, inst * 1009 + 70000, 0).astype(np.int32)
    t = np.asarray(jax.jit(hv_target)(jnp.asarray(inst)))
    assert t.shape == inst.shape + (2,)
    for i in range(2):
        np.testing.assert_allclose(t[i], hv_reference(inst[i]), atol=1e-5)


def test_hv_target_on_real_maps(shared_data):
    files = sorted((shared_data / "consep" / "train").glob("*.npz"))[:2]
    assert files
    for f in files:
        inst = np.load(f, allow_pickle=False)["inst"].astype(np.int32)
        t = np.asarray(jax.jit(hv_target)(inst))
        np.testing.assert_allclose(t, hv_reference(inst), atol=1e-5, err_msg=str(f))
        assert t.min() == -1 and t.max() == 1


def test_hv_energy_separates_touching_nuclei_and_is_zero_inside():
    inst = np.zeros((24, 40), np.int32)
    inst[4:20, 4:20] = 1
    inst[4:20, 20:36] = 2    # touches nucleus 1 along column 19|20
    e = np.asarray(hv_energy(hv_target(jnp.asarray(inst))))
    assert e.shape == inst.shape and e.min() >= 0 and e.max() <= 1
    assert (e[6:18, 19:21] > 0.8).all()              # the split between them
    assert (e[6:18, 7:17] == 0).all() and (e[6:18, 23:33] == 0).all()  # their insides
    # A single nucleus has no inner split: the energy stays below the split's on its rims.
    single = np.asarray(hv_energy(hv_target(jnp.asarray(inst == 1).astype(jnp.int32))))
    assert single[6:18, 5:18].max() < 0.2


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_contact_dilation_widens_only_where_nuclei_touch(radius):
    """Reference: skimage's thick contours OR scipy's dilation of the nucleus pixels that have
    a 4-neighbour in another nucleus (each nucleus against the others, independently of
    ``contacts``)."""
    rng = np.random.default_rng(10 + radius)
    inst = rng.integers(0, 5, size=(2, 30, 26)).repeat(3, axis=1)[:, :30]
    cls = (inst > 0).astype(np.int32)
    out = np.asarray(boundary_target(jnp.asarray(inst), jnp.asarray(cls), None, 0, 0, radius))
    cross, square = ndi.generate_binary_structure(2, 1), np.ones((2 * radius + 1,) * 2, bool)
    for i in range(2):
        touching = np.zeros(inst[i].shape, bool)
        for k in np.unique(inst[i])[1:]:
            others = (inst[i] > 0) & (inst[i] != k)
            touching |= (inst[i] == k) & ndi.binary_dilation(others, cross)
        ref = (find_boundaries(inst[i], connectivity=1, mode="thick")
               | ndi.binary_dilation(touching, square))
        np.testing.assert_array_equal(out[i].astype(bool), ref)


def test_contact_dilation_keeps_the_core_of_a_thin_nucleus():
    """A 6-px-wide nucleus alone keeps a core with wide contact bands, not with wide contours;
    two touching nuclei are split by a band 2 + 2 r px wide."""
    inst = np.zeros((24, 40), np.int32)
    inst[4:20, 3:9] = 1                                  # thin, alone
    inst[4:20, 20:28], inst[4:20, 28:36] = 2, 3          # touching at columns 27 | 28
    j, c = jnp.asarray(inst), jnp.asarray((inst > 0).astype(np.int32))
    contact = np.asarray(boundary_target(j, c, None, 0, 0, 2)).astype(bool)
    wide = np.asarray(boundary_target(j, c, None, 0, 2, 0)).astype(bool)
    assert (~contact & (inst == 1)).any() and not (~wide & (inst == 1)).any()
    assert contact[12, 25:31].all() and not contact[12, 24] and not contact[12, 31]
