"""The remote LLM's settings as plain values (`RemoteConfig`), and its API key file.

`RemoteConfig.load(...)` is what the daemon builds from APPLIANCE_REMOTE_LLM_URL,
APPLIANCE_REMOTE_LLM_MODEL, APPLIANCE_REMOTE_LLM_KEY_FILE, APPLIANCE_REMOTE_TIMEOUT and
APPLIANCE_REMOTE_PRICE_PER_1K_TOKENS; every error names the setting and what to do, and
none shows the key.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import msgspec

from appliance.outbound import loopback

DEFAULT_TIMEOUT_SECONDS: Final = 60.0
KEY_FILE_SETTING: Final = "APPLIANCE_REMOTE_LLM_KEY_FILE"
ALLOW_PLAINTEXT_SETTING: Final = "APPLIANCE_REMOTE_LLM_ALLOW_PLAINTEXT"
MAX_KEY_FILE_BYTES: Final = 4096
MAX_MODEL_CHARS: Final = 128


class RemoteConfigError(ValueError):
    """The remote LLM settings are unusable; one line for the operator."""


class RemoteConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how to reach the remote LLM. `api_key` is shown by `repr` as its length
    only; never encode this struct (msgspec would write the key)."""

    url: str
    model: str
    api_key: str
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    price_per_1k: float = 0.0

    def __post_init__(self) -> None:
        _check_url(self.url)
        if not self.model or len(self.model) > MAX_MODEL_CHARS or not self.model.isprintable():
            raise RemoteConfigError(
                f"APPLIANCE_REMOTE_LLM_MODEL must be 1 to {MAX_MODEL_CHARS} printable "
                "characters: the model name the remote server knows (e.g. gpt-4o-mini)"
            )
        _check_key(self.api_key, "the remote LLM API key")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise RemoteConfigError(
                f"APPLIANCE_REMOTE_TIMEOUT is {self.timeout}; use seconds above 0 (default 60)"
            )
        if not (math.isfinite(self.price_per_1k) and self.price_per_1k >= 0):
            raise RemoteConfigError(
                f"APPLIANCE_REMOTE_PRICE_PER_1K_TOKENS is {self.price_per_1k}; use a price of "
                "0 or more per 1000 tokens"
            )

    def __repr__(self) -> str:
        return (
            f"RemoteConfig(url={self.url!r}, model={self.model!r}, "
            f"api_key=<{len(self.api_key)} characters>, timeout={self.timeout!r}, "
            f"price_per_1k={self.price_per_1k!r})"
        )

    @classmethod
    def load(
        cls,
        *,
        url: str,
        model: str,
        key_file: str | Path,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        price_per_1k: float = 0.0,
    ) -> RemoteConfig:
        """The config with the key read from `key_file` (see `load_api_key`)."""
        if not str(key_file):
            raise RemoteConfigError(
                f"{KEY_FILE_SETTING} is not set; REMOTE_LLM_ENABLED=true needs a file holding "
                "the remote LLM's API key (one line, chmod 600)"
            )
        key = load_api_key(Path(key_file))
        return cls(url=url, model=model, api_key=key, timeout=timeout, price_per_1k=price_per_1k)


def _check_url(url: str) -> None:
    name = "APPLIANCE_REMOTE_LLM_URL"
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is not None and "@" in parts.netloc:
        # Shown without the URL: it holds a password or a key.
        raise RemoteConfigError(
            f"{name} holds a user name or password; remove it and put the API key into "
            f"{KEY_FILE_SETTING}"
        )
    try:
        _ = parts.port if parts is not None else None  # a bad port raises ValueError
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteConfigError(
            f"{name} is {url[:200]!r}; use an http:// or https:// base URL such as "
            "https://api.example.com/v1"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise RemoteConfigError(f"{name} must not carry a query or fragment (?... or #...)")
    if parts.path.rstrip("/").endswith("/chat/completions"):
        raise RemoteConfigError(
            f"{name} is {url!r}; give the base URL (ending in /v1): the appliance adds "
            "/chat/completions itself"
        )


def plaintext_problem(url: str) -> str | None:
    """Why production refuses `url`: plain http:// to another machine carries the prompts
    and the API key readable over the network. Loopback stays on the box (a local gateway
    or an encrypting proxy such as stunnel), so it is allowed. None when nothing is wrong
    (an invalid URL is _check_url's to report)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme != "http" or not host or loopback(host):
        return None
    return (
        f"APPLIANCE_REMOTE_LLM_URL is plain http:// to {host[:100]!r}: prompts and the remote "
        "API key would cross the network readable; use https://, or accept that risk with "
        f"{ALLOW_PLAINTEXT_SETTING}=true"
    )


def _check_key(key: str, what: str) -> None:
    if not key:
        raise RemoteConfigError(f"{what} is empty; write the key into {KEY_FILE_SETTING}")
    if "\n" in key:
        raise RemoteConfigError(f"{what} holds more than one line; it must hold only the key")
    if not all("!" <= c <= "~" for c in key):
        raise RemoteConfigError(
            f"{what} holds spaces, control or non-ASCII characters, which an HTTP header "
            "cannot carry; it must hold only the key"
        )


def load_api_key(path: Path) -> str:
    """The key in `path`: one line, one trailing newline stripped. Like ssh with a private
    key, a file that group or others may read or write is refused, and so is one that
    belongs to another user than this process's or root."""
    where = f"{KEY_FILE_SETTING} ({path})"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RemoteConfigError(
            f"{where} does not exist; write the remote LLM's API key into it (chmod 600)"
        ) from None
    except PermissionError:
        raise RemoteConfigError(
            f"{where} cannot be read by this process (uid {os.geteuid()}); make it belong to "
            "the appliance's user with mode 0600"
        ) from None
    except OSError as exc:
        raise RemoteConfigError(f"{where} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RemoteConfigError(f"{where} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise RemoteConfigError(
                f"{where} has mode {mode:04o}: group or others may read or change it; "
                f"run: chmod 600 {path}"
            )
        if info.st_uid not in (os.geteuid(), 0):
            raise RemoteConfigError(
                f"{where} belongs to uid {info.st_uid}; it must belong to the appliance's user "
                f"(uid {os.geteuid()}) or root"
            )
        raw = b""
        while len(raw) <= MAX_KEY_FILE_BYTES and (piece := os.read(fd, MAX_KEY_FILE_BYTES + 1)):
            raw += piece
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise RemoteConfigError(
            f"{where} is over {MAX_KEY_FILE_BYTES} bytes; it must hold only the key"
        )
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteConfigError(
            f"{where} holds non-ASCII bytes; it must hold only the key, on one line"
        ) from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    _check_key(text, where)
    return text
