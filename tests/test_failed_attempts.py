"""Failed-attempt limits on the real daemon: they cannot be turned against valid keys, they
count exactly (10 allowed in a fixed window), they cannot be dodged through other loopback
addresses, and behind a trusted proxy they belong to each client."""

from __future__ import annotations

import coredis
import httpx
import trio

from appliance.auth.gate import FAILURE_WINDOW, FAILURES_ALLOWED, failure_bucket
from appliance.config import load_settings
from appliance.privacy.keys import load_keys
from tests.harness import Daemon, running_daemon

BAD = {"Authorization": "Bearer ak-0123456789abcdef.wrongwrongwrongwrongwrong"}


def from_address(daemon: Daemon, local: str) -> httpx.AsyncClient:
    """A client whose connections come from `local` (any 127.x.y.z is this machine)."""
    transport = httpx.AsyncHTTPTransport(local_address=local)
    return httpx.AsyncClient(base_url=daemon.url, transport=transport, timeout=10)


async def client_hashes(daemon: Daemon, *addresses: str) -> dict[str, str]:
    """The access log's client field for each address (a keyed hash made by the daemon)."""
    keys = await trio.to_thread.run_sync(load_keys, load_settings(environ=daemon.env))
    return {address: keys.client_hash(address) for address in addresses}


def access_clients(daemon: Daemon, prefix: str) -> dict[str, set[str]]:
    """Request id prefix -> the client hashes its access lines carry."""
    found: dict[str, set[str]] = {}
    for line in daemon.log_lines():
        request_id = str(line.get("request_id", ""))
        if line.get("logger") == "appliance.access" and request_id.startswith(prefix):
            found.setdefault(request_id.rsplit("-", 1)[0], set()).add(str(line["client"]))
    return found


def test_buckets() -> None:
    # All of loopback is one bucket (any 127.x.y.z reaches the box), IPv6 counts by /64,
    # IPv4 by address, IPv4-mapped IPv6 as its IPv4 address.
    assert failure_bucket("127.0.0.1") == failure_bucket("127.3.2.1") == failure_bucket("::1")
    assert failure_bucket("2001:db8:1:2::5") == failure_bucket("2001:db8:1:2:ffff::1")
    assert failure_bucket("2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert failure_bucket("2001:db8:1:3::5") != failure_bucket("2001:db8:1:2::5")
    assert failure_bucket("192.0.2.7") == failure_bucket("::ffff:192.0.2.7") == "192.0.2.7"
    assert failure_bucket("192.0.2.7") != failure_bucket("192.0.2.8")
    assert failure_bucket("unknown") == "unknown"


async def test_a_valid_key_is_never_refused_for_failures_from_its_address() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon:
            user = await daemon.create_key("steady")
            async with daemon.client(key="") as anonymous:
                codes = [
                    (await anonymous.get("/api/v1/conversations", headers=BAD)).status_code
                    for _ in range(20)
                ]
                # Exactly FAILURES_ALLOWED answers of 401, then 429 with Retry-After.
                assert codes == [401] * FAILURES_ALLOWED + [429] * (20 - FAILURES_ALLOWED)
            # The same address, a valid key: served, user and admin alike.
            async with daemon.client(key=user) as client:
                for _ in range(5):
                    assert (await client.get("/api/v1/conversations")).status_code == 200
            async with daemon.client() as admin:
                assert (await admin.get("/api/v1/health/services")).status_code == 200
            async with daemon.client(key="") as anonymous:
                refused = await anonymous.get("/api/v1/conversations")
                assert refused.status_code == 429
                assert 0 < int(refused.headers["Retry-After"]) <= FAILURE_WINDOW
                error = refused.json()["error"]
                assert error["code"] == "too_many_failed_attempts"
                assert "valid key are still served" in error["message"]
            await daemon.stop()
        warnings = [
            line
            for line in daemon.log_lines()
            if line.get("level") == "WARNING" and "failed-attempt limit" in str(line["message"])
        ]
        # Logged once per window, with the client hash the access lines carry.
        [warning] = warnings
        hashes = await client_hashes(daemon, "127.0.0.1")
        assert warning["client"] == hashes["127.0.0.1"]


async def test_other_loopback_addresses_share_the_limit() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon:
            async with from_address(daemon, "127.0.0.1") as first:
                for _ in range(FAILURES_ALLOWED):
                    assert (
                        await first.get("/api/v1/conversations", headers=BAD)
                    ).status_code == 401
            # Another 127.x address is the same box: no fresh allowance.
            async with from_address(daemon, "127.0.0.2") as second:
                dodge = await second.get("/api/v1/conversations", headers=BAD)
            assert dodge.status_code == 429, dodge.text


async def test_the_failure_window_runs_from_the_first_failure() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon, daemon.client(key="") as anonymous:
            redis: coredis.Redis[bytes] = coredis.Redis(
                unix_socket_path=str(daemon.state_dir / "run" / "redis.sock")
            )
            async with redis:
                assert (
                    await anonymous.get("/api/v1/conversations", headers=BAD)
                ).status_code == 401
                [counter] = [key async for key in redis.scan_iter(match="authfail:*")]
                before = await redis.ttl(counter)
                await trio.sleep(2.5)
                # A later failure does not extend the window: "10 in a minute" means that.
                assert (
                    await anonymous.get("/api/v1/conversations", headers=BAD)
                ).status_code == 401
                after = await redis.ttl(counter)
                assert int(await redis.get(counter) or 0) == 2
            assert 0 < after <= before - 2, (before, after)


async def test_behind_a_trusted_proxy_each_client_has_its_own_limit_and_log_identity() -> None:
    # The test plays the proxy here (tests/test_proxy.py puts a real nginx in between):
    # 127.0.0.1 is trusted, 127.0.0.2 is not.
    env = {"APPLIANCE_TRUSTED_PROXIES": "127.0.0.1"}
    with trio.fail_after(120):
        async with running_daemon(env) as daemon:
            user = await daemon.create_key("behind")

            def forwarded(chain: str, request_id: str, key: str = "") -> dict[str, str]:
                headers = {"X-Forwarded-For": chain, "X-Request-ID": request_id}
                if key:
                    headers["Authorization"] = f"Bearer {key}"
                else:
                    headers.update(BAD)
                return headers

            async with from_address(daemon, "127.0.0.1") as proxy:
                for i in range(15):
                    answer = await proxy.get(
                        "/api/v1/conversations", headers=forwarded("198.51.100.7", f"edge-a-{i}")
                    )
                    assert answer.status_code == (401 if i < FAILURES_ALLOWED else 429)
                # The same client's valid key, and another client's attempts: unaffected.
                ok = await proxy.get(
                    "/api/v1/conversations", headers=forwarded("198.51.100.7", "edge-ak-0", user)
                )
                assert ok.status_code == 200
                other = await proxy.get(
                    "/api/v1/conversations", headers=forwarded("198.51.100.8", "edge-b-0")
                )
                assert other.status_code == 401
                # A client-written address left of a trusted hop is not believed: the
                # right-most address that is not a trusted proxy is the client.
                chained = await proxy.get(
                    "/api/v1/conversations",
                    headers=forwarded("198.51.100.7, 203.0.113.9", "edge-c-0"),
                )
                assert chained.status_code == 401
                # IPv6 clients count by /64.
                for i in range(FAILURES_ALLOWED):
                    await proxy.get(
                        "/api/v1/conversations",
                        headers=forwarded(f"2001:db8:7:7::{i + 1}", f"edge-v6-{i}"),
                    )
                neighbour = await proxy.get(
                    "/api/v1/conversations", headers=forwarded("2001:db8:7:7::ff", "edge-v6n-0")
                )
                assert neighbour.status_code == 429
            # An untrusted peer's header is ignored: it is itself (the loopback bucket).
            async with from_address(daemon, "127.0.0.2") as direct:
                spoof = await direct.get(
                    "/api/v1/conversations", headers=forwarded("198.51.100.8", "edge-d-0")
                )
                assert spoof.status_code == 401
            await daemon.stop()
        hashes = await client_hashes(
            daemon, "198.51.100.7", "198.51.100.8", "203.0.113.9", "127.0.0.1", "127.0.0.2"
        )
        seen = access_clients(daemon, "edge-")
        assert seen["edge-a"] == seen["edge-ak"] == {hashes["198.51.100.7"]}
        assert seen["edge-b"] == {hashes["198.51.100.8"]}
        assert seen["edge-c"] == {hashes["203.0.113.9"]}
        assert seen["edge-d"] == {hashes["127.0.0.2"]}
        assert len(seen["edge-v6"]) == FAILURES_ALLOWED  # one hash per address in logs
        assert hashes["127.0.0.1"] not in set().union(*seen.values())
