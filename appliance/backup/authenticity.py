"""Whose backup an archive is, and the proof: the `manifest.auth` member of format 2.

The manifest holds every member's SHA-256 and the key id of the appliance that made it;
`manifest.auth`, the tar member right after it, holds a keyed BLAKE2b of the manifest's
exact bytes under a key derived from that appliance's SECRET_KEY and PRIVACY_SALT
(`KeyRing.backup_tag`). So a changed byte anywhere, in a member or in the manifest, fails
either a member's hash or the tag, and only a box holding the key can make an archive that
passes. The key id says which box that was; this box checks the tag under its current or
previous key, and cannot check an archive of another box at all.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import msgspec

from appliance.backup.manifest import UNAUTHENTICATED_VERSION, BackupError, Manifest

ALGORITHM: Final = "blake2b-256-keyed"
MAX_AUTH_BYTES: Final = 4096  # the member is ~120 bytes; more is not ours
AUTH_MODE: Final = 0o600

Provenance = Literal["this_box", "other_box", "unauthenticated"]


class ManifestKeys(Protocol):
    """The keys a manifest is tagged and checked with (`appliance.store.sealing.KeyRing`)."""

    @property
    def current_id(self) -> str: ...

    @property
    def ids(self) -> tuple[str, ...]: ...

    def backup_tag(self, data: bytes, key_id: str | None = None) -> bytes | None: ...


class AuthRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    algorithm: str
    tag: str  # hex


@dataclass(frozen=True)
class Authenticity:
    """What an archive's authentication says about it, for this box's keys."""

    provenance: Provenance
    key_id: str  # the archive's key id ("" for format 1)
    box_ids: tuple[str, ...]  # this box's key ids, the current one first

    @property
    def for_this_box(self) -> bool:
        return self.provenance == "this_box"

    def describe(self) -> str:
        """One phrase for `appliance backup verify` and the logs."""
        if self.provenance == "this_box":
            which = "current" if self.key_id == self.box_ids[0] else "previous"
            return f"authenticated for this box (key id {self.key_id}, the {which} key)"
        if self.provenance == "other_box":
            return (
                f"made by another appliance (key id {self.key_id}); this box "
                f"({key_ids(self.box_ids)}) cannot authenticate it"
            )
        return "not authenticated (format 1, made before backups were authenticated)"


def key_ids(ids: tuple[str, ...]) -> str:
    """This box's key ids in words: 'key id X' or 'key ids X (current) and Y (previous)'."""
    if len(ids) == 1:
        return f"key id {ids[0]}, no previous key"
    return f"key ids {ids[0]} (current) and {ids[1]} (previous)"


def encode_auth(keys: ManifestKeys, manifest_bytes: bytes) -> bytes:
    """The `manifest.auth` member for these manifest bytes, under the current key."""
    tag = keys.backup_tag(manifest_bytes)
    assert tag is not None  # the current key is always held
    return msgspec.json.encode(AuthRecord(ALGORITHM, tag.hex())) + b"\n"


def unauthenticated(manifest: Manifest, keys: ManifestKeys) -> Authenticity:
    """A format 1 manifest: there is nothing to check."""
    assert manifest.format_version == UNAUTHENTICATED_VERSION
    return Authenticity("unauthenticated", "", keys.ids)


def authenticate(
    keys: ManifestKeys, manifest: Manifest, manifest_bytes: bytes, auth_bytes: bytes
) -> Authenticity:
    """Check the tag when this box holds the manifest's key; a wrong tag is refused.

    The key id itself is covered by the tag: a manifest whose key id was changed to this
    box's does not verify under this box's key.
    """
    try:
        record = msgspec.json.decode(auth_bytes, type=AuthRecord)
        tag = bytes.fromhex(record.tag)
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError):
        raise BackupError(
            "the manifest's authentication is unreadable; the archive is damaged"
        ) from None
    if record.algorithm != ALGORITHM:
        raise BackupError(
            f"the manifest is authenticated with {record.algorithm[:40]!r}, which this "
            f"appliance does not know (it uses {ALGORITHM}); the archive was altered"
        )
    if manifest.key_id not in keys.ids:
        return Authenticity("other_box", manifest.key_id, keys.ids)
    expected = keys.backup_tag(manifest_bytes, manifest.key_id)
    if expected is None or not hmac.compare_digest(expected, tag):
        raise BackupError(
            f"the manifest does not match its authentication tag under key id "
            f"{manifest.key_id}; the archive was altered or damaged"
        )
    return Authenticity("this_box", manifest.key_id, keys.ids)
