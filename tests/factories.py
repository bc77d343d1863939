"""Tiny generated datasets for tests: a few small images and masks written to disk."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def random_image(rng: np.random.Generator, h: int = 24, w: int = 32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# EXIF orientation tag values and how each turns the stored pixels into the displayed image.
EXIF_ORIENTATION = 0x0112
EXIF_ROTATIONS = {6: -1, 8: 1}           # np.rot90 k: 6 = turn 90 degrees clockwise, 8 = anticlockwise


def rotated_jpeg(stored: np.ndarray, orientation: int = 6, quality: int = 95) -> bytes:
    """JPEG bytes of the (h, w, 3) uint8 ``stored`` pixels with an EXIF Orientation tag, as a
    phone writes a photo taken upright; a viewer shows ``displayed(stored, orientation)``."""
    import io

    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def displayed(stored: np.ndarray, orientation: int = 6) -> np.ndarray:
    """The stored pixels turned as EXIF ``orientation`` says (what a viewer shows)."""
    return np.ascontiguousarray(np.rot90(stored, k=EXIF_ROTATIONS[orientation]))


def blob_mask(rng: np.random.Generator, h: int, w: int, num_classes: int) -> np.ndarray:
    """(h, w) uint8 with every class present: horizontal bands plus a random square."""
    mask = (np.arange(h)[:, None] * num_classes // h).repeat(w, axis=1).astype(np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[y:y + h // 4, x:x + w // 4] = rng.integers(0, num_classes)
    return mask


def make_folder_dataset(
    root: Path, n: int = 12, *, num_classes: int = 2, binary_255: bool = False,
    splits: tuple[str, ...] | None = None, size: tuple[int, int] = (24, 32), seed: int = 0,
    image_suffix: str = ".png",
) -> dict[str, np.ndarray]:
    """``root/images`` and ``root/masks`` (flat, or one subfolder per split).

    Returns the class-index mask written for each image key, as training should see it
    (before any 0/255 encoding).
    """
    rng = np.random.default_rng(seed)
    truth = {}
    h, w = size
    for i in range(n):
        sub = f"{splits[i % len(splits)]}/" if splits else ""
        key = f"{sub}img_{i:03d}"
        mask = blob_mask(rng, h, w, num_classes)
        stored = (mask * 255).astype(np.uint8) if binary_255 else mask
        img_path = root / "images" / f"{key}{image_suffix}"
        mask_path = root / "masks" / f"{key}.png"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        random_image(rng, h, w).save(img_path)
        Image.fromarray(stored).save(mask_path)
        truth[key] = mask
    return truth


def make_colour_coded_dataset(root: Path, n: int = 16, num_classes: int = 3,
                              size: tuple[int, int] = (48, 64), seed: int = 0) -> None:
    """Like ``make_folder_dataset``, but each pixel's colour says its class (plus noise),
    so that a few dozen optimiser steps learn it: models of known good quality."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (num_classes, 3))
    h, w = size
    for i in range(n):
        mask = blob_mask(rng, h, w, num_classes)
        image = np.clip(colours[mask] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        for folder, array in (("images", image), ("masks", mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / f"img_{i:03d}.png")


def tiny_model(prepared: Path, seed: int = 0):
    """A small untrained Unet for ``prepared``'s classes, and its ``ModelParams``."""
    import torch

    from pipeline.config import paths
    from pipeline.config.params import ModelParams
    from pipeline.models.base import ModelMeta
    from pipeline.models.registry import build_model
    from pipeline.utils.io import read_json

    torch.manual_seed(seed)
    classes = read_json(prepared / paths.CLASSES_FILE)
    cfg = ModelParams.defaults(arch="Unet", encoder_name="resnet18", encoder_weights=None)
    meta = ModelMeta(classes["names"], classes["palette"], ignore_index=classes["ignore_index"])
    return build_model(cfg, classes["num_classes"], meta), cfg


def fit_tiny_model(prepared: Path, steps: int = 40, seed: int = 0):
    """A small Unet fitted to ``prepared``'s train split with a plain loop (no Ray)."""
    import torch

    from pipeline.config import paths
    from pipeline.data import shards
    from pipeline.inference.tensors import to_tensor
    from pipeline.utils.io import read_json

    model, cfg = tiny_model(prepared, seed)
    classes = read_json(prepared / paths.CLASSES_FILE)
    samples = list(shards.iter_samples(prepared, "train"))
    x = to_tensor([image for _, image, _ in samples], model.meta.mean, model.meta.std)
    y = torch.from_numpy(np.stack([mask for _, _, mask in samples])).long()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=classes["ignore_index"])
    model.train()
    for step in range(steps):
        batch = torch.arange(step * 8, step * 8 + 8) % len(samples)
        optimiser.zero_grad()
        loss_fn(model(x[batch]), y[batch]).backward()
        optimiser.step()
    return model.eval(), cfg


def constant_model(model, class_index: int):
    """``model`` changed to predict ``class_index`` everywhere: a deliberately bad model."""
    import copy

    import torch

    bad = copy.deepcopy(model)
    conv = bad.net.segmentation_head[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-1.0)
        conv.bias[class_index] = 1.0
    return bad


def tracked_model(folder: Path, model, cfg, data_version: str = "test-data") -> str:
    """Save ``model`` to ``folder`` as the train stage would and log it to a new MLflow
    run of the current tracking store; returns the run id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts import tracking
    from pipeline.artifacts.mlflow_model import log_model
    from pipeline.artifacts.model_dir import save_model

    mlflow.set_tracking_uri(tracking.tracking_uri())
    experiment = tracking.experiment_id(MlflowClient(tracking.tracking_uri()))
    with mlflow.start_run(experiment_id=experiment) as run:
        save_model(folder, model, cfg, len(model.meta.class_names), extra={
            "mlflow_run_id": run.info.run_id, "data_version": data_version,
            "params": {"train": {"seed": 0}, "loss": {"terms": {"ce": 1.0}}}})
        mlflow.set_tags({"model_uri": log_model(folder), "git_commit": "test"})
    return run.info.run_id


def registered_model(folder: Path, model, cfg, name: str, alias: str = "champion",
                     test_score: float = 0.9, eval_key: str = "0123456789ab") -> str:
    """``model`` logged to a new run of the current tracking store, registered as a version
    of ``name`` holding ``alias`` and tagged, as the register stage tags it, with a recorded
    evaluation (mIoU ``test_score`` under ``eval_key``); returns the version."""
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts import tracking
    from pipeline.artifacts.records import EVAL_KEY_TAG, SCORE_METRIC_TAG, SCORE_TAG
    from pipeline.register import model_version

    run_id = tracked_model(folder, model, cfg)
    client = MlflowClient(tracking.tracking_uri())
    uri = client.get_run(run_id).data.tags["model_uri"]
    version = model_version(client, name, run_id, uri)
    client.set_model_version_tag(name, version.version, SCORE_TAG, f"{test_score:.6f}")
    client.set_model_version_tag(name, version.version, SCORE_METRIC_TAG, "miou")
    client.set_model_version_tag(name, version.version, EVAL_KEY_TAG, eval_key)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def whole_image_accumulation(model, image: np.ndarray, tile: tuple[int, int], overlap: float):
    """The reference blend: every window's probabilities summed into a whole-image
    (C, H, W) tensor in row-major window order and divided by the windows covering each
    pixel (what pipeline.inference.predictor did before it kept only a band): the reference of
    tests/inference/test_predictor.py and the baseline of bench/predict_bench.py."""
    import torch

    from pipeline.inference.predictor import window_starts
    from pipeline.inference.tensors import to_tensor

    x = to_tensor([image], model.meta.mean, model.meta.std)
    h, w = image.shape[:2]
    th, tw = min(tile[0], h), min(tile[1], w)
    total, hits = None, torch.zeros(1, h, w)
    with torch.no_grad():
        for y in window_starts(h, th, overlap):
            for x0 in window_starts(w, tw, overlap):
                p = model(x[..., y:y + th, x0:x0 + tw])[0].float().softmax(0)
                total = torch.zeros(p.shape[0], h, w) if total is None else total
                total[:, y:y + th, x0:x0 + tw] += p
                hits[:, y:y + th, x0:x0 + tw] += 1
    return total / hits


def repo_params(path: Path, **sections: dict) -> Path:
    """The repository's params.yaml written to ``path`` with each given section's keys
    replaced by those given (every other key keeps the repository's value)."""
    import yaml

    from pipeline.config.params import default_params

    path.write_text(yaml.safe_dump(default_params(sections)))
    return path


def make_nuclei_dataset(root: Path, n: int = 16, size: tuple[int, int] = (64, 80), seed: int = 0,
                        per_image: tuple[int, int] = (2, 5)) -> Path:
    """A DSB 2018 layout (``root/stage1_test/<id>/images/<id>.png`` and one 0/255 mask PNG per
    object in ``masks/``): dark images with bright, separate discs ("nuclei"); returns
    ``root``, the ``download.dataset: dsb2018`` folder."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n):
        image_id = f"{i:04d}" + "ab" * 4
        folder = root / "stage1_test" / image_id
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        image = rng.integers(0, 30, (h, w, 3), dtype=np.uint8)
        taken = np.zeros((h, w), bool)
        for k in range(rng.integers(*per_image, endpoint=True)):
            for _ in range(20):          # a disc that touches no other
                r = int(rng.integers(5, 10))
                cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
                disc = cv2.circle(np.zeros((h, w), np.uint8), (cx, cy), r, 1, -1).astype(bool)
                near = cv2.dilate(disc.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
                if not (near & taken).any():
                    break
            taken |= disc
            image[disc] = rng.integers(170, 230)
            Image.fromarray(disc.astype(np.uint8) * 255).save(folder / "masks" / f"m{k:02d}.png")
        Image.fromarray(image).save(folder / "images" / f"{image_id}.png")
    return root


def recipe_params(recipe: str, path: Path, **sections: dict) -> Path:
    """``recipes/<recipe>.yaml`` written to ``path`` with each given section's keys replaced
    by those given (a whole params file), checked section by section."""
    import yaml

    from pipeline.config import paths
    from pipeline.config.params import SECTIONS, parse_section

    data = yaml.safe_load((paths.REPO_PARAMS_FILE.parent / "recipes" / f"{recipe}.yaml").read_text())
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    for name, model in SECTIONS.items():
        parse_section(model, data.get(name), str(path))
    path.write_text(yaml.safe_dump(data))
    return path


def instance_params(path: Path, **sections: dict) -> Path:
    """The instance task's whole params file: ``recipes/dsb2018.yaml`` with ``sections``' keys."""
    return recipe_params("dsb2018", path, **sections)


class ServeProcess:
    """``python -m pipeline.serve --params <params>`` started in ``cwd`` with ``env``, its output
    in ``log``; ``request`` talks to it over real HTTP on 127.0.0.1. A context manager: ready
    (its log says "serving") on entry, stopped with SIGINT (then SIGKILL) on exit."""

    def __init__(self, params: Path, port: int, cwd: Path, env: dict, log: Path, timeout_s: float = 240):
        self.params, self.cwd, self.env, self.log, self.timeout_s = params, cwd, env, log, timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def __enter__(self) -> ServeProcess:
        import subprocess
        import sys
        import time

        with open(self.log, "w") as out:
            cmd = [sys.executable, "-m", "pipeline.serve", "--params", str(self.params)]
            self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while "serving" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"server did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        import os
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                headers: dict | None = None) -> tuple[int, str, bytes]:
        """(status, media type, body) of one request; HTTP errors are answers too."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=body, method=method, headers=dict(headers or {}))
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.headers.get_content_type(), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get_content_type(), exc.read()

    def predict(self, body: bytes, content_type: str = "image/png", query: str = "",
                ) -> tuple[int, str, bytes]:
        return self.request("POST", f"/predict{query}", body, content_type)


PANOPTIC_CLASSES = ("sky", "road", "car")      # street scenes' classes: two stuff, one thing
PANOPTIC_PALETTE = ((70, 130, 220), (110, 110, 110), (200, 30, 30))


def street_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Blue sky over a grey road (stuff: segments 1 and 2), 1 to 3 red cars (things: separate
    squares, segments 3...) on the road, with noise: (image, segment ids, segments as prepared
    rows hold them: id, class, iscrowd, area, box)."""
    image = np.zeros((h, w, 3), np.uint8)
    ids = np.zeros((h, w), np.int32)
    horizon = int(rng.integers(h // 3, h // 2))
    image[:horizon], ids[:horizon] = PANOPTIC_PALETTE[0], 1
    image[horizon:], ids[horizon:] = PANOPTIC_PALETTE[1], 2
    segments = [{"id": 1, "class": 0}, {"id": 2, "class": 1}]
    for k in range(int(rng.integers(1, 4))):
        side = int(rng.integers(8, 14))
        x0 = 4 + k * (w - 8) // 3
        y0 = int(rng.integers(horizon, h - side))
        image[y0:y0 + side, x0:x0 + side] = PANOPTIC_PALETTE[2]
        ids[y0:y0 + side, x0:x0 + side] = 3 + k
        segments.append({"id": 3 + k, "class": 2})
    image = np.clip(image.astype(int) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    for s in segments:
        ys, xs = np.nonzero(ids == s["id"])
        s.update(iscrowd=False, area=len(ys),
                 box=[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
    return image, ids, segments


def make_panoptic_dataset(root: Path, n: dict[str, int] | None = None, size: tuple[int, int] = (64, 80),
                          seed: int = 0) -> Path:
    """A prepared panoptic dataset of ``street_scene``s written directly
    (``shards.PANOPTIC_SCHEMA``), ``n`` images per split (default train 8, val 4, test 4).
    Returns ``root``."""
    from pipeline.config import paths
    from pipeline.data import shards
    from pipeline.metrics.panoptic_types import encode_png
    from pipeline.utils.io import write_json_atomic

    n = n or {"train": 8, "val": 4, "test": 4}
    rng = np.random.default_rng(seed)
    h, w = size
    for split, count in n.items():
        rows = []
        for i in range(count):
            image, ids, segments = street_scene(rng, h, w)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            rows.append({"id": f"{split}-{i:03d}", "image": buf.getvalue(), "height": h, "width": w,
                         "image_format": "png", "panoptic": encode_png(ids), "segments": segments})
        shards.write_shard(rows, root / split / shards.shard_name(0), shards.PANOPTIC_SCHEMA)
    classes = {"names": list(PANOPTIC_CLASSES), "palette": [list(c) for c in PANOPTIC_PALETTE],
               "num_classes": 3, "ignore_index": 255, "isthing": [False, False, True]}
    write_json_atomic(root / paths.CLASSES_FILE, classes)
    write_json_atomic(root / paths.CARD_JSON, {"task": "panoptic", "dataset": "synthetic", "classes": classes,
                                               "splits": {s: {"images": c} for s, c in n.items()}})
    return root


def make_street_folder(root: Path, n: dict[str, int] | None = None, size: tuple[int, int] = (64, 80),
                       seed: int = 0) -> Path:
    """``street_scene``s as a semantic ``download.dataset: folder`` with a folder per split
    (``images/<split>/``, ``masks/<split>/`` of class indices ``PANOPTIC_CLASSES``; ``n`` images
    per split, default train 8, val 4, test 4): with ``prepare.thing_classes: [car]`` a
    panoptic dataset. Returns ``root``."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, count in (n or {"train": 8, "val": 4, "test": 4}).items():
        for folder in ("images", "masks"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, ids, segments = street_scene(rng, h, w)
            classes = np.zeros((h, w), np.uint8)
            for s in segments:
                classes[ids == s["id"]] = s["class"]
            Image.fromarray(image).save(root / "images" / split / f"street_{i:03d}.png")
            Image.fromarray(classes).save(root / "masks" / split / f"street_{i:03d}.png")
    return root
