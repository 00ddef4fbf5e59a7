"""Config files and ``--config.a.b=value`` overrides on the command line (ml_collections style).

A config is a Python file the user names (``configs/default.py``, optionally ``:variant``)
defining ``get_config(arg=None) -> ConfigDict``, the ml_collections convention; it is imported,
not parsed. Overrides are parsed as Python literals (``ast.literal_eval``; a value that is not
one stays a string) and type-checked against the field they replace:

    --config.data.root=/data/pannuke  --config.model.num_bifpn 2  --config.model.taps "('a','b')"

Both ``--config.x=v`` and ``--config.x v`` spellings are accepted.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os
import sys
from typing import Any

from tsfd_jax.errors import UserError

PREFIX = "--config."


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config FILE.py[:variant]``; overrides are collected by ``split_overrides``."""
    parser.add_argument("--config", required=required, metavar="FILE.py[:variant]",
                        help="config file, optionally with :variant; override any field with "
                             "--config.a.b=value")


def split_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Split ``argv`` into ``[(dotted.key, raw value)]`` overrides and the other arguments."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(PREFIX):
            key, eq, value = arg[len(PREFIX):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg}: missing value")
                value = argv[i + 1]
                i += 1
            if not key:
                raise UserError(f"{arg}: missing field name")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def parse_value(raw: str) -> Any:
    """A Python literal if ``raw`` is one (``3``, ``0.5``, ``True``, ``(1, 2)``), else ``raw``."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


def _coerce(old: Any, new: Any, key: str, raw: str) -> Any:
    """``new`` converted to the type of the field's current value ``old``, or a UserError."""
    if old is None:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
    elif isinstance(old, str):
        return raw if not isinstance(new, str) else new  # '--config.data.root=123' is a path
    elif isinstance(old, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
    elif isinstance(old, float):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
    elif isinstance(old, (tuple, list)):
        if isinstance(new, (tuple, list)):
            return type(old)(new)
        if isinstance(new, str) and not new:
            return type(old)()
    else:
        return new
    raise UserError(f"--config.{key}={raw}: expected {type(old).__name__} "
                    f"(current value {old!r}), got {type(new).__name__}")


def apply_override(cfg, key: str, raw: str) -> None:
    """Set ``cfg.<key>`` (dotted path) from its command-line text, type-checked."""
    import ml_collections

    node = cfg
    parts = key.split(".")
    for depth, name in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(name, keys, n=3)
            where = ".".join(parts[:depth]) or "the config"
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--config.{key}: {where} has no field {name!r}{hint}")
        if depth == len(parts) - 1:
            value = _coerce(node[name], parse_value(raw), key, raw)
            try:
                node[name] = value
            except (TypeError, ValueError) as e:
                raise UserError(f"--config.{key}={raw}: {e}") from None
        else:
            node = node[name]


def import_config_module(path: str):
    folder = os.path.dirname(os.path.abspath(path))
    # Config files import siblings as a package ("from configs import default"): make the
    # folder holding that package importable, as running from the project root does.
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        root = os.path.dirname(folder)
        if root not in sys.path:
            sys.path.insert(0, root)
        package = os.path.basename(folder)
        name = f"{package}.{os.path.splitext(os.path.basename(path))[0]}"
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and os.path.samefile(spec.origin, path):
            return importlib.import_module(name)
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_tsfd_config_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str, overrides: list[str] | list[tuple[str, str]] = ()):
    """``path.py[:variant]`` + overrides -> ConfigDict.

    ``overrides``: raw arguments (``["--config.a.b=1", "--config.c", "x"]``) or pairs
    ``[("a.b", "1")]``.
    """
    path, _, variant = spec.partition(":")
    if not path.endswith(".py"):
        raise UserError(f"{path}: a config must be a Python file (configs/NAME.py[:variant])")
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    module = import_config_module(path)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: defines no get_config()")
    try:
        cfg = module.get_config(variant or None)
    except (ValueError, KeyError) as e:
        raise UserError(f"{spec}: {e}") from None
    overrides = list(overrides)
    if overrides and isinstance(overrides[0], str):
        pairs, rest = split_overrides(overrides)
        if rest:
            raise UserError(f"unrecognized arguments: {' '.join(rest)}")
    else:
        pairs = overrides
    for key, raw in pairs:
        apply_override(cfg, key, raw)
    return cfg
