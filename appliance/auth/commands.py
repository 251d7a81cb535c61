"""`appliance keys create|list|revoke|usage`: API keys, in the store the daemon uses (its
redis-server when it runs, found through the state dir's lock, so a change counts at the
next request; else one started for the duration; or the external Redis or Redis Cluster of
APPLIANCE_REDIS_URL, shared by every appliance on it)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import msgspec
import trio

from appliance.auth.apikeys import ApiKey, ApiKeyError, KeyStore
from appliance.auth.budgets import Budgets, key_limits
from appliance.config import Settings
from appliance.store.access import redis_client
from appliance.store.client import StoreMisconfigured


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def _entry(key: ApiKey, salted: bool) -> dict[str, object]:
    return {
        "id": key.id,
        "name": key.name,
        "scope": key.scope,
        "created": key.created,
        "last_used": key.last_used,
        "tokens_per_day": key.tokens_per_day,
        "tokens_per_month": key.tokens_per_month,
        # Hashed with a PRIVACY_SALT (made before `v2`); re-hashed when next used.
        "salted_hash": salted,
    }


async def create_key(
    settings: Settings, name: str, scope: str, per_day: int | None, per_month: int | None
) -> tuple[ApiKey, str]:
    async with redis_client(settings, "keys create") as client:
        store = KeyStore(lambda: client)
        return await store.create(name, scope, tokens_per_day=per_day, tokens_per_month=per_month)


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.keys_command == "create":
        key, token = await create_key(
            settings, args.name, args.scope, args.tokens_per_day, args.tokens_per_month
        )
        print(token)
        print(
            f"created {key.scope} key {key.name!r} (id {key.id}); it is shown only now: "
            "store it where its user keeps secrets",
            file=sys.stderr,
        )
        return 0
    async with redis_client(settings, f"keys {args.keys_command}") as client:
        store = KeyStore(lambda: client)
        if args.keys_command == "revoke":
            revoked = await store.revoke(args.name)
            print(f"revoked key {revoked.name!r} (id {revoked.id}); it is refused from now on")
            return 0
        keys = await store.list()
        salted = {key.id for key in await store.salted()}
        if args.keys_command == "usage":
            return await _usage(
                settings, Budgets(lambda: client, settings.budget_enforce), keys, args
            )
    if args.json:
        print(json.dumps([_entry(key, key.id in salted) for key in keys], indent=2))
        return 0
    print(f"{'NAME':<24} {'SCOPE':<6} {'ID':<17} {'CREATED':<17} LAST USED")
    for key in keys:
        print(
            f"{key.name:<24} {key.scope:<6} {key.id:<17} {_when(key.created):<17} "
            f"{_when(key.last_used)}"
        )
    return 0


async def _usage(
    settings: Settings, budgets: Budgets, keys: list[ApiKey], args: argparse.Namespace
) -> int:
    if args.name is not None:
        keys = [key for key in keys if key.name == args.name]
        if not keys:
            raise ApiKeyError(f"there is no key named {args.name!r} (see: appliance keys list)")
    rows = []
    for key in keys:
        limits = key_limits(
            key.tokens_per_day,
            key.tokens_per_month,
            settings.tokens_per_day,
            settings.tokens_per_month,
        )
        report = await budgets.report(key.id, *limits)
        rows.append((key, report["local"], report["remote"]))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": k.name,
                        "id": k.id,
                        "local": msgspec.to_builtins(lo),
                        "remote": msgspec.to_builtins(re),
                    }
                    for k, lo, re in rows
                ],
                indent=2,
            )
        )
        return 0
    print(
        f"{'NAME':<24} {'LOCAL TODAY':>18} {'LOCAL MONTH':>20} {'REMOTE MONTH':>12} "
        f"{'REMOTE COST':>11}"
    )
    for key, local, remote in rows:
        day = f"{local.day}/{local.tokens_per_day or '-'}"
        month = f"{local.month}/{local.tokens_per_month or '-'}"
        print(
            f"{key.name:<24} {day:>18} {month:>20} {remote.month:>12} "
            f"{remote.cost_month or 0:>11.4f}"
        )
    return 0


def run_api_key_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return trio.run(_run, settings, args)
    except (ApiKeyError, StoreMisconfigured) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
