"""The notebooks run top to bottom in a real Jupyter kernel (nbclient) on tiny generated data,
and find what they say they find: each one ends by printing its key numbers as one line,
``RESULT {...json...}``, which these tests check.

The kernel starts in ``tmp_path`` with ``NB_DATA`` pointing at a tiny prepared dataset
(for 06, tiny generated nuclei prepared as an instance dataset; for 07, tiny generated street
scenes prepared as a panoptic one); the notebooks that train or serve keep their MLflow store
and Ray storage in a temporary directory of their own (under ``TMPDIR``, here ``tmp_path``).
"""

import json
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

from pipeline.config.params import PrepareParams
from pipeline.prepare import prepare
from pipeline.tasks.instance import INSTANCE_LOSS_TERMS, PANOPTIC_LOSS_TERMS
from tests.factories import PANOPTIC_CLASSES, PANOPTIC_PALETTE, make_nuclei_dataset, make_street_folder

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "python3"
TESTED = ("01-data.ipynb", "02-upsampling.ipynb", "03-losses-and-metrics.ipynb",
          "04-train-and-compare.ipynb", "05-serve-and-query.ipynb", "06-instance.ipynb", "07-panoptic.ipynb")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel name that runs this interpreter, where ``pipeline`` is installed.

    The venv's own ``python3`` spec (from ipykernel) starts ``python``, which jupyter_client
    replaces with ``sys.executable``; any other spec of that name (a user-wide one for some
    other Python, say) is shadowed by one written to a temporary JUPYTER_PATH.
    """
    try:
        argv = KernelSpecManager().get_kernel_spec(KERNEL).argv
    except NoSuchKernel:
        argv = []
    if argv and argv[0] in ("python", f"python{sys.version_info[0]}", sys.executable):
        yield KERNEL
        return
    folder = tmp_path_factory.mktemp("jupyter")
    spec = folder / "kernels" / KERNEL / "kernel.json"
    spec.parent.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.write_text(json.dumps({"argv": argv, "display_name": "Python 3 (tests)", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(folder))
        yield KERNEL


@pytest.fixture
def nb_env(tmp_path, monkeypatch, coded):
    """What the kernel inherits: the tiny dataset, temporary files under tmp_path."""
    # Ray's sockets live under its temp dir and must stay short: keep Ray's in the usual place.
    monkeypatch.setenv("RAY_TMPDIR", tempfile.gettempdir())
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("NB_DATA", str(coded))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    """16 generated 64x80 images of bright discs in the DSB 2018 layout, prepared as an instance dataset."""
    root = tmp_path_factory.mktemp("nuclei")
    make_nuclei_dataset(root / "raw", n=16)
    cfg = PrepareParams.defaults(task="instance", workers=1, val_fraction=0.2, test_fraction=0.25)
    prepare("dsb2018", root / "raw", root / "prepared", cfg)
    return root / "prepared"


@pytest.fixture(scope="module")
def streets(tmp_path_factory):
    """16 generated 64x80 street scenes (train 8, val 4, test 4): sky and road are stuff, 1 to 3
    separate cars things; a semantic folder dataset prepared as a panoptic one."""
    root = tmp_path_factory.mktemp("streets")
    make_street_folder(root / "raw")
    cfg = PrepareParams.defaults(task="panoptic", classes=list(PANOPTIC_CLASSES), thing_classes=["car"],
                                 palette=[list(c) for c in PANOPTIC_PALETTE], workers=1)
    prepare("folder", root / "raw", root / "prepared", cfg)
    return root / "prepared"


def run_notebook(name: str, kernel: str, cwd: Path, timeout: int) -> dict:
    """Execute notebooks/``name`` in ``cwd`` (each cell within ``timeout`` s); its RESULT line."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, kernel_name=kernel, timeout=timeout,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    lines = [line for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
             if out.output_type == "stream" and out.name == "stdout" for line in out.text.splitlines()]
    results = [json.loads(line.removeprefix("RESULT ")) for line in lines if line.startswith("RESULT ")]
    assert len(results) == 1, f"{name} printed {len(results)} RESULT lines"
    return results[0]


@pytest.mark.timeout(180)
def test_data_notebook_counts_the_tiny_datasets_images(kernel, nb_env, coded):
    result = run_notebook("01-data.ipynb", kernel, nb_env, 120)
    card = json.loads((coded / "card.json").read_text())
    assert result["images"] == {split: s["images"] for split, s in card["splits"].items()}
    assert sum(result["images"].values()) == 20
    assert result["classes"] == ["background", "road", "car"]
    assert result["recount_matches"] is True
    assert result["samples_shown"] == 3


@pytest.mark.timeout(420)
def test_upsampling_notebook_checks_the_transposed_convolution_identity(kernel, nb_env):
    result = run_notebook("02-upsampling.ipynb", kernel, nb_env, 300)
    assert result["transpose_identity"] == {"stride_1": True, "stride_2": True}
    assert result["shapes"]["input"] == [4, 4]
    assert {tuple(s) for name, s in result["shapes"].items() if name != "input"} == {(8, 8)}
    assert result["bilinear_kernel_matches_bilinear"] and result["unpool_restores_maxima"]
    assert result["checkerboard_values"] == [1.0, 2.0, 4.0]      # uneven overlap: the checkerboard
    assert result["resize_conv_values"] == [9.0]                  # even
    assert result["stacked_variation"]["resize_conv"] == 0 < result["stacked_variation"]["transposed"]
    # The two seed-family U-Net decoders it trains briefly both learn the toy scene.
    assert set(result["decoders"]) == {"transposed", "resize_conv"}
    for decoder in result["decoders"].values():
        assert decoder["last_loss"] < 0.5 * decoder["first_loss"] and 0.3 < decoder["miou"] <= 1


@pytest.mark.timeout(180)
def test_losses_notebook_reproduces_the_class_imbalance_example(kernel, nb_env):
    result = run_notebook("03-losses-and-metrics.ipynb", kernel, nb_env, 120)
    assert result["pixel_accuracy"] == pytest.approx(0.95)
    assert result["iou"] == pytest.approx([0.95, 0.0])
    assert result["miou"] == pytest.approx(0.475)
    assert result["dice"] == pytest.approx([190 / 195, 0.0])          # 97.4 % and 0 %
    assert result["mean_dice"] == pytest.approx(95 / 195)              # 48.7 %
    big, small = result["losses_at_256"], result["losses_at_1"]
    assert small["ce"] < big["ce"] / 4 and small["focal"] < big["focal"] / 2     # pixel averages forget it
    assert small["dice"] > 0.9 * big["dice"] and small["lovasz"] > 0.8 * big["lovasz"]  # per class: not


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_notebook_compares_two_tracked_runs(kernel, nb_env, coded):
    result = run_notebook("04-train-and-compare.ipynb", kernel, nb_env, 480)
    runs = result["runs"]
    assert set(runs) == {"ce", "wce+dice"} and len(set(runs.values())) == 2
    assert set(result["status"].values()) == {"FINISHED"}
    assert result["differing_params"] == ["loss.class_weights", "loss.terms"]   # only the loss differs
    assert result["task"] == "semantic"                 # asked of the prepared data's card
    for name in runs:
        iou = result["iou"][name]
        assert set(iou) == set(result["classes"]) == {"background", "road", "car"}
        assert all(v != v or 0 <= v <= 1 for v in iou.values())    # NaN or in [0, 1]
        assert result["epochs"][name] == [0]
        # One score through three paths: the stage's summary, MLflow's metric, and the mean of the
        # per-class IoU history at the exported epoch (a NaN class is left out of the mean).
        present = [v for v in iou.values() if v == v]
        assert present and result["best_val_miou"][name] == pytest.approx(sum(present) / len(present))
        assert result["mlflow_best_val_miou"][name] == pytest.approx(result["best_val_miou"][name])
    assert not list(nb_env.glob("nb04-*")), "the notebook's temporary directory was left behind"


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_serve_notebook_answers_with_the_images_size(kernel, nb_env):
    result = run_notebook("05-serve-and-query.ipynb", kernel, nb_env, 360)
    h, w = result["image_size"]
    assert (h, w) == (48, 64)
    assert result["overlay_size"] == result["png_size"] == result["json_size"] == [h, w]
    assert result["json_pixels"] == h * w
    assert result["model_uri"] == "models:/notebook-unet/1"
    assert result["agreement"] > 0.99 and result["rle_matches"]
    assert result["val_miou"] > 0.5          # a few dozen steps learn the colour-coded classes


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_instance_notebook_stores_trains_and_serves_the_same_instances(kernel, nb_env, nuclei, monkeypatch):
    monkeypatch.setenv("NB_DATA", str(nuclei))
    monkeypatch.delenv("SEG_WEIGHTS_DIR", raising=False)      # random backbone: the same run on every machine
    result = run_notebook("06-instance.ipynb", kernel, nb_env, 360)
    assert (result["dataset"], result["task"], result["classes"]) == ("dsb2018", "instance", ["nucleus"])
    h, w = result["image_size"]
    assert (h, w) == (64, 80) and result["instances"] >= 2
    # Part 1: RLE decodes to the mask and encodes back to the same counts; it is column-major,
    # far smaller than dense masks; a polygon through the boundary pixels' centres loses a ring.
    assert result["rle_roundtrip"] and result["column_major"]
    assert result["rle_bytes"]["compressed"] * 20 < result["rle_bytes"]["dense"]
    assert 0.5 < result["polygon_iou"] < 0.95
    # Part 2: the heads' shapes at model.image_scale 2, and Mask R-CNN's five losses.
    shapes = result["shapes"]
    assert shapes["inside the model (image_scale)"] == [1, 3, 2 * h, 2 * w]
    assert shapes["FPN map 0"] == [1, 256, 2 * h // 8, 2 * w // 8]
    proposals = shapes["proposals"][0]
    assert shapes["box RoIAlign"] == [proposals, 256, 7, 7] and shapes["class logits"] == [proposals, 2]
    detections = shapes["detections: boxes"][0]
    assert shapes["mask logits"] == [detections, 2, 28, 28]
    assert shapes["masks pasted at image size"] == [detections, 1, h, w]
    assert result["loss_keys"] == sorted(INSTANCE_LOSS_TERMS.values())
    # Part 3: the loss falls; the task's metric scores the validation images.
    losses = result["train_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result["val_images"] == 2
    assert all(0 <= v <= 1 for v in result["val"].values())
    # Part 4: the server answers what the model answers in process, in all three forms.
    assert result["served_count"] == result["local_count"] > 0
    assert result["mask_agreement"] > 0.95
    assert result["overlay_size"] == result["png_size"] == result["query_size"] == [h, w]
    assert result["png_mode"] == "L" and result["png_text_count"] == result["served_count"]
    assert 0 < result["png_max_id"] <= result["served_count"] and result["png_within_masks"]
    assert not list(nb_env.glob("nb06-*")), "the notebook's temporary directory was left behind"


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_panoptic_notebook_scores_pq_by_hand_and_fuses_as_the_predictor_does(kernel, nb_env, streets,
                                                                              monkeypatch):
    monkeypatch.setenv("NB_DATA", str(streets))
    monkeypatch.delenv("SEG_WEIGHTS_DIR", raising=False)      # random backbone: the same run on every machine
    result = run_notebook("07-panoptic.ipynb", kernel, nb_env, 360)
    assert (result["dataset"], result["task"]) == ("folder", "panoptic")
    assert result["classes"] == list(PANOPTIC_CLASSES) and result["isthing"] == [False, False, True]
    assert result["image_size"] == [64, 80]
    assert result["truth_segments"] >= 3                     # sky, road and at least one car
    # Part 1, the hand-made example: A' matches A at 70/130, B' misses B at 100/210 (both an FP and
    # an FN), C' is an FP, E' lies two thirds on void (no FP), D is missed.
    hand, metric = result["hand"], result["metric"]
    ious = {(p["predicted"], p["true"]): (p["IoU"], p["match"]) for p in hand["pairs"]}
    assert ious[("A'", "A")] == (pytest.approx(70 / 130), True)
    assert ious[("B'", "B")] == (pytest.approx(100 / 210), False)
    for name, counts in {"road": (1, 0, 0), "car": (1, 2, 2)}.items():
        by_hand = hand["per_class"][name]
        assert (by_hand["TP"], by_hand["FP"], by_hand["FN"]) == counts
        assert tuple(metric["per_class"][name][k] for k in ("tp", "fp", "fn")) == counts
        assert by_hand["PQ"] == pytest.approx(by_hand["SQ"] * by_hand["RQ"], abs=1e-12)
        # torchmetrics, under the metric, divides in single precision: agreement to about 1e-8.
        assert metric["per_class"][name]["pq"] == pytest.approx(by_hand["PQ"], abs=1e-6)
    assert hand["per_class"]["car"]["PQ"] == pytest.approx(7 / 13 / 3, abs=1e-12)
    assert metric["image_pq"] == pytest.approx(hand["pq"], abs=1e-6)
    for key in ("pq", "sq", "rq"):
        assert metric[key] == pytest.approx(hand[key], abs=1e-6)
    assert abs(hand["pq"] - hand["sq"] * hand["rq"]) > 0.01      # a mean of products, not a product of means
    # Two nearly touching cars merged into one segment: mIoU hardly moves, PQ drops by a third.
    apart, merged = result["merge"]["apart"], result["merge"]["merged"]
    assert apart["mIoU"] == apart["PQ"] == 1.0
    assert 0 < 1 - merged["mIoU"] < 0.05 and 1 - merged["PQ"] > 0.3
    assert merged["PQ car"] == pytest.approx(192 / 360 / 1.5, abs=1e-6)
    # Parts 2 and 3: Panoptic FPN's six losses, and the loss falls.
    assert result["loss_keys"] == sorted(PANOPTIC_LOSS_TERMS.values())
    losses = result["train_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result["loss_on_batch"]["after"] < result["loss_on_batch"]["before"]
    # Part 4: fusion by hand agrees with fuse, fuse with the predictor (evaluate's and serving's),
    # and the ablation's default row with the engine's validation.
    assert result["kept_same_as_table"] and result["fused_equals_predictor"]
    assert result["kept_instances"] > 0           # the trained model scores some things above 0.5
    assert result["predictor_settings"] == {"mask_threshold": 0.5, "min_score": 0.5, "overlap_threshold": 0.5,
                                            "stuff_min_area": 256}
    assert result["val_images"] == 4 and result["fused_segments"] >= 1
    ablation = result["ablation"]
    assert len(ablation) == 7
    for row in ablation.values():
        assert all(0 <= row[k] <= 1 for k in ("pq", "pq_things", "pq_stuff", "sq", "rq", "miou"))
    assert ablation["default"]["pq"] == pytest.approx(result["engine_pq"], abs=1e-12)
    # stuff_min_area leaves the things alone; COCO's 4,096 pixels are most of a 64x80 image: no
    # stuff segment is left.
    by_area = [ablation[k] for k in ("stuff_min_area 0", "default", "stuff_min_area 4096 (COCO's)")]
    assert by_area[0]["segments"] >= by_area[1]["segments"] > by_area[2]["segments"]
    assert by_area[0]["pq_things"] == by_area[1]["pq_things"] == by_area[2]["pq_things"]
    assert by_area[2]["pq_stuff"] == 0
    assert not list(nb_env.glob("nb07-*")), "the notebook's temporary directory was left behind"


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(TESTED)


@pytest.mark.parametrize("name", TESTED)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{name}: cells {dirty} have outputs or execution counts; "
                       "run `python notebooks/strip_outputs.py notebooks/*.ipynb` before committing")
