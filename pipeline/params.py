"""Typed, validated views of ``params.yaml``: one pydantic model per stage section.

A stage loads only its own section, once, at the door::

    cfg = load_params(PrepareParams)

An unknown key, a wrong type or an out-of-range value raises ``ParamsError``
whose message names the file, the dotted key, what was given and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.paths import PARAMS_FILE

DATASETS = ("camvid", "pet", "voc", "folder")


class ParamsError(ValueError):
    """A params file or section that does not match its schema."""


class Section(BaseModel):
    """Base for a params section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)
    section: ClassVar[str]


class DownloadParams(Section):
    section: ClassVar[str] = "download"

    dataset: Literal["camvid", "pet", "voc", "folder"] = "camvid"
    folder: str | None = Field(
        default=None, description="dataset=folder: directory with images/ and masks/"
    )
    retries: int = Field(default=3, ge=0, le=20, description="extra attempts per file")
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="socket timeout")

    @model_validator(mode="after")
    def _folder_given_for_folder(self) -> DownloadParams:
        if self.dataset == "folder" and not self.folder:
            raise ValueError("dataset 'folder' needs download.folder (a directory path)")
        if self.dataset != "folder" and self.folder:
            raise ValueError(f"download.folder is only used with dataset 'folder', not {self.dataset!r}")
        return self


class Resize(Section):
    """How images of one group of splits are resized at prepare time.

    ``none`` keeps native size; ``fixed`` resizes to ``size: [height, width]``;
    ``shorter_side`` / ``longer_side`` scale so that side equals ``size`` (an int),
    keeping the aspect ratio. Masks always use nearest-neighbour.
    """

    mode: Literal["none", "fixed", "shorter_side", "longer_side"] = "none"
    size: int | tuple[int, int] | None = None

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

    strict: bool = Field(default=True, description="fail on any problem (else skip and report)")
    train_resize: Resize = Resize()
    eval_resize: Resize = Resize()
    images_per_shard: int = Field(default=64, ge=1, le=100_000)
    workers: int = Field(default=2, ge=1, le=256, description="decoding processes")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    seed: int = Field(default=0, ge=0)
    # Only for dataset=folder: the class list, how masks encode it, and the ignore label.
    classes: list[str] | None = Field(default=None, min_length=2, max_length=255)
    palette: list[tuple[int, int, int]] | None = None
    mask_format: Literal["index", "color"] = "index"
    ignore_index: int = Field(default=255, ge=0, le=255)

    @model_validator(mode="after")
    def _palette_fits_classes(self) -> PrepareParams:
        if self.palette is not None:
            if self.classes is None or len(self.palette) != len(self.classes):
                raise ValueError("palette needs one [r, g, b] per entry of classes")
            if any(not 0 <= c <= 255 for rgb in self.palette for c in rgb):
                raise ValueError("palette values must lie in 0..255")
        if self.mask_format == "color" and self.palette is None:
            raise ValueError("mask_format 'color' needs palette: one [r, g, b] per class")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must stay below 0.9")
        return self


LOSS_NAMES = ("ce", "weighted_ce", "focal", "dice", "jaccard", "lovasz", "tversky", "topk", "boundary")


class ModelParams(Section):
    """Handed to ``smp.create_model`` as keyword arguments: the keys are smp's own."""

    section: ClassVar[str] = "model"

    arch: str = "Unet"
    encoder_name: str = "mobilenet_v2"
    # "imagenet": smp's own download, or a verified file from $SEG_WEIGHTS_DIR; null: random.
    encoder_weights: Literal["imagenet"] | None = "imagenet"
    in_channels: int = Field(default=3, ge=1, le=16)
    classes: int | None = Field(default=None, ge=1, le=1024, description="null: from classes.json")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="other smp keyword arguments")


class LossParams(Section):
    """A weighted sum of named losses, e.g. ``terms: {ce: 0.5, dice: 0.5}``."""

    section: ClassVar[str] = "loss"

    terms: dict[Literal[LOSS_NAMES], float] = Field(default_factory=lambda: {"ce": 1.0}, min_length=1)
    # weighted_ce's class weights: a list (one per class) or a scheme from prepare's card.
    class_weights: Literal["median_frequency", "enet"] | list[float] | None = None
    focal_gamma: float = Field(default=2.0, ge=0, le=10)
    tversky_alpha: float = Field(default=0.3, ge=0, le=1)
    tversky_beta: float = Field(default=0.7, ge=0, le=1)
    topk_fraction: float = Field(default=0.2, gt=0, le=1, description="share of hardest pixels")
    boundary_width: int = Field(default=3, ge=1, le=32, description="pixels either side of an edge")

    @model_validator(mode="after")
    def _weights_positive(self) -> LossParams:
        if any(w <= 0 for w in self.terms.values()):
            raise ValueError("every loss weight in terms must be positive")
        if "weighted_ce" in self.terms and self.class_weights is None:
            raise ValueError("weighted_ce needs class_weights: median_frequency, enet or a list")
        return self


class TrainParams(Section):
    """The training recipe and how it is spread over Ray Train workers."""

    section: ClassVar[str] = "train"

    epochs: int = Field(default=8, ge=1, le=10_000)
    batch_size: int = Field(default=8, ge=1, le=4096, description="per worker")
    val_batch_size: int = Field(default=4, ge=1, le=4096)
    crop_size: tuple[int, int] = (352, 448)
    scale_range: tuple[float, float] = (0.75, 1.25)
    color_jitter: float = Field(default=0.2, ge=0, le=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["cosine", "poly"] = "cosine"
    warmup_epochs: float = Field(default=0.5, ge=0)
    poly_power: float = Field(default=0.9, gt=0, le=10)
    grad_clip: float | None = Field(default=1.0, gt=0)
    amp: bool = Field(default=True, description="mixed precision; used on GPU only")
    seed: int = Field(default=0, ge=0)
    num_workers: int = Field(default=1, ge=1, le=1024)
    use_gpu: Literal["auto"] | bool = "auto"
    cpus_per_worker: float = Field(default=1.0, gt=0, le=256)
    threads_per_worker: int | None = Field(default=None, ge=1, le=256)
    max_failures: int = Field(default=2, ge=-1, le=100)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    materialize: bool = Field(default=True, description="read the training split once into the object store")
    keep_freed_memory: bool = Field(default=True, description="reuse freed memory (allocator)")
    channels_last: bool = Field(default=True, description="NHWC weights and inputs: faster convolutions")

    @model_validator(mode="after")
    def _ranges(self) -> TrainParams:
        if min(self.crop_size) < 32:
            raise ValueError("crop_size: [height, width], each at least 32")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError("scale_range: [low, high] with 0 < low <= high")
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be less than epochs")
        return self


class OverlayParams(Section):
    """Which test images get image / truth / prediction / error PNGs."""

    samples: int = Field(default=6, ge=0, le=1000, description="the first n test images by id")
    worst_per_class: int = Field(default=3, ge=0, le=100, description="lowest IoU for each class")


class EvaluateParams(Section):
    """Test-split evaluation at native resolution."""

    section: ClassVar[str] = "evaluate"

    split: Literal["train", "val", "test"] = "test"
    flip_tta: bool = Field(default=True, description="average with the horizontally flipped image")
    scales: tuple[float, ...] = Field(default=(1.0,), min_length=1, max_length=8,
                                      description="multi-scale TTA: resize factors whose predictions average")
    # Images with more pixels than this go through overlapping tiles (bounded memory).
    tile_above_pixels: int = Field(default=1_048_576, ge=1024)
    tile_size: tuple[int, int] = (512, 512)
    tile_overlap: float = Field(default=0.25, ge=0, lt=1, description="share of a tile shared with the next")
    boundary_width: float = Field(default=0.02, gt=0, le=0.5,
                                  description="boundary IoU band, as a share of the image diagonal")
    threads: int | None = Field(default=None, ge=1, le=256, description="torch threads; null: all cores")
    overlays: OverlayParams = OverlayParams()

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

    model_name: str = Field(default="segmentation", min_length=1, max_length=200,
                            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    alias: str = Field(default="champion", min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    onnx: bool = Field(default=True, description="also log an ONNX export with dynamic batch, height, width")
    onnx_opset: int = Field(default=18, ge=13, le=23)
    min_improvement: float = Field(..., ge=0, le=1, description=(
        "test mIoU a candidate must gain over the champion to take the alias (runs of one "
        "recipe differ by about 0.01)"))


class ServeParams(Section):
    """The Ray Serve application that answers ``POST /predict`` with the registered model."""

    section: ClassVar[str] = "serve"

    model: str = Field(default="champion", min_length=1, max_length=500,
                       description="an alias of register.model_name, a version number, or a "
                                   "models:/ or runs:/ URI")
    host: str = Field(default="127.0.0.1", description="address to bind; 0.0.0.0 exposes it")
    port: int = Field(default=8000, ge=1, le=65535)
    replicas: int = Field(default=1, ge=1, le=256, description="spread over the cluster's nodes")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        default="EveryNode", description="where Serve runs HTTP proxies (HeadOnly: one entry point)")
    cpus_per_replica: float = Field(default=1.0, gt=0, le=256, description="Ray CPUs each replica holds")
    gpus_per_replica: float | Literal["auto"] = Field(
        default="auto", description="auto: one GPU per replica when the cluster has GPUs, else 0")
    threads: int | None = Field(default=None, ge=1, le=256,
                                description="torch threads per replica; null: node cores // replicas")
    max_batch_size: int = Field(default=8, ge=1, le=256, description="@serve.batch size")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0, le=10,
        description="wait for more requests before a batch; 0: batch what queued during the last one")
    max_ongoing_requests: int = Field(default=64, ge=1, le=10_000, description="per replica")
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, description="413 above this")
    max_pixels: int = Field(default=40_000_000, ge=1024, description="413 above this (decompression bombs)")
    max_replica_pixels: int = Field(
        default=120_000_000, ge=1024,
        description="decoded pixels a replica holds at once (queued + in flight); 503 beyond")
    # Inference settings: null = the model's own (those its registered score was computed with).
    tile_above_pixels: int | None = Field(default=None, ge=1024, description="tiles above this many pixels")
    tile_size: tuple[int, int] | None = None
    tile_overlap: float | None = Field(default=None, ge=0, lt=1)
    flip_tta: bool | None = None
    scales: tuple[float, ...] | None = Field(..., min_length=1, max_length=8,
                                             description="multi-scale TTA factors; null: the model's own")
    overlay_alpha: float = Field(default=0.5, ge=0, le=1, description="default opacity of ?format=overlay")

    @model_validator(mode="after")
    def _sizes(self) -> ServeParams:
        if self.tile_size is not None and min(self.tile_size) < 32:
            raise ValueError("tile_size: [height, width], each at least 32")
        if self.scales is not None and any(not 0.25 <= s <= 4 for s in self.scales):
            raise ValueError("scales: resize factors between 0.25 and 4")
        if self.max_replica_pixels < self.max_pixels:
            raise ValueError("max_replica_pixels must be at least max_pixels, or large images never fit")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least max_batch_size, or batches never fill")
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


def parse_section(model: type[Section], raw: Any, source: str = str(PARAMS_FILE)) -> Section:
    """Validate one section's raw mapping into ``model``, with readable errors."""
    raw = {} if raw is None else raw
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_errors(exc, model, source)) from None


def load_params(model: type[Section], path: Path = PARAMS_FILE) -> Any:
    """Load and validate the section of ``path`` that ``model`` describes."""
    return parse_section(model, read_params_file(path).get(model.section), str(path))


def _format_errors(exc: ValidationError, model: type[Section], source: str) -> str:
    lines = [f"{source}: invalid section '{model.section}':"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        key = f"{model.section}.{loc}" if loc else model.section
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(model, err["loc"][:-1]))
            lines.append(f"  {key}: unknown key; allowed keys: {allowed}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return list(model.model_fields)
