"""Shared HTTP plumbing for providers that speak HTTP: httpx clients that pass Crier's outbound
address check on every connection, kept per account across jobs.

A provider is built per job, but an HTTPS handshake per job (or per message) would cost more than
the request itself, so clients live here, keyed by whatever makes an account distinct (the caller
hashes secrets into the key), one cache per event loop: an httpx pool's connections belong to the
loop that opened them.
"""
from __future__ import annotations

import asyncio
import contextvars
import time
import typing
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import httpcore
import httpx

from shared.platform import netguard

MAX_CLIENTS = 64  # idle accounts kept per loop; the least recently used idle one is closed first
KEEPALIVE_EXPIRY_S = 20.0  # under the usual 60 s idle timeout of load balancers: a pooled connection
# the server already closed would fail a POST in a way that leaves its outcome unknown


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, except that a name is resolved once by netguard, refused if any
    address is not public, and the connection goes to a checked address literal (so a DNS answer
    that changes between check and connect cannot reach inside). TLS still uses the URL's host name:
    httpcore takes SNI and the certificate check from the request's origin, not from this socket."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.AsyncNetworkStream:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            addresses = await netguard.resolve(host, port, allow_private=self.allow_private,
                                               timeout=timeout if timeout is not None else 30.0)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        error: Exception | None = None
        for candidate in addresses:  # in the resolver's order, like netguard.connect
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise httpcore.ConnectTimeout(f"connecting to {host} port {port} timed out")
            try:
                return await self._inner.connect_tcp(str(candidate.sockaddr[0]), port, timeout=remaining,
                                                     local_address=local_address, socket_options=socket_options)
            except httpcore.ConnectTimeout:
                raise
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not an outbound endpoint")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_transport(*, allow_private: bool, max_connections: int) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every new connection goes through GuardedBackend.

    httpx does not take a network backend, so the transport's pool is replaced by an httpcore pool
    built the same way with ours (httpx maps httpcore's exceptions on the way out as usual)."""
    transport = httpx.AsyncHTTPTransport()
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool):  # an httpx that changed its insides
        raise RuntimeError("httpx.AsyncHTTPTransport has no httpcore pool to guard")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),  # verified; SSL_CERT_FILE/DIR honoured as httpx does
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
        network_backend=GuardedBackend(allow_private=allow_private),
    )
    return transport


def shared_client(*, concurrency: int, allow_private: bool, **options: typing.Any) -> SharedClient:
    """A new account client: `concurrency` connections at most, each through the address check, and
    as many requests in flight; `options` are httpx.AsyncClient's (headers, auth ...)."""
    client = httpx.AsyncClient(
        transport=guarded_transport(allow_private=allow_private, max_connections=concurrency),
        trust_env=False,  # a proxy from the environment would connect around the address check
        **options,
    )
    return SharedClient(client=client, in_flight=asyncio.Semaphore(concurrency))


@dataclass(eq=False)
class SharedClient:
    """One account's client, shared by the jobs of this process that send through it: its
    connections, the bound on requests in flight, and a pause every job honours (the provider asked
    the whole account to slow down)."""

    client: httpx.AsyncClient
    in_flight: asyncio.Semaphore
    resume_at: float = 0.0  # loop time before which no request starts
    users: int = 0  # providers holding it: only an unused client is evicted

    def pause(self, seconds: float) -> None:
        self.resume_at = max(self.resume_at, asyncio.get_running_loop().time() + seconds)
        if (listener := pause_listener.get()) is not None:  # the other senders should slow down too
            listener(seconds)

    async def wait_if_paused(self) -> None:
        loop = asyncio.get_running_loop()
        while (wait := self.resume_at - loop.time()) > 0:  # a later pause may extend it while asleep
            await asyncio.sleep(wait)


# Told of every pause of an account (its provider answered 429) by the job whose send met it: the
# worker sets it per job, to share the pause with every sender through the account's rate limiter
# (shared/channels/ratelimit.py). A context variable, so providers need not know of it.
pause_listener: contextvars.ContextVar[Callable[[float], None] | None] = contextvars.ContextVar(
    "pause_listener", default=None)

_closing: set[asyncio.Task[None]] = set()  # evicted clients closing in the background (held: not collected)
_caches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, OrderedDict[Hashable, SharedClient]] = (
    weakref.WeakKeyDictionary()
)


def acquire(key: Hashable, make: Callable[[], SharedClient]) -> SharedClient:
    """The loop's client for `key` (made with `make` the first time), held until `release`."""
    cache = _caches.setdefault(asyncio.get_running_loop(), OrderedDict())
    shared = cache.get(key)
    if shared is None or shared.client.is_closed:
        shared = cache[key] = make()
    cache.move_to_end(key)
    shared.users += 1
    _evict(cache)
    return shared


def release(shared: SharedClient) -> None:
    shared.users = max(0, shared.users - 1)
    cache = _caches.get(asyncio.get_running_loop())
    if cache is not None:
        _evict(cache)


def _evict(cache: OrderedDict[Hashable, SharedClient]) -> None:
    # Closing only idle clients: one a job still uses would fail its requests. With every client in
    # use the cache stays over its bound until they are released.
    for key in [k for k, s in cache.items() if s.users == 0][: max(0, len(cache) - MAX_CLIENTS)]:
        task = asyncio.get_running_loop().create_task(cache.pop(key).client.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


async def close_all() -> None:
    """Close this loop's clients (at shutdown, and between tests)."""
    cache = _caches.pop(asyncio.get_running_loop(), None) or {}
    for shared in cache.values():
        await shared.client.aclose()
