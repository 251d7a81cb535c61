"""The client's address behind trusted reverse proxies (APPLIANCE_TRUSTED_PROXIES).

Only when the direct peer is a trusted proxy is its forwarding header read, and then from
the right: each proxy appends the address it received the request from, so the right-most
address that is not itself a trusted proxy is the client; everything left of it was
written by that client and proves nothing. A header from any other peer is ignored.
Hypercorn's ProxyFixMiddleware trusts a fixed number of hops whoever connects, which would
let a client that reaches the port directly choose its own address.

Exactly one header is read (APPLIANCE_PROXY_HEADER): a proxy that writes X-Forwarded-For
passes a client's own `Forwarded` header through untouched, and the other way round.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal

from appliance.config import Network

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Where the scope keeps the direct peer's address when "client" becomes the one behind the
# proxies: what needs the connection itself (resetting a stalled stream's) looks there.
PEER: Final = "appliance.peer"
ProxyHeader = Literal["x-forwarded-for", "forwarded"]
# One `for=` parameter of a Forwarded element (RFC 7239): a token or a quoted string.
_FORWARDED_FOR: Final = re.compile(r'(?:^|;)\s*for\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.I)
# A Forwarded header split into elements at commas outside quoted strings.
_ELEMENT: Final = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')


def parse_hop(text: str) -> IpAddress | None:
    """An address from one hop: `192.0.2.7`, `192.0.2.7:4711`, `2001:db8::1`,
    `[2001:db8::1]:4711`; None for anything else (`unknown`, `_hidden`, junk)."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_hops(headers: Iterable[tuple[bytes, bytes]], header: ProxyHeader) -> list[str]:
    """The hops the header lists, left (farthest) to right (nearest), across repeated lines."""
    name = header.encode()
    hops: list[str] = []
    for raw_name, raw_value in headers:
        if raw_name.lower() != name:
            continue
        value = raw_value.decode("latin-1")
        if header == "x-forwarded-for":
            hops.extend(part.strip() for part in value.split(","))
            continue
        for element in _ELEMENT.findall(value):
            found = _FORWARDED_FOR.search(element)
            hops.append(found.group(1).replace('\\"', '"') if found else "")
    return hops


def trusted(address: IpAddress | None, networks: Sequence[Network]) -> bool:
    return address is not None and any(address in network for network in networks)


def client_address(peer: str, hops: Sequence[str], networks: Sequence[Network]) -> str:
    """Who sent the request: the peer itself unless it is a trusted proxy; then the
    right-most hop that is not a trusted proxy. A hop that is no address ends the walk at
    the last proxy seen (nothing further left can be believed)."""
    seen = parse_hop(peer)
    if not trusted(seen, networks):
        return peer
    assert seen is not None
    for hop in reversed(hops):
        address = parse_hop(hop)
        if address is None:
            break
        seen = address
        if not trusted(address, networks):
            break
    return str(seen)


class ClientAddress:
    """ASGI middleware: `scope["client"]` becomes the client behind trusted proxies, for
    everything that reads the request's address (failed-attempt limits, logs)."""

    def __init__(self, app: Any, networks: Sequence[Network], header: ProxyHeader) -> None:
        self.app = app
        self.networks = tuple(networks)
        self.header: ProxyHeader = header

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        client = scope.get("client")
        if self.networks and scope["type"] == "http" and client:
            hops = forwarded_hops(scope["headers"], self.header)
            address = client_address(str(client[0]), hops, self.networks)
            if address != client[0]:
                scope = {**scope, "client": (address, 0), PEER: client}
        await self.app(scope, receive, send)
