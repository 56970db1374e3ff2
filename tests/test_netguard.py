"""The outbound-endpoint guard: which addresses count as the public internet, names resolved and
checked, and connections only to checked addresses (real sockets on loopback)."""
from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from shared.platform import netguard

# address → what it is (None: public, allowed)
ADDRESSES = [
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("100.64.0.1", "shared (carrier-grade NAT)"),
    ("100.127.255.254", "shared (carrier-grade NAT)"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "private"),  # "this network"
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.10", "private"),  # documentation
    ("198.18.0.1", "private"),  # benchmarking
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("93.184.215.14", None),
    ("100.63.255.255", None),  # just below 100.64/10
    ("100.128.0.0", None),  # just above
    ("172.32.0.1", None),  # just outside 172.16/12
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456:789a::1", "private"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "private"),  # documentation
    ("2001::1", "private"),  # Teredo
    ("::10.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:100.64.0.1", "shared (carrier-grade NAT)"),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
    ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
    ("64:ff9b:1::a00:1", "reserved"),  # local-use NAT64
    ("2002:a00:1::1", "private"),  # 6to4 of 10.0.0.1
    ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:808:808::1", None),  # 6to4 of 8.8.8.8
    ("2606:4700:4700::1111", None),
    ("2a00:1450:4001:81d::200e", None),
]


@pytest.mark.parametrize(("address", "why"), ADDRESSES)
def test_what_an_address_is(address, why):
    assert netguard.why_not_public(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("[::1]", "::1"), ("[2001:db8::1]", "2001:db8::1"),
     ("mx.example.com", None), ("127.1", None), ("2130706433", None), ("localhost", None)],
)
def test_parse_address_takes_only_standard_literals(host, address):
    parsed = netguard.parse_address(host)
    assert (str(parsed) if parsed else None) == address


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "mail.localhost", "127.0.0.1", "[::1]", "10.0.0.1",
                                  "169.254.169.254", "::ffff:127.0.0.1",
                                  "127.1", "2130706433", "0x7f.0.0.1"])  # other spellings the resolver turns into 127.0.0.1
async def test_private_hosts_are_refused_unless_allowed(host):
    with pytest.raises(netguard.PrivateAddressRefused) as refused:
        await netguard.resolve(host, 25, allow_private=False, timeout=2.0)
    assert "private networks are not allowed" in str(refused.value)
    if host not in ("10.0.0.1", "169.254.169.254", "::ffff:127.0.0.1"):
        assert refused.value.why == "loopback"
    if netguard.parse_address(host) is None and host not in ("localhost", "LOCALHOST.", "mail.localhost"):
        assert "resolves to" in str(refused.value) and "127.0.0.1" not in str(refused.value)
    if host not in ("LOCALHOST.", "mail.localhost"):  # the system resolver may not know these
        allowed = await netguard.resolve(host, 25, allow_private=True, timeout=2.0)
        assert allowed and all(a.sockaddr[1] == 25 for a in allowed)


async def test_public_literals_are_allowed_without_dns():
    [v4] = await netguard.resolve("8.8.8.8", 587, allow_private=False, timeout=1.0)
    assert (v4.family, v4.sockaddr) == (socket.AF_INET, ("8.8.8.8", 587))
    [v6] = await netguard.resolve("[2606:4700:4700::1111]", 465, allow_private=False, timeout=1.0)
    assert v6.family == socket.AF_INET6 and v6.sockaddr[:2] == ("2606:4700:4700::1111", 465)


async def test_refusal_at_save():
    assert await netguard.refusal_at_save("169.254.169.254") == (
        "169.254.169.254 is a link-local address, and private networks are not allowed")
    assert await netguard.refusal_at_save("localhost") == (
        "localhost is a loopback address, and private networks are not allowed")
    assert await netguard.refusal_at_save("127.1") == (
        "127.1 resolves to a loopback address, and private networks are not allowed")
    assert await netguard.refusal_at_save("8.8.8.8") is None
    # A name that does not resolve now is accepted: the check at connect time decides.
    assert await netguard.refusal_at_save("smtp.does-not-exist.invalid") is None


class Listener:
    """A TCP listener on loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_connect_goes_only_to_a_checked_address():
    async with Listener() as listener:
        for host in ("127.0.0.1", "localhost", "127.1"):
            with pytest.raises(netguard.PrivateAddressRefused):
                await netguard.connect(host, listener.port, allow_private=False, timeout=2.0)
        await asyncio.sleep(0.05)
        assert listener.accepted == 0  # refused before any packet left

        sock = await netguard.connect("localhost", listener.port, allow_private=True, timeout=2.0)
        try:
            assert sock.getpeername()[1] == listener.port and not sock.getblocking()
        finally:
            sock.close()
        for _ in range(100):
            if listener.accepted:
                break
            await asyncio.sleep(0.01)
        assert listener.accepted == 1


async def test_connect_reports_a_closed_port_and_a_bad_name():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens once closed
    with pytest.raises(ConnectionRefusedError):
        await netguard.connect("127.0.0.1", port, allow_private=True, timeout=2.0)
    with pytest.raises(OSError):
        await netguard.connect("smtp.does-not-exist.invalid", 25, allow_private=False, timeout=2.0)
