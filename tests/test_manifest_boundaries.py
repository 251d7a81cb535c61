"""Backup manifests at the boundaries that only the property tests used to reach, by exact
example: a member name with a control character and a member with a negative size are
refused; the characters and sizes right next to them are accepted.
"""

from __future__ import annotations

import hashlib

import pytest

from appliance.backup.manifest import (
    FORMAT_VERSION,
    BackupError,
    Manifest,
    MemberEntry,
    decode_manifest,
    encode_manifest,
    name_problem,
)

SHA = hashlib.sha256(b"").hexdigest()


def manifest_with(name: str, size: int) -> bytes:
    entry = MemberEntry(name=name, size=size, sha256=SHA, mode=0o600)
    return encode_manifest(
        Manifest(
            format_version=FORMAT_VERSION,
            appliance_version="0.1.0",
            created=0.0,
            created_utc="1970-01-01T00:00:00Z",
            members=[entry],
            meta={},
            key_id="0123abcd",
        )
    )


@pytest.mark.parametrize("char", ["\x00", "\x01", "\t", "\n", "\r", "\x1b", "\x1f", "\x7f"])
def test_a_name_with_a_control_character_is_refused(char: str) -> None:
    name = f"redis/dump{char}.rdb"
    assert name_problem(name) is not None
    with pytest.raises(BackupError) as caught:
        decode_manifest(manifest_with(name, 1))
    message = str(caught.value)
    assert repr(name) in message  # named, escaped: the control character is not printed
    assert char not in message


@pytest.mark.parametrize("char", [" ", "~", "\x80", "\u00a0", "\u00e9"])
def test_the_characters_next_to_the_control_ranges_are_accepted(char: str) -> None:
    name = f"redis/dump{char}.rdb"
    assert name_problem(name) is None
    assert decode_manifest(manifest_with(name, 1)).members[0].name == name


@pytest.mark.parametrize("size", [-1, -(2**63)])
def test_a_negative_member_size_is_refused(size: int) -> None:
    with pytest.raises(BackupError) as caught:
        decode_manifest(manifest_with("redis/dump.rdb", size))
    assert "'redis/dump.rdb'" in str(caught.value)


def test_a_member_of_size_zero_is_accepted() -> None:
    manifest = decode_manifest(manifest_with("redis/empty", 0))
    assert manifest.members[0].size == 0
    assert manifest.total_size == 0
