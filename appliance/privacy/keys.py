"""The daemon's keys: the sealing codec for stored content and keyed hashes for logs.

Keys are derived from SECRET_KEY and PRIVACY_SALT (see appliance.store.sealing) and never
stored. In development without SECRET_KEY, a random key is generated once into the state
dir (mode 0600) so that content is still sealed; production refuses to start without one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from appliance.config import Settings
from appliance.envfile import EnvFileError, parse_env_file
from appliance.store.sealing import Codec, KeyRing, PlainCodec

LOGGER = logging.getLogger("appliance.privacy")

DEV_KEY_FILE: Final = "development.key"


@dataclass(frozen=True)
class Keys:
    """What the daemon seals with and hashes client identifiers with."""

    codec: Codec
    ring: KeyRing | None
    hash_key: bytes
    # From PRIVACY_SALT_PREVIOUS during a rotation: API keys hashed before `v2` may be
    # keyed with it (appliance.auth.apikeys).
    previous_hash_key: bytes | None = None

    def client_hash(self, identifier: str) -> str:
        """A keyed hash, so logs can correlate requests without naming who sent them."""
        if self.ring is not None:
            return self.ring.keyed_hash(identifier)[:16]
        return hashlib.blake2b(identifier.encode(), key=self.hash_key, digest_size=8).hexdigest()

    @property
    def current_id(self) -> str | None:
        return self.ring.current_id if self.ring is not None else None


def _development_secrets(state_dir: Path) -> tuple[str, str]:
    path = state_dir / DEV_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"SECRET_KEY={secrets.token_urlsafe(48)}\n")
            handle.write(f"PRIVACY_SALT={secrets.token_urlsafe(24)}\n")
        LOGGER.warning(
            "no SECRET_KEY set: generated a development key in the state dir; "
            "set SECRET_KEY and PRIVACY_SALT (appliance init) before real use"
        )
    try:
        values = parse_env_file(path)
    except EnvFileError as exc:
        raise RuntimeError(f"the development key file is unreadable: {exc}") from None
    return values["SECRET_KEY"], values["PRIVACY_SALT"]


def hash_key_from_salt(salt: str) -> bytes:
    return hashlib.blake2b(salt.encode(), digest_size=32).digest()


def hash_key_for(settings: Settings) -> bytes:
    """The key of keyed hashes (client ids in logs, API keys made before `v2`): cheap, no
    Argon2id."""
    salt = settings.privacy_salt
    if not salt:
        salt = _development_secrets(Path(settings.state_dir))[1]
    return hash_key_from_salt(salt)


def previous_hash_key_for(settings: Settings) -> bytes | None:
    """The same from PRIVACY_SALT_PREVIOUS, while a rotation has one."""
    salt = settings.privacy_salt_previous
    return hash_key_from_salt(salt) if salt else None


def load_keys(settings: Settings) -> Keys:
    """Derive the keys (Argon2id: call it in a thread, once)."""
    secret, salt = settings.secret_key, settings.privacy_salt
    if not secret:
        secret, dev_salt = _development_secrets(Path(settings.state_dir))
        salt = salt or dev_salt
    ring = KeyRing.from_settings(
        secret, salt, settings.secret_key_previous, settings.privacy_salt_previous
    )
    hash_key = hash_key_from_salt(salt)
    previous = previous_hash_key_for(settings)
    if not settings.privacy_encrypt_at_rest:
        LOGGER.warning("PRIVACY_ENCRYPT_AT_REST=false: conversations are stored in clear")
        return Keys(PlainCodec(ring), ring, hash_key, previous)
    return Keys(ring, ring, hash_key, previous)
