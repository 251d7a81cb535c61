"""Reaching the store from a CLI command, whether or not the daemon is running.

The state dir's lock (appliance.store.lock) says who runs its redis-server. While the
daemon holds it, commands use the daemon's Redis at the socket the lock names (never a
server of their own: two servers appending to one AOF would corrupt it). With the daemon
stopped, a command takes the lock and starts the embedded redis-server for the duration;
a second command waits for the first. With APPLIANCE_REDIS_URL they use that Redis, a
server or a cluster (`redis+cluster://`), as the daemon does.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import coredis
import trio

from appliance.config import Settings
from appliance.store.client import RedisClient, check_mode, connect
from appliance.store.identity import appliance_answering
from appliance.store.lock import (
    SERVE,
    Holder,
    StateDirBusy,
    StateLock,
    StoreElsewhere,
    holder_for,
    running_command,
)
from appliance.store.server import EmbeddedRedis

LOGGER = logging.getLogger("appliance.store")

POLL: Final = 0.1
# A daemon waits this long for a command that has the state dir to finish with it.
SERVE_WAIT: Final = 60.0
# A command waits this long for another command, or for a starting daemon's store.
COMMAND_WAIT: Final = 300.0
QUIET_WAIT: Final = 1.0


@dataclass(frozen=True)
class Place:
    """Where a command finds the store; `lock` is set when this process holds the state
    dir and so starts redis-server itself."""

    url: str
    lock: StateLock | None = None


def say(text: str) -> None:
    print(f"appliance: {text}", file=sys.stderr, flush=True)


async def answers(url: str) -> bool:
    """Whether a Redis server answers PING at `url`."""
    try:
        client = connect(url, connect_timeout=2)
        async with client:
            await client.ping()
    except (coredis.exceptions.RedisError, OSError):
        return False
    except ExceptionGroup as group:
        # coredis's pool raises a refused connection from inside its task group.
        _, rest = group.split((coredis.exceptions.RedisError, OSError))
        if rest is not None:
            raise
        return False
    return True


def store_url(settings: Settings) -> str:
    """The store these settings name (the embedded socket in their runtime dir); give it
    to `connect`, which knows the cluster schemes."""
    if settings.embedded_redis:
        return f"unix://{settings.redis_socket}"
    return settings.redis_url


async def daemon_holder(settings: Settings) -> Holder | None:
    """The daemon holding these settings' state dir, if one runs (never this process)."""
    lock = StateLock(Path(settings.state_dir))
    holder = await trio.to_thread.run_sync(lock.wait_for_holder)
    return holder if holder is not None and holder.is_daemon else None


async def daemon_store_url(settings: Settings) -> str:
    """The store the daemon of these settings uses: the socket its lock names when it runs
    (its runtime dir may differ from the command's), else what the settings name."""
    if settings.embedded_redis:
        holder = await daemon_holder(settings)
        if holder is not None and holder.socket:
            return f"unix://{holder.socket}"
    return store_url(settings)


async def daemon_store_running(settings: Settings) -> bool:
    """Whether the embedded store is being served by the daemon."""
    if not settings.embedded_redis:
        return False
    holder = await daemon_holder(settings)
    return holder is not None and bool(holder.socket) and await answers(f"unix://{holder.socket}")


async def daemon_lock(settings: Settings) -> StateLock:
    """The state dir's lock for the daemon's life. Another daemon there is refused at once;
    a command there is waited for (up to SERVE_WAIT)."""
    state = Path(settings.state_dir)
    lock = StateLock(state)
    me = holder_for(
        SERVE,
        socket=str(settings.redis_socket) if settings.embedded_redis else "",
        bind=settings.bind,
    )
    started = trio.current_time()
    told = False
    while not await trio.to_thread.run_sync(lock.try_acquire, me):
        holder = await trio.to_thread.run_sync(lock.wait_for_holder)
        if holder is not None and holder.is_daemon:
            raise StateDirBusy(
                f"the state dir {state} is in use by {holder.describe()}: one appliance per "
                "state dir. Stop that one first, or give this one a state dir of its own "
                "(APPLIANCE_STATE_DIR)"
            )
        who = holder.describe() if holder is not None else "another process"
        waited = trio.current_time() - started
        if waited > SERVE_WAIT:
            raise StateDirBusy(
                f"the state dir {state} is still in use by {who} after {SERVE_WAIT:.0f} s; "
                "start the daemon again when it has finished"
            )
        if waited > QUIET_WAIT and not told:
            LOGGER.warning("waiting for %s to finish with the state dir %s", who, state)
            told = True
        await trio.sleep(POLL)
    return lock


async def _refuse_another_store(settings: Settings) -> None:
    """Before a command starts a store of its own: no daemon uses this state dir, so an
    appliance answering on APPLIANCE_BIND serves another store (the usual slip: the
    command was not given the daemon's settings)."""
    if await appliance_answering(settings) is None:
        return
    raise StoreElsewhere(
        f"an appliance answers on {settings.bind} (APPLIANCE_BIND), but no appliance serve "
        f"uses the state dir of these settings ({settings.state_dir}): this command would "
        "open another store than that daemon's. Give the command the daemon's settings: "
        "--env-file FILE (or APPLIANCE_ENV_FILE) with the daemon's APPLIANCE_STATE_DIR"
    )


async def _find_place(settings: Settings, command: str, note: Callable[[str], None]) -> Place:
    state = Path(settings.state_dir)
    if not await trio.Path(state).is_dir():
        raise StoreElsewhere(
            f"the state dir {state} does not exist: no appliance has run with these settings. "
            "Give the command the daemon's settings (--env-file FILE, or APPLIANCE_STATE_DIR), "
            "or start the daemon once (appliance serve) to make a new store there"
        )
    lock = StateLock(state)
    me = holder_for(command, socket=str(settings.redis_socket), bind=settings.bind)
    started = trio.current_time()
    told: set[str] = set()
    while True:
        if await trio.to_thread.run_sync(lock.try_acquire, me):
            try:
                await _refuse_another_store(settings)
            except BaseException:
                lock.release()
                raise
            return Place(store_url(settings), lock)
        holder = await trio.to_thread.run_sync(lock.wait_for_holder)
        if holder is not None and holder.is_daemon:
            if not holder.socket:
                raise StoreElsewhere(
                    f"{holder.describe()} uses the state dir {state} with its store at "
                    "APPLIANCE_REDIS_URL: give this command the daemon's settings"
                )
            url = f"unix://{holder.socket}"
            if await answers(url):
                return Place(url)
            waiting = f"waiting for {holder.describe()} to start its store"
        else:
            who = holder.describe() if holder is not None else "another process"
            waiting = f"waiting for {who}, which is using the store in {state}"
        waited = trio.current_time() - started
        if waited > COMMAND_WAIT:
            raise StateDirBusy(f"gave up after {COMMAND_WAIT:.0f} s {waiting}; try again later")
        # Said once each, and not for the moment another process takes a quick look.
        if waited > QUIET_WAIT and waiting not in told:
            told.add(waiting)
            note(waiting)
        await trio.sleep(POLL)


@contextlib.asynccontextmanager
async def store_place(
    settings: Settings, command: str, note: Callable[[str], None] = say
) -> AsyncIterator[Place]:
    """Where this command reaches the store, holding the state dir while it runs a store of
    its own (the lock is released only after that store has stopped)."""
    if not settings.embedded_redis:
        yield Place(settings.redis_url)
        return
    place = await _find_place(settings, command, note)
    try:
        yield place
    finally:
        if place.lock is not None:
            place.lock.release()


@contextlib.asynccontextmanager
async def redis_client(
    settings: Settings, command: str | None = None, note: Callable[[str], None] = say
) -> AsyncIterator[RedisClient]:
    """A client to the store, starting the embedded server only if no daemon serves it.

    Errors of the caller's block and of connecting come out as themselves, not inside an
    exception group, so that commands can name them."""
    if not settings.embedded_redis:
        await check_mode(settings.redis_url)
    failure: Exception | None = None
    try:
        # The lock is let go only after the nursery, so after our redis-server has stopped.
        async with (
            store_place(settings, command or running_command(), note) as place,
            trio.open_nursery() as nursery,
        ):
            if place.lock is not None:
                server = EmbeddedRedis(
                    Path(settings.state_dir),
                    Path(settings.runtime_dir),
                    settings.redis_maxmemory,
                    lock=place.lock,
                )
                await nursery.start(server.run)
            client = connect(place.url)
            async with client:
                try:
                    yield client
                except Exception as exc:
                    failure = exc
            nursery.cancel_scope.cancel()
    except ExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        raise leaves[0] from None
    if failure is not None:
        raise failure


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    found: list[Exception] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
