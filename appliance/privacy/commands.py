"""`appliance keys status|rotate`: which keys stored data is sealed under; re-seal it.
(`keys create|list|revoke` are API keys: appliance.auth.commands.)

With the daemon running these use its Redis; with it stopped they start the embedded
redis-server themselves for the duration (never a second one beside a running daemon's).

API keys need no re-hashing: their hashes do not depend on PRIVACY_SALT. Keys made before
that (hashed with a PRIVACY_SALT) are re-hashed when next used; both commands name those
left, since they stop working once their salt is neither PRIVACY_SALT nor _PREVIOUS.
"""

from __future__ import annotations

import argparse
import json
import sys

import coredis
import trio

from appliance.auth.apikeys import KeyStore
from appliance.config import Settings
from appliance.privacy.keys import load_keys
from appliance.privacy.rotation import KeyMismatch, key_usage, old_key_count, rotate
from appliance.progress import ProgressBar
from appliance.store.access import redis_client
from appliance.store.client import StoreMisconfigured
from appliance.store.conversations import key_id_of
from appliance.store.sealing import KeyRing, SealError


async def _status(settings: Settings, as_json: bool) -> int:
    keys = await trio.to_thread.run_sync(load_keys, settings)
    async with redis_client(settings, "keys status") as client:
        usage = await key_usage(client)
        salted = [key.name for key in await KeyStore(lambda: client).salted()]
    current = key_id_of(keys.codec)
    old = old_key_count(usage, keys.codec)
    if as_json:
        print(
            json.dumps(
                {
                    "current_key_id": current,
                    "by_key": usage,
                    "under_old_keys": old,
                    "api_keys_with_salted_hash": salted,
                }
            )
        )
        return 0
    print(f"current key id: {current}")
    for key_id, count in usage.items():
        print(f"  {key_id}: {count} conversations{'  (current)' if key_id == current else ''}")
    print(f"conversations under old keys: {old}")
    _print_salted(salted)
    return 0


def _print_salted(names: list[str]) -> None:
    if not names:
        print("API keys hashed with a PRIVACY_SALT: none (no API key depends on the salt)")
        return
    print(f"API keys hashed with a PRIVACY_SALT (made by an older version): {', '.join(names)}")
    print(
        "  each is re-hashed, independent of the salt, when next used; until then it works "
        "only while the salt it was made under is PRIVACY_SALT or PRIVACY_SALT_PREVIOUS: use "
        "these keys before removing PRIVACY_SALT_PREVIOUS, or replace them (keys create)"
    )


async def _rotate(settings: Settings) -> int:
    keys = await trio.to_thread.run_sync(load_keys, settings)
    codec = keys.codec
    if isinstance(codec, KeyRing):
        # Rotation is also how data stored in clear gets sealed once encryption is on.
        codec.allow_plain_reads = True
    async with redis_client(settings, "keys rotate") as client:
        done, remaining = await rotate(client, codec, ProgressBar("re-sealing", unit="items"))
        salted = [key.name for key in await KeyStore(lambda: client).salted()]
    print(f"re-sealed {done} conversations under key id {key_id_of(codec)}")
    print(f"conversations still under old keys: {remaining}")
    _print_salted(salted)
    if remaining:
        print("run it again to finish (it is safe to interrupt and re-run)", file=sys.stderr)
        return 1
    return 0


def run_keys_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.keys_command in ("create", "list", "revoke", "usage"):
        from appliance.auth.commands import run_api_key_command

        try:
            return run_api_key_command(settings, args)
        except StoreMisconfigured as exc:
            print(f"appliance: {exc}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            raise  # the reader of the output went away: the CLI stops quietly
        except (coredis.exceptions.RedisError, OSError) as exc:
            print(f"appliance: the store is not reachable ({type(exc).__name__})", file=sys.stderr)
            return 1
    try:
        if args.keys_command == "status":
            return trio.run(_status, settings, args.json)
        return trio.run(_rotate, settings)
    except (KeyMismatch, SealError, StoreMisconfigured) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise  # the reader of the output went away: the CLI stops quietly
    except (coredis.exceptions.RedisError, OSError) as exc:
        print(f"appliance: the store is not reachable ({type(exc).__name__})", file=sys.stderr)
        return 1
