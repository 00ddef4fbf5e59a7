"""Class- and tissue-aware sampling: the weights of docs/data.md against a plain loop, the drawn
frequencies against the weights, exact resume, and the config switch."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tests.test_crops import CoordSource, _folder_config, _write_folder
from tsfd_jax.data import pipeline as pl
from tsfd_jax.data.resolve import load_train
from tsfd_jax.data.sampling import image_labels, sampling_weights
from tsfd_jax.errors import UserError


def loop_weights(presence, tissues, mode, gamma):
    """The definition, one image at a time, in float64."""
    n, c = len(presence), len(presence[0])
    share = [sum(presence[i][k] for i in range(n)) / n for k in range(c)]
    cls = [sum(1 / share[k] for k in range(c) if presence[i][k]) for i in range(n)]
    tis = [n / sum(1 for j in range(n) if tissues[j] == tissues[i]) for i in range(n)]
    parts = []
    if "class" in mode:
        parts.append([x / (sum(cls) / n) for x in cls])
    if "tissue" in mode:
        parts.append([x / (sum(tis) / n) for x in tis])
    return [(1 - gamma) + gamma * sum(p[i] for p in parts) / len(parts) for i in range(n)]


@pytest.mark.parametrize("mode", ["class", "tissue", "class+tissue"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.85, 1.0])
def test_weights_equal_the_definition(mode, gamma):
    rng = np.random.default_rng(1)
    presence = rng.random((30, 5)) < [0.9, 0.5, 0.2, 0.05, 0.6]
    presence[0] = False  # an image without nuclei
    presence[1, 3] = True  # at least one image of the rarest class
    tissues = rng.integers(0, 4, 30)
    got = sampling_weights(mode, gamma, presence, tissues)
    np.testing.assert_allclose(got, loop_weights(presence.tolist(), tissues.tolist(), mode,
                                                 gamma), rtol=1e-12)
    if gamma == 0:
        assert (got == 1).all()
    if "class" in mode and gamma > 0:
        rare = presence[:, 3]
        assert got[rare].mean() > got[~rare].mean()


def test_bad_mode_and_gamma_are_refused():
    with pytest.raises(UserError, match="data.sampling 'rare'"):
        sampling_weights("rare", 0.5, np.ones((2, 2), bool), [0, 0])
    with pytest.raises(ValueError, match="sampling_gamma 1.5"):
        sampling_weights("class", 1.5, np.ones((2, 2), bool), [0, 0])


def test_draws_follow_the_weights_and_resume_exactly():
    weights = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    make = lambda: pl.train_iterator(CoordSource(5), 4, seed=2, prefetch=0,  # noqa: E731
                                     process_index=0, process_count=1, weights=weights)
    it = make()
    counts = np.bincount(np.concatenate([next(it)["index"] for _ in range(500)]), minlength=5)
    assert stats.chisquare(counts, counts.sum() * weights / weights.sum()).pvalue > 1e-4
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = make()
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(4)]):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])
    with pytest.raises(ValueError, match="sampling weights"):
        pl.train_iterator(CoordSource(5), 4, seed=2, process_index=0, process_count=1,
                          weights=np.zeros(5))


def test_image_labels_and_the_config_switch(tmp_path):
    root = _write_folder(tmp_path / "f", {"a_1": (32, 32), "b_1": (32, 32), "c_1": (32, 32),
                                          "d_1": (32, 32)})
    cfg = _folder_config(root)
    source, _, weights = load_train(cfg, tmp_path / "w")
    assert weights is None
    presence, tissues = image_labels(source, 2)
    assert presence.all() and (tissues == 0).all()  # squares of both classes in every image
    cfg.data.sampling = "class"
    assert np.allclose(load_train(cfg, tmp_path / "w")[2], 1.0)  # equal presence: uniform
    cfg.data.sampling = "tissue"
    with pytest.raises(UserError, match="needs tissue labels"):
        load_train(cfg, tmp_path / "w")
