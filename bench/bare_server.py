"""The baseline: Hypercorn-Trio serving only GET /api/v1/health/live, same JSON body.

Two flavours: `--kind asgi` is a raw ASGI callable (the floor: Hypercorn alone), `--kind
quart` a one-route QuartTrio app (the framework the daemon is built on, without its hooks,
blueprints or supervisor). Hypercorn is configured as the daemon configures it.

    python bench/bare_server.py --port 8001 --kind quart
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from appliance import __version__

if TYPE_CHECKING:
    from quart_trio import QuartTrio

PATH: Final = "/api/v1/health/live"
STARTED: Final = time.monotonic()

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def live_body() -> bytes:
    # Encoded per request with msgspec, as the daemon does, so only the framework differs.
    uptime = round(time.monotonic() - STARTED, 3)
    return msgspec.json.encode(
        {"status": "alive", "version": __version__, "uptime_seconds": uptime}
    )


async def asgi_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    found = scope["path"] == PATH
    body = live_body() if found else b'{"error":"not_found"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200 if found else 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def quart_app() -> QuartTrio:
    # Imported here so the raw ASGI flavour does not pay for Quart.
    from quart import Response
    from quart_trio import QuartTrio

    app = QuartTrio("bare")

    @app.get(PATH)
    async def live() -> Response:
        return Response(live_body(), mimetype="application/json")

    return app


def config(port: int) -> Config:
    # The same knobs as appliance.http.service.hypercorn_config.
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.include_server_header = False
    cfg.keep_alive_timeout = 5
    return cfg


async def main(port: int, kind: str) -> None:
    # Any: hypercorn's Framework type spells out every ASGI event; our plain dicts are enough.
    app: Any = asgi_app if kind == "asgi" else quart_app()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def until_signal() -> None:
            async for _ in signals:
                return

        await serve(app, config(port), shutdown_trigger=until_signal)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="baseline Hypercorn-Trio server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=("asgi", "quart"), default="asgi")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    trio.run(main, args.port, args.kind)
