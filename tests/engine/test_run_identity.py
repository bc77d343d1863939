"""A training's identity covers the code that computes its result, not only params and data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pipeline
from pipeline.engine import run_identity
from pipeline.tasks.semantic import SemanticTask

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
    code = ("from pipeline import train; from pipeline.tasks import get_task; "
            "print(train.run_name({'train': {'epochs': 2}}, 'md5-of-data', get_task('semantic')))")
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


PLUG_IN = {
    "plug/__init__.py": "",
    "plug/task.py": "from pipeline.tasks.semantic import SemanticTask\nfrom plug import helper\n\n\n"
                    "class Task(SemanticTask):\n    name = 'plug.task:Task'\n",
    "plug/helper.py": "WEIGHT = 1.0\n",
}


def plug_in_run_name(root: Path, task: str) -> str:
    code = ("from pipeline import train; from pipeline.tasks import get_task; "
            f"print(train.run_name({{'train': {{'epochs': 2}}}}, 'md5-of-data', get_task({task!r})))")
    path = os.pathsep.join([str(root), str(PACKAGE.parent)])
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=os.environ | {"PYTHONPATH": path},
                         capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_a_plug_in_tasks_code_is_part_of_the_identity(tmp_path):
    """A task of ``module:Class`` lives outside ``pipeline``: its module and what it imports
    from its own package count as training code too."""
    for name, text in PLUG_IN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = plug_in_run_name(tmp_path, "plug.task:Task")
    assert before != plug_in_run_name(tmp_path, "semantic")
    with open(tmp_path / "plug" / "helper.py", "a") as f:
        f.write("# the plug-in's helper changed\n")
    assert plug_in_run_name(tmp_path, "plug.task:Task") != before
    assert run_identity.task_code_digest(SemanticTask()) == ""       # in the package's digest already
