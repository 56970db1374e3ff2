"""The outbound-endpoint guard: a host a tenant names (an SMTP server; later an HTTP provider or a
webhook) is reached only at public internet addresses, unless the operator allows private networks
(`CRIER_ALLOW_PRIVATE_NETWORKS`, on in `crier dev` and the tests).

Without it a tenant could point a provider at `169.254.169.254`, `10.x`, `localhost` or the NATS
port and use Crier to reach inside the installation's network.

- `connect()` is the wall: it resolves the name once, refuses it if *any* address is not public,
  and connects to an address it checked, never resolving the name again: a DNS answer that changes
  between the check and the connect (DNS rebinding) cannot reach inside. TLS is then verified
  against the host *name* by the caller.
- `refusal_at_save()` is a convenience for the API when a host is saved: a literal private address
  or `localhost` is refused at once, a name is resolved (briefly) and refused if it resolves
  privately; a name that does not resolve now is accepted, the connect decides later.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Any, NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: an IPv4 address in the low 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215): inside some network
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible IPv6 addresses

SAVE_RESOLVE_TIMEOUT_S = 2.0


class PrivateAddressRefused(Exception):
    """The host is, or resolves to, an address outside the public internet, and private networks
    are not allowed. `str()` names the host and what its address is, never the address of a name."""

    def __init__(self, host: str, address: IPAddress | None, why: str) -> None:
        self.host, self.address, self.why = host, address, why
        verb = "is" if address is None or parse_address(host) is not None else "resolves to"
        super().__init__(f"{host} {verb} {_article(why)} address, and private networks are not allowed")


class Resolved(NamedTuple):
    """One checked address of a host, ready for `socket.connect`."""

    address: IPAddress
    family: int
    sockaddr: Any  # (host, port) or (host, port, flowinfo, scope_id)


def _article(why: str) -> str:
    return f"{'an' if why[0] in 'aeiou' else 'a'} {why}"


def parse_address(host: str) -> IPAddress | None:
    """The IP address `host` spells (IPv6 with or without brackets), or None for a name.

    Only the standard forms: `127.1` or `2130706433` are names here, and `resolve` turns them
    into the address the system resolver makes of them (which is then checked)."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_local_name(host: str) -> bool:
    """`localhost` and names under it (RFC 6761), which resolvers may answer without DNS."""
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def why_not_public(address: IPAddress) -> str | None:
    """None for an address on the public internet; otherwise what it is ("loopback", "private" ...).

    IPv6 forms that carry an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged by that address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_unspecified:
            return "unspecified"
        if address.is_loopback:
            return "loopback"
        if address.ipv4_mapped is not None:
            return why_not_public(address.ipv4_mapped)
        if address in _NAT64:
            return why_not_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address in _IPV4_COMPATIBLE or address in _NAT64_LOCAL:
            return "reserved"
        if address.sixtofour is not None and (why := why_not_public(address.sixtofour)):
            return why
        if address.is_site_local:
            return "site-local"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("shared (carrier-grade NAT)", address in _SHARED_ADDRESS_SPACE),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("non-global", not address.is_global),
    )
    for why, hit in checks:
        if hit:
            return why
    return None


async def resolve(host: str, port: int, *, allow_private: bool, timeout: float) -> list[Resolved]:
    """The addresses to connect to for `host`, each checked: raises PrivateAddressRefused if any is
    not public (unless `allow_private`), OSError if the name does not resolve, TimeoutError if the
    resolver takes longer than `timeout`."""
    literal = parse_address(host)
    if literal is not None:
        if not allow_private and (why := why_not_public(literal)):
            raise PrivateAddressRefused(host, literal, why)
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        sockaddr = (str(literal), port, 0, 0) if literal.version == 6 else (str(literal), port)
        return [Resolved(literal, family, sockaddr)]
    if not allow_private and is_local_name(host):
        raise PrivateAddressRefused(host, None, "loopback")
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout
    )
    resolved: list[Resolved] = []
    seen: set[IPAddress] = set()
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not allow_private and (why := why_not_public(address)):
            raise PrivateAddressRefused(host, address, why)
        if address not in seen:
            seen.add(address)
            resolved.append(Resolved(address, family, sockaddr))
    if not resolved:
        raise OSError(f"{host} has no IPv4 or IPv6 address")
    return resolved


async def connect(host: str, port: int, *, allow_private: bool, timeout: float) -> socket.socket:
    """A connected, non-blocking TCP socket to a checked address of `host` (tried in the resolver's
    order), all within `timeout`. Raises PrivateAddressRefused, TimeoutError or OSError."""
    deadline = time.monotonic() + timeout
    addresses = await resolve(host, port, allow_private=allow_private, timeout=timeout)
    loop = asyncio.get_running_loop()
    error: OSError | None = None
    for candidate in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"connecting to {host} port {port} timed out")
        sock = socket.socket(candidate.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, candidate.sockaddr), remaining)
            return sock
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    assert error is not None
    raise error


async def refusal_at_save(host: str, *, timeout: float = SAVE_RESOLVE_TIMEOUT_S) -> str | None:
    """Why `host` may not be saved while private networks are not allowed, or None.

    A literal address or `localhost` is judged as is; a name is resolved within `timeout`, and one
    that does not resolve (or not in time) is accepted: the check at connect time is the wall."""
    try:
        await resolve(host, 0, allow_private=False, timeout=timeout)
    except PrivateAddressRefused as exc:
        return str(exc)
    except (OSError, TimeoutError, UnicodeError):
        return None
    return None
