"""The API client of the end-to-end test, run in the container's network namespace.

The appliance listens on 127.0.0.1 inside the container, so the driver (e2e/run.py) starts
this with the project venv's Python under `nsenter -t <container init> -n`: the real OpenAI
client and httpx, nothing installed in the container. Every command prints one JSON object
per response on stdout, for the driver to check.

    client.py request METHOD PATH [--key K] [--body JSON] [--request-id ID] [--repeat N]
    client.py openai-chat --key K --request-id ID --message TEXT
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Final

import httpx
import openai

BASE: Final = "http://127.0.0.1:8000"
TIMEOUT: Final = 60.0


def request(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    if args.request_id:
        headers["X-Request-ID"] = args.request_id
    body = json.loads(args.body) if args.body else None
    with httpx.Client(base_url=args.base, timeout=TIMEOUT, headers=headers) as client:
        for _ in range(args.repeat):
            try:
                response = client.request(args.method, args.path, json=body)
            except httpx.TransportError as exc:
                # Not an answer (the daemon is starting or stopping): the driver retries.
                _emit({"status": 0, "error": f"{type(exc).__name__}: {exc}"})
                continue
            _emit(
                {
                    "status": response.status_code,
                    "request_id": response.headers.get("x-request-id"),
                    "body": _body(response),
                }
            )


def openai_chat(args: argparse.Namespace) -> None:
    client = openai.OpenAI(base_url=f"{args.base}/v1", api_key=args.key, timeout=TIMEOUT)
    raw = client.chat.completions.with_raw_response.create(
        model=args.model,
        messages=[{"role": "user", "content": args.message}],
        max_tokens=args.max_tokens,
        extra_headers={"X-Request-ID": args.request_id},
    )
    completion = raw.parse()
    _emit(
        {
            "status": raw.status_code,
            "request_id": raw.headers.get("x-request-id"),
            "model": completion.model,
            "content": completion.choices[0].message.content,
            "finish_reason": completion.choices[0].finish_reason,
            "completion_tokens": completion.usage.completion_tokens if completion.usage else None,
        }
    )


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=BASE, help="the appliance's URL inside the container")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("request", help="one HTTP request (or --repeat N of them)")
    one.add_argument("method")
    one.add_argument("path")
    one.add_argument("--key")
    one.add_argument("--body", help="a JSON body")
    one.add_argument("--request-id")
    one.add_argument("--repeat", type=int, default=1)
    chat = commands.add_parser("openai-chat", help="a chat completion through the OpenAI client")
    chat.add_argument("--key", required=True)
    chat.add_argument("--request-id", required=True)
    chat.add_argument("--message", required=True)
    chat.add_argument("--model", default="smollm2-135m-instruct")
    chat.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    if args.command == "request":
        request(args)
    else:
        openai_chat(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
