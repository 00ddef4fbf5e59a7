"""The sweep runner (experiments/sweep.py), the paper-table builder (experiments/tables.py) and
the StarDist row of experiments/bench_quality.py.

The runner's planning, naming, skipping, linking of repeated configs and command lines are tested
with a fake executor that writes what a finished run leaves behind; the tables with hand-written
report.json files, against means and sample standard deviations from numpy. One real end-to-end
run (train + evaluate subprocesses on synthetic PanNuke data, then the tables) is marked slow:
compiling even the tiny model's train step takes minutes on a busy 2-core CPU. The StarDist row
is tested without StarDist: the scoring of saved predictions against hand-computed and reference
numbers, the rules experiments/stardist_row.py restates from tsfd_jax/data/folders.py, its
conversion of StarDist's output, and the skip line. The pooling of experiments/bn_reestimate.py
is tested on a toy model against numpy's statistics of all batches together.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import bench_quality, stardist_row, sweep, tables
from tests.pannuke_reference import ref_pannuke_pq
from tests.test_instance_metrics import ref_dice
from tsfd_jax import paper
from tsfd_jax.data.folders import instances_and_classes, split_by_group
from tsfd_jax.data.pannuke import to_pannuke_masks
from tsfd_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = str(ROOT / "configs" / "ablation_blocks.py")
INPUTS = str(ROOT / "configs" / "ablation_inputs.py")


class FakeExecutor:
    """Records commands; 'train' writes config.json, 'evaluate' writes eval/<name>/report.json
    (with an mPQ from ``scores``), as a finished run leaves them. ``fail`` names workdirs whose
    training exits 1."""

    def __init__(self, scores=None, fail=()):
        self.calls: list[list[str]] = []
        self.scores = scores or {}
        self.fail = set(fail)

    def __call__(self, cmd: list[str]) -> int:
        self.calls.append(cmd)
        workdir = Path(cmd[cmd.index("--workdir") + 1])
        if cmd[3] == "train":
            if workdir.name in self.fail:
                return 1
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text("{}")
            return 0
        out = workdir / "eval" / cmd[cmd.index("--name") + 1]
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps(report(self.scores.get(workdir.name, 0.5))))
        return 0


def report(mpq: float, bpq: float | None = None, tissues=("Breast", "Colon")) -> dict:
    """A report.json as evaluate_run writes it (the keys the tables read)."""
    bpq = mpq + 0.1 if bpq is None else bpq
    return {
        "summary": {"images": 10, "mPQ": mpq, "bPQ": bpq, "det_F1": mpq + 0.3},
        "pq": {"mPQ": mpq, "bPQ": bpq,
               "class_PQ": {"Neoplastic": mpq + 0.05, "Inflammatory": mpq - 0.05, "Dead": None},
               "tissue_mPQ": {t: mpq + 0.01 * k for k, t in enumerate(tissues)},
               "tissue_bPQ": {t: bpq + 0.01 * k for k, t in enumerate(tissues)}},
        "detection": {"Pd": mpq + 0.3, "Rd": mpq + 0.35, "F1d": mpq + 0.32,
                      "per_class": {"Neoplastic": {"P": mpq, "R": mpq + 0.1, "F1": mpq + 0.05}}},
    }


# ---- sweep: planning -------------------------------------------------------------------------

def test_workdir_names():
    assert sweep.workdir_name("configs/ablation_blocks.py:exp3", 2) == "ablation_blocks-exp3-seed2"
    assert sweep.workdir_name("configs/ablation_blocks.py:exp3,fold2", 0) == (
        "ablation_blocks-exp3+fold2-seed0")
    assert sweep.workdir_name("configs/default.py", 1) == "default-seed1"
    assert sweep.workdir_name("x/tiny.py:a", 0, [("optim.lr", "0.1")]) == "tiny-a+optim.lr=0.1-seed0"
    for name in ("ablation_blocks-exp3+fold2-seed0", "default-seed1"):
        stem, variant, seed, extra = tables.parse_run_name(name)
        assert sweep.workdir_name(f"configs/{stem}.py" + (f":{variant}" if variant else ""),
                                  seed) == name and not extra
    assert tables.parse_run_name("tiny-a+optim.lr=0.1-seed0") == ("tiny", "a", 0, True)
    assert tables.parse_run_name("prepared") is None


def test_plan_is_seed_major_links_repeated_configs_and_passes_overrides(tmp_path):
    items = [{"config": f"{BLOCKS}:exp1"}, {"config": f"{BLOCKS}:exp3"},
             {"config": f"{INPUTS}:rgb_her"}, {"config": f"{BLOCKS}:exp1"}]
    runs = sweep.plan(items, [0, 1], tmp_path, [("data.root", "/data/pannuke")])
    names = [r.workdir.name for r in runs]
    assert names == ["ablation_blocks-exp1-seed0", "ablation_blocks-exp3-seed0",
                     "ablation_inputs-rgb_her-seed0", "ablation_blocks-exp1-seed1",
                     "ablation_blocks-exp3-seed1", "ablation_inputs-rgb_her-seed1"]
    # rgb_her is the paper model, exactly as exp3 of the same seed; nothing else repeats.
    alias = {r.workdir.name: r.alias_of for r in runs}
    assert alias["ablation_inputs-rgb_her-seed0"] == tmp_path / "ablation_blocks-exp3-seed0"
    assert alias["ablation_inputs-rgb_her-seed1"] == tmp_path / "ablation_blocks-exp3-seed1"
    assert sum(a is not None for a in alias.values()) == 2
    train, evaluate = sweep.commands(runs[3], "test", python="python")
    assert train[:4] == ["python", "-m", "tsfd_jax", "train"]
    assert train[train.index("--config") + 1] == f"{BLOCKS}:exp1"
    assert "--config.seed=1" in train and "--config.data.root=/data/pannuke" in train
    assert evaluate == ["python", "-m", "tsfd_jax", "evaluate", "--workdir",
                        str(tmp_path / "ablation_blocks-exp1-seed1"), "--name", "test"]


def test_plan_checks_every_config_first(tmp_path):
    with pytest.raises(UserError, match="unknown variant"):
        sweep.plan([{"config": f"{BLOCKS}:exp1"}, {"config": f"{BLOCKS}:exp9"}], [0], tmp_path)
    with pytest.raises(UserError, match="no field"):
        sweep.plan([{"config": f"{BLOCKS}:exp1"}], [0], tmp_path, [("model.nope", "1")])


def test_sweep_files_named_sweeps_and_extra_fields(tmp_path, monkeypatch):
    f = tmp_path / "my_sweeps.py"
    f.write_text(
        "def sweep():\n"
        f"    yield {{'config': {BLOCKS + ':exp2'!r}}}\n"
        "def sweep_lr():\n"
        "    for lr in (0.1, 0.01):\n"
        f"        yield {{'config': {BLOCKS + ':exp2'!r}, 'optim.lr': lr, 'seed': 7}}\n")
    assert [i["config"] for i in sweep.load_sweep(str(f))] == [f"{BLOCKS}:exp2"]
    runs = sweep.plan(sweep.load_sweep(f"{f}:lr"), [0, 1, 2], tmp_path / "runs")
    assert [r.workdir.name for r in runs] == ["ablation_blocks-exp2+optim.lr=0.1-seed7",
                                              "ablation_blocks-exp2+optim.lr=0.01-seed7"]
    assert runs[0].overrides == [("optim.lr", "0.1")] and runs[0].seed == 7
    with pytest.raises(UserError, match="defines no"):
        sweep.load_sweep(f"{f}:nope")
    # The project's sweeps name their configs from the project root, found from anywhere.
    monkeypatch.chdir(tmp_path)
    items = sweep.load_sweep(BLOCKS)
    assert [i["config"] for i in items] == [f"{BLOCKS}:exp{k}" for k in range(1, 7)]


# ---- sweep: execution ------------------------------------------------------------------------

def test_execute_skips_finished_runs_links_repeats_and_survives_a_failure(tmp_path):
    items = [{"config": f"{BLOCKS}:exp1"}, {"config": f"{BLOCKS}:exp3"},
             {"config": f"{INPUTS}:rgb_her"}, {"config": f"{BLOCKS}:exp5"}]
    runs = sweep.plan(items, [0], tmp_path)
    fake = FakeExecutor(fail={"ablation_blocks-exp5-seed0"})
    status = sweep.execute(runs, fake, log=lambda _: None)
    assert status == {"ablation_blocks-exp1-seed0": "done", "ablation_blocks-exp3-seed0": "done",
                      "ablation_inputs-rgb_her-seed0": "linked",
                      "ablation_blocks-exp5-seed0": "failed (train exit 1)"}
    # train + evaluate for the two good runs, train only for the failed one.
    assert [c[3] for c in fake.calls] == ["train", "evaluate", "train", "evaluate", "train"]
    link = tmp_path / "ablation_inputs-rgb_her-seed0"
    assert link.is_symlink() and os.readlink(link) == "ablation_blocks-exp3-seed0"
    assert sweep.is_finished(link)

    again = FakeExecutor()
    status = sweep.execute(sweep.plan(items, [0], tmp_path), again, log=lambda _: None)
    assert [c[3] for c in again.calls] == ["train", "evaluate"]  # only the failed run
    assert status["ablation_blocks-exp1-seed0"] == "skipped"
    assert status["ablation_inputs-rgb_her-seed0"] == "linked"


def test_stop_on_error(tmp_path):
    runs = sweep.plan([{"config": f"{BLOCKS}:exp1"}, {"config": f"{BLOCKS}:exp2"}], [0], tmp_path)
    fake = FakeExecutor(fail={"ablation_blocks-exp1-seed0"})
    status = sweep.execute(runs, fake, stop_on_error=True, log=lambda _: None)
    assert list(status) == ["ablation_blocks-exp1-seed0"] and len(fake.calls) == 1


def test_a_real_folder_in_place_of_a_link_is_run_like_any_other(tmp_path):
    (tmp_path / "ablation_inputs-rgb_her-seed0").mkdir()
    runs = sweep.plan([{"config": f"{BLOCKS}:exp3"}, {"config": f"{INPUTS}:rgb_her"}], [0],
                      tmp_path)
    fake = FakeExecutor()
    status = sweep.execute(runs, fake, log=lambda _: None)
    assert status == {"ablation_blocks-exp3-seed0": "done", "ablation_inputs-rgb_her-seed0": "done"}
    assert not (tmp_path / "ablation_inputs-rgb_her-seed0").is_symlink()


def test_main_runs_prints_and_reports(tmp_path, capsys):
    args = ["--config", f"{BLOCKS}:exp1,fold2", "--config", f"{BLOCKS}:exp3", "--config",
            f"{INPUTS}:rgb_her", "--root", str(tmp_path), "--seeds", "0,1",
            "--config.data.root", "/data/pannuke"]
    assert sweep.main(args + ["--print"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6
    assert lines[0].startswith("python -m tsfd_jax train --config")
    assert "ablation_blocks-exp1+fold2-seed0" in lines[0] and " && python -m tsfd_jax evaluate" in lines[0]
    assert "--config.data.root=/data/pannuke" in lines[0] and "--no-progress" in lines[0]
    assert lines[2] == (f"[ -e {tmp_path}/ablation_inputs-rgb_her-seed0 ] || "
                        f"ln -s ablation_blocks-exp3-seed0 {tmp_path}/ablation_inputs-rgb_her-seed0")
    fake = FakeExecutor()
    assert sweep.main(args, executor=fake) == 0
    assert len(fake.calls) == 8
    assert "4 done, 2 linked" in capsys.readouterr().out
    assert sweep.main(args + ["--print"]) == 0
    assert capsys.readouterr().out.count("# finished:") == 4
    assert sweep.main(["--root", str(tmp_path)]) == 2
    assert sweep.main(["--config", f"{BLOCKS}:exp1", "--root", str(tmp_path), "--seeds", "a"]) == 2
    assert "expected integers" in capsys.readouterr().err
    assert sweep.main(["--config", f"{BLOCKS}:exp1", "--root", str(tmp_path)],
                      executor=FakeExecutor(fail={"ablation_blocks-exp1-seed0"})) == 1


# ---- tables ----------------------------------------------------------------------------------

def write_run(root: Path, name: str, rep: dict | None) -> Path:
    d = root / name
    (d / "eval" / "test").mkdir(parents=True)
    if rep is not None:
        (d / "eval" / "test" / "report.json").write_text(json.dumps(rep))
    return d


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r[next(iter(r))]: r for r in rows}


def test_tables_from_reports(tmp_path):
    root = tmp_path / "runs"
    for name, mpq in [("ablation_blocks-exp1-seed0", 0.40), ("ablation_blocks-exp1-seed1", 0.46),
                      ("ablation_blocks-cbb_id+fold2-seed2", 0.43),
                      ("ablation_blocks-exp3-seed0", 0.50), ("default-fold3-seed0", 0.48),
                      ("default-seed4", 0.54), ("ablation_losses-w09-seed0", 0.47),
                      ("ablation_losses-row1+tsfd_split-seed0", 0.30),
                      ("ablation_blocks-exp2+optim.lr=0.1-seed0", 0.10),
                      ("consep-seed0", 0.20)]:
        write_run(root, name, report(mpq))
    write_run(root, "ablation_blocks-exp4-seed0", None)  # unfinished: no report
    (root / "notes").mkdir()
    os.symlink("ablation_blocks-exp3-seed0", root / "ablation_inputs-rgb_her-seed0")

    results = tables.collect(root)
    assert len(results) == 11
    out = tmp_path / "tables"
    built = tables.build_tables(results, "official")
    tables.write_tables(built, results, out, "official")
    assert sorted(p.name for p in out.iterdir()) == [
        "table10.csv", "table4.csv", "table5.csv", "table6.csv", "table7.csv", "table8.csv",
        "table9.csv", "tables.md"]

    t4 = read_csv(out / "table4.csv")
    exp1 = [0.40, 0.46, 0.43]  # seeds and fold rotations pooled; alias cbb_id = exp1
    assert int(t4["exp1"]["runs"]) == 3
    np.testing.assert_allclose(float(t4["exp1"]["mPQ_mean"]), np.mean(exp1), atol=1e-6)
    np.testing.assert_allclose(float(t4["exp1"]["mPQ_std"]), np.std(exp1, ddof=1), atol=1e-6)
    np.testing.assert_allclose(float(t4["exp1"]["bPQ_mean"]), np.mean(exp1) + 0.1, atol=1e-6)
    assert float(t4["exp1"]["paper_mPQ"]) == 0.4721
    assert t4["exp3"]["runs"] == "1" and t4["exp3"]["mPQ_std"] == ""
    assert t4["exp2"]["runs"] == "0" and t4["exp2"]["mPQ_mean"] == ""  # extra-field run left out
    assert t4["exp4"]["runs"] == "0"                                    # unfinished
    t5, t6 = read_csv(out / "table5.csv"), read_csv(out / "table6.csv")
    assert float(t5["rgb_her"]["mPQ_mean"]) == 0.5                      # through the link
    assert float(t6["focal_ftbd_ftcombo_w09"]["mPQ_mean"]) == 0.47
    assert t6["ce_ft_ft"]["runs"] == "0"                                # other split scheme

    # Tables 8-10: the paper model = exp3 (and its link, counted once) + default runs.
    paper_runs = [0.50, 0.48, 0.54]
    t8 = read_csv(out / "table8.csv")
    np.testing.assert_allclose(float(t8["Breast"]["mPQ_mean"]), np.mean(paper_runs), atol=1e-6)
    np.testing.assert_allclose(float(t8["Colon"]["bPQ_mean"]),
                               np.mean(paper_runs) + 0.11, atol=1e-6)
    assert t8["Breast"]["mPQ_n"] == "3" and t8["Kidney"]["mPQ_n"] == "0"
    assert float(t8["Kidney"]["paper_mPQ"]) == paper.TISSUE_MPQ["Kidney"]
    np.testing.assert_allclose(float(t8["all"]["mPQ_std"]), np.std(paper_runs, ddof=1), atol=1e-6)
    t9 = read_csv(out / "table9.csv")
    np.testing.assert_allclose(float(t9["Neoplastic"]["PQ_mean"]), np.mean(paper_runs) + 0.05,
                               atol=1e-6)
    assert t9["Dead"]["PQ_n"] == "0" and float(t9["Dead"]["paper_PQ"]) == 0.2135
    t10 = read_csv(out / "table10.csv")
    np.testing.assert_allclose(float(t10["detection"]["F1_mean"]), np.mean(paper_runs) + 0.32,
                               atol=1e-6)
    assert float(t10["detection"]["paper_P"]) == 0.84
    np.testing.assert_allclose(float(t10["Neoplastic"]["R_mean"]), np.mean(paper_runs) + 0.1,
                               atol=1e-6)
    assert t10["Dead"]["F1_n"] == "0" and float(t10["Dead"]["paper_F1"]) == 0.43

    md = (out / "tables.md").read_text()
    assert "## Table 4: Ablation of the blocks of TSFD-Net" in md
    assert "| exp2 | FDB + ID | 0.49 | - | - | - | 0 |" in md
    assert "| exp1 | CBB + ID | 0.4721 | - | 0.4300 ± 0.0300 | 0.5300 ± 0.0300 | 3 |" in md
    assert "consep-seed0" in md and "ablation_losses-row1+tsfd_split-seed0" in md

    tsfd = {t.number: t for t in tables.build_tables(results, "tsfd")}
    row1 = tsfd[6].csv_rows[0]
    assert row1[0] == "ce_ft_ft" and row1[4] == 0.3 and row1[-1] == 1


def test_tables_command(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "ablation_resolution-res768-seed0", report(0.44))
    assert tables.main(["--root", str(root)]) == 0
    assert "| res768 | 768 x 768 input, batch 9 | 0.4386 | - | 0.4400 |" in capsys.readouterr().out
    assert (root / "tables" / "table7.csv").is_file()
    assert tables.main(["--root", str(tmp_path / "nope")]) == 2


# ---- one real run end to end -----------------------------------------------------------------

# configs/tiny.py's sizes, as overrides of an ablation row (tables know its name).
TINY = {"data.image_size": 32, "input.size": 64, "data.global_batch_size": 4,
        "data.eval_batch_size": 4, "data.num_workers": 0, "model.width_mult": 0.1,
        "model.depth_mult": 0.1, "model.gating_channels": 8, "total_steps": 2,
        "optim.warmup_steps": 1, "log_every_steps": 1, "eval_every_steps": 0,
        "checkpoint_every_steps": 2, "eval_max_images": 8, "data.train_split": "fold1",
        "data.val_split": "fold2", "data.test_split": "fold2", "augment.enabled": False}


@pytest.mark.slow
def test_sweep_and_tables_end_to_end(tmp_path):
    from tsfd_jax.data.synthetic import write_pannuke

    data = tmp_path / "synthetic"
    write_pannuke(data, num_images=8, seed=0, folds=2, image_size=32)
    root = tmp_path / "runs"
    args = ["--config", f"{BLOCKS}:exp1", "--root", str(root), "--seeds", "0", "--no-progress",
            f"--config.data.root={data}", *[f"--config.{k}={v}" for k, v in TINY.items()]]
    assert sweep.main(args) == 0
    rep = json.loads((root / "ablation_blocks-exp1-seed0" / "eval" / "test" / "report.json")
                     .read_text())
    assert rep["summary"]["images"] == 8
    saved = json.loads((root / "ablation_blocks-exp1-seed0" / "config.json").read_text())
    assert saved["seed"] == 0 and saved["model"]["num_bifpn"] == 0
    assert not saved["model"]["tissue_head"] and saved["data"]["root"] == str(data)
    never = FakeExecutor()
    assert sweep.main(args, executor=never) == 0 and never.calls == []  # finished: skipped
    assert tables.main(["--root", str(root)]) == 0
    t4 = read_csv(root / "tables" / "table4.csv")
    assert t4["exp1"]["runs"] == "1"
    mpq = rep["summary"]["mPQ"]
    assert (t4["exp1"]["mPQ_mean"] == "") if mpq is None else (
        abs(float(t4["exp1"]["mPQ_mean"]) - mpq) < 1e-6)


# ---- bench_quality: the StarDist row ---------------------------------------------------------

CONSEP_CLASSES = ("other", "inflammatory", "epithelial", "spindle-shaped")


def boxes(shape, spec) -> tuple[np.ndarray, np.ndarray]:
    """(inst, type) maps of rectangles: spec rows (id, class, y0, y1, x0, x1)."""
    inst, typ = np.zeros(shape, np.int32), np.zeros(shape, np.uint8)
    for k, c, y0, y1, x0, x1 in spec:
        inst[y0:y1, x0:x1], typ[y0:y1, x0:x1] = k, c
    return inst, typ


def test_saved_predictions_are_scored_as_evaluate_data_scores_them(tmp_path):
    truth = {"a": boxes((64, 64), [(1, 1, 5, 15, 5, 15), (2, 2, 20, 32, 20, 30),
                                   (5, 3, 40, 52, 40, 50)]),
             "b": boxes((64, 64), [(1, 4, 5, 17, 5, 15), (2, 2, 25, 35, 8, 18),
                                   (3, 3, 40, 50, 40, 55), (4, 1, 45, 58, 5, 15)])}
    # a: exact, other ids; b: one class wrong, one shifted 2 px (IoU 2/3), one missed, one
    # false positive.
    pred = {"a": boxes((64, 64), [(3, 1, 5, 15, 5, 15), (2, 2, 20, 32, 20, 30),
                                  (1, 3, 40, 52, 40, 50)]),
            "b": boxes((64, 64), [(1, 2, 5, 17, 5, 15), (2, 2, 27, 37, 8, 18),
                                  (3, 1, 45, 58, 5, 15), (4, 3, 2, 8, 50, 60)])}
    folder, saved = tmp_path / "labelled", tmp_path / "instances"
    folder.mkdir()
    saved.mkdir()
    (folder / "classes.txt").write_text("\n".join(CONSEP_CLASSES) + "\n")
    rng = np.random.default_rng(0)
    for key, (inst, typ) in truth.items():
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(folder / f"{key}.png")
        np.savez(folder / f"{key}.npz", inst=inst.astype(np.uint16), type=typ)
        np.save(saved / f"{key}_inst.npy", pred[key][0])
        np.save(saved / f"{key}_class.npy", pred[key][1])

    report = bench_quality.score_saved(folder, saved, match_iou=0.5, radius=12.0)
    s = report["summary"]
    assert s["images"] == 2
    # By hand: b has 3 matches (IoU 1, 2/3, 1), 1 FP, 1 FN: PQ 0.75 * 8/9 = 2/3; a has PQ 1.
    assert abs(s["bPQ"] - (1 + 2 / 3) / 2) < 1e-5
    assert abs(s["det_F1"] - 12 / 14) < 1e-9  # 6 TP, 1 FP, 1 FN (the shifted one 2 px away)
    assert abs(s["dice"] - (1 + 2 * 330 / (500 + 410)) / 2) < 1e-9
    keys = sorted(truth)
    ref = ref_pannuke_pq(np.stack([to_pannuke_masks(*truth[k], 4) for k in keys]),
                         np.stack([to_pannuke_masks(*pred[k], 4) for k in keys]),
                         ["all"] * 2, CONSEP_CLASSES, ("all",))
    assert abs(s["mPQ"] - ref["mPQ"]) < 1e-9 and abs(s["bPQ"] - ref["bPQ"]) < 1e-9
    assert s["mPQ"] < s["bPQ"]  # the wrong class costs the class PQ only
    for name in CONSEP_CLASSES:
        got, want = report["pq"]["class_PQ"][name], ref["class_PQ"][name]
        assert (got is None and np.isnan(want)) or abs(got - want) < 1e-9, name
    assert [r["key"] for r in report["per_image"]] == keys
    assert abs(report["per_image"][1]["dice"] - ref_dice(truth["b"][0], pred["b"][0])) < 1e-9


def test_stardist_row_restates_the_folder_rules(shared_data):
    folder = shared_data / "consep" / "train"
    stems = sorted(p.stem for p in folder.glob("*.npz"))
    for seed in (0, 1, 2):
        for fraction in (0.2, 0.5):
            assert stardist_row.split_sources(stems, fraction, seed) == split_by_group(
                stems, fraction, seed)
    assert stardist_row.read_classes(folder / "classes.txt") == CONSEP_CLASSES
    # ids with gaps, a majority, a tie (-> the smaller label) and an untyped nucleus (dropped)
    inst, typ = boxes((20, 20), [(3, 2, 0, 4, 0, 4), (7, 1, 6, 8, 0, 4), (9, 0, 10, 14, 0, 4)])
    inst[0, 0], typ[0, 0] = 3, 1
    typ[7, :2] = 4
    cases = [(inst, typ)]
    for f in sorted(folder.glob("*.npz"))[:3]:
        with np.load(f) as z:
            cases.append((z["inst"], z["type"]))
    for inst, typ in cases:
        want_inst, want_cls, _ = instances_and_classes(inst, typ, 4)
        got_inst, got_classes = stardist_row.instances_and_classes(inst, typ, 4)
        np.testing.assert_array_equal(got_inst, want_inst)
        np.testing.assert_array_equal(np.concatenate([[0], got_classes])[got_inst], want_cls)
    assert stardist_row.instances_and_classes(*cases[0], 4)[1].tolist() == [2, 1]


def test_stardist_output_becomes_the_saved_maps():
    labels = np.zeros((10, 10), np.int32)
    labels[0:3, 0:3], labels[5:8, 5:8] = 1, 3  # polygon 2 was covered whole by others
    class_prob = np.array([[0.1, 0.2, 0.7, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2],
                           [0.9, 0.02, 0.03, 0.05, 0.0]])  # background first: class 3 wins
    inst, class_map = stardist_row.to_maps(labels, class_prob)
    assert inst.dtype == np.int32 and class_map.dtype == np.uint8
    np.testing.assert_array_equal(inst, np.where(labels == 3, 2, labels))
    np.testing.assert_array_equal(class_map, np.select([labels == 1, labels == 3], [2, 3], 0))
    empty = stardist_row.to_maps(np.zeros((4, 4), np.int32), np.zeros((0, 5)))
    assert not empty[0].any() and not empty[1].any()


def test_without_stardist_the_row_is_skipped_with_one_line(capsys):
    assert bench_quality.importable(sys.executable, "json")
    assert not bench_quality.importable(sys.executable, "no_such_module_for_the_test")
    assert bench_quality.stardist_python("/nonexistent/python") == ""
    assert capsys.readouterr().out == ("StarDist row: skipped (stardist not importable by "
                                       "/nonexistent/python; pass --stardist-python)\n")


def test_target_ceiling_loses_thin_nuclei_only_to_bands_on_every_contour(tmp_path, capsys):
    """A 6-px-wide nucleus and two touching blocks: contours and contact bands recover all
    three nuclei from ideal maps (PQ 1); 6-px bands on every contour leave the thin one no core,
    so it is lost and bPQ falls."""
    from experiments import target_ceiling

    inst = np.zeros((48, 48), np.int32)
    inst[6:40, 4:10] = 1
    inst[8:30, 20:30], inst[8:30, 30:40] = 2, 3
    np.savez(tmp_path / "a.npz", inst=inst, type=(inst > 0).astype(np.int32))
    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "classes.txt").write_text("nucleus\n")
    out = tmp_path / "ceiling.json"
    target_ceiling.main(["--data", str(tmp_path), "--out", str(out), "--min-size", "4",
                         "--setting", "contours:0,0", "--setting", "bands6:2,0",
                         "--setting", "contacts6:0,2"])
    rows = {r["setting"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["contours"]["bPQ"] == pytest.approx(1.0)
    assert rows["contacts6"]["bPQ"] == pytest.approx(1.0)
    assert rows["bands6"]["bPQ"] < 0.9
    assert rows["bands6"]["boundary_share"] > rows["contacts6"]["boundary_share"]
    assert "| contacts6 | 0 | 2 |" in capsys.readouterr().out


def _error_kinds(folder, truth, pred) -> dict:
    """experiments/error_kinds.py's JSON for one image, as an evaluate folder holds it."""
    from experiments import error_kinds

    (folder / "true").mkdir()
    np.save(folder / "masks.npy", pred[None])
    np.save(folder / "true" / "masks.npy", truth[None])
    out = folder / "kinds.json"
    error_kinds.main(["--eval", str(folder), "--out", str(out)])
    return json.loads(out.read_text())


def test_error_kinds_sorts_every_true_nucleus(tmp_path):
    """Five true nuclei, one of each kind: a copy (matched), one with no prediction (missed), two
    touching ones predicted as one (merged), one inside a prediction three times its size (too
    large) and one predicted as two halves (fragmented)."""
    from experiments import error_kinds

    spec = [(1, 1, 2, 10, 2, 10), (2, 1, 2, 10, 20, 28), (3, 2, 20, 28, 2, 10),
            (4, 2, 20, 28, 10, 18), (5, 1, 40, 46, 40, 46), (6, 1, 40, 56, 2, 18)]
    inst, typ = boxes((64, 64), spec)
    truth = to_pannuke_masks(inst, typ, 2)
    pinst, ptyp = boxes((64, 64), [(1, 1, 2, 10, 2, 10), (2, 2, 20, 28, 2, 18),
                                   (3, 1, 36, 50, 36, 50), (4, 1, 40, 56, 2, 10),
                                   (5, 1, 40, 56, 10, 18)])
    pred = to_pannuke_masks(pinst, ptyp, 2)
    kinds = _error_kinds(tmp_path, truth, pred)["kinds"]
    assert {k: kinds["all"][k] for k in error_kinds.KINDS} == {
        "matched": 1, "missed": 1, "merged": 2, "too_large": 1, "fragmented": 1}
    assert kinds["class1"]["merged"] == 2 and kinds["class0"]["missed"] == 1


def test_error_kinds_sorts_every_predicted_nucleus(tmp_path):
    """Per predicted class: a copy of a class-0 nucleus (matched), a copy of a class-1 nucleus
    called class 0 (wrong class), one prediction over two touching class-0 nuclei (merged);
    called class 1: half of a nucleus (unmatched) and a blob on background (spurious)."""
    from experiments import error_kinds

    truth = to_pannuke_masks(*boxes((64, 64), [
        (1, 1, 2, 10, 2, 10), (2, 2, 2, 10, 20, 28), (3, 1, 20, 28, 2, 10),
        (4, 1, 20, 28, 10, 18), (5, 2, 40, 56, 2, 18)]), 2)
    pinst, ptyp = boxes((64, 64), [(1, 1, 2, 10, 2, 10), (2, 1, 2, 10, 20, 28),
                                   (3, 1, 20, 28, 2, 18), (4, 2, 40, 56, 2, 10),
                                   (5, 2, 50, 60, 40, 50)])
    pred = to_pannuke_masks(pinst, ptyp, 2)
    kinds = _error_kinds(tmp_path, truth, pred)["predicted_kinds"]
    counts = {name: {k: kinds[name][k] for k in error_kinds.PREDICTED_KINDS}
              for name in ("class0", "class1")}
    assert counts == {"class0": {"matched": 1, "wrong_class": 1, "merged": 1, "unmatched": 0,
                                 "spurious": 0},
                      "class1": {"matched": 0, "wrong_class": 0, "merged": 0, "unmatched": 1,
                                 "spurious": 1}}
    assert kinds["class0"]["median_area_matched"] == 64 and kinds["all"]["predicted"] == 5


def test_step_probes_interleave_the_runs_in_alternating_order(monkeypatch):
    calls = []

    def fake_probe(cfg):
        calls.append(cfg)
        return float(len(calls))

    monkeypatch.setattr(bench_quality, "seconds_per_step", fake_probe)
    probes = bench_quality.interleaved_probes(["a", "b"], rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert probes == [[1.0, 4.0, 5.0], [2.0, 3.0, 6.0]]


def test_logged_seconds_per_step_leaves_out_the_interval_that_compiled(tmp_path):
    """Seconds per step from a training log: the median of the intervals' rates after the
    first (which holds the compile), validation rows ignored; None without a later interval."""
    rows = [{"step": 10, "train_images_per_s": 2.0},
            {"step": 20, "train_loss": 1.0, "train_images_per_s": 16.0},
            {"step": 20, "bPQ": 0.3},
            {"step": 30, "train_images_per_s": 20.0},
            {"step": 40, "train_images_per_s": 12.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench_quality.logged_seconds_per_step(tmp_path, 8) == pytest.approx(8 / 16.0)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert bench_quality.logged_seconds_per_step(tmp_path, 8) is None
    assert bench_quality.logged_seconds_per_step(tmp_path / "none", 8) is None


def test_step_probe_times_the_training_loop_and_starts_afresh_each_time(tmp_path):
    """The probe trains 2 x steps in its folder and times the second half from the loop's log;
    a second probe in the same folder removes the first one's run (not its prepared data), so
    its log holds its own two intervals only."""
    from configs import tiny
    from tsfd_jax.data.synthetic import write_pannuke

    write_pannuke(tmp_path / "synthetic", num_images=8, seed=0, folds=3, image_size=32)
    cfg = tiny.get_config()
    cfg.data.root = str(tmp_path / "synthetic")
    cfg.model.arch, cfg.model.unet_features = "unet", (4, 8)
    cfg.input.size = 32
    folder = tmp_path / "probe"
    for _ in range(2):
        s = bench_quality.seconds_per_step(cfg, steps=2, workdir=folder)
        assert 0 < s < 60
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert s == pytest.approx(cfg.data.global_batch_size / rows[1]["train_images_per_s"])
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["4"]
    assert cfg.total_steps != 4  # the probe changed a copy


def test_runs_trained_in_turns_reach_their_budgets_in_alternating_order(tmp_path, monkeypatch):
    """Each run gets budget / its seconds per step in all, in turns of turn / seconds per step,
    the order reversed every turn; every turn resumes the run where the last one stopped."""
    import copy

    from configs import tiny
    from tsfd_jax import loop
    from tsfd_jax.data.synthetic import write_pannuke

    write_pannuke(tmp_path / "synthetic", num_images=8, seed=0, folds=3, image_size=32)
    cfg = tiny.get_config()
    cfg.data.root = str(tmp_path / "synthetic")
    cfg.model.arch, cfg.model.unet_features = "unet", (4, 8)
    cfg.input.size = 32
    other = copy.deepcopy(cfg)
    other.seed = 1
    calls = []
    train = loop.train_and_evaluate

    def recorded(c, workdir, **kw):
        calls.append((workdir.name, kw["stop_at"]))
        return train(c, workdir, **kw)

    monkeypatch.setattr(loop, "train_and_evaluate", recorded)
    # 1.0 s budget: 10 steps at 0.1 s, 20 at 0.05 s; a 0.45-s turn: 4 and 9 steps.
    rows = bench_quality.train_in_turns([cfg, other], [tmp_path / "a", tmp_path / "b"], 1.0,
                                        [0.1, 0.05], 0.45)
    assert calls == [("a", 4), ("b", 9), ("b", 18), ("a", 8), ("a", 10), ("b", 20)]
    assert [r["steps"] for r in rows] == [10, 20] and rows[0]["turns"] == 3
    for name, steps in (("a", 10), ("b", 20)):
        logged = [json.loads(line)["step"]
                  for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert logged[-1] == steps and logged == sorted(set(logged)), logged


def test_bn_reestimate_pools_population_statistics_over_batches():
    """A BatchNorm on the raw inputs, measured over three batches whose means differ, holds
    the mean and (biased) variance of all their samples together (numpy, float64), not the
    mean of the per-batch variances; a nested BatchNorm further in gets its statistics too."""
    import flax.linen as nn
    import jax

    from experiments.bn_reestimate import population_statistics

    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.BatchNorm(use_running_average=not train, momentum=0.0)(nn.Dense(3)(x))

    class Toy(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.0, name="first")(x)
            return Inner(name="inner")(x, train)

    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, scale, (16, 4)).astype(np.float32)
               for loc, scale in ((0.0, 1.0), (3.0, 0.5), (-2.0, 2.0))]
    model = Toy()
    variables = model.init(jax.random.key(0), batches[0], train=False)

    def batch_statistics(x):
        _, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return new["batch_stats"]

    stats = population_statistics(batch_statistics, iter(batches))
    pooled = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(stats["first"]["mean"], pooled.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["first"]["var"], pooled.var(0), rtol=1e-5)
    mean_of_vars = np.mean([b.astype(np.float64).var(0) for b in batches], 0)
    assert np.all(np.abs(stats["first"]["var"] - mean_of_vars) > 0.5)
    assert set(stats) == {"first", "inner"}
    (layer,) = stats["inner"].values()
    assert layer["mean"].shape == layer["var"].shape == (3,)
    with pytest.raises(ValueError, match="no batches"):
        population_statistics(batch_statistics, iter([]))


# ---- bench_train -----------------------------------------------------------------------------

def test_bench_train_applies_config_overrides_to_every_config_row():
    from experiments import bench_train
    from tsfd_jax.config_files import load_config

    args = bench_train.parse_args(["--no-tiny", "--config", "configs/demo.py", "--config",
                                   "configs/consep.py", "--config.model.num_bifpn=2",
                                   "--config.model.backbone", "b4", "--compare"])
    assert args.config == ["configs/demo.py", "configs/consep.py"] and args.compare
    assert args.overrides == [("model.num_bifpn", "2"), ("model.backbone", "b4")]
    for spec in args.config:
        cfg = load_config(spec, args.overrides)
        assert (cfg.model.num_bifpn, cfg.model.backbone) == (2, "b4")
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--no-tiny", "stray"])
