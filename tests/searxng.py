"""A SearXNG stand-in for tests: a real HTTP/1.1 server on loopback that answers
`GET /search?q=...&format=json` in SearXNG's JSON format and records what it received.

SearXNG itself is not part of this product (it runs on the operator's LAN), so a faithful
stand-in of its JSON API takes its place. `mode` makes it misbehave on cue: "slow" never
answers in time, "garbage" answers 200 with a body that is not JSON, "huge" streams 50 MB,
"status" answers `status`. It also speaks the Brave API's answer shape (`shape="brave"`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

HUGE_BYTES = 50 * 1024 * 1024
CHUNK = 64 * 1024


@dataclass
class Received:
    """One request as it arrived: the raw bytes, the path, the query and the headers."""

    raw: bytes
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    @property
    def q(self) -> str:
        return self.query.get("q", [""])[0]


def result(number: int, **fields: Any) -> dict[str, Any]:
    """A result the way SearXNG writes one (the fields the appliance reads, and the rest)."""
    url = fields.pop("url", f"https://example.org/page-{number}")
    entry = {
        "url": url,
        "title": f"Result {number} title",
        "content": f"Snippet of result {number}.",
        "engine": "duckduckgo",
        "parsed_url": ["https", "example.org", f"/page-{number}", "", "", ""],
        "template": "default.html",
        "engines": ["duckduckgo", "brave"],
        "positions": [number],
        "score": 1.0 / number,
        "category": "general",
    }
    entry.update(fields)
    return entry


@dataclass
class SearxngStandIn:
    results: list[dict[str, Any]] = field(default_factory=lambda: [result(i) for i in range(1, 9)])
    mode: str = "results"
    status: int = 200
    shape: str = "searxng"
    received: list[Received] = field(default_factory=list)
    # Bytes of the "huge" body that were written before the client stopped reading.
    huge_sent: int = 0
    host: str = "127.0.0.1"
    port: int = 0
    closed: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def body(self, query: str) -> bytes:
        if self.shape == "brave":
            web = [
                {"title": r["title"], "url": r["url"], "description": r["content"]}
                for r in self.results
            ]
            answer: dict[str, Any] = {
                "type": "search",
                "query": {"original": query},
                "web": {"type": "search", "results": web},
            }
        else:
            answer = {
                "query": query,
                "number_of_results": 0,
                "results": self.results,
                "answers": [],
                "corrections": [],
                "infoboxes": [],
                "suggestions": [],
                "unresponsive_engines": [],
            }
        return json.dumps(answer).encode()

    async def connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            raw = b""
            try:
                while b"\r\n\r\n" not in raw and len(raw) < 65536:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    raw += data
            except trio.BrokenResourceError:
                return
            head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            parts = urlsplit(target)
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            got = Received(raw, method, parts.path, parse_qs(parts.query), headers)
            self.received.append(got)
            try:
                await self._answer(stream, got)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.closed.set()

    async def _answer(self, stream: trio.SocketStream, got: Received) -> None:
        if self.mode == "slow":
            await trio.sleep(60)
        if self.mode == "status":
            await _send(stream, self.status, b"<html>refused</html>", "text/html")
            return
        if self.shape == "searxng" and got.query.get("format") != ["json"]:
            # SearXNG answers its HTML page unless asked for JSON.
            await _send(stream, 200, b"<!DOCTYPE html><html>results</html>", "text/html")
            return
        if self.mode == "garbage":
            await _send(stream, 200, b"\x00\xffnot json at all {{{", "application/json")
            return
        if self.mode == "huge":
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            piece = b'{"results": [' + b" " * (CHUNK - 13)
            while self.huge_sent < HUGE_BYTES:
                await stream.send_all(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.huge_sent += len(piece)
                piece = b" " * CHUNK
            await stream.send_all(b"0\r\n\r\n")
            return
        await _send(stream, 200, self.body(got.q), "application/json")


async def _send(stream: trio.SocketStream, status: int, body: bytes, kind: str) -> None:
    reason = {200: "OK", 403: "Forbidden", 429: "Too Many Requests", 500: "Error"}.get(
        status, "Status"
    )
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode() + body)


@asynccontextmanager
async def searxng_standin(host: str = "127.0.0.1", **kwargs: Any) -> AsyncIterator[SearxngStandIn]:
    standin = SearxngStandIn(host=host, **kwargs)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, standin.connection, 0, host=host))
        standin.port = listeners[0].socket.getsockname()[1]
        yield standin
        nursery.cancel_scope.cancel()
