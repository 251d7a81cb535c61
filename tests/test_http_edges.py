"""The HTTP edge of the real daemon: every answer the framework or the server makes itself
has the JSON error shape, a request framed two ways is refused and its connection closed,
and readiness tells anyone only whether, an admin also why."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import trio

from tests.harness import Daemon, running_daemon


async def exchange(daemon: Daemon, data: bytes, *, then: bytes = b"", wait: float = 0.0) -> bytes:
    """Send raw bytes (and `then`, after `wait` seconds) and read until the server closes."""
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        if then:
            await trio.sleep(wait)
            await stream.send_all(then)
        received = b""
        with trio.fail_after(30):  # the server closes: no keep-alive after these answers
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


def responses(raw: bytes) -> list[tuple[int, dict[str, str], Any]]:
    """Each HTTP/1.1 response in `raw` (Content-Length framed): status, headers, JSON body."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        body, raw = rest[:length], rest[length:]
        found.append((status, headers, msgspec.json.decode(body) if body else None))
    return found


def assert_error_shape(status: int, headers: dict[str, str], body: Any, code: str) -> None:
    assert headers["content-type"] == "application/json", (status, headers)
    error = body["error"]
    assert error["code"] == code, body
    assert error["message"] and error["type"]
    assert error["request_id"] == headers["x-request-id"]


async def test_framework_and_server_answers_are_json_errors() -> None:
    with trio.fail_after(120):
        async with (
            running_daemon({"APPLIANCE_MAX_BODY_BYTES": "2048"}) as daemon,
            daemon.client() as client,
        ):
            # A doubled slash was a 308 redirect with an HTML page; now a 404 like any
            # unknown path, with or without a key, for any method.
            for method in ("OPTIONS", "GET", "DELETE"):
                for headers in ({}, {"Authorization": ""}):
                    answer = await client.request(method, "/api/v1//admin/backups", headers=headers)
                    assert answer.status_code in (401, 404), (method, answer.status_code)
                    assert answer.headers["content-type"] == "application/json", answer.text
                    assert "location" not in answer.headers
            doubled = await client.options("/api/v1//admin/backups")
            assert doubled.status_code == 404
            assert doubled.json()["error"]["type"] == "not_found_error"
            # 405 names the methods (Allow) and is JSON.
            wrong = await client.put("/api/v1/health/live")
            assert wrong.status_code == 405 and "GET" in wrong.headers["allow"]
            assert wrong.json()["error"]["code"] == "method_not_allowed"
            # 413 for a chunked body that grows past the limit while it is read.

            async def chunks() -> Any:
                for _ in range(8):
                    yield b"x" * 1024

            big = await client.post("/api/v1/chat/send", content=chunks())
            assert big.status_code == 413, big.text
            assert big.json()["error"]["code"] == "request_too_large"
            assert "APPLIANCE_MAX_BODY_BYTES" in big.json()["error"]["message"]

            # Below the app: hypercorn's own answers (they had empty bodies).
            [(status, headers, body)] = responses(
                await exchange(daemon, b"NOT HTTP AT ALL\r\n\r\n")
            )
            assert status == 400
            assert_error_shape(status, headers, body, "malformed_request")
            # Headers over the server's limit (16 KiB) arriving before their end: 431.
            [(status, headers, body)] = responses(
                await exchange(
                    daemon,
                    b"GET /api/v1/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000,
                    then=b"\r\n\r\n",
                    wait=0.5,
                )
            )
            assert status == 431
            assert_error_shape(status, headers, body, "headers_too_large")
            assert "16384 bytes" in body["error"]["message"]
            [(status, headers, body)] = responses(
                await exchange(
                    daemon,
                    b"POST /api/v1/chat/send HTTP/1.1\r\nHost: x\r\n"
                    b"Transfer-Encoding: gzip\r\n\r\n",
                )
            )
            assert status == 501
            assert_error_shape(status, headers, body, "unsupported_transfer_encoding")


async def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed() -> None:
    # The body, read as chunked, ends at once; read by Content-Length it holds a second
    # request. Either reading is a guess: refuse it, answer nothing else on the connection.
    smuggled = b"GET /api/v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.fail_after(120):
        async with running_daemon() as daemon:
            for path in (b"/api/v1/chat/send", b"/api/v1/health/live"):
                raw = await exchange(
                    daemon,
                    b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer " + daemon.api_key.encode() + b"\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Content-Length: " + str(5 + len(smuggled)).encode() + b"\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled,
                )
                [(status, headers, body)] = responses(raw)
                assert status == 400
                assert headers["connection"] == "close"
                assert_error_shape(status, headers, body, "ambiguous_framing")
                assert "Content-Length and Transfer-Encoding" in body["error"]["message"]
            # Either header alone is fine.
            async with daemon.client() as client:

                async def body() -> Any:
                    yield b"{}"

                chunked = await client.post("/api/v1/health/live", content=body())
                assert chunked.status_code == 405
                assert "content-length" not in chunked.request.headers


async def test_readiness_is_general_without_an_admin_key() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon:
            user = await daemon.create_key("reader")
            answers = {}
            for who, key in (("anonymous", ""), ("wrong", "ak-0" * 8), ("user", user)):
                async with daemon.client(key=key) as client:
                    answers[who] = await client.get("/api/v1/health/ready")
            async with daemon.client() as admin:
                detailed = await admin.get("/api/v1/health/ready")
            assert detailed.status_code == 200
            details = {c["name"]: c["detail"] for c in detailed.json()["checks"]}
            assert details["models"].startswith("resident: tiny (")
            assert details["models"].endswith("; default tiny")
            assert details["disk"].endswith("MB free")
            for who, answer in answers.items():
                assert answer.status_code == 200, who
                body = answer.json()
                assert body["status"] == "ready"
                checks = {c["name"]: c for c in body["checks"]}
                assert set(checks) == {"redis", "disk", "models", "services"}
                assert all(c["state"] == "ok" for c in checks.values())
                text = answer.text
                # Not which model, how much disk, how fast Redis is.
                assert "tiny" not in text and "MB" not in text and " ms" not in text, who
                assert checks["models"]["detail"] == "a model is loaded"
            # A wrong key on the open route is not a failed attempt against the address.
            async with daemon.client(key="") as client:
                for _ in range(12):
                    assert (
                        await client.get(
                            "/api/v1/health/ready", headers={"Authorization": "Bearer ak-wrong"}
                        )
                    ).status_code == 200
                assert (await client.get("/api/v1/conversations")).status_code == 401


async def test_readiness_says_why_not_in_general_terms() -> None:
    with trio.fail_after(120):
        async with running_daemon({"APPLIANCE_MIN_FREE_DISK_MB": "999999999"}) as daemon:
            async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as anonymous:
                general = await anonymous.get("/api/v1/health/ready")
            async with daemon.client() as admin:
                detailed = await admin.get("/api/v1/health/ready")
    assert general.status_code == detailed.status_code == 503
    assert general.json()["status"] == "not_ready"
    disk = {c["name"]: c for c in general.json()["checks"]}["disk"]
    assert disk == {"name": "disk", "state": "fail", "detail": "too little free disk space"}
    admin_disk = {c["name"]: c for c in detailed.json()["checks"]}["disk"]
    assert "APPLIANCE_MIN_FREE_DISK_MB" in admin_disk["detail"]


async def test_an_answer_that_ends_its_connection_closes_it() -> None:
    """HTTP/1.0 and `Connection: close`: the server closes the connection after the answer.
    A client that reads to the end of the connection (an HTTP/1.0 stream has no other end)
    waited until it gave up; `exchange` fails after 30 s if the server never closes."""
    with trio.fail_after(120):
        async with running_daemon() as daemon:
            auth = b"Authorization: Bearer " + daemon.api_key.encode() + b"\r\n"
            for version, close in ((b"HTTP/1.0", b""), (b"HTTP/1.1", b"Connection: close\r\n")):
                request = b"GET /api/v1/health/live " + version + b"\r\nHost: x\r\n" + close
                [(status, headers, _)] = responses(await exchange(daemon, request + b"\r\n"))
                assert status == 200, version
                assert headers["connection"] == "close"
                # A streamed answer, read as an HTTP/1.0 client reads it: to the close.
                body = msgspec.json.encode(
                    {"model": "tiny", "prompt": "the", "max_tokens": 4, "stream": True}
                )
                raw = await exchange(
                    daemon,
                    b"POST /v1/completions "
                    + version
                    + b"\r\nHost: x\r\n"
                    + close
                    + auth
                    + b"Content-Type: application/json\r\n"
                    + b"Content-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body,
                )
                head, _, events = raw.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                if version == b"HTTP/1.1":
                    assert events.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), events[-80:]
                else:
                    assert events.endswith(b"data: [DONE]\n\n"), events[-80:]
