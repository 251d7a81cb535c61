"""A response that ends its connection (HTTP/1.0, or a request with `Connection: close`)
closes it: without this, the client waited for the end of the connection until it gave up.

hypercorn closes such a connection from inside the app's send of the last body message (its
stream closes, its protocol sees that h11 must close, and the TCP server shuts the socket).
quart-trio hears of the closed stream at the same moment (an `http.disconnect`) and cancels
the request's task, which is that send: the shutdown was cancelled at its first checkpoint
and the socket stayed open, nothing left to close it before the client did. An HTTP/1.0
client of a streamed answer, which reads until the connection ends, hung after `[DONE]`.
The last body message is therefore sent shielded from cancellation. That costs nothing a
cancel could have saved: hypercorn already shields its own writes of the bytes.
"""

from __future__ import annotations

from typing import Any

import trio


class CloseAfterLastBody:
    """ASGI middleware: the last `http.response.body` message of each response is sent
    shielded from cancellation, so hypercorn's close of the connection runs to its end."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_last_body_shielded(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await self.app(scope, receive, send_last_body_shielded)
