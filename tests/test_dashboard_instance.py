"""The dashboard for an instance champion (issue 17): a real tiny Mask R-CNN run on generated
nuclei (prepare -> train on Ray Train -> evaluate -> register), then the pages it names
(AppTest) and its AP page in a real browser. The workspace, server and page checks are shared
with the panoptic champion's (tests/test_dashboard_panoptic.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections.abc import Callable
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
from streamlit.testing.v1 import AppTest

from pipeline import train as train_stage
from pipeline.config import paths
from pipeline.config.params import ServeParams
from pipeline.evaluate import evaluate
from pipeline.register import register
from tests.factories import recipe_params
from tests.test_dashboard import APP, CHROMIUM, StandIn, chart, page, served_dashboard
from tests.test_instance_pipeline import TINY

NAME = "dash-nuclei"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def recipe() -> dict:
    """The pipeline test's tiny recipe, one epoch on one Ray worker, from the MobileNetV2 ImageNet
    weights when $SEG_WEIGHTS_DIR holds them (the pictures then show more than noise; the
    tests hold either way: they compare the pages with the files the run wrote)."""
    weights = os.environ.get(paths.ENV_WEIGHTS_DIR)
    pretrained = bool(weights) and (Path(weights) / MOBILENET_FILE).is_file()
    return TINY | {
        "model": TINY["model"] | {"encoder_weights": "imagenet" if pretrained else None},
        "train": TINY["train"] | {"epochs": 1, "num_workers": 1, "cpus_per_worker": 1},
        "register": {"model_name": NAME},
    }


def champion_workspace(root: Path, data: Path, recipe: str, sections: dict, other_evaluate: dict) -> dict:
    """A repository root as the pipeline leaves it for a champion: data/prepared (a copy of
    ``data``), mlflow.db, evaluation/ of the champion's record, and a second record of the same
    run (``other_evaluate``'s settings, another evaluation key) only in MLflow. The params are
    ``recipes/<recipe>.yaml`` with ``sections``' keys (``recipe_params``). Trained on Ray Train."""
    prepared = root / paths.PREPARED_DIR
    shutil.copytree(data, prepared)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("DVC_ROOT", str(root))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.chdir(root)
        params = recipe_params(recipe, root / "params.yaml", **sections)
        ray.shutdown()
        train_stage.init_ray()
        try:
            summary = train_stage.train(prepared, root / "model", root / "metrics.json", params,
                                        root / "ray_results", plots_dir=root / "plots")
        finally:
            ray.shutdown()
        full = evaluate(root / "model", prepared, root / paths.EVAL_OUT, root / paths.EVAL_METRICS,
                        root / paths.PLOTS_DIR, params)
        decision = register(root / "model", root / paths.EVAL_REPORT, prepared, root / "registry.json",
                            params)
        changed = recipe_params(recipe, root / "other.yaml", **sections | {"evaluate": other_evaluate})
        other = evaluate(root / "model", prepared, root / "other" / paths.EVAL_OUT,
                         root / "other" / paths.EVAL_METRICS, root / "other" / paths.PLOTS_DIR, changed)
    assert decision.promoted and other["eval_key"] != full["eval_key"]
    return {"root": root, "full": full, "other": other, "summary": summary, "version": decision.version}


@pytest.fixture(scope="module")
def instance_workspace(nuclei, tmp_path_factory):
    """An instance champion's workspace; its second record tiled."""
    return champion_workspace(tmp_path_factory.mktemp("instance-workspace"), nuclei, "dsb2018", recipe(), {
        "tile_above_pixels": 1024, "tile_size": [48, 48], "overlays": {"samples": 1, "worst_per_class": 2}})


def open_app(root: Path, monkeypatch, tmp_path: Path) -> AppTest:
    """The dashboard of workspace ``root`` (AppTest), its first page run; the model server unreachable."""
    from dashboards import ui

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("SEG_SERVE_URL", "http://127.0.0.1:9")       # nothing listens on the discard port
    monkeypatch.setenv("TMPDIR", str(tmp_path))                     # downloaded artifacts
    for cached in (ui.champion, ui.runs, ui.evaluations, ui.versions, ui.registered_scores):
        cached.clear()          # other test modules' stores share the process's caches
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def app(instance_workspace, monkeypatch, tmp_path):
    return open_app(instance_workspace["root"], monkeypatch, tmp_path)


@contextmanager
def champion_served(workspace: dict, name: str):
    """The workspace's champion served on a loopback port (the service's own request handling
    behind a plain HTTP server); yields its URL."""
    from pipeline.artifacts.model_dir import load_model
    from pipeline.serving.service import ModelRef, Service

    version = workspace["version"]
    StandIn.service = Service(load_model(workspace["root"] / "model"),
                              ModelRef(uri=f"models:/{name}/{version}", name=name, version=version),
                              ServeParams.defaults(threads=1))
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def same(value, expected) -> bool:
    """A table cell against a report figure (None in the report: an empty cell)."""
    if expected is None:
        return value is None or (isinstance(value, float) and math.isnan(value))
    return value == pytest.approx(expected, abs=1e-9)


def test_the_instance_pages_are_the_tasks(app):
    # AppTest keeps st.navigation's pages (script path, title) where switch_page looks them up.
    pages = {Path(str(p["script_path"])).name: p.get("page_name") for p in app._registered_pages.values()}
    assert list(pages) == ["overview.py", "ap_table.py", "overlays.py", "runs.py", "try_it.py"]
    assert pages["ap_table.py"] == "Average precision" and pages["overlays.py"] == "Overlays"
    for semantic_only in ("confusion", "per_class"):
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            app.switch_page(f"app_pages/{semantic_only}.py")


def test_overview_shows_the_instance_headline(app, instance_workspace):
    full = instance_workspace["full"]
    cards = {m.label: m.value for m in app.metric}
    assert cards == {"test mask AP": f"{full['mask_ap']:.3f}", "mask AP50": f"{full['mask_ap50']:.3f}",
                     "mask AP75": f"{full['mask_ap75']:.3f}", "box AP": f"{full['box_ap']:.3f}",
                     "DSB score": f"{full['dsb_score']:.3f}"}
    best = instance_workspace["summary"]["best_val_mask_ap"]
    assert "task `instance`" in " ".join(c.value for c in app.caption)
    assert f"best validation mask AP {best:.3f}" in " ".join(c.value for c in app.caption)
    counts = chart(app, "class-frequency")
    assert counts["data"][0]["y"] == ["nucleus"]
    assert "Instances per class" in counts["layout"]["title"]["text"]
    card = json.loads((instance_workspace["root"] / paths.PREPARED_DIR / paths.CARD_JSON).read_text())
    assert counts["data"][0]["x"] == [card["statistics"]["train"]["instances"]["nucleus"]]


def check_ap_page(at: AppTest, report: dict) -> None:
    table = at.dataframe[0].value.set_index("AP")          # the AP table, then the per-class one
    from dashboards.data import AP_ROWS

    assert list(table.index) == list(AP_ROWS)
    for label, (mask, box) in AP_ROWS.items():
        assert same(table.loc[label, "mask"], report.get(mask)), label
        assert same(table.loc[label, "box"], report.get(box)), label
    classes = at.dataframe[1].value.set_index("class")
    for name, scores in report["per_class"].items():
        assert same(classes.loc[name, "mask AP"], scores["mask_ap"])
        assert same(classes.loc[name, "box AP"], scores["box_ap"])
    cards = {m.label: m.value for m in at.metric}
    assert cards["mask AP"] == f"{report['mask_ap']:.3f}"
    assert cards["DSB score"] == f"{report['dsb_score']:.3f}"
    curves = chart(at, "pr-curve")["data"]
    assert [c["name"] for c in curves] == ["IoU 0.50", "IoU 0.75", "IoU 0.50:0.95"]
    for trace, iou in zip(curves, ("0.50", "0.75", "0.50:0.95"), strict=True):
        assert trace["x"] == report["pr_curve"]["recall"] and len(trace["x"]) == 101
        assert trace["y"] == report["pr_curve"][iou]


def check_both_records(at: AppTest, workspace: dict, name: str, picker_key: str, label: str,
                       check: Callable[[AppTest, dict], None]) -> None:
    """Page ``name`` of a ``champion_workspace``: its picker offers both records, the champion's
    first (its version and its primary score, read as ``label``), and ``check(at, report)`` holds
    for the champion's record and then for the other one, read from the run's MLflow artifacts."""
    full, other = workspace["full"], workspace["other"]
    page(at, name)
    picker = at.selectbox(key=picker_key)
    assert picker.value == (full["mlflow_run_id"], full["eval_key"])
    assert len(picker.options) == 2 and f"v{workspace['version']} @champion" in picker.options[0]
    assert f"{label} {full[full['primary_metric']]:.3f}" in picker.options[0]
    check(at, full)
    picker.select((other["mlflow_run_id"], other["eval_key"])).run()
    assert not at.exception, [e.message for e in at.exception]
    check(at, other)


def test_ap_page_shows_the_records_figures(app, instance_workspace):
    check_both_records(app, instance_workspace, "ap_table", "ap-run", "mask AP", check_ap_page)


def test_ap_figures_from_a_report():
    """The tables and curves read the report's own keys (distinct values: nothing swapped)."""
    from dashboards import data

    report = {"mask_ap": 0.1, "mask_ap50": 0.2, "mask_ap75": 0.3, "mask_ap_small": 0.4,
              "mask_ap_medium": None, "mask_ap_large": 0.6, "box_ap": 0.7, "box_ap50": 0.8, "box_ap75": 0.9,
              "per_class": {"a": {"mask_ap": 0.11, "box_ap": 0.12}, "b": {"mask_ap": None, "box_ap": None}},
              "pr_curve": {"recall": [0.0, 0.5, 1.0], "0.50": [1.0, 0.5, 0.0], "0.75": [0.9, 0.4, 0.0],
                           "0.50:0.95": [0.8, 0.3, 0.0]}}
    table = data.ap_table(report).set_index("AP")
    assert table["mask"].tolist()[:4] == [0.1, 0.2, 0.3, 0.4] and table["mask"].iloc[5] == 0.6
    assert table["box"].tolist()[:3] == [0.7, 0.8, 0.9] and table["box"].iloc[3:].isna().all()
    classes = data.class_ap_table(report, {"a": [255, 0, 0]}).set_index("class")
    assert classes.loc["a", "mask AP"] == 0.11 and classes.loc["a", "box AP"] == 0.12
    assert classes.loc["a", "colour"] == "#ff0000" and classes["mask AP"].isna().sum() == 1
    curves = data.pr_curves(report)
    assert curves.groupby("IoU", sort=False)["precision"].apply(list).to_dict() == {
        "0.50": [1.0, 0.5, 0.0], "0.75": [0.9, 0.4, 0.0], "0.50:0.95": [0.8, 0.3, 0.0]}


def score_text(value: float | None) -> str:
    """A score as the pages write it."""
    return "—" if value is None else f"{value:.3f}"


def check_panels(at: AppTest, workspace: dict, key: str, label: str, short: str, counted: str) -> None:
    """The overlays page of a ``champion_workspace`` whose evaluations drew panels, each image
    scored by its index entry's ``key`` (read as ``label``, ``short`` in the picker) with its
    true and predicted ``counted``: the samples, then the worst images, then the other record's
    panels (read from MLflow)."""
    index = json.loads((workspace["root"] / paths.EVAL_OUT / "index.json").read_text())
    entries = {e["id"]: e for e in index["images"]}
    page(at, "overlays")
    assert at.selectbox(key="image-id").options == [f"{i} · {short} {score_text(entries[i][key])}"
                                                     for i in index["samples"]]
    assert len(at.get("image")) == 1
    first = entries[index["samples"][0]]
    shown = " ".join(c.value for c in at.caption)
    assert f"{label} **{score_text(first[key])}**" in shown
    assert f"{first['truth']} true {counted}, {first['predicted']} predicted" in shown
    table = at.dataframe[0].value
    assert list(table["image"]) == index["samples"]
    assert all(same(v, entries[i][key]) for i, v in zip(table["image"], table[label], strict=True))
    assert list(table["predicted"]) == [entries[i]["predicted"] for i in index["samples"]]
    at.radio(key="browse").set_value(f"worst by {label}").run()
    assert not at.exception
    assert list(at.dataframe[0].value["image"]) == index["worst"]
    assert at.selectbox(key="image-id").value == index["worst"][0]
    other = workspace["other"]
    at.selectbox(key="overlays-run").select((other["mlflow_run_id"], other["eval_key"])).run()
    assert not at.exception, [e.message for e in at.exception]
    assert len(at.get("image")) == 1


def test_overlays_show_instance_panels_and_the_worst_images(app, instance_workspace):
    check_panels(app, instance_workspace, "dsb_score", "DSB score", "DSB", "instances")


def test_runs_table_names_the_instance_scores(app, instance_workspace):
    page(app, "runs")
    table = app.dataframe[0].value
    assert len(table) == 1
    assert table["metrics.best_val_mask_ap"].tolist() == pytest.approx(
        [instance_workspace["summary"]["best_val_mask_ap"]])
    assert table["registered test mask AP"].tolist() == pytest.approx([instance_workspace["full"]["mask_ap"]])
    assert "registered test mIoU" not in table and list(table["evaluations"]) == [2]


def test_try_it_segments_a_test_image_with_the_instance_champion(app, instance_workspace):
    """The champion served (the service's own request handling): a test image from the
    workspace's prepared split; the overlay picture and the instance table come back."""
    with champion_served(instance_workspace, NAME) as url:
        page(app, "try_it")
        app.text_input(key="serve-url").set_value(url).run()
        app.slider(key="option-score_threshold").set_value(0.0)
        app.radio(key="source").set_value("a test image").run()
        index = json.loads((instance_workspace["root"] / paths.EVAL_OUT / "index.json").read_text())
        assert app.selectbox(key="test-image").options == [e["id"] for e in index["images"]]
        app.button(key="segment").click().run()
        assert not app.exception and not app.error, [e.message for e in app.exception]
        pictures = app.get("image")
        assert len(pictures) == 1                                         # the overlay
        table = app.dataframe[0].value
        assert list(table.columns) == ["#", "class", "score", "area (px)", "box"] and len(table) > 0
        assert set(table["class"]) == {"nucleus"}


def browse_task_pages(workspace: dict, tmp_path: Path, name: str, ready: str, title: str,
                      absent: tuple[str, ...], headline: str, champion_text: str,
                      check: Callable = lambda tab: None) -> None:
    """In a real browser: the task's page ``name`` (once ``ready`` shows; ``check(tab)``) titled
    ``title`` in the navigation, which lists none of ``absent`` (app.py's st.navigation, never a
    folder's list), its first score card ``headline`` and two tables; then a panel of the
    overlays page and the champion's page showing ``champion_text``. Screenshots in tmp_path."""
    from playwright.sync_api import expect

    with served_dashboard(workspace["root"], tmp_path) as visit:
        tab = visit(name, ready)
        check(tab)
        nav = tab.locator('[data-testid="stSidebarNav"]')
        expect(nav).to_contain_text(title, timeout=60_000)
        for other in absent:
            expect(nav).not_to_contain_text(other)
        expect(tab.locator('[data-testid="stMetricValue"]').first).to_contain_text(headline)
        assert tab.locator('[data-testid="stDataFrame"]').count() == 2       # the scores and per-class tables
        tab.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
        visit("overlays", '[data-testid="stImage"] img')                    # a panel
        tab.screenshot(path=str(tmp_path / "overlays.png"), full_page=True)
        visit("", '[data-testid="stMetricValue"]')                          # the champion
        expect(tab.get_by_text(champion_text).first).to_be_visible()
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (apt-get install chromium)")
def test_instance_ap_page_in_a_real_browser(instance_workspace, tmp_path):
    def three_curves(tab):          # the PR curves (a curve at 0 is flat)
        assert tab.locator(".js-plotly-plot .scatterlayer .trace").count() == 3

    browse_task_pages(instance_workspace, tmp_path, "ap_table", ".js-plotly-plot .legend .traces",
                      "Average precision", ("Confusion", "Per-class"),
                      f"{instance_workspace['full']['mask_ap']:.3f}", "DSB score", three_curves)
