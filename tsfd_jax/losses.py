"""Losses of TSFD-Net (PAPER §3.4, Eq. 5-12, Table 3) and the authors' code variants.

    L_total = l_tc L_tc + l_seg L_seg + l_bdr L_bdr                    (Eq. 5)
    L_tc    = focal loss on the tissue class                           (Eq. 6)
    L_seg   = L_FT + w_seg (L_BCE + L_Dice)                            (Eq. 7-10)
    L_bdr   = L_FT + w_bdr L_Combo                                     (Eq. 11-12)

FT = focal Tversky, BCE = binary cross-entropy, Combo = weighted CE minus the Dice coefficient.
Every function is pure, batch-first, takes **logits** (never probabilities), computes in float32,
and accepts a validity ``mask`` (per pixel (B, H, W), or per example for the tissue losses) that
removes pixels/examples from every sum and mean. ``form="paper"`` follows the equations;
``form="authors"`` gives the authors' Keras code (binary element-wise focal, one global Tversky
with the exponent gamma used directly, the Combo bracket bug). docs/losses.md gives every formula as
implemented and every reading of an ambiguous equation. Hyper-parameters and switches are Python
values (static under ``jax.jit``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tsfd_jax.errors import UserError
from tsfd_jax.ops.resize import resize_bilinear

Array = jax.Array
FORMS = ("paper", "authors")
KERAS_EPS = 1e-7                       # Keras epsilon(): the authors clip p to [1e-7, 1 - 1e-7]
FT_EPS = {"paper": 1e-7, "authors": 1e-6}  # Table 3 epsilon; the authors' ``smooth``
# Named loss combinations (Table 6). With "ft" present every other term is an auxiliary term
# multiplied by the aux weight (Eq. 7 and 11); without it the terms are summed with weight 1.
SEG_LOSSES = {"ft": ("ft",), "ft_bce_dice": ("ft", "bce", "dice"), "bce_dice": ("bce", "dice"),
              "ft_ce": ("ft", "ce"), "ce": ("ce",), "dice": ("dice",)}
BOUNDARY_LOSSES = {"ft": ("ft",), "ft_combo": ("ft", "combo"), "combo": ("combo",),
                   "ft_bce": ("ft", "bce"), "bce": ("bce",), "bce_dice": ("bce", "dice"),
                   "mse_msge": ("mse", "msge")}  # for targets.boundary_kind="hv" only
TISSUE_LOSSES = ("focal", "ce")


# ---- helpers ---------------------------------------------------------------------------------

def _f32(x: Any) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def _activation(logits: Array, activation: str) -> str:
    if activation == "auto":
        return "sigmoid" if logits.shape[-1] == 1 else "softmax"
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"activation must be auto, sigmoid or softmax, got {activation!r}")
    return activation


def _log_probs(logits: Array, activation: str) -> tuple[Array, Array]:
    """(log p, log(1 - p)) of sigmoid or softmax logits, both without cancellation.

    For softmax only the arg-max class can have p > 1/2; its complement is taken as
    logsumexp(other logits) - logsumexp(all), exact even where p rounds to 1 in float32.
    """
    if activation == "sigmoid":
        return jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    top = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=bool)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    lse_others = jax.nn.logsumexp(logits, axis=-1, keepdims=True, where=~top)
    # The unselected where-branch gets a harmless value so its gradient stays finite.
    low = jnp.log1p(-jnp.exp(jnp.where(top, -1.0, log_p)))
    return log_p, jnp.where(top, lse_others - lse, low)


def _clip_logs(log_p: Array, log_1mp: Array) -> tuple[Array, Array]:
    """log of p clipped to [1e-7, 1 - 1e-7] (Keras), done in the log domain."""
    lo, hi = jnp.log(KERAS_EPS), jnp.log1p(-KERAS_EPS)
    return jnp.clip(log_p, lo, hi), jnp.clip(log_1mp, lo, hi)


def _pow(x: Array, e: float, tiny: float = 1e-30) -> Array:
    """x**e for x >= 0 with a finite gradient at 0 (x**(1/gamma) has an infinite slope there)."""
    pos = x > tiny
    return jnp.where(pos, jnp.where(pos, x, 1.0) ** e, 1.0 if e == 0 else 0.0)


def _div(num: Array, den: Array) -> Array:
    """num / den, 0 where den == 0 (every pixel masked), with finite gradients."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _dense_target(target: Array, logits: Array) -> Array:
    """Target shaped like logits: int labels (B, H, W) -> one-hot, (B, H, W) -> (B, H, W, 1)."""
    k = logits.shape[-1]
    if target.ndim == logits.ndim - 1:
        if k == 1:
            return _f32(target)[..., None]
        return jax.nn.one_hot(target, k, dtype=jnp.float32)
    if target.shape != logits.shape:
        raise ValueError(f"target shape {target.shape} does not fit logits {logits.shape}")
    return _f32(target)


def _pixel_mask(mask: Array | None, like: Array) -> Array:
    """(B, H, W) validity -> broadcastable (B, H, W, 1); all ones when None."""
    if mask is None:
        return jnp.ones(like.shape[:-1] + (1,), jnp.float32)
    return _f32(mask)[..., None]


# ---- tissue classification (Eq. 6) ----------------------------------------------------------

def focal_loss(logits: Array, labels: Array, alpha: float = 0.3, gamma: float = 5.0,
               mask: Array | None = None) -> Array:
    """Categorical focal loss, PAPER Eq. 6: mean over valid examples of -a (1-p_t)^g log p_t.

    ``alpha`` is one scalar weight on the target-class term (a_t = alpha for every class).
    logits (B, T); labels (B,) int; mask (B,) validity. Any leading shape works the same way.
    """
    logits = _f32(logits)
    log_p, log_1mp = _log_probs(logits, "softmax")
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    log_pt = jnp.sum(onehot * log_p, -1)
    one_minus_pt = jnp.exp(jnp.sum(onehot * log_1mp, -1))
    loss = -alpha * _pow(one_minus_pt, gamma) * log_pt          # Eq. 6
    m = jnp.ones_like(loss) if mask is None else _f32(mask)
    return _div(jnp.sum(loss * m), jnp.sum(m))


def binary_focal_loss(logits: Array, labels: Array, alpha: float = 0.3, gamma: float = 5.0,
                      mask: Array | None = None) -> Array:
    """The authors' focal loss: element-wise binary focal on softmax(logits) vs one-hot labels.

    BCE_e = -(g log p + (1-g) log(1-p)) with p clipped to [1e-7, 1-1e-7];
    loss = mean over the B*T elements of valid examples of alpha (1 - exp(-BCE_e))^gamma BCE_e.
    logits (B, T); labels (B,) int; mask (B,).
    """
    logits = _f32(logits)
    log_p, log_1mp = _clip_logs(*_log_probs(logits, "softmax"))
    g = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    bce = -(g * log_p + (1 - g) * log_1mp)
    loss = alpha * _pow(-jnp.expm1(-bce), gamma) * bce
    m = jnp.ones(loss.shape[:-1], jnp.float32) if mask is None else _f32(mask)
    return _div(jnp.sum(loss * m[..., None]), jnp.sum(m) * logits.shape[-1])


def cross_entropy_loss(logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """Categorical cross-entropy, mean over valid positions. logits (..., K); labels, mask (...)."""
    logits = _f32(logits)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    loss = -jnp.sum(onehot * jax.nn.log_softmax(logits, -1), -1)
    m = jnp.ones_like(loss) if mask is None else _f32(mask)
    return _div(jnp.sum(loss * m), jnp.sum(m))


# ---- focal Tversky (Eq. 8) ------------------------------------------------------------------

def focal_tversky_loss(logits: Array, target: Array, alpha: float = 0.3, beta: float = 0.7,
                       gamma: float = 3.0, eps: float | None = None, form: str = "paper",
                       mask: Array | None = None, activation: str = "auto",
                       include_background: bool = True) -> Array:
    """Focal Tversky loss, PAPER Eq. 8 (``form="paper"``) or the authors' global form.

    paper:   sum_c (1 - TI_c)^(1/gamma),
             TI_c = (TP_c + eps) / (TP_c + alpha FN_c + beta FP_c + eps),
             TP_c = sum p g, FN_c = sum (1-p) g, FP_c = sum p (1-g) over the whole batch and all
             valid pixels of class c (alpha weighs FN, beta FP); eps defaults to 1e-7 (Table 3).
    authors: (1 - T)^gamma with one T over all pixels and classes together,
             T = (TP + eps) / (TP + alpha FP + beta FN + eps) (roles of alpha/beta swapped),
             eps defaults to 1e-6.
    logits (B, H, W, K) (softmax for K > 1, sigmoid for K = 1 under ``activation="auto"``);
    target (B, H, W, K) one-hot/binary, or (B, H, W) int labels (K > 1) / binary map (K = 1);
    mask (B, H, W). ``include_background=False`` drops channel 0 of a softmax output.
    """
    _check_form(form)
    logits = _f32(logits)
    g = _dense_target(target, logits)
    act = _activation(logits, activation)
    log_p, log_1mp = _log_probs(logits, act)
    p, q = jnp.exp(log_p), jnp.exp(log_1mp)      # q = 1 - p, exact near p = 1
    if not include_background and act == "softmax":
        p, q, g = p[..., 1:], q[..., 1:], g[..., 1:]
    m = _pixel_mask(mask, logits)
    axes = tuple(range(logits.ndim - 1)) if form == "paper" else None
    tp = jnp.sum(p * g * m, axis=axes)
    fn = jnp.sum(q * g * m, axis=axes)
    fp = jnp.sum(p * (1 - g) * m, axis=axes)
    eps = FT_EPS[form] if eps is None else eps
    if form == "paper":
        # 1 - TI_c written as one fraction: exact for tiny errors, where (.)^(1/gamma) is steep.
        errors = alpha * fn + beta * fp
        return jnp.sum(_pow(errors / (tp + errors + eps), 1.0 / gamma))   # Eq. 8
    errors = alpha * fp + beta * fn
    return _pow(errors / (tp + errors + eps), gamma)


def seg_focal_tversky(seg_logits: Array, cls: Array, alpha: float = 0.3, beta: float = 0.7,
                      gamma: float = 3.0, eps: float | None = None, form: str = "paper",
                      mask: Array | None = None, include_background: bool = True) -> Array:
    """Eq. 8 on the softmax segmentation output: seg_logits (B, H, W, C+1), cls (B, H, W) int."""
    return focal_tversky_loss(seg_logits, cls, alpha, beta, gamma, eps, form, mask, "softmax",
                              include_background)


def boundary_focal_tversky(boundary_logits: Array, boundary: Array, alpha: float = 0.3,
                           beta: float = 0.7, gamma: float = 5.0, eps: float | None = None,
                           form: str = "paper", mask: Array | None = None) -> Array:
    """Eq. 8 on the sigmoid boundary output: logits (B, H, W, 1), boundary (B, H, W) in {0, 1}."""
    return focal_tversky_loss(boundary_logits, boundary, alpha, beta, gamma, eps, form, mask,
                              "sigmoid")


# ---- BCE, Dice, border weights (Eq. 9-10) ---------------------------------------------------

def bce_loss(logits: Array, target: Array, weights: Array | None = None,
             mask: Array | None = None, *, activation: str = "auto",
             positive_only: bool = False, clip: bool = False) -> Array:
    """Binary cross-entropy per element, PAPER Eq. 9: sum(w m bce) / sum(w m).

    bce = -(g log p + (1-g) log(1-p)) on sigmoid or softmax probabilities (softmax: one binary
    problem per channel, as the authors). ``positive_only`` is the authors' weighting: the weight
    multiplies only the g=1 term, -(1-g) log(1-p) - w g log p, still normalised by sum(w m).
    ``clip`` clips p to [1e-7, 1-1e-7] as Keras does; otherwise the logs are exact.
    logits, weights (B, H, W, K); target (B, H, W, K) or labels (B, H, W); mask (B, H, W).
    """
    logits = _f32(logits)
    g = _dense_target(target, logits)
    log_p, log_1mp = _log_probs(logits, _activation(logits, activation))
    if clip:
        log_p, log_1mp = _clip_logs(log_p, log_1mp)
    m = _pixel_mask(mask, logits)
    w = jnp.ones_like(logits) if weights is None else jnp.broadcast_to(_f32(weights), logits.shape)
    if positive_only:
        # = the authors' (1-g) x + (1+(w-1)g) softplus(-x) with x = logit(p)
        elem = -(1 - g) * log_1mp - w * g * log_p
    else:
        elem = -w * (g * log_p + (1 - g) * log_1mp)               # Eq. 9
    return _div(jnp.sum(elem * m), jnp.sum(w * m))


def dice_loss(logits: Array, target: Array, weights: Array | None = None,
              mask: Array | None = None, *, activation: str = "auto", squared: bool = False,
              eps: float = 1e-7) -> Array:
    """Soft Dice loss, PAPER Eq. 10, one global score over batch, pixels and channels.

    plain:   1 - (2 sum w p g + eps) / (sum w p + sum w g + eps)
    squared: 1 - (2 sum w^2 g p + eps) / (sum w^2 g^2 + sum w^2 p^2 + eps)   (authors, eps = 1)
    Masked pixels get weight 0. Shapes as ``bce_loss``.
    """
    logits = _f32(logits)
    g = _dense_target(target, logits)
    p = jnp.exp(_log_probs(logits, _activation(logits, activation))[0])
    w = _pixel_mask(mask, logits) * (1.0 if weights is None else _f32(weights))
    if squared:
        w2 = w * w
        score = (2 * jnp.sum(w2 * g * p) + eps) / (jnp.sum(w2 * g * g) + jnp.sum(w2 * p * p) + eps)
    else:
        score = (2 * jnp.sum(w * g * p) + eps) / (jnp.sum(w * p) + jnp.sum(w * g) + eps)  # Eq. 10
    return 1.0 - score


def _box_sum(x: Array, k: int) -> Array:
    """Sum over a k x k window (TF 'SAME' placement, zeros outside) of (B, H, W, K), separably."""
    x = lax.reduce_window(x, 0.0, lax.add, (1, k, 1, 1), (1, 1, 1, 1), "SAME")
    return lax.reduce_window(x, 0.0, lax.add, (1, 1, k, 1), (1, 1, 1, 1), "SAME")


def border_weights(target_onehot: Array, kernel: int = 11, border_weight: float = 3.0,
                   mask: Array | None = None) -> Array:
    """The authors' border weights (docs/losses.md), one per pixel and channel.

    A = k x k stride-1 'SAME' average of the one-hot per channel, counting only pixels inside the
    image (TF average pooling excludes the padding) and inside ``mask``; border = 0.005 < A < 0.995;
    w = 1 + (border_weight - 1) border, 0 on masked pixels, renormalised so the mean weight over
    valid elements (pixels x channels, whole batch) is 1.
    target_onehot (B, H, W, K); mask (B, H, W) -> (B, H, W, K).
    """
    g = _f32(target_onehot)
    m = (_pixel_mask(mask, g) > 0).astype(jnp.float32)
    # Keeps XLA from constant-folding the window sums when the target or mask is a jit constant
    # (a default all-ones mask took ~10 s to fold at 8x256x256).
    g, m = lax.optimization_barrier((g, m))
    count = _box_sum(m, kernel)
    avg = _div(_box_sum(g * m, kernel), count)
    border = ((avg > 0.005) & (avg < 0.995)).astype(jnp.float32)
    w = (1.0 + (border_weight - 1.0) * border) * m
    n_valid = jnp.sum(m) * g.shape[-1]
    return w * _div(n_valid, jnp.sum(w))


def weighted_bce_dice(logits: Array, target: Array, mask: Array | None = None,
                      kernel: int = 11, border_weight: float = 3.0) -> Array:
    """The authors' segmentation auxiliary loss (docs/losses.md): weighted BCE + squared Dice.

    w = border_weights(one-hot); BCE weighted on positive elements only (p clipped as Keras),
    normalised by sum(w); Dice squared with weights w^2 and smoothing 1.
    logits (B, H, W, K); target (B, H, W) int labels or (B, H, W, K); mask (B, H, W).
    """
    logits = _f32(logits)
    g = _dense_target(target, logits)
    w = border_weights(g, kernel, border_weight, mask)
    bce = bce_loss(logits, g, w, mask, positive_only=True, clip=True)
    dice = dice_loss(logits, g, w, mask, squared=True, eps=1.0)
    return bce + dice


# ---- Combo (Eq. 12) -------------------------------------------------------------------------

# ---- horizontal and vertical maps (not the paper; HoVer-Net, Graham et al. 2019, §3.3) --------

def _sobel_kernels(size: int = 5) -> tuple[list, list]:
    """HoVer-Net's gradient kernels: k_h[i][j] = x / (x^2 + y^2) (x the column offset, y the row
    offset, from -(size//2) to size//2), k_v the same with y; 0 at the centre."""
    r = range(-(size // 2), size // 2 + 1)
    kh = [[x / (x * x + y * y) if (x or y) else 0.0 for x in r] for y in r]
    kv = [[y / (x * x + y * y) if (x or y) else 0.0 for x in r] for y in r]
    return kh, kv


def _correlate(x: Array, kernel: list) -> Array:
    """(B, H, W) correlated with a square kernel, zeros beyond the edge ('same' size)."""
    k = len(kernel)
    r = k // 2
    h, w = x.shape[-2:]
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(r, r), (r, r)])
    out = jnp.zeros_like(x)
    for i in range(k):
        for j in range(k):
            if kernel[i][j]:
                out = out + kernel[i][j] * xp[..., i:i + h, j:j + w]
    return out


def hv_gradients(hv: Array) -> Array:
    """(B, H, W, 2) maps -> (B, H, W, 2): the horizontal map's x-gradient and the vertical map's
    y-gradient by HoVer-Net's 5 x 5 Sobel kernels."""
    kh, kv = _sobel_kernels(5)
    return jnp.stack([_correlate(hv[..., 0], kh), _correlate(hv[..., 1], kv)], -1)


def mse_loss(pred: Array, target: Array, mask: Array | None = None) -> Array:
    """Mean squared error over valid pixels and every channel. pred, target (B, H, W, K)."""
    pred, target = _f32(pred), _f32(target)
    m = jnp.broadcast_to(_pixel_mask(mask, pred), pred.shape)
    return _div(jnp.sum(m * (pred - target) ** 2), jnp.sum(m))


def msge_loss(pred: Array, target: Array, focus: Array) -> Array:
    """HoVer-Net's mean squared gradient error: the squared difference of ``hv_gradients`` of
    prediction and target, averaged over the pixels of ``focus`` (B, H, W: valid nucleus
    pixels) and both channels. pred, target (B, H, W, 2)."""
    g = hv_gradients(_f32(pred)) - hv_gradients(_f32(target))
    m = jnp.broadcast_to(_pixel_mask(focus, g), g.shape)
    return _div(jnp.sum(m * g * g), jnp.sum(m))


def combo_loss(logits: Array, target: Array, alpha: float = 0.7, ce_ratio: float = 0.4,
               eps: float = 1e-6, form: str = "paper", mask: Array | None = None,
               activation: str = "auto") -> Array:
    """Combo loss, PAPER Eq. 12: ce_ratio * weighted CE - (1 - ce_ratio) * Dice coefficient.

    paper:   CE_e = -(alpha g log p + (1-alpha)(1-g) log(1-p)), exact logs.
    authors: CE_e = -alpha (g log p + (1-alpha)(1-g) log(1-p)) (their bracket), p clipped to
             [1e-7, 1-1e-7] for the logs.
    CE = mean of CE_e over valid elements; Dice = (2 sum g p + eps) / (sum g + sum p + eps) over
    everything valid. The Dice *coefficient* is subtracted, so the loss can be negative.
    logits (B, H, W, K) (boundary: K = 1); target same shape or (B, H, W); mask (B, H, W).
    """
    _check_form(form)
    logits = _f32(logits)
    g = _dense_target(target, logits)
    log_p, log_1mp = _log_probs(logits, _activation(logits, activation))
    p = jnp.exp(log_p)
    m = _pixel_mask(mask, logits)
    dice = (2 * jnp.sum(g * p * m) + eps) / (jnp.sum(g * m) + jnp.sum(p * m) + eps)
    if form == "paper":
        ce = -(alpha * g * log_p + (1 - alpha) * (1 - g) * log_1mp)
    else:
        log_p, log_1mp = _clip_logs(log_p, log_1mp)
        ce = -alpha * (g * log_p + (1 - alpha) * (1 - g) * log_1mp)
    ce = _div(jnp.sum(ce * m), jnp.sum(m * jnp.ones_like(logits)))
    return ce_ratio * ce - (1 - ce_ratio) * dice                # Eq. 12


# ---- total (Eq. 5, 7, 11) -------------------------------------------------------------------

def check_loss_config(cfg_loss: Any) -> None:
    """Raise UserError naming the key when a loss switch has an unknown value."""
    for key, allowed in (("form", FORMS), ("tissue", TISSUE_LOSSES), ("seg", tuple(SEG_LOSSES)),
                         ("boundary", tuple(BOUNDARY_LOSSES))):
        if cfg_loss[key] not in allowed:
            raise UserError(f"loss.{key}: unknown value {cfg_loss[key]!r} "
                            f"(choose from {', '.join(allowed)})")


def _weighted_sum(terms: dict[str, Array], prefix: str, names: tuple[str, ...],
                  aux_weight: float, weights: dict[str, float] | None = None) -> Array:
    """FT plus aux_weight times the other terms (Eq. 7 / 11); without FT a sum with weight 1
    or the term's entry in ``weights``."""
    w = aux_weight if "ft" in names else 1.0
    weights = weights or {}
    return sum(terms[f"{prefix}_{n}"] * (1.0 if n == "ft" else weights.get(n, w)) for n in names)


def tsfd_loss(outputs: dict, targets: dict, cfg_loss: Any) -> tuple[Array, dict[str, Array]]:
    """Total TSFD-Net loss, PAPER Eq. 5, and every term for logging.

    outputs: ``seg_logits`` (B, h, w, C+1), ``boundary_logits`` (B, h, w, 1), ``tissue_logits``
    (B, T) (absent for CBB: no tissue term). targets: ``cls`` (B, H, W) int, ``boundary`` (B, H, W)
    float, ``tissue`` (B,) int, ``weight`` (B, H, W) validity (an example with no valid pixel is
    left out of the tissue loss). Logits of another spatial size are resized bilinearly to
    (H, W) (no antialiasing). ``cfg_loss`` is the ``loss`` config (configs/default.py), as a
    ConfigDict or a dict. Returns (total, terms): components (``tissue_focal``/``tissue_ce``,
    ``seg_ft``, ``seg_bce``, ``seg_dice``, ``seg_ce``, ``bdr_ft``, ``bdr_combo``, ``bdr_bce``,
    ``bdr_dice``, ``bdr_mse``, ``bdr_msge``, those in use) and the weighted totals
    ``loss_tissue``, ``loss_seg``, ``loss_boundary`` whose sum is ``total``. Not the paper: with
    ``boundary="mse_msge"`` boundary logits and target are HoVer-Net's two maps (B, h, w, 2) and
    the boundary loss is mse + ``hv_gradient_weight`` x msge (docs/losses.md).
    """
    c = cfg_loss
    check_loss_config(c)
    form = c["form"]
    authors = form == "authors"
    hw = tuple(targets["cls"].shape[1:3])
    seg = resize_bilinear(_f32(outputs["seg_logits"]), hw)
    bdr = resize_bilinear(_f32(outputs["boundary_logits"]), hw)
    mask = _f32(targets["weight"]) if "weight" in targets else jnp.ones(hw, jnp.float32)[None]
    mask = jnp.broadcast_to(mask, targets["cls"].shape)
    cls = targets["cls"].astype(jnp.int32)
    onehot = jax.nn.one_hot(cls, seg.shape[-1], dtype=jnp.float32)
    bmap = _f32(targets["boundary"])
    ft_eps = None if authors else float(c["epsilon"])
    terms: dict[str, Array] = {}

    if "tissue_logits" in outputs:
        tissue_logits = _f32(outputs["tissue_logits"])
        valid = (jnp.max(mask.reshape(mask.shape[0], -1), axis=1) > 0).astype(jnp.float32)
        labels = targets["tissue"].astype(jnp.int32)
        if c["tissue"] == "ce":
            terms["tissue_ce"] = cross_entropy_loss(tissue_logits, labels, valid)
        else:
            focal = binary_focal_loss if authors else focal_loss
            terms["tissue_focal"] = focal(tissue_logits, labels, c["focal_alpha"],
                                          c["focal_gamma"], valid)

    seg_names = SEG_LOSSES[c["seg"]]
    if "ft" in seg_names:
        a, b, gm = c["seg_ft"]
        terms["seg_ft"] = focal_tversky_loss(seg, onehot, a, b, gm, ft_eps, form, mask, "softmax")
    if "bce" in seg_names or "dice" in seg_names:
        w = border_weights(onehot, 11, c["border_weight"], mask) if authors else None
        if "bce" in seg_names:
            terms["seg_bce"] = bce_loss(seg, onehot, w, mask, activation="softmax",
                                        positive_only=authors, clip=authors)
        if "dice" in seg_names:
            terms["seg_dice"] = dice_loss(seg, onehot, w, mask, activation="softmax",
                                          squared=authors, eps=1.0 if authors else c["epsilon"])
    if "ce" in seg_names:
        terms["seg_ce"] = cross_entropy_loss(seg, cls, mask)

    bdr_names = BOUNDARY_LOSSES[c["boundary"]]
    if "ft" in bdr_names:
        a, b, gm = c["boundary_ft"]
        terms["bdr_ft"] = focal_tversky_loss(bdr, bmap, a, b, gm, ft_eps, form, mask, "sigmoid")
    if "combo" in bdr_names:
        terms["bdr_combo"] = combo_loss(bdr, bmap, c["combo_alpha"], c["combo_ce_ratio"],
                                        form=form, mask=mask, activation="sigmoid")
    if "bce" in bdr_names:
        # Pixels between touching nuclei weigh 1 + contact_weight (the U-Net paper's separation
        # weight, simplified): they are few, and they are what splits a cluster into nuclei.
        cw = float(c.get("contact_weight", 0.0))
        w = None
        if cw and "contact" in targets:
            w = 1.0 + cw * _f32(targets["contact"])[..., None]
        terms["bdr_bce"] = bce_loss(bdr, bmap, w, mask, activation="sigmoid", clip=authors)
    if "dice" in bdr_names:
        terms["bdr_dice"] = dice_loss(bdr, bmap, None, mask, activation="sigmoid",
                                      eps=c["epsilon"])
    if "mse" in bdr_names:  # HoVer-Net's maps: raw outputs (no activation), as HoVer-Net
        terms["bdr_mse"] = mse_loss(bdr, bmap, mask)
    if "msge" in bdr_names:
        terms["bdr_msge"] = msge_loss(bdr, bmap, mask * (cls > 0))

    totals = {}
    if "tissue_logits" in outputs:
        totals["loss_tissue"] = c["w_tissue"] * terms[f"tissue_{c['tissue']}"]
    totals["loss_seg"] = c["w_seg"] * _weighted_sum(terms, "seg", seg_names, c["seg_aux_weight"])
    totals["loss_boundary"] = c["w_boundary"] * _weighted_sum(
        terms, "bdr", bdr_names, c["boundary_aux_weight"],
        {"msge": float(c["hv_gradient_weight"])} if "msge" in bdr_names else None)
    total = sum(totals.values())                                 # Eq. 5
    return total, {**terms, **totals}
