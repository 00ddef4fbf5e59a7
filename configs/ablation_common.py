"""Variant parsing shared by the ablation config files (configs/ablation_*.py)."""

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
