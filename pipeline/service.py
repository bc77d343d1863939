"""The prediction service without a server: which model, loaded once, answering requests.

- ``resolve_model`` turns ``serve.model`` (an alias, a version number or a URI) into one
  concrete ``models:/name/version`` (or ``runs:/``) URI with its facts, in the driver, so
  that every replica loads the same version even if the alias moves meanwhile.
- ``Service`` holds the loaded model and a ``Predictor``; ``predict`` takes a batch of
  decoded images of any sizes, ``handle_predict`` a whole request (bytes in, ``Reply`` out).

``pipeline.serve`` wraps this in Ray Serve; tests and the benchmark call it in-process.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline import api
from pipeline.images import ImageError, ImageLimits, decode_image
from pipeline.params import ServeParams
from pipeline.predictor import Predictor


@dataclass(frozen=True)
class ModelRef:
    """A concrete model to serve and what /metadata says about it."""

    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_model(spec: str, name: str, tracking_uri: str) -> ModelRef:
    """``champion`` / ``3`` / ``models:/...`` / ``runs:/...`` -> a ``ModelRef``.

    Raises ``LookupError`` naming the registry, model and what is there when the alias or
    version does not exist.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if spec.startswith("runs:/"):
        run_id = spec.split("/")[1]
        return ModelRef(uri=spec, run_id=run_id, test_metrics=_test_metrics(client, run_id))
    alias = None
    if spec.startswith("models:/"):
        rest = spec[len("models:/"):]
        if "@" in rest:
            name, alias = rest.split("@", 1)
        else:
            name, spec = rest.rsplit("/", 1) if "/" in rest else (rest, "")
    elif not spec.isdigit():
        alias = spec
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, spec)
    except MlflowException:
        versions = sorted((str(v.version) for v in _versions(client, name)), key=int)
        what = f"alias {alias!r}" if alias is not None else f"version {spec!r}"
        there = f"versions {', '.join(versions)}" if versions else "no versions"
        raise LookupError(f"model {name!r} has no {what} in the MLflow store {tracking_uri} ({there}); "
                          "run the pipeline (dvc repro) or pick serve.model") from None
    return ModelRef(uri=f"models:/{name}/{mv.version}", name=name, version=str(mv.version), alias=alias,
                    run_id=mv.run_id, test_metrics=_test_metrics(client, mv.run_id), tags=dict(mv.tags))


def _versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []


def _test_metrics(client, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    metrics = client.get_run(run_id).data.metrics
    return {k: v for k, v in sorted(metrics.items()) if k.startswith("test_")}


def load_segmentation_model(uri: str, tracking_uri: str | None = None):
    """The ``SegmentationModel`` inside a logged pyfunc, in eval mode on the CPU."""
    import mlflow.pyfunc

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    return mlflow.pyfunc.load_model(uri).unwrap_python_model().model


class Service:
    """A loaded model answering prediction requests."""

    def __init__(self, model, ref: ModelRef, cfg: ServeParams):
        import torch

        # Ray starts an actor with one thread per reserved CPU; null means the whole machine.
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device).eval()
        self.ref, self.cfg = ref, cfg
        self.limits = ImageLimits(max_bytes=cfg.max_body_bytes, max_pixels=cfg.max_pixels)
        self.predictor = Predictor(self.model, flip_tta=cfg.flip_tta, tile_above_pixels=cfg.tile_above_pixels,
                                   tile_size=cfg.tile_size, tile_overlap=cfg.tile_overlap)
        self.model_facts = {"name": ref.name, "version": ref.version, "uri": ref.uri}

    @staticmethod
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """A batch of (H, W, 3) uint8 RGB images of any sizes -> (H, W) uint8 masks."""
        return self.predictor.masks(images)

    def parse(self, body: bytes, content_type: str | None, query) -> tuple[np.ndarray, api.Options]:
        """A /predict request -> (RGB image, options). Raises ``api.ApiError``."""
        options = api.parse_options(query, self.cfg.overlay_alpha)
        data, declared = api.image_bytes(body, content_type)
        try:
            return decode_image(data, declared, self.limits), options
        except ImageError as exc:
            raise api.ApiError(exc.status, str(exc)) from None

    def answer(self, image: np.ndarray, mask: np.ndarray, options: api.Options) -> api.Reply:
        return api.render(options, image, mask, self.model.meta, self.model_facts)

    def handle_predict(self, body: bytes, content_type: str | None, query=()) -> api.Reply:
        """One whole request in-process: parse, predict alone, answer."""
        try:
            image, options = self.parse(body, content_type, query)
        except api.ApiError as exc:
            return api.error_reply(exc.status, exc.message)
        return self.answer(image, self.predict([image])[0], options)

    def metadata(self) -> dict[str, Any]:
        meta = self.model.meta
        cfg = self.cfg
        return {
            "model": self.ref.to_dict(),
            "classes": list(meta.class_names), "palette": [list(c) for c in meta.palette],
            "normalization": {"mean": list(meta.mean), "std": list(meta.std), "scale": "0-255 -> 0-1"},
            "ignore_index": meta.ignore_index,
            "device": self.device,
            "inference": cfg.model_dump(mode="json", include={
                "max_batch_size", "batch_wait_timeout_s", "tile_above_pixels", "tile_size", "tile_overlap",
                "flip_tta"}),
            "limits": {"max_body_bytes": cfg.max_body_bytes, "max_pixels": cfg.max_pixels},
            "answers": api.ANSWERS,
        }
