"""The HTTPS certificate and key (APPLIANCE_TLS_CERT, APPLIANCE_TLS_KEY), checked before
the daemon starts: both or neither, readable, a matching PEM pair, a key with no
passphrase (the daemon starts unattended), and in production a key no other user may read.
Each problem is one line that says the fix; none shows a file's contents."""

from __future__ import annotations

import os
import ssl
import stat
from typing import Final

CERT_SETTING: Final = "APPLIANCE_TLS_CERT"
KEY_SETTING: Final = "APPLIANCE_TLS_KEY"


class _Passphrase(Exception):
    """OpenSSL asked for a passphrase: the key is encrypted."""


def _ask_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and hang an unattended start.
    raise _Passphrase


def tls_problems(cert: str, key: str, env: str) -> list[str]:
    """Why these files cannot serve HTTPS, one line each (empty: fine, or TLS is off)."""
    if not cert and not key:
        return []
    if not cert or not key:
        missing, present = (CERT_SETTING, KEY_SETTING) if not cert else (KEY_SETTING, CERT_SETTING)
        return [
            f"{present} is set but {missing} is not; HTTPS needs both (the PEM certificate "
            "chain and its private key), or neither for plain HTTP"
        ]
    problems = [
        line
        for line in (_file_problem(CERT_SETTING, cert), _file_problem(KEY_SETTING, key))
        if line
    ]
    if problems:
        return problems
    if env == "production":
        mode = stat.S_IMODE(os.stat(key).st_mode)
        if mode & 0o007:
            problems.append(
                f"{KEY_SETTING} ({key}) has mode {mode:04o}: every user of this machine may "
                f"read the private key; production needs it closed to others (run: chmod 600 "
                f"{key})"
            )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=_ask_passphrase)
    except _Passphrase:
        problems.append(
            f"{KEY_SETTING} ({key}) is encrypted with a passphrase, which an unattended start "
            f"cannot give; store it without one (openssl pkey -in {key} -out NEW.key) and "
            "keep that file mode 0600"
        )
    except ssl.SSLError as exc:
        reason = (exc.reason or "not PEM").lower().replace("_", " ")
        problems.append(
            f"{CERT_SETTING} and {KEY_SETTING} do not load as a PEM certificate chain and its "
            f"private key ({reason}); check that the key belongs to the certificate and that "
            "both are PEM text"
        )
    return problems


def _file_problem(setting: str, path: str) -> str | None:
    where = f"{setting} ({path})"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{where} does not exist; give the path of the PEM file"
    except PermissionError:
        return (
            f"{where} cannot be read by this process (uid {os.geteuid()}); make it readable by "
            "the appliance's user (the key with mode 0600)"
        )
    except OSError as exc:
        return f"{where} cannot be opened: {exc.strerror}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return f"{where} is not a regular file"
    finally:
        os.close(fd)
    return None
