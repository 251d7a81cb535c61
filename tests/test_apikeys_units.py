"""API keys, one rule at a time, against the real redis-server: the stored hashes (pinned, so
that keys made by an earlier release keep working), names and scopes refused with the
message that names them, which tokens authenticate, re-hashing of records made before `v2`,
last-use bookkeeping, the first admin key, short-lived operator keys, revocation, and the
repair of a name that a create or revoke cut off half-way left behind.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import msgspec
import pytest

from appliance.auth.apikeys import (
    NAMES_KEY,
    ApiKey,
    ApiKeyError,
    KeyStore,
    check_name,
    hash_token,
    is_salted,
    new_token,
    record_key,
    salted_hash,
)
from appliance.privacy.keys import hash_key_from_salt
from tests.store_units import embedded_redis, fill_up, make_room

TOKEN = "ak-0123456789abcdef." + "S" * 43
# The stored forms of TOKEN: by this release (`v2`), and by one before it under a salt.
V2_HASH = "v2:63ee24de03f3233e9bbc9703556d1377901541abe48a6978573a9daab892fafa"
OLD_SALT = "an-old-privacy-salt"
SALTED_HASH = "9b05048ff379150e8bce761dc15c8bc8ea7c77fac5e785b5431fd45140e6d40c"
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


@asynccontextmanager
async def store(
    *salts: str,
) -> AsyncIterator[tuple[KeyStore, coredis.Redis[bytes]]]:
    """A key store on a fresh redis-server; `salts`: PRIVACY_SALT and PRIVACY_SALT_PREVIOUS."""
    async with embedded_redis() as (_, client):
        yield KeyStore(lambda: client, *(hash_key_from_salt(salt) for salt in salts)), client


async def record(client: coredis.Redis[bytes], key_id: str) -> dict[str, str]:
    fields = await client.hgetall(record_key(key_id))
    return {k.decode(): v.decode() for k, v in fields.items()}


async def names(client: coredis.Redis[bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await client.hgetall(NAMES_KEY)).items()}


async def old_record(client: coredis.Redis[bytes], name: str, stored: str = SALTED_HASH) -> None:
    """TOKEN's record as a release before `v2` wrote it."""
    await client.hset(
        record_key("0123456789abcdef"),
        {"name": name, "scope": "user", "created": "1000.5", "hash": stored},
    )
    await client.hset(NAMES_KEY, {name: "0123456789abcdef"})


# --- the stored form ------------------------------------------------------------------------


def test_the_stored_hashes_are_pinned() -> None:
    assert hash_token(TOKEN) == V2_HASH
    assert salted_hash(TOKEN, hash_key_from_salt(OLD_SALT)) == SALTED_HASH
    assert not is_salted(V2_HASH)
    assert is_salted(SALTED_HASH)


def test_a_new_token_is_its_id_and_256_random_bits() -> None:
    key_id, token = new_token()
    assert re.fullmatch(r"[0-9a-f]{16}", key_id)
    assert re.fullmatch(rf"ak-{key_id}\.[A-Za-z0-9_-]{{43}}", token)
    assert new_token() != new_token()


def test_a_listed_key_cannot_be_changed() -> None:
    key = ApiKey(id="0123456789abcdef", name="a", scope="user", created=1.0)
    with pytest.raises(AttributeError):
        key.scope = "admin"  # type: ignore[misc]
    assert hash(key) == hash(ApiKey(id="0123456789abcdef", name="a", scope="user", created=1.0))


@pytest.mark.parametrize("name", ["a", "A", "7", "a" * 64, "A.b_c-9", "ci.bot-2"])
def test_these_key_names_are_allowed(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "-a", ".a", "_a", "a b", "a/b", "a:b", "é", "a\n", "b" * 100]
)
def test_other_key_names_are_refused_naming_the_rule(name: str) -> None:
    with pytest.raises(ApiKeyError) as caught:
        check_name(name)
    assert str(caught.value) == f"key name {name[:70]!r} is not allowed: {NAME_RULE}"


# --- create ---------------------------------------------------------------------------------


async def test_a_created_key_is_stored_as_its_hash_and_authenticates() -> None:
    async with store() as (keys, client):
        before = time.time()
        key, token = await keys.create("ci-bot", "user", tokens_per_day=0, tokens_per_month=5)
        assert re.fullmatch(rf"ak-{key.id}\.[A-Za-z0-9_-]{{43}}", token)
        assert (key.name, key.scope, key.tokens_per_day, key.tokens_per_month) == (
            "ci-bot",
            "user",
            0,
            5,
        )
        assert before <= key.created <= time.time()
        assert (key.last_used, key.revoked) == (None, None)
        stored = await record(client, key.id)
        assert stored == {
            "name": "ci-bot",
            "scope": "user",
            "created": repr(key.created),
            "hash": hash_token(token),
            "tokens_per_day": "0",
            "tokens_per_month": "5",
        }
        assert token not in str(stored)
        assert await names(client) == {"ci-bot": key.id}
        found = await keys.authenticate(token)
        assert found is not None
        assert msgspec.structs.replace(found, last_used=None) == key
        admin, admin_token = await keys.create("boss", "admin")
        assert admin.scope == "admin"
        assert (await record(client, admin.id)).keys() == {"name", "scope", "created", "hash"}
        assert (await keys.authenticate(admin_token)) is not None


@pytest.mark.parametrize("scope", ["root", "Admin", ""])
async def test_an_unknown_scope_is_refused(scope: str) -> None:
    async with store() as (keys, client):
        with pytest.raises(ApiKeyError) as caught:
            await keys.create("ci-bot", scope)
        assert str(caught.value) == f"scope {scope!r} is not one of: admin, user"
        assert await client.keys("*") == set()


async def test_a_negative_budget_is_refused() -> None:
    async with store() as (keys, client):
        with pytest.raises(ApiKeyError, match=r"^tokens per day must be 0 or more$"):
            await keys.create("ci-bot", "user", tokens_per_day=-1)
        with pytest.raises(ApiKeyError, match=r"^per month must be 0 or more$"):
            await keys.create("ci-bot", "user", tokens_per_month=-1)
        with pytest.raises(ApiKeyError, match=r"^key name '-x' is not allowed"):
            await keys.create("-x", "user")
        assert await client.keys("*") == set()


async def test_a_name_in_use_is_refused_and_leaves_nothing_behind() -> None:
    async with store() as (keys, client):
        first, _ = await keys.create("ci-bot", "user")
        with pytest.raises(ApiKeyError) as caught:
            await keys.create("ci-bot", "admin")
        assert str(caught.value) == (
            "a key named 'ci-bot' exists; revoke it first or pick another name"
        )
        assert await client.keys("apikey:{*") == {record_key(first.id).encode()}
        assert await names(client) == {"ci-bot": first.id}


async def test_a_name_freed_only_half_way_can_be_taken_again() -> None:
    async with store() as (keys, client):
        # A revoke cut off after marking the record: the name still points at it.
        old, _ = await keys.create("ci-bot", "user")
        await client.hset(record_key(old.id), {"revoked": "1000.0"})
        new, token = await keys.create("ci-bot", "user")
        assert await names(client) == {"ci-bot": new.id}
        assert await keys.authenticate(token) is not None
        # A create cut off, or a record gone: the name points at nothing.
        await client.delete([record_key(new.id)])
        newer, _ = await keys.create("ci-bot", "admin")
        assert await names(client) == {"ci-bot": newer.id}


# --- authenticate ---------------------------------------------------------------------------


async def test_only_the_exact_token_of_a_live_record_authenticates() -> None:
    async with store() as (keys, client):
        key, token = await keys.create("ci-bot", "user")
        key_id, secret = token[3:].split(".")
        other_id = "f" * 16 if key_id != "f" * 16 else "e" * 16
        for wrong in (
            "",
            token[:-1],
            token + "x",
            f"ak-{key_id}.{secret[:-1]}x",  # right id, wrong secret
            f"ak-{other_id}.{secret}",
            f"ak-{key_id.upper()}.{secret}",
            f" {token}",
            token.replace("ak-", "sk-"),
        ):
            assert await keys.authenticate(wrong) is None, wrong
        # A record without a name (a write cut off, or not ours) is no key.
        await client.hset(record_key(other_id), {"hash": hash_token(f"ak-{other_id}.{secret}")})
        assert await keys.authenticate(f"ak-{other_id}.{secret}") is None
        found = await keys.authenticate(token)
        assert found is not None and found.id == key.id


async def test_last_use_is_written_at_the_first_use_then_at_most_once_a_minute() -> None:
    async with store() as (keys, client):
        key, token = await keys.create("ci-bot", "user")
        before = time.time()
        found = await keys.authenticate(token)
        assert found is not None and found.last_used is None  # as it was read
        first = float((await record(client, key.id))["last_used"])
        assert before <= first <= time.time()
        assert (await keys.list())[0].last_used == first
        await keys.authenticate(token)
        assert float((await record(client, key.id))["last_used"]) == first
        # 60.5 s after the last write it is written again; 59.5 s after, not yet.
        keys._last_used_written[key.id] = time.time() - 59.5
        await keys.authenticate(token)
        assert float((await record(client, key.id))["last_used"]) == first
        keys._last_used_written[key.id] = time.time() - 60.5
        await keys.authenticate(token)
        assert float((await record(client, key.id))["last_used"]) > first


async def test_last_use_is_written_again_exactly_a_minute_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with store() as (keys, client):
        key, token = await keys.create("ci-bot", "user")
        now = 1_800_000_000.0
        monkeypatch.setattr(time, "time", lambda: now)
        await keys.authenticate(token)
        assert float((await record(client, key.id))["last_used"]) == now
        now += 60.0  # LAST_USED_EVERY to the float: due
        await keys.authenticate(token)
        assert float((await record(client, key.id))["last_used"]) == now


async def test_a_full_store_still_lets_a_key_in() -> None:
    async with store(OLD_SALT) as (keys, client):
        _, token = await keys.create("ci-bot", "user")
        await old_record(client, "old")
        await fill_up(client)
        assert await keys.authenticate(token) is not None  # last use not written
        assert await keys.authenticate(TOKEN) is not None  # not re-hashed yet
        await make_room(client)
        assert (await record(client, "0123456789abcdef"))["hash"] == SALTED_HASH
        assert await keys.authenticate(TOKEN) is not None
        assert (await record(client, "0123456789abcdef"))["hash"] == V2_HASH


async def test_a_store_error_other_than_full_is_not_hidden() -> None:
    async with embedded_redis() as (server, client):
        keys = KeyStore(lambda: client, hash_key_from_salt(OLD_SALT))
        _, token = await keys.create("ci-bot", "user")
        await old_record(client, "old")
        # A client that may read but not write records nor run scripts (NOPERM, not OOM).
        await client.acl_setuser("reader", "on", "nopass", "~*", "&*", "+@all", "-hset", "-eval")
        reader: coredis.Redis[bytes] = coredis.Redis(
            unix_socket_path=str(server.socket_path), username="reader"
        )
        async with reader:
            limited = KeyStore(lambda: reader, hash_key_from_salt(OLD_SALT))
            with pytest.raises(coredis.exceptions.AuthorizationError):
                await limited.authenticate(token)  # its last use cannot be written
            limited._last_used_written["0123456789abcdef"] = time.time()
            with pytest.raises(coredis.exceptions.AuthorizationError):
                await limited.authenticate(TOKEN)  # it cannot be re-hashed


# --- records made before `v2` ---------------------------------------------------------------


@pytest.mark.parametrize("salts", [(OLD_SALT,), ("a-newer-salt", OLD_SALT)])
async def test_a_record_made_before_v2_authenticates_once_and_is_re_hashed(
    salts: tuple[str, ...],
) -> None:
    async with store(*salts) as (keys, client):
        await old_record(client, "old")
        assert [key.name for key in await keys.salted()] == ["old"]
        key = await keys.authenticate(TOKEN)
        assert key is not None and (key.name, key.created) == ("old", 1000.5)
        assert (await record(client, "0123456789abcdef"))["hash"] == V2_HASH
        assert await keys.salted() == []
        # The re-hashed record no longer needs the salt.
        assert await KeyStore(lambda: client).authenticate(TOKEN) is not None


async def test_a_record_made_before_v2_needs_one_of_the_salts_it_was_made_with() -> None:
    async with store("a-newer-salt") as (keys, client):
        await old_record(client, "old")
        assert await keys.authenticate(TOKEN) is None
        assert await KeyStore(lambda: client).authenticate(TOKEN) is None
        assert (await record(client, "0123456789abcdef"))["hash"] == SALTED_HASH


async def test_the_salted_list_names_only_live_records_made_before_v2() -> None:
    async with store(OLD_SALT) as (keys, client):
        await keys.create("new", "user")
        await client.hset(
            record_key("1" * 16), {"name": "later", "created": "2000.0", "hash": "abc"}
        )
        await client.hset(record_key("2" * 16), {"hash": "def"})  # no name: not a key
        await old_record(client, "earlier")
        await client.hset(NAMES_KEY, {"later": "1" * 16, "nameless": "2" * 16, "gone": "3" * 16})
        assert [key.name for key in await keys.salted()] == ["earlier", "later"]


# --- listing --------------------------------------------------------------------------------


async def test_keys_are_listed_by_name_oldest_first_and_admins_counted() -> None:
    async with store() as (keys, client):
        await keys.create("first", "admin")
        second, _ = await keys.create("second", "user")
        await keys.create("third", "admin")
        await client.hset(NAMES_KEY, {"gone": "3" * 16})  # a name whose record is gone
        assert [key.name for key in await keys.list()] == ["first", "second", "third"]
        assert await keys.by_name("second") == second
        assert await keys.by_name("gone") is None
        assert await keys.by_name("nobody") is None
        assert await keys.count_admins() == 2
        await keys.revoke("third")
        assert await keys.count_admins() == 1


# --- the first admin key --------------------------------------------------------------------


async def test_the_first_admin_key_is_recorded_once_under_the_name_admin() -> None:
    async with store() as (keys, client):
        assert await keys.ensure_first_admin(f"0123456789abcdef:{V2_HASH}") is True
        assert await names(client) == {"admin": "0123456789abcdef"}
        stored = await record(client, "0123456789abcdef")
        assert (stored["name"], stored["scope"], stored["hash"]) == ("admin", "admin", V2_HASH)
        found = await keys.authenticate(TOKEN)
        assert found is not None and found.scope == "admin"
        # Once only: a revoked first key stays revoked at the next start.
        await keys.revoke("admin")
        assert await keys.ensure_first_admin(f"0123456789abcdef:{V2_HASH}") is False
        assert await keys.authenticate(TOKEN) is None


async def test_a_first_admin_key_whose_name_another_appliance_took_for_it_keeps_it() -> None:
    async with store() as (keys, client):
        await client.hset(NAMES_KEY, {"admin": "0123456789abcdef"})
        assert await keys.ensure_first_admin(f"0123456789abcdef:{V2_HASH}") is True
        assert await names(client) == {"admin": "0123456789abcdef"}
        assert (await record(client, "0123456789abcdef"))["name"] == "admin"


async def test_a_first_admin_key_whose_name_is_taken_gets_a_name_of_its_own() -> None:
    async with store() as (keys, client):
        other, _ = await keys.create("admin", "admin")
        assert await keys.ensure_first_admin(f"0123456789abcdef:{V2_HASH}") is True
        assert await names(client) == {"admin": other.id, "admin-012345": "0123456789abcdef"}
        found = await keys.by_name("admin-012345")
        assert found is not None and found.id == "0123456789abcdef"


# --- short-lived keys -----------------------------------------------------------------------


async def test_an_operator_key_is_an_admin_key_that_expires_by_itself() -> None:
    async with store() as (keys, client):
        token = await keys.create_ephemeral("operator-cli-1", 300)
        key = await keys.authenticate(token)
        assert key is not None and (key.name, key.scope) == ("operator-cli-1", "admin")
        assert 295 <= await client.ttl(record_key(key.id)) <= 300
        assert await names(client) == {}  # not listed, not revocable by name


# --- revoke ---------------------------------------------------------------------------------


async def test_a_revoked_key_is_refused_at_once_and_its_name_freed() -> None:
    async with store() as (keys, client):
        key, token = await keys.create("ci-bot", "user")
        before = time.time()
        revoked = await keys.revoke("ci-bot")
        assert revoked.id == key.id
        assert revoked.revoked is not None and before <= revoked.revoked <= time.time()
        assert float((await record(client, key.id))["revoked"]) == revoked.revoked
        assert await keys.authenticate(token) is None
        assert await names(client) == {}
        assert await keys.list() == []


async def test_a_revoke_cut_off_half_way_is_finished_and_keeps_its_time() -> None:
    async with store() as (keys, client):
        key, _ = await keys.create("ci-bot", "user")
        await client.hset(record_key(key.id), {"revoked": "1000.0"})
        revoked = await keys.revoke("ci-bot")
        assert revoked.revoked == 1000.0
        assert (await record(client, key.id))["revoked"] == "1000.0"
        assert await names(client) == {}


async def test_revoking_an_unknown_name_says_so() -> None:
    async with store() as (keys, client):
        with pytest.raises(ApiKeyError) as caught:
            await keys.revoke("nobody")
        assert str(caught.value) == "there is no key named 'nobody' (see: appliance keys list)"
        # A name left pointing at no record is freed by the attempt.
        await client.hset(NAMES_KEY, {"gone": "3" * 16})
        with pytest.raises(ApiKeyError, match=r"^there is no key named 'gone'"):
            await keys.revoke("gone")
        assert await names(client) == {}
