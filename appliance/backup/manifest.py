"""The archive's format: its manifest, the rules for member names, and `BackupError`.

The first tar member of every archive is `manifest.json`: the format version, who made it
and when, and the name, size, SHA-256 and permission bits of every other member. Readers
trust nothing in the tar headers that the manifest does not confirm. Format 2 adds the
key id of the appliance that made it, and a second member, `manifest.auth`, that
authenticates the manifest's exact bytes (`appliance.backup.authenticity`). Format 1
archives (no key id, no tag) are still read, so that a restore can name them as such.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import msgspec

FORMAT_VERSION: Final = 2
UNAUTHENTICATED_VERSION: Final = 1  # before manifests were authenticated
READABLE_VERSIONS: Final = (UNAUTHENTICATED_VERSION, FORMAT_VERSION)
MANIFEST_NAME: Final = "manifest.json"
AUTH_NAME: Final = "manifest.auth"
MANIFEST_MODE: Final = 0o600
MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024  # far beyond any real manifest; refuses a bomb
MAX_NAME_BYTES: Final = 4096  # PATH_MAX; a longer name is hostile, not a state file
PERMISSION_BITS: Final = 0o777  # no setuid, setgid or sticky bits ever come out of a backup
_SHOW_CHARS: Final = 80
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_KEY_ID: Final = re.compile(r"[0-9a-f]{8}")


class BackupError(Exception):
    """Shown to the operator as it is: says what is wrong and what to do, in one line."""


class MemberEntry(msgspec.Struct, frozen=True):
    name: str
    size: int
    sha256: str
    mode: int  # permission bits only


class Manifest(msgspec.Struct, frozen=True):
    format_version: int
    appliance_version: str
    created: float
    created_utc: str
    members: list[MemberEntry]
    meta: dict[str, str]
    # The key id of the appliance that made it (format 2; "" in format 1).
    key_id: str = ""

    @property
    def total_size(self) -> int:
        return sum(member.size for member in self.members)


class _Version(msgspec.Struct):
    # Read first and alone, so a manifest of another format is named as such rather than
    # reported as invalid.
    format_version: int


def show(name: str) -> str:
    """A member name fit for a one-line message, however hostile the archive is."""
    if len(name) > _SHOW_CHARS:
        name = name[:_SHOW_CHARS] + "..."
    return repr(name)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a member name, or None when it is a normalized relative path."""
    if not name:
        return "has an empty name"
    # Undecodable bytes of a tar name come as surrogates (surrogateescape).
    if any(0xD800 <= ord(char) <= 0xDFFF for char in name):
        return "has a name that is not UTF-8"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"has a name longer than {MAX_NAME_BYTES} bytes"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in name):
        return "has a control character in its name"
    if name.startswith("/"):
        return "is an absolute path"
    if "\\" in name:
        return "has a backslash in its name"
    parts = name.split("/")
    if ".." in parts:
        return "contains '..'"
    if "" in parts or "." in parts:
        return "is not a normalized path (empty or '.' parts)"
    return None


def file_and_dir(names: Iterable[str]) -> str | None:
    """A name that is also a parent directory of another name (no tree can hold both)."""
    names = set(names)
    for name in sorted(names):
        parts = name.split("/")
        for end in range(1, len(parts)):
            if (parent := "/".join(parts[:end])) in names:
                return parent
    return None


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n"


def decode_manifest(data: bytes) -> Manifest:
    """The manifest, checked: its format version first, then every entry."""
    try:
        version = msgspec.json.decode(data, type=_Version).format_version
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 through
        raise BackupError(f"the manifest is unreadable ({exc}); the archive is damaged") from None
    if version not in READABLE_VERSIONS:
        age = "newer" if version > FORMAT_VERSION else "older"
        raise BackupError(
            f"made by a {age} appliance, format {version}; this one reads formats "
            f"{UNAUTHENTICATED_VERSION} and {FORMAT_VERSION} (restore it with a matching "
            "appliance version)"
        )
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 through
        raise BackupError(f"the manifest is unreadable ({exc}); the archive is damaged") from None
    if version == FORMAT_VERSION and not _KEY_ID.fullmatch(manifest.key_id):
        raise BackupError("the manifest has no valid key id; the archive is damaged")
    if version == UNAUTHENTICATED_VERSION and manifest.key_id:
        raise BackupError("the manifest of format 1 has a key id; the archive was altered")
    seen: set[str] = set()
    for entry in manifest.members:
        problem = name_problem(entry.name)
        if problem is None and entry.name in (MANIFEST_NAME, AUTH_NAME):
            problem = "is named like the manifest or its authentication"
        if problem is None and entry.name in seen:
            problem = "is listed twice"
        if problem is None and entry.size < 0:
            problem = "has a negative size"
        if problem is None and not _SHA256_HEX.fullmatch(entry.sha256):
            problem = "has a malformed SHA-256"
        if problem is None and not 0 <= entry.mode <= PERMISSION_BITS:
            problem = f"has mode {entry.mode:#o}, which is more than permission bits"
        if problem is not None:
            raise BackupError(
                f"the manifest entry {show(entry.name)} {problem}; the archive is damaged"
            )
        seen.add(entry.name)
    clash = file_and_dir(seen)
    if clash is not None:
        raise BackupError(
            f"the manifest has {show(clash)} as a file and as a directory; the archive is damaged"
        )
    return manifest
