"""Losses (PAPER Eq. 5-12, docs/losses.md) against float64 numpy written from the equations.

The references below never call tsfd_jax.losses: each one is the paper's equation or the authors'
Keras expression, spelled out in numpy (extended precision where the 1/gamma power is steep).
"""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from scipy import ndimage

from configs.default import get_config
from tsfd_jax import losses as L
from tsfd_jax.errors import UserError

B, H, W, K = 2, 16, 16, 6
T = 19
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)


# ---- float64 references --------------------------------------------------------------------

def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def probs64(x, act):
    """(p, 1 - p); for softmax 1 - p_c is the sum of the other probabilities (no cancellation)."""
    x = np.asarray(x, np.float64)
    if act == "sigmoid":
        return 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(x))
    p = softmax64(x)
    q = np.stack([np.delete(p, c, -1).sum(-1) for c in range(p.shape[-1])], -1)
    return p, q


def logs64(x, act):
    if act == "sigmoid":
        x = np.asarray(x, np.float64)
        return -np.logaddexp(0, -x), -np.logaddexp(0, x)
    p, q = probs64(x, act)
    mx = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - mx).sum(-1, keepdims=True)) + mx
    return x - lse, np.log(q)


def ref_focal(logits, labels, alpha, gamma, mask):
    p = softmax64(logits)
    pt = p[np.arange(len(labels)), labels]
    l = -alpha * (1 - pt) ** gamma * np.log(pt)                                   # Eq. 6
    return (l * mask).sum() / mask.sum()


def ref_binary_focal(logits, labels, alpha, gamma, mask):
    p = np.clip(softmax64(logits), 1e-7, 1 - 1e-7)
    g = np.eye(logits.shape[-1])[labels]
    bce = -(g * np.log(p) + (1 - g) * np.log(1 - p))
    l = alpha * (1 - np.exp(-bce)) ** gamma * bce
    return (l * mask[:, None]).sum() / (mask.sum() * logits.shape[-1])


def ref_ft_paper(logits, g, m, alpha, beta, gamma, eps, act):
    p, q = probs64(logits, act)
    p, q, g, m = (np.asarray(a, np.longdouble) for a in (p, q, g, m[..., None]))
    axes = (0, 1, 2)
    tp, fn, fp = (p * g * m).sum(axes), (q * g * m).sum(axes), (p * (1 - g) * m).sum(axes)
    ti = (tp + eps) / (tp + alpha * fn + beta * fp + eps)                          # Eq. 8
    return float(np.sum(np.maximum(1 - ti, 0) ** (1 / np.longdouble(gamma))))


def ref_ft_authors(logits, g, m, alpha, beta, gamma, eps, act):
    p, _ = probs64(logits, act)
    m = np.broadcast_to(m[..., None], p.shape)
    inputs, targets, mm = p.ravel(), g.ravel(), m.ravel()
    tp = np.sum(inputs * targets * mm)
    fp = np.sum((1 - targets) * inputs * mm)
    fn = np.sum(targets * (1 - inputs) * mm)
    tversky = (tp + eps) / (tp + alpha * fp + beta * fn + eps)
    return (1 - tversky) ** gamma


def ref_bce(logits, g, m, act, w=None):
    lp, l1mp = logs64(logits, act)
    w = np.ones_like(lp) if w is None else w
    m = np.broadcast_to(m[..., None], lp.shape)
    return np.sum(-w * m * (g * lp + (1 - g) * l1mp)) / np.sum(w * m)            # Eq. 9


def ref_weighted_bce_authors(logits, g, w, m):
    """The authors' Keras weighted_bce_loss, literally (softmax p clipped, back to logits)."""
    p = np.clip(softmax64(logits), 1e-7, 1 - 1e-7)
    x = np.log(p / (1 - p))
    loss = (1 - g) * x + (1 + (w - 1) * g) * (np.log(1 + np.exp(-np.abs(x))) + np.maximum(-x, 0))
    return np.sum(loss * m[..., None]) / np.sum(w)


def ref_dice(logits, g, m, act, w=None, squared=False, eps=1e-7):
    p, _ = probs64(logits, act)
    w = (np.ones_like(p) if w is None else w) * m[..., None]
    if squared:
        w = w * w
        return 1 - (2 * np.sum(w * g * p) + eps) / (np.sum(w * g ** 2) + np.sum(w * p ** 2) + eps)
    return 1 - (2 * np.sum(w * g * p) + eps) / (np.sum(w * p) + np.sum(w * g) + eps)  # Eq. 10


def ref_border_weights(g, m, kernel=11, border_weight=3.0):
    """TF 'SAME' average pooling excludes out-of-image pixels: mean = box(g m) / box(m)."""
    size = (1, kernel, kernel, 1)
    mm = np.broadcast_to(m[..., None], g.shape).astype(np.float64)
    num = ndimage.uniform_filter(g * mm, size=size, mode="constant")
    den = ndimage.uniform_filter(mm, size=size, mode="constant")
    a = np.where(den > 1e-12, num / np.maximum(den, 1e-12), 0)
    border = (a > 0.005) & (a < 0.995)
    w = (1 + (border_weight - 1) * border) * mm
    return w * mm.sum() / w.sum()


def ref_combo(logits, g, m, alpha, ratio, eps, form):
    p, _ = probs64(logits, "sigmoid")
    mm = np.broadcast_to(m[..., None], p.shape)
    dice = (2 * np.sum(g * p * mm) + eps) / (np.sum(g * mm) + np.sum(p * mm) + eps)
    if form == "paper":
        lp, l1mp = logs64(logits, "sigmoid")
        ce = -(alpha * g * lp + (1 - alpha) * (1 - g) * l1mp)                     # Eq. 12
    else:
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        ce = -(alpha * ((g * np.log(pc)) + ((1 - alpha) * (1.0 - g) * np.log(1.0 - pc))))
    return ratio * np.sum(ce * mm) / np.sum(mm) - (1 - ratio) * dice


# ---- random cases --------------------------------------------------------------------------

@st.composite
def seg_cases(draw):
    """Seg logits, labels, boundary logits/map and mask, with absent classes and edge cases."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
    kind = draw(st.sampled_from(["random", "random", "perfect", "background", "extreme"]))
    present = draw(st.integers(1, K))                   # classes that can occur in the target
    cls = rng.integers(0, present, (B, H, W))
    if kind == "background":
        cls[:] = 0
    # blocky labels so border weights see both interiors and borders
    cls = np.repeat(np.repeat(cls[:, ::4, ::4], 4, 1), 4, 2)
    bmap = (rng.random((B, H, W)) < 0.3).astype(np.float32)
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 15.0]))
    seg = rng.normal(size=(B, H, W, K)) * scale
    bdr = rng.normal(size=(B, H, W, 1)) * scale
    if kind in ("perfect", "background"):
        seg = 25.0 * (2 * np.eye(K)[cls] - 1)
        bdr = 25.0 * (2 * bmap[..., None] - 1)
    elif kind == "extreme":
        seg = 50.0 * rng.choice([-1.0, 1.0], size=seg.shape)
        bdr = 50.0 * rng.choice([-1.0, 1.0], size=bdr.shape)
    mask = np.ones((B, H, W), np.float32)
    if draw(st.booleans()):
        mask = (rng.random((B, H, W)) < 0.7).astype(np.float32)
        mask[0, 0, 0] = 1
    return {"seg": seg.astype(np.float32), "cls": cls.astype(np.int32),
            "bdr": bdr.astype(np.float32), "bmap": bmap, "mask": mask, "kind": kind}


def _onehot(cls):
    return np.eye(K)[cls]


# ---- tissue losses -------------------------------------------------------------------------

@jax.jit
def _tissue_losses(logits, labels, mask):
    return (L.focal_loss(logits, labels, 0.3, 5.0, mask),
            L.binary_focal_loss(logits, labels, 0.3, 5.0, mask),
            L.cross_entropy_loss(logits, labels, mask))


@SETTINGS
@given(seed=st.integers(0, 2 ** 31), scale=st.sampled_from([0.5, 3.0, 20.0, 50.0]),
       masked=st.booleans())
def test_focal_losses_match_reference(seed, scale, masked):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(4, T)) * scale).astype(np.float32)
    labels = rng.integers(0, T, 4)
    mask = np.array([1, 0, 1, 1], np.float32) if masked else np.ones(4, np.float32)
    focal, binary, ce_loss = _tissue_losses(logits, labels, mask)
    close(focal, ref_focal(logits, labels, 0.3, 5.0, mask))
    close(binary, ref_binary_focal(logits, labels, 0.3, 5.0, mask))
    ce = -np.log(softmax64(logits)[np.arange(4), labels])
    close(ce_loss, (ce * mask).sum() / mask.sum())


def test_focal_masked_example_has_no_influence_and_grads_are_finite():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, T)).astype(np.float32)
    labels = np.array([1, 2, 3])
    mask = np.array([1.0, 0.0, 1.0], np.float32)
    other = logits.copy()
    other[1] = 50.0 * rng.normal(size=T)
    fns = (functools.partial(L.focal_loss, alpha=0.3, gamma=5.0),
           functools.partial(L.binary_focal_loss, alpha=0.3, gamma=5.0), L.cross_entropy_loss)
    both = jax.jit(lambda x, y: [jax.value_and_grad(f)(x, y, mask=mask) for f in fns])
    a = both(logits, labels)
    b = both(other, np.array([1, 9, 3]))
    for (va, _), (vb, _) in zip(a, b):
        close(va, vb, atol=1e-7)
    perfect = (50.0 * (2 * np.eye(T)[labels] - 1)).astype(np.float32)
    for x in (perfect, -perfect, logits):
        assert all(np.all(np.isfinite(g)) for _, g in both(x, labels))
    # a perfect prediction costs (almost) nothing
    assert float(L.focal_loss(50.0 * np.eye(T)[labels], labels)) < 1e-12


# ---- focal Tversky -------------------------------------------------------------------------

@SETTINGS
@given(case=seg_cases())
def test_focal_tversky_matches_reference(case):
    seg, cls, m = case["seg"], case["cls"], case["mask"]
    g = _onehot(cls)
    close(L.focal_tversky_loss(seg, cls, 0.3, 0.7, 3.0, 1e-7, "paper", m),
          ref_ft_paper(seg, g, m, 0.3, 0.7, 3.0, 1e-7, "softmax"))
    close(L.seg_focal_tversky(seg, cls, 0.3, 0.7, 3.0, form="authors", mask=m),
          ref_ft_authors(seg, g, m, 0.3, 0.7, 3.0, 1e-6, "softmax"))
    bdr, bmap = case["bdr"], case["bmap"]
    close(L.boundary_focal_tversky(bdr, bmap, 0.3, 0.7, 5.0, form="paper", mask=m),
          ref_ft_paper(bdr, bmap[..., None], m, 0.3, 0.7, 5.0, 1e-7, "sigmoid"))
    close(L.boundary_focal_tversky(bdr, bmap, 0.3, 0.7, 5.0, form="authors", mask=m),
          ref_ft_authors(bdr, bmap[..., None], m, 0.3, 0.7, 5.0, 1e-6, "sigmoid"))
    # without background: the same sum over classes 1..C only
    close(L.focal_tversky_loss(seg, cls, 0.3, 0.7, 3.0, 1e-7, "paper", m, include_background=False),
          _ft_no_bg(seg, g, m))


def _ft_no_bg(seg, g, m):
    p, q = probs64(seg, "softmax")
    mm = np.asarray(m[..., None], np.longdouble)
    p, q, g = (np.asarray(a, np.longdouble)[..., 1:] for a in (p, q, g))
    tp, fn, fp = ((p * g * mm).sum((0, 1, 2)), (q * g * mm).sum((0, 1, 2)),
                  (p * (1 - g) * mm).sum((0, 1, 2)))
    ti = (tp + 1e-7) / (tp + 0.3 * fn + 0.7 * fp + 1e-7)
    return float(np.sum(np.maximum(1 - ti, 0) ** (1 / np.longdouble(3))))


def test_focal_tversky_empty_class_and_perfect_prediction():
    cls = np.zeros((B, H, W), np.int32)
    cls[:, 4:8, 4:8] = 2                         # classes 1, 3, 4, 5 absent
    perfect = 40.0 * (2 * _onehot(cls) - 1)
    # perfect: every class (absent ones included, nothing predicted there) has TI = 1 -> 0 loss
    assert float(L.focal_tversky_loss(perfect, cls, form="paper")) < 1e-5
    assert float(L.focal_tversky_loss(perfect, cls, form="authors")) < 1e-12
    # an absent class with predicted mass has TI ~ eps / (beta FP + eps) ~ 0: its term is ~1
    rng = np.random.default_rng(1)
    noisy = rng.normal(size=(B, H, W, K)).astype(np.float32)
    val = float(L.focal_tversky_loss(noisy, cls, form="paper"))
    ones = np.ones((B, H, W))
    close(val, ref_ft_paper(noisy, _onehot(cls), ones, 0.3, 0.7, 3.0, 1e-7, "softmax"))
    assert val > 4.0                              # 4 absent classes contribute ~1 each


# ---- BCE / Dice / border weights -----------------------------------------------------------

@SETTINGS
@given(case=seg_cases())
def test_bce_dice_match_reference(case):
    seg, cls, m, bdr, bmap = case["seg"], case["cls"], case["mask"], case["bdr"], case["bmap"]
    g = _onehot(cls)
    close(L.bce_loss(seg, cls, mask=m), ref_bce(seg, g, m, "softmax"))
    close(L.bce_loss(bdr, bmap, mask=m), ref_bce(bdr, bmap[..., None], m, "sigmoid"))
    close(L.dice_loss(seg, g, mask=m), ref_dice(seg, g, m, "softmax"))
    close(L.dice_loss(bdr, bmap, mask=m), ref_dice(bdr, bmap[..., None], m, "sigmoid"))
    w = ref_border_weights(g, m)
    close(L.bce_loss(seg, g, w, m), ref_bce(seg, g, m, "softmax", w))
    close(L.dice_loss(seg, g, w, m, squared=True, eps=1.0),
          ref_dice(seg, g, m, "softmax", w, True, 1.0))
    authors_bce = ref_weighted_bce_authors(seg, g, w, m)
    close(L.bce_loss(seg, g, w, m, positive_only=True, clip=True), authors_bce)
    close(L.weighted_bce_dice(seg, cls, m),
          authors_bce + ref_dice(seg, g, m, "softmax", w, True, 1.0))


@SETTINGS
@given(case=seg_cases())
def test_border_weights_match_uniform_filter(case):
    g, m = _onehot(case["cls"]), case["mask"]
    w = np.asarray(L.border_weights(g, 11, 3.0, m))
    close(w, ref_border_weights(g, m))
    valid = np.broadcast_to(m[..., None] > 0, w.shape)
    close(w[valid].mean(), 1.0)
    assert np.all(w[~valid] == 0)
    values = np.unique(np.round(w[valid], 5))
    assert len(values) in (1, 2)
    if len(values) == 2:
        close(values[1] / values[0], 3.0)


def test_border_weights_square():
    g = np.zeros((1, 40, 40, 2))
    g[..., 0] = 1
    g[0, 10:30, 10:30] = [0, 1]
    w = np.asarray(L.border_weights(g, 11, 3.0))
    hi, lo = w.max(), w.min()
    close(hi / lo, 3.0)
    assert w[0, 20, 20, 1] == lo and w[0, 20, 20, 0] == lo   # inside: both channels uniform
    assert w[0, 10, 20, 1] == hi and w[0, 14, 20, 0] == hi    # within 5 px of the edge
    assert w[0, 15, 20, 1] == lo                              # 6 px inside
    assert w[0, 0, 0, 0] == lo                                # image corner is not a border


# ---- Combo -----------------------------------------------------------------------------------

@SETTINGS
@given(case=seg_cases())
def test_combo_matches_reference(case):
    bdr, bmap, m = case["bdr"], case["bmap"], case["mask"]
    for form in ("paper", "authors"):
        close(L.combo_loss(bdr, bmap, 0.7, 0.4, 1e-6, form, m),
              ref_combo(bdr, bmap[..., None], m, 0.7, 0.4, 1e-6, form))


def test_combo_can_be_negative():
    bmap = np.zeros((1, 8, 8), np.float32)
    bmap[0, 2:5, 2:5] = 1
    perfect = 30.0 * (2 * bmap[..., None] - 1)
    assert float(L.combo_loss(perfect, bmap)) < -0.5          # -(1 - 0.4) * Dice ~ -0.6


# ---- masks and gradients ---------------------------------------------------------------------

@functools.cache
def _all_pixel_losses(form):
    """Every pixel loss as f(seg, cls, bdr, bmap, mask), jitted once per form (fixed shapes)."""
    fns = {
        "ft_seg": lambda s, c, b, bm, m: L.seg_focal_tversky(s, c, form=form, mask=m),
        "ft_bdr": lambda s, c, b, bm, m: L.boundary_focal_tversky(b, bm, form=form, mask=m),
        "bce": lambda s, c, b, bm, m: L.bce_loss(s, c, mask=m, clip=form == "authors"),
        "dice": lambda s, c, b, bm, m: L.dice_loss(s, c, mask=m),
        "wbd": lambda s, c, b, bm, m: L.weighted_bce_dice(s, c, m),
        "combo": lambda s, c, b, bm, m: L.combo_loss(b, bm, form=form, mask=m),
        "ce": lambda s, c, b, bm, m: L.cross_entropy_loss(s, c, m),
    }
    values = jax.jit(lambda *a: {k: f(*a) for k, f in fns.items()})
    grads = jax.jit(lambda *a: {k: jax.grad(f, argnums=(0, 2))(*a) for k, f in fns.items()})
    return values, grads


@SETTINGS
@given(case=seg_cases(), form=st.sampled_from(["paper", "authors"]))
def test_masked_pixels_do_not_influence(case, form):
    rng = np.random.default_rng(7)
    m = (rng.random((B, H, W)) < 0.6).astype(np.float32)
    off = m[..., None] == 0
    seg2 = np.where(off, rng.normal(size=case["seg"].shape) * 30, case["seg"]).astype(np.float32)
    bdr2 = np.where(off, -case["bdr"] + 5, case["bdr"]).astype(np.float32)
    cls2 = np.where(m == 0, rng.integers(0, K, m.shape), case["cls"])
    bmap2 = np.where(m == 0, 1 - case["bmap"], case["bmap"])
    values = _all_pixel_losses(form)[0]
    a = values(case["seg"], case["cls"], case["bdr"], case["bmap"], m)
    b = values(seg2, cls2, bdr2, bmap2, m)
    for name in a:
        close(a[name], b[name], atol=2e-6, err_msg=name)


@SETTINGS
@given(case=seg_cases(), form=st.sampled_from(["paper", "authors"]))
def test_gradients_finite(case, form):
    m = case["mask"]
    grads = _all_pixel_losses(form)[1](case["seg"], case["cls"], case["bdr"], case["bmap"], m)
    for name, (gs, gb) in grads.items():
        assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gb)), (name, case["kind"])


def test_all_masked_is_zero_and_finite():
    z = np.zeros((B, H, W), np.float32)
    seg = np.random.default_rng(0).normal(size=(B, H, W, K)).astype(np.float32)
    cls = np.zeros((B, H, W), np.int32)
    fns = (lambda s: L.bce_loss(s, cls, mask=z), lambda s: L.cross_entropy_loss(s, cls, z),
           lambda s: L.weighted_bce_dice(s, cls, z), lambda s: L.seg_focal_tversky(s, cls, mask=z),
           lambda s: L.dice_loss(s, cls, mask=z), lambda s: L.combo_loss(s[..., :1], cls, mask=z))
    results = jax.jit(lambda s: [jax.value_and_grad(f)(s) for f in fns])(jnp.asarray(seg))
    for val, grad in results:
        assert np.isfinite(val) and np.all(grad == 0)


# ---- total loss ----------------------------------------------------------------------------

def _batch(seed=0, size=H, tissue=True, dtype=np.float32):
    rng = np.random.default_rng(seed)
    cls = np.repeat(np.repeat(rng.integers(0, K, (B, 4, 4)), H // 4, 1), W // 4, 2)
    outputs = {"seg_logits": jnp.asarray(rng.normal(size=(B, size, size, K)), dtype),
               "boundary_logits": jnp.asarray(rng.normal(size=(B, size, size, 1)), dtype)}
    if tissue:
        outputs["tissue_logits"] = jnp.asarray(rng.normal(size=(B, T)), dtype)
    weight = np.ones((B, H, W), np.float32)
    weight[1] = 0                                    # a padding example
    targets = {"cls": jnp.asarray(cls, jnp.int32),
               "boundary": jnp.asarray(rng.random((B, H, W)) < 0.3, jnp.float32),
               "tissue": jnp.asarray([3, 7], jnp.int32), "weight": jnp.asarray(weight)}
    return outputs, targets


@functools.cache
def _jitted_loss(form="paper", seg="ft_bce_dice", bdr="ft_combo", tissue="focal"):
    """tsfd_loss under jit for one loss config (cached: one compile per config and shape)."""
    cfg = get_config().loss
    cfg.form, cfg.seg, cfg.boundary, cfg.tissue = form, seg, bdr, tissue
    cfg.w_tissue, cfg.w_seg, cfg.w_boundary = 0.5, 2.0, 3.0
    cfg.seg_aux_weight, cfg.boundary_aux_weight = 0.4, 0.9
    return jax.jit(lambda o, t: L.tsfd_loss(o, t, cfg))


@pytest.mark.parametrize("form,seg,bdr,tissue", [
    ("paper", "ft_bce_dice", "ft_combo", "focal"), ("authors", "ft_bce_dice", "ft_combo", "focal"),
    ("paper", "ft", "ft", "ce"), ("authors", "bce_dice", "combo", "ce"),
    ("paper", "ce", "bce", "focal")])
def test_tsfd_loss_terms_add_up(form, seg, bdr, tissue):
    outputs, targets = _batch()
    total, terms = _jitted_loss(form, seg, bdr, tissue)(outputs, targets)
    t = {k: float(v) for k, v in terms.items()}
    close(float(total), t["loss_tissue"] + t["loss_seg"] + t["loss_boundary"])
    close(t["loss_tissue"], 0.5 * t[f"tissue_{tissue}"])
    seg_expect = {"ft_bce_dice": lambda: t["seg_ft"] + 0.4 * (t["seg_bce"] + t["seg_dice"]),
                  "ft": lambda: t["seg_ft"], "bce_dice": lambda: t["seg_bce"] + t["seg_dice"],
                  "ce": lambda: t["seg_ce"]}[seg]()
    close(t["loss_seg"], 2.0 * seg_expect)
    bdr_expect = {"ft_combo": lambda: t["bdr_ft"] + 0.9 * t["bdr_combo"], "ft": lambda: t["bdr_ft"],
                  "combo": lambda: t["bdr_combo"], "bce": lambda: t["bdr_bce"]}[bdr]()
    close(t["loss_boundary"], 3.0 * bdr_expect)
    parts = {f"seg_{n}" for n in L.SEG_LOSSES[seg]} | {f"bdr_{n}" for n in L.BOUNDARY_LOSSES[bdr]}
    assert set(t) == parts | {f"tissue_{tissue}", "loss_tissue", "loss_seg", "loss_boundary"}
    # the padding example (weight 0) is out of the tissue loss
    logits = np.asarray(outputs["tissue_logits"])[:1]
    expect = {("focal", "paper"): ref_focal(logits, np.array([3]), 0.3, 5.0, np.ones(1)),
              ("focal", "authors"): ref_binary_focal(logits, np.array([3]), 0.3, 5.0, np.ones(1)),
              ("ce", "paper"): -np.log(softmax64(logits)[0, 3])}
    expect[("ce", "authors")] = expect[("ce", "paper")]
    close(t[f"tissue_{tissue}"], expect[(tissue, form)])


@pytest.mark.parametrize("form", ["paper", "authors"])
def test_tsfd_loss_components_match_reference(form):
    outputs, targets = _batch(seed=3)
    _, t = _jitted_loss(form)(outputs, targets)
    seg, bdr = np.asarray(outputs["seg_logits"]), np.asarray(outputs["boundary_logits"])
    cls, bmap, m = (np.asarray(targets[k]) for k in ("cls", "boundary", "weight"))
    g = _onehot(cls)
    if form == "paper":
        close(t["seg_ft"], ref_ft_paper(seg, g, m, 0.3, 0.7, 3.0, 1e-7, "softmax"))
        close(t["seg_bce"], ref_bce(seg, g, m, "softmax"))
        close(t["seg_dice"], ref_dice(seg, g, m, "softmax"))
        close(t["bdr_ft"], ref_ft_paper(bdr, bmap[..., None], m, 0.3, 0.7, 5.0, 1e-7, "sigmoid"))
    else:
        w = ref_border_weights(g, m)
        close(t["seg_ft"], ref_ft_authors(seg, g, m, 0.3, 0.7, 3.0, 1e-6, "softmax"))
        close(t["seg_bce"], ref_weighted_bce_authors(seg, g, w, m))
        close(t["seg_dice"], ref_dice(seg, g, m, "softmax", w, True, 1.0))
        close(t["bdr_ft"], ref_ft_authors(bdr, bmap[..., None], m, 0.3, 0.7, 5.0, 1e-6, "sigmoid"))
    close(t["bdr_combo"], ref_combo(bdr, bmap[..., None], m, 0.7, 0.4, 1e-6, form))


def test_contact_weight_weighs_the_boundary_bce_between_touching_nuclei():
    outputs, targets = _batch(seed=5)
    rng = np.random.default_rng(6)
    contact = (rng.random(np.shape(targets["boundary"])) < 0.1).astype(np.float32)
    targets = {**targets, "contact": jnp.asarray(contact)}
    cfg = get_config().loss
    cfg.boundary = "bce"
    _, plain = L.tsfd_loss(outputs, targets, cfg)
    cfg.contact_weight = 9.0
    _, weighted = L.tsfd_loss(outputs, targets, cfg)
    bdr, bmap, m = (np.asarray(x) for x in (outputs["boundary_logits"], targets["boundary"],
                                            targets["weight"]))
    close(plain["bdr_bce"], ref_bce(bdr, bmap[..., None], m, "sigmoid"))
    close(weighted["bdr_bce"], ref_bce(bdr, bmap[..., None], m, "sigmoid",
                                       (1 + 9.0 * contact)[..., None]))
    assert abs(float(weighted["bdr_bce"]) - float(plain["bdr_bce"])) > 1e-3
    close(weighted["seg_ft"], plain["seg_ft"])  # the class terms do not change


def ref_hv_gradients(hv):
    """HoVer-Net's 5 x 5 Sobel kernels (x / (x^2 + y^2), y / (x^2 + y^2)) by scipy, float64,
    zeros beyond the edge."""
    r = np.arange(-2, 3, dtype=np.float64)
    y, x = np.meshgrid(r, r, indexing="ij")
    den = x * x + y * y
    den[2, 2] = 1.0
    kh, kv = x / den, y / den
    out = np.zeros(hv.shape, np.float64)
    for b in range(hv.shape[0]):
        out[b, ..., 0] = ndimage.correlate(hv[b, ..., 0].astype(np.float64), kh, mode="constant")
        out[b, ..., 1] = ndimage.correlate(hv[b, ..., 1].astype(np.float64), kv, mode="constant")
    return out


def test_hv_losses_match_reference():
    outputs, targets = _batch(seed=8)
    rng = np.random.default_rng(9)
    pred = rng.normal(size=(B, H, W, 2))
    true = np.clip(rng.normal(size=(B, H, W, 2)), -1, 1) * (np.asarray(targets["cls"]) > 0)[..., None]
    outputs = {**outputs, "boundary_logits": jnp.asarray(pred, jnp.float32)}
    targets = {**targets, "boundary": jnp.asarray(true, jnp.float32)}
    cfg = get_config().loss
    cfg.boundary, cfg.w_boundary, cfg.hv_gradient_weight = "mse_msge", 1.5, 2.0
    _, t = jax.jit(lambda o, g: L.tsfd_loss(o, g, cfg))(outputs, targets)
    m = np.asarray(targets["weight"])[..., None] * np.ones((1, 1, 1, 2))
    close(t["bdr_mse"], np.sum(m * (pred - true) ** 2) / np.sum(m))
    focus = m * (np.asarray(targets["cls"]) > 0)[..., None]
    g = ref_hv_gradients(pred) - ref_hv_gradients(true)
    close(t["bdr_msge"], np.sum(focus * g * g) / np.sum(focus))
    close(t["loss_boundary"], 1.5 * (float(t["bdr_mse"]) + 2.0 * float(t["bdr_msge"])))
    # Perfect maps cost nothing.
    _, zero = L.tsfd_loss({**outputs, "boundary_logits": targets["boundary"]}, targets, cfg)
    assert float(zero["bdr_mse"]) == 0 and float(zero["bdr_msge"]) == 0


def test_hv_target_and_loss_go_together():
    from tsfd_jax.ops.preprocess import check_boundary_kind
    cfg = get_config()
    cfg.targets.boundary_kind = "hv"
    with pytest.raises(UserError, match="mse_msge"):
        check_boundary_kind(cfg)  # one line at the command line, not a traceback
    cfg.loss.boundary = "mse_msge"
    assert check_boundary_kind(cfg) == "hv"
    cfg.targets.boundary_kind = "contour"
    with pytest.raises(UserError, match="mse_msge"):
        check_boundary_kind(cfg)


def test_tsfd_loss_cbb_resize_bf16_and_bad_names():
    tsfd_loss = _jitted_loss()
    # CBB: no tissue head, no tissue term
    outputs, targets = _batch(tissue=False)
    total, terms = tsfd_loss(outputs, targets)
    assert not any(k.startswith("tissue") or k == "loss_tissue" for k in terms)
    close(float(total), float(terms["loss_seg"] + terms["loss_boundary"]))
    # logits at half the label size are resized bilinearly to it
    small, targets = _batch(size=H // 2)
    up = {k: (jax.image.resize(v, (B, H, W, v.shape[-1]), "bilinear", antialias=False)
              if v.ndim == 4 else v) for k, v in small.items()}
    close(float(tsfd_loss(small, targets)[0]), float(tsfd_loss(up, targets)[0]))
    # spatially constant logits are unchanged by the resize
    const = {k: (jnp.broadcast_to(v[:, :1, :1], v.shape) if v.ndim == 4 else v)
             for k, v in small.items()}
    const_full = {k: (jnp.broadcast_to(v[:, :1, :1], (B, H, W, v.shape[-1])) if v.ndim == 4 else v)
                  for k, v in small.items()}
    close(float(tsfd_loss(const, targets)[0]), float(tsfd_loss(const_full, targets)[0]))
    # bf16 logits: float32 maths on the rounded values
    o16, _ = _batch(dtype=jnp.bfloat16)
    total16, terms16 = tsfd_loss(o16, targets)
    o32 = {k: v.astype(jnp.float32) for k, v in o16.items()}
    assert total16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in terms16.values())
    close(float(total16), float(tsfd_loss(o32, targets)[0]))
    # gradients of the total are finite
    g = jax.grad(lambda o: tsfd_loss(o, targets)[0])(outputs)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g))
    bad_values = (("seg", "ft_lovasz"), ("boundary", "x"), ("tissue", "hinge"), ("form", "code"))
    for key, bad in bad_values:
        c = get_config().loss
        c[key] = bad
        with pytest.raises(UserError, match=f"loss.{key}"):
            L.tsfd_loss(outputs, targets, c)
