"""Import Keras EfficientNet weights (ImageNet, or a Keras-trained TSFD backbone) into the backbone.

TSFD-Net starts from ImageNet EfficientNetB4 weights for every layer except the 6-channel stem
(docs/model.md: the authors renamed stem_conv and stem_bn with a "_pet" suffix so that
``load_weights(by_name=True)`` skipped both). ``load_keras_efficientnet`` does the same by name:
``models/efficientnet.py`` names its submodules like the Keras layers, so each Keras layer fills
the module of the same name, and a layer whose shapes differ (the stem conv of a 3-channel file
in a 6-channel network) keeps its fresh initialisation, as does ``stem_bn`` with it.

Files read (with h5py, imported only here):
- Keras 3 ``model.save_weights("x.weights.h5")``: groups ``.../vars`` whose attribute ``name`` is
  the layer name, datasets "0", "1", ... in the layer's weight order;
- Keras 3 ``model.save("x.keras")``: a zip holding ``model.weights.h5`` (same layout);
- legacy Keras 2 HDF5 (``efficientnetb4_notop.h5``, ``model.save_weights("x.h5")``, full-model
  files with a ``model_weights`` group): root attribute ``layer_names``, each layer group with
  ``weight_names`` such as ``stem_bn/moving_mean:0``.

The Keras ``normalization`` layer of an ImageNet file (ImageNet statistics) has no
counterpart and is reported unused: TSFD renamed it too, so its network saw x / 255 without the
ImageNet standardisation, and so does ours.

Layouts: conv kernels are HWIO in both frameworks; Keras depthwise kernels (kh, kw, C, 1) become
(kh, kw, 1, C); BN gamma, beta, moving_mean, moving_variance become scale, bias, mean, var.

``merge_backbone`` puts a checkpoint written by ``python -m tsfd_jax import-weights`` into the
``backbone`` submodule of a full model's variables (``model.init_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tsfd_jax.errors import UserError

# Keras weight name -> (collection, flax leaf) for the two layer kinds of the backbone.
_CONV_ORDER = (("params", "kernel"), ("params", "bias"))
_BN_ORDER = (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"),
             ("batch_stats", "var"))
_KERAS_NAMES = {"kernel": "kernel", "depthwise_kernel": "kernel", "bias": "bias",
                "gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"}
# TSFD renamed its 6-channel stem layers with this suffix (docs/model.md).
_TSFD_SUFFIX = "_pet"


@dataclasses.dataclass
class KerasLayer:
    """Weights of one Keras layer in its own order; ``names`` are short names or None."""

    arrays: list[np.ndarray]
    names: list[str | None]


@dataclasses.dataclass
class ImportReport:
    """What an import did: every Flax module filled or kept fresh, every Keras layer left over."""

    path: str
    loaded: list[str] = dataclasses.field(default_factory=list)        # Flax modules filled
    kept_fresh: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (module, why)
    unused_keras: list[str] = dataclasses.field(default_factory=list)  # Keras layers not loaded
    unfilled: list[str] = dataclasses.field(default_factory=list)      # Flax leaves not filled

    def summary(self) -> str:
        lines = [f"{self.path}: {len(self.loaded)} layers loaded, "
                 f"{len(self.kept_fresh)} kept fresh, {len(self.unused_keras)} Keras layers unused"]
        lines += [f"  kept fresh: {m} ({why})" for m, why in self.kept_fresh]
        lines += [f"  unused Keras layer: {k}" for k in self.unused_keras]
        lines += [f"  unfilled leaf: {p}" for p in self.unfilled]
        return "\n".join(lines)


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise UserError("reading Keras weight files needs h5py: pip install h5py") from e
    return h5py


def _short(weight_name: str) -> str:
    """'block1a_dwconv/depthwise_kernel:0' -> 'depthwise_kernel'."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _decode(s: Any) -> str:
    return s.decode("utf8") if isinstance(s, bytes) else str(s)


def _read_legacy(group: Any) -> dict[str, KerasLayer]:
    """Keras 2 HDF5: layer groups listed in ``layer_names``; weights named 'layer/weight:0'."""
    layers: dict[str, KerasLayer] = {}
    for layer_name in map(_decode, group.attrs["layer_names"]):
        g = group[layer_name]
        for wn in map(_decode, g.attrs.get("weight_names", [])):
            # A nested model stores all its layers' weights under one group: group by the
            # layer part of the weight name ('stem_conv/kernel:0' -> 'stem_conv').
            parts = wn.split("/")
            owner = parts[-2] if len(parts) > 1 else layer_name
            layer = layers.setdefault(owner, KerasLayer([], []))
            layer.arrays.append(np.asarray(g[wn]))
            layer.names.append(_short(wn))
    return layers


def _read_keras3(f: Any, path: Path) -> dict[str, KerasLayer]:
    """Keras 3 ``.weights.h5``: every ``vars`` group carries the layer name as attribute."""
    layers: dict[str, KerasLayer] = {}
    unnamed = 0

    def visit(h5path: str, obj: Any) -> None:
        nonlocal unnamed
        if h5path.rsplit("/", 1)[-1] != "vars" or not hasattr(obj, "keys") or len(obj) == 0:
            return
        if "name" not in obj.attrs:
            unnamed += 1
            return
        name = _decode(obj.attrs["name"])
        keys = sorted(obj.keys(), key=int)
        layers.setdefault(name, KerasLayer([np.asarray(obj[k]) for k in keys], [None] * len(keys)))

    f.visititems(visit)
    if not layers and unnamed:
        raise UserError(f"{path}: this Keras 3 weights file stores no layer names (older "
                        "Keras 3); re-save it with a recent Keras 3 or as a legacy .h5")
    return layers


def read_keras_weights(path: str | Path) -> dict[str, KerasLayer]:
    """Every Keras layer with weights in a .h5 / .weights.h5 / .keras file, by layer name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: Keras weights file not found")
    h5py = _h5py()
    source: Any = path
    if zipfile.is_zipfile(path):  # a .keras archive
        with zipfile.ZipFile(path) as z:
            if "model.weights.h5" not in z.namelist():
                raise UserError(f"{path}: a zip without model.weights.h5 (not a .keras model)")
            source = io.BytesIO(z.read("model.weights.h5"))
    elif not h5py.is_hdf5(path):
        raise UserError(f"{path}: not an HDF5 (.h5) or .keras file")
    with h5py.File(source, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        layers = _read_legacy(root) if "layer_names" in root.attrs else _read_keras3(f, path)
    return layers


def _ordered(layer: KerasLayer, order: tuple[tuple[str, str], ...]) -> list[tuple[str, str]] | None:
    """Target (collection, leaf) of each Keras array: by weight name if known, else by position."""
    if all(n is not None for n in layer.names):
        mapped = []
        for n in layer.names:
            leaf = _KERAS_NAMES.get(n)
            hits = [t for t in order if t[1] == leaf]
            if not hits:
                return None
            mapped.append(hits[0])
        return mapped
    return list(order[:len(layer.arrays)])


def load_keras_efficientnet(path: str | Path, variables: Mapping[str, Any], *,
                            stem_bn_follows_stem_conv: bool = True,
                            skip: Iterable[str] = ()) -> tuple[dict[str, Any], ImportReport]:
    """Fill an ``EfficientNet``'s variables ({'params', 'batch_stats'}) from a Keras weights file.

    Every Flax module takes the Keras layer of the same name (or name + "_pet", TSFD's renamed
    stem). Modules whose shapes differ keep their values from ``variables`` (fresh init); when the
    stem conv is kept fresh, ``stem_bn`` is too (``stem_bn_follows_stem_conv``, as TSFD did).
    ``skip`` names further modules to keep fresh. Returns (new variables, report).
    """
    import jax.numpy as jnp

    keras = read_keras_weights(path)
    params = dict(variables["params"])
    stats = dict(variables.get("batch_stats", {}))
    report = ImportReport(str(path))
    skip = set(skip)
    used: set[str] = set()
    found = [m for m in params if m in keras or m + _TSFD_SUFFIX in keras]
    if not found:
        raise UserError(f"{path}: no EfficientNet layers found (expected Keras layer names such "
                        f"as stem_conv, block1a_dwconv, top_conv; the file has "
                        f"{sorted(keras)[:5]}...)")

    def fresh(module: str, why: str) -> None:
        report.kept_fresh.append((module, why))
        for coll, tree in (("params", params), ("batch_stats", stats)):
            report.unfilled += [f"{coll}/{module}/{leaf}" for leaf in tree.get(module, {})]

    for module in sorted(params, key=lambda m: (m != "stem_conv", m)):  # stem_conv decides stem_bn
        kname = module if module in keras else module + _TSFD_SUFFIX
        if kname not in keras:
            fresh(module, "not in the Keras file")
            continue
        if module in skip:
            fresh(module, "skipped on request")
            continue
        if (module == "stem_bn" and stem_bn_follows_stem_conv
                and any(m == "stem_conv" for m, _ in report.kept_fresh)):
            fresh(module, "kept fresh with stem_conv, as TSFD's renamed stem")
            continue
        current = {("params", leaf): v for leaf, v in params[module].items()}
        current.update({("batch_stats", leaf): v for leaf, v in stats.get(module, {}).items()})
        order = tuple(t for t in (_BN_ORDER if ("params", "scale") in current else _CONV_ORDER)
                      if t in current)
        layer = keras[kname]
        targets = _ordered(layer, order)
        if targets is None or len(targets) != len(current) or set(targets) != set(current):
            fresh(module, f"Keras layer {kname} holds {len(layer.arrays)} weights "
                          f"{[n for n in layer.names if n]}, expected {[t[1] for t in order]}")
            continue
        new = {}
        for arr, t in zip(layer.arrays, targets):
            if module.endswith("dwconv") and t[1] == "kernel" and arr.ndim == 4:
                arr = arr.transpose(0, 1, 3, 2)  # Keras (kh, kw, C, 1) -> (kh, kw, 1, C)
            new[t] = arr
        bad = [f"{t[1]} {new[t].shape} vs {tuple(current[t].shape)}" for t in order
               if new[t].shape != tuple(current[t].shape)]
        if bad:
            fresh(module, f"shape differs from Keras {kname}: {', '.join(bad)}")
            continue
        for (coll, leaf), arr in new.items():
            tree = params if coll == "params" else stats
            tree[module] = {**tree[module], leaf: jnp.asarray(arr, dtype=current[coll, leaf].dtype)}
        used.add(kname)
        report.loaded.append(module if kname == module else f"{module} <- {kname}")

    report.unused_keras = sorted(k for k in keras if k not in used)
    out = {**variables, "params": params}
    if stats:
        out["batch_stats"] = stats
    return out, report


def save_backbone_checkpoint(variables: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write {'params', 'batch_stats'} of a backbone as an orbax checkpoint; never overwrites."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if out.exists():
        raise UserError(f"{out}: already exists; choose a new output folder (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    # orbax writes to a temporary folder and renames it when complete (atomic).
    ckptr.save(out, {"params": variables["params"],
                     "batch_stats": variables.get("batch_stats", {})})
    ckptr.wait_until_finished()
    return out


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflat(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def merge_backbone(variables: Mapping[str, Any], ckpt_dir: str | Path,
                   name: str = "backbone") -> dict[str, Any]:
    """Replace ``params[name]`` and ``batch_stats[name]`` by an import-weights checkpoint.

    Every leaf must exist on both sides with the same shape (a checkpoint imported for another
    variant or number of input channels is refused); values take the dtype and, for jax arrays,
    the sharding of the leaf they replace.
    """
    import jax
    import orbax.checkpoint as ocp

    path = Path(ckpt_dir).absolute()
    if not path.is_dir():
        raise UserError(f"{path}: init checkpoint folder not found")
    try:
        restored = ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # orbax raises many types for unreadable folders
        raise UserError(f"{path}: not a readable orbax checkpoint ({type(e).__name__})") from e
    out = dict(variables)
    for coll in ("params", "batch_stats"):
        target = variables.get(coll, {}).get(name)
        source = restored.get(coll, {})
        if target is None:
            if source:
                raise UserError(f"{path}: the model has no {coll}/{name} to receive the checkpoint")
            continue
        tflat, sflat = _flat(target), _flat(source)
        missing, extra = sorted(set(tflat) - set(sflat)), sorted(set(sflat) - set(tflat))
        if missing or extra:
            raise UserError(f"{path}: {coll} do not match the model's {name} (missing "
                            f"{missing[:3]}, unexpected {extra[:3]}); was it imported for "
                            "another variant?")
        merged = {}
        for key, old in tflat.items():
            new = np.asarray(sflat[key])
            if new.shape != tuple(old.shape):
                raise UserError(f"{path}: {coll}/{name}/{key} has shape {new.shape}, the model "
                                f"needs {tuple(old.shape)} (other --in-channels or variant?)")
            new = new.astype(old.dtype)
            merged[key] = (jax.device_put(new, old.sharding) if isinstance(old, jax.Array)
                           else new)
        out[coll] = {**variables[coll], name: _unflat(merged)}
    return out
