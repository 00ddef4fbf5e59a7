"""The model on device at the label size: the one chain shared by training, evaluation and predict.

network inputs -> ``model.apply`` -> logits resized to the label size (docs/data.md: the network
may run at a larger input than its labels, 256 -> 512 in the paper) -> probabilities. The train
step (``steps.py``) differentiates ``apply_at_labels``; the eval step and predict's tile function
end in ``probabilities``. Inference imports this module, never the training one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from tsfd_jax.errors import UserError
from tsfd_jax.losses import tsfd_loss
from tsfd_jax.ops.resize import resize_bilinear
from tsfd_jax.ops.targets import hv_energy

PyTree = Any
LOGITS = ("seg_logits", "boundary_logits")
# Test-time augmentation (docs/evaluation.md): the model is run on each transform of the input
# and the probabilities, mapped back, are averaged. A transform is (transpose, flip rows, flip
# columns), applied in that order; "flips" keeps the image's shape, "dihedral" adds the
# transposed four (all eight symmetries of the square).
IDENTITY = (False, False, False)
TTA_TRANSFORMS = {
    "none": (IDENTITY,),
    "flips": (IDENTITY, (False, False, True), (False, True, False),
              (False, True, True)),
}
TTA_TRANSFORMS["dihedral"] = TTA_TRANSFORMS["flips"] + tuple(
    (True, rows, cols) for _, rows, cols in TTA_TRANSFORMS["flips"])
TTA_MODES = tuple(TTA_TRANSFORMS)
SPATIAL_PROBABILITIES = ("seg_prob", "boundary_prob")


def resize_to_labels(outputs: dict, size: tuple[int, int]) -> dict:
    """Pixel logits at another size than the labels, resized bilinearly (half-pixel centres)."""
    return {k: resize_bilinear(v, size) if k in LOGITS else v for k, v in outputs.items()}


def apply_at_labels(model, variables: dict, inputs: jax.Array, size: tuple[int, int], *,
                    train: bool = False, rngs: dict | None = None) -> tuple[dict, PyTree]:
    """``model`` on ``inputs`` with its pixel logits at ``size``; returns (outputs, batch_stats):
    the updated BatchNorm statistics when training, the given ones otherwise."""
    if train:
        outputs, new_vars = model.apply(variables, inputs, train=True, rngs=rngs,
                                        mutable=["batch_stats"])
        batch_stats = new_vars["batch_stats"]
    else:
        outputs = model.apply(variables, inputs, train=False)
        batch_stats = variables.get("batch_stats", {})
    return resize_to_labels(outputs, size), batch_stats


def boundary_probability(boundary_logits: jax.Array) -> jax.Array:
    """(B, H, W, 1) logits -> (B, H, W) sigmoid; (B, H, W, 2) HoVer-Net maps (the only
    two-channel boundary output, ``targets.boundary_kind="hv"``) -> their ``hv_energy``, so
    post-processing, tuning and predict read one boundary map whatever the target."""
    x = boundary_logits.astype(jnp.float32)
    if x.shape[-1] == 2:
        return hv_energy(x)
    return jax.nn.sigmoid(x[..., 0])


def probabilities(outputs: dict) -> dict:
    """Logits -> ``seg_prob`` (softmax), ``boundary_prob`` (``boundary_probability``) and, with a
    tissue head, ``tissue_prob`` (softmax); float32 whatever the compute dtype."""
    probs = {"seg_prob": jax.nn.softmax(outputs["seg_logits"].astype(jnp.float32), -1),
             "boundary_prob": boundary_probability(outputs["boundary_logits"])}
    if "tissue_logits" in outputs:
        probs["tissue_prob"] = jax.nn.softmax(outputs["tissue_logits"].astype(jnp.float32), -1)
    return probs


def check_tta(mode: str) -> str:
    if mode not in TTA_TRANSFORMS:
        raise UserError(f"eval.tta={mode!r}: expected one of {', '.join(TTA_MODES)}")
    return mode


def configured_tta(cfg) -> str:
    """The config's ``eval.tta``; "none" for configs without it."""
    return str(cfg.eval.get("tta", "none")) if "eval" in cfg else "none"


def _transform(x: jax.Array, t: tuple[bool, bool, bool]) -> jax.Array:
    """(B, H, W, ...) -> the image transform ``t`` of it (axes 1 and 2)."""
    transpose, rows, cols = t
    if transpose:
        x = jnp.swapaxes(x, 1, 2)
    if rows:
        x = jnp.flip(x, 1)
    if cols:
        x = jnp.flip(x, 2)
    return x


def _untransform(x: jax.Array, t: tuple[bool, bool, bool]) -> jax.Array:
    """The inverse of ``_transform(., t)``."""
    transpose, rows, cols = t
    if cols:
        x = jnp.flip(x, 2)
    if rows:
        x = jnp.flip(x, 1)
    if transpose:
        x = jnp.swapaxes(x, 1, 2)
    return x


def predicted_probabilities(model, variables: dict, inputs: jax.Array, size: tuple[int, int],
                            tta: str = "none", outputs: dict | None = None) -> dict:
    """``probabilities`` of ``model`` on ``inputs`` at the label ``size``, averaged over the
    test-time transforms of ``tta`` (each mapped back to the image before averaging). The
    boundary map is averaged after ``boundary_probability``: HoVer-Net's energy is the same
    field whichever flip or transpose the maps were predicted under. ``outputs``: the model's
    outputs on ``inputs`` as they are, when the caller has them already (not run again)."""
    transforms = TTA_TRANSFORMS[check_tta(tta)]
    total = None
    for t in transforms:
        if t == IDENTITY and outputs is not None:
            out = outputs
        else:
            out_size = (size[1], size[0]) if t[0] else tuple(size)
            out, _ = apply_at_labels(model, variables, _transform(inputs, t), out_size)
        probs = {k: _untransform(v, t) if k in SPATIAL_PROBABILITIES else v
                 for k, v in probabilities(out).items()}
        total = probs if total is None else jax.tree.map(jnp.add, total, probs)
    return jax.tree.map(lambda v: v / len(transforms), total)


def foreground_dice(seg_scores: jax.Array, cls: jax.Array, weight: jax.Array) -> jax.Array:
    """Hard Dice of nucleus-vs-background from the arg-max class of ``seg_scores`` (logits or
    probabilities), over valid pixels."""
    pred = (jnp.argmax(seg_scores, -1) > 0).astype(jnp.float32) * weight
    true = (cls > 0).astype(jnp.float32) * weight
    inter = jnp.sum(pred * true)
    return (2 * inter + 1e-6) / (jnp.sum(pred) + jnp.sum(true) + 1e-6)


def make_eval_step(cfg, model, preprocess: Callable, tta: str = "none") -> Callable:
    """``eval_step(variables, batch) -> outputs`` with probabilities, loss terms and Dice.

    Per-example losses are not defined for the batch-level losses of the paper, so the loss of an
    eval batch is returned with its number of valid examples for weighted averaging. With ``tta``
    the probabilities and the Dice are those of the averaged transforms; the loss stays that of
    the image as it is.
    """
    check_tta(tta)

    def eval_step(variables: dict, batch: dict) -> dict:
        inputs, targets = preprocess(batch, jax.random.key(0), False)
        size = targets["cls"].shape[1:3]
        outputs, _ = apply_at_labels(model, variables, inputs, size)
        total, _ = tsfd_loss(outputs, targets, cfg.loss)
        probs = predicted_probabilities(model, variables, inputs, size, tta, outputs)
        return {**probs, "loss": total,
                "dice": foreground_dice(probs["seg_prob"], targets["cls"], targets["weight"]),
                "num_valid": jnp.sum(batch["valid"].astype(jnp.int32))}

    return eval_step


def make_tile_forward(model, to_inputs: Callable, tile: int, tta: str = "none") -> Callable:
    """Jitted ``forward(variables, images uint8 (B, tile, tile, 3)) -> probabilities``,
    averaged over the test-time transforms of ``tta``."""
    check_tta(tta)

    @jax.jit
    def forward(variables: dict, images: jax.Array) -> dict:
        return predicted_probabilities(model, variables, to_inputs(images), (tile, tile), tta)

    return forward
