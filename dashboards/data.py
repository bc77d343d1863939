"""What the dashboard shows, read from MLflow and the evaluate stage's outputs (plain functions).

Nothing here computes a metric: the pipeline computed them; this module finds and reads
them. Where things are:

- the MLflow store: ``$MLFLOW_TRACKING_URI``, else the repository's embedded store
  (``pipeline.artifacts.tracking.tracking_uri``); the registered model is ``register.model_name``;
- an evaluation: a record of a run keyed by its evaluation key (``pipeline.artifacts.records``): the
  run's metrics ``<split>/<key>/...``, its artifacts ``evaluations/<key>/evaluate.json``
  (the whole report) and ``evaluations/<key>/overlays/`` (index.json, confusion.json,
  pictures); for the run and key the workspace's evaluate stage scored, the same files are
  read from ``evaluation/`` without a download. A registered version's evaluation is the
  record its tags name (``eval_key``, ``test_score``, ``score_metric``: what the registry
  gate compared);
- the task whose results are shown (``shown_task``): the champion's (its ``task`` tag), else
  the prepared dataset's; its labels name the scores, its ``views`` pick the evaluation pages;
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

from pipeline.artifacts import records, tracking
from pipeline.config import paths
from pipeline.config.params import RegisterParams, load_params
from pipeline.models.base import UNRECORDED_TASK
from pipeline.tasks import get_task
from pipeline.tasks.base import Task
from pipeline.utils.io import read_json

ENV_SERVE_URL = "SEG_SERVE_URL"
ENV_MLFLOW_UI = "MLFLOW_UI_URL"
LOSS_CURVES = ("train_loss", "val_loss", "lr")
# The evaluation pages a task's ``views`` can name: view -> (page file, title, icon).
VIEW_PAGES = {
    "per_class": ("app_pages/per_class.py", "Per-class IoU", ":material/bar_chart:"),
    "confusion": ("app_pages/confusion.py", "Confusion matrix", ":material/grid_on:"),
    "overlays": ("app_pages/overlays.py", "Overlays", ":material/image:"),
    "ap_table": ("app_pages/ap_table.py", "Average precision", ":material/query_stats:"),
    "pq_table": ("app_pages/pq_table.py", "Panoptic quality", ":material/join:"),
}
# An instance report's AP figures (pipeline.tasks.instance_eval.report): row label -> (mask key, box key).
AP_ROWS = {
    "AP @ IoU 0.50:0.95": ("mask_ap", "box_ap"),
    "AP50": ("mask_ap50", "box_ap50"),
    "AP75": ("mask_ap75", "box_ap75"),
    "AP small objects": ("mask_ap_small", "box_ap_small"),
    "AP medium objects": ("mask_ap_medium", "box_ap_medium"),
    "AP large objects": ("mask_ap_large", "box_ap_large"),
}
PR_IOUS = ("0.50", "0.75", "0.50:0.95")      # the IoU thresholds of an instance report's pr_curve
# A panoptic report's groups of classes (pipeline.tasks.panoptic_eval.report): row -> key suffix.
PQ_GROUPS = {"all classes": "", "things": "_things", "stuff": "_stuff"}
PQ_COLUMNS = ("pq", "sq", "rq")               # -> "PQ", "SQ", "RQ"
# Per-class score -> the prefix of its per-epoch validation metric (the tasks' ``epoch_metrics``:
# semantic ``val_iou_<class>``, instance ``val_ap_<class>``, the class's mask AP).
VAL_PER_CLASS = {"iou": "val_iou_", "mask_ap": "val_ap_"}


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
    evaluation: dict[str, Any] | None      # the version's recorded evaluation (records.version_evaluation)
    run_metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]

    @property
    def eval_key(self) -> str | None:
        return self.evaluation["eval_key"] if self.evaluation else None


def champion(src: Sources, alias: str = "champion") -> Champion | None:
    """The model version holding ``alias``, with its recorded evaluation and its run's
    params; None if none."""
    from mlflow.exceptions import MlflowException

    client = src.client()
    try:
        mv = client.get_model_version_by_alias(src.model_name, alias)
    except MlflowException:
        return None
    run = client.get_run(mv.run_id)
    return Champion(src.model_name, str(mv.version), alias, mv.run_id, records.version_evaluation(client, mv),
                    dict(run.data.metrics), dict(run.data.params), dict(mv.tags))


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


def shown_task(src: Sources, champ: Champion | None) -> Task:
    """The task whose results the dashboard shows: the champion's (its ``task`` tag), else
    the workspace's prepared dataset's (``card.json``); versions and data from before tasks
    were recorded are semantic."""
    if champ is not None:
        return get_task(champ.tags.get(records.TASK_TAG, UNRECORDED_TASK))
    prepared = card(src)
    return get_task((prepared or {}).get("task", UNRECORDED_TASK))


def view_pages(task: Task) -> list[tuple[str, str, str]]:
    """(page file, title, icon) of the evaluation pages ``task``'s outputs feed."""
    unknown = [v for v in task.views if v not in VIEW_PAGES]
    if unknown:
        raise ValueError(f"task {task.name}: views {unknown} are not dashboard pages "
                         f"({', '.join(VIEW_PAGES)})")
    return [VIEW_PAGES[v] for v in task.views]


def curve_keys(task: Task) -> tuple[str, ...]:
    """The per-epoch MLflow metrics the runs page charts: the task's validation score and the losses."""
    return (f"val_{task.primary_metric}", *LOSS_CURVES)


def score_label(task: Task, metric: str) -> str:
    """How people read score ``metric`` (``Task.labels``; the key itself when the task has no label)."""
    return task.labels.get(metric, metric)


def registered_scores(src: Sources) -> dict[str, tuple[str, float]]:
    """run id -> (metric, value): the recorded test score of its registered version (what the
    gate compared)."""
    from mlflow.exceptions import MlflowException

    try:
        found = src.client().search_model_versions(f"name = '{src.model_name}'")
    except MlflowException:
        return {}
    return {mv.run_id: score for mv in found if (score := records.version_score(mv.tags)) is not None}


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


def _prefixed(row: pd.Series, prefix: str, kind: type) -> dict[str, Any]:
    """The ``prefix`` columns of a runs-table row holding a ``kind`` value (not NaN), unprefixed."""
    return {c.removeprefix(prefix): v for c, v in row.items() if c.startswith(prefix) and isinstance(v, kind)
            and not (isinstance(v, float) and np.isnan(v))}


def evaluations(src: Sources) -> pd.DataFrame:
    """One row per evaluation record of every run, newest run first: run_id, key, split,
    run_name, metric (the record's primary one) and its score, settings (dict)."""
    table = runs(src)
    columns = ["run_id", "key", "split", "run_name", "metric", "score", "settings"]
    rows = []
    for _, row in table.iterrows():
        tags = _prefixed(row, "tags.", str)
        for key, rec in records.run_records(_prefixed(row, "metrics.", float), tags).items():
            rows.append({"run_id": row["run_id"], "key": key, "split": rec["split"],
                         "run_name": tags.get("mlflow.runName") or row["run_id"][:8],
                         "metric": rec["primary_metric"], "score": rec.get(rec["primary_metric"]),
                         "settings": rec.get("settings") or {}})
    return pd.DataFrame(rows, columns=columns)


def settings_label(settings: dict[str, Any], task: Task | None = None) -> str:
    """``flip, scales 0.75/1/1.25, tiles 512x512`` for a record's settings; for a ``task``
    that does not tile (panoptic), the largest image it predicts instead."""
    if not settings:
        return "settings unknown"
    parts = ["flip" if settings.get("flip_tta") else "no flip"]
    scales = settings.get("scales") or [1.0]
    if list(scales) != [1.0]:
        parts.append("scales " + "/".join(f"{s:g}" for s in scales))
    if task is not None and not task.tiles:
        if settings.get("tile_above_pixels"):
            parts.append(f"whole images up to {settings['tile_above_pixels'] / 1e6:.3g} Mpx")
    elif settings.get("tile_size"):
        parts.append("tiles {}x{}".format(*settings["tile_size"]))
    return ", ".join(parts)


def record_label(row: pd.Series, labels: dict[str, str], task: Task) -> str:
    version = labels.get(row["run_id"], "")
    score = "—" if row["score"] is None or pd.isna(row["score"]) else f"{row['score']:.3f}"
    return " ".join(part for part in (
        row["run_name"], version, f"· {row['split']} {score_label(task, row['metric'])} {score}",
        f"({settings_label(row['settings'], task)}; key {row['key']})") if part)


def local_evaluation(src: Sources) -> dict[str, Any] | None:
    """The workspace's evaluate-stage index (evaluation/index.json), if there is one."""
    index = src.root / paths.EVAL_OUT / "index.json"
    return read_json(index) if index.is_file() else None


def _is_local(src: Sources, run_id: str, key: str) -> bool:
    local = local_evaluation(src)
    return local is not None and local.get("mlflow_run_id") == run_id and local.get("eval_key") == key


def eval_file(src: Sources, run_id: str, key: str, relative: str, cache: Path | None = None) -> Path:
    """A local path to one file of a record's overlays (``index.json``, ``confusion.json``,
    ``images/x.jpg`` ...): in the workspace's ``evaluation/`` when it holds this run's
    evaluation of this key, else downloaded from the run's MLflow artifacts into ``cache``
    under the run and key (a record's files never change under its key)."""
    if _is_local(src, run_id, key):
        return src.root / paths.EVAL_OUT / relative
    import mlflow

    artifact = records.artifact_dir(key, records.OVERLAYS)
    target = Path(cache or Path(tempfile.gettempdir()) / "segmentation-dashboard") / run_id / key
    path = target / artifact / relative
    if not path.is_file():               # MLflow writes one file into dst_path under its own name
        path.parent.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{artifact}/{relative}",
                                            dst_path=str(path.parent), tracking_uri=src.tracking_uri)
    return path


def index(src: Sources, run_id: str, key: str) -> dict[str, Any]:
    """A record's evaluation index: classes and colours, per-image scores, samples, worst."""
    return read_json(eval_file(src, run_id, key, "index.json"))


def scores(src: Sources, run_id: str, key: str) -> dict[str, Any]:
    """A record's whole report (``pipeline.evaluate.full_report``: headline and per class)."""
    if _is_local(src, run_id, key):
        return read_json(src.root / paths.EVAL_REPORT)
    import mlflow

    mlflow.set_tracking_uri(src.tracking_uri)
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{records.artifact_dir(key)}/{records.REPORT_FILE}")


def class_table(metrics: dict[str, Any], colours: dict[str, list[int]]) -> pd.DataFrame:
    """One row per class: IoU, Dice, precision, recall, boundary IoU, the surface distances HD95
    and ASD in pixels (None in a report from before they were measured), pixel share, colour."""
    rows = []
    for name, s in metrics["per_class"].items():
        rows.append({"class": name, "IoU": s.get("iou"), "Dice": s.get("dice"),
                     "precision": s.get("precision"), "recall": s.get("recall"),
                     "boundary IoU": s.get("boundary_iou"), "HD95 (px)": s.get("hd95"),
                     "ASD (px)": s.get("asd"), "pixel share": s.get("pixel_share"),
                     "colour": rgb_hex(colours.get(name, (128, 128, 128)))})
    return pd.DataFrame(rows)


def rgb_hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def confusion(src: Sources, run_id: str, key: str) -> tuple[list[str], np.ndarray]:
    """Class names and the (C, C) pixel counts of a record's split, rows = truth."""
    data = read_json(eval_file(src, run_id, key, "confusion.json"))
    return list(data["classes"]), np.asarray(data["counts"], dtype=np.int64)


def row_normalised(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)


def curves(src: Sources, run_ids: list[str], keys: tuple[str, ...]) -> pd.DataFrame:
    """Per-epoch training curves: columns run_id, metric, step, value."""
    client = src.client()
    rows = []
    for run_id in run_ids:
        for key in keys:
            for m in client.get_metric_history(run_id, key):
                rows.append({"run_id": run_id, "metric": key, "step": m.step, "value": m.value})
    return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"])


def per_class_scores(table: pd.DataFrame, score: str = "iou") -> pd.DataFrame:
    """Long table (run_id, key, class, ``score``) of every evaluation record in a runs table:
    each record's per-class ``score`` (one of its task's ``per_class_keys``)."""
    rows = []
    for _, row in table.iterrows():
        for key, rec in records.run_records(_prefixed(row, "metrics.", float), {}).items():
            for cls, value in rec["per_class"].get(score, {}).items():
                rows.append({"run_id": row["run_id"], "key": key, "class": cls, score: value})
    return pd.DataFrame(rows, columns=["run_id", "key", "class", score])


def val_per_class(table: pd.DataFrame, score: str = "iou") -> pd.DataFrame:
    """Long table (run_id, class, ``score``) of the last validation's per-class ``score``
    (``VAL_PER_CLASS``; empty for a score validation does not log per class)."""
    prefix = VAL_PER_CLASS.get(score)
    cols = [c for c in table.columns if prefix and c.startswith(f"metrics.{prefix}")]
    if not cols:
        return pd.DataFrame(columns=["run_id", "class", score])
    long = table.melt(id_vars=["run_id"], value_vars=cols, var_name="class", value_name=score)
    long["class"] = long["class"].str.removeprefix(f"metrics.{prefix}")
    return long.dropna(subset=[score])


def per_class_label(task: Task, score: str) -> str:
    """How people read a per-class score: ``IoU``, else the task's label of it."""
    return "IoU" if score == "iou" else score_label(task, score)


def run_link(src: Sources, experiment_id: str, run_id: str) -> str:
    return f"{src.mlflow_ui}/#/experiments/{experiment_id}/runs/{run_id}"


def card(src: Sources) -> dict[str, Any] | None:
    path = src.root / paths.PREPARED_DIR / paths.CARD_JSON
    return read_json(path) if path.is_file() else None


def picture(src: Sources, run_id: str, key: str, relative: str) -> np.ndarray:
    """An RGB picture, or a class-index mask (palette PNG) as a 2-D array."""
    with Image.open(eval_file(src, run_id, key, relative)) as im:
        return np.asarray(im if im.mode in ("P", "L") else im.convert("RGB"))


def ap_table(report: dict[str, Any]) -> pd.DataFrame:
    """An instance report's AP figures, one row each (``AP_ROWS``): columns AP, mask, box; a
    figure the report lacks or has nothing to score (no truth of that size) is None."""
    return pd.DataFrame([{"AP": label, "mask": report.get(mask), "box": report.get(box)}
                         for label, (mask, box) in AP_ROWS.items()], columns=["AP", "mask", "box"])


def class_ap_table(report: dict[str, Any], colours: dict[str, list[int]]) -> pd.DataFrame:
    """One row per class of an instance report: mask AP, box AP (None: no truth of the class), colour."""
    return pd.DataFrame([{"class": name, "mask AP": s.get("mask_ap"), "box AP": s.get("box_ap"),
                          "colour": rgb_hex(colours.get(name, (128, 128, 128)))}
                         for name, s in report.get("per_class", {}).items()],
                        columns=["class", "mask AP", "box AP", "colour"])


def pr_curves(report: dict[str, Any]) -> pd.DataFrame:
    """An instance report's precision-recall curves as a long table (IoU, recall, precision):
    COCOeval's interpolated precision at its 101 recall points at IoU 0.50, 0.75 and averaged
    over 0.50:0.95 (None where no class has truth); empty when the report has no curve."""
    curve = report.get("pr_curve") or {}
    rows = [{"IoU": iou, "recall": r, "precision": p}
            for iou in PR_IOUS if iou in curve for r, p in zip(curve["recall"], curve[iou], strict=True)]
    return pd.DataFrame(rows, columns=["IoU", "recall", "precision"])


def pq_table(report: dict[str, Any]) -> pd.DataFrame:
    """A panoptic report's PQ, SQ and RQ of all classes, the things and the stuff (``PQ_GROUPS``),
    one row each; None where the group has no class with a segment to score."""
    return pd.DataFrame([{"classes": group, **{k.upper(): report.get(f"{k}{suffix}") for k in PQ_COLUMNS}}
                         for group, suffix in PQ_GROUPS.items()],
                        columns=["classes", *(k.upper() for k in PQ_COLUMNS)])


def class_pq_table(report: dict[str, Any], classes: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per class of a panoptic report, in class index order (the index's ``classes``,
    with ``isthing`` and ``color``; JSON files keep no key order): thing or stuff, PQ, SQ, RQ
    (None: no true or predicted segment of the class), the semantic view's IoU, the matched (TP),
    unmatched predicted (FP) and unmatched true (FN) segments, colour."""
    per_class = report.get("per_class", {})
    columns = ["class", "kind", "PQ", "SQ", "RQ", "IoU", "TP", "FP", "FN", "colour"]
    return pd.DataFrame([{"class": c["name"], "kind": "thing" if c.get("isthing") else "stuff",
                          **{k.upper() if k != "iou" else "IoU": s.get(k)
                             for k in ("pq", "sq", "rq", "iou", "tp", "fp", "fn")},
                          "colour": rgb_hex(c["color"])}
                         for c in classes if (s := per_class.get(c["name"])) is not None], columns=columns)


def panel_images(index: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """id -> entry of the images an instance or panoptic evaluation drew (``files.panel``: image |
    truth | prediction side by side; ``pipeline.tasks.instance_eval``, ``panoptic_eval``); empty
    for other indexes (a semantic evaluation draws a panel too, beside its image, truth,
    prediction and error views)."""
    return {im["id"]: im for im in index.get("images", []) if set(im.get("files", {})) == {"panel"}}


@dataclass(frozen=True)
class PanelScores:
    """How an evaluation drawn as panels scores each image: its index entries' ``key`` (the one
    the evaluate stage ranks the worst images by, lowest first), ``others``, and the ``truth``
    and ``predicted`` counts of ``counted``."""

    key: str
    label: str
    short: str                                       # in the image picker
    others: tuple[tuple[str, str], ...] = ()         # (entry key, label)
    counted: str = "instances"


# Instance evaluations score each image with the DSB score and mask AP50 and count instances;
# panoptic ones with PQ, counting segments.
PANEL_SCORES = (PanelScores("dsb_score", "DSB score", "DSB", (("mask_ap50", "mask AP50"),)),
                PanelScores("pq", "PQ", "PQ", counted="segments"))


def panel_scores(entries: list[dict[str, Any]]) -> PanelScores:
    """The ``PANEL_SCORES`` whose key the index entries hold (the first when none does)."""
    return next((p for p in PANEL_SCORES if any(p.key in e for e in entries)), PANEL_SCORES[0])


def prepared_image(src: Sources, split: str, image_id: str) -> tuple[bytes, str] | None:
    """(encoded bytes, file name) of image ``image_id`` of the workspace's prepared ``split``
    (``data/prepared``): the test images of an evaluation that kept no plain picture of them
    (instance evaluations draw panels); None when the workspace has no such image."""
    import pyarrow.compute as pc

    from pipeline.data import shards

    columns = ["id", "image", "image_format"]
    try:
        table = shards.read_split(src.root / paths.PREPARED_DIR, split, columns=columns)
    except FileNotFoundError:          # no prepared split in this workspace
        return None
    found = table.filter(pc.equal(table["id"], image_id))
    if found.num_rows == 0:
        return None
    row = found.slice(0, 1).to_pylist()[0]
    return row["image"], f"{Path(image_id).name}.{row['image_format'] or 'png'}"
