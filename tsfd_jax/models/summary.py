"""Model size and cost: parameters per part (as Keras counts them) and XLA FLOPs.

Parameters are counted like Keras' ``model.summary()``: trainable parameters plus BatchNorm
moving statistics (``params`` + ``batch_stats``). Keras' TSFD total (22,130,108, docs/model.md
§3) also holds the 13 constants of the backbone's unused input Normalization layer, which this
model does not have (22,130,095 for the authors' configuration).

FLOPs come from XLA's cost analysis of the lowered (unoptimised) HLO of one unsharded
single-device program (under a sharded jit the numbers would be per device, BENCHMARKS.md).
XLA counts 2 FLOPs per multiply-add and excludes the zero taps of SAME padding; element-wise work
(BN, swish, sums) is included.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Top-level submodule -> reported part (order of the table).
_PARTS = {"backbone": "backbone", "gating": "gating", "decoders": "decoders",
          "seg_head": "heads", "boundary_head": "heads", "classifier": "classifier"}


def part_of(name: str) -> str:
    """Part of a top-level submodule name (``bifpn_2`` stays ``bifpn_2``)."""
    if name.startswith("bifpn_"):
        return name
    return _PARTS.get(name, name)


def _size(tree: Any) -> int:
    return sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(tree))


def count_params(variables: Mapping[str, Any]) -> dict[str, int]:
    """{part: number of params + batch_stats} in model order, plus ``"total"``.

    ``variables`` may hold arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``).
    """
    counts: dict[str, int] = {}
    for collection in ("params", "batch_stats"):
        for name, sub in variables.get(collection, {}).items():
            part = part_of(name)
            counts[part] = counts.get(part, 0) + _size(sub)

    def order(part: str) -> tuple[int, int]:
        fixed = ["backbone", "gating"]
        if part in fixed:
            return (fixed.index(part), 0)
        if part.startswith("bifpn_"):
            return (2, int(part.split("_")[1]))
        rest = ["decoders", "heads", "classifier"]
        return (3 + rest.index(part), 0) if part in rest else (9, 0)

    result = {k: counts[k] for k in sorted(counts, key=order)}
    result["total"] = sum(counts.values())
    return result


def abstract_variables(model, input_shape: tuple[int, ...]) -> dict:
    """Shapes of a model's variables without computing them (``jax.eval_shape`` of init)."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda: model.init(rngs, jnp.zeros(input_shape, jnp.float32),
                                             train=False))


def _abstract(tree: Any) -> Any:
    # Shapes only: no shardings, so the lowering is one unsharded single-device program.
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def _flops(lowered) -> float:
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned [dict]
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def xla_flops(model, variables: Mapping[str, Any], input_shape: tuple[int, ...],
              backward: bool = False, depthwise_impl: str | None = "conv") -> float:
    """XLA FLOPs of one call on a float32 input of ``input_shape`` (B, S, S, n_ch).

    ``backward=False``: inference forward pass (``train=False``). ``backward=True``: one training
    forward pass (``train=True``, dropout, BN statistics) plus the gradient with respect to all
    parameters of a scalar made from every output (what a train step costs without the loss and
    the optimiser).

    Depthwise convolutions are counted as XLA's grouped convolution (``depthwise_impl="conv"``,
    what runs on accelerators) so the count does not depend on the backend; ``None`` keeps the
    model's own choice (k*k shifted multiply-adds on CPU; within 0.2 % for TSFD-Net).
    """
    if depthwise_impl and hasattr(model, "layers"):
        model = model.clone(layers=dataclasses.replace(model.layers,
                                                       depthwise_impl=depthwise_impl))
    variables = _abstract(dict(variables))
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    if not backward:
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
        return _flops(fn.lower(variables, x))
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params, rest, x, rng):
        out, _ = model.apply({"params": params, **rest}, x, train=True, rngs={"dropout": rng},
                             mutable=["batch_stats"])
        return sum(jnp.mean(v) for v in out.values())

    fn = jax.jit(jax.grad(loss))
    return _flops(fn.lower(params, rest, x, jax.random.key(0)))
