"""Pulling a model: a GGUF file over HTTP(S) into the models dir, checked before it counts.

The file comes into a hidden temp file in the models dir (`.<name>.gguf.pull-<url hash>`,
never listed), hashed as it comes. A download that is cut off is resumed with a Range
request (`If-Range` the validator the server gave, so a file that changed meanwhile starts
over), a few times in one pull and, failing that, by the next pull of the same URL and
name. What arrives is written and hashed on threads of their own while the next buffer is
received (appliance.llm.pull_sink). A response that does not begin with the GGUF magic is
refused at once; a complete file goes through the bounded header check
(appliance.llm.gguf_header), its SHA-256 is compared with the one given, and only then is
it renamed into place and recorded in the manifest (with its SHA-256 and URL). Anything
refused is deleted.

Outbound policy, as for the remote LLM: loopback is always allowed (a local mirror, the
tests); another host only over https:// and only when APPLIANCE_PULL_HOSTS names it (every
redirect is checked the same way). Everything here is blocking: the daemon runs it in a
thread, the CLI directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urljoin, urlsplit

from appliance.llm.gguf_header import GGUF_MAGIC
from appliance.llm.manifest import FILE_MODE, ModelRecord, RegistryError
from appliance.llm.pull_sink import Sink
from appliance.llm.registry import (
    NOT_GGUF,
    SUFFIX,
    ImportRefused,
    ModelExists,
    ModelRegistry,
    validate_model_name,
)
from appliance.outbound import loopback

LOGGER = logging.getLogger("appliance.llm")

CHUNK_BYTES: Final = 1024 * 1024
USER_AGENT: Final = "appliance-models-pull"
MAX_REDIRECTS: Final = 10
# Connections cut in one pull before it gives up (the next pull resumes).
MAX_ATTEMPTS: Final = 5
RETRY_PAUSE_SECONDS: Final = 1.0
# Seconds a connection may take to open, and the body to send its next bytes.
NETWORK_TIMEOUT: Final = 60.0
PULL_PREFIX: Final = ".pull-"
HOSTS_SETTING: Final = "APPLIANCE_PULL_HOSTS"
MAX_BYTES_SETTING: Final = "APPLIANCE_PULL_MAX_BYTES"
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE: Final = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_SHA256: Final = re.compile(r"[0-9a-f]{64}")

Progress = Callable[[int, int], None]


class PullError(RegistryError):
    """The pull failed (network, server); the message says what to do. A partial file may
    be kept for the next pull to resume."""


class PullRefused(PullError):
    """The request or the file is refused (policy, name, size, checksum, not a model)."""


class PullCancelled(PullError):
    """The pull was stopped (the daemon is stopping); the next pull resumes it."""


class _Again(Exception):
    """This attempt cannot go on (the server's answer does not fit the file); try again."""


def shown_url(url: str) -> str:
    """The URL without query, fragment or credentials (signed URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<an invalid URL>"
    text = f"{parts.scheme}://{host}{port}{parts.path}"
    return text if len(text) <= 200 else text[:197] + "..."


def check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _SHA256.fullmatch(value):
        raise PullRefused("sha256 must be 64 hexadecimal digits (what sha256sum prints)")
    return value


def check_url(url: str, allowed_hosts: tuple[str, ...]) -> None:
    """Refuse what the outbound policy does not allow (PullRefused says how to allow it)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # a bad port raises ValueError
    except ValueError:
        host = None
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise PullRefused(
            f"{shown_url(url)!s} is not an http:// or https:// URL of a file; give the file's "
            "download URL (for Hugging Face: https://huggingface.co/OWNER/REPO/resolve/main/FILE.gguf)"
        )
    if parts.username or parts.password:
        raise PullRefused("the URL carries a user name or password; give a URL without them")
    if loopback(host):
        return
    if not _allowed(host.lower().rstrip("."), allowed_hosts):
        raise PullRefused(
            f"downloads from {host[:100]} are refused: off this box a pull may only reach the "
            f"hosts the operator allows in {HOSTS_SETTING} (e.g. {HOSTS_SETTING}="
            "huggingface.co,*.hf.co for Hugging Face, whose downloads redirect to *.hf.co)"
        )
    if parts.scheme != "https":
        raise PullRefused(
            f"plain http:// to {host[:100]} is refused: off this box a model is pulled over "
            "https:// only"
        )


def _allowed(host: str, allowed_hosts: tuple[str, ...]) -> bool:
    for pattern in allowed_hosts:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


def name_from_url(url: str) -> str:
    """The model name a URL's file gives (`.../SmolLM2-Q4_1.gguf` -> `SmolLM2-Q4_1`)."""
    file = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not file.endswith(SUFFIX) or file == SUFFIX:
        raise PullRefused(
            "the URL does not end in a .gguf file name; name the model with --name (or "
            '"name" in the request)'
        )
    return validate_model_name(file[: -len(SUFFIX)])


class _Part:
    """The temp file of one pull (name and URL), locked while a pull uses it, and the
    validator that lets a later pull resume it."""

    def __init__(self, models_dir: Path, name: str, url: str) -> None:
        tag = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
        self.path = models_dir / f".{name}{SUFFIX}{PULL_PREFIX}{tag}"
        self.meta = self.path.with_name(self.path.name + ".json")
        self.url = url
        self.fd = -1

    def open(self) -> None:
        # O_APPEND: every write goes to the end, also after the file is truncated to start over.
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, FILE_MODE)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise PullRefused(
                "this model is being pulled from this URL already; wait for that pull"
            ) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def validator(self) -> str | None:
        """The ETag or Last-Modified of the partial file, when it is from this URL."""
        try:
            saved = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("url") != self.url:
            return None
        value = saved.get("validator")
        return value if isinstance(value, str) else None

    def remember(self, validator: str | None) -> None:
        self.meta.write_text(json.dumps({"url": self.url, "validator": validator}))

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        with contextlib.suppress(FileNotFoundError):
            self.meta.unlink()

    def digest_so_far(self) -> hashlib._Hash:
        digest = hashlib.sha256()
        offset = 0
        while chunk := os.pread(self.fd, CHUNK_BYTES, offset):
            digest.update(chunk)
            offset += len(chunk)
        return digest

    def delete(self) -> None:
        for path in (self.path, self.meta):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class Puller:
    """Pulls into one registry's models dir under the box's outbound policy."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        allowed_hosts: tuple[str, ...],
        max_bytes: int,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.registry = registry
        self.allowed_hosts = allowed_hosts
        self.max_bytes = max_bytes
        self.progress = progress
        self.cancelled = cancelled or (lambda: False)
        # Figures of the last pull: bytes taken from a partial file, connections made.
        self.resumed_from = 0
        self.attempts = 0
        self._digest = hashlib.sha256()

    def prepare(self, url: str, name: str | None, sha256: str | None) -> tuple[str, str | None]:
        """Check what can be checked before any connection: the URL and policy, the name
        (free), the SHA-256's form. The name and the normalised SHA-256."""
        check_url(url, self.allowed_hosts)
        model = validate_model_name(name) if name is not None else name_from_url(url)
        if self.registry.exists(model):
            raise ModelExists(
                f"model {model!r} is already installed; remove it first with: "
                f"appliance models remove {model}, or pull it under another --name"
            )
        return model, check_sha256(sha256)

    def pull(self, url: str, *, name: str | None = None, sha256: str | None = None) -> ModelRecord:
        """Download, check and register; the record as the manifest now holds it."""
        model, expected = self.prepare(url, name, sha256)
        models_dir = self.registry.models_dir
        models_dir.mkdir(parents=True, exist_ok=True)
        part = _Part(models_dir, model, url)
        part.open()
        try:
            try:
                self._download(part)
            except BaseException:
                if part.size() == 0:
                    part.delete()  # nothing to resume from
                raise
            os.fsync(part.fd)
            actual = self._digest.hexdigest()
            if expected is not None and actual != expected:
                part.delete()
                raise PullRefused(
                    f"the file from {shown_url(url)} has sha256 {actual}, not the {expected} "
                    "given: it was deleted (check the URL and the checksum)"
                )
            try:
                record = self.registry.install_download(part.path, model, actual, shown_url(url))
            except ImportRefused as exc:
                part.delete()
                raise PullRefused(f"{exc}; the download was deleted") from None
            except ModelExists:
                part.delete()
                raise
            with contextlib.suppress(FileNotFoundError):
                part.meta.unlink()
            return record
        finally:
            part.close()

    def _download(self, part: _Part) -> None:
        """The whole file into `part`, resuming after cuts, hashed into `_digest`."""
        self.resumed_from = part.size()
        self.attempts = 0
        if self.resumed_from and part.validator() is None:
            part.restart()  # not this URL's, or from a server that gave no validator
            self.resumed_from = 0
        self._digest = part.digest_so_far()
        cut = ""
        while self.attempts < MAX_ATTEMPTS:
            self.attempts += 1
            try:
                if self._attempt(part):
                    return
                cut = "the server ended the body early"
            except (OSError, http.client.HTTPException) as exc:
                cut = type(exc).__name__
            except _Again as exc:
                cut = str(exc)
            LOGGER.warning(
                "pull of %s cut off at %d bytes (%s); resuming",
                shown_url(part.url),
                part.size(),
                cut,
            )
            time.sleep(RETRY_PAUSE_SECONDS)
        raise PullError(
            f"the download from {shown_url(part.url)} was cut off {self.attempts} times ({cut}); "
            f"{part.size() // (1024 * 1024)} MB are kept: run the same pull again to resume"
        )

    def _attempt(self, part: _Part) -> bool:
        """One request from where the file stands; True when the file is complete."""
        offset = part.size()
        if offset == 0:
            self._digest = hashlib.sha256()
        headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        validator = part.validator()
        if offset and validator is not None:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
        with self._open(part.url, headers) as response:
            total = self._expect(response, part, offset)
            done = part.size()
            if done == 0:
                self._digest = hashlib.sha256()  # the server sent the whole file: start over
            part.remember(response.getheader("ETag") or response.getheader("Last-Modified"))
            self._report(done, total)
            sink = Sink(part.fd, self._digest)
            try:
                done = self._receive(response, part, sink, done, total)
            finally:
                self._digest = sink.finish()
            sink.check()
        return total is None or done == total

    def _receive(
        self,
        response: http.client.HTTPResponse,
        part: _Part,
        sink: Sink,
        done: int,
        total: int | None,
    ) -> int:
        """The body into `sink` (the file and the digest); the file's size when it ends."""
        magic = len(GGUF_MAGIC)
        while True:
            buffer = sink.buffer()
            count = response.readinto(buffer)
            if not count:
                sink.give_back(buffer)
                return done
            head = buffer[: min(count, magic - done)] if done < magic else b""
            if head and not GGUF_MAGIC[done:].startswith(head):
                part.delete()
                raise PullRefused(f"cannot pull {shown_url(part.url)}: {NOT_GGUF}")
            done += count
            if done > self.max_bytes:
                part.delete()
                raise PullRefused(self._too_big(done))
            sink.add(buffer, count)
            self._report(done, total)
            if self.cancelled():
                raise PullCancelled("the pull was stopped; the next pull resumes it")

    @contextlib.contextmanager
    def _open(self, url: str, headers: dict[str, str]) -> Iterator[http.client.HTTPResponse]:
        """GET `url`, following redirects that the policy allows."""
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url, self.allowed_hosts)
            parts = urlsplit(url)
            connection = _connection(parts.scheme, parts.hostname or "", parts.port)
            try:
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                connection.request("GET", target, headers=headers)
                response = connection.getresponse()
                if response.status not in _REDIRECTS:
                    yield response
                    return
                location = response.getheader("Location")
            finally:
                connection.close()
            if not location:
                raise PullError(f"{shown_url(url)} redirects without a Location header")
            url = urljoin(url, location)
        raise PullError(f"{shown_url(url)} redirects more than {MAX_REDIRECTS} times")

    def _expect(self, response: http.client.HTTPResponse, part: _Part, offset: int) -> int | None:
        """Check the answer and place the file: its total size when the server says it."""
        status = response.status
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range") or "")
            if match is None or int(match[1]) != offset:
                part.restart()
                raise _Again("a partial answer for another range")
            total = None if match[3] == "*" else int(match[3])
        elif status == 200:
            if offset:
                LOGGER.info("pull of %s starts over: the server sent the whole file", part.url)
                part.restart()
            length = response.getheader("Content-Length")
            total = int(length) if length and length.isdigit() else None
        elif status == 416 and offset:
            part.restart()  # our part is longer than the file now is: start over
            raise _Again("the range is past the end of the file")
        elif status == 404:
            raise PullError(f"{shown_url(part.url)} is not there (HTTP 404); check the URL")
        elif status in (401, 403):
            raise PullError(
                f"{shown_url(part.url)} refuses the download (HTTP {status}); a gated or private "
                "file cannot be pulled: download it elsewhere and use appliance models import"
            )
        else:
            raise PullError(f"{shown_url(part.url)} answered HTTP {status}; try again later")
        if total is not None:
            if total > self.max_bytes:
                part.delete()
                raise PullRefused(self._too_big(total))
            free = shutil.disk_usage(part.path.parent).free
            if total - part.size() > free:
                raise PullRefused(
                    f"not enough disk space: the file is {total // (1024 * 1024)} MB and "
                    f"{free // (1024 * 1024)} MB are free in the models directory"
                )
        return total

    def _too_big(self, size: int) -> str:
        return (
            f"the file is over {size // (1024 * 1024)} MB; the most a pull takes is "
            f"{self.max_bytes // (1024 * 1024)} MB ({MAX_BYTES_SETTING}); it was deleted"
        )

    def _report(self, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(done, total if total is not None else done)


def _connection(scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
    """A connection of the standard library's client: a body is read straight into the
    sink's buffers (no per-chunk objects). No proxy or credentials from the environment
    apply (like the remote LLM's client)."""
    if scheme == "https":
        return http.client.HTTPSConnection(
            host, port, timeout=NETWORK_TIMEOUT, context=ssl.create_default_context()
        )
    return http.client.HTTPConnection(host, port, timeout=NETWORK_TIMEOUT)
