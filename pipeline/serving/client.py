"""Send images to the served model and save its answers.

    python -m pipeline.client IMAGE_OR_DIR... --out DIR [--url http://127.0.0.1:8000]
                              [--format png|json|overlay] [--alpha 0.5] [--workers 4]

Each image goes as the raw request body with its Content-Type (from the file name); the
answer is written to ``DIR/<stem>.png`` (palette mask), ``.json`` or ``.jpg`` (overlay),
each file whole (temp file, then rename). A directory argument stands for the image files
in it. A progress bar shows for many images; refused images are listed with the server's
reason, and the exit status is 1 if any was refused, 2 if the server cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.utils.io import write_bytes_atomic

DEFAULT_URL = "http://127.0.0.1:8000"
SUFFIXES = {"png": ".png", "json": ".json", "overlay": ".jpg"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


class ServerError(RuntimeError):
    """The server answered with an error (``status`` and its message)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status} {message}")
        self.status, self.message = status, message


class Unreachable(ConnectionError):
    """Nothing answers at the URL."""


@dataclass(frozen=True)
class Answer:
    body: bytes
    media_type: str


def content_type(path: Path) -> str:
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def post_image(url: str, data: bytes, declared: str, fmt: str = "png", alpha: float | None = None,
               timeout: float = 120.0, options: dict[str, Any] | None = None) -> Answer:
    """POST ``data`` to ``url``/predict; the answer, or ``ServerError`` / ``Unreachable``.
    ``options``: the task's own query parameters (``/metadata``'s ``query_options``)."""
    query = {"format": fmt} | ({"alpha": f"{alpha:g}"} if alpha is not None else {}) | (options or {})
    request = urllib.request.Request(f"{url.rstrip('/')}/predict?{urllib.parse.urlencode(query)}", data=data,
                                     headers={"Content-Type": declared}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return Answer(r.read(), r.headers.get_content_type())
    except urllib.error.HTTPError as exc:
        raise ServerError(exc.code, _message(exc.read())) from None
    except urllib.error.URLError as exc:
        raise Unreachable(f"cannot reach {url}: {exc.reason}; start the server with "
                          "`python -m pipeline.serve`") from None


def get_json(url: str, route: str, timeout: float = 10.0) -> dict:
    """GET ``url``/``route`` as JSON (``/health``, ``/metadata``)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/{route.lstrip('/')}", timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise ServerError(exc.code, _message(exc.read())) from None
    except urllib.error.URLError as exc:
        raise Unreachable(f"cannot reach {url}: {exc.reason}") from None


def _message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]


def expand(inputs: list[Path]) -> list[Path]:
    """Files as given; directories -> their image files, sorted. Missing paths are errors."""
    files = []
    for path in inputs:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise ValueError(f"{stems[path.stem]} and {path} would both be written as {path.stem}.*; "
                             "send them in separate runs or to separate --out folders")
        stems[path.stem] = path
    return files


def predict_files(files: list[Path], out: Path, url: str = DEFAULT_URL, fmt: str = "png",
                  alpha: float | None = None, workers: int = 4, progress: bool | None = None
                  ) -> dict[Path, str]:
    """Predict every file, writing ``out/<stem><suffix>``; returns {file: reason} of refusals."""
    out.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> tuple[Path, str | None]:
        try:
            answer = post_image(url, path.read_bytes(), content_type(path), fmt, alpha)
        except ServerError as exc:
            return path, str(exc)
        write_bytes_atomic(out / f"{path.stem}{SUFFIXES[fmt]}", answer.body)
        return path, None

    failed: dict[Path, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        bar = tqdm(pool.map(one, files), total=len(files), unit="image", disable=_quiet(progress, files))
        for path, reason in bar:
            if reason is not None:
                failed[path] = reason
    return failed


def _quiet(progress: bool | None, files: list[Path]) -> bool | None:
    if progress is None:
        return None if len(files) > 1 else True     # tqdm's None: shown on a terminal only
    return not progress


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.client", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    parser.add_argument("--out", type=Path, required=True, help="folder for the answers")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server (default {DEFAULT_URL})")
    parser.add_argument("--format", choices=list(SUFFIXES), default="png")
    parser.add_argument("--alpha", type=float, help="overlay opacity, 0-1 (server default otherwise)")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once")
    args = parser.parse_args(argv)
    try:
        files = expand(args.images)
        failed = predict_files(files, args.out, args.url, args.format, args.alpha, args.workers)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for path, reason in failed.items():
        print(f"{path}: refused: {reason}", file=sys.stderr)
    print(f"{len(files) - len(failed)} of {len(files)} images answered; written to {args.out}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
