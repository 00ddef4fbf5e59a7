"""Command line: ``python -m tsfd_jax <command> [options]``.

Each command lives in ``tsfd_jax/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; those modules import heavy libraries inside ``run`` so that ``--help`` is
instant. A command module that is not installed is simply not listed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from tsfd_jax.errors import UserError

# name -> (module, one-line help). Order is the order of a typical job.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tsfd_jax.commands.demo", "run the whole job on the embedded synthetic default"),
    "synth": ("tsfd_jax.commands.synth", "write synthetic PanNuke-format folds"),
    "prepare": ("tsfd_jax.commands.prepare", "prepare PanNuke folds or image+label folders"),
    "show-batch": ("tsfd_jax.commands.show_batch", "picture of a preprocessed batch"),
    "summary": ("tsfd_jax.commands.summary", "parameters per part and FLOPs of a config's model"),
    "import-weights": ("tsfd_jax.commands.import_weights", "Keras EfficientNet weights -> orbax"),
    "train": ("tsfd_jax.commands.train", "train a config in a workdir (resumes automatically)"),
    "evaluate": ("tsfd_jax.commands.evaluate", "evaluate a trained workdir on a split"),
    "pq": ("tsfd_jax.commands.pq", "PanNuke PQ of two PanNuke-layout folders (no model)"),
    "predict": ("tsfd_jax.commands.predict", "any-size H&E images -> instances, tables, GeoJSON"),
}
# Commands that compile the model: they take --compilation-cache (compilation_cache.py).
COMPILING = ("demo", "train", "evaluate", "predict")


def _available() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsfd_jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        if name in COMPILING:
            p.add_argument("--compilation-cache", default=None, metavar="DIR|none",
                           help="persistent XLA compilation cache (default: "
                                "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/tsfd-jax/xla); "
                                "'none' compiles every run")
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # ml_collections style overrides (--config.a.b=value) go to commands that load a config.
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for i, a in enumerate(extra) if not a.startswith("--config.")
               and not (i > 0 and extra[i - 1].startswith("--config.") and "=" not in extra[i - 1])]
    takes_overrides = hasattr(args, "config") or getattr(args, "takes_config_overrides", False)
    if unknown or (overrides and not takes_overrides):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.config_overrides = extra if overrides else []
    try:
        if args.command in COMPILING:
            from tsfd_jax import compilation_cache  # imports jax: not needed for --help

            compilation_cache.enable(args.compilation_cache)
        code = importlib.import_module(args._module).run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
