"""Sealing at rest: round trips, tampering, moved values, rotation and error messages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.store.sealing import (
    HEADER_BYTES,
    MAGIC,
    MIN_SEALED_BYTES,
    NONCE_BYTES,
    VERSION,
    Codec,
    KeyConfigError,
    KeyRing,
    MalformedRecord,
    PlainCodec,
    SealError,
    TamperedRecord,
    UnknownKeyId,
)

SECRET_A = "a-secret-key-of-forty-characters-000000A"
SECRET_B = "b-secret-key-of-forty-characters-000000B"
SALT_A = "salt-a-7f3c"
SALT_B = "salt-b-91e2"
KEY = "conv:{0123456789abcdef0123456789abcdef}:messages"
PLAINTEXT = b"hi"
SHORT_RECORD_BYTES = MIN_SEALED_BYTES + len(PLAINTEXT)


@dataclass(frozen=True)
class Rings:
    a: KeyRing
    a_again: KeyRing
    a_other_salt: KeyRing
    b: KeyRing
    b_after_a: KeyRing  # current B, previous A: the state during a rotation


@pytest.fixture(scope="module")
def rings() -> Rings:
    # Argon2id is slow on purpose: derive each ring once per module, not per test.
    return Rings(
        a=KeyRing(SECRET_A, SALT_A),
        a_again=KeyRing.from_settings(SECRET_A, SALT_A),
        a_other_salt=KeyRing(SECRET_A, SALT_B),
        b=KeyRing(SECRET_B, SALT_B),
        b_after_a=KeyRing.from_settings(SECRET_B, SALT_B, SECRET_A, SALT_A),
    )


def test_round_trip(rings: Rings) -> None:
    for plaintext in (b"", b"hello", "h\u00e9llo \U0001f600".encode(), bytes(range(256)) * 40):
        sealed = rings.a.seal(plaintext, KEY)
        assert sealed.startswith(MAGIC + bytes([VERSION]))
        assert plaintext not in sealed or not plaintext
        assert rings.a.open(sealed, KEY) == plaintext
        assert not rings.a.needs_rotation(sealed)


def test_two_seals_of_the_same_plaintext_differ(rings: Rings) -> None:
    first, second = rings.a.seal(b"same", KEY), rings.a.seal(b"same", KEY)
    assert first != second
    assert (
        first[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
        != second[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
    )


@pytest.mark.parametrize("position", range(SHORT_RECORD_BYTES))
def test_one_changed_byte_anywhere_fails_to_open(rings: Rings, position: int) -> None:
    sealed = bytearray(rings.a.seal(PLAINTEXT, KEY))
    assert len(sealed) == SHORT_RECORD_BYTES
    sealed[position] ^= 0x01
    if position < len(MAGIC) + 1:  # magic, format version
        expected: type[SealError] = MalformedRecord
    elif position < HEADER_BYTES:  # key id: indistinguishable from a key this ring lacks
        expected = UnknownKeyId
    else:  # nonce, ciphertext, tag
        expected = TamperedRecord
    with pytest.raises(expected):
        rings.a.open(bytes(sealed), KEY)


def test_a_value_moved_to_another_key_fails(rings: Rings) -> None:
    sealed = rings.a.seal(b"secret message", KEY)
    for other in (KEY.replace("0123", "4567"), KEY + "#title", "", KEY[:-1]):
        with pytest.raises(TamperedRecord) as caught:
            rings.a.open(sealed, other)
        message = str(caught.value)
        assert message.endswith("failed authentication: it was altered or moved from another key")
        assert message.startswith(f"record {other}" if other else "a stored value")


def test_a_changed_key_id_is_tampering_when_known_and_unknown_otherwise(rings: Rings) -> None:
    sealed = rings.b_after_a.seal(b"secret message", KEY)
    id_slice = slice(len(MAGIC) + 1, HEADER_BYTES)
    as_previous = bytearray(sealed)
    as_previous[id_slice] = bytes.fromhex(rings.a.current_id)
    with pytest.raises(TamperedRecord):
        rings.b_after_a.open(bytes(as_previous), KEY)
    as_unknown = bytearray(sealed)
    as_unknown[id_slice] = b"\x00\x00\x00\x00"
    with pytest.raises(UnknownKeyId) as caught:
        rings.b_after_a.open(bytes(as_unknown), KEY)
    assert caught.value.key_id == "00000000"


def test_rotation_keeps_old_data_readable_and_reseals_under_the_current_key(
    rings: Rings,
) -> None:
    old = rings.a.seal(b"written before the rotation", KEY)
    assert rings.b_after_a.ids == (rings.b.current_id, rings.a.current_id)
    assert rings.b_after_a.open(old, KEY) == b"written before the rotation"
    assert rings.b_after_a.needs_rotation(old)
    assert KeyRing.key_id_of(old) == rings.a.current_id
    new = rings.b_after_a.reseal(old, KEY)
    assert not rings.b_after_a.needs_rotation(new)
    assert KeyRing.key_id_of(new) == rings.b.current_id
    assert rings.b.open(new, KEY) == b"written before the rotation"
    with pytest.raises(TamperedRecord):
        rings.b_after_a.reseal(old, KEY + "#other")


def test_the_new_key_alone_names_the_key_id_it_needs(rings: Rings) -> None:
    old = rings.a.seal(b"written before the rotation", KEY)
    with pytest.raises(UnknownKeyId) as caught:
        rings.b.open(old, KEY)
    message = str(caught.value)
    assert caught.value.key_id == rings.a.current_id
    assert message.startswith(f"stored data (record {KEY}) was sealed with key id ")
    assert f"key id {rings.a.current_id};" in message
    assert "set SECRET_KEY_PREVIOUS and PRIVACY_SALT_PREVIOUS" in message
    assert rings.b.current_id in message
    assert "\n" not in message


def test_key_ids_are_deterministic_and_depend_on_secret_and_salt(rings: Rings) -> None:
    assert rings.a.current_id == rings.a_again.current_id
    assert rings.a_again.open(rings.a.seal(b"x", KEY), KEY) == b"x"
    assert rings.a.keyed_hash("10.0.0.7") == rings.a_again.keyed_hash("10.0.0.7")
    ids = {rings.a.current_id, rings.a_other_salt.current_id, rings.b.current_id}
    assert len(ids) == 3
    assert all(len(key_id) == 8 and int(key_id, 16) >= 0 for key_id in ids)
    with pytest.raises(UnknownKeyId):
        rings.a_other_salt.open(rings.a.seal(b"x", KEY), KEY)


def test_known_answer_pins_the_kdf_parameters() -> None:
    # Fails if the Argon2id parameters or the derivation labels change: that would make
    # every stored value unreadable, so it must be a new format version, not an edit.
    ring = KeyRing("known-answer secret", "known-answer salt")
    assert ring.current_id == KNOWN_ANSWER_KEY_ID
    assert ring.keyed_hash("client") == KNOWN_ANSWER_HASH


KNOWN_ANSWER_KEY_ID = "2b9412b3"
KNOWN_ANSWER_HASH = "836cd89b89e1f777cb9f05eef6a24ec2"


def test_keyed_hash(rings: Rings) -> None:
    digest = rings.a.keyed_hash("alice@example.com")
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert digest != rings.a.keyed_hash("bob@example.com")
    assert digest != rings.a_other_salt.keyed_hash("alice@example.com")
    assert "alice" not in digest


def test_errors_and_repr_never_contain_plaintext_or_secrets(rings: Rings) -> None:
    plaintext = b"my bank PIN is 4921"
    sealed = rings.a.seal(plaintext, KEY)
    flipped = bytearray(sealed)
    flipped[-1] ^= 0xFF
    attempts: list[Callable[[], object]] = [
        lambda: rings.a.open(bytes(flipped), KEY),
        lambda: rings.a.open(sealed, KEY + "#title"),
        lambda: rings.b.open(sealed, KEY),
        lambda: rings.a.open(plaintext, KEY),
        lambda: rings.a.open(sealed[:20], KEY),
        lambda: PlainCodec().open(sealed, KEY),
        lambda: KeyRing.from_settings(SECRET_B, SALT_B, SECRET_A, ""),
    ]
    for attempt in attempts:
        with pytest.raises(SealError) as caught:
            attempt()
        message = str(caught.value)
        for secret in (plaintext.decode(), "4921", SECRET_A, SECRET_B, SALT_A, SALT_B):
            assert secret not in message
        assert "\n" not in message
    for ring in (rings.a, rings.b_after_a):
        assert SECRET_A not in repr(ring) and SALT_A not in repr(ring)
        assert ring.current_id in repr(ring)


def test_malformed_values(rings: Rings) -> None:
    sealed = rings.a.seal(PLAINTEXT, KEY)
    with pytest.raises(MalformedRecord, match=r"is not a sealed value .*no sealed header"):
        rings.a.open(b'{"role": "user"}', KEY)
    with pytest.raises(MalformedRecord, match="truncated"):
        rings.a.open(sealed[: MIN_SEALED_BYTES - 1], KEY)
    future = MAGIC + bytes([VERSION + 1]) + sealed[len(MAGIC) + 1 :]
    with pytest.raises(MalformedRecord, match=f"format version {VERSION + 1} is not supported"):
        rings.a.open(future, KEY)
    with pytest.raises(MalformedRecord):
        KeyRing.key_id_of(b"plain title")
    with pytest.raises(MalformedRecord):
        rings.a.needs_rotation(future)


def test_previous_key_settings_come_in_pairs() -> None:
    with pytest.raises(KeyConfigError, match=r"^SECRET_KEY_PREVIOUS is set but PRIVACY_SALT_PREV"):
        KeyRing.from_settings(SECRET_B, SALT_B, previous_secret_key=SECRET_A)
    with pytest.raises(KeyConfigError, match=r"^PRIVACY_SALT_PREVIOUS is set but SECRET_KEY_PREV"):
        KeyRing.from_settings(SECRET_B, SALT_B, previous_privacy_salt=SALT_A)
    with pytest.raises(KeyConfigError, match="give the current key"):
        KeyRing.from_settings(SECRET_B, SALT_B, SECRET_B, SALT_B)


def test_plain_reads_only_when_allowed(rings: Rings) -> None:
    plain = b"\x84\xa2id\xa1x"  # a msgpack record written before encryption was turned on
    with pytest.raises(MalformedRecord):
        rings.a.open(plain, KEY)
    migrating = KeyRing(SECRET_A, SALT_A, allow_plain_reads=True)
    assert migrating.open(plain, KEY) == plain
    assert migrating.needs_rotation(plain)
    sealed = migrating.reseal(plain, KEY)
    assert rings.a.open(sealed, KEY) == plain
    flipped = bytearray(sealed)
    flipped[HEADER_BYTES] ^= 0x01  # a sealed value is never read as plain, even here
    with pytest.raises(TamperedRecord):
        migrating.open(bytes(flipped), KEY)


def test_plain_codec(rings: Rings) -> None:
    codec: Codec = PlainCodec()
    assert isinstance(rings.a, KeyRing)
    sealing: Codec = rings.a  # both satisfy the protocol the store codes against
    assert sealing.open(sealing.seal(b"title", KEY), KEY) == b"title"
    assert codec.seal(b"title", KEY) == b"title"
    assert codec.open(b"title", KEY) == b"title"
    assert not codec.needs_rotation(b"title")
    sealed = rings.a.seal(b"sealed earlier", KEY)
    with pytest.raises(MalformedRecord, match="PRIVACY_ENCRYPT_AT_REST is false"):
        codec.open(sealed, KEY)
    with_keys = PlainCodec(rings.a)
    assert with_keys.needs_rotation(sealed)
    assert with_keys.open(sealed, KEY) == b"sealed earlier"
    assert with_keys.reseal(sealed, KEY) == b"sealed earlier"


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(
        st.binary(max_size=120),
        st.binary(max_size=80).map(lambda tail: MAGIC + tail),
        st.binary(max_size=80).map(lambda tail: MAGIC + bytes([VERSION]) + tail),
    ),
    key_name=st.text(max_size=40),
)
def test_arbitrary_bytes_only_ever_raise_seal_errors(
    rings: Rings, value: bytes, key_name: str
) -> None:
    for ring in (rings.a, rings.b_after_a):
        with pytest.raises(SealError):
            ring.open(value, key_name)
        try:
            ring.needs_rotation(value)
            ring.key_id_of(value, key_name=key_name)
        except SealError:
            pass


@settings(max_examples=200, deadline=None)
@given(plaintext=st.binary(max_size=2000), key_name=st.text(max_size=60))
def test_arbitrary_plaintext_round_trips(rings: Rings, plaintext: bytes, key_name: str) -> None:
    sealed = rings.b_after_a.seal(plaintext, key_name)
    assert rings.b_after_a.open(sealed, key_name) == plaintext
    assert rings.b.open(sealed, key_name) == plaintext
