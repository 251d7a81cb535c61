"""Backup tar streams built in memory, member by member, for the exact-example tests of the
archive's readers: what the appliance writes (before compression), or that with one part
changed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Final

from appliance.backup.authenticity import encode_auth
from appliance.backup.manifest import (
    AUTH_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    UNAUTHENTICATED_VERSION,
    Manifest,
    MemberEntry,
    encode_manifest,
)
from appliance.backup.members import TarReader, end_of_archive, member_header, padding
from appliance.store.sealing import KeyRing

# This box's keys (current and previous) and another box's.
KEYS: Final = KeyRing(
    "streams-secret-" + "s" * 24, "salt", ("streams-previous-" + "t" * 22, "salt")
)
OTHER_BOX: Final = KeyRing("streams-other-box-" + "o" * 22, "other-salt")

Part = tuple[str, bytes]


def entry(name: str, data: bytes, mode: int = 0o600) -> MemberEntry:
    return MemberEntry(name, len(data), hashlib.sha256(data).hexdigest(), mode)


def manifest_of(
    members: dict[str, bytes], *, version: int = FORMAT_VERSION, key_id: str | None = None
) -> Manifest:
    """The manifest the appliance writes for these members (format 2: this box's key id)."""
    if key_id is None:
        key_id = KEYS.current_id if version == FORMAT_VERSION else ""
    return Manifest(
        version,
        "0.1.0",
        0.0,
        "1970-01-01T00:00:00Z",
        [entry(name, data) for name, data in members.items()],
        {},
        key_id,
    )


def head(manifest: Manifest, keys: KeyRing = KEYS) -> list[Part]:
    """The manifest member and, in format 2, its authentication under `keys`."""
    encoded = encode_manifest(manifest)
    if manifest.format_version == UNAUTHENTICATED_VERSION:
        return [(MANIFEST_NAME, encoded)]
    return [(MANIFEST_NAME, encoded), (AUTH_NAME, encode_auth(keys, encoded))]


def tar(parts: list[Part], *, end: bool = True) -> bytes:
    """The tar stream of these regular-file members, in this order (and its end)."""
    out = bytearray()
    for name, data in parts:
        out += member_header(name, len(data), 0o600, 0) + data + padding(len(data))
    if end:
        out += end_of_archive(len(out))
    return bytes(out)


def archive(members: dict[str, bytes], keys: KeyRing = KEYS) -> bytes:
    """The whole stream of an archive of `members` made by the box of `keys`."""
    manifest = manifest_of(members, key_id=keys.current_id)
    return tar([*head(manifest, keys), *members.items()])


def reader(stream: bytes, chunk: int = 1000) -> TarReader:
    """A reader of `stream` cut into chunks (members then straddle chunk boundaries)."""

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(stream), chunk):
            yield stream[start : start + chunk]

    return TarReader(chunks())
