"""Segmentation tasks (``pipeline.tasks.base.Task``), found by name.

``prepare.task`` names the task: a built-in name (``semantic``, ``instance``, ``panoptic``) or
``module:Class``, a task defined anywhere on the Python path (a plug-in; ``tests/tasks`` holds
one). ``prepare`` records the name in the prepared card, training in the model's meta;
``task_of_data`` and ``task_of_model`` find it there.
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path

from pipeline.config import paths
from pipeline.models.base import UNRECORDED_TASK
from pipeline.tasks.base import Task
from pipeline.tasks.instance import InstanceTask
from pipeline.tasks.panoptic import PanopticTask
from pipeline.tasks.semantic import SemanticTask
from pipeline.utils.io import read_json

BUILTIN: dict[str, type[Task]] = {SemanticTask.name: SemanticTask, InstanceTask.name: InstanceTask,
                                  PanopticTask.name: PanopticTask}


class TaskError(ValueError):
    """A task name that names no task."""


@cache
def get_task(name: str) -> Task:
    """The task ``name`` names: a key of ``BUILTIN`` or ``module:Class``."""
    if name in BUILTIN:
        return BUILTIN[name]()
    spec = name
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task {name!r}: not one of {', '.join(BUILTIN)} nor 'module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TaskError(f"task {name!r}: cannot import {spec} ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"task {name!r}: {spec} is not a pipeline.tasks.base.Task subclass")
    return cls()


def task_of_data(data: Path) -> tuple[str, Task]:
    """The task (its recorded name, the object) the prepared dataset ``data`` was made for."""
    name = read_json(Path(data) / paths.CARD_JSON).get("task", UNRECORDED_TASK)
    return name, get_task(name)


def task_of_model(model) -> Task:
    """The task of a ``SegmentationModel`` (its ``meta.task``)."""
    return get_task(model.meta.task)


def task_of_model_dir(folder: Path) -> Task:
    """The task of the saved model in ``folder`` (``pipeline.artifacts.model_dir``), unloaded."""
    from pipeline.artifacts.model_dir import read_config

    return get_task(read_config(folder)["meta"].get("task", UNRECORDED_TASK))
