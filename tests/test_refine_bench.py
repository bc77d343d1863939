"""``bench/refine_bench.py``: a model evaluated without and with each refinement, in one run."""

import importlib.util
import sys
from pathlib import Path

from bench.results_doc import read_section
from tests.factories import repo_params, tracked_model

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("refine_bench", REPO / "bench" / "refine_bench.py")
bench = sys.modules["refine_bench"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_methods_are_those_the_models_task_takes():
    assert bench.methods_for("semantic", 11) == ("none", "crf")
    assert bench.methods_for("semantic", 2) == ("none", "crf", "grabcut")
    assert bench.methods_for("instance", 2) == ("none", "grabcut")
    assert bench.methods_for("panoptic", 5) == ("none",)


def test_the_bench_scores_each_way_and_writes_its_section(coded, fitted, env, capsys):
    model, cfg = fitted
    tracked_model(env / "model", model, cfg)
    params = repo_params(env / "params.yaml", evaluate={"overlays": {"samples": 0, "worst_per_class": 0}})
    out = env / "results.md"
    rows = bench.main(["--model", str(env / "model"), "--data", str(coded), "--params", str(params),
                       "--name", "coded", "--out", str(out)])
    assert list(rows) == ["none", "crf"] and all(0 <= r["score"] <= 1 and r["ms"] > 0 for r in rows.values())
    assert rows["none"]["images"] == rows["crf"]["images"] > 0
    section = read_section(out, "refine-coded")
    assert "| none | " in section and "| crf | " in section and "1.00 |" in section
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT name=coded split=test none_score=") and "crf_ms=" in last
