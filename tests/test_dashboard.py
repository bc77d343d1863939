"""The Streamlit dashboard, page by page (AppTest), against a real MLflow store with two
evaluated and registered runs and the evaluate stage's outputs, all built here."""

import copy
import json
import shutil
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from streamlit.testing.v1 import AppTest

from pipeline.config import paths
from pipeline.config.params import ServeParams
from pipeline.evaluate import evaluate
from pipeline.register import register
from pipeline.serving.service import ModelRef, Service
from tests.factories import constant_model, free_port, repo_params, tracked_model

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboards" / "app.py")
NAME = "dash-unet"


def evaluated(root: Path, folder: Path, model, cfg, data: Path, curve: list[float],
              primary: str = "miou") -> dict:
    """Train stand-in (a tracked model with a validation curve), evaluate, register."""
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts import tracking

    run_id = tracked_model(folder / "model", model, cfg)
    client = MlflowClient(tracking.tracking_uri())
    client.log_param(run_id, "train.seed", "0")
    client.log_metric(run_id, f"best_val_{primary}", max(curve))
    for step, value in enumerate(curve):
        client.log_metric(run_id, f"val_{primary}", value, step=step)
        client.log_metric(run_id, "train_loss", 1.0 - value, step=step)
    metrics = evaluate(folder / "model", data, folder / paths.EVAL_OUT, folder / paths.EVAL_METRICS,
                       folder / paths.PLOTS_DIR, root / "params.yaml")
    params = root / "params.yaml"
    decision = register(folder / "model", folder / paths.EVAL_REPORT, data, folder / "registry.json", params)
    return metrics | {"run_id": run_id, "version": decision.version}


@pytest.fixture(scope="module")
def workspace(coded, fitted, tmp_path_factory):
    """A repository root as the pipeline leaves it: mlflow.db, evaluation/, metrics/, the
    dataset card. The champion (good) was evaluated in the workspace; the older run (bad)
    only in MLflow."""
    root = tmp_path_factory.mktemp("workspace")
    model, cfg = fitted
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("DVC_ROOT", str(root))
        mp.chdir(root)
        repo_params(root / "params.yaml", register={"model_name": NAME, "onnx": False}, evaluate={
            "flip_tta": False, "scales": [1.0], "overlays": {"samples": 2, "worst_per_class": 1}})
        bad = evaluated(root, root / "old", constant_model(model, 0), cfg, coded, [0.2, 0.3])
        good = evaluated(root, root, model, cfg, coded, [0.4, 0.7, 0.8])
    (root / paths.PREPARED_DIR).mkdir(parents=True)
    shutil.copy(coded / paths.CARD_JSON, root / paths.PREPARED_DIR / paths.CARD_JSON)
    assert good["miou"] > bad["miou"]
    return {"root": root, "good": good, "bad": bad, "model": model}


@pytest.fixture
def app(workspace, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace['root'] / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(workspace["root"]))
    monkeypatch.setenv("SEG_SERVE_URL", "http://127.0.0.1:9")       # nothing listens on the discard port
    monkeypatch.setenv("TMPDIR", str(tmp_path))                     # downloaded artifacts
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def page(at: AppTest, name: str) -> AppTest:
    at.switch_page(f"app_pages/{name}.py")
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def test_overview_shows_the_champion(app, workspace):
    good = workspace["good"]
    assert "version 2 · @champion" in app.subheader[0].value
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["test mIoU"] == f"{good['miou']:.3f}"
    assert metrics["mean Dice"] == f"{good['mean_dice']:.3f}"
    splits = app.dataframe[0].value
    assert set(splits["split"]) == {"train", "val", "test"}
    params = app.dataframe[1].value
    assert "train.seed" in set(params["param"])


def test_per_class_for_any_evaluated_run(app, workspace):
    page(app, "per_class")
    good, bad = workspace["good"], workspace["bad"]
    table = app.dataframe[0].value.set_index("class")
    for name, scores in good["per_class"].items():
        assert table.loc[name, "IoU"] == pytest.approx(scores["iou"], nan_ok=True)
        assert table.loc[name, "recall"] == pytest.approx(scores["recall"], nan_ok=True)
        assert table.loc[name, "HD95 (px)"] == pytest.approx(scores["hd95"], nan_ok=True)
        assert table.loc[name, "ASD (px)"] == pytest.approx(scores["asd"], nan_ok=True)
    picker = app.selectbox(key="per-class-run")
    assert picker.value == (good["run_id"], good["eval_key"])
    # Labels: the champion's recorded evaluation first, each with its version, test mIoU and key.
    assert len(picker.options) == 2
    assert "v2 @champion" in picker.options[0] and f"{good['miou']:.3f}" in picker.options[0]
    assert good["eval_key"] in picker.options[0]
    assert "v1" in picker.options[1] and f"{bad['miou']:.3f}" in picker.options[1]
    picker.select((bad["run_id"], bad["eval_key"])).run()          # read from the run's MLflow artifacts
    assert not app.exception
    table = app.dataframe[0].value.set_index("class")
    for name, scores in bad["per_class"].items():
        assert table.loc[name, "IoU"] == pytest.approx(scores["iou"], nan_ok=True)
    assert {m.label: m.value for m in app.metric}["mIoU"] == f"{bad['miou']:.3f}"


def chart(at: AppTest, key: str) -> dict:
    found = [c for c in at.get("plotly_chart") if json.loads(c.proto.spec).get("layout") is not None
             and c.proto.id and key in c.proto.id]
    assert found, f"no plotly chart {key}"
    return json.loads(found[0].proto.spec)


def test_confusion_heatmap_rows_and_counts(app, workspace):
    page(app, "confusion")
    counts = json.loads((workspace["root"] / paths.EVAL_OUT / "confusion.json").read_text())["counts"]
    spec = chart(app, "confusion-heatmap")
    heat = spec["data"][0]
    assert heat["type"] == "heatmap" and heat["customdata"] == counts
    for row, total in zip(heat["z"], map(sum, counts), strict=True):
        if total:
            assert sum(row) == pytest.approx(1.0)
    assert "pixels" in heat["hovertemplate"]


def test_overlays_views_and_worst_images(app, workspace):
    page(app, "overlays")
    assert len(app.get("image")) >= 1
    for view in ("truth", "errors", "image", "prediction"):
        app.radio(key="view").set_value(view).run()
        assert not app.exception
    app.slider(key="alpha").set_value(1.0).run()
    app.multiselect(key="classes-shown").set_value(["road"]).run()
    app.radio(key="browse").set_value("worst for a class").run()
    assert not app.exception
    index = json.loads((workspace["root"] / paths.EVAL_OUT / "index.json").read_text())
    cls = app.selectbox(key="worst-class").value
    assert app.selectbox(key="image-id").options == index["worst"][cls]


def test_runs_table_and_comparison(app, workspace):
    page(app, "runs")
    table = app.dataframe[0].value
    assert len(table) == 2
    scores = sorted([workspace["bad"]["miou"], workspace["good"]["miou"]])
    assert sorted(table["registered test mIoU"]) == pytest.approx(scores, abs=1e-6)
    assert list(table["evaluations"]) == [1, 1]
    iou = chart(app, "compare-iou")
    assert len(iou["data"]) == 2                     # one bar series per run
    curves = chart(app, "compare-curves")
    assert {t["name"] for t in curves["data"]} == set(table["label"])
    assert "#/experiments/" in app.markdown[-1].value


def test_a_later_evaluation_adds_a_record_and_is_never_shown_stale(coded, fitted, tmp_path, monkeypatch):
    """The champion page shows the registered version's recorded evaluation; evaluating the
    run again with other settings adds a record the pages show fresh (the artifact caches are
    keyed by run id and evaluation key), and registering it again moves the recorded score."""
    from dashboards import ui

    model, cfg = fitted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path)
    small = {"scales": [1.0], "overlays": {"samples": 1, "worst_per_class": 0}}
    repo_params(tmp_path / "params.yaml", register={"model_name": NAME, "onnx": False},
                evaluate=small | {"flip_tta": True})
    first = evaluated(tmp_path, tmp_path, model, cfg, coded, [0.5])

    def shown(name: str, **select) -> AppTest:
        for cached in (ui.champion, ui.runs, ui.evaluations, ui.versions, ui.registered_scores):
            cached.clear()          # MLflow tables may lag TTL_S; a record's files may never be stale
        at = AppTest.from_file(APP, default_timeout=120)
        at.run()
        page(at, name)
        for key, value in select.items():
            at.selectbox(key=key).select(value).run()
            assert not at.exception, [e.message for e in at.exception]
        return at

    def per_class(at: AppTest) -> dict:
        return at.dataframe[0].value.set_index("class")["IoU"].to_dict()

    at = shown("overview")
    assert {m.label: m.value for m in at.metric}["test mIoU"] == f"{first['miou']:.3f}"
    at = shown("per_class")
    assert per_class(at) == pytest.approx({n: s["iou"] for n, s in first["per_class"].items()}, nan_ok=True)

    # The same run evaluated again in the workspace with other settings: a second record.
    repo_params(tmp_path / "params.yaml", register={"model_name": NAME, "onnx": False},
                evaluate=small | {"flip_tta": False, "scales": [0.5]})
    second = evaluate(tmp_path / "model", coded, tmp_path / paths.EVAL_OUT, tmp_path / paths.EVAL_METRICS,
                      tmp_path / paths.PLOTS_DIR, tmp_path / "params.yaml")
    assert second["eval_key"] != first["eval_key"] and f"{second['miou']:.3f}" != f"{first['miou']:.3f}"
    at = shown("overview")                          # still the score the version was registered with
    assert {m.label: m.value for m in at.metric}["test mIoU"] == f"{first['miou']:.3f}"
    at = shown("per_class")
    picker = at.selectbox(key="per-class-run")
    assert picker.value == (first["run_id"], first["eval_key"]) and len(picker.options) == 2
    assert per_class(at) == pytest.approx({n: s["iou"] for n, s in first["per_class"].items()}, nan_ok=True)
    at = shown("per_class", **{"per-class-run": (first["run_id"], second["eval_key"])})
    assert per_class(at) == pytest.approx({n: s["iou"] for n, s in second["per_class"].items()}, nan_ok=True)
    assert {m.label: m.value for m in at.metric}["mIoU"] == f"{second['miou']:.3f}"

    # Registered again with the new settings: a second version of the run (its pyfunc predicts
    # with them) records the second evaluation; it does not beat the champion, whose page keeps
    # the champion's own recorded score.
    decision = register(tmp_path / "model", tmp_path / paths.EVAL_REPORT, coded, tmp_path / "registry.json",
                        tmp_path / "params.yaml")
    assert not decision.promoted and decision.version != first["version"]
    from mlflow.tracking import MlflowClient

    tags = MlflowClient().get_model_version(NAME, decision.version).tags
    assert (float(tags["test_score"]), tags["eval_key"]) == (second["miou"], second["eval_key"])
    at = shown("overview")
    assert {m.label: m.value for m in at.metric}["test mIoU"] == f"{first['miou']:.3f}"
    at = shown("overlays")
    assert at.selectbox(key="overlays-run").value == (first["run_id"], first["eval_key"])


def test_the_dashboard_shows_the_champions_task(coded, fitted, tmp_path, monkeypatch):
    """A champion of another task (the tests-only foreground task, ranked by foreground Dice):
    the pages name its score and chart its validation curve; no page says mIoU for it."""
    import dataclasses

    from dashboards import data, ui
    from tests.tasks.foreground import NAME as FOREGROUND
    from tests.tasks.foreground import ForegroundTask

    model, cfg = fitted
    fg = copy.deepcopy(model)
    fg.meta = dataclasses.replace(model.meta, task=FOREGROUND)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path)
    repo_params(tmp_path / "params.yaml", register={"model_name": "fg-unet", "onnx": False},
                evaluate={"flip_tta": False, "scales": [1.0],
                          "overlays": {"samples": 1, "worst_per_class": 0}})
    first = evaluated(tmp_path, tmp_path, fg, cfg, coded, [0.3, 0.6], primary="fg_dice")
    assert first["primary_metric"] == "fg_dice"
    for cached in (ui.champion, ui.runs, ui.evaluations, ui.versions, ui.registered_scores):
        cached.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    cards = {m.label: m.value for m in at.metric}
    assert cards["test foreground Dice"] == f"{first['fg_dice']:.3f}"
    assert cards["mIoU"] == f"{first['miou']:.3f}" and "test mIoU" not in cards
    assert "best validation foreground Dice 0.600" in " ".join(c.value for c in at.caption)
    page(at, "runs")
    table = at.dataframe[0].value
    assert list(table["registered test foreground Dice"]) == pytest.approx([first["fg_dice"]], abs=1e-6)
    assert "metrics.best_val_fg_dice" in table and "registered test mIoU" not in table
    page(at, "per_class")
    picker = at.selectbox(key="per-class-run")
    assert f"foreground Dice {first['fg_dice']:.3f}" in picker.options[0]
    assert data.curve_keys(ForegroundTask())[0] == "val_fg_dice"


def test_the_evaluation_pages_are_the_ones_the_task_names():
    from dashboards import data
    from pipeline.tasks.semantic import SemanticTask

    assert [file for file, *_ in data.view_pages(SemanticTask())] == [
        "app_pages/per_class.py", "app_pages/confusion.py", "app_pages/overlays.py"]

    class NoPictures(SemanticTask):
        views = ("per_class",)

    assert [file for file, *_ in data.view_pages(NoPictures())] == ["app_pages/per_class.py"]

    class Unknown(SemanticTask):
        name = "unknown-views"
        views = ("per_class", "panoptic_quality")

    with pytest.raises(ValueError, match="panoptic_quality"):
        data.view_pages(Unknown())


class StandIn(BaseHTTPRequestHandler):
    """The model service's own request handling behind a plain loopback HTTP server."""

    service: Service

    def do_GET(self):
        self.answer(200, json.dumps(self.service.metadata()).encode(), "application/json")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        query = parse_qsl(urlsplit(self.path).query)
        reply = self.service.handle_predict(body, self.headers.get("Content-Type"), query)
        self.answer(reply.status, reply.body, reply.media_type)

    def answer(self, status, body, media_type):
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_try_it_with_the_server_down_then_up(app, workspace):
    page(app, "try_it")
    assert "not answering" in app.warning[0].value
    app.radio(key="source").set_value("a test image").run()
    app.button(key="segment").click().run()
    assert not app.exception and "does not answer" in app.error[0].value

    StandIn.service = Service(workspace["model"], ModelRef(uri=f"models:/{NAME}/2", name=NAME, version="2"),
                              ServeParams.defaults(threads=1))
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        app.text_input(key="serve-url").set_value(f"http://127.0.0.1:{server.server_port}").run()
        assert not app.warning and "version 2" in app.caption[0].value
        app.button(key="segment").click().run()
        assert not app.exception and not app.error
        assert len(app.get("image")) == 1
        areas = chart(app, "areas")["data"][0]
        assert sum(areas["x"]) == pytest.approx(1.0)
        assert app.selectbox(key="option-refine").value is None              # the model's own
        assert app.selectbox(key="option-refine").options == ["model's own", "none", "crf", "grabcut"]
        app.selectbox(key="option-refine").select("crf").run()
        app.button(key="segment").click().run()
        assert not app.exception and not app.error and len(app.get("image")) == 1
    finally:
        server.shutdown()


def test_try_it_shows_an_instance_answer_and_sends_the_tasks_query_options(app, workspace):
    from tests.inference.test_instances import BlobNet
    from tests.serving.test_instance_answers import META

    StandIn.service = Service(BlobNet(META), ModelRef(uri="models:/cells/1", name="cells", version="1"),
                              ServeParams.defaults(threads=1))
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page(app, "try_it")
        app.text_input(key="serve-url").set_value(f"http://127.0.0.1:{server.server_port}").run()
        assert app.slider(key="option-score_threshold").value == 0.5          # /metadata's default
        app.slider(key="option-score_threshold").set_value(0.0)
        app.number_input(key="option-max_instances").set_value(1)
        app.radio(key="source").set_value("a test image").run()
        app.button(key="segment").click().run()
        assert not app.exception and not app.error
        assert len(app.get("image")) == 1                                     # the overlay
        table = app.dataframe[0].value
        assert list(table.columns) == ["#", "class", "score", "area (px)", "box"] and len(table) == 1
        app.slider(key="option-score_threshold").set_value(1.0)              # no blob scores 1
        app.button(key="segment").click().run()
        assert not app.exception and len(app.dataframe[0].value) == 0
    finally:
        server.shutdown()


CHROMIUM = Path("/usr/bin/chromium")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def served_dashboard(root: Path, tmp_path: Path):
    """`streamlit run` of the workspace ``root`` on a loopback port and a Playwright tab on
    Debian's chromium; yields ``visit(path, selector) -> tab``, which opens a page and waits
    for ``selector`` and for the page to finish running, with no exception shown."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "DVC_ROOT": str(root), "TMPDIR": str(tmp_path), "SEG_SERVE_URL": "http://127.0.0.1:9"}
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.address",
           "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    log = tmp_path / "streamlit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"streamlit did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_FLAGS)
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})

            def visit(path: str, selector: str):
                tab.goto(f"{url}/{path}")
                tab.wait_for_selector(selector, timeout=60_000)
                tab.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=60_000)
                assert tab.locator('[data-testid="stException"]').count() == 0, f"exception on /{path}"
                return tab

            yield visit
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (apt-get install chromium)")
def test_in_a_real_browser(workspace, tmp_path):
    """`streamlit run` on a loopback port, driven by Playwright on Debian's chromium."""
    from playwright.sync_api import expect

    with served_dashboard(workspace["root"], tmp_path) as visit:
        tab = visit("per_class", ".js-plotly-plot .bars")                # the IoU bar chart
        # Switch the run: the older, non-champion one, read from MLflow artifacts.
        tab.locator('[data-testid="stSelectbox"]').first.click()
        tab.get_by_role("option").nth(1).click()
        expect(tab.locator('[data-testid="stMetricValue"]').first).to_contain_text(
            f"{workspace['bad']['miou']:.3f}", timeout=60_000)
        tab.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=60_000)
        tab.wait_for_selector(".js-plotly-plot .bars", timeout=60_000)
        tab.screenshot(path=str(tmp_path / "per_class.png"), full_page=True)
        visit("confusion", ".js-plotly-plot .heatmaplayer")              # the confusion matrix
        visit("overlays", '[data-testid="stImage"] img')                 # an overlay image
        tab.screenshot(path=str(tmp_path / "overlays.png"), full_page=True)
        visit("", '[data-testid="stMetricValue"]')                       # the champion
    assert (tmp_path / "per_class.png").stat().st_size > 10_000
