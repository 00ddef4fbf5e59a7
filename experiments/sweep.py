"""Run a list of experiments (config, variant, seed) one after another, or print their commands.

A sweep is a plain generator in a config file (kauldron style): ``def sweep(): yield {...}``, one
dict per experiment, ``{"config": "configs/ablation_blocks.py:exp1"}`` plus optional dotted
config fields (``{"config": ..., "optim.lr": 0.1}``) and an optional fixed ``"seed"``; named
sweeps are ``def sweep_NAME()``, picked with ``FILE.py:NAME``. Experiments can also be named on
the command line with ``--config``. Every experiment is repeated over ``--seeds`` (the paper
averaged 5 runs: ``--seeds 0,1,2,3,4``, passed as ``--config.seed``).

Each run lives in ``<root>/<config stem>-<variant>-seed<k>`` (``-<variant>`` left out without
a variant; a ',' in the variant becomes '+', a sweep's extra fields are appended as
``+field=value``) and is two subprocesses: ``python -m tsfd_jax train`` then ``python -m
tsfd_jax evaluate --name <eval name>``. A run is finished when ``eval/<eval name>/report.json``
exists; finished runs are skipped, so the same command resumes a sweep (an interrupted training
resumes from its checkpoint). Runs whose configs are identical (the paper model is a row of every
ablation table) are trained once; the others become symbolic links to that workdir.

  python experiments/sweep.py --sweep configs/ablation_blocks.py --sweep configs/ablation_inputs.py \
      --root runs/ablations --seeds 0,1,2,3,4 --config.data.root /data/pannuke
  python experiments/sweep.py --config configs/default.py:fold2 --config configs/default.py:fold3 \
      --root runs/folds --config.data.root /data/pannuke
  python experiments/sweep.py --sweep configs/ablation_losses.py --root runs/ablations --print \
      --config.data.root /data/pannuke > jobs.sh      # one line per run, for a cluster

Extra ``--config.a.b=value`` arguments are passed to every training run. Prepare the data once
(``python -m tsfd_jax prepare``) and give the prepared folder as ``--config.data.root``; from raw
data every run prepares its own copy in its workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsfd_jax.config_files import (import_config_module, load_config,  # noqa: E402
                                  split_overrides)
from tsfd_jax.errors import UserError  # noqa: E402

DEFAULT_EVAL_NAME = "test"
Executor = Callable[[list[str]], int]


@dataclasses.dataclass
class Run:
    """One training + evaluation. ``overrides``: (dotted field, raw text) for ``--config.``."""

    spec: str                          # 'configs/ablation_blocks.py:exp1'
    seed: int
    workdir: Path
    overrides: list[tuple[str, str]]   # sweep fields, then the command line's
    alias_of: Path | None = None       # same config as an earlier run: link, do not train

    @property
    def stem(self) -> str:
        return Path(self.spec.partition(":")[0]).stem

    @property
    def variant(self) -> str:
        return self.spec.partition(":")[2]


# ---- sweep definitions -----------------------------------------------------------------------

def resolve_spec(spec: str, base: Path | None = None) -> str:
    """A config spec whose file exists: as given (from the working directory), else relative to
    ``base`` (the project root of the sweep file that named it)."""
    path, colon, variant = spec.partition(":")
    if not path.endswith(".py"):
        raise UserError(f"{spec}: a config must be a Python file (configs/NAME.py[:variant])")
    if Path(path).is_file() or base is None:
        return spec
    candidate = base / path
    return f"{candidate}{colon}{variant}" if candidate.is_file() else spec


def load_sweep(spec: str) -> list[dict]:
    """``FILE.py[:NAME]`` -> the dicts yielded by ``sweep()`` (or ``sweep_NAME()`` / ``NAME()``)."""
    path, _, name = spec.partition(":")
    if not Path(path).is_file():
        raise UserError(f"{path}: sweep file not found")
    module = import_config_module(path)
    candidates = [f"sweep_{name}", name] if name else ["sweep"]
    fn = next((getattr(module, c) for c in candidates if callable(getattr(module, c, None))), None)
    if fn is None:
        raise UserError(f"{path}: defines no {' or '.join(c + '()' for c in candidates)}")
    base = Path(path).resolve().parents[1]
    items = []
    for item in fn():
        if not isinstance(item, dict):
            raise UserError(f"{spec}: a sweep yields dicts, got {type(item).__name__}")
        item = dict(item)
        item["config"] = resolve_spec(str(item.get("config", path)), base)
        items.append(item)
    return items


def _raw(value) -> str:
    """Python value -> the text ``config_files.parse_value`` reads back as that value."""
    return value if isinstance(value, str) else repr(value)


def _token(text: str) -> str:
    return text.replace(",", "+").replace("/", "_").replace(" ", "")


def workdir_name(spec: str, seed: int, fields: Sequence[tuple[str, str]] = ()) -> str:
    """``<config stem>[-<variant>]-seed<k>``; variant ',' -> '+', sweep fields as +key=value."""
    stem = Path(spec.partition(":")[0]).stem
    parts = [_token(spec.partition(":")[2])] if spec.partition(":")[2] else []
    parts += [f"{k}={_token(v)}" for k, v in fields]
    return f"{stem}-{'+'.join(parts)}-seed{seed}" if parts else f"{stem}-seed{seed}"


def plan(items: Iterable[dict], seeds: Sequence[int], root: str | Path,
         overrides: Sequence[tuple[str, str]] = ()) -> list[Run]:
    """Runs in seed-major order (every experiment of seed 0 first, so early tables are complete).

    Every config is built (typos fail before anything runs); identical configs become aliases of
    the first run that has them.
    """
    root = Path(root)
    todo: list[tuple[int, int, Run]] = []
    for i, item in enumerate(items):
        item = dict(item)
        spec = str(item.pop("config"))
        fixed = item.pop("seed", None)
        fields = [(str(k), _raw(v)) for k, v in item.items()]
        for j, seed in enumerate([int(fixed)] if fixed is not None else seeds):
            run = Run(spec, seed, root / workdir_name(spec, seed, fields),
                      fields + list(overrides))
            todo.append((j, i, run))
    runs = [r for _, _, r in sorted(todo, key=lambda t: (t[0], t[1]))]
    seen: dict[str, Path] = {}
    out, names = [], set()
    for run in runs:
        if run.workdir.name in names:
            continue  # the same experiment named twice
        names.add(run.workdir.name)
        cfg = load_config(run.spec, [*run.overrides, ("seed", str(run.seed))])
        key = cfg.to_json_best_effort(sort_keys=True)
        if key in seen:
            run.alias_of = seen[key]
        else:
            seen[key] = run.workdir
        out.append(run)
    return out


# ---- commands and execution ------------------------------------------------------------------

def is_finished(workdir: Path, eval_name: str = DEFAULT_EVAL_NAME) -> bool:
    return (Path(workdir) / "eval" / eval_name / "report.json").is_file()


def commands(run: Run, eval_name: str = DEFAULT_EVAL_NAME, python: str = sys.executable,
             train_args: Sequence[str] = ()) -> list[list[str]]:
    """[train command, evaluate command] of a run."""
    # The seed goes last: it wins over a --config.seed among the overrides, as in plan().
    train = [python, "-m", "tsfd_jax", "train", "--config", run.spec,
             "--workdir", str(run.workdir), *[f"--config.{k}={v}" for k, v in run.overrides],
             f"--config.seed={run.seed}", *train_args]
    evaluate = [python, "-m", "tsfd_jax", "evaluate", "--workdir", str(run.workdir),
                "--name", eval_name]
    return [train, evaluate]


def _is_link(run: Run) -> bool:
    """A repeated config is linked, unless a real folder (a run made on its own) is already there:
    that one is run or skipped like any other."""
    return run.alias_of is not None and (run.workdir.is_symlink()
                                         or not os.path.lexists(run.workdir))


def link_alias(run: Run) -> None:
    """Make ``run.workdir`` a relative symbolic link to the run it repeats (never replacing a
    path that exists)."""
    if os.path.lexists(run.workdir):
        return
    run.workdir.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(run.alias_of, run.workdir.parent), run.workdir,
               target_is_directory=True)


def subprocess_executor(cmd: list[str]) -> int:
    return subprocess.run(cmd, check=False).returncode


def execute(runs: Sequence[Run], executor: Executor = subprocess_executor,
            eval_name: str = DEFAULT_EVAL_NAME, stop_on_error: bool = False,
            train_args: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, str]:
    """Run every unfinished run; returns {workdir name: done | skipped | linked | failed (...)}."""
    status: dict[str, str] = {}
    for k, run in enumerate(runs, 1):
        name = run.workdir.name
        head = f"[{k}/{len(runs)}] {name}"
        if _is_link(run):
            link_alias(run)
            status[name] = "linked"
            log(f"{head}: same config as {run.alias_of.name}, linked")
            continue
        if is_finished(run.workdir, eval_name):
            status[name] = "skipped"
            log(f"{head}: finished, skipped")
            continue
        train, evaluate = commands(run, eval_name, train_args=train_args)
        log(f"{head}: {shlex.join(train)}")
        rc = executor(train)
        if rc == 0:
            log(f"{head}: {shlex.join(evaluate)}")
            rc = executor(evaluate)
            status[name] = "done" if rc == 0 else f"failed (evaluate exit {rc})"
        else:
            status[name] = f"failed (train exit {rc})"
        if rc != 0 and stop_on_error:
            log(f"{head}: {status[name]}; stopping")
            break
    return status


def print_commands(runs: Sequence[Run], eval_name: str = DEFAULT_EVAL_NAME,
                   python: str = "python", train_args: Sequence[str] = ("--no-progress",),
                   out: Callable[[str], None] = print) -> None:
    """One shell line per unfinished run (train && evaluate); links for repeated configs."""
    for run in runs:
        if _is_link(run):
            link = shlex.quote(str(run.workdir))
            target = shlex.quote(os.path.relpath(run.alias_of, run.workdir.parent))
            out(f"[ -e {link} ] || ln -s {target} {link}")
        elif is_finished(run.workdir, eval_name):
            out(f"# finished: {run.workdir}")
        else:
            out(" && ".join(shlex.join(c) for c in commands(run, eval_name, python, train_args)))


# ---- command line ----------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text}: expected integers separated by commas") from None
    if not seeds:
        raise UserError("--seeds: no seed given")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Any config field can be set for every run: "
                                       "--config.data.root /data/pannuke")
    p.add_argument("--sweep", action="append", default=[], metavar="FILE.py[:NAME]",
                   help="a config file's sweep() (or sweep_NAME()); repeatable")
    p.add_argument("--config", action="append", default=[], metavar="FILE.py[:variant]",
                   help="one experiment; repeatable")
    p.add_argument("--root", required=True, help="folder holding the run folders")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--eval-name", default=DEFAULT_EVAL_NAME,
                   help=f"evaluation folder name under <run>/eval/ (default {DEFAULT_EVAL_NAME})")
    p.add_argument("--print", action="store_true", dest="print_only",
                   help="print the commands (one line per run) instead of running them")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state only")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while training")
    return p


def main(argv: list[str] | None = None, executor: Executor = subprocess_executor) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, rest = split_overrides(argv)
        args = build_parser().parse_args(rest)
        items = [item for s in args.sweep for item in load_sweep(s)]
        items += [{"config": resolve_spec(c)} for c in args.config]
        if not items:
            raise UserError("nothing to run: give --sweep FILE.py and/or --config FILE.py[:variant]")
        runs = plan(items, parse_seeds(args.seeds), args.root, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_only:
        print_commands(runs, args.eval_name)
        return 0
    if args.dry_run:
        for run in runs:
            state = (f"same config as {run.alias_of.name}" if _is_link(run)
                     else "finished" if is_finished(run.workdir, args.eval_name) else "to run")
            print(f"{run.workdir}  {state}")
        return 0
    status = execute(runs, executor, args.eval_name, args.stop_on_error,
                     ["--no-progress"] if args.no_progress else [])
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    counts = {s: sum(v.split()[0] == s for v in status.values())
              for s in ("done", "skipped", "linked", "failed")}
    print("sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + (f"; not reached: {len(runs) - len(status)}" if len(status) < len(runs) else ""))
    for name, why in failed.items():
        print(f"  {name}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
