"""Quality per CPU-minute: train named configs for the same wall-clock budget, evaluate each.

Every run goes through the project's own pipeline (``loop.train_and_evaluate``, then
``evaluate_workdir`` on the config's test split, untuned and with post-processing tuned on the
validation split, docs/learning.md), so two rows differ only by what their configs change.
Equal budget: every config's step is timed in the training loop, input pipeline included,
before any run trains (compile excluded; ``--probe-rounds`` probes per run, interleaved across
the runs with the order reversed every other round, because a VM's speed drifts by a third
between minutes: BENCHMARKS.md), and each run's ``total_steps`` set from its median so that
training takes ``--budget-min`` minutes; the whole schedule (warm-up, cosine) is then run, so
no run is cut off mid-schedule. Each row also gives the seconds its steps took in training (from
its log), the check that the budget was shared fairly. With ``--turn-min M`` the runs train in
turns of about M minutes each, the order reversed every turn, each turn resumed exactly from the
last: every run then trains in the same stretch of the VM's minutes instead of one after the
other (docs/learning.md §41).

Datasets: ``synthetic`` (PanNuke-format folds written by data/synthetic.py at the configs'
``data.synth_image_size``, 256 px for the demo-size configs, which train on random crops of
``data.image_size`` and are evaluated on the whole patches; ``--image-size`` sets both for every
run) and ``consep`` (the folder of
CoNSeP tiles given by ``--data``: ``--test-fraction`` of the source images held out as the test
set, the rest split into train and validation by the config as configs/consep.py does). The
post-processing is tuned on the validation split and scored on the test split.

  python experiments/bench_quality.py --dataset synthetic --budget-min 4 --out q_synth.json
  python experiments/bench_quality.py --dataset consep --data ../shared/data/consep/train \
      --budget-min 20 --out q_consep.json
  python experiments/bench_quality.py --run "adam:configs/demo.py --config.optim.name=adamw \
      --config.optim.lr=2e-3" --run unet:configs/baseline_unet.py

A run is ``NAME:CONFIG[:variant] [--config.a.b=v ...]``. Results: a table on stdout and, with
``--out``, JSON with one row per run (bPQ, mPQ, per-class PQ, Dice, detection F1, tuned
numbers, images seen, steps, seconds). Workdirs go under ``--workdir`` and are reused when a run
of the same config and budget exists there (a finished run is evaluated again, not retrained).

StarDist as an external reference (``consep`` only): when the interpreter given by
``--stardist-python`` (default: this one) can ``import stardist``, experiments/stardist_row.py
runs under it on the same held-out split: StarDist2D trained on the training folder for the
same ``--budget-min`` (its probability and NMS thresholds optimised on held-back source images
of that folder), its predictions of the test tiles saved as ``evaluate --data`` saves them and
scored here by the project's evaluator (evaluate_images.score_image + summarize: bPQ, mPQ,
per-class PQ, Dice of the binary instance maps, detection F1), as the row ``stardist``. It has no
tuned split (its thresholds are already tuned, on training images). StarDist is no dependency of
the project (docs/learning.md, "StarDist as an external reference"); without it the row is
skipped with one line saying so.

  python experiments/bench_quality.py --dataset consep --data ../shared/data/consep/train \
      --budget-min 20 --stardist-python ../sdenv/bin/python --out q_consep.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_model import machine, write_json  # noqa: E402

DEFAULT_RUNS = {
    "synthetic": ("unet:configs/baseline_unet.py", "tsfd:configs/demo.py"),
    "consep": ("unet:configs/baseline_unet.py:consep", "tsfd:configs/consep.py"),
}


SYNTHETIC_SPLITS = ("fold1", "fold2", "fold3")
STARDIST_SCRIPT = Path(__file__).resolve().with_name("stardist_row.py")
STARDIST_NOTE = ("external reference: StarDist2D, its prob/NMS thresholds optimised on held-back "
                 "source images of the training folder (no separate tuned evaluation); Dice of "
                 "the binary instance maps")


def parse_run(text: str) -> tuple[str, str, list[str]]:
    words = shlex.split(text)
    name, sep, spec = words[0].partition(":")
    if not sep or not spec:
        raise SystemExit(f"--run {text!r}: expected NAME:CONFIG.py[:variant] [--config.k=v ...]")
    return name, spec, words[1:]


def seconds_per_step(cfg, steps: int = 12, workdir: Path | None = None) -> float:
    """Seconds per step of ``cfg`` in the training loop itself, its input pipeline included:
    ``2 * steps`` steps in ``workdir`` (a scratch folder when None; a given one keeps its
    prepared data between probes, its run is removed first), the second ``steps`` timed
    (compile and warm-up excluded). The compiled step timed alone on one synthetic batch left the
    input pipeline out: on CoNSeP the steps then took mostly 6-10 % longer in training than
    probed, both models of a call alike (BENCHMARKS.md)."""
    import copy
    import shutil
    import tempfile

    from tsfd_jax.loop import train_and_evaluate

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
            return seconds_per_step(cfg, steps, Path(tmp))
    probe = copy.deepcopy(cfg)
    probe.total_steps = 2 * steps
    probe.log_every_steps = steps
    probe.eval_every_steps = 0
    probe.checkpoint_every_steps = 2 * steps
    probe.keep_checkpoints = 1
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    (workdir / "metrics.jsonl").unlink(missing_ok=True)
    train_and_evaluate(probe, workdir, overwrite=True, progress=False)
    timed = logged_seconds_per_step(workdir, int(cfg.data.global_batch_size))
    if timed is None:
        raise RuntimeError(f"{workdir}: the probe's training log holds no timed interval")
    return timed


def logged_seconds_per_step(workdir: Path, batch: int) -> float | None:
    """Median seconds per step over the intervals of ``workdir``'s training log, the first
    (which holds the compile) left out; None when there is no later interval."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return None
    rates = [row["train_images_per_s"] for row in map(json.loads, path.read_text().splitlines())
             if "train_images_per_s" in row]
    return batch / float(np.median(rates[1:])) if len(rates) > 1 else None


def interleaved_probes(cfgs: list, rounds: int,
                       workdirs: list[Path] | None = None) -> list[list[float]]:
    """Seconds per step of every config, probed ``rounds`` times, the order reversed every other
    round (A B, B A, ...): a VM's speed drifts between minutes, and each run's budget in steps
    must come from the same minutes as the others'. ``workdirs``: one probe folder per config."""
    probes: list[list[float]] = [[] for _ in cfgs]
    for r in range(max(rounds, 1)):
        order = range(len(cfgs)) if r % 2 == 0 else reversed(range(len(cfgs)))
        for i in order:
            probes[i].append(seconds_per_step(cfgs[i]) if workdirs is None
                             else seconds_per_step(cfgs[i], workdir=workdirs[i]))
    return probes


def set_budget(cfg, budget_s: float, s_step: float) -> int:
    """Set ``cfg``'s step count (and what depends on it) for ``budget_s`` at ``s_step``."""
    steps = max(int(budget_s / s_step), 10)
    cfg.total_steps = steps
    cfg.optim.warmup_steps = min(int(cfg.optim.warmup_steps), steps // 10)
    cfg.log_every_steps = max(steps // 20, 1)
    cfg.eval_every_steps = 0
    cfg.checkpoint_every_steps = steps
    cfg.keep_checkpoints = 1
    return steps


def train_for_budget(cfg, workdir: Path, budget_s: float, s_step: float | None = None) -> dict:
    """Train ``budget_s / s_step`` steps (``s_step`` probed here when not given)."""
    from tsfd_jax.loop import train_and_evaluate

    s_step = seconds_per_step(cfg) if s_step is None else s_step
    steps = set_budget(cfg, budget_s, s_step)
    t0 = time.perf_counter()
    train_and_evaluate(cfg, workdir, overwrite=True, progress=False)
    return {"steps": steps, "s_per_step_probe": s_step, "train_wall_s": time.perf_counter() - t0,
            "images_seen": steps * int(cfg.data.global_batch_size)}


def train_in_turns(cfgs: list, workdirs: list[Path], budget_s: float, s_steps: list[float],
                   turn_s: float) -> list[dict]:
    """Train every run for its budget in turns of about ``turn_s`` seconds each, the order
    reversed every turn (A B, B A, ...): trained one after the other, a run that comes second
    gets the VM's later minutes, which may be faster or slower by 10-20 % (docs/learning.md
    §40); in turns, every run trains in the same stretch of minutes. Each turn ends with a
    checkpoint and the next one resumes it exactly (``train_and_evaluate(stop_at=...)``)."""
    from tsfd_jax.loop import train_and_evaluate

    steps = [set_budget(c, budget_s, s) for c, s in zip(cfgs, s_steps)]
    per_turn = [max(int(turn_s / s), 1) for s in s_steps]
    done, wall = [0] * len(cfgs), [0.0] * len(cfgs)
    turn = 0
    while any(d < n for d, n in zip(done, steps)):
        order = range(len(cfgs)) if turn % 2 == 0 else reversed(range(len(cfgs)))
        for i in order:
            if done[i] >= steps[i]:
                continue
            stop = min(done[i] + per_turn[i], steps[i])
            t0 = time.perf_counter()
            train_and_evaluate(cfgs[i], workdirs[i], overwrite=True, progress=False,
                               stop_at=stop)
            wall[i] += time.perf_counter() - t0
            done[i] = stop
        turn += 1
    return [{"steps": n, "s_per_step_probe": s, "train_wall_s": w, "turns": turn,
             "images_seen": n * int(c.data.global_batch_size)}
            for n, s, w, c in zip(steps, s_steps, wall, cfgs)]


def _probed_and_trained(row: dict) -> str:
    """'probed -> trained' seconds per step, for the table."""
    trained = row.get("s_per_step_trained")
    return f"{row['s_per_step_probe']:.3f}->" + ("-" if trained is None else f"{trained:.3f}")


def scores(eval_dir: Path) -> dict:
    report = json.loads((eval_dir / "report.json").read_text())
    s = report["summary"]
    out = {k: s[k] for k in ("bPQ", "mPQ", "dice", "det_F1") if k in s}
    out["class_PQ"] = report["pq"]["class_PQ"]
    return out


def prepare_synthetic(root: Path, image_size: int, images_per_fold: int, seed: int) -> Path:
    from tsfd_jax.data.synthetic import write_pannuke

    folder = root / f"synthetic-{image_size}px-{images_per_fold}"
    write_pannuke(folder, num_images=images_per_fold, seed=seed, folds=3, image_size=image_size)
    return folder


def hold_out_images(root: Path, data: Path, fraction: float, seed: int,
                    class_names) -> tuple[Path, Path, Path]:
    """Split an image + label folder by source image into a training folder (links) and a test
    folder (links) that neither training nor tuning sees, and prepare the test folder; returns
    (train folder, test folder, prepared test)."""
    from tsfd_jax.data.folders import split_by_group
    from tsfd_jax.data.prepare import prepare

    stems = sorted(p.stem for p in data.iterdir() if p.suffix == ".npz")
    train, test = split_by_group(stems, fraction, seed)
    base = root / f"{data.name}-heldout{fraction:g}-seed{seed}"
    for name, chosen in (("train", train), ("test", test)):
        folder = base / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in data.iterdir():
            if f.stem in chosen or f.suffix == ".txt":
                link = folder / f.name
                if not link.exists():
                    os.symlink(f.resolve(), link)
    prepared_test = base / "test-prepared"
    prepare("folders", [base / "test"], prepared_test, classes=class_names, progress=False)
    return base / "train", base / "test", prepared_test


def importable(python: str, module: str) -> bool:
    """Whether the interpreter ``python`` can import ``module``."""
    try:
        return subprocess.run([python, "-c", f"import {module}"], capture_output=True,
                              timeout=600).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def score_saved(folder: Path, pred_dir: Path, match_iou: float, radius: float) -> dict:
    """Saved predictions of the images of a labelled ``folder`` (``pred_dir/<stem>_inst.npy`` +
    ``<stem>_class.npy``, as ``evaluate --data`` writes them) scored as ``evaluate --data`` scores
    its own: the report of evaluate_images.summarize."""
    from tsfd_jax.data.folders import FolderDataset
    from tsfd_jax.evaluate_images import score_image, summarize

    dataset = FolderDataset(folder)
    names = tuple(dataset.class_names) if dataset.typed else None
    rows, keys = [], []
    for i in range(len(dataset)):
        ex = dataset.example(i)
        inst = np.load(pred_dir / f"{ex['key']}_inst.npy", allow_pickle=False)
        class_map = np.load(pred_dir / f"{ex['key']}_class.npy", allow_pickle=False)
        classes = np.zeros(int(inst.max(initial=0)), np.int64)  # nucleus k-1: its pixels' label
        classes[inst[inst > 0] - 1] = class_map[inst > 0]
        rows.append(score_image(ex["inst"], ex["cls"] if names else None, inst, classes,
                                len(dataset.class_names), match_iou))
        keys.append(ex["key"])
    return summarize(rows, keys, names, radius, match_iou)


def stardist_python(python: str) -> str:
    """``python`` where it can import stardist, else "" with the one line saying the StarDist
    row is skipped."""
    if importable(python, "stardist"):
        return python
    print(f"StarDist row: skipped (stardist not importable by {python}; pass "
          "--stardist-python)", flush=True)
    return ""


def stardist_row(python: str, train_dir: Path, test_dir: Path, budget_min: float, out: Path,
                 match_iou: float, radius: float, seed: int = 1) -> dict | None:
    """The ``stardist`` row: experiments/stardist_row.py under ``python`` (output in
    ``out/stardist.log``), its predictions scored by ``score_saved``; None (with one line
    printed) where the script fails."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "stardist.log"
    cmd = [python, str(STARDIST_SCRIPT), "--train", str(train_dir), "--test", str(test_dir),
           "--budget-s", str(60.0 * budget_min), "--out", str(out), "--seed", str(seed)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        print(f"StarDist row: failed (exit {rc}; see {log})", flush=True)
        return None
    run = json.loads((out / "stardist.json").read_text())
    report = score_saved(test_dir, Path(run["instances"]), match_iou, radius)
    s = report["summary"]
    return {"run": "stardist", "config": "external: StarDist2D", "overrides": [],
            "dataset": "consep", "budget_min": budget_min, "note": STARDIST_NOTE,
            "steps": run["steps"], "s_per_step": run["s_per_step"],
            "train_wall_s": run["train_wall_s"], "images_seen": run["images_seen"],
            **{k: s[k] for k in ("bPQ", "mPQ", "dice", "det_F1") if k in s},
            "class_PQ": report["pq"]["class_PQ"], "thresholds": run["thresholds"],
            "versions": run["versions"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DEFAULT_RUNS), default="synthetic")
    p.add_argument("--data", default="", help="dataset folder (consep: the tiles folder)")
    p.add_argument("--image-size", type=int, default=0,
                   help="synthetic: patch size of every run (default: each config's own)")
    p.add_argument("--images-per-fold", type=int, default=128, help="synthetic images per fold")
    p.add_argument("--run", action="append", default=[],
                   help="NAME:CONFIG[:variant] [--config.k=v ...] (repeatable; default: the "
                        "reference UNet and the CPU-sized TSFD-Net of the dataset)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="consep: share of source images held out for the test (not tuned on)")
    p.add_argument("--budget-min", type=float, default=4.0, help="training minutes per run")
    p.add_argument("--probe-rounds", type=int, default=2,
                   help="step probes per run before any training, interleaved across the runs "
                        "(the median sets each run's steps)")
    p.add_argument("--turn-min", type=float, default=0.0,
                   help="train the runs in turns of about this many minutes each (the order "
                        "reversed every turn), so that all of them train in the same stretch "
                        "of the machine's minutes; 0: one after the other")
    p.add_argument("--no-tune", action="store_true", help="skip post-processing tuning")
    p.add_argument("--workdir", default="runs/quality", help="folder of the runs")
    p.add_argument("--out", default="", help="JSON file for the results")
    p.add_argument("--stardist-python", default="",
                   help="consep: a Python that can import stardist, for the StarDist row "
                        "(default: this one)")
    args = p.parse_args()

    from tsfd_jax import compilation_cache
    from tsfd_jax.config_files import load_config
    from tsfd_jax.evaluate_run import evaluate_workdir, tune_workdir

    compilation_cache.enable()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    runs = [parse_run(r) for r in (args.run or DEFAULT_RUNS[args.dataset])]
    # Checked first, so that a missing StarDist is said before the runs, not after them.
    sd_python = (stardist_python(args.stardist_python or sys.executable)
                 if args.dataset == "consep" else "")
    rows = []
    header = (f"{'run':<16} {'steps':>6} {'images':>7} {'train s':>8} {'s/step':>13} "
              f"{'bPQ':>6} {'mPQ':>6} {'Dice':>6} {'F1d':>6} {'bPQ tuned':>9} {'mPQ tuned':>9}  "
              f"per-class PQ (tuned)")
    prepared = []
    for name, spec, overrides in runs:
        cfg = load_config(spec, overrides)
        if args.dataset == "synthetic":
            if args.image_size:
                ratio = int(cfg.input.size) / int(cfg.data.image_size)
                cfg.data.image_size = args.image_size
                cfg.input.size = int(round(args.image_size * ratio))
            # PanNuke-size patches where the config says so (the demo's: 256 px, cropped).
            size = args.image_size or int(cfg.data.get("synth_image_size", 0)
                                          or cfg.data.image_size)
            cfg.data.root = str(args.data or prepare_synthetic(
                root, size, args.images_per_fold, int(cfg.seed)))
            # Tuning needs a validation fold that is not the test fold.
            cfg.data.train_split, cfg.data.val_split, cfg.data.test_split = SYNTHETIC_SPLITS
            test_data, test_split = "", ""
        else:
            if not args.data:
                raise SystemExit("--dataset consep needs --data FOLDER")
            train_dir, test_dir, test_data = hold_out_images(
                root, Path(args.data), args.test_fraction, 1, tuple(cfg.data.label_names)[1:])
            cfg.data.root, test_split = str(train_dir), "train"
        prepared.append((name, spec, overrides, cfg, test_data, test_split))
    probes = interleaved_probes([p[3] for p in prepared], args.probe_rounds,
                                [root / f"{args.dataset}-{p[0]}-probe" for p in prepared])
    workdirs = [root / f"{args.dataset}-{p[0]}" for p in prepared]
    s_steps = [float(np.median(probed)) for probed in probes]
    if args.turn_min > 0:
        trained_rows = train_in_turns([p[3] for p in prepared], workdirs,
                                      60.0 * args.budget_min, s_steps, 60.0 * args.turn_min)
    print(header)
    for i, (name, spec, overrides, cfg, test_data, test_split) in enumerate(prepared):
        workdir = workdirs[i]
        trained = (trained_rows[i] if args.turn_min > 0 else
                   train_for_budget(cfg, workdir, 60.0 * args.budget_min, s_steps[i]))
        trained["s_per_step_probes"] = probes[i]
        # What each step took in training: the check that the probes shared the budget fairly.
        trained["s_per_step_trained"] = logged_seconds_per_step(
            workdir, int(cfg.data.global_batch_size))
        test = {"data": str(test_data), "split": test_split}
        untuned = scores(evaluate_workdir(workdir, checkpoint="last", name="untuned",
                                          overwrite=True, tuned=False, **test))
        row = {"run": name, "config": spec, "overrides": overrides, "dataset": args.dataset,
               "budget_min": args.budget_min, **trained, **untuned}
        if not args.no_tune:
            tuned_params = tune_workdir(workdir, checkpoint="last")
            tuned = scores(evaluate_workdir(workdir, checkpoint="last", name="tuned",
                                            overwrite=True, **test))
            row["tuned"] = {**tuned, "postprocess": tuned_params}
        rows.append(row)
        t = row.get("tuned", untuned)
        cls = " ".join("-" if v is None else f"{v:.2f}" for v in t["class_PQ"].values())
        print(f"{name:<16} {row['steps']:>6} {row['images_seen']:>7} {row['train_wall_s']:>8.0f} "
              f"{_probed_and_trained(row):>13} {untuned['bPQ']:>6.3f} {untuned['mPQ']:>6.3f} "
              f"{untuned.get('dice', 0):>6.3f} {untuned['det_F1']:>6.3f} {t['bPQ']:>9.3f} "
              f"{t['mPQ']:>9.3f}  {cls}", flush=True)
        if args.out:
            write_json(args.out, {"machine": machine(), "args": vars(args), "rows": rows})
    if sd_python:
        row = stardist_row(sd_python, train_dir, test_dir, args.budget_min,
                           root / "consep-stardist", float(cfg.eval.match_iou),
                           float(cfg.eval.detection_radius))
        if row is not None:
            rows.append(row)
            cls = " ".join(f"{v:.2f}" for v in row["class_PQ"].values())
            print(f"{'stardist':<16} {row['steps']:>6} {row['images_seen']:>7} "
                  f"{row['train_wall_s']:>8.0f} {'-':>13} {row['bPQ']:>6.3f} {row['mPQ']:>6.3f} "
                  f"{row['dice']:>6.3f} {row['det_F1']:>6.3f} {'-':>9} {'-':>9}  {cls}\n"
                  f"  stardist: {STARDIST_NOTE}", flush=True)
            if args.out:
                write_json(args.out, {"machine": machine(), "args": vars(args), "rows": rows})
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
