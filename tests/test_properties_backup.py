"""Properties of the backup archive's readers: the manifest round-trips, any other bytes or
JSON give `BackupError`, no accepted member name can leave the restore directory, the
tar stream reads the same however it is cut into chunks, and a single changed byte in a
member, the manifest or its authentication is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from itertools import pairwise
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from appliance.backup.authenticity import Authenticity, encode_auth
from appliance.backup.manifest import (
    AUTH_NAME,
    FORMAT_VERSION,
    MANIFEST_MODE,
    MANIFEST_NAME,
    BackupError,
    Manifest,
    MemberEntry,
    decode_manifest,
    encode_manifest,
    file_and_dir,
    name_problem,
)
from appliance.backup.members import TarReader, end_of_archive, member_header, padding
from appliance.backup.reader import read_members
from appliance.backup.restore import RestoreOptions, refuse_provenance
from appliance.store.sealing import KeyRing
from tests.conftest import examples

# This box's keys (current and previous) and another box's (Argon2id: made once).
KEYS = KeyRing("properties-secret-" + "p" * 20, "salt", ("previous-secret-" + "q" * 20, "salt"))
OTHER_BOX = KeyRing("another-box-secret-" + "o" * 20, "other-salt")

ROOT = "/restore/dest"
SEGMENT = st.text(
    st.characters(blacklist_characters="/\\", blacklist_categories=("Cc", "Cs")),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))
NAMES = st.lists(SEGMENT, min_size=1, max_size=4).map("/".join)
HOSTILE_NAMES = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.sampled_from(["..", ".", "", "a", "/", "\\", "b\x00", "\udcff", "\ud800"]), max_size=5
    ).map("/".join),
    st.sampled_from(["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/", "..", "C:\\x"]),
)
SHA = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    names = draw(st.lists(NAMES, max_size=6, unique=True))
    names = [n for n in names if n != MANIFEST_NAME]
    assume(file_and_dir(names) is None)
    return Manifest(
        format_version=FORMAT_VERSION,
        appliance_version=draw(st.text(max_size=10)),
        created=draw(st.floats(allow_nan=False, allow_infinity=False)),
        created_utc=draw(st.text(max_size=25)),
        members=[
            MemberEntry(
                name, draw(st.integers(0, 2**63 - 1)), draw(SHA), draw(st.integers(0, 0o777))
            )
            for name in names
        ],
        meta=draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
        key_id=draw(st.from_regex(r"[0-9a-f]{8}", fullmatch=True)),
    )


def assert_contained(name: str) -> None:
    """A member name that passed the checks stays under the restore directory."""
    assert not name.startswith("/")
    assert ".." not in name.split("/")
    assert "\x00" not in name
    joined = posixpath.normpath(posixpath.join(ROOT, name))
    assert joined.startswith(ROOT + "/") and joined != ROOT
    assert joined == f"{ROOT}/{name}"  # already normalized: what is checked is what is used


def decoded_or_refused(data: bytes) -> Manifest | None:
    try:
        manifest = decode_manifest(data)
    except BackupError as error:
        assert "\n" not in str(error)
        return None
    for entry in manifest.members:
        assert_contained(entry.name)
        assert entry.size >= 0 and 0 <= entry.mode <= 0o777
    return manifest


@settings(max_examples=examples(200), deadline=None)
@given(manifest=manifests())
def test_manifests_round_trip(manifest: Manifest) -> None:
    assert decode_manifest(encode_manifest(manifest)) == manifest


@settings(max_examples=examples(300), deadline=None)
@given(name=HOSTILE_NAMES)
def test_a_name_is_accepted_only_if_it_stays_inside(name: str) -> None:
    if name_problem(name) is None:
        assert_contained(name)


JSON: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
FIELDS = [
    "format_version",
    "appliance_version",
    "created",
    "created_utc",
    "members",
    "meta",
    "key_id",
]
ENTRY_FIELDS = ["name", "size", "sha256", "mode"]


@st.composite
def damaged_manifests(draw: st.DrawFn) -> bytes:
    """A valid manifest with fields replaced by any JSON, or hostile names and numbers."""
    document = json.loads(encode_manifest(draw(manifests())))
    for _ in range(draw(st.integers(1, 3))):
        members = document.get("members")
        entries = [e for e in members if isinstance(e, dict)] if isinstance(members, list) else []
        if entries and draw(st.booleans()):
            entry = draw(st.sampled_from(entries))
            field = draw(st.sampled_from(ENTRY_FIELDS))
            entry[field] = draw(
                HOSTILE_NAMES
                if field == "name"
                else st.one_of(JSON, st.integers(-(2**70), 2**70), st.just(-1))
            )
        else:
            field = draw(st.sampled_from(FIELDS))
            if draw(st.booleans()):
                document.pop(field, None)
            else:
                document[field] = draw(JSON)
    return json.dumps(document).encode()


@settings(max_examples=examples(400), deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        JSON.map(lambda v: json.dumps(v).encode()),
        damaged_manifests(),
    )
)
def test_any_manifest_bytes_decode_or_are_refused(data: bytes) -> None:
    decoded_or_refused(data)


# --- the tar stream --------------------------------------------------------------------------


def archive(
    members: dict[str, bytes], keys: KeyRing = KEYS
) -> tuple[bytes, Manifest, list[tuple[int, int]]]:
    """The tar stream the appliance writes (before compression) for these members, made
    by the box of `keys`; and where the data of the manifest, its authentication and each
    member lie in it (start, end)."""
    manifest = Manifest(
        FORMAT_VERSION,
        "0",
        0.0,
        "1970-01-01T00:00:00Z",
        [
            MemberEntry(name, len(data), hashlib.sha256(data).hexdigest(), 0o600)
            for name, data in members.items()
        ],
        {},
        keys.current_id,
    )
    out = io.BytesIO()
    spans = []
    encoded = encode_manifest(manifest)
    auth = encode_auth(keys, encoded)
    for name, data, mode in [
        (MANIFEST_NAME, encoded, MANIFEST_MODE),
        (AUTH_NAME, auth, 0o600),
        *((name, data, 0o600) for name, data in members.items()),
    ]:
        out.write(member_header(name, len(data), mode, 0))
        spans.append((out.tell(), out.tell() + len(data)))
        out.write(data + padding(len(data)))
    out.write(end_of_archive(out.tell()))
    return out.getvalue(), manifest, spans


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(min(p, len(data)) for p in points), len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


CONTENTS = st.dictionaries(
    NAMES.filter(lambda n: n != MANIFEST_NAME), st.binary(max_size=700), max_size=4
).filter(lambda m: file_and_dir(m) is None)


@settings(max_examples=examples(150), deadline=None)
@given(members=CONTENTS, points=st.lists(st.integers(0, 20_000), max_size=10))
def test_an_archive_reads_the_same_however_it_is_chunked(
    members: dict[str, bytes], points: list[int]
) -> None:
    stream, manifest, _ = archive(members)
    checked = read_members(TarReader(cut(stream, points)), None, None, KEYS)
    assert checked.manifest == manifest
    assert checked.authenticity == Authenticity("this_box", KEYS.current_id, KEYS.ids)


@settings(max_examples=examples(300), deadline=None)
@given(
    members=CONTENTS,
    damage=st.lists(
        st.tuples(st.sampled_from(["flip", "truncate", "word"]), st.integers(0, 20_000)),
        min_size=1,
        max_size=3,
    ),
    points=st.lists(st.integers(0, 20_000), max_size=4),
)
def test_a_damaged_archive_is_refused_with_backup_error(
    members: dict[str, bytes], damage: list[tuple[str, int]], points: list[int]
) -> None:
    stream = bytearray(archive(members)[0])
    for kind, at in damage:
        # Half of the damage goes to the first blocks, where the headers are.
        at %= max(1, len(stream) // 2 if at % 2 else len(stream))
        if kind == "flip" and at < len(stream):
            stream[at] ^= 0x41
        elif kind == "truncate":
            del stream[at:]
        else:  # digits where octal numbers (mode, size, checksum) are
            stream[at : at + 8] = b"77777777"
    try:
        manifest = read_members(TarReader(cut(bytes(stream), points)), None, None, KEYS).manifest
    except BackupError as error:
        assert "\n" not in str(error)
        return
    for entry in manifest.members:
        assert_contained(entry.name)


def _tar(name: str, kind: bytes, data: bytes = b"x") -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data) if info.size else None)
    return out.getvalue()


@settings(max_examples=examples(200), deadline=None)
@given(
    name=HOSTILE_NAMES.filter(lambda n: "\x00" not in n),
    kind=st.sampled_from(
        [tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE]
    ),
    listed=st.booleans(),
)
def test_a_hostile_member_never_passes(name: str, kind: bytes, listed: bool) -> None:
    """A member after a valid manifest, named and typed by an attacker, who may also have
    listed it in the manifest: it passes only as a regular file with a contained name."""
    data = b"x"
    assume(not listed or name == name.encode("utf-8", "replace").decode())  # JSON can hold it
    entries = [MemberEntry(name, 1, hashlib.sha256(data).hexdigest(), 0o600)] if listed else []
    manifest = Manifest(FORMAT_VERSION, "0", 0.0, "", entries, {}, KEYS.current_id)
    encoded = encode_manifest(manifest)
    auth = encode_auth(KEYS, encoded)
    head = member_header(MANIFEST_NAME, len(encoded), MANIFEST_MODE, 0)
    head += encoded + padding(len(encoded))
    head += member_header(AUTH_NAME, len(auth), 0o600, 0) + auth + padding(len(auth))
    try:
        member = _tar(name, kind, data)
    except (ValueError, UnicodeError):  # tarfile itself cannot write this name
        return
    try:
        read = read_members(TarReader([head + member]), None, None, KEYS).manifest
    except BackupError as error:
        assert "\n" not in str(error)
        return
    assert kind == tarfile.REGTYPE and listed
    assert [entry.name for entry in read.members] == [name]
    assert_contained(name)


# --- authentication --------------------------------------------------------------------------


def restore_admits(authenticity: Authenticity) -> None:
    """What a restore decides from the archive's authentication (the default options)."""
    refuse_provenance(authenticity, RestoreOptions())


@settings(max_examples=examples(300), deadline=None)
@given(
    members=CONTENTS,
    where=st.integers(0, 2**32),
    delta=st.integers(1, 255),
    previous=st.booleans(),
)
def test_a_single_changed_byte_in_a_member_or_the_manifest_is_refused(
    members: dict[str, bytes], where: int, delta: int, previous: bool
) -> None:
    """Whatever byte of the manifest, of its tag or of a member changes, and to whatever
    value, a restore refuses the archive: hashes, tag and key id are all covered."""
    maker = KeyRing("previous-secret-" + "q" * 20, "salt") if previous else KEYS
    stream, manifest, spans = archive(members, maker)
    # The untouched archive is this box's (under the current or the previous key).
    intact = read_members(TarReader([stream]), None, None, KEYS, lambda m, a: restore_admits(a))
    assert intact.authenticity.for_this_box and intact.manifest == manifest
    covered = [offset for start, end in spans for offset in range(start, end)]
    offset = covered[where % len(covered)]
    changed = bytearray(stream)
    changed[offset] = (changed[offset] + delta) % 256
    try:
        read_members(TarReader([bytes(changed)]), None, None, KEYS, lambda m, a: restore_admits(a))
    except BackupError as error:
        assert "\n" not in str(error)
        return
    raise AssertionError(f"a changed byte at {offset} was accepted")


@settings(max_examples=examples(100), deadline=None)
@given(members=CONTENTS)
def test_another_boxs_archive_is_intact_but_refused(members: dict[str, bytes]) -> None:
    stream, manifest, _ = archive(members, OTHER_BOX)
    checked = read_members(TarReader([stream]), None, None, KEYS)
    assert checked.manifest == manifest
    assert checked.authenticity == Authenticity("other_box", OTHER_BOX.current_id, KEYS.ids)
    try:
        read_members(TarReader([stream]), None, None, KEYS, lambda m, a: restore_admits(a))
    except BackupError as error:
        message = str(error)
        assert OTHER_BOX.current_id in message and all(i in message for i in KEYS.ids)
        assert "--from-other-box" in message and "\n" not in message
        return
    raise AssertionError("another box's archive was admitted")
