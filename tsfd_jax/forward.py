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

from tsfd_jax.losses import tsfd_loss
from tsfd_jax.ops.resize import resize_bilinear
from tsfd_jax.ops.targets import hv_energy

PyTree = Any
LOGITS = ("seg_logits", "boundary_logits")


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


def foreground_dice(seg_logits: jax.Array, cls: jax.Array, weight: jax.Array) -> jax.Array:
    """Hard Dice of nucleus-vs-background from the arg-max class, over valid pixels."""
    pred = (jnp.argmax(seg_logits, -1) > 0).astype(jnp.float32) * weight
    true = (cls > 0).astype(jnp.float32) * weight
    inter = jnp.sum(pred * true)
    return (2 * inter + 1e-6) / (jnp.sum(pred) + jnp.sum(true) + 1e-6)


def make_eval_step(cfg, model, preprocess: Callable) -> Callable:
    """``eval_step(variables, batch) -> outputs`` with probabilities, loss terms and Dice.

    Per-example losses are not defined for the batch-level losses of the paper, so the loss of an
    eval batch is returned with its number of valid examples for weighted averaging.
    """
    def eval_step(variables: dict, batch: dict) -> dict:
        inputs, targets = preprocess(batch, jax.random.key(0), False)
        outputs, _ = apply_at_labels(model, variables, inputs, targets["cls"].shape[1:3])
        total, _ = tsfd_loss(outputs, targets, cfg.loss)
        return {**probabilities(outputs), "loss": total,
                "dice": foreground_dice(outputs["seg_logits"], targets["cls"], targets["weight"]),
                "num_valid": jnp.sum(batch["valid"].astype(jnp.int32))}

    return eval_step


def make_tile_forward(model, to_inputs: Callable, tile: int) -> Callable:
    """Jitted ``forward(variables, images uint8 (B, tile, tile, 3)) -> probabilities``."""
    @jax.jit
    def forward(variables: dict, images: jax.Array) -> dict:
        outputs, _ = apply_at_labels(model, variables, to_inputs(images), (tile, tile))
        return probabilities(outputs)

    return forward
