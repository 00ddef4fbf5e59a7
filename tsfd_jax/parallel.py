"""Device mesh, shardings and multi-host start-up (README, Training).

Data parallel over one mesh axis ``data``: parameters and optimiser state replicated, the batch
sharded on its leading axis. Under ``jax.jit`` with these shardings XLA inserts the all-reduces, so
BatchNorm statistics are computed over the global batch: that is the synchronised BN of the paper
(jax.sharding docs). The mesh uses ``AxisType.Auto``: the Explicit default breaks vmapped per-example
augmentation (docs/preprocessing.md).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(enabled: bool, **kwargs: Any) -> None:
    """Start jax.distributed for multi-host runs (coordinator from the cluster environment or
    ``kwargs``: coordinator_address, num_processes, process_id)."""
    if enabled and not _distributed_started():
        jax.distributed.initialize(**kwargs)


def _distributed_started() -> bool:
    try:
        return jax.distributed.is_initialized()
    except AttributeError:  # older jax
        return False


def make_mesh(axes: tuple[str, ...] = ("data",), devices: list | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all devices (or the given ones)."""
    if len(axes) != 1:
        raise ValueError(f"only a 1-D data-parallel mesh is implemented, got axes {axes}")
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), axes, axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the {n} devices of the mesh; "
            f"set data.global_batch_size to a multiple of {n}")
    if global_batch % jax.process_count():
        raise ValueError(f"global batch size {global_batch} is not divisible by the "
                         f"{jax.process_count()} processes")


def fetch(tree: Any) -> Any:
    """Device values -> numpy on this host (each process gets the full value of replicated or
    fully addressable arrays; sharded arrays are gathered to every process)."""
    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # Typed PRNG keys have no numpy form: fetch their data and wrap it again.
            return jax.random.wrap_key_data(one(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)
