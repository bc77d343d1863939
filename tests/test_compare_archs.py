"""``bench/compare_archs.py``: the architecture table (docs/results.md) from ``dvc exp`` runs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.budgeted import current
from pipeline.config.params import ModelParams
from tests.test_dvc_pipeline import dvc, tiny_pipeline_repo

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_archs", REPO / "bench" / "compare_archs.py")
compare = sys.modules["compare_archs"] = importlib.util.module_from_spec(_spec)    # dataclasses need it there
_spec.loader.exec_module(compare)


def test_every_row_is_a_valid_model_section():
    for row in compare.ROWS:
        assert ModelParams.model_validate(row.model()).arch == row.arch
    assert len({row.name for row in compare.ROWS}) == len(compare.ROWS)
    assert {row.arch for row in compare.ROWS} >= {
        "FCN32s", "FCN16s", "FCN8s", "SegNet", "ENet", "FCDenseNet56", "FCDenseNet67", "FCDenseNet103",
        "DeepLabV1", "DeepLabV2", "UNet", "PointRend", "GatedSCNN", "Unet", "FPN", "DeepLabV3Plus", "PSPNet",
        "Linknet"}


def test_the_overrides_replace_a_mapping_the_way_hydra_takes_it():
    row = next(r for r in compare.ROWS if r.name == "seed-unet-transposed-add")
    args = compare.overrides(row, 10, "archs")
    sets = args[1::2]
    assert args[::2] == ["-S"] * len(sets)
    assert "~model.kwargs" in sets and '+model.kwargs={upsampling: "transposed", skip_merge: "add"}' in sets
    jpu = compare.overrides(next(r for r in compare.ROWS if r.name == "deeplabv2-jpu"), 10, "archs")[1::2]
    assert "+model.kwargs={jpu: true}" in jpu
    assert {"model.family=seed", "model.arch=UNet", "model.encoder_name=mobilenet_v2", "train.max_minutes=10",
            "register.model_name=archs", "register.onnx=false"} <= set(sets)
    enet = compare.overrides(next(r for r in compare.ROWS if r.name == "enet"), 1.5, "archs")[1::2]
    assert {"model.encoder_name=null", "model.encoder_weights=null", "model.kwargs={}",
            "train.max_minutes=1.5"} <= set(enet)


def test_measure_counts_parameters_and_flops_of_the_model_as_built():
    enet_row = next(r for r in compare.ROWS if r.name == "enet")
    enet = compare.measure(enet_row, classes=11, repeats=1, warmups=0)
    assert enet["params_m"] == pytest.approx(0.377, abs=0.001)      # the ENet paper's 0.37 M
    # ENet's paper: 3.83 GFLOPs at 512 x 512 (multiply-adds counted once, it seems); at 360 x 480,
    # counted twice, about 2 x 3.83 x 0.66: the right order, not exact (the unpooling is free here).
    assert 2 < enet["gflops"] < 8 and enet["img_s"] > 0


def test_the_table_ranks_by_test_miou_and_marks_what_is_missing():
    rows = {r.name: r for r in compare.ROWS}
    results = [
        {"row": rows["enet"], "miou": 0.41, "boundary_miou": 0.2, "minutes": 10, "epochs": 7,
         "params_m": 0.37, "gflops": 4.4, "img_s": 12.0},
        {"row": rows["seed-unet-bilinear"], "miou": 0.55, "boundary_miou": None, "minutes": 10,
         "trained_minutes": 17.26, "epochs": 1, "params_m": 6.0, "gflops": 9.0, "img_s": 5.0},
    ]
    text = compare.markdown(results)
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert table[0].startswith("| UNet (upsampling bilinear, skip_merge concat) | mobilenet_v2, ImageNet "
                               "| 0.550 | – | 10 | 17.3 | 1 | 6.00 |")     # one epoch longer than the budget
    assert table[1].startswith("| ENet | own, scratch | 0.410 | 0.200 | 10 | – | 7 | 0.37 | 4.4 | 12.00 |")


def test_a_ledger_entry_counts_only_for_the_same_model_and_budget():
    enet = compare.experiment(next(r for r in compare.ROWS if r.name == "enet"))
    entry = {"model": enet.key["model"], "minutes": 10}
    assert current(entry, enet, 10)
    assert not current(entry, enet, 5)                     # another budget: run again
    assert not current({**entry, "model": {**enet.key["model"], "arch": "SegNet"}}, enet, 10)
    assert not current(None, enet, 10)


def test_the_table_is_written_from_the_ledger_alone(tmp_path):
    """A fresh clone has neither the ``dvc exp`` refs nor the MLflow store: the ledger is enough,
    and an entry for a model the row no longer has is left out rather than shown as the row's."""
    rows = {r.name: r for r in compare.ROWS}
    ledger = {
        "enet": {"model": rows["enet"].model(), "minutes": 10, "classes": 11, "miou": 0.41,
                 "boundary_miou": 0.2, "epochs": 7, "trained_minutes": 9.84, "commit": "abc1234"},
        "segnet": {"model": rows["enet"].model(), "minutes": 10, "classes": 11, "miou": 0.9,
                   "boundary_miou": 0.2, "epochs": 7, "commit": "abc1234"},
    }
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results-archs.json").write_text(json.dumps(ledger))
    run = subprocess.run([sys.executable, str(REPO / "bench" / "compare_archs.py"), "--repo", str(tmp_path),
                          "--rows", "segnet", "--table-only"],       # the table has every row recorded
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == "RESULT rows=1 best=enet best_miou=0.4100"
    table = (tmp_path / "docs" / "results.md").read_text()
    assert "| ENet | own, scratch | 0.410 | 0.200 | 10 | 9.8 | 7 | 0.38 |" in table and "| abc1234 |" in table
    assert "SegNet" not in table.split("|---")[1]


@pytest.mark.slow          # a baseline repro and two budgeted experiments on tiny data: about 6 minutes
@pytest.mark.timeout(1800)
def test_the_table_is_written_from_budgeted_experiments_and_rewritten_without_training(tmp_path):
    repo, env = tiny_pipeline_repo(tmp_path, crop=64, register={"onnx": False})
    dvc(repo, "repro", env=env)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, check=True, env=env)

    script = [sys.executable, str(REPO / "bench" / "compare_archs.py"), "--repo", str(repo)]
    run = subprocess.run([*script, "--rows", "enet", "segnet", "--minutes", "0.001"], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("RESULT rows=2 best=")
    table = (repo / "docs" / "results.md").read_text()
    ledger = json.loads((repo / "docs" / "results-archs.json").read_text())
    lines = {name: line for name in ("ENet", "SegNet") for line in table.splitlines()
             if line.startswith(f"| {name} ")}
    assert len(lines) == 2
    for name, line in lines.items():
        cells = [c.strip() for c in line.strip("|").split("|")]
        trained = ledger[name.lower()]["trained_minutes"]
        assert 0 <= float(cells[2]) <= 1 and cells[4] == "0.001"
        assert trained > 0.001          # a budget below one epoch (0.06 s): that epoch trained whole,
        assert cells[5] == f"{trained:.1f}" and cells[6] == "1"       # exactly one, its minutes shown
    names = json.loads(dvc(repo, "exp", "show", "--json", env=env, stdout_only=True))
    assert "cmp-enet" in json.dumps(names)

    assert sorted(ledger) == ["enet", "segnet"] and ledger["enet"]["experiment"] == "cmp-enet"
    assert ledger["enet"]["minutes"] == 0.001 and ledger["enet"]["epochs"] == 1

    (repo / "docs" / "results.md").unlink()
    again = subprocess.run([*script, "--rows", "enet", "segnet", "--table-only"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "training" not in again.stdout          # nothing trained again
    assert _same_scores((repo / "docs" / "results.md").read_text(), table)


def _same_scores(a: str, b: str) -> bool:
    """The same rows and scores (the measured images/s differ from run to run)."""
    def scores(text):
        return [line.split("|")[1:8] for line in text.splitlines()
                if line.startswith(("| ENet ", "| SegNet "))]
    return scores(a) == scores(b)
