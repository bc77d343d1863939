"""The register stage against a real MLflow store: the champion gate, idempotent
registration, re-scoring a champion evaluated otherwise, loading by alias, ONNX."""

import json
import os

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.evaluate import evaluate
from pipeline.inference import to_tensor
from pipeline.onnx_export import onnx_logits
from pipeline.params import default_params
from pipeline.register import register
from tests.conftest import CLASSES
from tests.factories import constant_model, tracked_model

NAME = "tiny-unet"


def write_params(path, flip_tta=True, onnx=False):
    path.write_text(json.dumps(default_params({
        "evaluate": {"flip_tta": flip_tta, "scales": [1.0], "overlays": {"samples": 1, "worst_per_class": 0}},
        "register": {"model_name": NAME, "onnx": onnx},
    })))
    return path


def train_evaluate_register(env, tag, model, cfg, data, params):
    folder = env / tag
    tracked_model(folder / "model", model, cfg)
    metrics = evaluate(folder / "model", data, folder / "evaluation", folder / "metrics.json",
                       folder / "plots", params)
    report = folder / "evaluation" / "evaluate.json"
    decision = register(folder / "model", report, data, folder / "registry.json", params)
    assert json.loads((folder / "registry.json").read_text())["promoted"] == decision.promoted
    return metrics, decision


def test_only_a_better_model_takes_the_champion_alias(coded, fitted, env):
    model, cfg = fitted
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    params = write_params(env / "params.yaml", onnx=True)

    good, first = train_evaluate_register(env, "good", model, cfg, coded, params)
    assert first.promoted and first.version == "1" and first.reason == "no champion yet"
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "1"
    assert float(champion.tags["test_miou"]) == pytest.approx(good["miou"], abs=1e-6)
    assert champion.tags["eval_key"] == good["eval_key"]            # the record the score comes from
    assert {"data_version", "params_hash", "git_commit", "split_version", "onnx_uri"} <= set(champion.tags)

    params = write_params(env / "params.yaml")
    bad, second = train_evaluate_register(env, "bad", constant_model(model, 0), cfg, coded, params)
    assert bad["miou"] < good["miou"]
    assert not second.promoted and second.version == "2"
    assert "does not beat" in second.reason and second.previous_champion == "1"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2

    # Registering the same run again reuses its version.
    again = register(env / "bad" / "model", env / "bad" / "evaluation" / "evaluate.json", coded,
                     env / "again.json", params)
    assert again.version == "2" and not again.promoted
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2

    # The champion loads by alias, predicts on any size and knows its classes.
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    masks = pyfunc.predict([np.zeros((37, 53, 3), np.uint8)])
    assert masks[0].shape == (37, 53)
    meta = pyfunc.unwrap_python_model().model.meta
    assert list(meta.class_names) == CLASSES and len(meta.palette) == 3 and meta.mean is not None

    # The ONNX export logged beside it matches PyTorch on an image of another size.
    onnx_path = env / "model.onnx"
    import onnx

    onnx.save(mlflow.onnx.load_model(champion.tags["onnx_uri"]), str(onnx_path))
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    x = to_tensor([image, image[::-1].copy()], meta.mean, meta.std)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(onnx_logits(onnx_path, x.numpy()) - expected).max() < 1e-4


def test_a_champion_scored_otherwise_is_rescored_on_this_test_set(coded, fitted, env):
    model, cfg = fitted
    train_evaluate_register(env, "good", model, cfg, coded, write_params(env / "params.yaml"))
    # Evaluation settings change (no flip TTA): the recorded score is not comparable.
    params = write_params(env / "params.yaml", flip_tta=False)
    redo = evaluate(env / "good" / "model", coded, env / "redo", env / "redo.json", env / "redo-plots",
                    params, track=False)
    _, decision = train_evaluate_register(env, "bad", constant_model(model, 1), cfg, coded, params)
    assert not decision.promoted and "re-evaluated" in decision.reason
    assert decision.previous_champion_test_miou == pytest.approx(redo["miou"], abs=1e-9)
