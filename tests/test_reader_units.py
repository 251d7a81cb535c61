"""Reading a backup archive, by exact example: the refusals of the manifest and its
authentication, of each member (its name, a second copy, one not listed, its size, its
hash, one missing) with the message that names it, what `admit` and the extractor see, the
progress counts, and the archive file itself (missing, unreadable, sealed, damaged).
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from appliance.backup.archive import Source, extract_archive, verify_archive, write_archive
from appliance.backup.authenticity import Authenticity
from appliance.backup.extract import Extractor
from appliance.backup.manifest import BackupError, Manifest, MemberEntry, encode_manifest
from appliance.backup.members import member_header, padding
from appliance.backup.reader import read_members
from tests.backup_streams import (
    KEYS,
    OTHER_BOX,
    archive,
    entry,
    head,
    manifest_of,
    reader,
    tar,
)

MEMBERS = {"redis/dump.rdb": b"REDIS0011" * 300, "state/models.json": b"{}\n", "empty": b""}
PASSPHRASE = b"correct horse battery staple"


def refusal(stream: bytes, extractor: Extractor | None = None) -> str:
    with pytest.raises(BackupError) as caught:
        read_members(reader(stream), None, extractor, KEYS)
    return str(caught.value)


# --- the manifest and its authentication ------------------------------------------------------


def test_an_archive_of_this_box_reads_with_every_member_checked() -> None:
    checked = read_members(reader(archive(MEMBERS)), None, None, KEYS)
    assert [member.name for member in checked.manifest.members] == list(MEMBERS)
    assert checked.authenticity == Authenticity("this_box", KEYS.current_id, KEYS.ids)
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.manifest = checked.manifest  # type: ignore[misc]


def test_an_archive_of_another_box_reads_as_such() -> None:
    checked = read_members(reader(archive(MEMBERS, OTHER_BOX)), None, None, KEYS)
    assert checked.authenticity == Authenticity("other_box", OTHER_BOX.current_id, KEYS.ids)


def test_a_format_1_archive_reads_unauthenticated() -> None:
    manifest = manifest_of(MEMBERS, version=1)
    checked = read_members(reader(tar([*head(manifest), *MEMBERS.items()])), None, None, KEYS)
    assert checked.authenticity == Authenticity("unauthenticated", "", KEYS.ids)
    assert checked.manifest == manifest


def test_an_archive_with_no_member_holds_no_manifest() -> None:
    assert refusal(tar([])) == "the archive holds no manifest; it is damaged"


def test_an_archive_that_does_not_start_with_the_manifest_is_not_a_backup() -> None:
    stream = tar([("redis/dump.rdb", b"x"), *head(manifest_of({"redis/dump.rdb": b"x"}))])
    assert refusal(stream) == (
        "the first member is 'redis/dump.rdb', not manifest.json; this is not an appliance backup"
    )


def test_a_manifest_over_16_mib_is_refused_before_it_is_read() -> None:
    stream = member_header("manifest.json", 16 * 1024 * 1024 + 1, 0o600, 0)
    assert refusal(stream) == "the manifest is over 16777216 bytes; the archive is damaged"


def test_a_manifest_of_exactly_16_mib_is_read() -> None:
    encoded = encode_manifest(manifest_of({}, version=1)).ljust(16 * 1024 * 1024, b" ")
    checked = read_members(reader(tar([("manifest.json", encoded)]), 1 << 20), None, None, KEYS)
    assert checked.manifest.members == []


def test_the_authentication_must_follow_the_manifest() -> None:
    manifest, auth = head(manifest_of(MEMBERS))
    members = list(MEMBERS.items())
    assert refusal(tar([manifest])) == (
        "the manifest's authentication (manifest.auth) should follow it, but nothing does; "
        "the archive was altered"
    )
    assert refusal(tar([manifest, *members, auth])) == (
        "the manifest's authentication (manifest.auth) should follow it, but "
        "'redis/dump.rdb' does; the archive was altered"
    )


def test_an_authentication_over_4096_bytes_is_refused() -> None:
    manifest, (name, auth) = head(manifest_of(MEMBERS))
    members = list(MEMBERS.items())
    # JSON padded with spaces is the same record: 4096 bytes of it pass, 4097 do not.
    assert read_members(
        reader(tar([manifest, (name, auth.ljust(4096, b" ")), *members])), None, None, KEYS
    ).authenticity.for_this_box
    assert refusal(tar([manifest, (name, auth.ljust(4097, b" ")), *members])) == (
        "manifest.auth is over 4096 bytes; the archive was altered"
    )


# --- the members ----------------------------------------------------------------------------


def test_a_member_with_a_hostile_name_is_refused_naming_it() -> None:
    stream = tar([*head(manifest_of(MEMBERS)), ("../evil", b"x"), *MEMBERS.items()])
    assert refusal(stream) == "member '../evil' contains '..'; refusing the archive"


def test_a_member_whose_name_is_not_utf_8_is_refused() -> None:
    header = bytearray(member_header("redis/dump.rdb", 1, 0o600, 0))
    header[0:14] = b"redis/dump\xff\xfe.b"  # as many bytes as the name
    header[148:156] = b"        "
    header[148:155] = b"%06o\0" % sum(header)
    manifest = b"".join(
        member_header(name, len(data), 0o600, 0) + data + padding(len(data))
        for name, data in head(manifest_of({}))
    )
    stream = manifest + bytes(header) + b"x" + padding(1) + bytes(10240)
    assert refusal(stream) == (
        "member 'redis/dump\\udcff\\udcfe.b' has a name that is not UTF-8; refusing the archive"
    )


@pytest.mark.parametrize("twice", ["redis/dump.rdb", "manifest.json", "manifest.auth"])
def test_a_member_that_appears_twice_is_refused(twice: str) -> None:
    stream = tar([*head(manifest_of(MEMBERS)), *MEMBERS.items(), (twice, b"REDIS0011" * 300)])
    assert refusal(stream) == f"member '{twice}' appears twice; the archive was altered"


def test_a_manifest_auth_member_in_a_format_1_archive_is_refused() -> None:
    manifest = manifest_of(MEMBERS, version=1)
    stream = tar([*head(manifest), ("manifest.auth", b"{}"), *MEMBERS.items()])
    assert refusal(stream) == "member 'manifest.auth' appears twice; the archive was altered"


def test_a_member_not_in_the_manifest_is_refused() -> None:
    stream = tar([*head(manifest_of(MEMBERS)), *MEMBERS.items(), ("extra", b"x")])
    assert refusal(stream) == "member 'extra' is not in the manifest; the archive was altered"


def test_a_member_of_another_size_than_listed_is_refused() -> None:
    listed = manifest_of({"state/models.json": b"{}\n"})
    stream = tar([*head(listed), ("state/models.json", b"{}\n\n")])
    assert refusal(stream) == (
        "member 'state/models.json' is 4 bytes but the manifest says 3; the archive is damaged"
    )


def test_a_member_with_a_changed_byte_is_refused() -> None:
    stream = tar([*head(manifest_of(MEMBERS)), ("redis/dump.rdb", b"REDIS0012" * 300)])
    assert refusal(stream) == (
        "member 'redis/dump.rdb' does not match its SHA-256 in the manifest; the archive is damaged"
    )


def test_members_the_archive_lacks_are_named() -> None:
    stream = tar([*head(manifest_of(MEMBERS)), ("redis/dump.rdb", MEMBERS["redis/dump.rdb"])])
    assert refusal(stream) == (
        "the manifest lists 'state/models.json' (and 1 more), which the archive lacks; it is "
        "truncated or damaged"
    )
    stream = tar([*head(manifest_of(MEMBERS)), *list(MEMBERS.items())[:2]])
    assert refusal(stream) == (
        "the manifest lists 'empty', which the archive lacks; it is truncated or damaged"
    )
    assert refusal(tar(head(manifest_of(MEMBERS)))) == (
        "the manifest lists 'redis/dump.rdb' (and 2 more), which the archive lacks; it is "
        "truncated or damaged"
    )


# --- what the caller sees -------------------------------------------------------------------


def test_progress_counts_every_member_byte_from_zero_to_the_total() -> None:
    calls: list[tuple[int, int]] = []
    read_members(reader(archive(MEMBERS), 1000), lambda d, t: calls.append((d, t)), None, KEYS)
    total = sum(len(data) for data in MEMBERS.values())
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(calls[1:]))
    assert len(calls) > 3  # the dump spans several chunks


def test_admit_sees_the_manifest_first_and_its_refusal_stops_the_archive(tmp_path: Path) -> None:
    seen: list[tuple[Manifest, Authenticity]] = []

    def admit(manifest: Manifest, authenticity: Authenticity) -> None:
        seen.append((manifest, authenticity))
        raise BackupError("not this one")

    extractor = Extractor(tmp_path / "dest")
    try:
        with pytest.raises(BackupError, match=r"^not this one$"):
            read_members(reader(archive(MEMBERS)), None, extractor, KEYS, admit)
        assert not any((tmp_path / "dest").iterdir())  # nothing was written before it
    finally:
        extractor.close()
    assert [m.name for m in seen[0][0].members] == list(MEMBERS)
    assert seen[0][1].for_this_box


def test_the_extractor_writes_every_member_with_its_mode(tmp_path: Path) -> None:
    members = {"run.sh": b"#!/bin/sh\n", "redis/dump.rdb": MEMBERS["redis/dump.rdb"]}
    manifest = manifest_of(members)
    entries = [entry("run.sh", members["run.sh"], 0o750), manifest.members[1]]
    manifest = msgspec.structs.replace(manifest, members=entries)
    extractor = Extractor(tmp_path / "dest")
    try:
        read_members(reader(tar([*head(manifest), *members.items()])), None, extractor, KEYS)
    finally:
        extractor.close()
    for name, data in members.items():
        assert (tmp_path / "dest" / name).read_bytes() == data
    assert (tmp_path / "dest" / "run.sh").stat().st_mode & 0o777 == 0o750


def test_members_that_cannot_fit_are_refused_before_any_is_written(tmp_path: Path) -> None:
    huge = MemberEntry("redis/dump.rdb", 2**62, "0" * 64, 0o600)
    manifest = msgspec.structs.replace(manifest_of({}), members=[huge])
    stream = tar([*head(manifest), ("redis/dump.rdb", b"x")])
    extractor = Extractor(tmp_path / "dest")
    try:
        message = refusal(stream, extractor)
    finally:
        extractor.close()
    assert message.startswith("the backup needs 4398046511104 MiB but ")
    assert message.endswith(" MiB free; free some space or restore elsewhere")


# --- the archive file -----------------------------------------------------------------------


def backup(tmp_path: Path, passphrase: bytes | None = None) -> Path:
    source = tmp_path / "dump.rdb"
    source.write_bytes(MEMBERS["redis/dump.rdb"])
    (tmp_path / "backups").mkdir()
    return write_archive(
        tmp_path / "backups",
        [Source("redis/dump.rdb", source)],
        {},
        keys=KEYS,
        when=datetime(2025, 3, 4, tzinfo=UTC),
        passphrase=passphrase,
    )


def test_an_archive_file_verifies_and_extracts(tmp_path: Path) -> None:
    path = backup(tmp_path)
    assert verify_archive(path, keys=KEYS).manifest.members[0].name == "redis/dump.rdb"
    extract_archive(path, tmp_path / "dest", keys=KEYS)
    assert (tmp_path / "dest/redis/dump.rdb").read_bytes() == MEMBERS["redis/dump.rdb"]


def test_a_sealed_archive_needs_its_passphrase(tmp_path: Path) -> None:
    path = backup(tmp_path, PASSPHRASE)
    with pytest.raises(BackupError) as caught:
        verify_archive(path, keys=KEYS)
    assert str(caught.value) == (
        f"{path.name}: sealed with a passphrase; a passphrase file is needed to read it"
    )
    checked = verify_archive(path, keys=KEYS, passphrase=PASSPHRASE)
    assert checked.authenticity.for_this_box


def test_a_missing_archive_is_named(tmp_path: Path) -> None:
    with pytest.raises(BackupError) as caught:
        verify_archive(tmp_path / "gone.tar.gz", keys=KEYS)
    assert str(caught.value) == "cannot read gone.tar.gz: No such file or directory"


def test_an_archive_that_fails_to_read_is_named() -> None:
    # Opens, then every read fails with EIO: a disk error under the archive.
    with pytest.raises(BackupError) as caught:
        verify_archive(Path("/proc/self/mem"), keys=KEYS)
    assert str(caught.value) == "cannot read mem: Input/output error"


def test_a_damaged_archive_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "altered.tar.gz"
    path.write_bytes(gzip.compress(archive(MEMBERS) + b"\x01"))
    with pytest.raises(BackupError) as caught:
        verify_archive(path, keys=KEYS)
    assert str(caught.value) == (
        "altered.tar.gz: the archive is truncated or damaged (data after the end of the archive)"
    )
