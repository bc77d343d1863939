"""Serving over HTTP (Ray Serve) against the same predict() in-process, with Serve's own floor.

    python bench/serve_bench.py [--quick] [--size 360x480] [--params params.yaml]
        [--model-dir models/train] [--image FILE] [--query '?format=json']

A model of the params' architecture (random weights, the same compute as the trained
one; or ``--model-dir``, a trained model folder such as the train stage's) is registered in
a temporary MLflow store and served by ``pipeline.serve``'s application on a free loopback
port, with the serve section's settings and the torch thread count of this process. Beside
it runs a no-op deployment that echoes the body: the floor that Ray Serve itself costs. The
payload is one JPEG street-like scene, or ``--image`` (sent as its own bytes), posted to
``/predict`` with ``--query`` (the task's default answer without). For instance
segmentation: ``--params recipes/dsb2018.yaml --model-dir models/train --image <a DSB image>
--query '?format=json'``.

- latency, one client (sequential requests on a kept-alive connection): p50/p95 of
  ``POST /predict`` against ``Service.predict([image])`` in-process, and of the echo;
- throughput with 1, 4 and 8 concurrent clients against in-process ``predict`` on
  batches of the same sizes.

Last line: ``RESULT p50_ms=... inproc_p50_ms=... p50_overhead_ms=... serve_floor_p50_ms=...
throughput_ratio_1=... throughput_ratio_4=... throughput_ratio_8=...`` (targets:
throughput_ratio_8 >= 0.85; p50_overhead_ms <= serve_floor_p50_ms + 2). ``http_minus_replica_ms``
is the mean HTTP time minus the replica's own mean predict time (from /health): Serve's cost
plus ours, without the difference in forward speed between this process and the replica.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import paths  # noqa: E402
from pipeline.config.params import ModelParams, ServeParams, load_params  # noqa: E402
from pipeline.models.base import ModelMeta  # noqa: E402
from pipeline.models.registry import build_model  # noqa: E402
from pipeline.utils.io import read_json  # noqa: E402
from pipeline.viz.overlays import jpeg  # noqa: E402

NAME = "bench-model"


def scene(h: int, w: int) -> np.ndarray:
    """A street-like RGB picture: sky gradient, buildings, road, some texture."""
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 3] = np.linspace([200, 220, 250], [120, 160, 230], h // 3)[:, None, :].astype(np.uint8)
    img[h // 3:] = (110, 110, 105)
    for _ in range(8):
        x, bw, bh = rng.integers(0, w), rng.integers(w // 12, w // 5), rng.integers(h // 5, h // 2)
        cv2.rectangle(img, (int(x), h * 2 // 3 - int(bh)), (int(x + bw), h * 2 // 3),
                      tuple(int(c) for c in rng.integers(60, 200, 3)), -1)
    cv2.line(img, (w // 2, h - 1), (w // 2, h * 2 // 3), (240, 240, 240), 3)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(cv2.GaussianBlur(img, (3, 3), 0) + noise, 0, 255).astype(np.uint8)


def register_model(tmp: Path, cfg: ModelParams, model_dir: Path | None = None):
    """``model_dir``'s model, or a random-weight model of ``cfg``, registered as
    ``NAME``@champion in a store under tmp."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts import tracking
    from pipeline.artifacts.mlflow_model import log_model
    from pipeline.artifacts.model_dir import save_model
    from pipeline.register import model_version

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if model_dir is not None:
        with mlflow.start_run(experiment_id=tracking.experiment_id(client)) as run:
            model_uri = log_model(model_dir)
        client.set_registered_model_alias(NAME, "champion",
                                          model_version(client, NAME, run.info.run_id, model_uri).version)
        return uri
    classes_file = paths.PREPARED_DIR / paths.CLASSES_FILE
    if classes_file.is_file():
        classes = read_json(classes_file)
        names, palette = classes["names"], classes["palette"]
    else:
        names = [f"class{i}" for i in range(11)]
        palette = [[(37 * i) % 256, (91 * i) % 256, (53 * i) % 256] for i in range(11)]
    torch.manual_seed(0)
    model = build_model(cfg, len(names), ModelMeta(names, palette))
    with mlflow.start_run(experiment_id=tracking.experiment_id(client)) as run:
        save_model(tmp / "model", model, cfg, len(names))
        model_uri = log_model(tmp / "model")
    version = model_version(client, NAME, run.info.run_id, model_uri)
    client.set_registered_model_alias(NAME, "champion", version.version)
    return uri


def health(port: int) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
        return json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One kept-alive HTTP connection."""

    def __init__(self, port: int, content_type: str = "image/jpeg"):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        self.content_type = content_type

    def post(self, path: str, body: bytes) -> float:
        start = time.perf_counter()
        self.conn.request("POST", path, body=body, headers={"Content-Type": self.content_type})
        answer = self.conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{path}: {answer.status} {data[:300]!r}")
        return time.perf_counter() - start


def interleaved(calls, n: int, block: int = 5, pause_s: float = 0.3) -> list[list[float]]:
    """Seconds of each call, n times, taken in alternating blocks of ``block`` calls, so
    that all see the same drift in this machine's background load. Each block starts with
    a pause and an untimed call: torch's idle threads in this process keep spinning for a
    moment after an in-process forward and would slow whatever runs right after it."""
    out: list[list[float]] = [[] for _ in calls]
    while len(out[-1]) < n:
        for fn, times in zip(calls, out, strict=True):
            time.sleep(pause_s)
            fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000)


def http_throughput(port: int, body: bytes, clients: int, seconds: float, path: str = "/predict",
                    content_type: str = "image/jpeg") -> float:
    """Images/s answered with ``clients`` connections sending back to back for ``seconds``."""
    done, lock = [0], threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds
    ends = []

    def run() -> None:
        client = Client(port, content_type)
        client.post(path, body)                            # connection set up before the clock matters
        while time.perf_counter() < deadline:
            client.post(path, body)
            with lock:
                done[0] += 1
        ends.append(time.perf_counter())

    threads = [threading.Thread(target=run) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (max(ends) - start)


def inproc_throughput(service, image: np.ndarray, batch: int, seconds: float) -> float:
    service.predict([image] * batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        service.predict([image] * batch)
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and shorter runs")
    parser.add_argument("--size", default="360x480", help="HxW of the test image")
    parser.add_argument("--params", type=Path, default=paths.PARAMS_FILE)
    parser.add_argument("--model-dir", type=Path, help="a trained model folder (default: random weights)")
    parser.add_argument("--image", type=Path, help="the payload (default: a generated JPEG scene)")
    parser.add_argument("--query", default="", help="e.g. '?format=json'")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    n_latency, seconds = (30, 8.0) if args.quick else (100, 25.0)

    import ray
    from ray import serve
    from starlette.responses import Response

    from pipeline.serve import APP_NAME, application, init_ray, wait_healthy
    from pipeline.serving.service import Service, load_segmentation_model, resolve_model

    if args.image:
        from pipeline.data.images import decode_image

        body = args.image.read_bytes()
        image = decode_image(body)
        h, w = image.shape[:2]
    else:
        image = scene(h, w)
        body = jpeg(image, quality=90)
    predict = "/predict" + args.query
    content_type = "image/png" if args.image and args.image.suffix.lower() == ".png" else "image/jpeg"
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DVC_ROOT"] = tmp                       # the MLflow store lives in tmp
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        model_cfg = load_params(ModelParams, args.params).without_pretrained_weights()
        uri = register_model(Path(tmp), model_cfg, args.model_dir and args.model_dir.resolve())
        cfg = load_params(ServeParams, args.params)
        cfg = cfg.model_copy(update={"threads": threads, "port": free_port()})
        ref = resolve_model("champion", NAME, uri)
        service = Service(load_segmentation_model(ref.uri, uri), ref, cfg)

        init_ray(log_to_driver=False)

        @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
        class Echo:
            async def __call__(self, request):
                return Response(await request.body(), media_type="application/octet-stream")

        serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
        serve.run(application(cfg, ref, uri), name=APP_NAME, route_prefix="/")
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        wait_healthy(f"http://127.0.0.1:{cfg.port}", 300)

        client = Client(cfg.port, content_type)
        before = health(cfg.port)
        floor, inproc, served = interleaved([lambda: client.post("/echo", body),
                                             lambda: service.predict([image]),
                                             lambda: client.post(predict, body)], n_latency)
        after = health(cfg.port)
        # The replica's own predict time: what HTTP adds beyond it is Serve plus our decoding,
        # batching and encoding, free of the in-process/replica difference in forward speed.
        replica_ms = 1000 * (after["predict_seconds"] - before["predict_seconds"]) / (
            after["batched_images"] - before["batched_images"])
        rates = {}
        for clients in (1, 4, 8):
            local = inproc_throughput(service, image, clients, seconds)
            remote = http_throughput(cfg.port, body, clients, seconds, predict, content_type)
            rates[clients] = (local, remote)
        serve.shutdown()
        ray.shutdown()

    backbone = getattr(model_cfg, "encoder_name", model_cfg.family)
    print(f"{h}x{w} image of {len(body) / 1024:.0f} KB ({predict}), {model_cfg.arch}/{backbone}, "
          f"{threads} torch threads, max_batch_size {cfg.max_batch_size}, "
          f"batch_wait_timeout_s {cfg.batch_wait_timeout_s}")
    print(f"latency, one client   : HTTP p50 {pct(served, 50):7.1f} ms  p95 {pct(served, 95):7.1f} ms | "
          f"in-process p50 {pct(inproc, 50):7.1f} ms  p95 {pct(inproc, 95):7.1f} ms")
    print(f"Serve floor (echo)    : p50 {pct(floor, 50):7.1f} ms  p95 {pct(floor, 95):7.1f} ms")
    http_mean = statistics.mean(served) * 1000
    print(f"replica predict       : mean {replica_ms:7.1f} ms; HTTP mean {http_mean:7.1f} ms")
    for clients, (local, remote) in rates.items():
        print(f"throughput, {clients} client(s): HTTP {remote:6.2f} img/s | in-process batch {clients}: "
              f"{local:6.2f} img/s | ratio {remote / local:.3f}")
    overhead = statistics.median(served) * 1000 - statistics.median(inproc) * 1000
    result = {
        "p50_ms": pct(served, 50), "p95_ms": pct(served, 95),
        "inproc_p50_ms": pct(inproc, 50), "inproc_p95_ms": pct(inproc, 95),
        "p50_overhead_ms": overhead, "serve_floor_p50_ms": pct(floor, 50),
        "serve_floor_p95_ms": pct(floor, 95),
        "overhead_above_floor_ms": overhead - pct(floor, 50),
        "replica_predict_ms": replica_ms, "http_minus_replica_ms": http_mean - replica_ms,
        **{f"throughput_ratio_{c}": remote / local for c, (local, remote) in rates.items()},
        "http_img_s_8": rates[8][1], "inproc_img_s_8": rates[8][0],
    }
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
