"""What the dashboard shows, read from MLflow and the evaluate stage's outputs (plain functions).

Nothing here computes a metric: the pipeline computed them; this module finds and reads
them. Where things are:

- the MLflow store: ``$MLFLOW_TRACKING_URI``, else the repository's embedded store
  (``pipeline.tracking.tracking_uri``); the registered model is ``register.model_name``;
- an evaluated run's results: its MLflow artifacts ``evaluation/evaluate.json`` (scores),
  ``evaluation/overlays/`` (index.json, confusion.json, pictures); for the run the
  workspace's evaluate stage scored, the same files are read from ``evaluation/`` and
  ``metrics/evaluate.json`` without a download;
- the dataset card: ``data/prepared/card.json``;
- the model server: ``$SEG_SERVE_URL`` (default http://127.0.0.1:8000);
- the MLflow UI for links: ``$MLFLOW_UI_URL`` (default http://127.0.0.1:5000).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import paths, tracking
from pipeline.io import read_json
from pipeline.params import RegisterParams, load_params

ENV_SERVE_URL = "SEG_SERVE_URL"
ENV_MLFLOW_UI = "MLFLOW_UI_URL"
EVAL_ARTIFACT = "evaluation/evaluate.json"
OVERLAYS_ARTIFACT = "evaluation/overlays"
CURVES = ("val_miou", "train_loss", "val_loss", "lr")


@dataclass(frozen=True)
class Sources:
    root: Path
    tracking_uri: str
    model_name: str
    serve_url: str
    mlflow_ui: str

    @classmethod
    def from_env(cls) -> Sources:
        root = paths.repo_root().resolve()
        params = root / paths.PARAMS_FILE
        register = load_params(RegisterParams, params) if params.is_file() else RegisterParams.defaults()
        name = register.model_name
        return cls(root=root, tracking_uri=tracking.tracking_uri(), model_name=name,
                   serve_url=os.environ.get(ENV_SERVE_URL, "http://127.0.0.1:8000").rstrip("/"),
                   mlflow_ui=os.environ.get(ENV_MLFLOW_UI, "http://127.0.0.1:5000").rstrip("/"))

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)


@dataclass(frozen=True)
class Champion:
    name: str
    version: str
    alias: str
    run_id: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]


def champion(src: Sources, alias: str = "champion") -> Champion | None:
    """The model version holding ``alias``, with its run's metrics and params; None if none."""
    from mlflow.exceptions import MlflowException

    client = src.client()
    try:
        mv = client.get_model_version_by_alias(src.model_name, alias)
    except MlflowException:
        return None
    run = client.get_run(mv.run_id)
    return Champion(src.model_name, str(mv.version), alias, mv.run_id, dict(run.data.metrics),
                    dict(run.data.params), dict(mv.tags))


def versions(src: Sources) -> dict[str, str]:
    """run id -> "v<version> (aliases)" for every registered version of the model."""
    from mlflow.exceptions import MlflowException

    client = src.client()
    try:
        found = client.search_model_versions(f"name = '{src.model_name}'")
        aliases = client.get_registered_model(src.model_name).aliases      # alias -> version
    except MlflowException:
        return {}
    out = {}
    for mv in found:
        held = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
        out[mv.run_id] = " ".join([f"v{mv.version}", *(f"@{a}" for a in held)])
    return out


def runs(src: Sources) -> pd.DataFrame:
    """Every MLflow run of every experiment: ids, name, status, start, params.*, metrics.*."""
    import mlflow

    client = src.client()
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return pd.DataFrame()
    mlflow.set_tracking_uri(src.tracking_uri)
    table = mlflow.search_runs(experiment_ids=ids, order_by=["attributes.start_time DESC"])
    return table if isinstance(table, pd.DataFrame) else pd.DataFrame()


def evaluated_runs(src: Sources) -> pd.DataFrame:
    """Runs with a test evaluation (``test_miou``), newest first."""
    table = runs(src)
    if table.empty or "metrics.test_miou" not in table:
        return pd.DataFrame()
    return table[table["metrics.test_miou"].notna()].reset_index(drop=True)


def run_label(row: pd.Series, labels: dict[str, str]) -> str:
    name = row.get("tags.mlflow.runName") or row["run_id"][:8]
    version = labels.get(row["run_id"], "")
    return f"{name} {version} · test mIoU {row['metrics.test_miou']:.3f}".replace("  ", " ")


def local_evaluation(src: Sources) -> dict[str, Any] | None:
    """The workspace's evaluate-stage index (evaluation/index.json), if there is one."""
    index = src.root / paths.EVAL_OUT / "index.json"
    return read_json(index) if index.is_file() else None


def eval_file(src: Sources, run_id: str, relative: str, cache: Path | None = None) -> Path:
    """A local path to one file of a run's evaluate outputs (``index.json``,
    ``confusion.json``, ``images/x.jpg`` ...): in the workspace's ``evaluation/`` when it
    belongs to this run, else downloaded from the run's MLflow artifacts into ``cache``."""
    local = local_evaluation(src)
    if local is not None and local.get("mlflow_run_id") == run_id:
        return src.root / paths.EVAL_OUT / relative
    import mlflow

    target = Path(cache or Path(tempfile.gettempdir()) / "segmentation-dashboard") / run_id
    path = target / OVERLAYS_ARTIFACT / relative
    if not path.is_file():               # MLflow writes one file into dst_path under its own name
        path.parent.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{OVERLAYS_ARTIFACT}/{relative}",
                                            dst_path=str(path.parent), tracking_uri=src.tracking_uri)
    return path


def index(src: Sources, run_id: str) -> dict[str, Any]:
    """The run's evaluation index: classes and colours, per-image scores, samples, worst."""
    return read_json(eval_file(src, run_id, "index.json"))


def scores(src: Sources, run_id: str) -> dict[str, Any]:
    """The evaluate stage's metrics of a run (the content of metrics/evaluate.json)."""
    local = src.root / paths.EVAL_METRICS
    if local.is_file():
        data = read_json(local)
        if data.get("mlflow_run_id") == run_id:
            return data
    import mlflow

    mlflow.set_tracking_uri(src.tracking_uri)
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{EVAL_ARTIFACT}")


def class_table(metrics: dict[str, Any], colours: dict[str, list[int]]) -> pd.DataFrame:
    """One row per class: IoU, Dice, precision, recall, boundary IoU, pixel share, colour."""
    rows = []
    for name, s in metrics["per_class"].items():
        rows.append({"class": name, "IoU": s.get("iou"), "Dice": s.get("dice"),
                     "precision": s.get("precision"), "recall": s.get("recall"),
                     "boundary IoU": s.get("boundary_iou"), "pixel share": s.get("pixel_share"),
                     "colour": rgb_hex(colours.get(name, (128, 128, 128)))})
    return pd.DataFrame(rows)


def rgb_hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def confusion(src: Sources, run_id: str) -> tuple[list[str], np.ndarray]:
    """Class names and the (C, C) pixel counts of a run's test split, rows = truth."""
    data = read_json(eval_file(src, run_id, "confusion.json"))
    return list(data["classes"]), np.asarray(data["counts"], dtype=np.int64)


def row_normalised(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)


def curves(src: Sources, run_ids: list[str], keys=CURVES) -> pd.DataFrame:
    """Per-epoch training curves: columns run_id, metric, step, value."""
    client = src.client()
    rows = []
    for run_id in run_ids:
        for key in keys:
            for m in client.get_metric_history(run_id, key):
                rows.append({"run_id": run_id, "metric": key, "step": m.step, "value": m.value})
    return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"])


def per_class_iou(table: pd.DataFrame, prefix: str = "metrics.test_iou_") -> pd.DataFrame:
    """Long table (run_id, class, IoU) from the runs table's ``test_iou_<class>`` metrics."""
    cols = [c for c in table.columns if c.startswith(prefix)]
    long = table.melt(id_vars=["run_id"], value_vars=cols, var_name="class", value_name="IoU")
    long["class"] = long["class"].str.removeprefix(prefix)
    return long.dropna(subset=["IoU"])


def run_link(src: Sources, experiment_id: str, run_id: str) -> str:
    return f"{src.mlflow_ui}/#/experiments/{experiment_id}/runs/{run_id}"


def card(src: Sources) -> dict[str, Any] | None:
    path = src.root / paths.PREPARED_DIR / paths.CARD_JSON
    return read_json(path) if path.is_file() else None


def picture(src: Sources, run_id: str, relative: str) -> np.ndarray:
    """An RGB picture, or a class-index mask (palette PNG) as a 2-D array."""
    with Image.open(eval_file(src, run_id, relative)) as im:
        return np.asarray(im if im.mode in ("P", "L") else im.convert("RGB"))
