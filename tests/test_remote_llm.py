"""Forwarding to a remote OpenAI-compatible LLM (appliance.llm.remote).

The remote is the real appliance (a second daemon with the tiny model) where its behaviour
is enough; where a test needs to see what was sent, or a remote that misbehaves on cue
(breaks off, stalls, refuses), it is a small recording HTTP server written here on raw
trio sockets: a stand-in for a third-party API, not for a part of this product.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.llm.remote import (
    RemoteConfig,
    RemoteConfigError,
    RemoteDone,
    RemoteError,
    RemoteLLM,
    RemoteText,
    load_api_key,
)
from appliance.llm.remote_wire import SSEDecoder, estimate_prompt_tokens
from appliance.privacy.redaction import Redactor
from tests.harness import free_port, running_daemon, short_tempdir

KEY = "sk-appliance-test-0123456789abcdef"
PRICE = 0.002
_REDACTOR = Redactor("strict")


def redact(text: str) -> str:
    return _REDACTOR.redact(text).text


def config(url: str, **changes: Any) -> RemoteConfig:
    values: dict[str, Any] = {
        "url": url,
        "model": "upstream-model",
        "api_key": KEY,
        "timeout": 5.0,
        "price_per_1k": PRICE,
    }
    values.update(changes)
    return RemoteConfig(**values)


# --- a recording OpenAI-compatible server on raw trio sockets -------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Recorder:
    requests: list[Recorded] = field(default_factory=list)
    connections: int = 0
    disconnected: trio.Event = field(default_factory=trio.Event)


Handler = Callable[[trio.SocketStream, Recorder], Awaitable[None]]


async def read_request(stream: trio.SocketStream) -> Recorded:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = await stream.receive_some()
        if not piece:
            raise EOFError("client closed before sending a request")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers.get("content-length", "0")):
        body += await stream.receive_some()
    method, path, _ = request_line.split(" ", 2)
    return Recorded(method, path, headers, body)


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[str, Recorder]]:
    """A server on a free loopback port; yields its /v1 base URL and what it recorded."""
    recorder = Recorder()

    async def connection(stream: trio.SocketStream) -> None:
        recorder.connections += 1
        await handler(stream, recorder)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1", recorder
        nursery.cancel_scope.cancel()


def sse_event(data: Any) -> bytes:
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    return b"data: " + payload + b"\n\n"


def delta(text: str, finish: str | None = None) -> bytes:
    return sse_event(
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text},
                                                          "finish_reason": finish}]}
    )  # fmt: skip


def streaming(events: list[bytes], *, chunked: bool = True, then: str = "finish") -> Handler:
    """Answer with `events` as an SSE stream; `then`: "finish" ([DONE], end), "cut" (close
    the connection at once), "hold" (wait for the client to go away), "stall" (sleep)."""

    async def handler(stream: trio.SocketStream, recorder: Recorder) -> None:
        recorder.requests.append(await read_request(stream))
        framing = b"Transfer-Encoding: chunked" if chunked else b"Connection: close"
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + framing + b"\r\n\r\n"
        )

        async def send(data: bytes) -> None:
            await stream.send_all(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

        for event in events:
            await send(event)
        if then == "finish":
            await send(sse_event(b"[DONE]"))
            if chunked:
                await stream.send_all(b"0\r\n\r\n")
        elif then == "hold":
            try:
                while await stream.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass
            recorder.disconnected.set()
        elif then == "stall":
            await trio.sleep_forever()

    return handler


def answering(status: int, body: Any, headers: dict[str, str] | None = None) -> Handler:
    """Answer once with `status` and a JSON `body`."""

    async def handler(stream: trio.SocketStream, recorder: Recorder) -> None:
        recorder.requests.append(await read_request(stream))
        payload = json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        await stream.send_all(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n{extra}\r\n".encode()
            + payload
        )

    return handler


async def silent(stream: trio.SocketStream, recorder: Recorder) -> None:
    await trio.sleep_forever()


async def collect(remote: RemoteLLM, messages: list[dict[str, str]]) -> list[Any]:
    items: list[Any] = []
    async with await remote.stream(messages, {"max_tokens": 8}, redact=redact) as stream:
        async for item in stream:
            items.append(item)
    return items


USER = [{"role": "user", "content": "hello"}]


# --- against the real appliance ----------------------------------------------------------


async def test_complete_and_stream_through_a_real_appliance() -> None:
    with trio.fail_after(90):
        async with running_daemon() as daemon:
            # The remote appliance wants a key of its own, as any OpenAI-compatible API does.
            user_key = await daemon.create_key("remote-user")
            remote_config = config(f"{daemon.url}/v1", model="tiny", api_key=user_key)
            async with RemoteLLM(remote_config) as remote:
                params = {"max_tokens": 8, "temperature": 0.0, "seed": 7}
                messages = [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "the water is"},
                ]
                result = await remote.complete(messages, params, redact=redact)
                assert result.model == "tiny"
                assert result.usage.completion_tokens >= 1
                assert result.usage.prompt_tokens >= 1
                assert not result.usage.estimated  # the appliance reports usage
                assert result.finish_reason in ("stop", "length")
                assert result.cost == result.usage.total_tokens / 1000 * PRICE

                stream = await remote.stream(messages, params, redact=redact)
                async with stream:
                    items = [item async for item in stream]
                texts = [item.text for item in items if isinstance(item, RemoteText)]
                done = items[-1]
                assert isinstance(done, RemoteDone) and stream.done is done
                assert texts and all(texts)
                assert "".join(texts) == result.text  # same seed, same answer
                assert done.usage == result.usage
                assert done.cost == done.usage.total_tokens / 1000 * PRICE
                assert stream.sent_messages == messages


# --- what leaves the box --------------------------------------------------------------------

PERSONAL = "Write to jane.doe@example.com and charge card 4111 1111 1111 1111 please."


async def test_messages_are_redacted_and_the_request_is_openai_shaped() -> None:
    with trio.fail_after(20):
        answer = {"role": "assistant", "content": "done"}
        canned = {
            "choices": [{"message": answer, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3},
        }
        messages = [
            {"role": "system", "content": "my mail is jane.doe@example.com"},
            {"role": "user", "content": PERSONAL},
        ]
        params = {"max_tokens": 5, "temperature": 0.2, "top_p": 0.9, "stop": ["\n"], "seed": 3}
        async with (
            serving(answering(200, canned)) as (url, recorder),
            RemoteLLM(config(url)) as remote,
        ):
            result = await remote.complete(messages, params, redact=redact)
        assert result.text == "done" and result.finish_reason == "stop"
        assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (11, 3)
        assert result.cost == 14 / 1000 * PRICE
        (request,) = recorder.requests
        assert request.method == "POST" and request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert b"jane.doe" not in request.body and b"4111" not in request.body
        body = request.json()
        assert body == {"model": "upstream-model", "messages": result.sent_messages, **params}
        assert body["messages"][1]["content"] == ("Write to [EMAIL] and charge card [CARD] please.")
        assert body["messages"][0] == {"role": "system", "content": "my mail is [EMAIL]"}


async def test_streamed_messages_are_redacted_and_usage_is_estimated_without_one() -> None:
    with trio.fail_after(20):
        handler = streaming([delta("Hel"), delta("lo"), delta("", "length")])
        async with serving(handler) as (url, recorder), RemoteLLM(config(url)) as remote:
            messages = [{"role": "user", "content": PERSONAL}]
            stream = await remote.stream(messages, {"max_tokens": 2}, redact=redact)
            async with stream:
                items = [item async for item in stream]
        assert items[:2] == [RemoteText("Hel"), RemoteText("lo")]
        done = items[2]
        assert isinstance(done, RemoteDone) and done.finish_reason == "length"
        # No usage from this server: estimated (see remote_wire's estimates).
        assert done.usage.estimated
        assert done.usage.prompt_tokens == estimate_prompt_tokens(stream.sent_messages)
        assert done.usage.completion_tokens == 2  # two pieces, 5 characters
        assert done.cost == done.usage.total_tokens / 1000 * PRICE
        body = recorder.requests[0].json()
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["messages"] == stream.sent_messages
        assert body["messages"][0]["content"] == "Write to [EMAIL] and charge card [CARD] please."


async def test_no_connection_is_made_until_a_request_asks() -> None:
    with trio.fail_after(20):
        handler = answering(200, {"choices": [{"message": {"content": "x"}}]})
        async with serving(handler) as (url, recorder), trio.open_nursery() as nursery:
            remote = RemoteLLM(config(url))
            assert remote.name == "remote" and remote.critical is False
            assert await nursery.start(remote.run) is remote
            assert remote.healthy()
            await trio.sleep(0.2)
            assert recorder.connections == 0
            await remote.complete(USER, {}, redact=redact)
            assert recorder.connections == 1
            nursery.cancel_scope.cancel()
        assert not remote.healthy()
        with pytest.raises(RemoteError) as caught:
            await remote.complete(USER, {}, redact=redact)
        assert caught.value.status == 503


# --- a remote that fails ------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
async def test_remote_going_away_mid_stream_is_a_502(chunked: bool) -> None:
    with trio.fail_after(20):
        handler = streaming([delta("one"), delta("two")], chunked=chunked, then="cut")
        async with serving(handler) as (url, _), RemoteLLM(config(url)) as remote:
            texts: list[str] = []
            with pytest.raises(RemoteError) as caught:
                async with await remote.stream(USER, {}, redact=redact) as stream:
                    async for item in stream:
                        assert isinstance(item, RemoteText)
                        texts.append(item.text)
        assert texts == ["one", "two"]
        assert caught.value.status == 502
        assert "went away mid-stream" in caught.value.message


async def test_killed_remote_appliance_mid_stream_is_a_502() -> None:
    """kill -9 of a real remote appliance after its first delta: the tiny model needs
    seconds for 300 tokens, so the answer cannot be complete in our socket buffer yet."""
    with trio.fail_after(90):
        async with (
            running_daemon() as daemon,
            RemoteLLM(config(f"{daemon.url}/v1", model="tiny", api_key=daemon.api_key)) as remote,
        ):
            stream = await remote.stream(USER, {"max_tokens": 300}, redact=redact)
            async with stream:
                assert isinstance(await stream.__anext__(), RemoteText)
                daemon.process.kill()
                await daemon.process.wait()
                with pytest.raises(RemoteError) as caught:
                    async for item in stream:
                        assert isinstance(item, RemoteText)
        assert caught.value.status == 502
        assert "went away mid-stream" in caught.value.message


async def test_a_remote_that_never_answers_is_a_504_within_the_timeout() -> None:
    with trio.fail_after(20):
        async with serving(silent) as (url, _), RemoteLLM(config(url, timeout=0.5)) as remote:
            for call in ("complete", "stream"):
                begun = trio.current_time()
                with pytest.raises(RemoteError) as caught:
                    await getattr(remote, call)(USER, {}, redact=redact)
                assert 0.4 < trio.current_time() - begun < 2.0
                assert caught.value.status == 504
                assert caught.value.message == (
                    "the remote LLM did not answer within 0.5 s (APPLIANCE_REMOTE_TIMEOUT)"
                )


async def test_a_stalled_stream_is_a_504_after_the_idle_timeout() -> None:
    with trio.fail_after(20):
        handler = streaming([delta("first")], then="stall")
        async with (
            serving(handler) as (url, _),
            RemoteLLM(config(url, timeout=0.5)) as remote,
            await remote.stream(USER, {}, redact=redact) as stream,
        ):
            assert await stream.__anext__() == RemoteText("first")
            begun = trio.current_time()
            with pytest.raises(RemoteError) as caught:
                await stream.__anext__()
            assert 0.4 < trio.current_time() - begun < 2.0
        assert caught.value.status == 504


async def test_connection_refused_is_a_502() -> None:
    with trio.fail_after(20):
        url = f"http://127.0.0.1:{free_port()}/v1"
        async with RemoteLLM(config(url)) as remote:
            for call in ("complete", "stream"):
                with pytest.raises(RemoteError) as caught:
                    await getattr(remote, call)(USER, {}, redact=redact)
                assert caught.value.status == 502
                assert caught.value.code == "remote_unreachable"
                assert "refused" in caught.value.message and url.rsplit("/", 1)[0] in (
                    caught.value.message
                )


async def test_upstream_refusals_map_to_our_statuses_and_never_show_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "auth"}}
    long = {"error": {"message": f"bad request with key {KEY} " + "x" * 500}}
    cases = [
        (answering(401, echo), 502, None),
        (answering(403, echo), 502, None),
        (answering(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}), 429, "7"),
        (answering(400, long), 502, None),
        (answering(500, {"detail": "boom"}), 502, None),
    ]
    with trio.fail_after(20):
        for handler, status, retry_after in cases:
            async with serving(handler) as (url, _), RemoteLLM(config(url)) as remote:
                for call in ("complete", "stream"):
                    with pytest.raises(RemoteError) as caught:
                        await getattr(remote, call)(USER, {}, redact=redact)
                    error = caught.value
                    assert error.status == status, error.message
                    assert KEY not in error.message and KEY not in str(error)
                    assert error.headers == ({"Retry-After": retry_after} if retry_after else {})
                    if error.code == "remote_auth_failed":
                        assert error.message.startswith(
                            "the remote LLM refused the appliance's credentials"
                        )
                        assert "check APPLIANCE_REMOTE_LLM_KEY_FILE" in error.message
                    if error.code == "remote_rejected":
                        quoted = error.message.split("(HTTP 400): ", 1)[1]
                        assert len(quoted) <= 200 and "[SECRET]" in quoted
    assert KEY not in caplog.text


async def test_closing_a_stream_early_closes_the_upstream_connection() -> None:
    with trio.fail_after(20):
        handler = streaming([delta("a"), delta("b")], then="hold")
        async with serving(handler) as (url, recorder), RemoteLLM(config(url)) as remote:
            stream = await remote.stream(USER, {}, redact=redact)
            assert await stream.__anext__() == RemoteText("a")
            await stream.aclose()
            with trio.fail_after(2):
                await recorder.disconnected.wait()
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()


async def test_cancelling_the_reader_and_closing_closes_the_upstream_connection() -> None:
    """What the HTTP layer does when its client disconnects: the generator reading the
    stream is cancelled and its cleanup closes the stream."""
    with trio.fail_after(20):
        handler = streaming([delta("a")], then="hold")
        async with serving(handler) as (url, recorder), RemoteLLM(config(url)) as remote:
            stream = await remote.stream(USER, {}, redact=redact)
            with trio.move_on_after(0.3):
                try:
                    async for _ in stream:
                        pass
                finally:
                    await stream.aclose()
            with trio.fail_after(2):
                await recorder.disconnected.wait()


async def test_a_stream_answered_with_json_is_a_502() -> None:
    with trio.fail_after(20):
        handler = answering(200, {"choices": [{"message": {"content": "x"}}]})
        async with serving(handler) as (url, _), RemoteLLM(config(url)) as remote:
            with pytest.raises(RemoteError) as caught:
                await remote.stream(USER, {}, redact=redact)
        assert caught.value.status == 502 and "application/json" in caught.value.message


async def test_an_error_event_mid_stream_is_a_502_after_the_text_before_it() -> None:
    with trio.fail_after(20):
        error = b"event: error\ndata: " + json.dumps({"error": {"message": "oops"}}).encode()
        handler = streaming([delta("a"), error + b"\n\n"], then="cut")
        async with (
            serving(handler) as (url, _),
            RemoteLLM(config(url)) as remote,
            await remote.stream(USER, {}, redact=redact) as stream,
        ):
            assert await stream.__anext__() == RemoteText("a")
            with pytest.raises(RemoteError) as caught:
                await stream.__anext__()
        assert caught.value.status == 502
        assert caught.value.message == "the remote LLM reported an error mid-stream: oops"


async def test_unknown_parameters_are_refused_before_anything_is_sent() -> None:
    with trio.fail_after(20):
        async with serving(silent) as (url, recorder), RemoteLLM(config(url)) as remote:
            # A GBNF grammar is llama.cpp's own: an OpenAI-compatible remote has no such field.
            with pytest.raises(ValueError, match="grammar"):
                await remote.complete(USER, {"grammar": "root ::= [a-z]+"}, redact=redact)
            assert recorder.connections == 0


# --- configuration and the key file -----------------------------------------------------------


def key_file(content: str, mode: int) -> Path:
    path = short_tempdir("rk") / "remote.key"
    path.write_text(content)
    path.chmod(mode)
    return path


def test_key_file_loads_with_one_trailing_newline_stripped() -> None:
    assert load_api_key(key_file(KEY + "\n", 0o600)) == KEY
    assert load_api_key(key_file(KEY, 0o400)) == KEY
    loaded = RemoteConfig.load(
        url="https://api.example.com/v1", model="m", key_file=key_file(KEY + "\r\n", 0o600)
    )
    assert loaded.api_key == KEY and loaded.timeout == 60.0 and loaded.price_per_1k == 0.0


def test_group_or_world_readable_key_file_is_refused() -> None:
    path = key_file(KEY + "\n", 0o644)
    with pytest.raises(RemoteConfigError) as caught:
        load_api_key(path)
    message = str(caught.value)
    assert message == (
        f"APPLIANCE_REMOTE_LLM_KEY_FILE ({path}) has mode 0644: group or others may read or "
        f"change it; run: chmod 600 {path}"
    )
    assert KEY not in message
    with pytest.raises(RemoteConfigError, match="mode 0640"):
        load_api_key(key_file(KEY, 0o640))


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("", "is empty"),
        ("\n", "is empty"),
        (KEY + "\n\n", "more than one line"),
        (KEY + " \n", "spaces, control or non-ASCII"),
        ("x" * 5000, "over 4096 bytes"),
    ],
)
def test_bad_key_files_are_refused_without_showing_the_content(
    content: str, complaint: str
) -> None:
    with pytest.raises(RemoteConfigError, match=complaint) as caught:
        load_api_key(key_file(content, 0o600))
    assert KEY not in str(caught.value)


def test_missing_key_file_and_unset_setting_are_refused() -> None:
    missing = short_tempdir("rk") / "nope.key"
    with pytest.raises(RemoteConfigError, match=r"does not exist; write the remote LLM's API key"):
        load_api_key(missing)
    with pytest.raises(RemoteConfigError, match="APPLIANCE_REMOTE_LLM_KEY_FILE is not set"):
        RemoteConfig.load(url="https://api.example.com/v1", model="m", key_file="")
    directory = short_tempdir("rk")
    os.chmod(directory, 0o700)
    with pytest.raises(RemoteConfigError, match="not a regular file"):
        load_api_key(directory)


def test_config_is_validated_and_never_shows_the_key() -> None:
    good = config("https://api.example.com/v1")
    assert KEY not in repr(good) and KEY not in str(good)
    assert f"api_key=<{len(KEY)} characters>" in repr(good)
    for with_password in (
        "https://user:hunter2-password@api.example.com/v1",
        "https://user:hunter2-password@api.example.com:99999/v1",
    ):
        with pytest.raises(RemoteConfigError) as caught:
            config(with_password)
        assert "hunter2" not in str(caught.value)
        assert "APPLIANCE_REMOTE_LLM_KEY_FILE" in str(caught.value)
    for url, complaint in [
        ("ftp://api.example.com/v1", "use an http:// or https:// base URL"),
        ("api.example.com/v1", "use an http:// or https:// base URL"),
        ("https://api.example.com/v1?key=abc", "query or fragment"),
        ("https://api.example.com/v1/chat/completions", "give the base URL"),
        ("https://api.example.com:99999/v1", "use an http:// or https:// base URL"),
    ]:
        with pytest.raises(RemoteConfigError, match=complaint):
            config(url)
    with pytest.raises(RemoteConfigError, match="APPLIANCE_REMOTE_LLM_MODEL"):
        config("https://api.example.com/v1", model="")
    with pytest.raises(RemoteConfigError, match="APPLIANCE_REMOTE_TIMEOUT is 0"):
        config("https://api.example.com/v1", timeout=0)
    with pytest.raises(RemoteConfigError, match="APPLIANCE_REMOTE_PRICE_PER_1K_TOKENS"):
        config("https://api.example.com/v1", price_per_1k=-1.0)


def test_sse_decoder_handles_split_lines_crlf_comments_and_multiline_data() -> None:
    decoder = SSEDecoder(limit=1024)
    stream = (
        b': keep-alive\r\n\r\ndata: {"a":\r\ndata: 1}\r\n\r\nevent: error\ndata: x\n\ndata: [DONE]'
    )
    events = []
    for index in range(len(stream)):
        events += decoder.feed(stream[index : index + 1])
    events += decoder.close()
    assert [(e.event, e.data) for e in events] == [
        ("", b'{"a":\n1}'),
        ("error", b"x"),
        ("", b"[DONE]"),
    ]
    with pytest.raises(RemoteError, match="over 1024 bytes"):
        SSEDecoder(limit=1024).feed(b"data: " + b"x" * 2000)
