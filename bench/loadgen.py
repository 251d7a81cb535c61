"""Load generator: N keep-alive connections issue GETs; prints one JSON result on stdout.

Run as its own process so its CPU time is never the server's. It speaks HTTP/1.1 over raw
trio streams instead of httpx: on a 2-core box httpx spends more CPU per request than the
servers under test, and would then measure itself.

    python bench/loadgen.py --port 8000 --path /api/v1/health/live --requests 3000
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Final

import trio

HOST: Final = "127.0.0.1"
TIMEOUT: Final = 10.0


class Connection:
    """One keep-alive connection; responses must carry Content-Length (no chunked)."""

    def __init__(self, stream: trio.SocketStream, request: bytes) -> None:
        self.stream = stream
        self.request = request
        self.buffer = bytearray()

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    async def get(self) -> tuple[int, bytes]:
        await self.stream.send_all(self.request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length = None
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length is None:
            raise ValueError("response without Content-Length")
        while len(self.buffer) < end + 4 + length:
            await self._fill()
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        return status, body


async def _drive(connections: list[Connection], count: int) -> int:
    """Issue `count` requests spread over the connections; the number of non-200 answers."""
    remaining = count
    errors = 0

    async def worker(connection: Connection) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            status, _ = await connection.get()
            errors += status != 200

    with trio.fail_after(TIMEOUT + count / 50):
        async with trio.open_nursery() as nursery:
            for connection in connections:
                nursery.start_soon(worker, connection)
    return errors


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(args: argparse.Namespace) -> dict[str, object]:
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {HOST}:{args.port}\r\n"
        "User-Agent: appliance-bench\r\nAccept: */*\r\n\r\n"
    ).encode()
    connections = []
    with trio.fail_after(TIMEOUT):
        for _ in range(args.connections):
            stream = await trio.open_tcp_stream(HOST, args.port)
            connections.append(Connection(stream, request))
        _, sample = await connections[0].get()
    try:
        # Warm-up: caches, lazy imports, code paths on first use; not timed.
        await _drive(connections, args.warmup)
        cpu_before, started = _cpu_seconds(), time.perf_counter()
        errors = await _drive(connections, args.requests)
        seconds = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
    finally:
        for connection in connections:
            await connection.stream.aclose()
    return {
        "requests": args.requests,
        "connections": args.connections,
        "seconds": round(seconds, 4),
        "rps": round(args.requests / seconds, 1),
        "errors": errors,
        # Near 1.0 would mean the client, not the server, set the pace.
        "client_cpu_fraction": round(cpu / seconds, 2),
        "body": sample.decode("utf-8", "replace"),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="HTTP keep-alive load generator")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/v1/health/live")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--requests", type=int, default=3000)
    return parser


if __name__ == "__main__":
    print(json.dumps(trio.run(main, _parser().parse_args())))
