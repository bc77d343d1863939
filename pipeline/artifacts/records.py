"""Evaluation records in MLflow: how one evaluation of a training run is named, and read back.

A run can be evaluated many times (another test set, flip or multi-scale TTA on or off,
other tiles). Each evaluation is a record of the run keyed by its evaluation key
(``pipeline.evaluate.eval_key``: the split's data version and every setting that changes
the score), so that no evaluation overwrites another:

- metrics ``<split>/<key>/<name>`` for the task's headline scores (``Task.headline_keys``)
  and ``<split>/<key>/<score>/<class>`` for its per-class scores (``Task.per_class_keys``);
- a tag ``evaluation/<key>``: JSON of the split, its data version, the settings and which
  score ranks models (``primary_metric``);
- artifacts under ``evaluations/<key>/``: ``evaluate.json`` (the whole report),
  ``plots/`` and ``overlays/`` (the evaluate stage's pictures and index).

A registered version names the record the registry gate scored with the tags
``test_score`` (the value), ``score_metric`` (which of its task's scores: the task's
primary metric) and ``eval_key`` (``pipeline.register``); that record is what ``/metadata``
and the dashboard show for the version. Versions and records from before scores named
their metric hold mIoU (``LEGACY_METRIC``; a version's tag was ``test_miou``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

SCORE_TAG = "test_score"         # model version tags set by the register stage: the gate's score,
SCORE_METRIC_TAG = "score_metric"  # ... which score it is (the task's primary metric),
TASK_TAG = "task"                # ... and the model's task (pipeline.tasks)
LEGACY_SCORE_TAG = "test_miou"   # the score tag of versions registered before scores named their metric
LEGACY_METRIC = "miou"           # the metric of those versions and of records without primary_metric
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


def flat_metrics(report: dict[str, Any], headline: Sequence[str],
                 per_class: Sequence[str] = ()) -> dict[str, float]:
    """A report's MLflow metrics under its key: its ``headline`` scores and, for every class
    of ``report["per_class"]``, its ``per_class`` ones (null scores left out)."""
    split, key = report["split"], report["eval_key"]
    flat = {metric_name(split, key, k): report[k] for k in headline if report.get(k) is not None}
    for cls, scores in report.get("per_class", {}).items() if per_class else ():
        for name in per_class:
            if scores.get(name) is not None:
                flat[metric_name(split, key, name, cls)] = scores[name]
    return flat


def record_tag(report: dict[str, Any]) -> tuple[str, str]:
    """The run tag naming a report's record: (``evaluation/<key>``, JSON of what it scored)."""
    about = {"split": report["split"], "split_version": report["split_version"],
             "settings": report["settings"], "primary_metric": report["primary_metric"]}
    return RECORD_TAG + report["eval_key"], json.dumps(about, sort_keys=True)


def run_records(metrics: dict[str, float], tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """A run's records, from its metrics and tags: key -> {"split", "split_version",
    "settings", "primary_metric", headline scores, "per_class": {score: {class: value}}}."""
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
    for record in found.values():
        record.setdefault("primary_metric", LEGACY_METRIC)
    return found


def scores_of(record: dict[str, Any]) -> dict[str, float]:
    """A record's headline scores (``run_records``): its scalar values."""
    return {k: v for k, v in record.items() if isinstance(v, float)}


def version_score(tags: dict[str, str]) -> tuple[str, float] | None:
    """(metric, value) of the gate score a model version's ``tags`` hold; None if none."""
    if SCORE_TAG in tags:
        return version_metric(tags), float(tags[SCORE_TAG])
    if LEGACY_SCORE_TAG in tags:
        return LEGACY_METRIC, float(tags[LEGACY_SCORE_TAG])
    return None


def version_metric(tags: dict[str, str]) -> str:
    """Which score a model version's recorded scores are (``score_metric``; mIoU for versions
    registered before scores named their metric)."""
    return tags.get(SCORE_METRIC_TAG, LEGACY_METRIC)


def version_evaluation(client, mv) -> dict[str, Any] | None:
    """The recorded evaluation of model version ``mv``: the score and key its tags hold
    (what the gate compared), with that record's other headline scores from the run;
    None when the version carries no recorded score."""
    key, score = mv.tags.get(EVAL_KEY_TAG), version_score(mv.tags)
    if not key or score is None:
        return None
    out: dict[str, Any] = {"eval_key": key, "score_metric": score[0], "test_score": score[1],
                           "split_version": mv.tags.get(SPLIT_VERSION_TAG)}
    if mv.run_id:
        run = client.get_run(mv.run_id)
        record = run_records(run.data.metrics, run.data.tags).get(key)
        if record is not None:
            out["split"] = record["split"]
            out["metrics"] = scores_of(record)
            out["settings"] = record.get("settings")
    return out
