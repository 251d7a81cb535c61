"""How commands on this box reach the daemon's own API: its base URL on loopback (https
when APPLIANCE_TLS_CERT is set) and how its certificate is checked."""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Final

from appliance.config import Settings

_FIRST_CERTIFICATE: Final = re.compile(
    r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def api_base(settings: Settings) -> str:
    """`http(s)://HOST:PORT` of APPLIANCE_BIND; a wildcard bind is reached on loopback."""
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls else "http"
    return f"{scheme}://{host}:{settings.port}"


def api_verify(settings: Settings) -> ssl.SSLContext | bool:
    """httpx's `verify` for the daemon's API. Over HTTPS exactly the configured certificate
    is trusted (the first one in APPLIANCE_TLS_CERT, not its issuers), without a name check:
    the command connects to a loopback address, which the certificate need not name."""
    if not settings.tls:
        return True
    try:
        found = _FIRST_CERTIFICATE.search(Path(settings.tls_cert).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError):
        found = None
    if found is None:
        return True  # unreadable here: the system's CAs decide, and say why if they refuse
    context = ssl.create_default_context(cadata=found.group(0))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context
