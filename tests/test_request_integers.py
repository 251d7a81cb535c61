"""Every integer a request carries is bounded where it enters: huge and negative values get
400/422 naming the field, never a 500, and the daemon stays ready."""

from __future__ import annotations

import json
from typing import Any, Final

import trio

from tests.harness import running_daemon

# Past int64, past uint64, far past both, below int64, plainly negative.
HOSTILE: Final = [2**63, 2**64 + 1, 10**30, 10**400, -(2**63) - 1, -1]
CHAT: Final = {"message": "the", "max_tokens": 2}
COMPLETION_CHAT: Final = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "the"}],
    "max_tokens": 2,
}
COMPLETION: Final = {"model": "tiny", "prompt": "the", "max_tokens": 2}
# (path, body, field): each integer field of each generation endpoint.
BODY_FIELDS: Final = [
    ("/api/v1/chat/send", CHAT, "max_tokens"),
    ("/api/v1/chat/send", CHAT, "seed"),
    ("/v1/chat/completions", COMPLETION_CHAT, "max_tokens"),
    ("/v1/chat/completions", COMPLETION_CHAT, "max_completion_tokens"),
    ("/v1/chat/completions", COMPLETION_CHAT, "seed"),
    ("/v1/chat/completions", COMPLETION_CHAT, "n"),
    ("/v1/completions", COMPLETION, "max_tokens"),
    ("/v1/completions", COMPLETION, "seed"),
    ("/v1/completions", COMPLETION, "n"),
    ("/api/v1/admin/keys", {"name": "budgeted"}, "tokens_per_day"),
    ("/api/v1/admin/keys", {"name": "budgeted"}, "tokens_per_month"),
]
QUERY_FIELDS: Final = [
    ("/api/v1/conversations", "offset"),
    ("/api/v1/conversations", "limit"),
    ("/api/v1/health/metrics", "sample_seconds"),
]


def _refused(answer: Any, field: str, context: object) -> None:
    assert answer.status_code in (400, 422), (context, answer.status_code, answer.text)
    error = answer.json()["error"]
    assert error["param"] == field, (context, error)
    assert field in error["message"], (context, error)
    assert "Traceback" not in answer.text


async def test_huge_and_negative_integers_are_refused_naming_the_field() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon, daemon.client() as client:
            for path, body, field in BODY_FIELDS:
                # A seed may be negative (OpenAI's range is int64's).
                for value in [v for v in HOSTILE if field != "seed" or v != -1]:
                    # json.dumps writes Python's big integers as they are.
                    content = json.dumps({**body, field: value})
                    answer = await client.post(
                        path, content=content, headers={"Content-Type": "application/json"}
                    )
                    _refused(answer, field, (path, field, str(value)[:20]))
            for path, field in QUERY_FIELDS:
                for value in HOSTILE:
                    answer = await client.get(path, params={field: str(value)})
                    _refused(answer, field, (path, field, str(value)[:20]))
            # What int() would take but is not a plain whole number.
            for field in ("offset", "limit"):
                for text in ("1e3", " 5", "٣", "1_0", "0x10", "", "+5"):
                    answer = await client.get("/api/v1/conversations", params={field: text})
                    _refused(answer, field, (field, text))

            # Not supported, whatever token ids it names.
            biased = await client.post(
                "/v1/chat/completions",
                json={**COMPLETION_CHAT, "logit_bias": {str(2**70): 5}},
            )
            _refused(biased, "logit_bias", "logit_bias")

            # The extremes of the documented range work, at both ends.
            for seed in (2**63 - 1, -(2**63)):
                for path, body in (
                    ("/api/v1/chat/send", CHAT),
                    ("/v1/chat/completions", COMPLETION_CHAT),
                    ("/v1/completions", COMPLETION),
                ):
                    answer = await client.post(path, json={**body, "seed": seed})
                    assert answer.status_code == 200, (path, seed, answer.text)
            page = await client.get("/api/v1/conversations", params={"offset": 2**31 - 1})
            assert page.status_code == 200 and page.json()["conversations"] == []

            assert (await client.get("/api/v1/health/ready")).status_code == 200
            services = (await client.get("/api/v1/health/services")).json()["services"]
            assert all(service["restarts"] == 0 for service in services), services
