"""A value sealed by an earlier release, from a fixed key, must still open: the format pinned.

The vector below was sealed once (format version 1) and is committed as bytes: a change to
the header layout, the version byte, the key derivation or the associated data makes it fail
to open, which would make every box's stored conversations unreadable after an update.
"""

from __future__ import annotations

import pytest

from appliance.store.sealing import (
    KeyRing,
    MalformedRecord,
    PlainCodec,
    TamperedRecord,
    UnknownKeyId,
)

SECRET_KEY = "test-vector SECRET_KEY: never used on a box"
PRIVACY_SALT = "test-vector PRIVACY_SALT"
KEY_NAME = "conv:{c0ffee}:messages#0"
PLAINTEXT = "Hello, sealed world: caf\u00e9 \u2615".encode()
KEY_ID = "c26cfc39"
# MAGIC c1 41 53 | version 01 | key id c26cfc39 | 24-byte nonce | ciphertext and 16-byte tag
SEALED_V1 = bytes.fromhex(
    "c1415301c26cfc39c4ef771a5909c126361b78de6c9910b739c83be5f9a04fbec1f1cbe90cec029175b5d1"
    "adb6007cb6f0c6d5580e6f2cd2c849dc821e11ac958acf21f88b87b69a4b52858e9d79"
)
HEADER = bytes.fromhex("c1415301c26cfc39")


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return KeyRing(SECRET_KEY, PRIVACY_SALT)


def test_the_committed_version_1_value_opens(ring: KeyRing) -> None:
    assert ring.current_id == KEY_ID
    assert KeyRing.key_id_of(SEALED_V1) == KEY_ID
    assert ring.open(SEALED_V1, KEY_NAME) == PLAINTEXT
    assert not ring.needs_rotation(SEALED_V1)
    assert ring.keyed_hash("127.0.0.1") == "b5c3d3aec0493bd53d374ff83bd57f45"


def test_new_values_are_written_in_the_same_format(ring: KeyRing) -> None:
    sealed = ring.seal(PLAINTEXT, KEY_NAME)
    # header (8) + nonce (24) + ciphertext (as long as the plaintext) + tag (16)
    assert sealed[:8] == HEADER
    assert len(sealed) == 8 + 24 + len(PLAINTEXT) + 16 == len(SEALED_V1)
    assert sealed[8:32] != SEALED_V1[8:32]  # a fresh random nonce each time
    assert ring.open(sealed, KEY_NAME) == PLAINTEXT


def test_the_vector_is_bound_to_its_record_and_its_header(ring: KeyRing) -> None:
    with pytest.raises(TamperedRecord) as caught:
        ring.open(SEALED_V1, "conv:{c0ffee}:messages#1")
    assert str(caught.value) == (
        "record conv:{c0ffee}:messages#1 failed authentication: it was altered or moved from "
        "another key"
    )
    with pytest.raises(TamperedRecord) as caught:
        ring.open(SEALED_V1[:-1] + bytes([SEALED_V1[-1] ^ 1]), "")
    assert str(caught.value) == (
        "a stored value failed authentication: it was altered or moved from another key"
    )
    with pytest.raises(UnknownKeyId) as unknown:
        ring.open(SEALED_V1[:4] + bytes.fromhex("00000000") + SEALED_V1[8:], KEY_NAME)
    assert unknown.value.key_id == "00000000"
    assert str(unknown.value) == (
        "stored data (record conv:{c0ffee}:messages#0) was sealed with key id 00000000; set "
        "SECRET_KEY_PREVIOUS and PRIVACY_SALT_PREVIOUS to the key it was written with "
        "(configured key ids: c26cfc39)"
    )


@pytest.mark.parametrize("version", [0, 2, 255])
def test_another_format_version_is_refused_by_number(ring: KeyRing, version: int) -> None:
    other = SEALED_V1[:3] + bytes([version]) + SEALED_V1[4:]
    with pytest.raises(MalformedRecord) as caught:
        ring.open(other, KEY_NAME)
    assert str(caught.value) == (
        f"record {KEY_NAME} is not a sealed value this version reads (format version {version} "
        "is not supported; expected 1)"
    )


def test_the_shortest_sealed_value_is_header_nonce_and_tag(ring: KeyRing) -> None:
    empty = ring.seal(b"", KEY_NAME)
    assert len(empty) == 48
    assert ring.open(empty, KEY_NAME) == b""
    with pytest.raises(MalformedRecord) as caught:
        ring.open(empty[:47], KEY_NAME)
    assert str(caught.value) == (
        f"record {KEY_NAME} is truncated (47 bytes; a sealed value has at least 48)"
    )
    with pytest.raises(MalformedRecord) as caught:
        KeyRing.key_id_of(b"\xc1AX" + SEALED_V1[3:])
    assert str(caught.value) == (
        "a stored value is not a sealed value (no sealed header; was it written with "
        "PRIVACY_ENCRYPT_AT_REST=false?)"
    )


def test_a_plain_codec_opens_the_vector_only_with_the_key(ring: KeyRing) -> None:
    assert PlainCodec(ring).open(SEALED_V1, KEY_NAME) == PLAINTEXT
    assert PlainCodec(ring).reseal(SEALED_V1, KEY_NAME) == PLAINTEXT
    assert PlainCodec(ring).needs_rotation(SEALED_V1)
    assert not PlainCodec(ring).needs_rotation(PLAINTEXT)
    assert PlainCodec().seal(PLAINTEXT, KEY_NAME) == PLAINTEXT
    assert PlainCodec().open(b"plain", KEY_NAME) == b"plain"
    with pytest.raises(MalformedRecord) as caught:
        PlainCodec().open(SEALED_V1, KEY_NAME)
    assert str(caught.value) == (
        f"record {KEY_NAME} is sealed, but PRIVACY_ENCRYPT_AT_REST is false and no key is "
        "configured; set the SECRET_KEY and PRIVACY_SALT it was written with"
    )


def test_a_ring_with_the_previous_key_opens_the_vector_and_asks_for_rotation() -> None:
    rotated = KeyRing.from_settings(
        "a new SECRET_KEY for the vector", "a new salt", SECRET_KEY, PRIVACY_SALT
    )
    assert rotated.ids == (rotated.current_id, KEY_ID)
    assert rotated.open(SEALED_V1, KEY_NAME) == PLAINTEXT
    assert rotated.needs_rotation(SEALED_V1)
    resealed = rotated.reseal(SEALED_V1, KEY_NAME)
    assert KeyRing.key_id_of(resealed) == rotated.current_id
    assert not rotated.needs_rotation(resealed)
