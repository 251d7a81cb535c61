"""API keys on the real daemon: every route is protected, scopes, isolation, revocation,
failed-attempt limits, and keys never in logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import trio

from appliance.http.app import create_app
from appliance.http.context import Runtime
from tests.harness import Daemon, daemon_environment, running_daemon
from tests.inprocess import InProcessDaemon, inprocess_daemon

# Every route of the app and who may call it. A route missing here fails the walk: decide
# its scope when you add it.
PUBLIC = {("GET", "/api/v1/health/live"), ("GET", "/api/v1/health/ready")}
# The web console's pages and files hold no data: open, like any web page.
CONSOLE = {("GET", "/"), ("GET", "/operator"), ("GET", "/assets/" + "0" * 32)}
ADMIN_PREFIXES = (
    "/api/v1/admin/",
    "/api/v1/health/",
    "/api/v1/models",
    "/api/v1/openapi.json",
)
USER_PREFIXES = (
    "/api/v1/chat/",
    "/api/v1/conversations",
    "/api/v1/privacy/",
    "/api/v1/usage",
    "/v1/",
)


def _routes(state: Runtime) -> list[tuple[str, str]]:
    """(method, path) of every rule of the daemon's app, path parameters filled in."""
    found = []
    for rule in create_app(state).url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?[^>]+>", "0" * 32, rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append((method, path))
    return found


def _scope(method: str, path: str) -> str:
    if (method, path) in PUBLIC:
        return "public"
    if (method, path) in CONSOLE:
        return "console"
    if path.startswith(ADMIN_PREFIXES):
        return "admin"
    if path.startswith(USER_PREFIXES):
        return "user"
    raise AssertionError(f"{method} {path} is a new route: give it a scope in this test")


def _keys_cli(daemon: Daemon | InProcessDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "keys", *args],
        env=daemon_environment(daemon.state_dir, daemon.env),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_every_route_refuses_missing_wrong_revoked_and_underprivileged_keys() -> None:
    with trio.fail_after(120):
        async with inprocess_daemon() as daemon:
            routes = _routes(daemon.state)
            assert len(routes) >= 15
            user = await daemon.create_key("walker")
            revoked = await daemon.create_key("gone")
            done = await trio.to_thread.run_sync(lambda: _keys_cli(daemon, "revoke", "gone"))
            assert done.returncode == 0, done.stderr
            wrong = user[:-4] + ("aaaa" if not user.endswith("aaaa") else "bbbb")
            async with daemon.client(key="") as anonymous:
                for method, path in routes:
                    scope = _scope(method, path)
                    if scope == "public":
                        answer = await anonymous.request(method, path)
                        assert answer.status_code == 200, (method, path)
                        continue
                    if scope == "console":
                        # No key needed; an unknown console file is a plain 404.
                        answer = await anonymous.request(method, path)
                        assert answer.status_code in (200, 404), (method, path)
                        continue
                    for token in ("", "not-a-key", wrong, revoked):
                        headers = {"Authorization": f"Bearer {token}"} if token else {}
                        answer = await anonymous.request(method, path, headers=headers)
                        assert answer.status_code == 401, (method, path, token[:6])
                        error = answer.json()["error"]
                        assert error["code"] == "invalid_api_key"
                        assert error["type"] == "authentication_error"
                        # No hint whether the key exists: one message for every case.
                        assert "revoked" not in error["message"]
                    if scope == "admin":
                        answer = await anonymous.request(
                            method, path, headers={"Authorization": f"Bearer {user}"}
                        )
                        assert answer.status_code == 403, (method, path)
                        assert answer.json()["error"]["code"] == "admin_scope_required"
                    # Failed attempts are limited per address: start each route afresh.
                    await _forget_failures(daemon)
            async with daemon.client(key=user) as client:
                assert (await client.get("/v1/models")).status_code == 200
                assert (await client.get("/api/v1/conversations")).status_code == 200


async def _forget_failures(daemon: Daemon | InProcessDaemon) -> None:
    import coredis

    socket = daemon.state_dir / "run" / "redis.sock"
    client: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(socket))
    async with client:
        found = [key async for key in client.scan_iter(match="authfail:*")]
        if found:
            await client.delete(found)


async def test_a_user_key_sees_only_its_own_conversations() -> None:
    with trio.fail_after(120):
        async with inprocess_daemon() as daemon:
            alice, bob = await daemon.create_key("alice"), await daemon.create_key("bob")
            async with daemon.client(key=alice) as a, daemon.client(key=bob) as b:
                sent = await a.post("/api/v1/chat/send", json={"message": "mine", "max_tokens": 2})
                assert sent.status_code == 200, sent.text
                mine = sent.json()["conversation_id"]
                assert (await a.get(f"/api/v1/conversations/{mine}")).status_code == 200
                # Another key: 404, exactly as for a conversation that does not exist.
                for answer in (
                    await b.get(f"/api/v1/conversations/{mine}"),
                    await b.delete(f"/api/v1/conversations/{mine}"),
                    await b.post(
                        "/api/v1/chat/send",
                        json={"message": "intrude", "conversation_id": mine, "max_tokens": 2},
                    ),
                ):
                    assert answer.status_code == 404, answer.text
                assert (await b.get("/api/v1/conversations")).json()["total"] == 0
                erased = (await b.delete("/api/v1/privacy/data")).json()
                assert erased["conversations_removed"] == 0
                assert (await a.get("/api/v1/conversations")).json()["total"] == 1


async def test_keys_cli_failed_attempt_limit_and_no_key_in_logs() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon:
            made = await trio.to_thread.run_sync(
                lambda: _keys_cli(daemon, "create", "--name", "ci", "--scope", "user")
            )
            assert made.returncode == 0, made.stderr
            token = made.stdout.strip()
            assert token.startswith("ak-") and "shown only now" in made.stderr
            listed = await trio.to_thread.run_sync(lambda: _keys_cli(daemon, "list", "--json"))
            entries = {entry["name"]: entry for entry in json.loads(listed.stdout)}
            assert entries["ci"]["scope"] == "user" and token not in listed.stdout
            duplicate = await trio.to_thread.run_sync(
                lambda: _keys_cli(daemon, "create", "--name", "ci")
            )
            assert duplicate.returncode == 1 and "exists" in duplicate.stderr
            async with daemon.client(key=token) as client:
                assert (await client.get("/api/v1/conversations")).status_code == 200
                revoked = await trio.to_thread.run_sync(lambda: _keys_cli(daemon, "revoke", "ci"))
                assert revoked.returncode == 0
                assert (await client.get("/api/v1/conversations")).status_code == 401
            await _forget_failures(daemon)  # the revoked key's refusal counted as one
            async with daemon.client(key="ak-0123456789abcdef.wrongwrongwrongwrongwrong") as bad:
                codes = [(await bad.get("/api/v1/conversations")).status_code for _ in range(12)]
            assert codes[:10] == [401] * 10
            assert codes[10:] == [429, 429]
            async with daemon.client(key="") as anonymous:
                limited = await anonymous.get("/api/v1/conversations")
            assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
            assert "wrong or missing API key" in limited.json()["error"]["message"]
        log = daemon.log_path.read_text()
        assert token not in log and daemon.api_key not in log
        assert token.split(".")[1] not in log


async def test_init_makes_the_first_admin_key_which_the_daemon_records_once() -> None:
    from tests.harness import short_tempdir

    state = short_tempdir()
    env_file = state / "appliance.env"
    made = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "appliance", "--env-file", str(env_file), "init"],
            env=daemon_environment(state, {}),
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.split("first admin API key", 1)[1].split(": ", 1)[1].strip()
    assert token.startswith("ak-") and token not in env_file.read_text()
    env = {"APPLIANCE_ENV_FILE": str(env_file)}
    with trio.fail_after(120):
        async with running_daemon(env, state_dir=state) as daemon:
            async with daemon.client(key=token) as client:
                assert (await client.get("/api/v1/health/services")).status_code == 200
            revoked = await trio.to_thread.run_sync(lambda: _keys_cli(daemon, "revoke", "admin"))
            assert revoked.returncode == 0, revoked.stderr
        # A revoked first key stays revoked: the daemon does not bring it back.
        async with running_daemon(env, state_dir=state) as daemon, daemon.client(key=token) as c:
            assert (await c.get("/api/v1/health/services")).status_code == 401


async def test_token_budgets_cut_a_stream_refuse_the_next_request_and_show_usage() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon:
            small = await daemon.create_key("small", tokens_per_day=60)
            async with daemon.client(key=small) as client:
                body = {"message": "hi", "max_tokens": 400, "stream": True, "temperature": 0}
                async with client.stream("POST", "/api/v1/chat/send", json=body) as answer:
                    assert answer.status_code == 200
                    text = "".join([line async for line in answer.aiter_lines()])
                assert "budget_exhausted" in text and "ran out after" in text
                refused = await client.post(
                    "/api/v1/chat/send", json={"message": "more", "max_tokens": 5}
                )
                assert refused.status_code == 429, refused.text
                error = refused.json()["error"]
                assert error["code"] == "budget_exhausted"
                assert (
                    "daily local budget" in error["message"] and "of 60 tokens" in error["message"]
                )
                assert int(refused.headers["Retry-After"]) > 0
                usage = (await client.get("/api/v1/usage")).json()
                # Counted as used: at most one request's worth over the budget (the prompt's
                # length is only estimated when the reservation is made).
                assert 60 <= usage["local"]["day"] <= 120
                assert usage["local"]["tokens_per_day"] == 60 and usage["enforced"] is True
            listed = await trio.to_thread.run_sync(
                lambda: _keys_cli(daemon, "usage", "small", "--json")
            )
            assert listed.returncode == 0, listed.stderr
            [row] = json.loads(listed.stdout)
            assert row["local"]["day"] == usage["local"]["day"]
            assert row["local"]["tokens_per_day"] == 60
            # Other keys have their own budgets.
            async with daemon.client() as admin:
                ok = await admin.post("/api/v1/chat/send", json={"message": "hi", "max_tokens": 3})
                assert ok.status_code == 200, ok.text


async def test_auth_off_is_for_a_loopback_development_box_only(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_daemon({"APPLIANCE_AUTH": "off"}) as daemon:
            client = daemon.client(key="")
            async with client:
                listed = await client.get("/api/v1/conversations")
                assert listed.status_code == 200
                usage = (await client.get("/api/v1/usage")).json()
                assert usage["key"]["name"] == "local" and usage["key"]["scope"] == "admin"
    for extra, needle in (
        ({"APPLIANCE_BIND": "0.0.0.0:0"}, "loopback"),
        ({"APPLIANCE_ENV": "production"}, "refused in production"),
    ):
        env = daemon_environment(tmp_path, {"APPLIANCE_AUTH": "off", **extra})
        done = await trio.run_process(
            [sys.executable, "-m", "appliance", "config", "check"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert done.returncode == 1
        assert needle in (done.stdout + done.stderr).decode()


async def test_streams_whose_client_leaves_at_once_give_back_slot_and_reservation() -> None:
    with trio.fail_after(90):
        async with running_daemon({"APPLIANCE_MAX_STREAMS_PER_KEY": "1"}) as daemon:
            key = await daemon.create_key("leaver")
            body = json.dumps(
                {"message": "tell me everything", "max_tokens": 2000, "stream": True}
            ).encode()
            host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
            for _ in range(3):
                # The request, then the connection closes before any answer is read.
                stream = await trio.open_tcp_stream(host, int(port))
                await stream.send_all(
                    b"POST /api/v1/chat/send HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer " + key.encode() + b"\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await stream.aclose()
            async with daemon.client(key=key) as client:
                # The one stream slot is free again (each left at once)...
                for _ in range(50):
                    answer = await client.post(
                        "/api/v1/chat/send", json={"message": "hi", "max_tokens": 3, "stream": True}
                    )
                    if answer.status_code != 429:
                        break
                    await trio.sleep(0.1)
                assert answer.status_code == 200, answer.text
                # ...and no reservation of 2000 tokens stayed charged.
                usage = (await client.get("/api/v1/usage")).json()["local"]
            assert usage["day"] < 2000, usage
