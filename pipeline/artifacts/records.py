"""Evaluation records in MLflow: how one evaluation of a training run is named, and read back.

A run can be evaluated many times (another test set, flip or multi-scale TTA on or off,
other tiles). Each evaluation is a record of the run keyed by its evaluation key
(``pipeline.evaluate.eval_key``: the split's data version and every setting that changes
the score), so that no evaluation overwrites another:

- metrics ``<split>/<key>/<name>`` for the headline scores (``HEADLINE``) and
  ``<split>/<key>/<score>/<class>`` for ``PER_CLASS`` scores;
- a tag ``evaluation/<key>``: JSON of the split, its data version and the settings;
- artifacts under ``evaluations/<key>/``: ``evaluate.json`` (the whole report),
  ``plots/`` and ``overlays/`` (the evaluate stage's pictures and index).

A registered version names the record the registry gate scored with the tags
``test_miou`` and ``eval_key`` (``pipeline.register``); that record is what ``/metadata``
and the dashboard show for the version.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

HEADLINE = ("miou", "pixel_accuracy", "mean_dice", "fw_iou", "boundary_miou")
PER_CLASS = ("iou", "dice", "boundary_iou")
SCORE_TAG = "test_miou"          # model version tags set by the register stage
EVAL_KEY_TAG = "eval_key"
SPLIT_VERSION_TAG = "split_version"
RECORD_TAG = "evaluation/"       # + key: a run's record of one evaluation
ARTIFACTS = "evaluations"        # + /key/: its files
REPORT_FILE = "evaluate.json"
PLOTS = "plots"
OVERLAYS = "overlays"
_METRIC = re.compile(r"^(?P<split>[^/]+)/(?P<key>[0-9a-f]{12})/(?P<name>[^/]+)(?:/(?P<cls>.+))?$")


def artifact_dir(key: str, part: str | None = None) -> str:
    """``evaluations/<key>`` or ``evaluations/<key>/<part>``: where a record's files live."""
    return f"{ARTIFACTS}/{key}" + (f"/{part}" if part else "")


def safe_name(name: str) -> str:
    """A class name as MLflow accepts it in a metric name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def metric_name(split: str, key: str, name: str, cls: str | None = None) -> str:
    return f"{split}/{key}/{name}" + (f"/{safe_name(cls)}" if cls is not None else "")


def flat_metrics(report: dict[str, Any], headline: Sequence[str] = HEADLINE) -> dict[str, float]:
    """A report's MLflow metrics under its key: its ``headline`` scores (the task's) and the
    ``PER_CLASS`` ones (null scores left out)."""
    split, key = report["split"], report["eval_key"]
    flat = {metric_name(split, key, k): report[k] for k in headline if report.get(k) is not None}
    for cls, scores in report["per_class"].items():
        for name in PER_CLASS:
            if scores.get(name) is not None:
                flat[metric_name(split, key, name, cls)] = scores[name]
    return flat


def record_tag(report: dict[str, Any]) -> tuple[str, str]:
    """The run tag naming a report's record: (``evaluation/<key>``, JSON of what it scored)."""
    about = {"split": report["split"], "split_version": report["split_version"],
             "settings": report["settings"]}
    return RECORD_TAG + report["eval_key"], json.dumps(about, sort_keys=True)


def run_records(metrics: dict[str, float], tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """A run's records, from its metrics and tags: key -> {"split", "split_version",
    "settings", headline scores, "per_class": {score: {class: value}}}."""
    found: dict[str, dict[str, Any]] = {}
    for name, value in metrics.items():
        m = _METRIC.match(name)
        if m is None or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        record = found.setdefault(m["key"], {"split": m["split"], "per_class": {}})
        if m["cls"] is None:
            record[m["name"]] = float(value)
        else:
            record["per_class"].setdefault(m["name"], {})[m["cls"]] = float(value)
    for tag, value in tags.items():
        if tag.startswith(RECORD_TAG) and tag[len(RECORD_TAG):] in found:
            found[tag[len(RECORD_TAG):]] |= json.loads(value)
    return found


def version_evaluation(client, mv) -> dict[str, Any] | None:
    """The recorded evaluation of model version ``mv``: the score and key its tags hold
    (what the gate compared), with that record's other headline scores from the run;
    None when the version carries no recorded score."""
    key, score = mv.tags.get(EVAL_KEY_TAG), mv.tags.get(SCORE_TAG)
    if not key or score is None:
        return None
    out: dict[str, Any] = {"eval_key": key, "test_miou": float(score),
                           "split_version": mv.tags.get(SPLIT_VERSION_TAG)}
    if mv.run_id:
        run = client.get_run(mv.run_id)
        record = run_records(run.data.metrics, run.data.tags).get(key)
        if record is not None:
            out["split"] = record["split"]
            out["metrics"] = {k: record[k] for k in HEADLINE if k in record}
            out["settings"] = record.get("settings")
    return out
