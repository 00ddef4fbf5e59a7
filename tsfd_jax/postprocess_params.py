"""The post-processing's parameters (``cfg.postprocess``), checked: what a run validates before
it trains, without importing the post-processing itself (postprocess.py, docs/evaluation.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tsfd_jax.errors import ConfigError

VOTES = ("component", "nucleus")
METHODS = ("paper", "markers")


@dataclass(frozen=True)
class PostprocessParams:
    """The ``cfg.postprocess`` values (a plain, picklable copy for worker processes)."""
    seg_threshold: float = 0.5
    boundary_threshold: float = 0.5
    min_size: int = 22
    closing_size: int = 3
    erosion_size: int = 3
    dilation_size: int = 3
    vote: str = "component"  # majority class per: component (paper, authors) | nucleus
    method: str = "paper"    # paper (steps 1-6) | markers (``marker_instances``)
    split_depth: float = 0.0  # markers: split cores at distance-transform peaks this deep (px)
    max_growth: float = 0.0   # markers: grow cores at most this far (px); 0 = the whole foreground
    orphan_size: int = 0      # markers: foreground no core reached kept as nuclei from this size
    basin_depth: float = 0.0  # markers: split cores at boundary-probability basins this deep

    @classmethod
    def of(cls, cfg_pp: Any) -> "PostprocessParams":
        """From a ConfigDict, a dict or an instance; missing keys keep the defaults."""
        if isinstance(cfg_pp, cls):
            return cfg_pp
        if cfg_pp is None:
            return cls()
        get = cfg_pp.get if hasattr(cfg_pp, "get") else (lambda k, d: getattr(cfg_pp, k, d))
        params = cls(**{f.name: type(f.default)(get(f.name, f.default)) for f in fields(cls)})
        for name in ("closing_size", "erosion_size", "dilation_size"):
            size = int(getattr(params, name))
            if size > 1 and size % 2 == 0:
                raise ConfigError(f"postprocess.{name} must be odd (or 0/1 = off); got {size}")
        if params.vote not in VOTES:
            raise ConfigError(f"postprocess.vote must be one of {VOTES}; got {params.vote!r}")
        if params.method not in METHODS:
            raise ConfigError(f"postprocess.method must be one of {METHODS}; "
                              f"got {params.method!r}")
        if not params.splits_once():
            raise ConfigError("postprocess.split_depth and postprocess.basin_depth split the "
                              "cores two ways; set one of them (the other 0)")
        return params

    def splits_once(self) -> bool:
        """At most one way of splitting the cores is on."""
        return not (self.split_depth > 0 and self.basin_depth > 0)
