"""Structured logs: JSON lines on stdout, native journald entries when journald is there.

A record's context (request id, endpoint, duration, status) comes from `extra=` or from the
request context variable, so every line logged while serving a request carries its id.
Known secret values are scrubbed from every line before it leaves the process.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Any, Final, TextIO

import msgspec

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
# Context fields: JSON key -> journal field name.
CONTEXT_FIELDS: Final = {
    "request_id": "REQUEST_ID",
    "endpoint": "ENDPOINT",
    "duration_ms": "DURATION_MS",
    "status": "STATUS",
    "method": "METHOD",
    "service": "SERVICE",
    "client": "CLIENT",
}
# syslog priorities, as journald's PRIORITY= field expects them.
_PRIORITY: Final = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
# One datagram must stay below the socket's limit; longer messages are cut.
_MAX_MESSAGE_BYTES: Final = 48 * 1024

request_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "appliance_request_context", default=None
)
_ENCODER = msgspec.json.Encoder()


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = dict(request_context.get() or {})
    for key in CONTEXT_FIELDS:
        if key in record.__dict__:
            fields[key] = record.__dict__[key]
    return fields


class SecretScrubber(logging.Filter):
    """Replaces known secret values in a record's final text; never drops a record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Short values would blank out ordinary words; real secrets are long.
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[SECRET]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = self.scrub(record.getMessage())
            record.msg, record.args = message, None
            if record.exc_info:
                record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    """The guide's shape: timestamp, level, logger, message, request_id, endpoint, ..."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        entry: dict[str, Any] = {
            "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return _ENCODER.encode(entry).decode()


class JournalHandler(logging.Handler):
    """Sends records to journald over its native protocol, context as journal fields."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "appliance") -> None:
        super().__init__()
        self._path = path
        self._identifier = identifier
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            elif record.exc_text:
                message += "\n" + record.exc_text
            fields = {
                "MESSAGE": message.encode("utf-8", "replace")[:_MAX_MESSAGE_BYTES],
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)).encode(),
                "SYSLOG_IDENTIFIER": self._identifier.encode(),
                "LOGGER": record.name.encode(),
                "LEVEL": record.levelname.encode(),
                "CODE_FILE": record.pathname.encode(),
                "CODE_LINE": str(record.lineno).encode(),
                "CODE_FUNC": record.funcName.encode(),
            }
            for key, value in _fields(record).items():
                if key in CONTEXT_FIELDS and value is not None:
                    fields[CONTEXT_FIELDS[key]] = str(value).encode("utf-8", "replace")
            self._socket.sendto(encode_journal_fields(fields), self._path)
        except OSError:
            # journald gone or its buffer full: the record still went to stdout if wanted.
            pass
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._socket.close()
        super().close()


def encode_journal_fields(fields: dict[str, bytes]) -> bytes:
    """The native protocol: `KEY=value\\n`, or `KEY\\n<le64 size><value>\\n` for binary."""
    parts = []
    for key, value in fields.items():
        if b"\n" in value:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n")
        else:
            parts.append(key.encode() + b"=" + value + b"\n")
    return b"".join(parts)


def stdout_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode when stdout is connected to journald."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stdout.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def configure_logging(
    level: str,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """JSON lines on stdout, and journald's native protocol when journald is present.

    Under systemd with stdout going to the journal, only the native protocol is used (so
    each entry is there once, with its fields). Elsewhere, when a journald socket exists,
    entries go to both.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    scrubber = SecretScrubber(secrets)
    handlers: list[logging.Handler] = []
    under_journal = stdout_is_journal()
    if under_journal or os.path.exists(journal_socket):
        handlers.append(JournalHandler(journal_socket))
    if not under_journal:
        out = logging.StreamHandler(stream or sys.stdout)
        out.setFormatter(JsonFormatter())
        handlers.append(out)
    for handler in handlers:
        handler.addFilter(scrubber)
        root.addHandler(handler)
    # Hypercorn's own access log is replaced by ours (one line per request, with its id).
    logging.getLogger("hypercorn.access").disabled = True
    # The HTTP self-probe's client would log every probe.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.captureWarnings(True)
