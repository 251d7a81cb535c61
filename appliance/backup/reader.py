"""Reading an archive: unseal, decompress and check every member against the manifest.

`open_archive` runs unsealing and decompression in a thread ahead of the caller and gives
the tar stream; `read_members` checks the manifest's authentication, lets the caller
refuse the archive for what its manifest says (`admit`: whose it is, which members) before
anything is written, then checks it member by member (hashing each) and, given an
`Extractor`, writes the members out as they pass. Both verify and extract use exactly
this path, so an archive that verifies is one that extracts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from appliance.backup.authenticity import (
    MAX_AUTH_BYTES,
    Authenticity,
    ManifestKeys,
    authenticate,
    unauthenticated,
)
from appliance.backup.compress import file_chunks, gunzip, read_ahead
from appliance.backup.extract import Extractor
from appliance.backup.manifest import (
    AUTH_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    BackupError,
    Manifest,
    decode_manifest,
    name_problem,
    show,
)
from appliance.backup.members import TarReader
from appliance.backup.sealed import MAGIC, is_sealed, unsealed_chunks

Progress = Callable[[int, int], None]
Admit = Callable[[Manifest, Authenticity], None]


@dataclass(frozen=True)
class Checked:
    """An archive that passed every check: its manifest and whose it is."""

    manifest: Manifest
    authenticity: Authenticity


READ_BYTES: Final = 1024 * 1024


@contextlib.contextmanager
def open_archive(
    path: Path, passphrase: bytes | None
) -> Iterator[tuple[TarReader, os.stat_result]]:
    """The archive's tar stream, decompressed (and unsealed) in a thread ahead of us.

    BackupErrors, the reader's and the caller's, come out named after the archive; an
    OSError of the caller's (a full disk while extracting) passes through as it is.
    """
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise BackupError(f"cannot read {path.name}: {exc.strerror}") from None
    with file:
        try:
            status = os.fstat(file.fileno())
            head = file.read(len(MAGIC))
            file.seek(0)
        except OSError as exc:
            raise BackupError(f"cannot read {path.name}: {exc.strerror}") from None
        if is_sealed(head):
            if passphrase is None:
                raise BackupError(
                    f"{path.name}: sealed with a passphrase; a passphrase file is needed to read it"
                )
            raw = unsealed_chunks(file.read, passphrase)
        else:
            raw = file_chunks(file.read, READ_BYTES)
        with read_ahead(_read_errors(gunzip(raw))) as chunks:
            try:
                yield TarReader(chunks), status
            except BackupError as exc:
                raise BackupError(f"{path.name}: {exc}") from None


def _read_errors(chunks: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from chunks
    except OSError as exc:
        raise BackupError(f"cannot read the archive: {exc.strerror}") from None


def read_members(
    reader: TarReader,
    progress: Progress | None,
    extractor: Extractor | None,
    keys: ManifestKeys,
    admit: Admit | None = None,
) -> Checked:
    """Check every member against the manifest (and extract it, given an extractor).

    `admit` sees the manifest and its authenticity before any member is read or written;
    it refuses the archive by raising BackupError.
    """
    manifest, authenticity = _read_manifest(reader, keys)
    if admit is not None:
        admit(manifest, authenticity)
    if extractor is not None:
        extractor.start(manifest)
    _read_listed(reader, manifest, progress, extractor)
    return Checked(manifest, authenticity)


def _read_manifest(reader: TarReader, keys: ManifestKeys) -> tuple[Manifest, Authenticity]:
    info = reader.next_member()
    if info is None:
        raise BackupError("the archive holds no manifest; it is damaged")
    if info.name != MANIFEST_NAME:
        raise BackupError(
            f"the first member is {show(info.name)}, not {MANIFEST_NAME}; this is not an "
            "appliance backup"
        )
    if info.size > MAX_MANIFEST_BYTES:
        raise BackupError(
            f"the manifest is over {MAX_MANIFEST_BYTES} bytes; the archive is damaged"
        )
    data = b"".join(reader.data(info.size))
    manifest = decode_manifest(data)
    if manifest.format_version != FORMAT_VERSION:
        return manifest, unauthenticated(manifest, keys)
    info = reader.next_member()
    if info is None or info.name != AUTH_NAME:
        found = "nothing" if info is None else show(info.name)
        raise BackupError(
            f"the manifest's authentication ({AUTH_NAME}) should follow it, but {found} "
            "does; the archive was altered"
        )
    if info.size > MAX_AUTH_BYTES:
        raise BackupError(f"{AUTH_NAME} is over {MAX_AUTH_BYTES} bytes; the archive was altered")
    return manifest, authenticate(keys, manifest, data, b"".join(reader.data(info.size)))


def _read_listed(
    reader: TarReader, manifest: Manifest, progress: Progress | None, extractor: Extractor | None
) -> None:
    expected = {entry.name: entry for entry in manifest.members}
    seen: set[str] = set()
    total = manifest.total_size
    done = 0
    if progress is not None:
        progress(0, total)
    while (info := reader.next_member()) is not None:
        name = info.name
        problem = name_problem(name)
        if problem is not None:
            raise BackupError(f"member {show(name)} {problem}; refusing the archive")
        if name in seen or name in (MANIFEST_NAME, AUTH_NAME):
            raise BackupError(f"member {show(name)} appears twice; the archive was altered")
        entry = expected.get(name)
        if entry is None:
            raise BackupError(
                f"member {show(name)} is not in the manifest; the archive was altered"
            )
        if info.size != entry.size:
            raise BackupError(
                f"member {show(name)} is {info.size} bytes but the manifest says {entry.size}; "
                "the archive is damaged"
            )
        seen.add(name)
        digest = hashlib.sha256()
        write = extractor.open(entry) if extractor is not None else None
        for view in reader.data(info.size):
            digest.update(view)
            if write is not None:
                write(view)
            done += len(view)
            if progress is not None:
                progress(done, total)
        if digest.hexdigest() != entry.sha256:
            raise BackupError(
                f"member {show(name)} does not match its SHA-256 in the manifest; the archive "
                "is damaged"
            )
        if extractor is not None:
            extractor.finish(entry)
    missing = [entry.name for entry in manifest.members if entry.name not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BackupError(
            f"the manifest lists {show(missing[0])}{more}, which the archive lacks; it is "
            "truncated or damaged"
        )
