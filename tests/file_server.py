"""A real HTTP/1.1 file server on loopback, for pulls: Range requests (206, 416, If-Range
with an ETag), redirect chains, 404, and downloads cut off part-way.

What `appliance models pull` meets on the Internet (Hugging Face `resolve` URLs redirect to
a CDN that serves ranges), served by the standard library's HTTP server in a thread. Each
request is recorded (method, path, Range header) so a test can see what the client asked.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
CHUNK = 1024 * 1024


@dataclass
class Served:
    """One file: its bytes on disk, and how many of the next requests for it are cut off
    (at byte `cut_at` of the file)."""

    path: Path
    cut_at: int | None = None
    cuts_left: int = 0

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def etag(self) -> str:
        info = self.path.stat()
        return (
            '"'
            + hashlib.sha256(f"{info.st_size}-{info.st_mtime_ns}".encode()).hexdigest()[:16]
            + '"'
        )


@dataclass
class FileServer:
    """What is served and what was asked; `url(path)` is where."""

    port: int = 0
    files: dict[str, Served] = field(default_factory=dict)
    # path -> Location: a redirect anywhere (another host, say).
    redirects: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, file: Path, *, cut_at: int | None = None, cuts: int = 0) -> str:
        self.files[path] = Served(file, cut_at, cuts)
        return self.url(path)

    def ranges_asked(self, path: str) -> list[str | None]:
        with self.lock:
            return [
                rng for method, asked, rng in self.requests if asked == path and method == "GET"
            ]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        with state.lock:
            state.requests.append((self.command, path, self.headers.get("Range")))
        if path in state.redirects:
            self._empty(302, {"Location": state.redirects[path]})
            return
        redirect = re.fullmatch(r"/redirect/(\d+)(/.*)", path)
        if redirect is not None:
            hops = int(redirect[1])
            target = redirect[2] if hops == 0 else f"/redirect/{hops - 1}{redirect[2]}"
            self._empty(302, {"Location": target})
            return
        served = state.files.get(path)
        if served is None:
            self._empty(404, {"Content-Type": "text/plain"})
            return
        size, etag = served.size, served.etag
        start, end, status = 0, size - 1, 200
        asked = _RANGE.fullmatch(self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if asked is not None and (if_range is None or if_range == etag):
            start = int(asked[1])
            end = min(int(asked[2]), size - 1) if asked[2] else size - 1
            if start >= size:
                self._empty(416, {"Content-Range": f"bytes */{size}"})
                return
            status = 206
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        stop = end + 1
        with state.lock:
            cut = served.cut_at is not None and served.cuts_left > 0
            if cut:
                served.cuts_left -= 1
        if cut:
            # Cut at `cut_at`, or at once for a request that starts past it.
            assert served.cut_at is not None
            stop = max(start, min(stop, served.cut_at))
        with served.path.open("rb") as file:
            offset = start
            while offset < stop:
                sent = self.connection.sendfile(file, offset, min(CHUNK * 8, stop - offset))
                if sent == 0:
                    break
                offset += sent
        if cut:
            # The connection drops mid-body, as a flaky network or a restarted CDN does.
            self.close_connection = True
            self.connection.shutdown(2)

    def _empty(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: FileServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


@contextmanager
def file_server() -> Iterator[FileServer]:
    """A FileServer listening on a free loopback port until the block ends."""
    state = FileServer()
    server = _Server(state)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="file-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hostile_gguf(path: Path) -> Path:
    """A file that begins like a GGUF model but claims 2^63 tensors: the bounded header check
    refuses it (llama.cpp or gguf's reader would try to allocate for them)."""
    path.write_bytes(
        b"GGUF" + (3).to_bytes(4, "little") + (2**63).to_bytes(8, "little") + b"\0" * 64
    )
    os.utime(path)
    return path


def main(argv: list[str]) -> int:
    """`python tests/file_server.py FILE`: serve FILE at /FILE-NAME on a free loopback port,
    print its URL, and serve until killed (the pull benchmark's server, in a process of its
    own)."""
    import signal
    import sys
    import time

    path = Path(argv[0]).resolve()
    with file_server() as server:
        print(server.serve(f"/{path.name}", path), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
