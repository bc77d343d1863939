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


PANOPTIC_ARCH = "panoptic_fpn_mobilenet_v2"      # Panoptic FPN (pipeline.models.panoptic_fpn)
# The archs over a MobileNetV2, whose ImageNet weights are the verified file in $SEG_WEIGHTS_DIR.
MOBILENET_ARCHS = ("maskrcnn_mobilenet_v2_fpn", PANOPTIC_ARCH)
TORCHVISION_ARCHS = MOBILENET_ARCHS + ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")


class TorchvisionModelParams(ModelParams):
    """``family: torchvision``: torchvision's Mask R-CNN for ``prepare.task: instance``
    (``pipeline.models.torchvision``). ``maskrcnn_mobilenet_v2_fpn``: an FPN over a MobileNetV2
    whose ImageNet weights come from ``$SEG_WEIGHTS_DIR``; the ResNet-50 variants train from
    scratch (``encoder_weights: null``: no other ImageNet weights are verified here).
    ``panoptic_fpn_mobilenet_v2``: Panoptic FPN for ``prepare.task: panoptic``, that Mask R-CNN
    for the thing classes beside a semantic FPN branch (``pipeline.models.panoptic_fpn``)."""

    family: Literal["torchvision"] = Field(...)
    arch: Literal[TORCHVISION_ARCHS] = Field(...)
    encoder_weights: Literal["imagenet"] | None = Field(...)
    in_channels: Literal[3] = Field(..., description="RGB")
    classes: int | None = Field(..., ge=1, le=1024,
                                description="null: from classes.json (background excluded)")
    image_scale: float = Field(..., ge=0.25, le=4.0, description=(
        "every image (training crops and whole images alike) is resized by this factor inside the "
        "model: small objects such as nuclei need more than 1"))
    trainable_layers: int = Field(..., ge=0, le=6, description="backbone stages trained, from the top")
    kwargs: dict[str, Any] = Field(..., description="other torchvision MaskRCNN keyword arguments")

    def without_pretrained_weights(self) -> Self:
        return self.model_copy(update={"encoder_weights": None})

    @model_validator(mode="after")
    def _weights_available(self) -> TorchvisionModelParams:
        if self.encoder_weights is not None and self.arch not in MOBILENET_ARCHS:
            raise ValueError(
                f"encoder_weights: no verified ImageNet weights for {self.arch}'s ResNet-50 backbone; "
                f"set it to null (trained from scratch) or use arch {' or '.join(MOBILENET_ARCHS)}")
        limit = 6 if self.arch in MOBILENET_ARCHS else 5
        if self.trainable_layers > limit:
            raise ValueError(f"trainable_layers: at most {limit} for {self.arch}")
        return self


# family seed (pipeline.models.seed): the classic architectures smp lacks. Those with their own
# encoder take encoder_name null; FCN and DeepLab take null for the paper's VGG-16 or an smp encoder;
# UNet (our decoder), PointRend and GatedSCNN an smp encoder.
SEED_FCN_ARCHS = ("FCN32s", "FCN16s", "FCN8s")
SEED_DEEPLAB_ARCHS = ("DeepLabV1", "DeepLabV2")
SEED_OWN_ENCODER_ARCHS = ("SegNet", "ENet", "FCDenseNet56", "FCDenseNet67", "FCDenseNet103")
SEED_SMP_ENCODER_ARCHS = ("UNet", "PointRend", "GatedSCNN")       # over an smp encoder only
SEED_ARCHS = SEED_FCN_ARCHS + SEED_OWN_ENCODER_ARCHS + SEED_DEEPLAB_ARCHS + SEED_SMP_ENCODER_ARCHS


class SeedModelParams(ModelParams):
    """``family: seed``: the architectures the lecture notes teach that smp lacks
    (``pipeline.models.seed``). Same keys as ``smp``, so ``-S model.family=seed -S model.arch=...``
    switches a recipe: ``encoder_name`` null means the arch's own encoder (the paper's VGG-16 for
    FCN and DeepLab, the whole net for SegNet, ENet and FC-DenseNet), else an smp encoder
    (FCN, DeepLab, UNet, PointRend, GatedSCNN); ``kwargs`` the arch's options (UNet: ``upsampling``,
    ``skip_merge``; PointRend: ``train_points``, ``subdivision_points``; DeepLab: ``jpu``;
    FC-DenseNet: ``memory_efficient``)."""

    family: Literal["seed"] = Field(...)
    arch: Literal[SEED_ARCHS] = Field(...)
    encoder_name: str | None = Field(..., description="null: the arch's own encoder; else an smp encoder")
    encoder_weights: Literal["imagenet"] | None = Field(..., description="for an smp encoder only")
    in_channels: int = Field(..., ge=1, le=16)
    classes: int | None = Field(..., ge=1, le=1024, description="null: from classes.json")
    kwargs: dict[str, Any] = Field(..., description="the arch's options (see SeedModelParams)")

    def without_pretrained_weights(self) -> Self:
        return self.model_copy(update={"encoder_weights": None})

    @model_validator(mode="after")
    def _encoder_fits_arch(self) -> SeedModelParams:
        own = self.arch in SEED_OWN_ENCODER_ARCHS
        if own and self.encoder_name is not None:
            raise ValueError(
                f"encoder_name: {self.arch} has its own encoder, trained from scratch; set "
                f"model.encoder_name: null and model.encoder_weights: null (not {self.encoder_name!r})")
        if self.arch in SEED_SMP_ENCODER_ARCHS and self.encoder_name is None:
            raise ValueError(f"encoder_name: {self.arch} works over an smp encoder; "
                             "name one (e.g. mobilenet_v2)")
        if self.encoder_name is None and self.encoder_weights is not None:
            where = f"{self.arch}'s own encoder" if own else f"the paper's VGG-16 of {self.arch}"
            raise ValueError(f"encoder_weights: no pretrained weights for {where} here; set "
                             "model.encoder_weights: null, or name an smp encoder in model.encoder_name")
        return self


ModelParams.variants = {"smp": SmpModelParams, "torchvision": TorchvisionModelParams,
                        "seed": SeedModelParams}
_MODEL_SPEC = TypeAdapter(Annotated[Union[tuple(ModelParams.variants.values())],  # noqa: UP007
                                    Field(discriminator="family")])
