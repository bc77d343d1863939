"""Typed, validated views of ``params.yaml``: one pydantic model per stage section.

A stage loads only its own section, once, at the door::

    cfg = load_params(PrepareParams)

An unknown key, a missing key, a wrong type or an out-of-range value raises ``ParamsError``
whose message names the file, the dotted key, what was given and what is allowed.

``params.yaml`` is the only source of values: no field has a default in code, so deleting a
key is an error rather than a silent change of recipe. Code that needs a whole section
without a params file of its own (tests, notebooks, benchmarks) takes the repository's
``params.yaml`` with a few keys replaced: ``TrainParams.defaults(epochs=1)``, or
``default_params({"train": {"epochs": 1}})`` for a whole file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config.errors import format_errors
from pipeline.config.model_params import ModelParams, SmpModelParams  # noqa: F401 (the union's members)
from pipeline.config.paths import PARAMS_FILE, REPO_PARAMS_FILE
from pipeline.config.section import ParamsError, Section

SEMANTIC_DATASETS = ("camvid", "pet", "voc", "folder")
# Instance segmentation: a public source (dsb2018) and annotation-tool exports read from
# download.folder (pipeline.data.instance_formats).
INSTANCE_DATASETS = ("dsb2018", "coco", "labelme", "via", "yolo")
# Panoptic segmentation (prepare.task: panoptic): a COCO panoptic export and ADE20K's *_seg.png,
# read from download.folder (pipeline.data.panoptic_formats); a semantic dataset becomes
# panoptic too, its thing classes named by prepare.thing_classes.
PANOPTIC_DATASETS = ("coco_panoptic", "ade20k")
PANOPTIC_TASK = "panoptic"
DATASETS = SEMANTIC_DATASETS + INSTANCE_DATASETS + PANOPTIC_DATASETS
# read from download.folder
FOLDER_DATASETS = ("folder", "coco", "labelme", "via", "yolo", "coco_panoptic", "ade20k")


class DownloadParams(Section):
    section: ClassVar[str] = "download"

    dataset: Literal[DATASETS] = Field(..., description="which dataset to fetch")
    folder: str | None = Field(..., description="folder and the annotation exports: the user's directory")
    retries: int = Field(..., ge=0, le=20, description="extra attempts per file")
    timeout_s: float = Field(..., gt=0, le=3600, description="socket timeout")

    @model_validator(mode="after")
    def _folder_given_for_folder(self) -> DownloadParams:
        if self.dataset in FOLDER_DATASETS and not self.folder:
            raise ValueError(f"folder: dataset {self.dataset!r} needs a directory path here")
        if self.dataset not in FOLDER_DATASETS and self.folder:
            raise ValueError(f"folder: only used with dataset 'folder' or an annotation export "
                             f"({', '.join(FOLDER_DATASETS[1:])}), not {self.dataset!r}; set it to null")
        return self


class Resize(Section):
    """How images of one group of splits are resized at prepare time.

    ``none`` keeps native size; ``fixed`` resizes to ``size: [height, width]``;
    ``shorter_side`` / ``longer_side`` scale so that side equals ``size`` (an int),
    keeping the aspect ratio. Masks always use nearest-neighbour.
    """

    mode: Literal["none", "fixed", "shorter_side", "longer_side"] = Field(...)
    size: int | tuple[int, int] | None = Field(..., description="null for mode none")

    @model_validator(mode="after")
    def _size_matches_mode(self) -> Resize:
        if self.mode == "none":
            if self.size is not None:
                raise ValueError("size must be null when mode is 'none'")
        elif self.mode == "fixed":
            if not isinstance(self.size, tuple) or min(self.size) < 8:
                raise ValueError("mode 'fixed' needs size: [height, width], each at least 8")
        elif not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"mode {self.mode!r} needs size: an integer of at least 8")
        return self


class PrepareParams(Section):
    section: ClassVar[str] = "prepare"

    # pipeline.tasks: a built-in task name, or module:Class for a task defined elsewhere.
    task: str = Field(..., pattern=r"^(\w+|[\w.]+:\w+)$")
    strict: bool = Field(..., description="fail on any problem (else skip and report)")
    train_resize: Resize = Field(...)
    eval_resize: Resize = Field(...)
    images_per_shard: int = Field(..., ge=1, le=100_000)
    workers: int = Field(..., ge=1, le=256, description="decoding processes")
    val_fraction: float = Field(..., ge=0.0, lt=0.5)
    test_fraction: float = Field(..., ge=0.0, lt=0.5)
    seed: int = Field(..., ge=0)
    # dataset=folder: the class list, how masks encode it, and the ignore label. Instance
    # exports (labelme, via, yolo): the class list, where the export does not carry one.
    classes: list[str] | None = Field(..., min_length=1, max_length=255)
    palette: list[tuple[int, int, int]] | None = Field(...)
    mask_format: Literal["index", "color"] = Field(...)
    ignore_index: int = Field(..., ge=0, le=255)
    # dataset=via: the region attribute whose value names an instance's class; null: one class.
    class_attribute: str | None = Field(..., min_length=1, max_length=200)
    # task panoptic: the thing classes, by name, of a semantic dataset (each connected component
    # of their masks an instance) or of ade20k; null for coco_panoptic (its categories' isthing).
    thing_classes: list[str] | None = Field(...)
    # ... and there, thing components smaller than this (pixels, native size) are annotation
    # fragments made void rather than instances; 0 keeps every component.
    min_component_area: int = Field(..., ge=0, le=1_000_000)
    # dataset coco_panoptic: rgb (segment ids R + 256 G + 256^2 B, described by the JSON's
    # segments_info) or two_channel (R the category id, G the instance).
    panoptic_format: Literal["rgb", "two_channel"] = Field(...)

    @model_validator(mode="after")
    def _palette_fits_classes(self) -> PrepareParams:
        if self.thing_classes is not None:
            if self.task != PANOPTIC_TASK:
                raise ValueError(f"thing_classes: only for task {PANOPTIC_TASK!r}; set it to null")
            if not self.thing_classes or len(set(self.thing_classes)) != len(self.thing_classes):
                raise ValueError("thing_classes: a non-empty list of distinct class names, or null")
        if self.palette is not None:
            if self.classes is None or len(self.palette) != len(self.classes):
                raise ValueError("palette: needs one [r, g, b] per entry of classes")
            if any(not 0 <= c <= 255 for rgb in self.palette for c in rgb):
                raise ValueError("palette: values must lie in 0..255")
        if self.mask_format == "color" and self.palette is None:
            raise ValueError("mask_format: 'color' needs palette: one [r, g, b] per class")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must stay below 0.9")
        return self


LOSS_NAMES = ("ce", "weighted_ce", "focal", "dice", "jaccard", "lovasz", "tversky", "topk", "boundary",
              "distance_ce", "sensitivity_specificity", "hausdorff", "surface")
# The instance task's terms: weights of Mask R-CNN's own losses (pipeline.tasks.instance).
INSTANCE_LOSS_NAMES = ("rpn_objectness", "rpn_box", "classifier", "box_reg", "mask")
IOU_BALANCED_LOSS = "iou_balanced_classifier"   # instance and panoptic: in place of classifier
# The panoptic task's: those of its Mask R-CNN and its semantic branch's (pipeline.models.panoptic_fpn).
PANOPTIC_LOSS_NAMES = INSTANCE_LOSS_NAMES + ("semantic",)


class LossParams(Section):
    """A weighted sum of named losses, e.g. ``terms: {ce: 0.5, dice: 0.5}``; for the instance
    task, weights of Mask R-CNN's losses (``INSTANCE_LOSS_NAMES``), for the panoptic task those
    and Panoptic FPN's semantic branch's (``PANOPTIC_LOSS_NAMES``); the task checks which apply."""

    section: ClassVar[str] = "loss"

    terms: dict[Literal[LOSS_NAMES + PANOPTIC_LOSS_NAMES + (IOU_BALANCED_LOSS,)], float] = Field(
        ..., min_length=1)
    # weighted_ce's class weights: a list (one per class) or a scheme from prepare's card.
    class_weights: Literal["median_frequency", "enet"] | list[float] | None = Field(...)
    focal_gamma: float = Field(..., ge=0, le=10)
    tversky_alpha: float = Field(..., ge=0, le=1)
    tversky_beta: float = Field(..., ge=0, le=1)
    topk_fraction: float = Field(..., gt=0, le=1, description="share of hardest pixels")
    boundary_width: int = Field(..., ge=1, le=32, description="pixels either side of an edge")
    distance_w0: float = Field(..., ge=0, le=100, description="distance_ce: extra weight at an edge")
    distance_sigma: float = Field(..., gt=0, le=100, description="distance_ce: its fall-off, pixels")
    sensitivity_weight: float = Field(..., ge=0, le=1, description="sensitivity_specificity: r")
    hausdorff_alpha: float = Field(..., gt=0, le=4, description="hausdorff: the distances' exponent")
    iou_balance_eta: float = Field(..., ge=0, le=10,
                                   description="iou_balanced_classifier: the exponent of the IoU weights")

    @model_validator(mode="after")
    def _weights_positive(self) -> LossParams:
        if any(w <= 0 for w in self.terms.values()):
            raise ValueError("terms: every loss weight must be positive")
        if "weighted_ce" in self.terms and self.class_weights is None:
            raise ValueError("class_weights: weighted_ce needs median_frequency, enet or a list")
        return self


class TrainParams(Section):
    """The training recipe and how it is spread over Ray Train workers."""

    section: ClassVar[str] = "train"

    epochs: int = Field(..., ge=1, le=10_000)
    max_minutes: float | None = Field(..., gt=0, le=100_000, description=(
        "a wall-clock budget for the epochs (training and validation): stop before an epoch that "
        "would not end within it, the schedule fitted to the epochs that do (pipeline.engine.budget); "
        "null: train.epochs alone"))
    batch_size: int = Field(..., ge=1, le=4096, description="per worker")
    val_batch_size: int = Field(..., ge=1, le=4096)
    crop_size: tuple[int, int] = Field(...)
    scale_range: tuple[float, float] = Field(...)
    color_jitter: float = Field(..., ge=0, le=1)
    optimizer: Literal["adamw", "sgd"] = Field(...)
    lr: float = Field(..., gt=0, le=10)
    weight_decay: float = Field(..., ge=0, le=1)
    momentum: float = Field(..., ge=0, lt=1)
    schedule: Literal["cosine", "poly"] = Field(...)
    warmup_epochs: float = Field(..., ge=0)
    poly_power: float = Field(..., gt=0, le=10)
    grad_clip: float | None = Field(..., gt=0)
    amp: bool = Field(..., description="mixed precision; used on GPU only")
    seed: int = Field(..., ge=0)
    num_workers: int = Field(..., ge=1, le=1024)
    use_gpu: Literal["auto"] | bool = Field(...)
    cpus_per_worker: float = Field(..., gt=0, le=256)
    threads_per_worker: int | None = Field(..., ge=1, le=256)
    max_failures: int = Field(..., ge=-1, le=100)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(...)
    materialize: bool = Field(..., description="read the training split once into the object store")
    keep_freed_memory: bool = Field(..., description="reuse freed memory (allocator)")
    channels_last: bool = Field(..., description="NHWC weights and inputs: faster convolutions")

    @model_validator(mode="after")
    def _ranges(self) -> TrainParams:
        if min(self.crop_size) < 32:
            raise ValueError("crop_size: [height, width], each at least 32")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError("scale_range: [low, high] with 0 < low <= high")
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs: must be less than epochs")
        return self


class OverlayParams(Section):
    """Which test images get image / truth / prediction / error PNGs."""

    samples: int = Field(..., ge=0, le=1000, description="the first n test images by id")
    worst_per_class: int = Field(..., ge=0, le=100, description="lowest IoU for each class")


class CrfParams(Section):
    """The dense CRF's kernels (``pipeline.inference.refine.dense_crf``; pydensecrf's names)."""

    iterations: int = Field(..., ge=1, le=50, description="mean-field iterations")
    gaussian_sxy: float = Field(..., gt=0, le=100, description="smoothness kernel: position scale, pixels")
    gaussian_compat: float = Field(..., ge=0, le=100, description="smoothness kernel: its weight")
    bilateral_sxy: float = Field(..., gt=0, le=1000, description="appearance kernel: position scale, pixels")
    bilateral_srgb: float = Field(..., gt=0, le=255, description="appearance kernel: colour scale, 0-255")
    bilateral_compat: float = Field(..., ge=0, le=100, description="appearance kernel: its weight")


class GrabCutParams(Section):
    """GrabCut seeded from the prediction (``pipeline.inference.refine.grabcut``)."""

    iterations: int = Field(..., ge=1, le=20)
    sure: float = Field(..., gt=0.5, le=1, description="probabilities >= sure (or <= 1 - sure): fixed")
    margin: int | None = Field(..., ge=0, le=10_000,
                               description="pixels around the probable region GrabCut sees; null: all")


POSTPROCESS = Literal["none", "crf", "grabcut"]


class EvaluateParams(Section):
    """Test-split evaluation at native resolution."""

    section: ClassVar[str] = "evaluate"

    split: Literal["train", "val", "test"] = Field(...)
    flip_tta: bool = Field(..., description="average with the horizontally flipped image")
    scales: tuple[float, ...] = Field(..., min_length=1, max_length=8,
                                      description="multi-scale TTA: resize factors whose predictions average")
    # Images with more pixels than this go through overlapping tiles (bounded memory).
    tile_above_pixels: int = Field(..., ge=1024)
    tile_size: tuple[int, int] = Field(...)
    tile_overlap: float = Field(..., ge=0, lt=1, description="share of a tile shared with the next")
    boundary_width: float = Field(..., gt=0, le=0.5,
                                  description="boundary IoU band, as a share of the image diagonal")
    threads: int | None = Field(..., ge=1, le=256, description="torch threads; null: all cores")
    postprocess: POSTPROCESS = Field(..., description="refine each prediction with its image")
    crf: CrfParams = Field(...)
    grabcut: GrabCutParams = Field(...)
    overlays: OverlayParams = Field(...)

    @model_validator(mode="after")
    def _tile(self) -> EvaluateParams:
        if min(self.tile_size) < 32:
            raise ValueError("tile_size: [height, width], each at least 32")
        if any(not 0.25 <= s <= 4 for s in self.scales):
            raise ValueError("scales: resize factors between 0.25 and 4")
        return self


class RegisterParams(Section):
    """The MLflow Model Registry entry and the champion gate."""

    section: ClassVar[str] = "register"

    model_name: str = Field(..., min_length=1, max_length=200,
                            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    alias: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    onnx: bool = Field(..., description="also log an ONNX export with dynamic batch, height, width")
    onnx_opset: int = Field(..., ge=13, le=23)
    min_improvement: float = Field(..., ge=0, le=1, description=(
        "test mIoU a candidate must gain over the champion to take the alias (runs of one "
        "recipe differ by about 0.01)"))


class ServeParams(Section):
    """The Ray Serve application that answers ``POST /predict`` with the registered model."""

    section: ClassVar[str] = "serve"

    model: str = Field(..., min_length=1, max_length=500,
                       description="an alias of register.model_name, a version number, or a "
                                   "models:/ or runs:/ URI")
    host: str = Field(..., description="address to bind; 0.0.0.0 exposes it")
    port: int = Field(..., ge=1, le=65535)
    replicas: int = Field(..., ge=1, le=256, description="spread over the cluster's nodes")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        ..., description="where Serve runs HTTP proxies (HeadOnly: one entry point)")
    cpus_per_replica: float = Field(..., gt=0, le=256, description="Ray CPUs each replica holds")
    gpus_per_replica: Annotated[float, Field(ge=0, le=64)] | Literal["auto"] = Field(
        ..., description="auto: one GPU per replica when the cluster has GPUs, else 0")
    threads: int | None = Field(..., ge=1, le=256,
                                description="torch threads per replica; null: node cores // replicas")
    max_batch_size: int = Field(..., ge=1, le=256, description="@serve.batch size")
    batch_wait_timeout_s: float = Field(
        ..., ge=0, le=10,
        description="wait for more requests before a batch; 0: batch what queued during the last one")
    max_ongoing_requests: int = Field(..., ge=1, le=10_000, description="per replica")
    max_body_bytes: int = Field(..., ge=1024, description="413 above this")
    max_pixels: int = Field(..., ge=1024, description="413 above this (decompression bombs)")
    max_replica_pixels: int = Field(
        ..., ge=1024, description="decoded pixels a replica holds at once (queued + in flight); 503 beyond")
    # Inference settings: null = the model's own (those its registered score was computed with).
    tile_above_pixels: int | None = Field(..., ge=1024, description="tiles above this many pixels")
    tile_size: tuple[int, int] | None = Field(...)
    tile_overlap: float | None = Field(..., ge=0, lt=1)
    flip_tta: bool | None = Field(...)
    scales: tuple[float, ...] | None = Field(..., min_length=1, max_length=8,
                                             description="multi-scale TTA factors; null: the model's own")
    postprocess: POSTPROCESS | None = Field(..., description="refinement; null: the model's own")
    # The parameters of a refinement the model does not record (serve.postprocess or ?refine=).
    crf: CrfParams = Field(...)
    grabcut: GrabCutParams = Field(...)
    overlay_alpha: float = Field(..., ge=0, le=1, description="default opacity of ?format=overlay")

    @model_validator(mode="after")
    def _sizes(self) -> ServeParams:
        if self.tile_size is not None and min(self.tile_size) < 32:
            raise ValueError("tile_size: [height, width], each at least 32")
        if self.scales is not None and any(not 0.25 <= s <= 4 for s in self.scales):
            raise ValueError("scales: resize factors between 0.25 and 4")
        if self.max_replica_pixels < self.max_pixels:
            raise ValueError("max_replica_pixels: must be at least max_pixels, or large images never fit")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests: must be at least max_batch_size, or batches never fill")
        return self


SECTIONS: dict[str, type[Section]] = {
    m.section: m for m in (DownloadParams, PrepareParams, ModelParams, LossParams, TrainParams,
                           EvaluateParams, RegisterParams, ServeParams)
}


def read_params_file(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict; unknown top-level sections are errors."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(
            f"{path}: unknown section(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(SECTIONS)}"
        )
    return data


def default_params(overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The repository's params.yaml as a dict, every section validated, with
    ``overrides[section][key]`` replacing whole values (a mapping such as ``loss.terms`` is
    replaced, not merged): what a test or notebook writes as its own params file."""
    data = copy.deepcopy(read_params_file(REPO_PARAMS_FILE))
    unknown = sorted(set(overrides or {}) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"overrides: unknown section(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(SECTIONS)}")
    for name, values in (overrides or {}).items():
        data[name] = {**(data.get(name) or {}), **copy.deepcopy(values)}
    for name, model in SECTIONS.items():
        parse_section(model, data.get(name), f"{REPO_PARAMS_FILE} with overrides")
    return data


def parse_section(model: type[Section], raw: Any, source: str = str(PARAMS_FILE)) -> Section:
    """Validate one section's raw mapping into ``model``, with readable errors."""
    if raw is None:
        keys = ", ".join(model.model_fields)
        raise ParamsError(f"{source}: missing section '{model.section}' (keys: {keys})")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(format_errors(exc, model, source)) from None


def load_params(model: type[Section], path: Path = PARAMS_FILE) -> Any:
    """Load and validate the section of ``path`` that ``model`` describes."""
    return parse_section(model, read_params_file(path).get(model.section), str(path))
