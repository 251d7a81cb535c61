"""Passphrase sealing of a whole archive file (`.tar.gz.sealed`).

Layout: a clear header, then the .tar.gz bytes as a libsodium secretstream
(XChaCha20-Poly1305) of fixed-size chunks, the last one tagged FINAL so that a file cut
short is told apart from a complete one. The header is

    MAGIC | version | Argon2id opslimit, memlimit | salt | chunk size | stream header | check

The key comes from the passphrase with Argon2id and the salt and limits in the header (so
limits can change without breaking old archives). `check`, a keyed BLAKE2b of the header
under a second derived key, tells a wrong passphrase from damage before any chunk is read;
the whole header is also bound as associated data to the first chunk.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.pwhash.argon2id
import nacl.utils

from appliance.backup.manifest import BackupError

# 0xC1 never starts gzip (0x1F 0x8B) nor text: a sealed file is never taken for a plain one.
MAGIC: Final = b"\xc1ABKSEAL"
VERSION: Final = 1
CHUNK_BYTES: Final = 1024 * 1024
# libsodium's "moderate" (t=3, m=256 MiB, ~0.3 s on a server core): a backup leaves the box
# and may be attacked offline, so this is stronger than the key derivation at rest.
OPSLIMIT: Final = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
MEMLIMIT: Final = nacl.pwhash.argon2id.MEMLIMIT_MODERATE
# What a reader accepts from a header: a damaged or hostile one must not ask for more.
MAX_OPSLIMIT: Final = 4 * nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
MAX_MEMLIMIT: Final = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
MAX_CHUNK_BYTES: Final = 16 * 1024 * 1024
SALT_BYTES: Final = nacl.pwhash.argon2id.SALTBYTES
STREAM_KEY_BYTES: Final = nacl.bindings.crypto_secretstream_xchacha20poly1305_KEYBYTES
CHECK_BYTES: Final = 16
ABYTES: Final = nacl.bindings.crypto_secretstream_xchacha20poly1305_ABYTES
TAG_MESSAGE: Final = nacl.bindings.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL: Final = nacl.bindings.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_PREFIX: Final = struct.Struct(
    f">{len(MAGIC)}sBIQ{SALT_BYTES}sI"
    f"{nacl.bindings.crypto_secretstream_xchacha20poly1305_HEADERBYTES}s"
)
HEADER_BYTES: Final = _PREFIX.size + CHECK_BYTES
_CHECK_PERSON: Final = b"appliance.bkchk"

WRONG_OR_DAMAGED: Final = "the passphrase is wrong or the archive is damaged"


def is_sealed(head: bytes) -> bool:
    return head.startswith(MAGIC)


def _keys(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> tuple[bytes, bytes]:
    if not passphrase:
        raise BackupError("the passphrase is empty; put the passphrase in the passphrase file")
    keys = nacl.pwhash.argon2id.kdf(
        STREAM_KEY_BYTES + STREAM_KEY_BYTES, passphrase, salt, opslimit=opslimit, memlimit=memlimit
    )
    return keys[:STREAM_KEY_BYTES], keys[STREAM_KEY_BYTES:]


def _check(prefix: bytes, check_key: bytes) -> bytes:
    return nacl.hash.blake2b(
        prefix,
        digest_size=CHECK_BYTES,
        key=check_key,
        person=_CHECK_PERSON,
        encoder=nacl.encoding.RawEncoder,
    )


class SealedWriter:
    """Seals what is written to it into `sink`; `close` writes the FINAL chunk."""

    def __init__(self, sink: Callable[[bytes], object], passphrase: bytes) -> None:
        salt = nacl.utils.random(SALT_BYTES)
        stream_key, check_key = _keys(passphrase, salt, OPSLIMIT, MEMLIMIT)
        self._state = nacl.bindings.crypto_secretstream_xchacha20poly1305_state()
        stream_header = nacl.bindings.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, stream_key
        )
        prefix = _PREFIX.pack(MAGIC, VERSION, OPSLIMIT, MEMLIMIT, salt, CHUNK_BYTES, stream_header)
        self._header: bytes | None = prefix + _check(prefix, check_key)
        self._sink = sink
        self._buffer = bytearray()
        sink(self._header)

    def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) < CHUNK_BYTES:
            return
        view = memoryview(self._buffer)
        done = 0
        while len(view) - done >= CHUNK_BYTES:
            self._push(bytes(view[done : done + CHUNK_BYTES]), TAG_MESSAGE)
            done += CHUNK_BYTES
        view.release()
        del self._buffer[:done]

    def close(self) -> None:
        self._push(bytes(self._buffer), TAG_FINAL)
        self._buffer.clear()

    def _push(self, chunk: bytes, tag: int) -> None:
        header, self._header = self._header, None  # associated data of the first chunk only
        self._sink(
            nacl.bindings.crypto_secretstream_xchacha20poly1305_push(
                self._state, chunk, header, tag
            )
        )


def unsealed_chunks(read: Callable[[int], bytes], passphrase: bytes) -> Iterator[bytes]:
    """The plain bytes of a sealed file read through `read` (a buffered file's read)."""
    header = read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise BackupError("the archive is truncated (its sealed header is incomplete)")
    prefix = header[: _PREFIX.size]
    magic, version, opslimit, memlimit, salt, chunk_bytes, stream_header = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise BackupError("not a sealed backup archive")
    if version != VERSION:
        raise BackupError(
            f"sealed by another appliance version, sealing format {version}; this one "
            f"reads {VERSION}"
        )
    if not (
        nacl.pwhash.argon2id.OPSLIMIT_MIN <= opslimit <= MAX_OPSLIMIT
        and nacl.pwhash.argon2id.MEMLIMIT_MIN <= memlimit <= MAX_MEMLIMIT
        and 0 < chunk_bytes <= MAX_CHUNK_BYTES
    ):
        raise BackupError("the sealed header is damaged (limits out of range)")
    stream_key, check_key = _keys(passphrase, salt, opslimit, memlimit)
    if not hmac.compare_digest(_check(prefix, check_key), header[_PREFIX.size :]):
        raise BackupError(WRONG_OR_DAMAGED)
    state = nacl.bindings.crypto_secretstream_xchacha20poly1305_state()
    nacl.bindings.crypto_secretstream_xchacha20poly1305_init_pull(state, stream_header, stream_key)
    associated: bytes | None = header
    while True:
        sealed = read(chunk_bytes + ABYTES)
        if not sealed:
            raise BackupError(
                "the archive is truncated (its sealed stream ends before its final chunk)"
            )
        try:
            chunk, tag = nacl.bindings.crypto_secretstream_xchacha20poly1305_pull(
                state, sealed, associated
            )
        except nacl.exceptions.CryptoError:
            if len(sealed) < chunk_bytes + ABYTES:
                raise BackupError(
                    "the archive is truncated or damaged (its last sealed chunk is cut short "
                    "or altered)"
                ) from None
            raise BackupError(WRONG_OR_DAMAGED) from None
        associated = None
        yield chunk
        if tag == TAG_FINAL:
            if read(1):
                raise BackupError("data follows the sealed end; the archive is damaged")
            return


def unseal_to_file(archive: Path, dest: Path, passphrase: bytes) -> None:
    """Write the plain .tar.gz inside a sealed `archive` to the new file `dest` (mode 0600).

    A plain archive is copied as it is, as a passphrase is no error for one. Only the
    sealing is checked here (every chunk authenticated, the end present); `dest` is removed
    on failure.
    """
    try:
        with open(archive, "rb") as source:
            sealed = is_sealed(source.read(len(MAGIC)))
            source.seek(0)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(dest, flags, 0o600), "wb") as target:
                try:
                    if sealed:
                        for chunk in unsealed_chunks(source.read, passphrase):
                            target.write(chunk)
                    else:
                        while chunk := source.read(CHUNK_BYTES):
                            target.write(chunk)
                    target.flush()
                    os.fsync(target.fileno())
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(dest)
                    raise
    except BackupError as exc:
        raise BackupError(f"{archive.name}: {exc}") from None
    except OSError as exc:
        raise BackupError(
            f"cannot unseal {archive.name} into {dest.name}: {exc.strerror}"
        ) from None
