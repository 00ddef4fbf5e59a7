"""The sweep runner (experiments/sweep.py) and the paper-table builder (experiments/tables.py).

The runner's planning, naming, skipping, linking of repeated configs and command lines are tested
with a fake executor that writes what a finished run leaves behind; the tables with hand-written
report.json files, against means and sample standard deviations from numpy. One real end-to-end
run (train + evaluate subprocesses on synthetic PanNuke data, then the tables) is marked slow:
compiling even the tiny model's train step takes minutes on a busy 2-core CPU.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from experiments import sweep, tables
from tsfd_jax import paper
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
