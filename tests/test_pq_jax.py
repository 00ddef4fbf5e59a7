"""The jittable per-image PQ equals the numpy official-protocol version."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_pq import perturb, random_truth
from tsfd_jax.metrics.pq import per_image_stats
from tsfd_jax.metrics.pq_jax import per_image_stats_jax

C = 5


def unique_ids(masks: np.ndarray) -> np.ndarray:
    """Each (channel, id) pair of an image -> its own id 1..M (what the jax version requires)."""
    out = np.zeros(masks.shape[:3] + (C,), np.int32)
    for i in range(masks.shape[0]):
        next_id = 1
        for c in range(C):
            ch = masks[i, ..., c]
            for v in np.unique(ch[ch != 0]):
                out[i, ..., c][ch == v] = next_id
                next_id += 1
    return out


@pytest.fixture(scope="module")
def stats_fn():
    return jax.jit(lambda t, p: per_image_stats_jax(t, p, C, 128))


@pytest.mark.parametrize("seed", range(6))
def test_equals_numpy_official_stats(stats_fn, seed):
    rng = np.random.default_rng(seed)
    true = unique_ids(random_truth(rng, 8, 40))
    pred = unique_ids(perturb(rng, random_truth(rng, 8, 40) if seed == 5 else
                              np.concatenate([true, true[..., :1] * 0], -1).astype(np.float64)))
    ref = per_image_stats(true, pred, C)
    ours = jax.device_get(stats_fn(jnp.asarray(true), jnp.asarray(pred)))
    assert not ours["overflow"].any()
    for k in ("tp", "fp", "fn"):
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    for k in ("DQ", "SQ", "PQ"):
        np.testing.assert_array_equal(np.isnan(ours[k]), np.isnan(ref[k]), err_msg=k)
        np.testing.assert_allclose(ours[k], ref[k], atol=1e-5, equal_nan=True, err_msg=k)
    assert np.isfinite(ref["PQ"]).sum() > 10  # the comparison covered real values


def test_overflow_is_flagged_and_match_iou_checked():
    true = np.zeros((1, 8, 8, C), np.int32)
    true[0, :4, :4, 0] = 200  # beyond max_instances
    out = per_image_stats_jax(jnp.asarray(true), jnp.asarray(true), C, 16)
    assert bool(out["overflow"][0, 0]) and not bool(out["overflow"][0, 1])
    with pytest.raises(ValueError, match="match_iou"):
        per_image_stats_jax(jnp.asarray(true), jnp.asarray(true), C, 16, match_iou=0.4)
