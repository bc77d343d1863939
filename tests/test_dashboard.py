"""The Streamlit dashboard, page by page (AppTest), against a real MLflow store with two
evaluated and registered runs and the evaluate stage's outputs, all built here."""

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml
from streamlit.testing.v1 import AppTest

from pipeline import paths
from pipeline.evaluate import evaluate
from pipeline.params import ServeParams
from pipeline.register import register
from pipeline.service import ModelRef, Service
from tests.factories import constant_model, free_port, tracked_model

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboards" / "app.py")
NAME = "dash-unet"


def evaluated(root: Path, folder: Path, model, cfg, data: Path, curve: list[float]) -> dict:
    """Train stand-in (a tracked model with a validation curve), evaluate, register."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    run_id = tracked_model(folder / "model", model, cfg)
    client = MlflowClient(tracking.tracking_uri())
    client.log_param(run_id, "train.seed", "0")
    for step, value in enumerate(curve):
        client.log_metric(run_id, "val_miou", value, step=step)
        client.log_metric(run_id, "train_loss", 1.0 - value, step=step)
    metrics = evaluate(folder / "model", data, folder / paths.EVAL_OUT, folder / paths.EVAL_METRICS,
                       folder / paths.PLOTS_DIR, root / "params.yaml")
    register(folder / "model", folder / paths.EVAL_METRICS, data, folder / "registry.json",
             root / "params.yaml")
    return metrics | {"run_id": run_id}


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
        (root / "params.yaml").write_text(yaml.safe_dump({
            "evaluate": {"flip_tta": False, "overlays": {"samples": 2, "worst_per_class": 1}},
            "register": {"model_name": NAME, "onnx": False, "min_improvement": 0.01}}))
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
    at.switch_page(f"pages/{name}.py")
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
    picker = app.selectbox(key="per-class-run")
    assert picker.value == good["run_id"]
    # Labels: the champion first, each with its version and test mIoU.
    assert len(picker.options) == 2
    assert "v2 @champion" in picker.options[0] and f"{good['miou']:.3f}" in picker.options[0]
    assert "v1" in picker.options[1] and f"{bad['miou']:.3f}" in picker.options[1]
    picker.select(bad["run_id"]).run()          # read from the run's MLflow artifacts
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
    assert sorted(table["metrics.test_miou"]) == pytest.approx(sorted([workspace["bad"]["miou"],
                                                                       workspace["good"]["miou"]]))
    iou = chart(app, "compare-iou")
    assert len(iou["data"]) == 2                     # one bar series per run
    curves = chart(app, "compare-curves")
    assert {t["name"] for t in curves["data"]} == set(table["label"])
    assert "#/experiments/" in app.markdown[-1].value


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
                              ServeParams(threads=1, scales=None))
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
    finally:
        server.shutdown()


CHROMIUM = Path("/usr/bin/chromium")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (apt-get install chromium)")
def test_in_a_real_browser(workspace, tmp_path):
    """`streamlit run` on a loopback port, driven by Playwright on Debian's chromium."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace['root'] / 'mlflow.db'}",
           "DVC_ROOT": str(workspace["root"]), "TMPDIR": str(tmp_path), "SEG_SERVE_URL": "http://127.0.0.1:9"}
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.address",
           "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    log = tmp_path / "streamlit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workspace["root"])
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

            def visit(path: str, selector: str) -> None:
                tab.goto(f"{url}/{path}")
                tab.wait_for_selector(selector, timeout=60_000)
                tab.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=60_000)
                assert tab.locator('[data-testid="stException"]').count() == 0, f"exception on /{path}"

            visit("per_class", ".js-plotly-plot .bars")                  # the IoU bar chart
            # Switch the run: the older, non-champion one, read from MLflow artifacts.
            tab.locator('[data-testid="stSelectbox"]').first.click()
            tab.get_by_role("option").nth(1).click()
            expect(tab.locator('[data-testid="stMetricValue"]').first).to_contain_text(
                f"{workspace['bad']['miou']:.3f}", timeout=60_000)
            tab.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=60_000)
            tab.wait_for_selector(".js-plotly-plot .bars", timeout=60_000)
            tab.screenshot(path=str(tmp_path / "per_class.png"), full_page=True)
            visit("confusion", ".js-plotly-plot .heatmaplayer")          # the confusion matrix
            visit("overlays", '[data-testid="stImage"] img')             # an overlay image
            tab.screenshot(path=str(tmp_path / "overlays.png"), full_page=True)
            visit("", '[data-testid="stMetricValue"]')                   # the champion
            browser.close()
        assert (tmp_path / "per_class.png").stat().st_size > 10_000
    finally:
        proc.terminate()
        proc.wait(timeout=30)
