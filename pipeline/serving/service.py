"""The prediction service without a server: which model, loaded once, answering requests.

- ``resolve_model`` turns ``serve.model`` (an alias, a version number or a URI) into one
  concrete ``models:/name/version`` (or ``runs:/``) URI with its facts, in the driver, so
  that every replica loads the same version even if the alias moves meanwhile.
- ``Service`` holds the loaded model and its task's predictor (``Task.predictor``: semantic's
  ``Predictor``, instance's ``InstancePredictor``); ``predict`` takes a batch of
  decoded images of any sizes, ``handle_predict`` a whole request (bytes in, ``Reply`` out).
- Memory: a request's decoded pixels count against the replica's ``PixelBudget``
  (``serve.max_replica_pixels``) from before decoding until its answer is rendered; an
  image that does not fit while others are held is answered 503 with ``Retry-After``,
  so queued images x their pixels stay bounded (``Predictor`` bounds the rest).
- Threads: ``serve.threads: null`` gives each replica ``node cores // replicas`` torch
  threads (at least 1, ``replica_threads``), so replicas x threads never exceed a node's
  cores even when every replica lands on one node.

``pipeline.serve`` wraps this in Ray Serve; tests and the benchmark call it in-process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from pipeline.artifacts import records
from pipeline.config.params import ServeParams
from pipeline.data.images import ImageError, ImageLimits, decode_image
from pipeline.inference.refine import refinement_of
from pipeline.models.base import NO_REFINEMENT, InferenceSettings
from pipeline.serving import api
from pipeline.tasks import task_of_model
from pipeline.tasks.options import REFINE

RETRY_AFTER_S = 1
INFERENCE_KEYS = tuple(f.name for f in fields(InferenceSettings))   # serve params that set them


class Busy(api.ApiError):
    """The replica holds as many decoded pixels as it may: try again shortly (503)."""

    def __init__(self, message: str):
        super().__init__(503, message)


def error_answer(exc: api.ApiError) -> api.Reply:
    """The JSON error reply for ``exc``; a ``Busy`` one says when to retry."""
    reply = api.error_reply(exc.status, exc.message)
    return replace(reply, headers={"Retry-After": str(RETRY_AFTER_S)}) if isinstance(exc, Busy) else reply


class PixelBudget:
    """Decoded pixels one replica holds at once, at most ``limit`` (thread-safe)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> None:
        """Hold ``pixels`` more, or raise ``Busy`` when they do not fit beside those held."""
        with self._lock:
            if self.held + pixels > self.limit:
                raise Busy(f"this replica is busy: an image of {pixels:,} pixels does not fit beside the "
                           f"{self.held:,} decoded pixels it holds (serve.max_replica_pixels = "
                           f"{self.limit:,}); retry in {RETRY_AFTER_S} s")
            self.held += pixels

    def give_back(self, pixels: int) -> None:
        with self._lock:
            self.held -= pixels


class Admission:
    """One request's share of a ``PixelBudget``: taken while parsing, given back on exit."""

    def __init__(self, budget: PixelBudget):
        self.budget, self.pixels = budget, 0

    def take(self, pixels: int) -> None:
        self.budget.take(pixels)
        self.pixels += pixels

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc) -> None:
        self.budget.give_back(self.pixels)
        self.pixels = 0


def node_cores() -> int:
    """CPU cores this process may run on (its affinity), i.e. the node's unless restricted."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def replica_threads(threads: int | None, replicas: int, node_cores: int) -> int:
    """Torch threads for one replica: ``serve.threads`` when set, else the node's cores
    shared by all ``replicas`` (at least 1), so that replicas x threads <= cores however
    many of them the node gets."""
    if threads:
        return threads
    return max(1, node_cores // replicas)


@dataclass(frozen=True)
class ModelRef:
    """A concrete model to serve and what /metadata says about it."""

    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    # The version's recorded evaluation (pipeline.artifacts.records.version_evaluation): the score and
    # key the registry gate used, never whatever the run was evaluated with last.
    evaluation: dict[str, Any] | None = None
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
        # A run is no registered version: it has no recorded evaluation of its own.
        return ModelRef(uri=spec, run_id=spec.split("/")[1])
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
                    run_id=mv.run_id, evaluation=records.version_evaluation(client, mv), tags=dict(mv.tags))


def _versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []


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

        # Ray starts an actor with one thread per reserved CPU; null: a share of the node's cores.
        torch.set_num_threads(replica_threads(cfg.threads, cfg.replicas, node_cores()))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device).eval()
        self.ref, self.cfg = ref, cfg
        self.task = task_of_model(self.model)
        # The model's own inference settings (its registered score's), unless serve sets one.
        overrides = cfg.model_dump(include=set(INFERENCE_KEYS) - {"postprocess"})
        self.predictor = self.task.predictor(self.model, **overrides, postprocess=refinement_of(cfg))
        self._refined: dict[str, Any] = {}      # ?refine= method -> its predictor
        # A predictor that does not tile (panoptic) takes images up to its own limit only.
        own_limit = self.predictor.max_pixels
        max_pixels = cfg.max_pixels if own_limit is None else min(cfg.max_pixels, own_limit)
        self.limits = ImageLimits(max_bytes=cfg.max_body_bytes, max_pixels=max_pixels)
        self.budget = PixelBudget(cfg.max_replica_pixels)
        self.model_facts = {"name": ref.name, "version": ref.version, "uri": ref.uri}

    @staticmethod
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    def predict(self, images: list[np.ndarray]) -> list:
        """A batch of (H, W, 3) uint8 RGB images of any sizes -> the task's predictions
        (semantic: (H, W) uint8 masks)."""
        return self.task.predict(self.predictor, images)

    def predictor_for(self, refine: str | None):
        """The predictor of a request's ``?refine=`` (None: the service's own): the model's own
        refinement when it records that method, else the method with serve's parameters
        (``serve.crf``, ``serve.grabcut``); ``none``: no refinement. ``ValueError`` when the
        model cannot be refined so (grabcut of more than two classes, a library missing)."""
        own = self.predictor.postprocess
        if refine is None or refine == (own.method if own is not None else NO_REFINEMENT):
            return self.predictor
        if refine not in self._refined:
            self._refined[refine] = replace(self.predictor, postprocess=refinement_of(self.cfg, refine))
        return self._refined[refine]

    def predict_one(self, image: np.ndarray, options: api.Options):
        """One image as its request's options ask (its own refinement), outside a batch."""
        return self.task.predict(self.predictor_for(options.task_options.get(REFINE)), [image])[0]

    @staticmethod
    def batched(options: api.Options) -> bool:
        """Whether a request goes into the shared batch (one that asks for no refinement of its own)."""
        return options.task_options.get(REFINE) is None

    def admission(self) -> Admission:
        """``with service.admission() as admitted:`` around parse .. answer of one request."""
        return Admission(self.budget)

    def parse(self, body: bytes, content_type: str | None, query,
              admitted: Admission) -> tuple[np.ndarray, api.Options]:
        """A /predict request -> (RGB image, options); its pixels are taken from the budget
        into ``admitted`` before decoding. Raises ``api.ApiError`` (``Busy`` when full)."""
        options = api.parse_options(query, self.task.answers, self.cfg.overlay_alpha, self.task.query_options)
        refine = options.task_options.get(REFINE)
        try:
            predictor = self.predictor_for(refine)
        except ValueError as exc:
            raise api.ApiError(400, f"refine={refine}: {exc}") from None
        data, declared = api.image_bytes(body, content_type)
        try:
            image = decode_image(data, declared, self.limits, admit=admitted.take)
        except ImageError as exc:
            raise api.ApiError(exc.status, str(exc)) from None
        pixels = image.shape[0] * image.shape[1]
        if predictor.postprocess is not None and pixels > predictor.tile_above_pixels:
            raise api.ApiError(413, f"{predictor.postprocess.method} refines images of at most "
                                    f"{predictor.tile_above_pixels:,} pixels whole; this one has {pixels:,}"
                                    + (" (?refine=none predicts it without)" if refine is None else ""))
        return image, options

    def answer(self, image: np.ndarray, prediction, options: api.Options) -> api.Reply:
        return api.render(options, image, prediction, self.task, self.model.meta, self.model_facts)

    def handle_predict(self, body: bytes, content_type: str | None, query=()) -> api.Reply:
        """One whole request in-process: parse, predict alone, answer."""
        with self.admission() as admitted:
            try:
                image, options = self.parse(body, content_type, query, admitted)
            except api.ApiError as exc:
                return error_answer(exc)
            return self.answer(image, self.predict_one(image, options), options)

    def metadata(self) -> dict[str, Any]:
        meta = self.model.meta
        cfg = self.cfg
        return {
            "model": self.ref.to_dict(), "task": meta.task,
            "classes": list(meta.class_names), "palette": [list(c) for c in meta.palette],
            "normalization": {"mean": list(meta.mean), "std": list(meta.std), "scale": "0-255 -> 0-1"},
            "ignore_index": meta.ignore_index,
            "device": self.device,
            "inference": asdict(self.predictor.settings()) | cfg.model_dump(mode="json", include={
                "max_batch_size", "batch_wait_timeout_s"}) | {
                "from_model": meta.inference is not None and not any(
                    getattr(cfg, key) is not None for key in INFERENCE_KEYS)},
            "limits": {"max_body_bytes": cfg.max_body_bytes, "max_pixels": self.limits.max_pixels,
                       "max_replica_pixels": cfg.max_replica_pixels},
            "answers": self.task.answers,
            "query_options": {name: spec.describe() for name, spec in self.task.query_options.items()},
        }
