"""Keras EfficientNet -> Flax backbone: every block output equals Keras' after importing its
weights (Keras 3 on the JAX backend is the reference; a test-only dependency), in the Keras 3,
legacy Keras 2 and .keras file layouts, plus the import-weights command and merge_backbone.
"""

import os
import warnings

os.environ["KERAS_BACKEND"] = "jax"  # must precede the keras import

import h5py  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras.src.applications.efficientnet import EfficientNet as KerasEfficientNet  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402

from tsfd_jax.errors import UserError  # noqa: E402
from tsfd_jax.cli import main  # noqa: E402
from tsfd_jax.models.efficientnet import (  # noqa: E402
    EfficientNet,
    block_specs,
    efficientnet_config,
)
from tsfd_jax.models.keras_weights import (  # noqa: E402
    load_keras_efficientnet,
    merge_backbone,
    read_keras_weights,
)

SIZE = 64
TINY = (0.25, 0.5)  # stages of one block: their taps are project_bn outputs, not adds
B0 = efficientnet_config("b0")
B4 = efficientnet_config("b4")


def _keras_model(width, depth, channels):
    # Keras traces each distinct layer shape once per process (~20 s for a B0, ~40 s for a B4
    # on a busy CPU); later builds of the same scaling take a second, so tests share B0 at 64 px.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This model usually expects")
        return KerasEfficientNet(width, depth, SIZE, include_top=False, weights=None,
                                 input_shape=(SIZE, SIZE, channels), name=f"effnet{channels}")


def _norm_name(model) -> str:
    """Keras names its Normalization layer with a session counter (normalization_3, ...)."""
    return next(lay.name for lay in model.layers if isinstance(lay, keras.layers.Normalization))


def _randomise(model, seed):
    """Random BN statistics/affines and conv biases (Keras initialises them to constants, which
    would hide a swapped mean/variance); kernels keep Keras' own initialisation."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c),
                               rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c)])
        elif isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            k, b = layer.get_weights()
            layer.set_weights([k, rng.normal(0, 0.1, b.shape)])


def _keras_outputs(model, names, x):
    """Keras layer outputs for our tap names (block output = its add, else its project BN)."""
    layer_names = {lay.name for lay in model.layers}

    def keras_name(t):
        if t in ("stem", "top"):
            return f"{t}_activation"
        return f"{t}_add" if f"{t}_add" in layer_names else f"{t}_project_bn"

    probe = keras.Model(model.input, [model.get_layer(keras_name(t)).output for t in names])
    return dict(zip(names, probe.predict(x, verbose=0)))  # predict: inference mode, jitted


def _flax_model(width, depth):
    names = ("stem", *(s.name for s in block_specs(width, depth)), "top")
    return EfficientNet(width, depth, taps=names)


def _skeleton(model, channels):
    """Zero variables of the right shapes (no slow random init: everything is imported)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, SIZE, SIZE, channels)), train=False))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _assert_taps_close(ours, ref):
    assert set(ours) == set(ref)
    for t in ref:
        scale = np.abs(ref[t]).max()
        np.testing.assert_allclose(np.asarray(ours[t]), ref[t], rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=t)


def _check_against_keras(width, depth, tmp_path):
    """3-channel file -> 3- and 6-channel backbones; all block outputs equal Keras'."""
    k3 = _keras_model(width, depth, 3)
    _randomise(k3, 0)
    path = tmp_path / "k3.weights.h5"
    k3.save_weights(path)
    model = _flax_model(width, depth)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    rng = np.random.default_rng(1)

    v3, report = load_keras_efficientnet(path, _skeleton(model, 3))
    assert report.kept_fresh == [] and report.unfilled == []
    assert report.unused_keras == [_norm_name(k3)]  # Keras' identity Normalization layer
    x = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    # Keras includes Rescaling(1/255) + identity Normalization; our module takes x / 255.
    _assert_taps_close(apply(v3, x / 255), _keras_outputs(k3, model.taps, x))

    # 6 channels (TSFD): the 3-channel stem conv and, as in TSFD, stem_bn stay fresh.
    k6 = _keras_model(width, depth, 6)
    _randomise(k6, 2)
    for layer in k6.layers:
        if layer.weights and layer.name not in ("stem_conv", "stem_bn", _norm_name(k6)):
            layer.set_weights(k3.get_layer(layer.name).get_weights())
    v6, report = load_keras_efficientnet(path, _skeleton(model, 6))
    assert [m for m, _ in report.kept_fresh] == ["stem_conv", "stem_bn"]
    assert "shape" in report.kept_fresh[0][1]
    assert sorted(report.unfilled) == ["batch_stats/stem_bn/mean", "batch_stats/stem_bn/var",
                                       "params/stem_bn/bias", "params/stem_bn/scale",
                                       "params/stem_conv/kernel"]
    assert report.unused_keras == sorted([_norm_name(k3), "stem_bn", "stem_conv"])
    kernel, = k6.get_layer("stem_conv").get_weights()
    gamma, beta, mean, var = k6.get_layer("stem_bn").get_weights()
    v6["params"]["stem_conv"] = {"kernel": kernel}
    v6["params"]["stem_bn"] = {"scale": gamma, "bias": beta}
    v6["batch_stats"]["stem_bn"] = {"mean": mean, "var": var}
    x = rng.uniform(0, 255, (2, SIZE, SIZE, 6)).astype(np.float32)
    _assert_taps_close(apply(v6, x / 255), _keras_outputs(k6, model.taps, x))
    return k3, k6, v3, v6


def _n_params(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))


def test_b0_matches_keras(tmp_path):
    k3, k6, v3, v6 = _check_against_keras(*B0, tmp_path)
    # Keras also counts its Normalization layer's mean, variance (C each) and count.
    assert _n_params(v3) + 7 == k3.count_params()
    assert _n_params(v6) + 13 == k6.count_params()


@pytest.mark.slow  # 30-70 s on a busy 2-core CPU; B0 above takes the same code path
def test_b4_matches_keras(tmp_path):
    k3, k6, v3, v6 = _check_against_keras(*B4, tmp_path)
    assert _n_params(v3) + 7 == k3.count_params() == 17_673_823
    assert _n_params(v6) + 13 == k6.count_params() == 17_675_125  # docs/model.md §4


@pytest.mark.slow
def test_tiny_matches_keras(tmp_path):
    _check_against_keras(*TINY, tmp_path)


# ---- file layouts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def b0_keras(tmp_path_factory):
    """A randomised 6-channel Keras B0, its .weights.h5 file and the imported variables."""
    k = _keras_model(*B0, 6)
    _randomise(k, 3)
    path = tmp_path_factory.mktemp("b0") / "b0.weights.h5"
    k.save_weights(path)
    model = _flax_model(*B0)
    variables, report = load_keras_efficientnet(path, _skeleton(model, 6))
    assert report.unfilled == []
    return k, path, model, variables


def _write_keras2_h5(path, model, nested=False, rename=None):
    """The Keras 2 HDF5 layout (weight names 'layer/weight:0'), BN weights stored in reverse
    order to check the mapping by name; ``nested`` puts all layers in one sub-model group."""
    rename = rename or {}
    with h5py.File(path, "w") as f:
        entries = []
        for layer in model.layers:
            name = rename.get(layer.name, layer.name)
            ws = [(f"{name}/{w.path.split('/')[-1]}:0", np.asarray(w)) for w in layer.weights]
            if isinstance(layer, keras.layers.BatchNormalization):
                ws = ws[::-1]
            entries.append((name, ws))
        if nested:
            entries = [("input_1", []), ("efficientnetb0", [w for _, ws in entries for w in ws])]
        f.attrs["layer_names"] = [n.encode() for n, _ in entries]
        f.attrs["keras_version"] = b"2.9.0"
        for name, ws in entries:
            g = f.create_group(name)
            g.attrs["weight_names"] = [wn.encode() for wn, _ in ws]
            for wn, arr in ws:
                g.create_dataset(wn, data=arr)


def _assert_same_variables(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


@pytest.mark.parametrize("layout", ["keras3_legacy_writer", "keras2", "keras2_nested", "keras"])
def test_file_layouts_give_the_same_weights(b0_keras, tmp_path, layout):
    k, _, model, expected = b0_keras
    if layout == "keras3_legacy_writer":
        path = tmp_path / "w.h5"
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, k)
    elif layout.startswith("keras2"):
        path = tmp_path / "w.h5"
        _write_keras2_h5(path, k, nested=layout.endswith("nested"))
    else:
        path = tmp_path / "m.keras"
        k.save(path)
    variables, report = load_keras_efficientnet(path, _skeleton(model, 6))
    assert report.unfilled == [] and report.unused_keras == [_norm_name(k)]
    _assert_same_variables(variables, expected)


def test_tsfd_renamed_stem_is_loaded(b0_keras, tmp_path):
    # A Keras-trained TSFD backbone names its 6-channel stem stem_conv_pet / stem_bn_pet.
    k, _, model, expected = b0_keras
    path = tmp_path / "tsfd.h5"
    _write_keras2_h5(path, k, rename={"stem_conv": "stem_conv_pet", "stem_bn": "stem_bn_pet"})
    variables, report = load_keras_efficientnet(path, _skeleton(model, 6))
    assert "stem_conv <- stem_conv_pet" in report.loaded and report.unfilled == []
    _assert_same_variables(variables, expected)


def test_read_keras_weights_layouts(b0_keras):
    k, path, _, _ = b0_keras
    layers = read_keras_weights(path)
    assert set(layers) == {lay.name for lay in k.layers if lay.weights}
    dw = k.get_layer("block1a_dwconv").get_weights()[0]
    np.testing.assert_array_equal(layers["block1a_dwconv"].arrays[0], dw)


def test_errors_name_the_file(b0_keras, tmp_path):
    _, _, model, _ = b0_keras
    skeleton = _skeleton(model, 6)
    with pytest.raises(UserError, match="nope.h5.*not found"):
        load_keras_efficientnet(tmp_path / "nope.h5", skeleton)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="text.h5.*not an HDF5"):
        load_keras_efficientnet(tmp_path / "text.h5", skeleton)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"dense/kernel:0"]
        g.create_dataset("dense/kernel:0", data=np.zeros((3, 4)))
    with pytest.raises(UserError, match="other.h5.*no EfficientNet layers"):
        load_keras_efficientnet(tmp_path / "other.h5", skeleton)


# ---- command and merge ---------------------------------------------------------------------


def _run(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def _write_keras2_h5_from_flax(path, variables):
    """Flax backbone variables -> the Keras 2 HDF5 layout (for a tiny file without Keras)."""
    names = {"kernel": "kernel", "bias": "bias", "scale": "gamma", "mean": "moving_mean",
             "var": "moving_variance"}
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [m.encode() for m in variables["params"]]
        for m, leaves in variables["params"].items():
            leaves = {**leaves, **variables["batch_stats"].get(m, {})}
            g = f.create_group(m)
            ws = []
            for leaf, arr in leaves.items():
                name = "beta" if leaf == "bias" and "scale" in leaves else names[leaf]
                if m.endswith("dwconv"):
                    name, arr = "depthwise_kernel", np.transpose(arr, (0, 1, 3, 2))
                ws.append(f"{m}/{name}:0")
                g.create_dataset(ws[-1], data=arr)
            g.attrs["weight_names"] = [w.encode() for w in ws]


def test_import_command_and_merge(tmp_path, capsys):
    model = _flax_model(*TINY)
    rng = np.random.default_rng(4)
    expected = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype),
                            _skeleton(model, 6))
    path = tmp_path / "tiny.h5"
    _write_keras2_h5_from_flax(path, expected)
    out = tmp_path / "ckpt"
    argv = ["import-weights", "--keras", str(path), "--variant", "b0", "--width-mult",
            str(TINY[0]), "--depth-mult", str(TINY[1]), "--in-channels", "6", "--out", str(out)]
    assert _run(argv) == 0
    assert "0 kept fresh, 0 Keras layers unused" in capsys.readouterr().out
    assert _run(argv) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert _run(argv[:-1] + [str(tmp_path / "x"), "--variant", "b9"]) == 2
    assert "b9" in capsys.readouterr().err

    # A full model's variables: the backbone is the submodule "backbone".
    skel = _skeleton(model, 6)
    head = {"kernel": np.ones((3, 3), np.float32)}
    full = {"params": {"backbone": skel["params"], "head": head},
            "batch_stats": {"backbone": skel["batch_stats"]}}
    full = jax.tree.map(jnp.asarray, full)
    merged = merge_backbone(full, out)
    _assert_same_variables({"params": merged["params"]["backbone"],
                            "batch_stats": merged["batch_stats"]["backbone"]}, expected)
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], head["kernel"])

    wrong = _skeleton(model, 3)  # a 3-channel model cannot take a 6-channel stem
    with pytest.raises(UserError, match="stem_conv.*shape"):
        merge_backbone({"params": {"backbone": wrong["params"]},
                        "batch_stats": {"backbone": wrong["batch_stats"]}}, out)
    with pytest.raises(UserError, match="not found"):
        merge_backbone(full, tmp_path / "missing")
