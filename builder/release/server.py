"""The embedded static HTTP server for a repository's `www/` tree (demos and tests).

Production uses any static server, object store or CDN (see deploy/nginx.conf):
nothing here is trusted by devices, TUF metadata is. So this server only has
to be correct HTTP: GET/HEAD, single `Range: bytes=a-b` requests (206 with
Content-Range, 416 when unsatisfiable), threaded, bound to 127.0.0.1 unless
told otherwise. File bodies go out with sendfile(2).
"""

from __future__ import annotations

import http.server
import logging
import os
import re
import threading
from functools import partial
from pathlib import Path

log = logging.getLogger(__name__)

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single-range `Range` header against a file of `size` bytes.

    Returns the inclusive (start, end) to send, or None when it is unsatisfiable.
    Raises ValueError for a header that is not a single byte range (it is then ignored
    and the whole file is sent, as RFC 9110 allows).
    """
    match = _RANGE_RE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        raise ValueError(f"unsupported Range header {header!r}")
    first, last = match.group(1), match.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus `Range`, no directory listings, sendfile bodies."""

    protocol_version = "HTTP/1.1"
    server_version = "edgefleet-serve"

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404, "directory listing disabled")
        return None

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("event=http_request client=%s %s", self.address_string(), format % args)

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            self.send_error(404, "not found")
            return
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404, "not found")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            start, end, status = 0, size - 1, 200
            header = self.headers.get("Range")
            if header is not None:
                try:
                    wanted = parse_range(header, size)
                    status = 206
                except ValueError:
                    wanted = (0, size - 1)  # not a single byte range: send the whole file
                if wanted is None:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = wanted
            length = max(0, end - start + 1)
            self.send_response(status)
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Length", str(length))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Last-Modified", self.date_time_string(int(os.fstat(f.fileno()).st_mtime)))
            self.end_headers()
            if send_body and length:
                self.send_body(f, start, length)

    def send_body(self, f: os.PathLike[str] | object, offset: int, count: int) -> None:
        """Send `count` bytes of open file `f` from `offset` (tests override this to inject faults)."""
        self.wfile.flush()
        try:
            self.connection.sendfile(f, offset, count)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("event=client_gone path=%s", self.path)


class RepoHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(directory: Path, host: str = "127.0.0.1", port: int = 0,
                handler_class: type[RangeRequestHandler] = RangeRequestHandler) -> RepoHTTPServer:
    """Bind a threaded server for `directory` (port 0 picks a free port: read `server_address`)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    return RepoHTTPServer((host, port), partial(handler_class, directory=str(directory)))


def serve_in_thread(server: RepoHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="repo-http", daemon=True)
    thread.start()
    return thread
