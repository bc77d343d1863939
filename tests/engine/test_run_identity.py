"""A training's identity covers the code that computes its result, not only params and data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pipeline
from pipeline.engine import run_identity

PACKAGE = Path(pipeline.__file__).parent


def copy_package(tmp_path: Path) -> Path:
    shutil.copytree(PACKAGE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_train_stage_identity_reads_every_module_the_worker_imports():
    names = {p.relative_to(PACKAGE).as_posix() for p in run_identity.project_imports()}
    # Imported by the worker directly or through other modules, some inside functions.
    assert {"train.py", "engine/worker.py", "engine/loop.py", "losses/terms.py", "models/base.py",
            "config/params.py", "config/paths.py", "utils/io.py", "data/shards.py", "metrics/confusion.py",
            "data/augment.py", "artifacts/tracking.py"} <= names
    assert not {"serve.py", "evaluate.py", "register.py"} & names


def stage_run_name(root: Path) -> str:
    """The Ray run name the train stage gives fixed params and data, computed with the
    package copy in ``root`` (a fresh process, as ``dvc repro`` starts one)."""
    code = "from pipeline import train; print(train.run_name({'train': {'epochs': 2}}, 'md5-of-data'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=os.environ | {"PYTHONPATH": str(root)},
                         capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_run_name_changes_when_a_loss_module_changes(tmp_path):
    root = copy_package(tmp_path)
    before = stage_run_name(root)
    with open(root / "pipeline" / "losses" / "terms.py", "a") as f:
        f.write("# a comment is enough: the bytes changed\n")
    assert stage_run_name(root) != before


def test_code_the_stage_does_not_import_leaves_the_identity_alone(tmp_path):
    root = copy_package(tmp_path)
    before = run_identity.code_digest(root=root)
    with open(root / "pipeline" / "serve.py", "a") as f:
        f.write("# serving code is not training code\n")
    assert run_identity.code_digest(root=root) == before


def test_the_default_identity_is_that_of_the_installed_package():
    assert run_identity.code_digest() == run_identity.code_digest(root=PACKAGE.parent)
    name = run_identity.run_name({"train": {}}, "v1")
    assert name.startswith("train-") and name == run_identity.run_name({"train": {}}, "v1")
    assert name != run_identity.run_name({"train": {}}, "v2")
