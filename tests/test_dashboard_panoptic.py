"""The dashboard for a panoptic champion (issue 18): a tiny Panoptic FPN trained on Ray Train on
generated street scenes (sky and road stuff, cars things; prepared from a semantic folder),
evaluated and registered, then every page it names (AppTest) and its PQ page and panels in a
real browser. The pages are compared with the files the run wrote, whatever a one-epoch model
scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from pipeline.config import paths
from pipeline.config.params import PrepareParams
from pipeline.prepare import prepare
from tests.factories import PANOPTIC_CLASSES, make_street_folder
from tests.test_dashboard import CHROMIUM, chart, page
from tests.test_dashboard_instance import (
    browse_task_pages,
    champion_served,
    champion_workspace,
    check_both_records,
    check_panels,
    open_app,
    same,
    score_text,
)
from tests.test_panoptic_pipeline import RECIPE, TINY

NAME = "dash-streets"
THINGS = {"car"}


def recipe() -> dict:
    """The panoptic pipeline test's tiny recipe, one epoch on one Ray worker."""
    return TINY | {"train": TINY["train"] | {"epochs": 1, "num_workers": 1, "cpus_per_worker": 1},
                   "evaluate": {"overlays": {"samples": 2, "worst_per_class": 2}},
                   "register": {"model_name": NAME}}


@pytest.fixture(scope="module")
def panoptic_workspace(tmp_path_factory):
    """A panoptic champion's workspace from generated street scenes prepared as the pipeline
    prepares a semantic folder with thing classes; its second record evaluated with another
    pixel limit (another evaluation key: panoptic models predict whole images, never tiles)."""
    data = tmp_path_factory.mktemp("streets")
    make_street_folder(data / "raw")
    prepare("folder", data / "raw", data / "prepared", PrepareParams.defaults(
        task="panoptic", classes=list(PANOPTIC_CLASSES), thing_classes=sorted(THINGS), workers=1))
    return champion_workspace(tmp_path_factory.mktemp("panoptic-workspace"), data / "prepared", RECIPE,
                              recipe(), {"tile_above_pixels": 100_000,
                                         "overlays": {"samples": 1, "worst_per_class": 3}})


@pytest.fixture
def app(panoptic_workspace, monkeypatch, tmp_path):
    return open_app(panoptic_workspace["root"], monkeypatch, tmp_path)


def cards(report: dict, primary: str) -> dict[str, str]:
    """The headline score cards of a panoptic report, the PQ card labelled ``primary``."""
    labels = {"pq": primary, "pq_things": "PQ things", "pq_stuff": "PQ stuff", "sq": "SQ", "rq": "RQ",
              "miou": "semantic-view mIoU"}
    return {label: score_text(report[key]) for key, label in labels.items()}


def read_index(workspace: dict) -> dict:
    return json.loads((workspace["root"] / paths.EVAL_OUT / "index.json").read_text())


def test_the_panoptic_pages_are_the_tasks(app):
    pages = {Path(str(p["script_path"])).name: p.get("page_name") for p in app._registered_pages.values()}
    assert list(pages) == ["overview.py", "pq_table.py", "overlays.py", "runs.py", "try_it.py"]
    assert pages["pq_table.py"] == "Panoptic quality" and pages["overlays.py"] == "Overlays"
    for other in ("confusion", "per_class", "ap_table"):
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            app.switch_page(f"app_pages/{other}.py")


def test_overview_shows_the_panoptic_headline(app, panoptic_workspace):
    full = panoptic_workspace["full"]
    assert {m.label: m.value for m in app.metric} == cards(full, "test PQ")
    assert "task `panoptic`" in " ".join(c.value for c in app.caption)
    assert "whole images up to" in " ".join(c.value for c in app.caption)
    counts = chart(app, "class-frequency")
    assert "Segments per class" in counts["layout"]["title"]["text"]
    card = json.loads((panoptic_workspace["root"] / paths.PREPARED_DIR / paths.CARD_JSON).read_text())
    segments = card["statistics"]["train"]["segments"]
    assert dict(zip(counts["data"][0]["y"], counts["data"][0]["x"], strict=True)) == segments


def check_pq_page(at: AppTest, report: dict) -> None:
    assert {m.label: m.value for m in at.metric} == cards(report, "PQ")
    groups = at.dataframe[0].value.set_index("classes")         # PQ / SQ / RQ, then per class
    assert list(groups.index) == ["all classes", "things", "stuff"]
    for group, suffix in (("all classes", ""), ("things", "_things"), ("stuff", "_stuff")):
        for key in ("pq", "sq", "rq"):
            assert same(groups.loc[group, key.upper()], report[f"{key}{suffix}"]), (group, key)
    classes = at.dataframe[1].value.set_index("class")
    assert list(classes.index) == list(PANOPTIC_CLASSES)
    for name, scores in report["per_class"].items():
        assert classes.loc[name, "kind"] == ("thing" if name in THINGS else "stuff")
        for key in ("pq", "sq", "rq", "iou"):
            assert same(classes.loc[name, "IoU" if key == "iou" else key.upper()], scores[key]), (name, key)
        assert [classes.loc[name, k] for k in ("TP", "FP", "FN")] == [scores[k] for k in ("tp", "fp", "fn")]
    bars = chart(at, "pq-bars")["data"][0]
    assert {y: x for x, y in zip(bars["x"], bars["y"], strict=True)} == pytest.approx(
        {name: s["pq"] for name, s in report["per_class"].items()}, nan_ok=True)
    counts = report["segments"]
    assert (f"{counts['truth']} true segments" in " ".join(c.value for c in at.caption)
            and f"{counts['tp']} matched" in " ".join(c.value for c in at.caption))


def test_pq_page_shows_the_records_figures(app, panoptic_workspace):
    check_both_records(app, panoptic_workspace, "pq_table", "pq-run", "PQ", check_pq_page)


def test_a_panoptic_evaluations_settings_name_no_tiles():
    """Panoptic prediction refuses an image above ``tile_above_pixels`` rather than tiling it."""
    from dashboards import data
    from pipeline.tasks import get_task

    settings = {"flip_tta": False, "scales": [1.0], "tile_above_pixels": 1048576, "tile_size": [512, 512]}
    assert data.settings_label(settings, get_task("panoptic")) == "no flip, whole images up to 1.05 Mpx"
    assert data.settings_label(settings, get_task("semantic")) == "no flip, tiles 512x512"


def test_pq_figures_from_a_report():
    """The tables read the report's own keys (distinct values: nothing swapped)."""
    from dashboards import data

    report = {"pq": 0.1, "sq": 0.2, "rq": 0.3, "pq_things": 0.4, "sq_things": 0.5, "rq_things": 0.6,
              "pq_stuff": None, "sq_stuff": None, "rq_stuff": None,
              "per_class": {             # sorted by name, as a JSON file read back may be
                  "car": {"pq": None, "sq": None, "rq": None, "iou": None, "tp": 0, "fp": 0, "fn": 0},
                  "sky": {"pq": 0.7, "sq": 0.8, "rq": 0.9, "iou": 0.65, "tp": 1, "fp": 2, "fn": 3}}}
    table = data.pq_table(report).set_index("classes")
    assert table.loc["all classes"].tolist() == [0.1, 0.2, 0.3]
    assert table.loc["things"].tolist() == [0.4, 0.5, 0.6] and table.loc["stuff"].isna().all()
    classes = [{"name": "sky", "color": [0, 0, 255], "isthing": False},
               {"name": "car", "color": [255, 0, 0], "isthing": True}]
    rows = data.class_pq_table(report, classes).set_index("class")
    assert list(rows.index) == ["sky", "car"]                    # class index order
    assert rows.loc["sky"].tolist() == ["stuff", 0.7, 0.8, 0.9, 0.65, 1, 2, 3, "#0000ff"]
    assert rows.loc["car", "kind"] == "thing" and rows.loc["car", ["PQ", "SQ", "RQ", "IoU"]].isna().all()


def test_the_panoptic_views_are_dashboard_pages():
    from dashboards import data
    from pipeline.tasks import get_task

    assert [(file, title) for file, title, _ in data.view_pages(get_task("panoptic"))] == [
        ("app_pages/pq_table.py", "Panoptic quality"), ("app_pages/overlays.py", "Overlays")]


def test_panel_scores_follow_the_index():
    from dashboards import data

    assert data.panel_scores([{"id": "a", "pq": None, "truth": 3}]).counted == "segments"
    instance = data.panel_scores([{"id": "a", "dsb_score": 0.5, "mask_ap50": None}])
    assert (instance.label, instance.others) == ("DSB score", (("mask_ap50", "mask AP50"),))


def test_overlays_show_panoptic_panels_and_the_worst_images(app, panoptic_workspace):
    check_panels(app, panoptic_workspace, "pq", "PQ", "PQ", "segments")
    assert list(app.dataframe[0].value.columns) == ["image", "PQ", "true", "predicted"]


def test_runs_table_names_the_panoptic_scores(app, panoptic_workspace):
    page(app, "runs")
    table = app.dataframe[0].value
    assert len(table) == 1
    best = panoptic_workspace["summary"]["best_val_pq"]
    assert table["metrics.best_val_pq"].tolist() == pytest.approx([best])
    assert table["registered test PQ"].tolist() == pytest.approx([panoptic_workspace["full"]["pq"]])
    assert "registered test mIoU" not in table and list(table["evaluations"]) == [2]


def test_try_it_segments_a_test_image_with_the_panoptic_champion(app, panoptic_workspace):
    """The champion served: a test image from the workspace's prepared split; the overlay and
    the segments table of format=json come back."""
    with champion_served(panoptic_workspace, NAME) as url:
        page(app, "try_it")
        app.text_input(key="serve-url").set_value(url).run()
        assert not app.warning and f"version {panoptic_workspace['version']}" in app.caption[0].value
        app.radio(key="source").set_value("a test image").run()
        ids = [e["id"] for e in read_index(panoptic_workspace)["images"]]
        assert app.selectbox(key="test-image").options == ids
        app.button(key="segment").click().run()
        assert not app.exception and not app.error, [e.message for e in app.exception]
        assert len(app.get("image")) == 1                                 # the overlay
        table = app.dataframe[0].value
        assert list(table.columns) == ["id", "class", "kind", "score", "area (px)", "box"]
        assert set(table["class"]) <= set(PANOPTIC_CLASSES)
        kinds = zip(table["class"], table["kind"], strict=True)
        assert all((kind == "thing") == (cls in THINGS) for cls, kind in kinds)
        things = int((table["kind"] == "thing").sum())
        assert f"{len(table)} segments: {things} things" in " ".join(c.value for c in app.caption)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (apt-get install chromium)")
def test_panoptic_pages_in_a_real_browser(panoptic_workspace, tmp_path):
    browse_task_pages(panoptic_workspace, tmp_path, "pq_table", ".js-plotly-plot .bars",    # per-class PQ
                      "Panoptic quality", ("Average precision", "Confusion", "Per-class"),
                      score_text(panoptic_workspace["full"]["pq"]), "PQ things")
