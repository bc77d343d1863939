"""dvc.yaml lists, for each stage, exactly the project modules its command runs.

A module missing from a stage's ``deps`` means an edit to it leaves the stage's outputs
silently stale (``dvc repro`` skips the stage); one listed but never imported re-runs the
stage for nothing. The imports are read statically from the source (``ast``), including
the ones inside functions (lazy imports of tracking, the Ray worker's modules...), and
followed transitively from the module that the stage's ``cmd`` runs.
"""

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"
CMD_MODULE = re.compile(r"python -m (pipeline(?:\.\w+)+)")


def module_path(module: str) -> Path | None:
    """The source file of a project module, or None for a name that is not one."""
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(module: str) -> set[str]:
    """Project modules that ``module``'s source imports anywhere (top level or in a function)."""
    found = set()
    path = module_path(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pipeline import tracking` names a module; `from pipeline.io import read_json` a symbol.
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE and module_path(name) is not None:
                found.add(name)
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(direct_imports(current) - seen)
    return seen


def inert(path: Path) -> bool:
    """A package ``__init__`` of a docstring and constants (``__version__``) changes no result."""
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr | ast.Assign) and isinstance(node.value, ast.Constant)
        for node in ast.parse(path.read_text()).body
    )


def relevant_files(modules: set[str]) -> set[str]:
    """Repo-relative source files of the modules, less the inert package files."""
    return {module_path(m).relative_to(REPO).as_posix() for m in modules if not inert(module_path(m))}


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = CMD_MODULE.search(" ".join(stage["cmd"].split()))
    assert match, f"cmd {stage['cmd']!r} does not run a `python -m pipeline.<stage>` module"
    return match.group(1)


def test_closure_follows_lazy_and_from_imports():
    # train imports its worker at the top and MLflow tracking inside a function.
    modules = closure("pipeline.train")
    assert {"pipeline.train_worker", "pipeline.engine", "pipeline.tracking", "pipeline.losses"} <= modules
    assert "pipeline.serve" not in modules


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_exactly_the_modules_it_runs(name):
    stage = STAGES[name]
    imported = relevant_files(closure(stage_module(stage)))
    listed = {dep for dep in stage.get("deps", []) if dep.endswith(".py")}
    missing, unused = sorted(imported - listed), sorted(listed - imported)
    assert not missing and not unused, (
        f"dvc.yaml stage {name!r}: add to deps {missing} (imported by {stage_module(stage)}, so an edit "
        f"to them must re-run the stage); remove {unused} (not imported)"
    )
