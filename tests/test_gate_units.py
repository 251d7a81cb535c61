"""The request gate, one rule at a time, against the real redis-server: which requests need
no key, the 401 and 403 with their exact text, the failed-attempt limit (10 allowed, then
429 until the window of the first failure ends, never for a valid key), the per-key rate
limit, the counters' names and lifetimes, and what a full or a hung store does.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time

import coredis
import msgspec
import pytest
import trio
import trio.testing

from appliance.auth.apikeys import ApiKey, KeyStore
from appliance.auth.gate import Gate, Refused, bearer_token, failure_bucket
from tests.store_units import embedded_redis, fill_up

HASH_KEY = b"gate-units-hash-key-32-bytes-...."
WRONG = "Bearer ak-0123456789abcdef.wrongwrongwrongwrongwrong"
ADDRESS = "192.0.2.7"
NO_KEY_MESSAGE = (
    "a valid API key is needed: send Authorization: Bearer <key> "
    "(an admin creates keys with: appliance keys create --name NAME --scope user)"
)


def failure_counter(bucket: str) -> str:
    """The failed-attempt counter of a bucket: shared by every appliance on the store."""
    return "authfail:" + hashlib.blake2b(bucket.encode(), key=HASH_KEY, digest_size=12).hexdigest()


async def refused(
    gate: Gate,
    header: str | None,
    *,
    path: str = "/api/v1/chat",
    method: str = "POST",
    blueprint: str | None = "chat",
    address: str = ADDRESS,
) -> Refused:
    with pytest.raises(Refused) as caught:
        await gate.check(path, method, blueprint, header, address)
    return caught.value


async def allowed(
    gate: Gate,
    header: str | None,
    *,
    path: str = "/api/v1/chat",
    method: str = "POST",
    blueprint: str | None = "chat",
    address: str = ADDRESS,
) -> ApiKey | None:
    key = await gate.check(path, method, blueprint, header, address)
    # The key as created (its last use is written as it is used).
    return None if key is None else msgspec.structs.replace(key, last_used=None)


# --- pure rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "bucket"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("127.0.0.1", "loopback"),
        ("127.3.2.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8:0:0:8000::1", "2001:db8::/64"),  # the same /64, another /65
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("fe80::1", "fe80::/64"),
        ("unix", "unix"),
        ("", ""),
    ],
)
def test_failed_attempts_count_by_address_ipv6_64_or_loopback(address: str, bucket: str) -> None:
    assert failure_bucket(address) == bucket


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer ak-1.abc", "ak-1.abc"),
        ("bearer ak-1.abc", "ak-1.abc"),
        ("BEARER   ak-1.abc  ", "ak-1.abc"),
        ("Bearer ", ""),
        ("Basic ak-1.abc", ""),
        ("Bearerak-1.abc", ""),
        ("Bear", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_the_key_is_read_from_a_bearer_header_only(header: str | None, token: str) -> None:
    assert bearer_token(header) == token


def test_a_refusal_carries_its_status_code_message_and_headers() -> None:
    refusal = Refused(401, "invalid_api_key", "no key", {"WWW-Authenticate": "Bearer"})
    assert (refusal.status, refusal.code, refusal.message, str(refusal)) == (
        401,
        "invalid_api_key",
        "no key",
        "no key",
    )
    assert refusal.headers == {"WWW-Authenticate": "Bearer"}
    assert refusal.limit_reached is False
    assert Refused(403, "x", "y").headers == {}


# --- keys and scopes ------------------------------------------------------------------------


async def test_a_missing_wrong_or_revoked_key_gets_401() -> None:
    async with embedded_redis() as (_, client):
        keys = KeyStore(lambda: client)
        _, token = await keys.create("gone", "user")
        await keys.revoke("gone")
        gate = Gate(lambda: client, keys, HASH_KEY, 0)  # enabled unless said otherwise
        for header in (None, "", WRONG, "Basic abc", f"Bearer {token}"):
            refusal = await refused(gate, header)
            assert (refusal.status, refusal.code, refusal.message) == (
                401,
                "invalid_api_key",
                NO_KEY_MESSAGE,
            )
            assert refusal.headers == {"WWW-Authenticate": "Bearer"}
            assert refusal.limit_reached is False


async def test_admin_routes_need_an_admin_key_and_the_others_take_any() -> None:
    async with embedded_redis() as (_, client):
        keys = KeyStore(lambda: client)
        admin, admin_token = await keys.create("boss", "admin")
        user, user_token = await keys.create("someone", "user")
        gate = Gate(lambda: client, keys, HASH_KEY, 0)
        for blueprint in ("admin", "health", "models", "keys"):
            refusal = await refused(gate, f"Bearer {user_token}", blueprint=blueprint)
            assert (refusal.status, refusal.code, refusal.message, refusal.headers) == (
                403,
                "admin_scope_required",
                "this endpoint needs a key with scope admin",
                {},
            )
            assert await allowed(gate, f"Bearer {admin_token}", blueprint=blueprint) == admin
        for other in ("chat", "conversations", "openai", None):
            assert await allowed(gate, f"Bearer {user_token}", blueprint=other) == user
            assert await allowed(gate, f"Bearer {admin_token}", blueprint=other) == admin


async def test_preflights_and_the_console_need_no_key_and_count_no_failure() -> None:
    async with embedded_redis() as (_, client):
        gate = Gate(lambda: client, KeyStore(lambda: client), HASH_KEY, 0)
        assert await allowed(gate, None, method="OPTIONS", blueprint="admin") is None
        assert await allowed(gate, WRONG, method="OPTIONS", blueprint="chat") is None
        assert await allowed(gate, None, method="GET", blueprint="console", path="/") is None
        assert await client.exists([failure_counter(ADDRESS)]) == 0
        # The same route by GET is not open.
        assert (await refused(gate, None, method="GET", blueprint="admin")).status == 401


async def test_health_probes_are_open_and_a_key_there_only_says_who_asks() -> None:
    async with embedded_redis() as (_, client):
        keys = KeyStore(lambda: client)
        admin, token = await keys.create("boss", "admin")
        gate = Gate(lambda: client, keys, HASH_KEY, 0)
        for path in ("/api/v1/health/live", "/api/v1/health/ready"):
            for header, key in ((None, None), (WRONG, None), (f"Bearer {token}", admin)):
                assert (
                    await allowed(gate, header, path=path, method="GET", blueprint="health") == key
                )
        assert await client.exists([failure_counter(ADDRESS)]) == 0
        # Another health route is not open.
        assert (await refused(gate, None, path="/api/v1/health", blueprint="health")).status == 401


async def test_with_auth_off_every_request_is_the_local_admin() -> None:
    async with embedded_redis() as (_, client):
        gate = Gate(lambda: client, KeyStore(lambda: client), HASH_KEY, 1, enabled=False)
        local = ApiKey(id="local", name="local", scope="admin", created=0.0)
        for _ in range(3):  # no rate limit either
            assert await allowed(gate, None, blueprint="admin") == local
            assert await allowed(gate, WRONG) == local
        assert await allowed(gate, None, method="OPTIONS") is None
        assert await client.keys("*") == set()  # nothing counted


# --- the failed-attempt limit ---------------------------------------------------------------


async def test_ten_failures_get_401_then_429_until_the_window_of_the_first_ends() -> None:
    async with embedded_redis() as (_, client):
        keys = KeyStore(lambda: client)
        user, token = await keys.create("someone", "user")
        gate = Gate(lambda: client, keys, HASH_KEY, 0)
        counter = failure_counter(ADDRESS)
        for failure in range(1, 11):
            assert (await refused(gate, WRONG)).status == 401
            assert int(await client.get(counter) or 0) == failure
            assert 55 <= await client.ttl(counter) <= 60  # fixed at the first failure
        first = await refused(gate, None)
        assert (first.status, first.code, first.limit_reached) == (
            429,
            "too_many_failed_attempts",
            True,
        )
        wait = int(first.headers["Retry-After"])
        assert 1 <= wait <= 60
        assert first.message == (
            "more than 10 requests with a wrong or missing API key from this address in 60 s; "
            f"wait {wait} s (requests with a valid key are still served)"
        )
        again = await refused(gate, WRONG)
        assert (again.status, again.limit_reached) == (429, False)
        # A valid key from the same address is served; other addresses are not limited.
        assert await allowed(gate, f"Bearer {token}") == user
        assert (await refused(gate, WRONG, address="192.0.2.8")).status == 401
        assert 55 <= await client.ttl(counter) <= 60


async def test_retry_after_is_at_least_one_second() -> None:
    async with embedded_redis() as (_, client):
        gate = Gate(lambda: client, KeyStore(lambda: client), HASH_KEY, 0)
        for _ in range(10):
            await refused(gate, WRONG)
        # The window is about to end: what is left rounds to one second.
        await client.pexpire(failure_counter(ADDRESS), 1400)
        assert (await refused(gate, WRONG)).headers == {"Retry-After": "1"}


async def test_a_full_store_counts_no_failure_and_still_refuses_with_401() -> None:
    async with embedded_redis() as (_, client):
        keys = KeyStore(lambda: client)
        user, token = await keys.create("someone", "user")
        gate = Gate(lambda: client, keys, HASH_KEY, 5)
        await fill_up(client)
        for _ in range(12):
            assert (await refused(gate, WRONG)).status == 401
        # A valid key is served (reads and deletes make room), its requests uncounted.
        for _ in range(7):
            assert await allowed(gate, f"Bearer {token}") == user


async def test_a_store_error_other_than_full_is_not_hidden() -> None:
    async with embedded_redis() as (_, client):
        gate = Gate(lambda: client, KeyStore(lambda: client), HASH_KEY, 0)
        await client.hset(failure_counter(ADDRESS), {"not": "a counter"})
        with pytest.raises(coredis.exceptions.ResponseError, match="wrong kind of value"):
            await gate.check("/api/v1/chat", "POST", "chat", WRONG, ADDRESS)


# --- the rate limit -------------------------------------------------------------------------


async def away_from_a_minute_boundary() -> None:
    """Each minute has a counter of its own: keep a test's requests inside one minute."""
    now = time.time()
    if not 1 <= int(now) % 60 <= 50:
        await trio.sleep(61 - now % 60)  # to the next minute's second second


async def test_a_key_gets_its_rate_limit_per_minute_then_429() -> None:
    async with embedded_redis() as (_, client):
        keys = KeyStore(lambda: client)
        user, token = await keys.create("someone", "user")
        other, other_token = await keys.create("other", "user")
        gate = Gate(lambda: client, keys, HASH_KEY, 3)
        await away_from_a_minute_boundary()
        for _ in range(3):
            assert await allowed(gate, f"Bearer {token}") == user
        counter = f"rate:{{{user.id}}}:{int(time.time() // 60)}"
        assert int(await client.get(counter) or 0) == 3
        assert 115 <= await client.ttl(counter) <= 120
        before = time.time()
        refusal = await refused(gate, f"Bearer {token}")
        after = time.time()
        assert (refusal.status, refusal.code) == (429, "rate_limited")
        wait = int(refusal.headers["Retry-After"])
        assert wait in {60 - int(before) % 60, 60 - int(after) % 60}
        assert refusal.message == (
            f"this key made more than 3 requests this minute (APPLIANCE_RATE_LIMIT); wait {wait} s"
        )
        assert await allowed(gate, f"Bearer {other_token}") == other


async def test_a_rate_limit_of_zero_counts_nothing() -> None:
    async with embedded_redis() as (_, client):
        keys = KeyStore(lambda: client)
        user, token = await keys.create("someone", "user")
        gate = Gate(lambda: client, keys, HASH_KEY, 0)
        for _ in range(30):
            assert await allowed(gate, f"Bearer {token}") == user
        assert await client.keys("rate:*") == set()


# --- a hung store ---------------------------------------------------------------------------


async def test_a_probe_waits_one_second_for_a_hung_store_then_answers_without_the_key(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.rate = 1.0  # real time while the server starts
    async with embedded_redis() as (server, client):
        keys = KeyStore(lambda: client)
        _, token = await keys.create("boss", "admin")
        gate = Gate(lambda: client, keys, HASH_KEY, 0)
        pid = server.pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            # Virtual time from here: it moves only when everything waits (the hung store).
            mock_clock.rate = 0.0
            mock_clock.autojump_threshold = 0.5
            started = trio.current_time()
            probe = await allowed(
                gate,
                f"Bearer {token}",
                path="/api/v1/health/ready",
                method="GET",
                blueprint="health",
            )
            assert probe is None
            assert trio.current_time() - started == pytest.approx(1.0)
        finally:
            os.kill(pid, signal.SIGCONT)
            mock_clock.autojump_threshold = float("inf")
            mock_clock.rate = 1.0


def test_the_messages_name_no_secret() -> None:
    assert not re.search(r"ak-[0-9a-f]{16}\.", NO_KEY_MESSAGE)
