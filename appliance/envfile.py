"""Reading and writing the appliance's env file (`KEY=VALUE` lines, as systemd reads them)."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Final

DEFAULT_ENV_FILE: Final = Path("/etc/appliance/appliance.env")

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LINE_END = re.compile(r"\r\n|\r|\n")


class EnvFileError(ValueError):
    """The env file cannot be read; the message names the file and line, never a value."""


def parse_env_file(path: Path) -> dict[str, str]:
    """Parse `KEY=VALUE` lines; `#` comments, blank lines, `export ` and quotes are allowed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EnvFileError(f"env file {path} does not exist") from None
    except PermissionError:
        raise EnvFileError(f"env file {path} is not readable by this user") from None
    except UnicodeDecodeError:
        raise EnvFileError(f"env file {path} is not UTF-8 text") from None
    except OSError as exc:  # a directory, an I/O error
        raise EnvFileError(f"env file {path} cannot be read ({exc.strerror})") from None
    values: dict[str, str] = {}
    # Lines end at \n, \r or \r\n, as systemd reads them; str.splitlines would also split
    # at \f, \x1c, \u2028 and others, which systemd keeps inside a value.
    for number, raw in enumerate(_LINE_END.split(text), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise EnvFileError(f"env file {path} line {number}: expected KEY=VALUE")
        values[key] = _unquote(value.strip(), path, number)
    return values


def _unquote(value: str, path: Path, number: int) -> str:
    if len(value) >= 1 and value[0] in "'\"":
        quote = value[0]
        inner = value[1:-1]
        # In double quotes a backslash escapes the next character: `"abc\"` ends in an
        # escaped quote, so its quote is still open (a typo that would put `\` in a secret).
        escaped_end = quote == '"' and (len(inner) - len(inner.rstrip("\\"))) % 2 == 1
        if len(value) < 2 or value[-1] != quote or escaped_end:
            raise EnvFileError(f"env file {path} line {number}: unterminated {quote} quote")
        if quote == '"':
            inner = re.sub(r"\\([\"\\$`])", r"\1", inner)
        return inner
    return value


def generate_env_file_text(production: bool = True) -> str:
    """A new env file with freshly generated secrets and the guide's safe defaults."""
    secret_key = secrets.token_urlsafe(48)
    privacy_salt = secrets.token_urlsafe(24)
    env = "production" if production else "development"
    return (
        "# appliance settings, read by every `appliance` command (the unit points\n"
        "# APPLIANCE_ENV_FILE here).\n"
        "# Keep this file 0600: it holds the keys that seal stored conversations.\n"
        f"APPLIANCE_ENV={env}\n"
        f"SECRET_KEY={secret_key}\n"
        f"PRIVACY_SALT={privacy_salt}\n"
        "# Comma-separated origins allowed to call the API from a browser (none by default).\n"
        "BACKEND_CORS_ORIGINS=\n"
        "PRIVACY_ENCRYPT_AT_REST=true\n"
        "PRIVACY_REDACT_AGGRESSIVENESS=strict\n"
        "PRIVACY_RETENTION_DAYS=7\n"
        "BUDGET_ENFORCE=true\n"
        "SEARCH_ENABLED=false\n"
        "REMOTE_LLM_ENABLED=false\n"
    )


def write_new_env_file(path: Path, text: str) -> None:
    """Create `path` with mode 0600; refuse to touch a file that already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
