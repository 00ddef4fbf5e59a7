"""The paper's Tables 4-10 from finished runs: our mean ± std over runs beside the paper's numbers.

Reads every run folder under ``--root`` named as experiments/sweep.py names them
(``<config stem>[-<variant>]-seed<k>``) that holds ``eval/<eval name>/report.json``
(tsfd_jax/evaluate_run.py). Tables 4-7 (ablations, PAPER §5): one row per variant of
configs/ablation_{blocks,inputs,losses,resolution}.py, mPQ and bPQ. Tables 8-10 (TSFD-Net,
PAPER §5): runs of the paper model (configs/default.py and the paper row of every ablation
table, each workdir counted once): PQ per tissue (8), PQ per class (9), detection and
classification P/R/F1 (10). A row pools the seeds and the official fold rotations
(``:fold1|fold2|fold3``) of its experiment; ``--scheme tsfd`` reports the runs on the authors'
split (``:tsfd_split``) instead. Runs with extra sweep fields (``+field=value`` in the name) are
other experiments and are left out. Missing numbers are "-".

  python experiments/tables.py --root runs/ablations                 # -> runs/ablations/tables/
  python experiments/tables.py --root runs/ablations --out paper_tables --scheme tsfd

Writes ``tables.md`` (all tables) and ``table4.csv`` .. ``table10.csv``; prints the markdown.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import io
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsfd_jax import paper  # noqa: E402

ABLATIONS = ("ablation_blocks", "ablation_inputs", "ablation_losses", "ablation_resolution")
PAPER_MODEL_STEMS = ("default",)   # configs whose plain variant is the paper model
RUN_NAME = re.compile(r"^(?P<stem>[A-Za-z0-9_]+)(?:-(?P<variant>.+))?-seed(?P<seed>\d+)$")
FOLD_PARTS = ("fold1", "fold2", "fold3")
DEFAULT_EVAL_NAME = "test"


@dataclasses.dataclass
class RunResult:
    name: str
    path: Path            # the real folder (links resolved)
    stem: str
    row: str | None       # canonical ablation row; None for configs without rows
    scheme: str           # official | tsfd
    seed: int
    extra: bool           # the name carries sweep fields (+field=value)
    report: dict


# ---- collecting ------------------------------------------------------------------------------

def _config_module(stem: str):
    try:
        return importlib.import_module(f"configs.{stem}")
    except ImportError:
        return None


def parse_run_name(name: str) -> tuple[str, str, int, bool] | None:
    """'ablation_blocks-exp4+fold2-seed3' -> ('ablation_blocks', 'exp4,fold2', 3, False)."""
    m = RUN_NAME.match(name)
    if not m:
        return None
    parts = (m["variant"] or "").split("+") if m["variant"] else []
    extra = any("=" in p for p in parts)
    variant = ",".join(p for p in parts if "=" not in p)
    return m["stem"], variant, int(m["seed"]), extra


def classify(stem: str, variant: str) -> tuple[str | None, str]:
    """(canonical row of an ablation config or None, split scheme) of a run's variant."""
    parts = [p for p in variant.split(",") if p]
    scheme = "tsfd" if "tsfd_split" in parts else "official"
    module = _config_module(stem)
    if module is not None and hasattr(module, "split_variant"):
        try:
            row, _ = module.split_variant(variant or None)
        except (ValueError, KeyError):
            return None, scheme
        return row, scheme
    return None, scheme


def collect(root: str | Path, eval_name: str = DEFAULT_EVAL_NAME) -> list[RunResult]:
    """Every finished run under ``root`` (unreadable reports are reported and skipped)."""
    results = []
    root = Path(root)
    if not root.is_dir():
        return results
    for entry in sorted(root.iterdir()):
        parsed = parse_run_name(entry.name)
        report_path = entry / "eval" / eval_name / "report.json"
        if parsed is None or not report_path.is_file():
            continue
        try:
            report = json.loads(report_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"warning: {report_path}: unreadable ({e}); left out", file=sys.stderr)
            continue
        stem, variant, seed, extra = parsed
        row, scheme = classify(stem, variant)
        results.append(RunResult(entry.name, entry.resolve(), stem, row, scheme, seed, extra,
                                 report))
    return results


# ---- statistics and formatting ---------------------------------------------------------------

def _get(report: dict, *path):
    node = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) and math.isfinite(node) else None


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std (ddof 1; None for one value), count) over the non-missing values."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, s, len(v)


def fmt_paper(x: float | None) -> str:
    """A paper number with the digits the paper gives (.490 stays 0.49, not 0.4900)."""
    return "-" if x is None else str(x)


def fmt_stat(stat: tuple[float | None, float | None, int]) -> str:
    m, s, n = stat
    if m is None:
        return "-"
    return f"{m:.4f} ± {s:.4f}" if s is not None else f"{m:.4f}"


@dataclasses.dataclass
class Table:
    """One paper table: markdown headers/rows and CSV headers/rows (numbers unformatted)."""

    number: int
    title: str
    headers: list[str]
    rows: list[list[str]]
    csv_headers: list[str]
    csv_rows: list[list]

    def markdown(self) -> str:
        lines = [f"## Table {self.number}: {self.title}", "",
                 "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.csv_headers)
        for r in self.csv_rows:
            w.writerow(["" if x is None else x for x in r])
        return buf.getvalue()


def _stat_cells(stat) -> list:
    m, s, n = stat
    return [None if m is None else round(m, 6), None if s is None else round(s, 6), n]


# ---- the tables ------------------------------------------------------------------------------

def ablation_table(module, runs: Sequence[RunResult]) -> Table:
    """Tables 4-7: per variant of an ablation config, mPQ and bPQ beside the paper."""
    stem = module.__name__.rsplit(".", 1)[-1]
    rows, csv_rows = [], []
    for name, v in module.VARIANTS.items():
        mine = [r for r in runs if r.stem == stem and r.row == name and not r.extra]
        mpq = mean_std([_get(r.report, "summary", "mPQ") for r in mine])
        bpq = mean_std([_get(r.report, "summary", "bPQ") for r in mine])
        rows.append([name, v["row"], fmt_paper(v["mpq"]), fmt_paper(v["bpq"]), fmt_stat(mpq), fmt_stat(bpq),
                     str(len(mine))])
        csv_rows.append([name, v["row"], v["mpq"], v["bpq"], *_stat_cells(mpq),
                         *_stat_cells(bpq), len(mine)])
    return Table(int(module.TABLE), module.TITLE,
                 ["variant", "experiment", "paper mPQ", "paper bPQ", "mPQ", "bPQ", "runs"], rows,
                 ["variant", "experiment", "paper_mPQ", "paper_bPQ", "mPQ_mean", "mPQ_std",
                  "mPQ_n", "bPQ_mean", "bPQ_std", "bPQ_n", "runs"], csv_rows)


def paper_model_runs(runs: Sequence[RunResult], modules: Sequence) -> list[RunResult]:
    """Runs of the paper model: default.py (no variant but a fold/split) and every ablation
    table's paper row; a folder reached through several names counts once."""
    paper_rows = {m.__name__.rsplit(".", 1)[-1]: m.PAPER_MODEL for m in modules}
    chosen: dict[Path, RunResult] = {}
    for r in runs:
        if r.extra:
            continue
        if r.stem in PAPER_MODEL_STEMS or (r.stem in paper_rows and paper_rows[r.stem] == r.row):
            chosen.setdefault(r.path, r)
    return list(chosen.values())


def tissue_table(runs: Sequence[RunResult]) -> Table:
    """Table 8: mPQ and bPQ per tissue (and over all tissues)."""
    tissues = list(paper.TISSUE_MPQ)
    for r in runs:  # tissues of other datasets too, after the paper's 19
        for t in (r.report.get("pq") or {}).get("tissue_mPQ") or {}:
            if t not in tissues:
                tissues.append(t)
    rows, csv_rows = [], []
    for t in tissues:
        mpq = mean_std([_get(r.report, "pq", "tissue_mPQ", t) for r in runs])
        bpq = mean_std([_get(r.report, "pq", "tissue_bPQ", t) for r in runs])
        pm, pb = paper.TISSUE_MPQ.get(t), paper.TISSUE_BPQ.get(t)
        rows.append([t, fmt_paper(pm), fmt_paper(pb), fmt_stat(mpq), fmt_stat(bpq), str(mpq[2])])
        csv_rows.append([t, pm, pb, *_stat_cells(mpq), *_stat_cells(bpq)])
    mpq = mean_std([_get(r.report, "summary", "mPQ") for r in runs])
    bpq = mean_std([_get(r.report, "summary", "bPQ") for r in runs])
    rows.append(["**all (tissue average)**", fmt_paper(paper.MPQ), fmt_paper(paper.BPQ), fmt_stat(mpq),
                 fmt_stat(bpq), str(mpq[2])])
    csv_rows.append(["all", paper.MPQ, paper.BPQ, *_stat_cells(mpq), *_stat_cells(bpq)])
    return Table(8, "TSFD-Net PQ per tissue",
                 ["tissue", "paper mPQ", "paper bPQ", "mPQ", "bPQ", "runs"], rows,
                 ["tissue", "paper_mPQ", "paper_bPQ", "mPQ_mean", "mPQ_std", "mPQ_n",
                  "bPQ_mean", "bPQ_std", "bPQ_n"], csv_rows)


def _class_names(runs: Sequence[RunResult], paper_names: Sequence[str], *path) -> list[str]:
    names = list(paper_names)
    for r in runs:
        node = r.report
        for key in path:
            node = (node or {}).get(key) if isinstance(node, dict) else None
        for c in node or {}:
            if c not in names:
                names.append(c)
    return names


def class_table(runs: Sequence[RunResult]) -> Table:
    """Table 9: PQ per nucleus class (mean over all images, the official per-class PQ)."""
    rows, csv_rows = [], []
    for c in _class_names(runs, list(paper.CLASS_PQ), "pq", "class_PQ"):
        pq = mean_std([_get(r.report, "pq", "class_PQ", c) for r in runs])
        p = paper.CLASS_PQ.get(c)
        rows.append([c, fmt_paper(p), fmt_stat(pq), str(pq[2])])
        csv_rows.append([c, p, *_stat_cells(pq)])
    return Table(9, "TSFD-Net PQ per class", ["class", "paper PQ", "PQ", "runs"], rows,
                 ["class", "paper_PQ", "PQ_mean", "PQ_std", "PQ_n"], csv_rows)


def detection_table(runs: Sequence[RunResult]) -> Table:
    """Table 10: detection P/R/F1 and classification P/R/F1 per class (HoVer-Net protocol)."""
    rows, csv_rows = [], []
    entries = [("detection", ("Pd", "Rd", "F1d"), (), paper.DETECTION)]
    for c in _class_names(runs, list(paper.CLASSIFICATION_F1), "detection", "per_class"):
        entries.append((c, ("P", "R", "F1"), ("per_class", c),
                        {"F1": paper.CLASSIFICATION_F1.get(c)}))
    for label, keys, path, ref in entries:
        stats = [mean_std([_get(r.report, "detection", *path, k) for r in runs]) for k in keys]
        refs = [ref.get("P"), ref.get("R"), ref.get("F1")]
        rows.append([label, *[fmt_paper(x) for x in refs], *[fmt_stat(s) for s in stats],
                     str(stats[2][2])])
        csv_rows.append([label, *refs, *[x for s in stats for x in _stat_cells(s)]])
    return Table(10, "TSFD-Net detection and classification (12 px)",
                 ["", "paper P", "paper R", "paper F1", "P", "R", "F1", "runs"], rows,
                 ["row", "paper_P", "paper_R", "paper_F1", "P_mean", "P_std", "P_n", "R_mean",
                  "R_std", "R_n", "F1_mean", "F1_std", "F1_n"], csv_rows)


def build_tables(results: Sequence[RunResult], scheme: str = "official") -> list[Table]:
    runs = [r for r in results if r.scheme == scheme]
    modules = [importlib.import_module(f"configs.{name}") for name in ABLATIONS]
    tables = [ablation_table(m, runs) for m in modules]
    main = paper_model_runs(runs, modules)
    tables += [tissue_table(main), class_table(main), detection_table(main)]
    return sorted(tables, key=lambda t: t.number)


# ---- writing ---------------------------------------------------------------------------------

def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _counted(r: RunResult, scheme: str) -> bool:
    """Whether a run enters a table: an ablation row or the paper model, of this scheme."""
    return (r.scheme == scheme and not r.extra
            and (r.stem in PAPER_MODEL_STEMS or (r.stem in ABLATIONS and r.row is not None)))


def markdown(tables: Sequence[Table], results: Sequence[RunResult], scheme: str) -> str:
    used = [r for r in results if _counted(r, scheme)]
    other = [r.name for r in results if not _counted(r, scheme)]
    head = [f"# TSFD-Net: the paper's tables, reproduced ({scheme} split scheme)", "",
            f"{len(used)} finished runs; numbers are mean ± sample std over the runs of a row "
            "(seeds and fold rotations pooled); '-' = no run (or not in the paper's text). "
            "The paper evaluated on a random per-tissue split against ground truth rebuilt by "
            "its own post-processing, so its columns are not directly comparable "
            "(docs/FIDELITY.md).", ""]
    if other:
        head += [f"Not in these tables (another split scheme, extra sweep fields or another "
                 f"experiment): {', '.join(other)}", ""]
    return "\n".join(head) + "\n" + "\n\n".join(t.markdown() for t in tables) + "\n"


def write_tables(tables: Sequence[Table], results: Sequence[RunResult], out: str | Path,
                 scheme: str = "official") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "tables.md"]
    _write(written[0], markdown(tables, results, scheme))
    for t in tables:
        path = out / f"table{t.number}.csv"
        _write(path, t.csv())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="folder holding the run folders")
    p.add_argument("--out", default="", help="output folder (default <root>/tables)")
    p.add_argument("--eval-name", default=DEFAULT_EVAL_NAME,
                   help=f"evaluation folder under <run>/eval/ (default {DEFAULT_EVAL_NAME})")
    p.add_argument("--scheme", choices=("official", "tsfd"), default="official",
                   help="official: PanNuke fold rotations; tsfd: the authors' split")
    args = p.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"error: {args.root}: folder does not exist", file=sys.stderr)
        return 2
    results = collect(args.root, args.eval_name)
    tables = build_tables(results, args.scheme)
    write_tables(tables, results, args.out or Path(args.root) / "tables", args.scheme)
    print(markdown(tables, results, args.scheme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
