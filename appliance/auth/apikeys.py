"""API keys: created once and shown once, stored only as a hash.

A key reads `ak-<id>.<secret>`: the id finds the record in one Redis lookup
(`apikey:{<id>}`), the whole key is checked against the record's hash in constant time.
Records live in Redis, so a key created or revoked by the CLI, on this box or another
appliance on the same Redis, counts at the next request.

The hash (`v2:` + BLAKE2b-256 of the key) needs no secret: a key's secret part is 256
random bits, which no one can guess from its hash, so a leaked store gives nothing away,
and rotating PRIVACY_SALT leaves every key working. Records made before (a BLAKE2b keyed
with a key derived from PRIVACY_SALT, as are APPLIANCE_ADMIN_KEY_HASH values written by
an older `appliance init`) are checked under PRIVACY_SALT and PRIVACY_SALT_PREVIOUS and
re-hashed the first time their key is seen; `appliance keys rotate` names those left.

On a Redis Cluster a record and the name index (`apikey:names`) are in different slots, so
no write spans both in one transaction: a record is written before its name points at it
is usable, and a revocation marks the record first (that is what refuses the key) and
frees the name after, only while the name still points at that key. A step cut off in
between leaves a name that a second `keys revoke` or `keys create` of the name repairs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from typing import Final, Literal

import coredis
import msgspec

from appliance.auth.scopes import SCOPES
from appliance.store.client import RedisClient, refuses_writes

Scope = Literal["admin", "user"]
RECORD_PREFIX: Final = "apikey:"
NAMES_KEY: Final = "apikey:names"
# KEYS: a record. ARGV: the hash it had when read, the new one. Replaces only that hash of
# a record that still exists (a revoke or an expiry in between wins).
_REHASH: Final = """
if redis.call('HGET', KEYS[1], 'hash') == ARGV[1] then
  return redis.call('HSET', KEYS[1], 'hash', ARGV[2])
end
return -1
"""
# KEYS: the name index. ARGV: name, key id. Deletes the name only if it names that key.
_FREE_NAME: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
_TOKEN: Final = re.compile(r"^ak-([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})$")
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# last_used is written at most this often per key: a write per request is not worth it.
LAST_USED_EVERY: Final = 60.0


class ApiKeyError(Exception):
    """A key operation was refused; the message says why (never shows a key)."""


class ApiKey(msgspec.Struct, frozen=True):
    """A key as listed: everything but the secret."""

    id: str
    name: str
    scope: Scope
    created: float
    last_used: float | None = None
    revoked: float | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None


def record_key(key_id: str) -> str:
    return f"{RECORD_PREFIX}{{{key_id}}}"


HASH_SCHEME: Final = "v2:"


def hash_token(token: str) -> str:
    """The stored form of a key: independent of every secret setting (see above)."""
    return (
        HASH_SCHEME
        + hashlib.blake2b(token.encode(), digest_size=32, person=b"appliance-key-v2").hexdigest()
    )


def salted_hash(token: str, hash_key: bytes) -> str:
    """The stored form before `v2`: keyed with a key derived from PRIVACY_SALT."""
    return hashlib.blake2b(
        token.encode(), key=hash_key, digest_size=32, person=b"appliance-apikey"
    ).hexdigest()


def is_salted(stored: str) -> bool:
    return not stored.startswith(HASH_SCHEME)


def new_token() -> tuple[str, str]:
    """A fresh key id and the key itself."""
    key_id = secrets.token_hex(8)
    return key_id, f"ak-{key_id}.{secrets.token_urlsafe(32)}"


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ApiKeyError(
            f"key name {name[:70]!r} is not allowed: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _decode(key_id: str, fields: dict[bytes, bytes]) -> tuple[ApiKey, str]:
    text = {k.decode(): v.decode() for k, v in fields.items()}

    def number(name: str) -> float | None:
        return float(text[name]) if text.get(name) else None

    def whole(name: str) -> int | None:
        return int(text[name]) if text.get(name) else None

    key = ApiKey(
        id=key_id,
        name=text["name"],
        scope="admin" if text.get("scope") == "admin" else "user",
        created=float(text.get("created", "0")),
        last_used=number("last_used"),
        revoked=number("revoked"),
        tokens_per_day=whole("tokens_per_day"),
        tokens_per_month=whole("tokens_per_month"),
    )
    return key, text.get("hash", "")


class KeyStore:
    """API key records in Redis."""

    def __init__(
        self,
        client: Callable[[], RedisClient],
        hash_key: bytes | None = None,
        previous_hash_key: bytes | None = None,
    ) -> None:
        # A getter: the daemon's client is replaced when its store restarts.
        self._client = client
        # Keys derived from PRIVACY_SALT and PRIVACY_SALT_PREVIOUS: they check the records
        # hashed before `v2` (new records need none).
        self.salted_keys = tuple(key for key in (hash_key, previous_hash_key) if key)
        self._last_used_written: dict[str, float] = {}

    async def create(
        self,
        name: str,
        scope: str,
        *,
        tokens_per_day: int | None = None,
        tokens_per_month: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its token (shown once; only its hash is stored)."""
        check_name(name)
        if scope not in SCOPES:
            raise ApiKeyError(f"scope {scope!r} is not one of: {', '.join(SCOPES)}")
        for label, value in (("tokens per day", tokens_per_day), ("per month", tokens_per_month)):
            if value is not None and value < 0:
                raise ApiKeyError(f"{label} must be 0 or more")
        key_id = secrets.token_hex(8)
        token = f"ak-{key_id}.{secrets.token_urlsafe(32)}"
        fields: dict[str, str] = {
            "name": name,
            "scope": scope,
            "created": repr(time.time()),
            "hash": hash_token(token),
        }
        if tokens_per_day is not None:
            fields["tokens_per_day"] = str(tokens_per_day)
        if tokens_per_month is not None:
            fields["tokens_per_month"] = str(tokens_per_month)
        # The record first, then the name: a name never points at a key being written.
        # Until the token is shown nobody can use the record.
        await self._client().hset(record_key(key_id), fields)
        claimed = await self._client().hsetnx(NAMES_KEY, name, key_id)
        if not claimed and await self._free_dangling(name):
            claimed = await self._client().hsetnx(NAMES_KEY, name, key_id)
        if not claimed:
            await self._client().delete([record_key(key_id)])
            raise ApiKeyError(f"a key named {name!r} exists; revoke it first or pick another name")
        key, _ = _decode(key_id, {k.encode(): v.encode() for k, v in fields.items()})
        return key, token

    async def ensure_first_admin(self, id_and_hash: str) -> bool:
        """Record the admin key `appliance init` made (its id and hash are in the env file)
        unless that key's record exists already (then it may have been revoked: keep it)."""
        key_id, hashed = id_and_hash.split(":", 1)
        record = record_key(key_id)
        if await self._client().exists([record]):
            return False
        name = "admin"
        # Appliances sharing a Redis may start together: the name taken by this same key
        # is ours.
        if not await self._client().hsetnx(NAMES_KEY, name, key_id) and (
            await self._client().hget(NAMES_KEY, name) != key_id.encode()
        ):
            name = f"admin-{key_id[:6]}"
            await self._client().hset(NAMES_KEY, {name: key_id})
        await self._client().hset(
            record,
            {"name": name, "scope": "admin", "created": repr(time.time()), "hash": hashed},
        )
        return True

    async def create_ephemeral(self, name: str, ttl: int) -> str:
        """An admin key that expires by itself, for one CLI command talking to the daemon.

        Whoever can read the env file and reach the store can mint keys anyway; this only
        saves the operator from handling one."""
        key_id = secrets.token_hex(8)
        token = f"ak-{key_id}.{secrets.token_urlsafe(32)}"
        record = record_key(key_id)
        async with self._client().pipeline(transaction=True) as pipe:
            pipe.hset(
                record,
                {
                    "name": name,
                    "scope": "admin",
                    "created": repr(time.time()),
                    "hash": hash_token(token),
                },
            )
            pipe.expire(record, ttl)
        return token

    async def authenticate(self, token: str) -> ApiKey | None:
        """The active key this token belongs to, or None (never says which part failed)."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        key_id = match[1]
        fields = await self._client().hgetall(record_key(key_id))
        if not fields or b"name" not in fields:
            return None
        key, stored = _decode(key_id, fields)
        if key.revoked is not None or not self._matches(token, stored):
            return None
        if is_salted(stored):
            await self._rehash(key_id, stored, token)
        now = time.time()
        if now - self._last_used_written.get(key_id, 0.0) >= LAST_USED_EVERY:
            self._last_used_written[key_id] = now
            try:
                await self._client().hset(record_key(key_id), {"last_used": repr(now)})
            except coredis.exceptions.RedisError as exc:
                if not refuses_writes(exc):  # a full store: the key still works
                    raise
        return key

    def _matches(self, token: str, stored: str) -> bool:
        if not is_salted(stored):
            return hmac.compare_digest(stored, hash_token(token))
        # Every candidate is computed, so the time taken does not say which one matched.
        found = [hmac.compare_digest(stored, salted_hash(token, key)) for key in self.salted_keys]
        return any(found)

    async def _rehash(self, key_id: str, stored: str, token: str) -> None:
        """Move a record made before `v2` to the salt-independent hash."""
        try:
            await self._client().eval(
                _REHASH, keys=[record_key(key_id)], args=[stored, hash_token(token)]
            )
        except coredis.exceptions.RedisError as exc:
            if not refuses_writes(exc):  # a full store: it is re-hashed at a later use
                raise

    async def salted(self) -> list[ApiKey]:
        """Listed keys whose records still have a hash from before `v2` (see above)."""
        found: list[ApiKey] = []
        for key_id in (await self._client().hgetall(NAMES_KEY)).values():
            fields = await self._client().hgetall(record_key(key_id.decode()))
            if fields and b"name" in fields:
                key, stored = _decode(key_id.decode(), fields)
                if is_salted(stored):
                    found.append(key)
        return sorted(found, key=lambda key: key.created)

    async def by_name(self, name: str) -> ApiKey | None:
        key_id = await self._client().hget(NAMES_KEY, name)
        if key_id is None:
            return None
        fields = await self._client().hgetall(record_key(key_id.decode()))
        return _decode(key_id.decode(), fields)[0] if fields else None

    async def list(self) -> list[ApiKey]:
        names = await self._client().hgetall(NAMES_KEY)
        found: list[ApiKey] = []
        for key_id in names.values():
            fields = await self._client().hgetall(record_key(key_id.decode()))
            if fields:
                found.append(_decode(key_id.decode(), fields)[0])
        return sorted(found, key=lambda key: key.created)

    async def _free_dangling(self, name: str) -> bool:
        """Free a name whose key is revoked or has no record (a create or revoke cut off
        half-way); whether the name is free now."""
        key_id = await self._client().hget(NAMES_KEY, name)
        if key_id is None:
            return True
        fields = await self._client().hgetall(record_key(key_id.decode()))
        if fields and b"name" in fields and not fields.get(b"revoked"):
            return False
        await self._free_name(name, key_id.decode())
        return True

    async def _free_name(self, name: str, key_id: str) -> None:
        await self._client().eval(_FREE_NAME, keys=[NAMES_KEY], args=[name, key_id])

    async def revoke(self, name: str) -> ApiKey:
        """Revoked at once: the record stays (marked) for the audit trail, the name is freed."""
        key = await self.by_name(name)
        if key is None:
            if not await self._free_dangling(name):
                raise ApiKeyError(f"the key named {name!r} cannot be read; try again")
            raise ApiKeyError(f"there is no key named {name!r} (see: appliance keys list)")
        revoked = key.revoked or time.time()
        # The record first: from this write on the key is refused, on every appliance.
        await self._client().hset(record_key(key.id), {"revoked": repr(revoked)})
        await self._free_name(name, key.id)
        return msgspec.structs.replace(key, revoked=revoked)

    async def count_admins(self) -> int:
        return sum(1 for key in await self.list() if key.scope == "admin")
