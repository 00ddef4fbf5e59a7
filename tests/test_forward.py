"""The device chain shared by training, evaluation and predict (tsfd_jax/forward.py)."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from tests.test_model import random_variables
from tests.train_utils import disc_batch
from tsfd_jax import parallel
from tsfd_jax.data.pipeline import to_global
from tsfd_jax.evaluate import make_eval_fn
from tsfd_jax.errors import UserError
from tsfd_jax.forward import boundary_probability, predicted_probabilities, resize_to_labels
from tsfd_jax.ops.targets import hv_energy
from tsfd_jax.models.summary import abstract_variables
from tsfd_jax.models.tsfd import build_model, input_shape
from tsfd_jax.predict import make_predict_fn


def small_unet_config():
    """The tiny config with the reference UNet at 4-8 channels: a network that compiles in a
    few seconds for tests of what is around the model (test-time augmentation)."""
    cfg = tiny.get_config()
    cfg.model.arch, cfg.model.unet_features = "unet", (4, 8)
    return cfg


@pytest.mark.parametrize("kind,tta,arch", [("contour", "none", "tsfd"), ("hv", "none", "tsfd"),
                                           ("contour", "dihedral", "unet")])
def test_eval_step_and_predict_give_the_same_probabilities(kind, tta, arch):
    """The network input runs at twice the label size: both paths resize the logits to the
    labels the same way and end in the same probabilities (for HoVer-Net's maps, the same
    boundary map made of them), with test-time augmentation too."""
    cfg = tiny.get_config() if arch == "tsfd" else small_unet_config()
    cfg.eval.tta = tta
    if kind == "hv":
        cfg.targets.boundary_kind, cfg.loss.boundary = "hv", "mse_msge"
    assert cfg.input.size == 2 * cfg.data.image_size
    variables = random_variables(abstract_variables(build_model(cfg), input_shape(cfg)), seed=3)
    size = int(cfg.data.image_size)
    batch = disc_batch(int(cfg.data.eval_batch_size), size, seed=5,
                       num_tissues=len(cfg.data.tissue_names))
    mesh = parallel.make_mesh(("data",))
    from_eval = jax.device_get(make_eval_fn(cfg, mesh)(variables, to_global(batch, mesh)))
    from_predict = make_predict_fn(cfg, variables, tile=size)(batch["image"])
    assert set(from_predict) <= set(from_eval)
    for name, probs in from_predict.items():
        assert probs.shape == from_eval[name].shape
        np.testing.assert_allclose(probs, from_eval[name], atol=1e-5, err_msg=name)
    bp = from_predict["boundary_prob"]
    assert bp.shape == batch["image"].shape[:3] and bp.min() >= 0 and bp.max() <= 1


def test_logits_resized_to_labels_as_jax_image_resize():
    rng = np.random.default_rng(0)
    outputs = {"seg_logits": rng.normal(size=(2, 16, 16, 3)).astype(np.float32),
               "boundary_logits": rng.normal(size=(2, 16, 16, 1)).astype(np.float32),
               "tissue_logits": rng.normal(size=(2, 4)).astype(np.float32)}
    for size in ((8, 8), (12, 12), (16, 16), (32, 32)):
        out = resize_to_labels(outputs, size)
        np.testing.assert_array_equal(out["tissue_logits"], outputs["tissue_logits"])
        for name in ("seg_logits", "boundary_logits"):
            x = outputs[name]
            want = jax.image.resize(x, (2, *size, x.shape[-1]), "bilinear", antialias=False)
            np.testing.assert_allclose(out[name], want, atol=1e-5, err_msg=f"{name} {size}")


def test_boundary_probability_of_one_and_two_channels():
    rng = np.random.default_rng(1)
    one = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(boundary_probability(one), 1 / (1 + np.exp(-one[..., 0])),
                               rtol=1e-6)
    two = rng.normal(size=(2, 8, 8, 2)).astype(np.float32)
    np.testing.assert_array_equal(boundary_probability(two), hv_energy(two))


def test_inference_never_imports_training():
    """predict and evaluate load without the training module (steps) or the loop."""
    code = ("import sys, tsfd_jax.predict, tsfd_jax.evaluate, tsfd_jax.evaluate_images, "
            "tsfd_jax.slides; print(sorted(m for m in ('tsfd_jax.steps', 'tsfd_jax.loop', "
            "'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# Each test-time transform of an (B, H, W, ...) array and its inverse, written with numpy.
def _flip_rows(x):
    return np.flip(x, 1)


def _flip_cols(x):
    return np.flip(x, 2)


def _transpose(x):
    return np.swapaxes(x, 1, 2)


def _identity(x):
    return x


FLIPS = [(_identity, _identity), (_flip_rows, _flip_rows), (_flip_cols, _flip_cols),
         (lambda x: _flip_cols(_flip_rows(x)), lambda x: _flip_rows(_flip_cols(x)))]
DIHEDRAL = FLIPS + [(lambda x, f=f: f(_transpose(x)), lambda x, g=g: _transpose(g(x)))
                    for f, g in FLIPS]


@pytest.fixture(scope="module")
def tiny_net():
    """A small model as ``probs(images, tta)`` (labels at half the input size), jitted once per
    input shape and mode, and a non-square batch: transposed passes run at the other shape."""
    cfg = small_unet_config()
    model = build_model(cfg)
    variables = random_variables(abstract_variables(model, input_shape(cfg)), seed=4)
    jitted = {}

    def probs(x, tta):
        if tta not in jitted:
            jitted[tta] = jax.jit(lambda v, x: predicted_probabilities(
                model, v, x, (x.shape[1] // 2, x.shape[2] // 2), tta))
        return jax.device_get(jitted[tta](variables, np.ascontiguousarray(x)))

    inputs = np.random.default_rng(2).normal(size=(2, 64, 96, input_shape(cfg)[-1]))
    return probs, inputs.astype(np.float32)


@pytest.mark.parametrize("tta,transforms", [("flips", FLIPS), ("dihedral", DIHEDRAL)])
def test_tta_is_the_mean_of_the_model_on_the_transformed_images(tiny_net, tta, transforms):
    probs, inputs = tiny_net
    want = {}
    for forward, inverse in transforms:
        for name, p in probs(forward(inputs), "none").items():
            p = inverse(p) if name in ("seg_prob", "boundary_prob") else p
            want[name] = want.get(name, 0) + np.asarray(p, np.float64) / len(transforms)
    got = probs(inputs, tta)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], atol=2e-5, err_msg=name)
    single = probs(inputs, "none")
    assert np.abs(single["boundary_prob"] - want["boundary_prob"]).max() > 1e-3


@pytest.mark.parametrize("tta,transforms", [("flips", FLIPS), ("dihedral", DIHEDRAL)])
def test_tta_prediction_turns_with_the_image(tiny_net, tta, transforms):
    """Averaged over a group of transforms, the prediction of a transformed image is the
    transformed prediction: a test of the inverses, not of the model."""
    probs, inputs = tiny_net
    base = probs(inputs, tta)
    for forward, _ in transforms[1:]:
        got = probs(forward(inputs), tta)
        for name in ("seg_prob", "boundary_prob"):
            np.testing.assert_allclose(got[name], forward(base[name]), atol=2e-5, err_msg=name)


def test_unknown_tta_is_a_one_line_error():
    cfg = tiny.get_config()
    model = build_model(cfg)
    with pytest.raises(UserError, match="eval.tta='rot90'"):
        predicted_probabilities(model, {}, np.zeros(input_shape(cfg), np.float32), (32, 32),
                                "rot90")


def test_predict_cli_offers_exactly_the_tta_modes():
    """predict's ``--tta`` spells its choices out (the CLI imports no jax before it runs), so
    they must follow ``forward.TTA_MODES`` when a mode is added."""
    from tsfd_jax.cli import build_parser
    from tsfd_jax.forward import TTA_MODES

    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    tta = next(a for a in predict._actions if "--tta" in a.option_strings)
    assert tuple(tta.choices) == TTA_MODES
