"""Writing a ``Prediction``: instance and class maps, nucleus table, QuPath GeoJSON, overlay.

Files of one image ``<stem>`` (docs/predict.md has the column and property lists):

* ``<stem>_instances.npy`` (int32 (H, W), 0 background, ids 1..K) or ``.tif`` (zlib, tiled,
  BigTIFF when needed);
* ``<stem>_classes.png`` (uint8 label per pixel, 0 background) or ``.tif`` with ``.tif``
  instances;
* ``<stem>_nuclei.csv``: one row per nucleus, ``TABLE_COLUMNS`` then ``prob_<label>`` for every
  label, then tissue and tissue_prob;
* ``<stem>_nuclei.geojson``: a FeatureCollection QuPath (0.4+) imports as detections
  (File > Import objects from file), one Feature per nucleus;
* ``<stem>_overlay.png``: the image with nucleus outlines coloured by class;
* ``<stem>_pannuke.npy``: for 256 x 256 images, the PanNuke layout (256, 256, C + 1) int32
  (instance ids per class channel, last channel background) that the official evaluation reads.

Polygons trace pixel edges, not pixel centres: vertices are integer pixel corners in image
coordinates (x right, y down, origin at the top-left corner of the top-left pixel, QuPath's
convention), so a polygon covers exactly its nucleus' pixels (its area equals area_px). Rings are
closed (first vertex = last), with no repeated or collinear vertices. Exterior rings have positive
signed area in the raw (x, y) numbers, i.e. they are counter-clockwise as RFC 7946 reads
coordinates (x east, y north); drawn on the y-down image they turn clockwise. Holes turn the
other way. Pixels that touch only at a corner are separate pieces (a MultiPolygon), so every
geometry is valid (QuPath 0.6 rejects invalid ones).

Every file is written to a temporary name in the output folder and renamed only when all files of
the image are complete; existing files are never replaced without ``overwrite``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import scipy.ndimage as ndi
import tifffile
from PIL import Image

from tsfd_jax.constants import PANNUKE_TILE
from tsfd_jax.errors import UserError
from tsfd_jax.overlay import class_colors, overlay
from tsfd_jax.postprocess import to_pannuke_layout

FORMATS = ("instances", "classes", "csv", "geojson", "overlay", "pannuke")
TABLE_COLUMNS = ("id", "x", "y", "area_px", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
                 "label", "class", "class_prob")
_FOUR = ndi.generate_binary_structure(2, 1)


# ---- polygons ------------------------------------------------------------------------------

# Pixel-edge directions: 0 east, 1 south, 2 west, 3 north (x right, y down).
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])


def _trace_component(mask: np.ndarray) -> list[np.ndarray]:
    """Rings of one 4-connected component (bool (h, w)) as (n, 2) int arrays of (x, y) pixel
    corners, closed; the exterior first, then holes. Every pixel edge between the component and
    the background is walked with the component on its right (on screen)."""
    m = np.pad(mask, 1)
    h, w = m.shape
    fg = m[1:-1, 1:-1]
    r, c = np.nonzero(fg)
    r, c = r + 1, c + 1
    starts, dirs = [], []
    for d, (dr, dc), (sx, sy) in ((0, (-1, 0), (0, 0)), (1, (0, 1), (1, 0)),
                                  (2, (1, 0), (1, 1)), (3, (0, -1), (0, 1))):
        # edge d of pixel (r, c) exists where the neighbour across it is background
        sel = ~m[r + dr, c + dc]
        starts.append(np.stack([c[sel] + sx, r[sel] + sy], 1))
        dirs.append(np.full(int(sel.sum()), d))
    start = np.concatenate(starts)
    d = np.concatenate(dirs)
    end = start + _STEP[d]
    stride = w + 1
    key = (start[:, 1] * stride + start[:, 0]) * 4 + d
    order = np.argsort(key)
    sorted_key = key[order]
    end_v = end[:, 1] * stride + end[:, 0]
    nxt = np.full(len(d), -1)
    # Next edge: turn left, else go straight, else turn right. Only a corner shared by two
    # diagonal pixels offers a choice; turning left there joins them, so the background they
    # enclose (within one 4-connected piece they always enclose some) becomes a hole touching
    # the outline at that corner, and no ring passes a vertex twice (valid OGC polygons).
    for turn in (1, 0, 3):  # direction (d + turn) % 4: 1 right, 0 straight, 3 left; last wins
        want = end_v * 4 + (d + turn) % 4
        pos = np.minimum(np.searchsorted(sorted_key, want), len(sorted_key) - 1)
        hit = sorted_key[pos] == want
        nxt[hit] = order[pos[hit]]
    nxt_l = nxt.tolist()
    seen = np.zeros(len(d), bool)
    rings = []
    for e0 in range(len(d)):
        if seen[e0]:
            continue
        cycle = []
        e = e0
        while not seen[e]:
            seen[e] = True
            cycle.append(e)
            e = nxt_l[e]
        cyc = np.asarray(cycle)
        turns = d[cyc] != d[np.roll(cyc, 1)]      # keep corners only
        pts = start[cyc[turns]] - 1               # undo the padding
        rings.append(np.concatenate([pts, pts[:1]]))
    rings.sort(key=lambda ring: -_signed_area(ring))  # the exterior (largest positive) first
    return rings


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring in the raw (x, y) numbers (> 0: counter-clockwise)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def mask_geometry(mask: np.ndarray, x0: int = 0, y0: int = 0, *,
                  scale: tuple[float, float] | None = None,
                  origin: tuple[float, float] = (0.0, 0.0), decimals: int = 3) -> dict:
    """GeoJSON geometry (Polygon or MultiPolygon) covering the True pixels of ``mask`` exactly;
    (x0, y0) is the image position of mask[0, 0].

    With ``scale`` = (sx, sy), every vertex (x, y) becomes origin + (x sx, y sy), rounded to
    ``decimals``: the polygon in another pixel frame (a slide's level 0 when the nuclei were
    found on a resampled grid). A positive axis-aligned scale keeps the rings valid.
    """
    lab, n = ndi.label(mask, structure=_FOUR)
    offset = np.array([x0, y0])
    polygons = []
    for sl_index, sl in enumerate(ndi.find_objects(lab), start=1):
        rings = _trace_component(lab[sl] == sl_index)
        shift = offset + np.array([sl[1].start, sl[0].start])
        if scale is None:
            polygons.append([(ring + shift).tolist() for ring in rings])
        else:
            polygons.append([np.round(np.asarray(origin) + (ring + shift) * np.asarray(scale),
                                      decimals).tolist() for ring in rings])
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


# ---- table ---------------------------------------------------------------------------------

def table_header(label_names: Iterable[str]) -> list[str]:
    return list(TABLE_COLUMNS) + [f"prob_{n}" for n in label_names] + ["tissue", "tissue_prob"]


def _label_name(names: tuple[str, ...], label: int) -> str:
    return names[label] if label < len(names) else str(label)


def tissue_of(tissue_names: tuple[str, ...], index: int,
              prob: float) -> tuple[str, float] | None:
    """(name, probability) of a tissue index, None for -1 (a model without tissue head)."""
    if index < 0:
        return None
    return (tissue_names[index] if index < len(tissue_names) else str(index)), float(prob)


def table_row(nucleus_id: int, x: float, y: float, area: int | float, bbox: Iterable[int],
              label: int, probs: np.ndarray, label_names: tuple[str, ...],
              tissue: tuple[str, float] | None) -> list:
    """One row of the nucleus table (columns of ``table_header``). A float ``area`` (a slide's
    level-0 pixels measured on a resampled grid) is written with 2 decimals."""
    area_text = int(area) if isinstance(area, (int, np.integer)) else f"{float(area):.2f}"
    return ([nucleus_id, f"{x:.2f}", f"{y:.2f}", area_text, *map(int, bbox), label,
             _label_name(label_names, label), f"{float(probs[label]):.4f}"]
            + [f"{float(p):.4f}" for p in probs]
            + (["", ""] if tissue is None else [tissue[0], f"{tissue[1]:.4f}"]))


def table_rows(pred, label_names: Iterable[str]) -> Iterable[list]:
    names = tuple(label_names)
    for k in range(pred.num_instances):
        tissue = tissue_of(pred.tissue_names, int(pred.tissue[k]), pred.tissue_prob[k])
        yield table_row(k + 1, pred.centroid[k, 0], pred.centroid[k, 1], int(pred.area[k]),
                        pred.bbox[k], int(pred.classes[k]), pred.class_probs[k], names, tissue)


def _write_csv(f, pred, label_names) -> None:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(table_header(label_names))
    for row in table_rows(pred, label_names):
        w.writerow(row)


# ---- GeoJSON -------------------------------------------------------------------------------

# A FeatureCollection streamed one feature at a time: HEAD, then feature_text(f, first) for
# every feature, then TAIL (files of any size, and a slide's file can be appended row by row).
GEOJSON_HEAD = '{"type": "FeatureCollection", "features": ['
GEOJSON_TAIL = "\n]}\n"


def feature_text(feature: dict, first: bool) -> str:
    return ("\n" if first else ",\n") + json.dumps(feature, separators=(",", ":"))


def detection_feature(geometry: dict, label: int, probs: np.ndarray,
                      label_names: tuple[str, ...], colors, head: dict,
                      tissue: tuple[str, float] | None) -> dict:
    """A QuPath detection: classification (name + colour), measurements (``head`` first, then
    class_prob, prob_<label> for every label, tissue_prob) and the tissue name."""
    measurements = dict(head)
    measurements["class_prob"] = round(float(probs[label]), 4)
    measurements.update({f"prob_{n}": round(float(p), 4) for n, p in zip(label_names, probs)})
    props = {"objectType": "detection",
             "classification": {"name": _label_name(label_names, label),
                                "color": list(colors[label % len(colors)])},
             "measurements": measurements}
    if tissue is not None:
        measurements["tissue_prob"] = round(tissue[1], 4)
        props["tissue"] = tissue[0]
    return {"type": "Feature", "geometry": geometry, "properties": props}


def nucleus_feature(pred, k: int, label_names: tuple[str, ...], colors) -> dict:
    """The Feature of nucleus k + 1 (QuPath detection with classification and measurements)."""
    x0, y0, x1, y1 = (int(v) for v in pred.bbox[k])
    mask = np.asarray(pred.inst[y0:y1, x0:x1]) == k + 1
    return detection_feature(mask_geometry(mask, x0, y0), int(pred.classes[k]),
                             pred.class_probs[k], label_names, colors,
                             {"id": k + 1, "area_px": int(pred.area[k])},
                             tissue_of(pred.tissue_names, int(pred.tissue[k]),
                                       pred.tissue_prob[k]))


def _write_geojson(f, pred, label_names) -> None:
    colors = class_colors(label_names)
    f.write(GEOJSON_HEAD)
    for k in range(pred.num_instances):
        f.write(feature_text(nucleus_feature(pred, k, label_names, colors), k == 0))
    f.write(GEOJSON_TAIL)


# ---- image files -------------------------------------------------------------------------

def _save_png(f, array: np.ndarray) -> None:
    Image.fromarray(np.asarray(array)).save(f, format="PNG")


def _save_tif(f, array: np.ndarray) -> None:
    array = np.asarray(array) if not isinstance(array, np.memmap) else array
    big = array.nbytes > (1 << 31)
    tile = (256, 256) if min(array.shape[:2]) >= 256 else None
    tifffile.imwrite(f, array, compression="zlib", tile=tile, bigtiff=big)


# ---- all files of one image ----------------------------------------------------------------

def output_paths(out_dir: str | Path, stem: str, formats: Iterable[str] = FORMATS,
                 instance_format: str = "npy",
                 image_shape: tuple[int, int] | None = None) -> dict[str, Path]:
    """format -> path of each file ``write_outputs`` would write (pannuke only for 256 x 256)."""
    out_dir = Path(out_dir)
    if instance_format not in ("npy", "tif"):
        raise UserError(f"--format {instance_format}: expected npy or tif")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown output formats {sorted(unknown)}; expected some of {FORMATS}")
    names = {"instances": f"{stem}_instances.{instance_format}",
             "classes": f"{stem}_classes.{'png' if instance_format == 'npy' else 'tif'}",
             "csv": f"{stem}_nuclei.csv", "geojson": f"{stem}_nuclei.geojson",
             "overlay": f"{stem}_overlay.png", "pannuke": f"{stem}_pannuke.npy"}
    paths = {k: out_dir / names[k] for k in FORMATS if k in set(formats)}
    if "pannuke" in paths and tuple(image_shape or ()) != (PANNUKE_TILE, PANNUKE_TILE):
        del paths["pannuke"]
    return paths


def check_targets(paths: Iterable[Path], overwrite: bool) -> None:
    """UserError naming the first target that exists (unless ``overwrite``) or that cannot be
    written, before anything is written."""
    for p in paths:
        p = Path(p)
        if p.exists() and not overwrite:
            raise UserError(f"{p}: already exists; pass --overwrite to replace it")
        if p.exists() and p.is_dir():
            raise UserError(f"{p}: is a folder")


def write_outputs(pred, out_dir: str | Path, stem: str, label_names: Iterable[str] | None = None,
                  formats: Iterable[str] = FORMATS, *, image: np.ndarray | None = None,
                  instance_format: str = "npy", overwrite: bool = False) -> dict[str, Path]:
    """Write the files of one image atomically; returns format -> path.

    ``image`` (uint8 RGB) is needed for the overlay (skipped without). Existing targets raise
    ``UserError`` before anything is written unless ``overwrite``; on any error the temporary
    files are removed and no target is touched.
    """
    out_dir = Path(out_dir)
    label_names = tuple(label_names if label_names is not None else pred.label_names)
    formats = [f for f in formats if f != "overlay" or image is not None]
    paths = output_paths(out_dir, stem, formats, instance_format, pred.inst.shape)
    check_targets(paths.values(), overwrite)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the output folder ({e.strerror})") from None
    writers = {
        "instances": lambda f: (np.save(f, np.asarray(pred.inst, np.int32), allow_pickle=False)
                                if instance_format == "npy" else _save_tif(f, pred.inst)),
        "classes": lambda f: (_save_png(f, pred.class_map) if instance_format == "npy"
                              else _save_tif(f, pred.class_map)),
        "csv": lambda f: _write_csv(f, pred, label_names),
        "geojson": lambda f: _write_geojson(f, pred, label_names),
        "overlay": lambda f: _save_png(f, overlay(image, pred.inst, pred.class_map, label_names)),
        "pannuke": lambda f: np.save(f, _pannuke(pred, len(label_names) - 1), allow_pickle=False),
    }
    temps: dict[str, Path] = {}
    try:
        for fmt, path in paths.items():
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            temps[fmt] = tmp
            text = fmt in ("csv", "geojson")
            with open(tmp, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""}
                                                       if text else {})) as f:
                writers[fmt](f)
        for fmt, path in paths.items():
            os.replace(temps.pop(fmt), path)
    except PermissionError as e:
        raise UserError(f"{out_dir}: cannot write here ({e.strerror})") from None
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return paths


def _pannuke(pred, num_classes: int) -> np.ndarray:
    return to_pannuke_layout(np.asarray(pred.inst), pred.classes, num_classes, dtype=np.int32)
