"""The Ray Serve application over real HTTP: `python -m pipeline.serve` on a free loopback
port, serving a small real model registered in a temporary MLflow store."""

import http.client
import io
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config.params import ServeParams, default_params
from pipeline.data.images import decode_image
from pipeline.inference.predictor import Predictor
from pipeline.models.base import InferenceSettings
from pipeline.serving.service import ModelRef, Service, replica_threads
from tests.conftest import CLASSES
from tests.factories import ServeProcess, displayed, free_port, registered_model, rotated_jpeg

NAME = "served-unet"
MAX_BODY = 300_000
MAX_PIXELS = 1_000_000
TILE_ABOVE = 4096           # images above 64x64 go through 32x48 tiles
ROOT = Path(__file__).resolve().parents[1]


def encode(image, fmt="PNG", **kw) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def picture(h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


class Server(ServeProcess):
    """The served model and the predictor that gives the same masks in-process."""

    def __init__(self, params: Path, port: int, cwd: Path, env: dict, log: Path, model):
        super().__init__(params, port, cwd, env, log)
        self.model = model
        self.predictor = Predictor(model, tile_above_pixels=TILE_ABOVE, tile_size=(32, 48), tile_overlap=0.25)


@pytest.fixture(scope="module")
def server(fitted, tmp_path_factory):
    model, cfg = fitted
    tmp = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert registered_model(tmp / "model", model, cfg, NAME, test_score=0.87) == "1"
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    port = free_port()
    (tmp / "params.yaml").write_text(yaml.safe_dump(default_params({
        "register": {"model_name": NAME},
        "serve": {"port": port, "max_batch_size": 4, "max_body_bytes": MAX_BODY, "max_pixels": MAX_PIXELS,
                  "tile_above_pixels": TILE_ABOVE, "tile_size": [32, 48], "threads": 1},
    })))
    with Server(tmp / "params.yaml", port, tmp, env, tmp / "serve.log", model) as srv:
        yield srv


def mask_of(body: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(body))
    assert image.mode == "P"
    return np.asarray(image)


def agree(a: np.ndarray, b: np.ndarray) -> None:
    """Same shape, and the same class on all but a rounding-level share of pixels
    (a batched forward may order floating-point sums differently from a single one)."""
    assert a.shape == b.shape
    assert (a != b).mean() < 1e-3


def test_health_and_metadata(server):
    status, ctype, body = server.request("GET", "/health")
    health = json.loads(body)
    assert status == 200 and ctype == "application/json" and health["status"] == "ready"
    assert health["model"] == f"models:/{NAME}/1"
    status, _, body = server.request("GET", "/metadata")
    meta = json.loads(body)
    assert status == 200
    model = meta["model"]
    assert (model["name"], model["version"], model["alias"]) == (NAME, "1", "champion")
    assert model["evaluation"] == {"score_metric": "miou", "test_score": pytest.approx(0.87),
                                   "eval_key": "0123456789ab", "split_version": None}
    assert meta["classes"] == CLASSES and len(meta["palette"]) == 3
    assert meta["normalization"]["mean"] == pytest.approx(list(server.model.meta.mean))
    assert meta["limits"] == {"max_body_bytes": MAX_BODY, "max_pixels": MAX_PIXELS,
                              "max_replica_pixels": ServeParams.defaults().max_replica_pixels}
    assert meta["inference"]["max_batch_size"] == 4


@pytest.mark.parametrize("h,w", [(37, 53), (1, 1), (64, 64), (97, 131)])
def test_png_mask_for_odd_sizes_and_tiles(server, h, w):
    image = picture(h, w, seed=h)
    status, ctype, body = server.predict(encode(image))
    assert status == 200 and ctype == "image/png"
    mask = mask_of(body)
    agree(mask, server.predictor.mask(image))       # 97x131 goes through tiles
    palette = Image.open(io.BytesIO(body)).getpalette()[:9]
    assert [tuple(palette[i:i + 3]) for i in range(0, 9, 3)] == [tuple(c) for c in server.model.meta.palette]


@pytest.mark.parametrize("fmt,ctype,kw", [
    ("JPEG", "image/jpeg", {"quality": 95}), ("TIFF", "image/tiff", {}), ("BMP", "image/bmp", {}),
    ("WEBP", "image/webp", {"lossless": True}), ("PNG", "application/octet-stream", {})])
def test_every_accepted_format(server, fmt, ctype, kw):
    status, _, body = server.predict(encode(picture(30, 41), fmt, **kw), ctype)
    assert status == 200 and mask_of(body).shape == (30, 41)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16"])
def test_unusual_channel_layouts_are_converted(server, mode):
    image = Image.fromarray(picture(21, 34)).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    status, _, body = server.predict(encode(image))
    assert status == 200, body
    assert mask_of(body).shape == (21, 34)


def multipart(fields, boundary="XyZ123"):
    """fields: (name, filename, content type, bytes)."""
    out = b""
    for name, filename, ctype, data in fields:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                f"filename=\"{filename}\"\r\nContent-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_upload(server):
    image = picture(40, 60, seed=3)
    body, ctype = multipart([("note", "a.txt", "text/plain", b"hello"), ("image", "x.png", "image/png",
                                                                          encode(image))])
    status, _, answer = server.predict(body, ctype)
    assert status == 200
    agree(mask_of(answer), server.predictor.mask(image))


def test_json_answer_counts_and_rle(server):
    from pycocotools import mask as rle

    image = picture(45, 70, seed=5)
    status, ctype, body = server.predict(encode(image), query="?format=json")
    assert status == 200 and ctype == "application/json"
    answer = json.loads(body)
    _, _, png = server.predict(encode(image))
    mask = mask_of(png)
    assert (answer["width"], answer["height"]) == (70, 45)
    assert answer["model"] == {"name": NAME, "version": "1", "uri": f"models:/{NAME}/1"}
    assert [c["name"] for c in answer["classes"]] == CLASSES
    assert sum(c["pixels"] for c in answer["classes"]) == 45 * 70
    assert sum(c["fraction"] for c in answer["classes"]) == pytest.approx(1.0)
    for c in answer["classes"]:
        assert c["pixels"] == int((mask == c["index"]).sum())
        if c["pixels"]:
            decoded = rle.decode({"size": c["rle"]["size"], "counts": c["rle"]["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), mask == c["index"])
        else:
            assert c["rle"] is None


def test_overlay_answer(server):
    ys, xs = np.mgrid[0:50, 0:66]
    image = np.stack([xs * 3, ys * 4, np.full_like(xs, 120)], axis=-1).astype(np.uint8)   # smooth, for JPEG
    status, ctype, body = server.predict(encode(image), query="?format=overlay&alpha=0")
    assert status == 200 and ctype == "image/jpeg"
    overlay = np.asarray(Image.open(io.BytesIO(body)))
    assert overlay.shape == (50, 66, 3)
    assert np.abs(overlay.astype(int) - image).mean() < 4       # alpha 0: the image itself (JPEG noise)
    status, _, body = server.predict(encode(image), query="?format=overlay&alpha=1")
    colours = np.asarray(server.model.meta.palette, np.uint8)[server.predictor.mask(image)]
    assert np.abs(np.asarray(Image.open(io.BytesIO(body))).astype(int) - colours).mean() < 12


def test_concurrent_requests_of_mixed_sizes_are_batched_correctly(server):
    sizes = [(33, 47), (48, 64), (20, 90), (33, 47)] * 6
    images = [picture(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    before = json.loads(server.request("GET", "/health")[2])
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda im: server.predict(encode(im)), images))
    for image, (status, _, body) in zip(images, answers, strict=True):
        assert status == 200
        agree(mask_of(body), server.predictor.mask(image))
    after = json.loads(server.request("GET", "/health")[2])
    batches = after["batches"] - before["batches"]
    assert after["batched_images"] - before["batched_images"] == len(images)
    assert batches < len(images), "concurrent requests were never batched"


def test_exif_rotated_phone_photo_is_segmented_upright(server):
    stored = picture(40, 56, seed=5)                  # stored landscape, shown portrait
    body = rotated_jpeg(stored, 6)
    status, _, answer = server.predict(body, "image/jpeg")
    assert status == 200
    mask = mask_of(answer)
    assert mask.shape == (56, 40) == displayed(stored, 6).shape[:2]
    agree(mask, server.predictor.mask(decode_image(body, "image/jpeg")))


def png_header(width, height) -> bytes:
    """A valid PNG start declaring width x height, with a few bytes of pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
            + chunk(b"IEND", b""))


GOOD = encode(picture(30, 40))
JPEG = encode(picture(30, 40), "JPEG")
BAD_INPUTS = {
    "empty body": ("POST", "/predict", b"", "image/png", 400, "empty body"),
    "body over the limit": ("POST", "/predict", b"\x89PNG" + b"0" * MAX_BODY, "image/png", 413,
                            "larger than"),
    "text content type": ("POST", "/predict", GOOD, "text/plain", 415, "not an accepted image type"),
    "json content type": ("POST", "/predict", b"{}", "application/json", 415, "not an accepted image type"),
    "svg": ("POST", "/predict", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", 415,
            "not an accepted image type"),
    "random bytes": ("POST", "/predict", bytes(range(256)) * 4, "image/png", 415, "not an image"),
    "pdf declared png": ("POST", "/predict", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" * 20, "image/png", 415,
                         "not an image"),
    "gif": ("POST", "/predict", encode(picture(8, 8), "GIF"), "image/gif", 415, "not an accepted image type"),
    "gif as octet-stream": ("POST", "/predict", encode(picture(8, 8), "GIF"), "application/octet-stream", 415,
                            "GIF is not accepted"),
    "truncated png": ("POST", "/predict", GOOD[: len(GOOD) // 2], "image/png", 400, "truncated"),
    "truncated jpeg": ("POST", "/predict", JPEG[: len(JPEG) // 2], "image/jpeg", 400, "truncated"),
    "decompression bomb header": ("POST", "/predict", png_header(100_000, 100_000), "image/png", 413,
                                  "pixels"),
    "too many pixels": ("POST", "/predict", encode(np.zeros((1001, 1000, 3), np.uint8)), "image/png", 413,
                        "pixels"),
    "float tiff": ("POST", "/predict", encode(Image.fromarray(np.zeros((5, 5), np.float32)), "TIFF"),
                   "image/tiff", 400, "floating-point"),
    "unknown format": ("POST", "/predict?format=xml", GOOD, "image/png", 400, "format='xml'"),
    "alpha out of range": ("POST", "/predict?format=overlay&alpha=2", GOOD, "image/png", 400, "alpha"),
    "alpha not a number": ("POST", "/predict?format=overlay&alpha=half", GOOD, "image/png", 400, "alpha"),
    "unknown parameter": ("POST", "/predict?colour=red", GOOD, "image/png", 400, "unknown query parameter"),
    "repeated parameter": ("POST", "/predict?format=png&format=json", GOOD, "image/png", 400,
                           "more than once"),
    "multipart without image field": ("POST", "/predict", *multipart([("file", "x.png", "image/png", GOOD)]),
                                      400, "no field 'image'"),
    "multipart with two images": ("POST", "/predict", *multipart([("image", "a.png", "image/png", GOOD)] * 2),
                                  400, "2 'image' fields"),
    "multipart without boundary": ("POST", "/predict", GOOD, "multipart/form-data", 400, "boundary"),
    "multipart unclosed": ("POST", "/predict", multipart([("image", "a.png", "image/png", GOOD)])[0][:-20],
                           "multipart/form-data; boundary=XyZ123", 400, "multipart"),
    "multipart text part": ("POST", "/predict", *multipart([("image", "a.txt", "text/plain", b"hello")]), 415,
                            "not an accepted image type"),
    "GET /predict": ("GET", "/predict", None, None, 405, "use POST"),
    "POST /health": ("POST", "/health", b"x", "image/png", 405, "use GET"),
    "unknown route": ("GET", "/segment", None, None, 404, "no route"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_json_error(server, kind):
    method, path, body, ctype, status, words = BAD_INPUTS[kind]
    got, answer_type, answer = server.request(method, path, body, ctype)
    assert got == status, answer
    assert answer_type == "application/json"
    error = json.loads(answer)
    assert error["status"] == status and words in error["error"], error


def test_chunked_body_over_the_limit_is_refused_while_reading(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (b"\x00" * 65536 for _ in range(MAX_BODY // 65536 + 2))
    conn.request("POST", "/predict", body=chunks, headers={"Content-Type": "image/png"}, encode_chunked=True)
    answer = conn.getresponse()
    assert answer.status == 413 and "larger than the limit" in json.loads(answer.read())["error"]


def test_still_serving_after_bad_input(server):
    for method, path, body, ctype, *_ in BAD_INPUTS.values():
        server.request(method, path, body, ctype)
    assert server.request("GET", "/health")[0] == 200
    status, _, body = server.predict(GOOD)
    assert status == 200 and mask_of(body).shape == (30, 40)


def test_client_cli(server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(30, 40), (25, 61), (48, 48)]):
        Image.fromarray(picture(h, w, seed=i)).save(images / f"img{i}.{['png', 'jpg', 'webp'][i]}")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    cmd = [sys.executable, "-m", "pipeline.client", "--url", server.url, "--out", str(tmp_path / "out")]
    done = subprocess.run([*cmd, str(images), "--format", "json"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "3 of 3 images answered" in done.stdout
    sizes = {p.name: (json.loads(p.read_text())["height"], json.loads(p.read_text())["width"])
             for p in (tmp_path / "out").iterdir()}
    assert sizes == {"img0.json": (30, 40), "img1.json": (25, 61), "img2.json": (48, 48)}

    done = subprocess.run([*cmd, str(images / "img0.png"), str(tmp_path / "broken.png")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "broken.png: refused: 415" in done.stderr and "1 of 2 images answered" in done.stdout
    assert mask_of((tmp_path / "out" / "img0.png").read_bytes()).shape == (30, 40)
    assert not (tmp_path / "out" / "broken.png").exists()

    down = [sys.executable, "-m", "pipeline.client", "--url", f"http://127.0.0.1:{free_port()}",
            "--out", str(tmp_path / "x"), str(images / "img0.png")]
    done = subprocess.run(down, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "cannot reach" in done.stderr


CLUSTER_SCRIPT = textwrap.dedent("""
    import json, sys, time, urllib.error, urllib.request
    import ray
    import yaml
    from ray.cluster_utils import Cluster
    from pipeline import serve
    from pipeline.artifacts import tracking
    from pipeline.config.params import ServeParams
    from pipeline.serving.service import resolve_model

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = ServeParams.model_validate(yaml.safe_load(open(sys.argv[1]))["serve"])
        ref = resolve_model("champion", sys.argv[2], tracking.tracking_uri())
        url = serve.start(cfg, ref, tracking.tracking_uri())
        # Each replica loads the model in the background: a replica still loading answers 503.
        nodes, deadline = set(), time.monotonic() + 120
        while len(nodes) < 2 and time.monotonic() < deadline:
            try:
                nodes.add(json.loads(urllib.request.urlopen(url + "/health").read())["node"])
            except urllib.error.HTTPError as exc:
                assert exc.code == 503 and json.loads(exc.read())["status"] == "loading"
                time.sleep(0.2)
        print("NODES", len(nodes), len(ray.nodes()))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_replicas_spread_over_a_two_node_cluster(fitted, env):
    model, cfg = fitted
    registered_model(env / "model", model, cfg, NAME)
    (env / "params.yaml").write_text(yaml.safe_dump(default_params({"serve": {
        "port": free_port(), "replicas": 2, "cpus_per_replica": 0.5, "proxy_location": "HeadOnly",
        "threads": 1}})))
    proc = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, str(env / "params.yaml"), NAME], cwd=env,
                          capture_output=True, text=True, timeout=300,
                          # Proxies prefer replicas on their own node: off, so /health reaches both.
                          env={**os.environ, "RAY_AUTH_MODE": "disabled",
                               "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NODES 2 2" in proc.stdout, proc.stdout[-2000:]


def test_default_threads_share_the_node_cores_among_its_replicas():
    assert replica_threads(None, replicas=1, node_cores=16) == 16
    assert replica_threads(None, replicas=4, node_cores=16) == 4
    assert replica_threads(None, replicas=3, node_cores=16) == 5
    assert replica_threads(None, replicas=32, node_cores=16) == 1          # at least one
    assert replica_threads(6, replicas=4, node_cores=16) == 6             # serve.threads wins
    for cores in (1, 2, 3, 16, 64):
        for replicas in range(1, 70):
            threads = replica_threads(None, replicas, cores)
            assert threads >= 1 and (replicas * threads <= cores or threads == 1)


@pytest.fixture
def torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_service_of_two_replicas_takes_half_the_cores(fitted, torch_threads):
    model, _ = fitted
    service = Service(model, ModelRef(uri="models:/m/1"), ServeParams.defaults(replicas=2))
    cores = len(os.sched_getaffinity(0))
    assert service.threads() == max(1, cores // 2)


def test_a_replica_predicts_with_the_models_own_inference_settings_unless_serve_sets_them(
        fitted, torch_threads):
    import copy
    import dataclasses

    model, _ = fitted
    own = InferenceSettings(flip_tta=True, scales=(0.75, 1.0), tile_above_pixels=1024, tile_size=(32, 32),
                            tile_overlap=0.25)
    recorded = copy.deepcopy(model)
    recorded.meta = dataclasses.replace(model.meta, inference=own)
    service = Service(recorded, ModelRef(uri="models:/m/1"), ServeParams.defaults(threads=1))
    assert service.predictor.settings() == own
    inference = service.metadata()["inference"]
    assert inference["from_model"] and inference["scales"] == (0.75, 1.0) and inference["flip_tta"]
    image = picture(48, 64)
    expected = Predictor(recorded, **dataclasses.asdict(own)).mask(image)
    np.testing.assert_array_equal(service.predict([image])[0], expected)
    plain = Predictor(recorded).probs(image)                            # the settings matter here
    assert (service.predictor.probs(image) - plain).abs().max() > 1e-4
    told = Service(recorded, ModelRef(uri="models:/m/1"),
                   ServeParams.defaults(threads=1, scales=[1.0], flip_tta=False))
    assert told.predictor.settings() == dataclasses.replace(own, flip_tta=False, scales=(1.0,))
    assert not told.metadata()["inference"]["from_model"]


def test_replica_pixel_budget_refuses_with_503_before_decoding(fitted, torch_threads):
    model, _ = fitted
    cfg = ServeParams.defaults(max_pixels=10_000, max_replica_pixels=12_000, threads=1)
    service = Service(model, ModelRef(uri="models:/m/1"), cfg)
    image = picture(50, 100)                                  # 5,000 pixels
    good = encode(image)
    truncated = good[: len(good) // 2]                        # a 400 once decoding starts
    with service.admission() as others:                       # other requests in flight
        others.take(8_000)
        busy = service.handle_predict(good, "image/png")
        also_busy = service.handle_predict(truncated, "image/png")
        assert service.budget.held == 8_000
    assert busy.status == 503 and busy.media_type == "application/json"
    assert busy.headers.get("Retry-After") == "1"
    message = json.loads(busy.body)["error"]
    assert "serve.max_replica_pixels" in message and "12,000" in message and "5,000" in message
    assert also_busy.status == 503                            # refused before any pixel was decoded
    assert service.handle_predict(truncated, "image/png").status == 400
    ok = service.handle_predict(good, "image/png")
    assert ok.status == 200
    np.testing.assert_array_equal(mask_of(ok.body), Predictor(model).mask(image))
    assert service.budget.held == 0                           # every request gave its pixels back


def test_replica_pixel_budget_must_hold_one_largest_image():
    from pipeline.config.params import ParamsError

    with pytest.raises(ParamsError, match="max_replica_pixels"):
        ServeParams.defaults(max_pixels=2_000_000, max_replica_pixels=1_000_000)
