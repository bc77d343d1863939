"""MLflow plumbing: the tracking store, one run per training, per-epoch metrics, the model.

The default store is embedded: a sqlite file (``mlflow.db``) and an artifact folder
(``mlruns/``) at the repository root (``$DVC_ROOT`` under DVC, so that experiments run in
a temporary copy still share it), both git-ignored. ``MLFLOW_TRACKING_URI`` points
it at a server instead (needed when training workers run on other machines);
``MLFLOW_EXPERIMENT_NAME`` picks the experiment.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.config import paths  # noqa: E402

DEFAULT_EXPERIMENT = "segmentation"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded sqlite store at the repository root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{(paths.repo_root() / paths.MLFLOW_DB).resolve()}"


def experiment_id(client: MlflowClient, name: str | None = None) -> str:
    """The experiment's id, creating it (artifacts in ``mlruns/`` for the embedded store)."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (paths.repo_root() / paths.MLFLOW_ARTIFACTS).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def log_params(client: MlflowClient, run_id: str, sections: dict[str, dict[str, Any]]) -> None:
    """Flattened ``section.key`` params; values already logged (a resumed run) are kept."""
    logged = client.get_run(run_id).data.params
    for section, values in sections.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in logged:
                client.log_param(run_id, name, str(value)[:6000])


def log_epoch(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
    client.log_batch(run_id, metrics=batch)


def git_commit() -> str:
    """The commit of the working tree, with ``-dirty`` when it has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
