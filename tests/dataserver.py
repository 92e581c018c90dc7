"""A local HTTP file server for the download tests (127.0.0.1 only), with what real servers do:
Range requests (206 + Content-Range, 416 past the end), and on demand a connection dropped part
way through or a range ignored (200 with the whole file)."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


@dataclass
class Behaviour:
    files: dict[str, bytes] = field(default_factory=dict)  # URL path (no leading /) -> content
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> drop the connection after N bytes, once
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class _Handler(BaseHTTPRequestHandler):
    behaviour: Behaviour

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        b = self.behaviour
        path = self.path.lstrip("/")
        b.requests.append((path, self.headers.get("Range")))
        data = b.files.get(path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not b.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = b.cut_after.pop(path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class DataServer:
    """``with DataServer() as server:`` serves ``server.behaviour.files`` at ``server.url``."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.behaviour = Behaviour(files=dict(files or {}))
        handler = type("Handler", (_Handler,), {"behaviour": self.behaviour})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> DataServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def idx_bytes(array: np.ndarray, compress: bool = True) -> bytes:
    """An IDX file (uint8 data) as bytes, gzipped like the official archives."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
    return gzip.compress(raw, mtime=0) if compress else raw
