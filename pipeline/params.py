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


SECTIONS: dict[str, type[Section]] = {m.section: m for m in (DownloadParams, PrepareParams)}


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
