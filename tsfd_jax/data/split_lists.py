"""Train / val / test sources from a prepared dataset under the two split schemes.

* ``official``: the prepared split names of the config (``data.train_split`` etc., '+' joins
  several), e.g. PanNuke's 3-fold rotation (docs/data.md: train F1 / val F2 / test F3, ...).
* ``tsfd``: the TSFD authors' released file lists (docs/data.md; train 5,675 / val 303 /
  test 1,923 PanNuke images), shipped as package data ``tsfd_jax/data/splits/{role}.txt`` with
  lines ``img_{Tissue}_{fold}_{index:05d}.png`` (index 0-based within the fold's .npy arrays).
"""

from __future__ import annotations

import importlib.resources
import re
from typing import Any

from tsfd_jax.errors import UserError

ROLES = ("train", "val", "test")
SCHEMES = ("official", "tsfd")
_TSFD_NAME = re.compile(r"^img_(?P<tissue>.+)_(?P<fold>\d+)_(?P<index>\d+)\.png$")
_FOLD_SPLIT = re.compile(r"^fold\d+$")


def parse_tsfd_name(name: str) -> tuple[str, int, int]:
    """'img_Adrenal_gland_1_01171.png' -> ('Adrenal_gland', 1, 1171)."""
    m = _TSFD_NAME.match(name.strip())
    if not m:
        raise ValueError(f"not a TSFD split file name: {name!r} "
                         "(expected img_<Tissue>_<fold>_<index>.png)")
    return m["tissue"], int(m["fold"]), int(m["index"])


def tsfd_names(role: str) -> list[str]:
    """The authors' file names of ``role`` ('train' | 'val' | 'test'), in list order."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {ROLES}")
    text = importlib.resources.files("tsfd_jax.data").joinpath("splits", f"{role}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def tsfd_keys(role: str) -> list[tuple[str, str]]:
    """(prepared key 'fold{f}/{i:05d}', tissue name) for each file of the authors' ``role`` list."""
    out = []
    for name in tsfd_names(role):
        tissue, fold, index = parse_tsfd_name(name)
        out.append((f"fold{fold}/{index:05d}", tissue))
    return out


def resolve_split(prepared: Any, data_cfg: Any, role: str) -> Any:
    """The random-access source for ``role`` of a PreparedDataset under ``data_cfg.split_scheme``.

    'official' -> ``prepared.source(data_cfg.<role>_split)``; 'tsfd' -> the authors' list for
    ``role`` taken from all prepared 'fold{N}' splits, checked name by name (every file present,
    tissue as in the file name)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {ROLES}")
    scheme = str(data_cfg.split_scheme)
    if scheme == "official":
        return prepared.source(str(getattr(data_cfg, f"{role}_split")))
    if scheme != "tsfd":
        raise UserError(f"data.split_scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")

    folds = [s for s in prepared.splits if _FOLD_SPLIT.match(s)]
    if not folds or prepared.metadata.get("source") != "pannuke":
        raise UserError(f"{prepared.root}: data.split_scheme 'tsfd' needs a prepared PanNuke "
                        f"dataset (splits fold1..fold3), this one has {', '.join(prepared.splits)}")
    expr = "+".join(folds)
    tissue_of = dict(zip(prepared.keys(expr), prepared.tissues(expr).tolist()))
    names = prepared.tissue_names
    wanted = tsfd_keys(role)
    missing = [k for k, _ in wanted if k not in tissue_of]
    if missing:
        raise UserError(
            f"{prepared.root}: {len(missing)} of the {len(wanted)} images of the TSFD {role} list "
            f"are not in the prepared folds {', '.join(folds)} (first: {', '.join(missing[:3])}); "
            "the TSFD lists need the real PanNuke folds 1-3 (2,656 / 2,523 / 2,722 images)")
    for key, tissue in wanted:
        have = names[tissue_of[key]]
        if have != tissue:
            raise UserError(
                f"{prepared.root}: {key} is {have} in the prepared data but {tissue} in the TSFD "
                f"{role} list; the prepared folds are not the real PanNuke folds")
    return prepared.source_for_keys(expr, [k for k, _ in wanted])
