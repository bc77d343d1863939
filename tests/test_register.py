"""The register stage against a real MLflow store: the champion gate, idempotent
registration, re-scoring a champion evaluated otherwise, loading by alias, ONNX."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import register as register_module
from pipeline.artifacts.onnx_export import onnx_logits
from pipeline.config.params import default_params
from pipeline.evaluate import evaluate
from pipeline.inference.tensors import to_tensor
from pipeline.register import model_version, register
from tests.conftest import CLASSES
from tests.factories import constant_model, registered_model, tracked_model
from tests.mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-unet"


def write_params(path, flip_tta=True, onnx=False, min_improvement=0.01):
    path.write_text(json.dumps(default_params({
        "evaluate": {"flip_tta": flip_tta, "scales": [1.0], "overlays": {"samples": 1, "worst_per_class": 0}},
        "register": {"model_name": NAME, "onnx": onnx, "min_improvement": min_improvement},
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
    assert float(champion.tags["test_score"]) == pytest.approx(good["miou"], abs=1e-6)
    assert (champion.tags["score_metric"], champion.tags["task"]) == ("miou", "semantic")
    assert first.score_metric == "miou" and first.test_score == pytest.approx(good["miou"], abs=1e-6)
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
    assert decision.previous_champion_score == pytest.approx(redo["miou"], abs=1e-9)


def test_a_candidate_must_beat_the_champion_by_min_improvement(coded, fitted, env):
    model, cfg = fitted
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    params = write_params(env / "params.yaml", min_improvement=0.01)
    good, _ = train_evaluate_register(env, "good", model, cfg, coded, params)
    # The champion's recorded score a little under the next candidate's: within the spread of
    # one recipe's runs, so the alias stays; then clearly under it, so the alias moves.
    client.set_model_version_tag(NAME, "1", "test_score", repr(good["miou"] - 0.005))
    _, close = train_evaluate_register(env, "close", model, cfg, coded, params)
    assert not close.promoted and close.version == "2", close.reason
    assert "does not beat" in close.reason and "min_improvement" in close.reason
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    client.set_model_version_tag(NAME, "1", "test_score", repr(good["miou"] - 0.02))
    _, clear = train_evaluate_register(env, "clear", model, cfg, coded, params)
    assert clear.promoted and clear.version == "3", clear.reason
    assert clear.previous_champion_score == pytest.approx(good["miou"] - 0.02)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"


def test_a_champion_scored_by_another_metric_is_not_compared(coded, fitted, env):
    """A champion of another task (its score another metric) under the same model name: the
    scores are not comparable, so the candidate is registered without the alias, and the
    decision says why, naming both metrics."""
    model, cfg = fitted
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    params = write_params(env / "params.yaml")
    train_evaluate_register(env, "good", model, cfg, coded, params)
    client.set_model_version_tag(NAME, "1", "score_metric", "fg_dice")
    client.set_model_version_tag(NAME, "1", "test_score", "0.01")     # far below: still not compared
    _, decision = train_evaluate_register(env, "other", model, cfg, coded, params)
    assert not decision.promoted and decision.previous_champion == "1", decision.reason
    assert "fg_dice" in decision.reason and "miou" in decision.reason and "model_name" in decision.reason
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


def test_a_version_registered_before_scores_named_their_metric_reads_as_miou(coded, fitted, env):
    """Versions registered before the score tags named their metric hold ``test_miou`` only."""
    model, cfg = fitted
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    params = write_params(env / "params.yaml")
    good, _ = train_evaluate_register(env, "old", model, cfg, coded, params)
    key = good["eval_key"]
    for tag in ("test_score", "score_metric", "task", f"score.{key}"):
        client.delete_model_version_tag(NAME, "1", tag)
    client.set_model_version_tag(NAME, "1", "test_miou", repr(good["miou"] - 0.02))
    _, decision = train_evaluate_register(env, "new", model, cfg, coded, params)
    assert decision.promoted and decision.previous_champion == "1", decision.reason
    assert decision.previous_champion_score == pytest.approx(good["miou"] - 0.02)


def test_a_rescore_is_recorded_on_the_champion_and_reused(coded, fitted, env, monkeypatch):
    model, cfg = fitted
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    train_evaluate_register(env, "good", model, cfg, coded, write_params(env / "params.yaml"))
    calls = []
    real = register_module.rescore
    monkeypatch.setattr(register_module, "rescore", lambda *a: calls.append(a) or real(*a))
    params = write_params(env / "params.yaml", flip_tta=False)       # a new evaluation key
    _, first = train_evaluate_register(env, "bad1", constant_model(model, 1), cfg, coded, params)
    assert len(calls) == 1 and "re-evaluated" in first.reason
    champion = client.get_model_version_by_alias(NAME, "champion")
    key = client.get_model_version(NAME, first.version).tags["eval_key"]
    assert float(champion.tags[f"score.{key}"]) == first.previous_champion_score
    # The next register on this test set with these settings reuses the recorded re-score.
    _, second = train_evaluate_register(env, "bad2", constant_model(model, 2), cfg, coded, params)
    assert len(calls) == 1, "the champion was evaluated again"
    assert not second.promoted and "its recorded" in second.reason
    assert second.previous_champion_score == first.previous_champion_score


def test_a_rescore_is_recorded_on_the_champion_inside_the_registry_lock(coded, fitted, env, monkeypatch):
    """Two registers re-scoring one champion at once both write the same new tags on its
    version and its run; MLflow's SQL stores answer two concurrent first writes of one tag
    key with a unique-constraint error (400, not retried), so a register crashed. Writes to
    anything but the candidate's own version belong inside the registry lock."""
    model, cfg = fitted
    params = write_params(env / "params.yaml")
    train_evaluate_register(env, "good", model, cfg, coded, params)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(NAME, "champion")
    params = write_params(env / "params.yaml", flip_tta=False)       # the champion must be re-scored
    unlocked = []

    def locked() -> bool:
        return bool(client.search_registered_models(f"name = '{NAME}.lock'"))

    def watch(method):
        original = getattr(MlflowClient, method)

        def wrapper(self, *args, **kwargs):
            values = [*args, *kwargs.values()]
            ours = champion.run_id in values or values[:2] in ([NAME, champion.version],
                                                               [NAME, str(champion.version)])
            if ours and not locked():
                unlocked.append((method, str(values[1])[:60]))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(MlflowClient, method, wrapper)

    for method in ("set_model_version_tag", "set_tag", "log_batch", "log_dict", "log_artifact",
                   "log_artifacts"):
        watch(method)
    _, decision = train_evaluate_register(env, "bad", constant_model(model, 1), cfg, coded, params)
    assert "re-evaluated" in decision.reason
    assert not unlocked, f"written to the champion outside the registry lock: {unlocked}"


def test_a_registered_model_created_meanwhile_by_another_register_is_used(fitted, env):
    """The first two registers of a name both find no registered model; the second to create
    it is refused (it exists now) and must go on with it."""
    model, cfg = fitted
    uri = os.environ["MLFLOW_TRACKING_URI"]
    run_id = tracked_model(env / "first", model, cfg)
    model_uri = MlflowClient(uri).get_run(run_id).data.tags["model_uri"]

    class Racing(MlflowClient):
        def get_registered_model(self, name):
            MlflowClient(uri).create_registered_model(name)        # the other register, just now
            return super().get_registered_model(name + ".absent")  # ... after this one looked

    version = model_version(Racing(uri), NAME, run_id, model_uri)
    assert str(version.version) == "1" and version.run_id == run_id


def test_a_champion_that_cannot_be_rescored_gives_a_decision_not_a_traceback(coded, fitted, env):
    model, cfg = fitted
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    other = copy.deepcopy(model)           # a champion of another dataset: other classes
    other.meta = dataclasses.replace(model.meta, class_names=("sky", "sea", "boat"))
    run_id = tracked_model(env / "other", other, cfg)
    uri = client.get_run(run_id).data.tags["model_uri"]
    client.set_registered_model_alias(NAME, "champion", model_version(client, NAME, run_id, uri).version)

    params = write_params(env / "params.yaml")
    _, decision = train_evaluate_register(env, "new", model, cfg, coded, params)
    assert not decision.promoted and decision.previous_champion == "1"
    assert "could not be re-evaluated" in decision.reason and "sky" in decision.reason
    written = json.loads((env / "new" / "registry.json").read_text())
    assert written["reason"] == decision.reason and not written["promoted"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


@pytest.mark.slow
def test_two_registers_at_once_against_one_server_promote_one(coded, fitted, tmp_path, monkeypatch):
    """Two equal candidates, registered by two processes at once against one ``mlflow server``,
    both beating a champion that each must first re-evaluate (seconds between reading the
    champion and setting the alias): the first promoted, the second compared with it."""
    model, cfg = fitted
    monkeypatch.chdir(tmp_path)
    with MlflowServer(tmp_path / "server") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        params = write_params(tmp_path / "params.yaml")
        registered_model(tmp_path / "old", constant_model(model, 0), cfg, NAME)   # no recorded score
        for tag in ("a", "b"):
            tracked_model(tmp_path / tag / "model", model, cfg)
            folder = tmp_path / tag
            evaluate(folder / "model", coded, folder / "evaluation", folder / "metrics.json",
                     folder / "plots", params)
        env = os.environ | {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": server.uri}
        procs = [subprocess.Popen(
            [sys.executable, "-m", "pipeline.register", "--model", str(tmp_path / tag / "model"),
             "--metrics", str(tmp_path / tag / "evaluation" / "evaluate.json"), "--data", str(coded),
             "--out", str(tmp_path / tag / "registry.json"), "--params", str(params)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for tag in ("a", "b")]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        said = [f"register {tag} (exit {p.returncode}):\n{out}"
                for tag, p, out in zip("ab", procs, outputs, strict=True)]
        said.append(f"mlflow server (end):\n{server.tail()}")
        assert [p.returncode for p in procs] == [0, 0], "\n\n".join(said)
        decisions = [json.loads((tmp_path / tag / "registry.json").read_text()) for tag in ("a", "b")]
        assert sum(d["promoted"] for d in decisions) == 1, decisions
        winner = next(d for d in decisions if d["promoted"])
        loser = next(d for d in decisions if not d["promoted"])
        assert winner["previous_champion"] == "1"
        assert loser["previous_champion"] == winner["version"] and "does not beat" in loser["reason"]
        champion = MlflowClient(server.uri).get_model_version_by_alias(NAME, "champion")
        assert str(champion.version) == winner["version"]
        assert not any(m.name.endswith(".lock") for m in MlflowClient(server.uri).search_registered_models())


REPRODUCE = """
import json, sys
import mlflow, numpy as np, torch
from pipeline.data import shards
from pipeline.metrics.confusion import confusion_matrix, segmentation_metrics
name, data = sys.argv[1], sys.argv[2]
model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
classes = json.load(open(f"{data}/classes.json"))
cm = torch.zeros(classes["num_classes"], classes["num_classes"], dtype=torch.int64)
for _, image, truth in shards.iter_samples(data, "test"):
    mask = model.predict([image])[0]
    cm += confusion_matrix(torch.from_numpy(mask), torch.from_numpy(np.array(truth)), classes["num_classes"],
                           classes["ignore_index"])
print(json.dumps({"miou": float(segmentation_metrics(cm)["miou"])}))
"""


@pytest.mark.slow
def test_the_champion_reproduces_its_recorded_score_in_a_fresh_process(coded, fitted, env):
    """Evaluated with flip and multi-scale TTA over tiles, registered; then a new Python
    process loads ``models:/<name>@champion`` and scores the test split with its pyfunc."""
    model, cfg = fitted
    params = write_params(env / "params.yaml")
    settings = json.loads(params.read_text())
    settings["evaluate"] |= {"flip_tta": True, "scales": [0.75, 1.0, 1.25], "tile_above_pixels": 1024,
                             "tile_size": [32, 32], "tile_overlap": 0.25}
    params.write_text(json.dumps(settings))
    metrics, decision = train_evaluate_register(env, "good", model, cfg, coded, params)
    assert decision.promoted
    recorded = float(MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(
        NAME, "champion").tags["test_score"])
    assert recorded == metrics["miou"]
    out = subprocess.run([sys.executable, "-c", REPRODUCE, NAME, str(coded)], capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": str(REPO)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["miou"] == recorded


def test_a_lock_held_by_another_register_is_a_message_not_a_traceback(coded, fitted, env, monkeypatch):
    import functools

    from pipeline import register as register_module
    from pipeline.artifacts.registry_lock import OWNER_TAG, lock_name, registry_lock

    model, cfg = fitted
    params = write_params(env / "params.yaml")
    folder = env / "held"
    tracked_model(folder / "model", model, cfg)
    evaluate(folder / "model", coded, folder / "evaluation", folder / "metrics.json", folder / "plots",
             params)
    MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).create_registered_model(
        lock_name(NAME), tags={OWNER_TAG: "other-host:1:abc"})
    monkeypatch.setattr(register_module, "registry_lock", functools.partial(registry_lock, timeout_s=0.5))
    with pytest.raises(SystemExit) as exc:
        register_module.main(["--model", str(folder / "model"), "--metrics",
                              str(folder / "evaluation" / "evaluate.json"), "--data", str(coded),
                              "--out", str(folder / "registry.json"), "--params", str(params)])
    assert str(exc.value).startswith("register: the registry lock") and "other-host:1:abc" in str(exc.value)
    assert not (folder / "registry.json").exists()
