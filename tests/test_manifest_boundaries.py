"""Backup manifests at their boundaries, by exact example: the format versions read and the
bytes written, every refused member name, size, hash and mode with the message that names
it, and the values right next to them that are accepted; the manifest's size limit and
permissions in an archive.
"""

from __future__ import annotations

import hashlib
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec
import pytest

from appliance.backup.archive import Source, write_archive
from appliance.backup.manifest import (
    FORMAT_VERSION,
    BackupError,
    Manifest,
    MemberEntry,
    decode_manifest,
    encode_manifest,
    file_and_dir,
    name_problem,
    show,
)
from appliance.backup.members import member_header
from appliance.backup.reader import read_members
from tests.backup_streams import KEYS, reader, tar

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


# --- the format, pinned ---------------------------------------------------------------------

# A format 2 manifest exactly as the appliance writes it (indent 2, a final newline): an
# archive made by an earlier release must still read, and a byte of it must not change.
FORMAT_2: Final = b"""{
  "format_version": 2,
  "appliance_version": "0.1.0",
  "created": 1.5,
  "created_utc": "1970-01-01T00:00:01Z",
  "members": [
    {
      "name": "redis/dump.rdb",
      "size": 3,
      "sha256": "abababababababababababababababababababababababababababababababab",
      "mode": 384
    }
  ],
  "meta": {
    "host": "box"
  },
  "key_id": "0123abcd"
}
"""
# Format 1: made before manifests were authenticated (no key id).
FORMAT_1: Final = (
    b'{"format_version":1,"appliance_version":"0.0.9","created":1.5,'
    b'"created_utc":"1970-01-01T00:00:01Z","members":[],"meta":{}}'
)


def test_a_format_2_manifest_reads_and_is_written_byte_for_byte_the_same() -> None:
    manifest = decode_manifest(FORMAT_2)
    assert manifest.format_version == 2
    assert manifest.key_id == "0123abcd"
    assert manifest.members == [MemberEntry("redis/dump.rdb", 3, "ab" * 32, 0o600)]
    assert manifest.total_size == 3
    assert encode_manifest(manifest) == FORMAT_2


def test_a_format_1_manifest_still_reads() -> None:
    manifest = decode_manifest(FORMAT_1)
    assert (manifest.format_version, manifest.key_id, manifest.members) == (1, "", [])


@pytest.mark.parametrize(
    ("version", "age"), [(3, "newer"), (99, "newer"), (0, "older"), (-1, "older")]
)
def test_a_manifest_of_another_format_is_named_as_such(version: int, age: str) -> None:
    data = FORMAT_1.replace(b'"format_version":1', b'"format_version":%d' % version)
    with pytest.raises(BackupError) as caught:
        decode_manifest(data)
    assert str(caught.value) == (
        f"made by a {age} appliance, format {version}; this one reads formats 1 and 2 "
        "(restore it with a matching appliance version)"
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b'{"format_version": "2"}',
        b"\xff\xfe",
        b'{"format_version": 2, "members": "none"}',  # the version reads, the rest does not
        b'{"format_version": 1}',
        FORMAT_2.replace(b'"size": 3', b'"size": "3"'),
    ],
)
def test_an_unreadable_manifest_is_refused_as_damaged(data: bytes) -> None:
    with pytest.raises(BackupError) as caught:
        decode_manifest(data)
    message = str(caught.value)
    assert message.startswith("the manifest is unreadable (")
    assert message.endswith("); the archive is damaged")


@pytest.mark.parametrize("key_id", ["", "0123abc", "0123abcde", "0123ABCD", "0123abcg"])
def test_a_format_2_manifest_needs_a_valid_key_id(key_id: str) -> None:
    data = FORMAT_2.replace(b'"0123abcd"', b'"%s"' % key_id.encode())
    with pytest.raises(BackupError) as caught:
        decode_manifest(data)
    assert str(caught.value) == "the manifest has no valid key id; the archive is damaged"


def test_a_format_1_manifest_with_a_key_id_was_altered() -> None:
    data = FORMAT_1.replace(b'"meta":{}', b'"meta":{},"key_id":"0123abcd"')
    with pytest.raises(BackupError) as caught:
        decode_manifest(data)
    assert str(caught.value) == "the manifest of format 1 has a key id; the archive was altered"


def test_a_checked_manifest_cannot_be_changed_after_its_checks() -> None:
    manifest = decode_manifest(FORMAT_2)
    with pytest.raises(AttributeError):
        manifest.members[0].size = -1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        manifest.key_id = ""  # type: ignore[misc]
    assert hash(manifest.members[0]) == hash(MemberEntry("redis/dump.rdb", 3, "ab" * 32, 0o600))


# --- member names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a\ud800b", "\udfff", "\udcff/x"])
def test_a_name_that_is_not_utf_8_is_refused(name: str) -> None:
    # Only a tar header can carry one (an undecodable byte comes as a surrogate); JSON
    # cannot, so what refuses it in an archive is the check of the tar member's name.
    assert name_problem(name) == "has a name that is not UTF-8"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "has an empty name"),
        ("a" * 4097, "has a name longer than 4096 bytes"),
        ("\u00e9" * 2049, "has a name longer than 4096 bytes"),  # bytes, not characters
        ("/etc/passwd", "is an absolute path"),
        ("/", "is an absolute path"),
        ("a\\b", "has a backslash in its name"),
        ("..", "contains '..'"),
        ("a/../b", "contains '..'"),
        ("a/..", "contains '..'"),
        ("a//b", "is not a normalized path (empty or '.' parts)"),
        ("a/", "is not a normalized path (empty or '.' parts)"),
        ("./a", "is not a normalized path (empty or '.' parts)"),
        ("a/./b", "is not a normalized path (empty or '.' parts)"),
    ],
)
def test_a_bad_member_name_is_refused_naming_why(name: str, problem: str) -> None:
    assert name_problem(name) == problem
    entry = MemberEntry(name=name, size=1, sha256=SHA, mode=0o600)
    manifest = msgspec.json.decode(manifest_with("x", 1), type=Manifest)
    data = encode_manifest(msgspec.structs.replace(manifest, members=[entry]))
    with pytest.raises(BackupError) as caught:
        decode_manifest(data)
    assert str(caught.value) == f"the manifest entry {show(name)} {problem}; the archive is damaged"


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "a" * 4096,
        "\u00e9" * 2048,
        "redis/dump.rdb",
        "a/b/c",
        "...",
        ".a",
        "a..b",
        "\ud7ff",  # right below the surrogates
        "\ue000",  # right above them
        "\U0010ffff",
    ],
)
def test_the_names_next_to_the_refused_ones_are_accepted(name: str) -> None:
    assert name_problem(name) is None
    assert decode_manifest(manifest_with(name, 1)).members[0].name == name


@pytest.mark.parametrize("name", ["manifest.json", "manifest.auth"])
def test_a_member_named_like_the_manifest_is_refused(name: str) -> None:
    with pytest.raises(BackupError) as caught:
        decode_manifest(manifest_with(name, 1))
    assert str(caught.value) == (
        f"the manifest entry '{name}' is named like the manifest or its authentication; "
        "the archive is damaged"
    )


def manifest_of(*entries: MemberEntry) -> bytes:
    manifest = msgspec.json.decode(manifest_with("x", 1), type=Manifest)
    return encode_manifest(msgspec.structs.replace(manifest, members=list(entries)))


def test_a_member_listed_twice_is_refused() -> None:
    first = MemberEntry("redis/dump.rdb", 1, SHA, 0o600)
    data = manifest_of(first, MemberEntry("state/a", 1, SHA, 0o600), first)
    with pytest.raises(BackupError) as caught:
        decode_manifest(data)
    assert str(caught.value) == (
        "the manifest entry 'redis/dump.rdb' is listed twice; the archive is damaged"
    )


@pytest.mark.parametrize(
    ("names", "clash"),
    [
        (["a", "a/b"], "a"),
        (["a/b/c", "a/b"], "a/b"),
        (["x", "a/b/c/d", "a/b"], "a/b"),
    ],
)
def test_a_name_that_is_a_file_and_a_directory_is_refused(names: list[str], clash: str) -> None:
    assert file_and_dir(names) == clash
    with pytest.raises(BackupError) as caught:
        decode_manifest(manifest_of(*(MemberEntry(name, 1, SHA, 0o600) for name in names)))
    assert str(caught.value) == (
        f"the manifest has '{clash}' as a file and as a directory; the archive is damaged"
    )


def test_names_that_share_a_prefix_but_not_a_directory_are_accepted() -> None:
    names = ["a", "ab/c", "a.d/e", "b/a"]
    assert file_and_dir(names) is None
    entries = [MemberEntry(name, 1, SHA, 0o600) for name in names]
    assert decode_manifest(manifest_of(*entries)).members == entries


@pytest.mark.parametrize(
    "sha256", ["", "ab" * 31, "ab" * 32 + "a", "AB" * 32, "g" + "a" * 63, "ab" * 32 + "\n"]
)
def test_a_malformed_sha256_is_refused(sha256: str) -> None:
    with pytest.raises(BackupError) as caught:
        decode_manifest(manifest_of(MemberEntry("redis/dump.rdb", 1, sha256, 0o600)))
    assert str(caught.value) == (
        "the manifest entry 'redis/dump.rdb' has a malformed SHA-256; the archive is damaged"
    )


@pytest.mark.parametrize(("mode", "shown"), [(-1, "-0o1"), (0o1000, "0o1000"), (0o4755, "0o4755")])
def test_a_mode_beyond_the_permission_bits_is_refused(mode: int, shown: str) -> None:
    with pytest.raises(BackupError) as caught:
        decode_manifest(manifest_of(MemberEntry("run.sh", 1, SHA, mode)))
    assert str(caught.value) == (
        f"the manifest entry 'run.sh' has mode {shown}, which is more than permission bits; "
        "the archive is damaged"
    )


@pytest.mark.parametrize("mode", [0, 0o400, 0o777])
def test_every_permission_mode_is_accepted(mode: int) -> None:
    manifest = decode_manifest(manifest_of(MemberEntry("run.sh", 1, SHA, mode)))
    assert manifest.members[0].mode == mode


def test_the_first_problem_of_an_entry_is_the_one_named() -> None:
    # An absolute name with a negative size, a bad hash and setuid: its name is the problem.
    with pytest.raises(BackupError) as caught:
        decode_manifest(manifest_of(MemberEntry("/manifest.json", -1, "x", 0o4777)))
    assert str(caught.value) == (
        "the manifest entry '/manifest.json' is an absolute path; the archive is damaged"
    )


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("a" * 80, repr("a" * 80)),
        ("a" * 81, repr("a" * 80 + "...")),
        ("b" * 4096, repr("b" * 80 + "...")),
        ("x\n", "'x\\n'"),
    ],
)
def test_a_name_in_a_message_is_cut_after_80_characters(name: str, shown: str) -> None:
    assert show(name) == shown


# --- limits the readers apply -----------------------------------------------------------------


def test_a_manifest_over_16_mib_is_refused_before_it_is_read() -> None:
    stream = member_header("manifest.json", 16 * 1024 * 1024 + 1, 0o600, 0)
    with pytest.raises(BackupError) as caught:
        read_members(reader(stream), None, None, KEYS)
    assert str(caught.value) == "the manifest is over 16777216 bytes; the archive is damaged"


def test_a_manifest_of_exactly_16_mib_is_read() -> None:
    data = FORMAT_1.ljust(16 * 1024 * 1024, b" ")
    checked = read_members(reader(tar([("manifest.json", data)]), 1 << 20), None, None, KEYS)
    assert checked.manifest.appliance_version == "0.0.9"
    assert checked.authenticity.provenance == "unauthenticated"


def test_the_manifest_member_of_an_archive_is_private(tmp_path: Path) -> None:
    source = tmp_path / "notes"
    source.write_bytes(b"notes\n")
    (tmp_path / "backups").mkdir()
    path = write_archive(
        tmp_path / "backups",
        [Source("notes", source)],
        {},
        keys=KEYS,
        when=datetime(2025, 3, 4, tzinfo=UTC),
    )
    with tarfile.open(path) as archive:
        modes = {info.name: info.mode for info in archive.getmembers()}
    assert modes["manifest.json"] == 0o600
