"""The ``model`` params section: one model family's keys, chosen by ``model.family``.

A pydantic discriminated union of the families' params classes: a later family adds its class
here and to ``ModelParams.variants``, and its builder to ``pipeline.models.registry``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self, Union

from pydantic import Field, TypeAdapter, model_validator

from pipeline.config.section import Section


class ModelParams(Section):
    """The ``model`` section: one family's keys, chosen by ``family`` (a pydantic
    discriminated union of the family params classes, ``FAMILIES``).

    ``ModelParams.model_validate(raw)`` (and ``load_params(ModelParams)``) returns an instance
    of the family's class, e.g. ``SmpModelParams``; every family has ``family``,
    ``in_channels`` and ``classes``. ``pipeline.models.registry`` builds from it.
    """

    section: ClassVar[str] = "model"
    family: str = Field(...)
    variants: ClassVar[dict[str, type[Section]]] = {}     # family name -> its params class

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        if cls is ModelParams:
            return _MODEL_SPEC.validate_python(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    def without_pretrained_weights(self) -> Self:
        """The same model with random initial weights (the train stage's configuration check)."""
        raise NotImplementedError(f"{type(self).__name__}.without_pretrained_weights")


class SmpModelParams(ModelParams):
    """``family: smp``: handed to ``smp.create_model`` as keyword arguments (smp's own keys)."""

    family: Literal["smp"] = Field(...)
    arch: str = Field(...)
    encoder_name: str = Field(...)
    # "imagenet": smp's own download, or a verified file from $SEG_WEIGHTS_DIR; null: random.
    encoder_weights: Literal["imagenet"] | None = Field(...)
    in_channels: int = Field(..., ge=1, le=16)
    classes: int | None = Field(..., ge=1, le=1024, description="null: from classes.json")
    kwargs: dict[str, Any] = Field(..., description="other smp keyword arguments")

    def without_pretrained_weights(self) -> Self:
        return self.model_copy(update={"encoder_weights": None})

    @model_validator(mode="after")
    def _no_aux_head(self) -> SmpModelParams:
        if "aux_params" in self.kwargs:
            raise ValueError(
                "kwargs.aux_params: not supported: smp's auxiliary classification head makes the "
                "network return (masks, labels), and the losses, metrics and predictors here take "
                "masks only; remove it from model.kwargs"
            )
        return self


ModelParams.variants = {"smp": SmpModelParams}
_MODEL_SPEC = TypeAdapter(Annotated[Union[tuple(ModelParams.variants.values())],  # noqa: UP007
                                    Field(discriminator="family")])
