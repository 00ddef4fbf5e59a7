"""What the ablation config files (configs/ablation_*.py) share: variant parsing, ``get_config``
and the sweeps, made from each file's table of rows (``table_functions``)."""

from configs import default


def _split_variant(arg, variants, paper_model, file):
    alias = {a: n for n, v in variants.items() for a in (n, *v["aliases"])}
    rows, rest = [], []
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        (rows if part in alias else rest).append(alias.get(part, part))
    if len(rows) > 1:
        raise ValueError(f"{file}: give one row, got {', '.join(rows)}")
    for part in rest:
        if part not in default.ROTATIONS and part != "tsfd_split":
            raise ValueError(f"unknown variant {part!r} of {file} (rows: {', '.join(alias)}; "
                             f"and {', '.join([*default.ROTATIONS, 'tsfd_split'])})")
    return (rows[0] if rows else paper_model), ",".join(rest) or None


def set_field(c, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for p in path:
        c = c[p]
    if last not in c:
        raise KeyError(f"config has no field {dotted}")
    c[last] = value


def table_functions(variants: dict, paper_model: str, file: str):
    """``(get_config, split_variant, sweep, sweep_folds, sweep_tsfd)`` of one ablation table.

    ``variants``: canonical row name -> dict(aliases, row, mpq, bpq, changes={dotted: value});
    ``paper_model``: the row that is TSFD-Net itself (no variant); ``file``: the config's path.
    """
    def split_variant(arg: str | None) -> tuple[str, str | None]:
        """'row,fold2' -> (the table's row, canonical name; the rest for configs/default.py)."""
        return _split_variant(arg, variants, paper_model, file)

    def get_config(arg: str | None = None):
        name, rest = split_variant(arg)
        c = default.get_config(rest)
        for key, value in variants[name]["changes"].items():
            set_field(c, key, value)
        return c

    def sweep():
        """Every row once (kauldron style); seeds come from ``experiments/sweep.py --seeds``."""
        for name in variants:
            yield {"config": f"{file}:{name}"}

    def sweep_folds():
        """Every row on the official 3-fold rotation (fold1 is the default split)."""
        for name in variants:
            for fold in ("", ",fold2", ",fold3"):
                yield {"config": f"{file}:{name}{fold}"}

    def sweep_tsfd():
        """Every row on the authors' released split (docs/data.md)."""
        for name in variants:
            yield {"config": f"{file}:{name},tsfd_split"}

    return get_config, split_variant, sweep, sweep_folds, sweep_tsfd
