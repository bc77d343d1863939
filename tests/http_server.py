"""A real HTTP file server on 127.0.0.1 for download tests, run in a background thread.

    with LoopbackServer() as server:
        server.add("/data.tar.gz", payload, drop_after=1000)
        fetch.download(server.url("/data.tar.gz"), dest, None)
        assert server.requests[1].range == "bytes=1000-"

It serves registered bytes per path, honours ``Range: bytes=N-`` with 206 and
Content-Range, can cut the first response of a path short (full Content-Length in the
headers, then only ``drop_after`` bytes and a closed socket), can answer a path with an
HTTP error status, and records every request it saw.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-$")


@dataclass
class Request:
    path: str
    range: str | None   # the Range header as sent, or None
    status: int         # the status the server answered with
    sent: int           # body bytes actually written


@dataclass
class _Entry:
    data: bytes
    drop_after: int | None = None    # cut the first response after this many body bytes
    honour_range: bool = True        # False: answer every request with 200 and the whole body
    error: int | None = None         # answer with this HTTP status and no body
    chunked: bool = False            # Transfer-Encoding: chunked, no Content-Length


class LoopbackServer:
    """Threaded HTTP server on a free loopback port; a context manager that shuts it down."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- configuration -------------------------------------------------------------
    def add(self, path: str, data: bytes, *, drop_after: int | None = None,
            honour_range: bool = True, chunked: bool = False) -> str:
        """Serve ``data`` at ``path``; returns its URL. ``chunked`` sends the body as one
        HTTP/1.1 chunk with no Content-Length, as hosts that generate files on the fly do."""
        self._entries[path] = _Entry(data, drop_after=drop_after, honour_range=honour_range,
                                     chunked=chunked)
        return self.url(path)

    def fail(self, path: str, status: int) -> str:
        """Answer every request for ``path`` with HTTP ``status``; returns its URL."""
        self._entries[path] = _Entry(b"", error=status)
        return self.url(path)

    def url(self, path: str) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def requests_for(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> LoopbackServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-http",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling ----------------------------------------------------------
    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _first_time(self, path: str) -> bool:
        with self._lock:
            first = path not in self._seen
            self._seen.add(path)
            return first

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so a dropped socket ends only that request.
            protocol_version = "HTTP/1.0"

            def log_message(self, format, *args) -> None:   # keep test output quiet
                pass

            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                entry = server._entries.get(self.path)
                if entry is None or entry.error is not None:
                    status = 404 if entry is None else entry.error
                    server._record(Request(self.path, range_header, status, 0))
                    self.send_error(status)
                    return
                data, start, status = entry.data, 0, 200
                match = _RANGE.match(range_header or "")
                if match and entry.honour_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        server._record(Request(self.path, range_header, 416, 0))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                if entry.chunked:
                    self.protocol_version = "HTTP/1.1"   # chunked coding needs HTTP/1.1
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                if entry.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                drop = entry.drop_after is not None and server._first_time(self.path)
                if drop:
                    body = body[:entry.drop_after]
                # Recorded before the body goes out, so that a client that has read it all
                # always finds its request in the log.
                server._record(Request(self.path, range_header, status, len(body)))
                if entry.chunked:
                    self.wfile.write(f"{len(data) - start:x}\r\n".encode())
                self.wfile.write(body)
                if entry.chunked and not drop:
                    self.wfile.write(b"\r\n0\r\n\r\n")
                if drop:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

        return Handler
