"""What the box's outbound HTTP clients share (the remote LLM, web search, model pulls):
which hosts never leave the box, the chain where an httpx error hides its OS error, and
the service that owns one `httpx.AsyncClient` for its life."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Final, Self

import httpx
import trio

from appliance.supervisor import Service

# A client being closed may wait this long for its connections, even when cancelled.
CLOSE_SECONDS: Final = 2.0


def loopback(host: str) -> bool:
    """localhost or a loopback address (plain HTTP to it never leaves the box)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its arguments that are exceptions, causes, contexts and group
    members: where the OS error behind an httpx error hides."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [arg for arg in current.args if isinstance(arg, BaseException)]
        if isinstance(current, BaseExceptionGroup):
            todo += current.exceptions
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


class HttpClientService(Service):
    """A service that owns one `httpx.AsyncClient` (`_client`, opened by the subclass's
    `__aenter__`): closed on exit, healthy while open. The upstream itself is never probed:
    nothing is contacted unless a request asks."""

    _client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        raise NotImplementedError  # the subclass opens its client as its upstream needs

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            with trio.move_on_after(CLOSE_SECONDS) as scope:
                scope.shield = True
                await client.aclose()

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with self:
            task_status.started(self)
            await trio.sleep_forever()

    def healthy(self) -> bool:
        return self._client is not None
