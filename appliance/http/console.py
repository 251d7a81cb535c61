"""The web console: the chat page at `/` and the operator page at `/operator`.

The pages are static files inside the package (so inside the binary and the .deb); every
figure they show comes from the API, called by the browser with the key the person pasted.
Assets are served under content-hashed names, cached for a year and gzip'd once at start;
the two pages are small and never cached, so an update shows at the next load.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from typing import Final

from quart import Blueprint, Quart, Response, request

from appliance.http.errors import ApiError

PAGES: Final = {"/": "chat.html", "/operator": "operator.html"}
ASSET_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Served with every console response: the pages run only their own files, talk only to
# this origin, cannot be framed, and send no referrer.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
IMMUTABLE: Final = "public, max-age=31536000, immutable"
# `{{ asset name }}` in a page becomes the asset's hashed URL.
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: str


@dataclass(frozen=True)
class Console:
    """The console's files, read and prepared once."""

    pages: dict[str, Asset]
    assets: dict[str, Asset]  # by hashed name

    @classmethod
    def load(cls) -> Console:
        folder = importlib.resources.files("appliance.console").joinpath("assets")
        urls: dict[str, str] = {}
        assets: dict[str, Asset] = {}
        page_texts: dict[str, str] = {}
        for entry in sorted(folder.iterdir(), key=lambda item: item.name):
            name = entry.name
            if name.endswith(".html"):
                page_texts[name] = entry.read_text(encoding="utf-8")
                continue
            suffix = name[name.rfind(".") :]
            if suffix not in ASSET_TYPES:
                continue
            body = entry.read_bytes()
            digest = hashlib.sha256(body).hexdigest()[:12]
            hashed = f"{name[: -len(suffix)]}.{digest}{suffix}"
            urls[name] = f"/assets/{hashed}"
            assets[hashed] = _prepared(body, ASSET_TYPES[suffix])

        def link(match: re.Match[str]) -> str:
            # A page naming a file that is not there is a packaging bug: fail at start.
            return urls[match[1]]

        pages = {
            name: _prepared(_PLACEHOLDER.sub(link, text).encode(), "text/html; charset=utf-8")
            for name, text in page_texts.items()
        }
        return cls(pages=pages, assets=assets)

    def size(self) -> int:
        """Bytes sent for every file once, compressed (what a first visit costs at most)."""
        return sum(len(item.gzipped) for item in (*self.pages.values(), *self.assets.values()))


def _prepared(body: bytes, content_type: str) -> Asset:
    # mtime=0: the same file gives the same bytes at every start.
    return Asset(body, gzip.compress(body, compresslevel=9, mtime=0), content_type)


def _send(asset: Asset, cache: str) -> Response:
    accepts_gzip = "gzip" in request.headers.get("Accept-Encoding", "").lower()
    body = asset.gzipped if accepts_gzip else asset.body
    response = Response(body, content_type=asset.content_type)
    response.headers["Cache-Control"] = cache
    response.headers["Vary"] = "Accept-Encoding"
    if accepts_gzip:
        response.headers["Content-Encoding"] = "gzip"
    return response


def console_blueprint(console: Console) -> Blueprint:
    blueprint = Blueprint("console", __name__)

    def page(name: str) -> Response:
        return _send(console.pages[name], "no-cache")

    @blueprint.get("/")
    async def chat_page() -> Response:
        return page(PAGES["/"])

    @blueprint.get("/operator")
    async def operator_page() -> Response:
        return page(PAGES["/operator"])

    @blueprint.get("/assets/<name>")
    async def asset(name: str) -> Response:
        found = console.assets.get(name)
        if found is None:
            raise ApiError(404, "not_found", "no such console file; reload the page")
        return _send(found, IMMUTABLE)

    @blueprint.after_request
    async def secure(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    return blueprint


def console_off_blueprint() -> Blueprint:
    """With APPLIANCE_CONSOLE=false the console's addresses answer 404 saying so."""
    blueprint = Blueprint("console", __name__)

    @blueprint.get("/")
    @blueprint.get("/operator")
    @blueprint.get("/assets/<name>")
    async def turned_off(name: str = "") -> Response:
        raise ApiError(
            404, "console_off", "the web console is turned off on this box (APPLIANCE_CONSOLE)"
        )

    return blueprint


def install_console(app: Quart, enabled: bool) -> None:
    """Serve the console on `app`, or answer its addresses with 404 when it is off."""
    app.register_blueprint(
        console_blueprint(Console.load()) if enabled else console_off_blueprint()
    )
