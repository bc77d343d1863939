"""What makes one training the same as another, and whether it has finished.

A training's identity is its params, its data version and the code that computes its
result: the source of ``pipeline.train`` and of every project module it imports,
directly or not (found by reading the import statements, so imports inside functions
count too), the code of a plug-in task (``task_code_digest``: a ``module:Class`` task
outside this package, and what it imports from its own package), plus the versions of
the libraries that build and train the network. Equal
identities give equal Ray run names; that is what lets a re-run after a crash resume
from the run's checkpoints. A run whose stage finished is marked complete (``COMPLETE``
in its folder), and a complete run is never resumed: running again trains afresh.

Reading the imports rather than ``dvc.yaml``'s deps keeps the identity right where
there is no ``dvc.yaml`` (tests, notebooks, a stage run by hand), and it cannot drift
from the code; ``tests/test_dvc_deps.py`` checks that ``dvc.yaml`` lists the same
modules, so DVC re-runs the stage exactly when the identity changes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from importlib.metadata import version
from pathlib import Path

from pipeline.artifacts.storage import Location
from pipeline.config import paths

PACKAGE = "pipeline"
ENTRY_MODULE = "pipeline.train"
# Libraries whose version can change the trained weights.
LIBRARIES = ("torch", "segmentation-models-pytorch", "timm", "ray", "numpy")
COMPLETE_FILE = "COMPLETE"


def project_imports(entry: str = ENTRY_MODULE, root: Path | None = None,
                    package: str = PACKAGE) -> list[Path]:
    """Source files of ``entry`` and every ``package`` module it imports transitively,
    sorted. ``root``: the folder that holds ``package`` (default: this ``pipeline``'s)."""
    root = Path(root) if root is not None else paths.PACKAGE_DIR.parent
    seen: dict[str, Path] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(root, name, package)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imported_modules(path, name, package))
    return sorted(seen.values())


def code_digest(entry: str = ENTRY_MODULE, root: Path | None = None, package: str = PACKAGE) -> str:
    """sha256 over the relative path and bytes of every file of ``project_imports``."""
    root = Path(root) if root is not None else paths.PACKAGE_DIR.parent
    digest = hashlib.sha256()
    for path in project_imports(entry, root, package):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def task_code_digest(task) -> str:
    """``code_digest`` of a plug-in task: the module defining its class and every module of
    that module's top-level package it imports; "" for a task of this package (whose code
    ``code_digest`` covers: ``pipeline.train`` imports ``pipeline.tasks``)."""
    module = type(task).__module__
    package = module.partition(".")[0]
    if package == PACKAGE:
        return ""
    file = Path(sys.modules[module].__file__)
    root = file.parents[len(module.split(".")) - (0 if file.name == "__init__.py" else 1)]
    return code_digest(module, root, package)


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in LIBRARIES}


def run_name(sections: dict[str, dict], data_version: str, code: str | None = None,
             task_code: str = "") -> str:
    """``train-<12 hex>`` of params, data version, code digests (``code_digest``,
    ``task_code_digest``) and library versions."""
    identity = {"params": sections, "data": data_version, "code": code or code_digest(),
                "libraries": library_versions()}
    if task_code:
        identity["task_code"] = task_code
    blob = json.dumps(identity, sort_keys=True)
    return "train-" + hashlib.sha1(blob.encode()).hexdigest()[:12]


def is_complete(run_dir: Location) -> bool:
    return run_dir.child(COMPLETE_FILE).is_file()


def mark_complete(run_dir: Location, record: dict) -> None:
    """Written (whole) once the stage has exported and tracked the run's model."""
    run_dir.child(COMPLETE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _module_file(root: Path, name: str, package: str = PACKAGE) -> Path | None:
    if name != package and not name.startswith(package + "."):
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str, package: str = PACKAGE) -> list[str]:
    """Module names of ``package`` that ``path``'s import statements name (``from pipeline
    import x`` gives ``pipeline.x`` too, which ``_module_file`` keeps only where it is a module)."""
    parent = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = parent.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return [n for n in names if n == package or n.startswith(package + ".")]
