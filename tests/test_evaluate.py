"""The evaluate stage: metrics against scikit-learn, boundary IoU against a brute-force
band, prediction by tiles and flips, the overlay outputs and the MLflow logging."""

import copy
import hashlib
import io
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, precision_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion

from pipeline import evaluate as stage
from pipeline.artifacts import records
from pipeline.artifacts.model_dir import save_model
from pipeline.config.params import EvaluateParams, default_params, load_params
from pipeline.data import shards
from pipeline.evaluate import evaluate
from pipeline.inference.predictor import Predictor, window_starts
from pipeline.metrics.boundary import BoundaryIoU, boundary_band
from pipeline.metrics.confusion import confusion_matrix
from pipeline.metrics.surface import SurfaceDistances
from pipeline.tasks.base import EvaluateError
from pipeline.tasks.semantic import SemanticTask
from pipeline.tasks.semantic_eval import Evaluation, report
from pipeline.viz import overlays
from tests.conftest import CLASSES
from tests.factories import repo_params, tracked_model

C, IGNORE = 5, 255
ROOT = Path(__file__).resolve().parents[1]


def random_masks(seed: int = 0, shape=(3, 40, 50)):
    """pred, truth with ignored pixels, class 3 only predicted, class 4 in neither."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, shape).astype(np.uint8)
    pred = np.where(rng.random(shape) < 0.7, truth, rng.integers(0, 4, shape)).astype(np.uint8)
    truth[rng.random(shape) < 0.1] = IGNORE
    return pred, truth


def as_nan(values):
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def sk_scores(score, t, p, defined, labels=(0, 1, 2, 3, 4)):
    """A scikit-learn per-class score, NaN where it is undefined (sklearn says 0 there)."""
    values = score(t, p, labels=list(labels), average=None, zero_division=0).astype(float)
    values[~defined] = np.nan
    return values


def test_report_matches_scikit_learn_with_ignore_and_absent_classes():
    pred, truth = random_masks()
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), C, IGNORE).numpy()
    names = [f"c{i}" for i in range(C)]
    metrics = report(Evaluation(names, [[0, 0, 0]] * C, IGNORE, cm, [np.nan] * C, ids=["a"], seconds=1.0))

    keep = truth != IGNORE
    t, p = truth[keep], pred[keep]
    labels = list(range(C))
    per_class = {key: as_nan([metrics["per_class"][n][key] for n in names])
                 for key in ("iou", "dice", "precision", "recall", "pixel_share")}
    in_truth, in_pred = np.isin(labels, t), np.isin(labels, p)
    sk_iou = sk_scores(jaccard_score, t, p, in_truth | in_pred)
    np.testing.assert_allclose(per_class["iou"], sk_iou, atol=1e-12)
    np.testing.assert_allclose(per_class["dice"], sk_scores(f1_score, t, p, in_truth | in_pred), atol=1e-12)
    np.testing.assert_allclose(per_class["precision"], sk_scores(precision_score, t, p, in_pred), atol=1e-12)
    np.testing.assert_allclose(per_class["recall"], sk_scores(recall_score, t, p, in_truth), atol=1e-12)
    assert np.isnan(per_class["iou"][4]) and per_class["iou"][3] == 0      # absent vs only predicted
    assert metrics["miou"] == pytest.approx(np.nanmean(sk_iou), abs=1e-12)
    assert metrics["pixel_accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
    counts = sk_confusion(t, p, labels=labels)
    share = counts.sum(1) / counts.sum()
    np.testing.assert_allclose(per_class["pixel_share"], share, atol=1e-12)
    assert metrics["fw_iou"] == pytest.approx(np.nansum(share * sk_iou), abs=1e-12)


def brute_band(mask: np.ndarray, d: int) -> np.ndarray:
    """Pixels of mask with a non-mask pixel (or the image edge) within Chebyshev distance d."""
    h, w = mask.shape
    padded = np.zeros((h + 2 * d, w + 2 * d), bool)
    padded[d:d + h, d:d + w] = mask
    inner = np.ones_like(mask)
    for dy in range(-d, d + 1):
        for dx in range(-d, d + 1):
            inner &= padded[d + dy:d + dy + h, d + dx:d + dx + w]
    return mask & ~inner


def test_boundary_iou_matches_a_brute_force_band():
    rng = np.random.default_rng(1)
    truth = np.zeros((30, 40), np.uint8)
    truth[5:20, 8:30] = 1
    truth[0:6, 30:40] = 2                       # touches the image edge
    truth[25:28, 2:5] = IGNORE
    pred = np.roll(truth, (1, 2), axis=(0, 1))
    pred[pred == IGNORE] = 0
    pred[rng.random(pred.shape) < 0.02] = 1
    for d in (1, 2, 3):
        for c in (1, 2):
            np.testing.assert_array_equal(boundary_band(truth == c, d), brute_band(truth == c, d))
    width = 2 / np.hypot(30, 40)                  # d = 2 pixels
    b = BoundaryIoU(3, IGNORE, width)
    b.update(pred, truth)
    valid = truth != IGNORE
    for c in range(3):
        g, p = brute_band(truth == c, 2) & valid, brute_band(pred == c, 2) & valid
        assert b.compute()[c] == pytest.approx((g & p).sum() / (g | p).sum())


def test_window_starts_cover_the_side_and_end_flush():
    for length, tile, overlap in [(100, 32, 0.25), (64, 64, 0.5), (65, 64, 0.0), (20, 32, 0.25)]:
        starts = window_starts(length, tile, overlap)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all() and starts[0] == 0 and starts[-1] == max(0, length - tile)


def test_predictor_tiles_and_flips(fitted):
    model, _ = fitted
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    tiled = Predictor(model, tile_above_pixels=1024, tile_size=(32, 48), tile_overlap=0.25).probs(image)
    assert tiled.shape == (3, 70, 90)
    torch.testing.assert_close(tiled.sum(0), torch.ones(70, 90))
    plain = Predictor(model).probs(image)
    mirrored = Predictor(model).probs(np.ascontiguousarray(image[:, ::-1])).flip(-1)
    torch.testing.assert_close(Predictor(model, flip_tta=True).probs(image), (plain + mirrored) / 2)
    torch.testing.assert_close(Predictor(model, scales=(1.0, 1.0)).probs(image), plain)
    half = Predictor(model, scales=(0.5,)).probs(image)
    assert half.shape == (3, 70, 90) and not torch.allclose(half, plain)
    torch.testing.assert_close(Predictor(model, scales=(0.5, 1.0)).probs(image), (half + plain) / 2)


def test_palette_png_keeps_class_indices_and_error_map_colours():
    mask = np.array([[0, 1], [2, IGNORE]], np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(overlays.palette_png(mask, [(1, 2, 3)] * 3))))
    np.testing.assert_array_equal(decoded, mask)
    err = overlays.error_map(mask, np.array([[0, 2], [2, 0]], np.uint8), IGNORE)
    assert tuple(err[0, 0]) == overlays.CORRECT_RGB and tuple(err[0, 1]) == overlays.WRONG_RGB
    assert tuple(err[1, 1]) == overlays.IGNORED_RGB


def write_eval_params(path, **overrides):
    section = {"flip_tta": True, "scales": [1.0],
               "overlays": {"samples": 2, "worst_per_class": 1}} | overrides
    path.write_text(json.dumps(default_params({"evaluate": section})))
    return path


def test_stage_per_class_iou_agrees_with_scikit_learn_on_its_predictions(coded, fitted, env):
    model, cfg = fitted
    run_id = tracked_model(env / "model", model, cfg)
    params = write_eval_params(env / "params.yaml")
    metrics = evaluate(env / "model", coded, env / "evaluation", env / "metrics.json", env / "plots", params)

    assert metrics["miou"] > 0.8                       # the colour-coded data is learnt
    assert json.loads((env / "evaluation" / "evaluate.json").read_text()) == metrics     # the whole report
    headline = stage.headline(metrics, SemanticTask())
    assert json.loads((env / "metrics.json").read_text()) == headline    # DVC's: no tables
    assert set(headline) == {"eval_key", "miou", "pixel_accuracy", "mean_dice", "fw_iou",
                                            "boundary_miou"}
    index = json.loads((env / "evaluation" / "index.json").read_text())
    truths, preds = [], []
    for image_id, _, truth in shards.iter_samples(coded, "test"):
        entry = next(e for e in index["images"] if e["id"] == image_id)
        pred = np.asarray(Image.open(env / "evaluation" / entry["files"]["prediction"]))
        truths.append(truth.ravel())
        preds.append(pred.ravel())
    last_image = list(shards.iter_samples(coded, "test"))[-1][1]
    np.testing.assert_array_equal(pred, Predictor(model, flip_tta=True).mask(last_image))  # the stage's own
    t, p = np.concatenate(truths), np.concatenate(preds)
    keep = t != 255
    t, p = t[keep], p[keep]
    sk_iou = sk_scores(jaccard_score, t, p, np.isin([0, 1, 2], t) | np.isin([0, 1, 2], p), labels=(0, 1, 2))
    ours = as_nan([metrics["per_class"][n]["iou"] for n in CLASSES])
    np.testing.assert_allclose(ours, sk_iou, atol=1e-6)

    # Surface distances: the stage's per class and their means, from its own predictions.
    surface = SurfaceDistances(3, 255)
    for image_id, _, truth in shards.iter_samples(coded, "test"):
        entry = next(e for e in index["images"] if e["id"] == image_id)
        surface.update(np.asarray(Image.open(env / "evaluation" / entry["files"]["prediction"])), truth)
    expected = surface.compute()
    for key in ("hd95", "asd", "unmatched"):
        np.testing.assert_allclose(as_nan([metrics["per_class"][n][key] for n in CLASSES]), expected[key])
    assert metrics["mean_hd95"] == pytest.approx(np.nanmean(expected["hd95"]))
    assert metrics["mean_asd"] == pytest.approx(np.nanmean(expected["asd"])) and metrics["mean_asd"] >= 0

    # Overlays: the samples and the worst image of each class, with every view on disk.
    assert len(index["samples"]) == 2 and set(index["worst"]) == set(CLASSES)
    by_id = {e["id"]: e for e in index["images"]}
    for name, ids in index["worst"].items():
        assert len(ids) == 1 and by_id[ids[0]]["iou"][name] is not None
    for image_id in index["samples"] + [i for ids in index["worst"].values() for i in ids]:
        files = by_id[image_id]["files"]
        assert set(files) == {"image", "truth", "prediction", "error", "panel"}
        assert all((env / "evaluation" / f).stat().st_size > 0 for f in files.values())
    assert [c["name"] for c in index["classes"]] == CLASSES

    # DVC plots data: the per-class table, and confusion rows that sum to 1 over each truth class.
    bars = json.loads((env / "plots" / "per_class.json").read_text())
    assert bars == [{"class": n} | metrics["per_class"][n] for n in CLASSES]
    rows = json.loads((env / "plots" / "confusion.json").read_text())
    assert len(rows) == 9
    for name in CLASSES:
        assert sum(r["fraction"] for r in rows if r["truth"] == name) == pytest.approx(1.0, abs=1e-5)

    # Everything is on the training's MLflow run, as the record of this evaluation's key.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    key = metrics["eval_key"]
    assert run.data.metrics[f"test/{key}/miou"] == pytest.approx(metrics["miou"])
    assert run.data.metrics[f"test/{key}/iou/car"] == pytest.approx(metrics["per_class"]["car"]["iou"])
    listed = {a.path for a in client.list_artifacts(run_id, f"evaluations/{key}/plots")}
    assert listed == {f"evaluations/{key}/plots/{f}" for f in ("per_class.json", "confusion.json")}


def test_a_model_for_other_classes_is_refused_and_nothing_written(coded, fitted, env, tmp_path):
    model, cfg = fitted
    other = copy.deepcopy(model)
    other.meta = type(model.meta)(["a", "b", "c"], model.meta.palette, model.meta.mean, model.meta.std)
    save_model(env / "model", other, cfg, 3)
    params = write_eval_params(env / "params.yaml")
    with pytest.raises(EvaluateError, match="classes"):
        evaluate(env / "model", coded, env / "evaluation", env / "metrics.json", env / "plots", params,
                 track=False)
    assert not (env / "evaluation").exists() and not (env / "metrics.json").exists()


SMALL = {"scales": [1.0], "overlays": {"samples": 1, "worst_per_class": 1}, "threads": None}


def test_the_evaluation_key_changes_with_what_changes_a_score_only():
    from pipeline.config.params import EvaluateParams, parse_section

    def key(split_version="sha256:a", **settings):
        cfg = parse_section(EvaluateParams, base | settings)
        return stage.eval_key({"split_version": split_version}, cfg)

    base = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]
    first = key()
    assert len(first) == 12 and first == key()
    assert key(threads=2) == first and key(overlays={"samples": 0, "worst_per_class": 0}) == first
    for changed in ({"split_version": "sha256:b"}, {"flip_tta": not base["flip_tta"]}, {"scales": [1.0]},
                    {"tile_size": [256, 256]}, {"tile_overlap": 0.5}, {"tile_above_pixels": 4096},
                    {"boundary_width": 0.05}, {"split": "val"}):
        assert key(**changed) != first, changed
    # A refinement: its parameters count only when it is chosen; without one the key is as before
    # refinements existed (the settings without postprocess, crf and grabcut).
    crf = base["crf"] | {"iterations": 9}
    assert key(crf=crf) == first and key(grabcut=base["grabcut"] | {"sure": 0.99}) == first
    assert key(postprocess="crf") != first and key(postprocess="crf", crf=crf) != key(postprocess="crf")
    assert key(postprocess="crf", grabcut=base["grabcut"] | {"sure": 0.99}) == key(postprocess="crf")
    unscored = ("postprocess", "crf", "grabcut", "threads", "overlays")
    legacy = {k: v for k, v in base.items() if k not in unscored}
    blob = json.dumps({"split_version": "sha256:a", "settings": legacy}, sort_keys=True)
    assert first == hashlib.sha1(blob.encode()).hexdigest()[:12]


def test_the_evaluate_stage_refines_with_a_crf_when_asked(coded, fitted, env):
    model, cfg = fitted
    tracked_model(env / "model", model, cfg)
    def run(name, extra):
        params = repo_params(env / f"{name}.yaml", evaluate=SMALL | extra)
        return evaluate(env / "model", coded, env / name / "evaluation", env / name / "metrics.json",
                        env / name / "plots", params)

    plain, refined = run("plain", {}), run("crf", {"postprocess": "crf"})
    assert refined["settings"]["postprocess"]["method"] == "crf" and "postprocess" not in plain["settings"]
    assert refined["eval_key"] != plain["eval_key"]
    assert 0 <= refined["miou"] <= 1 and refined["miou"] != pytest.approx(plain["miou"], abs=1e-9)


def test_a_refinement_the_model_cannot_take_stops_the_stage_with_what_to_do(coded, fitted, env):
    model, cfg = fitted
    tracked_model(env / "model", model, cfg)
    params = repo_params(env / "p.yaml", evaluate=SMALL | {"postprocess": "grabcut"})
    with pytest.raises(EvaluateError, match=r"grabcut refines a binary mask \(2 classes\); this model has 3"):
        evaluate(env / "model", coded, env / "evaluation", env / "metrics.json", env / "plots", params)


def test_two_evaluations_with_other_settings_are_two_records_on_the_run(coded, fitted, env):
    """Each evaluation is recorded under its key (metrics, tag, artifacts); a second one with
    other settings adds a record and leaves the first as it was."""
    model, cfg = fitted
    run_id = tracked_model(env / "model", model, cfg)
    done = []
    for name, settings in (("a", {"flip_tta": True}), ("b", {"flip_tta": False, "scales": [0.5]})):
        params = repo_params(env / f"{name}.yaml", evaluate=SMALL | settings)
        done.append(evaluate(env / "model", coded, env / name / "evaluation", env / name / "metrics.json",
                             env / name / "plots", params))
    a, b = done
    assert a["eval_key"] != b["eval_key"] and a["miou"] != pytest.approx(b["miou"], abs=1e-6)
    assert (a["mlflow_run_id"], a["split"], a["settings"]["flip_tta"]) == (run_id, "test", True)

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert not [k for k in run.data.metrics if k.startswith("test_")]      # no score without its key
    found = records.run_records(run.data.metrics, run.data.tags)
    assert set(found) == {a["eval_key"], b["eval_key"]}
    for done_ in (a, b):
        key = done_["eval_key"]
        assert run.data.metrics[f"test/{key}/miou"] == pytest.approx(done_["miou"])
        assert run.data.metrics[f"test/{key}/iou/car"] == pytest.approx(done_["per_class"]["car"]["iou"])
        assert found[key]["settings"] == done_["settings"]
        assert found[key]["primary_metric"] == "miou"         # which score ranks models
        assert found[key]["miou"] == pytest.approx(done_["miou"])
        assert mlflow.artifacts.load_dict(f"runs:/{run_id}/evaluations/{key}/evaluate.json") == done_
        listed = {x.path for x in client.list_artifacts(run_id, f"evaluations/{key}")}
        assert listed == {f"evaluations/{key}/{p}" for p in ("evaluate.json", "plots", "overlays")}
        overlays_index = mlflow.artifacts.load_dict(f"runs:/{run_id}/evaluations/{key}/overlays/index.json")
        assert overlays_index["eval_key"] == key

    # The helpers the register stage re-scores with: a report of the same settings has the same key.
    params = load_params(EvaluateParams, env / "a.yaml")
    again = stage.full_report(stage.evaluate_split(model, coded, params), coded, params, run_id)
    assert again["eval_key"] == a["eval_key"] and again["miou"] == pytest.approx(a["miou"], abs=1e-9)
    stage.log_record(run_id, again, SemanticTask())
    run = client.get_run(run_id)
    assert set(records.run_records(run.data.metrics, run.data.tags)) == {a["eval_key"], b["eval_key"]}
    assert run.data.metrics[f"test/{b['eval_key']}/miou"] == pytest.approx(b["miou"])
