"""dvc.yaml lists, for each stage, exactly the project modules its command runs.

A module missing from a stage's ``deps`` means an edit to it leaves the stage's outputs
silently stale (``dvc repro`` skips the stage); one listed but never imported re-runs the
stage for nothing. The imports are read statically from the source, including the ones
inside functions (lazy imports of tracking, the Ray worker's modules...), and followed
transitively from the module that the stage's ``cmd`` runs: the same walk
(``pipeline.engine.run_identity.project_imports``) that gives a training its identity.
"""

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.engine.run_identity import project_imports

REPO = Path(__file__).resolve().parents[1]
CMD_MODULE = re.compile(r"python -m (pipeline(?:\.\w+)+)")


def inert(path: Path) -> bool:
    """A package ``__init__`` of a docstring and constants (``__version__``) changes no result."""
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr | ast.Assign) and isinstance(node.value, ast.Constant)
        for node in ast.parse(path.read_text()).body
    )


def imported_files(module: str) -> set[str]:
    """Repo-relative sources of ``module`` and the project modules it imports, less inert ones."""
    return {p.relative_to(REPO).as_posix() for p in project_imports(module, REPO) if not inert(p)}


def listed_files(deps: list[str]) -> set[str]:
    """The project sources that ``deps`` name: a ``.py`` file, or every module (less inert
    ones) of a listed ``pipeline`` sub-package; data folders are not sources."""
    files = set()
    for dep in deps:
        if dep.endswith(".py"):
            files.add(dep)
        elif dep.startswith("pipeline/") and (REPO / dep).is_dir():
            files |= {p.relative_to(REPO).as_posix() for p in (REPO / dep).rglob("*.py") if not inert(p)}
    return files


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = CMD_MODULE.search(" ".join(stage["cmd"].split()))
    assert match, f"cmd {stage['cmd']!r} does not run a `python -m pipeline.<stage>` module"
    return match.group(1)


def test_the_imports_of_a_stage_are_followed_through_functions_and_from_imports():
    # train imports its worker at the top and MLflow tracking inside a function.
    files = imported_files("pipeline.train")
    assert {"pipeline/engine/worker.py", "pipeline/engine/loop.py", "pipeline/artifacts/tracking.py"} <= files
    assert "pipeline/serve.py" not in files and "pipeline/__init__.py" not in files


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_exactly_the_modules_it_runs(name):
    stage = STAGES[name]
    imported = imported_files(stage_module(stage))
    listed = listed_files(stage.get("deps", []))
    missing, unused = sorted(imported - listed), sorted(listed - imported)
    assert not missing and not unused, (
        f"dvc.yaml stage {name!r}: add to deps {missing} (imported by {stage_module(stage)}, so an edit "
        f"to them must re-run the stage); remove {unused} (not imported; a sub-package is listed whole "
        f"only when the stage imports all of its modules)"
    )


def test_a_listed_sub_package_stands_for_all_of_its_modules():
    assert {"pipeline/engine/loop.py", "pipeline/engine/worker.py"} <= listed_files(["pipeline/engine"])
    assert "pipeline/engine/__init__.py" not in listed_files(["pipeline/engine"])  # inert
    assert listed_files(["data/prepared", "pipeline/train.py"]) == {"pipeline/train.py"}
