"""``bench/compare_losses.py``: the loss table (docs/results.md) from budgeted ``dvc exp`` runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import compare_losses as compare
from pipeline.config.params import LossParams, load_params
from pipeline.losses.terms import build_loss
from pipeline.tasks.instance import INSTANCE_LOSS_TERMS, check_terms
from tests.test_dvc_pipeline import dvc, tiny_pipeline_repo

REPO = Path(__file__).resolve().parents[1]


def test_every_semantic_row_builds_its_loss_and_the_recipe_row_is_the_recipe():
    recipe = load_params(LossParams, REPO / "params.yaml")
    rows = compare.ROWS["semantic"]
    assert rows[0].name == "recipe" and rows[0].terms == recipe.terms
    for row in rows:
        loss = build_loss(recipe.model_copy(update={"terms": row.terms}), 11, 11, [1.0] * 11)
        assert set(loss.terms) == set(row.terms)
    named = {term for row in rows for term in row.terms}
    assert {"distance_ce", "sensitivity_specificity", "hausdorff", "surface"} <= named


def test_every_instance_row_is_taken_by_the_instance_task():
    recipe = yaml.safe_load((REPO / "recipes" / "dsb2018.yaml").read_text())["loss"]["terms"]
    rows = compare.ROWS["instance"]
    assert rows[0].terms == recipe
    for row in rows:
        check_terms(row.terms, INSTANCE_LOSS_TERMS, "instance", "Mask R-CNN")
    assert any("iou_balanced_classifier" in row.terms for row in rows)


def _ledger(**rows):
    return {name: {"loss.terms": terms, "minutes": 10, "epochs": 5, "commit": "abc1234", "scores": scores}
            for name, (terms, scores) in rows.items()}


def test_the_table_puts_the_recipe_first_and_shows_each_change_against_it():
    semantic = {row.name: row for row in compare.ROWS["semantic"]}
    surface = {"miou": 0.52, "boundary_miou": 0.4, "mean_hd95": 30.5}
    ledger = _ledger(surface=(semantic["surface"].terms, surface),
                     recipe=(semantic["recipe"].terms, {"miou": 0.5, "boundary_miou": 0.38}),
                     hausdorff=({"dice": 1.0}, {"miou": 0.9}))          # other terms than the row's: left out
    table = [line for line in compare.markdown("camvid", "semantic", ledger).splitlines()
             if line.startswith("| ") and "---" not in line]
    assert table[1] == ("| recipe | 0.5 weighted_ce + 0.5 dice | the default recipe | 0.500 | 0.380 | – | – "
                        "| – | 10 | 5 | abc1234 |")
    assert table[2].startswith("| surface | 0.5 weighted_ce + 0.5 dice + 0.05 surface | ")
    assert "| 0.520 | 0.400 | 30.5 | – | +0.020 | 10 | 5 |" in table[2]
    assert len(table) == 3


def test_a_recipe_of_another_task_is_refused_naming_the_file(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"task": "panoptic"}}))
    with pytest.raises(SystemExit, match=r"params.yaml: prepare.task is 'panoptic'; the loss comparison has "
                                         r"rows for semantic, instance"):
        compare.recipe_task(tmp_path)


def test_the_table_is_written_from_the_ledger_alone(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"task": "instance"}}))
    instance = {row.name: row for row in compare.ROWS["instance"]}
    ledger = _ledger(recipe=(instance["recipe"].terms, {"mask_ap": 0.30, "mask_ap50": 0.6, "box_ap": 0.3}),
                     iou_balanced=(instance["iou_balanced"].terms, {"mask_ap": 0.31, "mask_ap50": 0.61}))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results-losses-nuclei.json").write_text(json.dumps(ledger))
    run = subprocess.run([sys.executable, str(REPO / "bench" / "compare_losses.py"), "--repo", str(tmp_path),
                          "--name", "nuclei", "--table-only"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == (
        "RESULT name=nuclei rows=2 recipe=0.3000 best=iou_balanced best_score=0.3100")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "<!-- section: losses-nuclei -->" in text and "| test mask AP | mask AP50 | box AP |" in text
    assert "| 0.310 | 0.610 | – | +0.010 | 10 | 5 | abc1234 |" in text


@pytest.mark.slow          # a baseline repro and two budgeted experiments on tiny data: about 6 minutes
@pytest.mark.timeout(1800)
def test_two_losses_are_trained_on_one_budget_and_tabled(tmp_path):
    repo, env = tiny_pipeline_repo(tmp_path, crop=64, register={"onnx": False},
                                   loss={"terms": {"weighted_ce": 0.5, "dice": 0.5}})
    dvc(repo, "repro", env=env)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, check=True, env=env)

    run = subprocess.run([sys.executable, str(REPO / "bench" / "compare_losses.py"), "--repo", str(repo),
                          "--name", "tiny", "--rows", "recipe", "hausdorff", "--minutes", "0.001"],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("RESULT name=tiny rows=2 recipe=")
    ledger = json.loads((repo / "docs" / "results-losses-tiny.json").read_text())
    assert sorted(ledger) == ["hausdorff", "recipe"]
    assert ledger["hausdorff"]["loss.terms"] == {"weighted_ce": 0.5, "dice": 0.5, "hausdorff": 0.002}
    assert ledger["hausdorff"]["experiment"] == "loss-tiny-hausdorff" and ledger["hausdorff"]["epochs"] == 1
    for entry in ledger.values():
        assert 0 <= entry["scores"]["miou"] <= 1 and entry["scores"]["miou"] == entry["miou"]
        # The surface distances are in the evaluation report, not in the DVC metrics' headline.
        assert entry["scores"]["mean_hd95"] >= 0 and entry["scores"]["mean_asd"] >= 0
    # The experiment really trained with the row's terms.
    shown = json.dumps(json.loads(dvc(repo, "exp", "show", "--json", env=env, stdout_only=True)))
    assert "loss-tiny-hausdorff" in shown and '"hausdorff": 0.002' in shown
    table = (repo / "docs" / "results.md").read_text()
    assert "| recipe | 0.5 weighted_ce + 0.5 dice |" in table and "| hausdorff |" in table
    recipe_row = next(line for line in table.splitlines() if line.startswith("| recipe |"))
    assert f"| {ledger['recipe']['scores']['mean_hd95']:.1f} |" in recipe_row


def test_a_ledger_of_another_recipe_is_tabled_with_its_task(tmp_path):
    """The nuclei rows run in a clone whose params.yaml is the instance recipe; the table is
    written in the repository (a semantic recipe) from the ledger with ``--task``."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"task": "semantic"}}))
    instance = {row.name: row for row in compare.ROWS["instance"]}
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results-losses-nuclei.json").write_text(json.dumps(
        _ledger(recipe=(instance["recipe"].terms, {"mask_ap": 0.2}))))
    script = [sys.executable, str(REPO / "bench" / "compare_losses.py"), "--repo", str(tmp_path),
              "--name", "nuclei"]
    run = subprocess.run([*script, "--task", "instance", "--table-only"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| test mask AP |" in (tmp_path / "docs" / "results.md").read_text()
    refused = subprocess.run([*script, "--task", "instance"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "the recipe's task is semantic" in refused.stderr
