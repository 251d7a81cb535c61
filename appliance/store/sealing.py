"""Sealing at rest: what goes into Redis is XChaCha20-Poly1305 ciphertext bound to its key.

A sealed value is ``MAGIC | version | key id | nonce | ciphertext+tag``. The 8-byte header
stays clear (it names the key to open with) and is authenticated together with the
record's ``key_name`` (its Redis key, plus ``#field`` for a hash field): a changed byte, or
a value copied to another record, fails to open.

Keys: Argon2id(SECRET_KEY, BLAKE2b-128(PRIVACY_SALT)) gives a root key; keyed BLAKE2b of
the root with a per-purpose ``person`` gives the data key, the key id and the key for
pseudonyms in logs. Nothing derived is stored. Derivation is slow by design: build a
KeyRing once (off the event loop: ``trio.to_thread.run_sync``) and keep it; it is
immutable, so threads may share it.
"""

from __future__ import annotations

from typing import Final, Protocol

import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.pwhash.argon2id
import nacl.utils

# 0xC1 is never the first byte of UTF-8 text nor of any msgpack value, so a sealed value
# can never be mistaken for the plain titles and msgpack records written before sealing.
MAGIC: Final = b"\xc1AS"
VERSION: Final = 1
KEY_ID_BYTES: Final = 4  # only the current and the previous key must differ: 2**-32 is plenty
HEADER_BYTES: Final = len(MAGIC) + 1 + KEY_ID_BYTES
NONCE_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
KEY_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES  # 32
MIN_SEALED_BYTES: Final = HEADER_BYTES + NONCE_BYTES + TAG_BYTES

# Argon2id, RFC 9106's second recommendation (t=3, m=64 MiB; libsodium runs p=1): ~0.07 s
# on a server core, well under 0.5 s on a Raspberry Pi 4 class box, and 64 MiB fits beside
# the model. Changing these changes every key (and key id): never edit them in place.
ARGON2_OPSLIMIT: Final = 3
ARGON2_MEMLIMIT: Final = 64 * 1024 * 1024
ARGON2_SALT_BYTES: Final = nacl.pwhash.argon2id.SALTBYTES  # 16
_SALT_PERSON: Final = b"appliance.salt"
_SEAL_PERSON: Final = b"appliance.seal1"
_KEY_ID_PERSON: Final = b"appliance.keyid"
_HASH_ID_PERSON: Final = b"appliance.hashid"
_BACKUP_PERSON: Final = b"appliance.backup"
_MANIFEST_PERSON: Final = b"appliance.bkmfst"
BACKUP_TAG_BYTES: Final = 32
HASH_ID_BYTES: Final = 16


class SealError(Exception):
    """A stored value cannot be sealed or opened; the message is one line, without secrets."""


class KeyConfigError(SealError):
    """The key settings are inconsistent."""


class UnknownKeyId(SealError):
    def __init__(self, key_id: str, key_name: str, known: tuple[str, ...]) -> None:
        self.key_id = key_id
        super().__init__(
            f"stored data ({_record(key_name)}) was sealed with key id {key_id}; set "
            "SECRET_KEY_PREVIOUS and PRIVACY_SALT_PREVIOUS to the key it was written with "
            f"(configured key ids: {', '.join(known)})"
        )


class TamperedRecord(SealError):
    def __init__(self, key_name: str) -> None:
        super().__init__(
            f"{_record(key_name)} failed authentication: it was altered or moved from another key"
        )


class MalformedRecord(SealError):
    """Not a sealed value, a truncated one, or a format version this code does not read."""


def _record(key_name: str) -> str:
    return f"record {key_name}" if key_name else "a stored value"


def _utf8(text: str) -> bytes:
    # Total for every str (an environment value may carry surrogate escapes): never a crash.
    return text.encode(errors="surrogatepass")


def _blake2b(data: bytes, *, key: bytes = b"", person: bytes, size: int) -> bytes:
    return nacl.hash.blake2b(
        data, digest_size=size, key=key, person=person, encoder=nacl.encoding.RawEncoder
    )


class _Key:
    __slots__ = ("backup", "data", "hash_id", "header", "id")

    def __init__(self, secret_key: str, privacy_salt: str) -> None:
        salt = _blake2b(_utf8(privacy_salt), person=_SALT_PERSON, size=ARGON2_SALT_BYTES)
        root = nacl.pwhash.argon2id.kdf(
            KEY_BYTES, _utf8(secret_key), salt, opslimit=ARGON2_OPSLIMIT, memlimit=ARGON2_MEMLIMIT
        )
        self.data = _blake2b(b"", key=root, person=_SEAL_PERSON, size=KEY_BYTES)
        raw_id = _blake2b(b"", key=root, person=_KEY_ID_PERSON, size=KEY_ID_BYTES)
        self.id = raw_id.hex()
        self.header = MAGIC + bytes([VERSION]) + raw_id
        # For keyed_hash (pseudonyms in logs); only the current key's is used.
        self.hash_id = _blake2b(b"", key=root, person=_HASH_ID_PERSON, size=KEY_BYTES)
        # For the authentication tags of backup manifests (appliance.backup).
        self.backup = _blake2b(b"", key=root, person=_BACKUP_PERSON, size=KEY_BYTES)


class Codec(Protocol):
    """What the store calls on every user-content value on its way to and from Redis."""

    def seal(self, plaintext: bytes, key_name: str) -> bytes: ...
    def open(self, stored: bytes, key_name: str) -> bytes: ...
    def needs_rotation(self, stored: bytes) -> bool: ...
    def reseal(self, stored: bytes, key_name: str) -> bytes: ...


def is_sealed(stored: bytes) -> bool:
    return stored.startswith(MAGIC)


class KeyRing:
    """The current data key (seals) and an optional previous one (opens only).

    With ``allow_plain_reads`` a value without the sealed magic is returned as it is (and
    reported by needs_rotation): that reads data written before encryption was turned on,
    until ``appliance keys rotate`` has sealed it. Without it such a value is an error.
    """

    __slots__ = ("_current", "_keys", "allow_plain_reads")

    def __init__(
        self,
        secret_key: str,
        privacy_salt: str,
        previous: tuple[str, str] | None = None,
        *,
        allow_plain_reads: bool = False,
    ) -> None:
        self._current = _Key(secret_key, privacy_salt)
        self._keys = {self._current.id: self._current}
        if previous is not None:
            old = _Key(*previous)
            if old.id == self._current.id:
                raise KeyConfigError(
                    "SECRET_KEY_PREVIOUS and PRIVACY_SALT_PREVIOUS give the current key "
                    f"(key id {old.id}); unset them, or set them to the key you rotated from"
                )
            self._keys[old.id] = old
        self.allow_plain_reads = allow_plain_reads

    @classmethod
    def from_settings(
        cls,
        secret_key: str,
        privacy_salt: str,
        previous_secret_key: str = "",
        previous_privacy_salt: str = "",
        *,
        allow_plain_reads: bool = False,
    ) -> KeyRing:
        if bool(previous_secret_key) != bool(previous_privacy_salt):
            given, missing = "SECRET_KEY_PREVIOUS", "PRIVACY_SALT_PREVIOUS"
            if previous_privacy_salt:
                given, missing = missing, given
            raise KeyConfigError(
                f"{given} is set but {missing} is not; set both to the key and salt the old "
                "data was written with (the salt may equal PRIVACY_SALT)"
            )
        previous = (previous_secret_key, previous_privacy_salt) if previous_secret_key else None
        return cls(secret_key, privacy_salt, previous, allow_plain_reads=allow_plain_reads)

    def __repr__(self) -> str:
        return f"KeyRing(current_id={self.current_id!r}, ids={self.ids!r})"

    @property
    def current_id(self) -> str:
        return self._current.id

    @property
    def ids(self) -> tuple[str, ...]:
        """Every key id this ring opens, the current one first."""
        return tuple(self._keys)

    def keyed_hash(self, value: str) -> str:
        """A stable pseudonym for an identifier (a client address, a user name) for logs."""
        key = self._current.hash_id
        return _blake2b(_utf8(value), key=key, person=_HASH_ID_PERSON, size=HASH_ID_BYTES).hex()

    def backup_tag(self, data: bytes, key_id: str | None = None) -> bytes | None:
        """Keyed BLAKE2b of a backup manifest under the current key, or under `key_id`;
        None when this ring does not hold that key."""
        key = self._current if key_id is None else self._keys.get(key_id)
        if key is None:
            return None
        return _blake2b(data, key=key.backup, person=_MANIFEST_PERSON, size=BACKUP_TAG_BYTES)

    def seal(self, plaintext: bytes, key_name: str) -> bytes:
        key = self._current
        nonce = nacl.utils.random(NONCE_BYTES)
        ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, _aad(key.header, key_name), nonce, key.data
        )
        return key.header + nonce + ciphertext

    def open(self, stored: bytes, key_name: str) -> bytes:
        if not is_sealed(stored) and self.allow_plain_reads:
            return stored
        key_id = self.key_id_of(stored, key_name=key_name)
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownKeyId(key_id, key_name, self.ids)
        nonce = stored[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
        try:
            return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                stored[HEADER_BYTES + NONCE_BYTES :], _aad(key.header, key_name), nonce, key.data
            )
        except nacl.exceptions.CryptoError:
            raise TamperedRecord(key_name) from None

    def needs_rotation(self, stored: bytes) -> bool:
        """Whether the value is plain or sealed under a key other than the current one."""
        return not is_sealed(stored) or self.key_id_of(stored) != self.current_id

    def reseal(self, stored: bytes, key_name: str) -> bytes:
        return self.seal(self.open(stored, key_name), key_name)

    @staticmethod
    def key_id_of(stored: bytes, *, key_name: str = "") -> str:
        """The key id in a sealed value's clear header, without opening it."""
        where = _record(key_name)
        if not is_sealed(stored):
            raise MalformedRecord(
                f"{where} is not a sealed value (no sealed header; was it written with "
                "PRIVACY_ENCRYPT_AT_REST=false?)"
            )
        if len(stored) < MIN_SEALED_BYTES:
            raise MalformedRecord(
                f"{where} is truncated ({len(stored)} bytes; a sealed value has at least "
                f"{MIN_SEALED_BYTES})"
            )
        if stored[len(MAGIC)] != VERSION:
            raise MalformedRecord(
                f"{where} is not a sealed value this version reads (format version "
                f"{stored[len(MAGIC)]} is not supported; expected {VERSION})"
            )
        return stored[len(MAGIC) + 1 : HEADER_BYTES].hex()


def _aad(header: bytes, key_name: str) -> bytes:
    # The header has a fixed length, so header + name is unambiguous.
    return header + _utf8(key_name)


class PlainCodec:
    """PRIVACY_ENCRYPT_AT_REST=false: values are stored as they are.

    Sealed values written while encryption was on are opened with ``keys`` when given (and
    reported by needs_rotation, so a sweep can rewrite them in clear); without keys they
    are an error, never ciphertext handed back as if it were content.
    """

    __slots__ = ("keys",)

    def __init__(self, keys: KeyRing | None = None) -> None:
        self.keys = keys

    def seal(self, plaintext: bytes, key_name: str) -> bytes:
        return plaintext

    def open(self, stored: bytes, key_name: str) -> bytes:
        if not is_sealed(stored):
            return stored
        if self.keys is None:
            raise MalformedRecord(
                f"{_record(key_name)} is sealed, but PRIVACY_ENCRYPT_AT_REST is false and no key "
                "is configured; set the SECRET_KEY and PRIVACY_SALT it was written with"
            )
        return self.keys.open(stored, key_name)

    def needs_rotation(self, stored: bytes) -> bool:
        return is_sealed(stored)

    def reseal(self, stored: bytes, key_name: str) -> bytes:
        return self.open(stored, key_name)
