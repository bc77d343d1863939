"""Serve the registered model over HTTP with Ray Serve: a thin shell around ``pipeline.serving.service``.

    python -m pipeline.serve [--model champion|3|models:/...] [--host 127.0.0.1] [--port 8000]
                             [--replicas N] [--gpus-per-replica auto|0|1]
    python -m pipeline.serve --write-config serve_config.yaml   # then: serve run serve_config.yaml

Routes: ``POST /predict`` (see ``pipeline.serving.api``), ``GET /health`` (200 once this replica
has loaded the model, 503 before), ``GET /metadata`` (model version, classes, palette,
normalisation, test metrics, limits). Each replica loads the model once, in the
background, and batches concurrent requests with ``@serve.batch``; decoding and encoding
run in threads beside the batch. With ``RAY_ADDRESS`` set it deploys to that cluster (the
replicas spread over its nodes), else it starts a local one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from pipeline.artifacts import tracking
from pipeline.config.params import PARAMS_FILE, RegisterParams, ServeParams, load_params, parse_section
from pipeline.serving import api
from pipeline.serving.client import ServerError, Unreachable, get_json
from pipeline.serving.service import ModelRef, Service, error_answer, load_segmentation_model, resolve_model
from pipeline.utils import console

APP_NAME = "segmentation"
ROUTES = {"/predict": "POST", "/health": "GET", "/metadata": "GET"}
LOAD_WAIT_S = 120.0
LOAD_FAILED = "the model failed to load"


@serve.deployment
class Segmenter:
    def __init__(self, ref: dict[str, Any], cfg: dict[str, Any], tracking_uri: str):
        self.ref, self.cfg = ModelRef(**ref), ServeParams.model_validate(cfg)
        self.service: Service | None = None
        self.failure: str | None = None
        self.loaded = threading.Event()
        self.batches = self.batched_images = 0        # how much batching happens, in /health
        self.predict_seconds = 0.0
        # The node this replica runs on (in /health); outside Serve (tests) Ray is not started for it.
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.predict_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        threading.Thread(target=self._load, args=(tracking_uri,), name="load-model", daemon=True).start()

    def _load(self, tracking_uri: str) -> None:
        try:
            self.service = Service(load_segmentation_model(self.ref.uri, tracking_uri), self.ref, self.cfg)
        except Exception as exc:  # reported by /health and check_health, not swallowed
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.loaded.set()

    def check_health(self) -> None:
        if self.failure:
            raise RuntimeError(f"model {self.ref.uri} failed to load: {self.failure}")

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        try:
            if ROUTES.get(path) != request.method:
                if path in ROUTES:
                    raise api.ApiError(405, f"{request.method} {path} is not allowed; use {ROUTES[path]}")
                raise api.ApiError(404, f"no route {path}; routes: "
                                        + ", ".join(f"{m} {p}" for p, m in ROUTES.items()))
            if path == "/predict":
                reply = await self._predict(request)
            elif path == "/health":
                reply = self._health()
            else:
                reply = api.json_reply((await self._ready()).metadata())
        except api.ApiError as exc:
            reply = error_answer(exc)
        except Exception as exc:  # a bug, not the client's fault: say so, keep serving
            reply = api.error_reply(500, f"internal error: {type(exc).__name__}: {exc}")
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type,
                        headers=reply.headers)

    async def _predict(self, request: Request) -> api.Reply:
        service = await self._ready()
        api.check_length(request.headers.get("content-length"), self.cfg.max_body_bytes)
        body = await read_body(request, self.cfg.max_body_bytes)
        with service.admission() as admitted:        # decoded pixels held until answered
            image, options = await asyncio.to_thread(
                service.parse, body, request.headers.get("content-type"), request.query_params.multi_items(),
                admitted)
            if service.batched(options):
                prediction = await self.predict_batch(image)
            else:                                    # its own refinement: alone, beside the batches
                prediction = await asyncio.to_thread(service.predict_one, image, options)
            return await asyncio.to_thread(service.answer, image, prediction, options)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def predict_batch(self, images: list) -> list:
        self.batches += 1
        self.batched_images += len(images)
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(self.service.predict, images)
        finally:
            self.predict_seconds += time.perf_counter() - start

    def _health(self) -> api.Reply:
        if self.service is not None:
            return api.json_reply({"status": "ready", "model": self.ref.uri, "batches": self.batches,
                                   "batched_images": self.batched_images,
                                   "predict_seconds": round(self.predict_seconds, 3),
                                   "torch_threads": self.service.threads(), "node": self.node})
        if self.failure:
            return api.json_reply({"status": "failed", "model": self.ref.uri,
                                   "error": f"{LOAD_FAILED}: {self.failure}"}, 503)
        return api.json_reply({"status": "loading", "model": self.ref.uri}, 503)

    async def _ready(self) -> Service:
        deadline = time.monotonic() + LOAD_WAIT_S
        while not self.loaded.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.service is None:
            raise api.ApiError(503, f"model {self.ref.uri} is " + (f"not loaded: {self.failure}"
                                                                  if self.failure else "still loading"))
        return self.service


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise api.ApiError(413, f"body is larger than the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def gpus_per_replica(cfg: ServeParams) -> float:
    """``auto``: one GPU per replica when the Ray cluster has GPUs, else none."""
    if cfg.gpus_per_replica != "auto":
        return float(cfg.gpus_per_replica)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def thread_env(cfg: ServeParams) -> dict[str, Any]:
    """Ray starts an actor with OMP_NUM_THREADS set to its CPU count (1 here); a replica
    with ``serve.threads`` gets that many from the start instead."""
    if not cfg.threads:
        return {}
    return {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cfg.threads)}}}


def application(cfg: ServeParams, ref: ModelRef, tracking_uri: str, gpus: float = 0.0):
    return Segmenter.options(
        num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus, **thread_env(cfg)},
    ).bind(ref.to_dict(), cfg.model_dump(mode="json"), tracking_uri)


def settings(overrides: dict[str, Any], params: Path = PARAMS_FILE) -> tuple[ServeParams, str]:
    """params.yaml's serve section with non-None ``overrides``; and the registered model's name."""
    base = load_params(ServeParams, params).model_dump(mode="json")
    cfg = parse_section(ServeParams, base | {k: v for k, v in overrides.items() if v is not None},
                        f"{params} + command line")
    return cfg, load_params(RegisterParams, params).model_name


def build_app(args: dict[str, Any]):
    """Application builder for ``serve run`` / ``serve deploy`` configs: ``args`` are
    serve-section overrides plus optional ``params`` (path) and ``tracking_uri``."""
    args = dict(args or {})
    params = Path(args.pop("params", PARAMS_FILE))
    uri = args.pop("tracking_uri", None) or tracking.tracking_uri()
    cfg, name = settings(args, params)
    return application(cfg, resolve_model(cfg.model, name, uri), uri, gpus_per_replica(cfg))


def write_config(path: Path, cfg: ServeParams, params: Path) -> None:
    """A ``serve run``/``serve deploy`` config for this application (atomic write)."""
    import yaml

    from pipeline.utils.io import write_text_atomic

    config = {
        "proxy_location": cfg.proxy_location,
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "pipeline.serve:build_app",
            "args": {"params": str(params.resolve()), "tracking_uri": tracking.tracking_uri()},
        }],
    }
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_healthy(url: str, timeout_s: float) -> dict[str, Any]:
    """Poll ``url``/health until it answers 200; raise with its last answer otherwise."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            return get_json(url, "/health", timeout=5)
        except ServerError as exc:
            last = exc.message
            if last.startswith(LOAD_FAILED):
                break
        except Unreachable as exc:
            last = str(exc)
        time.sleep(0.25)
    raise RuntimeError(f"{url}/health not ready after {timeout_s:.0f} s: {last}")


def init_ray(log_to_driver: bool = True) -> None:
    """Join ``$RAY_ADDRESS``, else start a local cluster whose workers run at normal
    priority: Ray starts workers at nice 15, so on a small machine every Ray daemon and
    the HTTP proxy pre-empt the replica doing the work."""
    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_worker_niceness", "0")
        console.choose_ray_auth_mode()
    level = console.ray_log_level()
    # Without $RAY_ADDRESS a new local cluster, never one an earlier `ray start` left its address for.
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver, logging_level=level)
    logging.getLogger("ray.serve").setLevel(level)    # Serve's own handler: ray.init's level misses it


def start(cfg: ServeParams, ref: ModelRef, tracking_uri: str, timeout_s: float = 300.0) -> str:
    """Deploy on the Ray cluster (``$RAY_ADDRESS`` or a new local one); returns the base URL
    once /health answers."""
    init_ray()
    # Serve's controller and proxies at $SEG_RAY_LOG_LEVEL; the replicas keep their access log.
    serve.start(proxy_location=cfg.proxy_location, http_options={"host": cfg.host, "port": cfg.port},
                logging_config={"log_level": console.ray_log_level()})
    serve.run(application(cfg, ref, tracking_uri, gpus_per_replica(cfg)), name=APP_NAME,
              route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}"
    wait_healthy(url, timeout_s)
    return url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="alias, version number, models:/ or runs:/ URI (serve.model)")
    parser.add_argument("--host", help="address to bind (serve.host, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (serve.port)")
    parser.add_argument("--replicas", type=int, help="number of replicas (serve.replicas)")
    parser.add_argument("--gpus-per-replica", help="auto or a number (serve.gpus_per_replica)")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--write-config", type=Path, metavar="PATH",
                        help="write a `serve run` config and exit instead of serving")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gpus = args.gpus_per_replica
    if gpus is not None and gpus != "auto":
        gpus = float(gpus)
    cfg, name = settings({"model": args.model, "host": args.host, "port": args.port,
                          "replicas": args.replicas, "gpus_per_replica": gpus}, args.params)
    if args.write_config:
        write_config(args.write_config, cfg, args.params)
        print(f"wrote {args.write_config}; start it with: serve run {args.write_config}")
        return
    uri = tracking.tracking_uri()
    try:
        ref = resolve_model(cfg.model, name, uri)
    except LookupError as exc:
        sys.exit(f"error: {exc}")
    if not os.environ.get("RAY_ADDRESS") and not port_free(cfg.host, cfg.port):
        sys.exit(f"error: port {cfg.port} on {cfg.host} is in use; pick another with --port")
    url = start(cfg, ref, uri)
    print(f"serving {ref.name or ref.uri} version {ref.version or '-'} ({ref.uri}) at {url}: "
          f"POST {url}/predict, GET {url}/health, GET {url}/metadata; Ctrl-C stops", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)
    serve.shutdown()


if __name__ == "__main__":
    main()
