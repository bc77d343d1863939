"""Model families by name: ``model.family`` picks one, ``build_model`` builds through it.

A family is a record of three plain functions over its own params class (a member of
``pipeline.config.params.ModelParams``'s union, whose ``family`` key names it here):

- ``build(cfg, classes, meta)``: the network with ``classes`` outputs, a
  ``SegmentationModel`` whose ``meta`` has the family's normalisation unless given;
- ``normalisation(cfg)``: (mean, std) per input channel its pretrained weights expect;
- ``ensure_weights(cfg)``: before any worker starts, fetch or verify pretrained weights,
  raising ``WeightsUnavailableError`` with one line when they cannot be had.

Later families (MONAI...) add a params class and a record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config.params import ModelParams
from pipeline.models import smp
from pipeline.models import torchvision as tv
from pipeline.models.base import ModelMeta, SegmentationModel
from pipeline.models.seed import family as seed


@dataclass(frozen=True)
class ModelFamily:
    name: str
    build: Callable[[Any, int, ModelMeta], SegmentationModel]
    normalisation: Callable[[Any], tuple[tuple[float, ...], tuple[float, ...]]]
    ensure_weights: Callable[[Any], None]


FAMILIES: dict[str, ModelFamily] = {
    f.name: f for f in (
        ModelFamily("smp", smp.build, smp.normalisation, smp.ensure_weights),
        ModelFamily("torchvision", tv.build, tv.normalisation, tv.ensure_weights),
        ModelFamily("seed", seed.build, seed.normalisation, seed.ensure_weights),
    )
}


def family_of(cfg: ModelParams) -> ModelFamily:
    try:
        return FAMILIES[cfg.family]
    except KeyError:
        allowed = ", ".join(FAMILIES)
        raise ValueError(f"model.family: unknown family {cfg.family!r}; allowed: {allowed}") from None


def build_model(cfg: ModelParams, num_classes: int, meta: ModelMeta | None = None) -> SegmentationModel:
    """The network ``cfg`` describes, wrapped for any input size.

    ``num_classes`` (from the prepared dataset's classes.json) is used when ``cfg.classes``
    is null. ``meta`` (default: empty) gets the family's normalisation unless it gives its
    own. Errors in the section are ``ValueError``s naming the key.
    """
    classes = cfg.classes if cfg.classes is not None else num_classes
    meta = meta if meta is not None else ModelMeta()
    if meta.class_names and len(meta.class_names) != classes:
        raise ValueError(f"meta has {len(meta.class_names)} class names for a model with {classes} classes")
    if meta.mean is not None and len(meta.mean) != cfg.in_channels:
        raise ValueError(f"meta.mean has {len(meta.mean)} values for model.in_channels={cfg.in_channels}")
    return family_of(cfg).build(cfg, classes, meta)


def normalisation(cfg: ModelParams) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return family_of(cfg).normalisation(cfg)


def ensure_weights(cfg: ModelParams) -> None:
    family_of(cfg).ensure_weights(cfg)
