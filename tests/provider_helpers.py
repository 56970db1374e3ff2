"""What the HTTP providers' tests (tests/test_twilio.py, test_whatsapp_cloud.py, test_telegram_bot.py,
test_fcm.py, test_webhook.py) share: a job sent through a provider built as the worker builds it, a
commit that records, withdraws or fails, a bare HTTP server for answers no peer gives, and the
checks of what every HTTP provider promises alike (shared/channels/http_send.py): requests in
flight bounded per account across jobs, a withdrawn message never sent, a failed commit ending the
call, a request without an answer never resent, a private host refused.

Import `shared_clients_closed` into a test module: it is autouse there.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

import pytest

from shared.channels import http_client
from shared.channels.provider import (
    OUTCOME_UNKNOWN,
    REFUSED_PRIVATE_ADDRESS,
    UNREACHABLE,
    WITHDRAWN,
    CommitFailed,
    OutgoingMessage,
    ProviderUnavailable,
    SendResult,
)
from shared.channels.registry import build_provider
from tests.http_peer import HttpPeer

MakeMessage = Callable[[int], OutgoingMessage]  # the test module's message to contact i
SendJob = Callable[..., Awaitable[list[SendResult]]]  # (peer, messages, commit=None, **config)
Recipient = Callable[[OutgoingMessage], str]  # a message's recipient as its peer records it


@pytest.fixture(autouse=True)
async def shared_clients_closed() -> AsyncIterator[None]:
    """Each test's shared HTTP clients closed with its loop (an httpx pool belongs to the loop that opened it)."""
    yield
    await http_client.close_all()


def job_sender(kind: str, *, opened: bool = True) -> SendJob:
    """send_job(peer, messages, commit=None, **config): one job's send through a `kind` provider at
    `peer` (its provider_config with `config`), as the worker does it: built, opened (unless `opened`
    is False: send() opens it, and a failure of open() is then every message's result), sent, closed."""
    async def send_job(peer: Any, messages: list[OutgoingMessage], commit: Any = None,
                       **config: Any) -> list[SendResult]:
        provider = build_provider(kind, peer.provider_config(**config), allow_private_networks=True)
        try:
            if opened:
                await provider.open()
            return await provider.send(messages, commit)
        finally:
            await provider.close()
    return send_job


def outcomes(results: list[SendResult]) -> list[tuple[bool, bool, str | None]]:
    return [(r.ok, r.retryable, r.failure) for r in results]


class RecordingCommit:
    """A commit (shared/channels/provider.py's Commit) that records each message it is called with,
    withdraws the contacts in `withdraw`, raises for the contact `fail_at` (Postgres went away), and
    takes `hold_s` seconds doing it; `overlapped` tells whether two calls ever ran at once."""

    def __init__(self, *, withdraw: Collection[int] = (), fail_at: int | None = None, hold_s: float = 0.0) -> None:
        self.withdraw, self.fail_at, self.hold_s = withdraw, fail_at, hold_s
        self.calls: list[OutgoingMessage] = []
        self.overlapped = False
        self._running = 0

    async def __call__(self, message: OutgoingMessage) -> bool:
        self.calls.append(message)
        if message.contact_id == self.fail_at:
            raise ConnectionRefusedError("postgres is away")
        self._running += 1
        self.overlapped |= self._running > 1
        if self.hold_s:
            await asyncio.sleep(self.hold_s)
        self._running -= 1
        return message.contact_id not in self.withdraw


# -- a bare HTTP server ------------------------------------------------------------------------------

Answerer = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]  # (the request's head, the writer)


@asynccontextmanager
async def raw_http(answer: Answerer) -> AsyncIterator[str]:
    """An HTTP server on loopback (its base URL) that reads a request's head and lets `answer` write what it likes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await answer(head, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def huge_answer(status: str, start: bytes = b"") -> Answerer:
    """An answer of 8 MB (`status`, e.g. "200 OK") whose body begins with `start`, then x's."""
    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 8000000\r\n\r\n".encode() + start)
        for _ in range(1000):
            writer.write(b"x" * 8000)
            await writer.drain()
    return answer


def dripping_answer(status: str) -> Answerer:
    """An answer of 1000 bytes, a byte every 50 ms: each read is quick, the whole takes 50 s."""
    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 1000\r\n\r\n".encode())
        for _ in range(1000):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)
    return answer


# -- what every HTTP provider promises -----------------------------------------------------------------


async def check_in_flight_bounded_across_jobs(peer: Any, send_job: SendJob, message: MakeMessage, *,
                                              delay_s: float = 0.1, within_s: float | None = None) -> None:
    """A job of 12 messages with concurrency 3 has 3 requests in flight at most, and in parallel
    (within `within_s`, by default less than serially), its results in order; two jobs of the same
    account at once share its bound."""
    peer.configure(delay=delay_s)
    started = time.monotonic()
    results = await send_job(peer, [message(i) for i in range(12)], concurrency=3)
    assert [r.contact_id for r in results] == list(range(12)) and all(r.ok for r in results)
    assert peer.max_in_flight == 3 and time.monotonic() - started < (within_s or 12 * delay_s)
    peer.clear()
    both = await asyncio.gather(send_job(peer, [message(i) for i in range(8)], concurrency=3),
                                send_job(peer, [message(i) for i in range(8, 16)], concurrency=3))
    assert all(r.ok for job in both for r in job) and peer.max_in_flight == 3


async def check_a_withdrawn_message_is_never_sent(peer: HttpPeer[Any], send_job: SendJob, message: MakeMessage,
                                                  recipient: Recipient) -> None:
    """Of five messages sent at once, the one the commit withdraws gets no request; the commits run
    one at a time (a commit may hold one database connection)."""
    commit = RecordingCommit(withdraw={2}, hold_s=0.01)
    results = await send_job(peer, [message(i) for i in range(1, 6)], commit, concurrency=5)
    assert [(r.ok, r.failure) for r in results] == [(True, None), (False, WITHDRAWN), (True, None), (True, None),
                                                    (True, None)]
    withdrawn = recipient(message(2))
    assert peer.received_by(withdrawn) == [] and peer.attempts(withdrawn) == 0 and len(peer.received) == 4
    assert not commit.overlapped


async def check_a_failed_commit_ends_the_call(peer: HttpPeer[Any], send_job: SendJob, message: MakeMessage,
                                              recipient: Recipient) -> None:
    """A commit that raises (at the third of six messages, one at a time) makes send() raise
    CommitFailed with it as the cause, and nothing after it is sent."""
    with pytest.raises(CommitFailed) as raised:
        await send_job(peer, [message(i) for i in range(1, 7)], RecordingCommit(fail_at=3), concurrency=1)
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    assert [getattr(r, peer.recipient) for r in peer.received] == [recipient(message(1)), recipient(message(2))]


async def check_no_answer_is_an_unknown_outcome(peer: Any, send_job: SendJob, message: MakeMessage) -> None:
    """A request the API took and did not answer in time is OUTCOME_UNKNOWN, not retryable: the API
    may have the message (here it does), and a resend could deliver it twice."""
    peer.configure(delay=1.0)
    [result] = await send_job(peer, [message(1)], timeout_s=0.3)
    assert outcomes([result]) == [(False, False, OUTCOME_UNKNOWN)] and "ReadTimeout" in result.error
    await peer.wait_for(1)  # the API had it all along


async def check_an_unreachable_api_is_retryable(peer: HttpPeer[Any], send_job: SendJob, message: MakeMessage) -> None:
    peer.stop()
    results = await send_job(peer, [message(1), message(2)], timeout_s=2.0)
    assert outcomes(results) == [(False, True, UNREACHABLE)] * 2


async def check_a_private_host_is_refused(peer: HttpPeer[Any], kind: str, message: OutgoingMessage,
                                          **config: Any) -> None:
    """A provider at `peer` whose `config` names a private host, built without private networks
    allowed: open() refuses it, send() fails every message with it, and nothing reaches the peer."""
    provider = build_provider(kind, peer.provider_config(**config))
    with pytest.raises(ProviderUnavailable) as raised:
        await provider.open()
    assert (raised.value.retryable, raised.value.failure) == (False, REFUSED_PRIVATE_ADDRESS)
    [result] = await provider.send([message])
    assert outcomes([result]) == [(False, False, REFUSED_PRIVATE_ADDRESS)]
    await provider.close()
    assert peer.requests == 0 and peer.connections == 0


async def check_an_answer_is_read_up_to_a_bound_and_within_a_deadline(
        kind: str, config: Callable[[str], dict[str, Any]], message: OutgoingMessage, *, status: str = "200 OK",
        start: bytes = b"") -> SendResult:
    """An 8 MB answer (`status`, its body beginning with `start`) is read up to a bound and taken:
    its result is returned for the caller's checks. An answer dripping a byte every 50 ms (each
    read within the 0.2 s timeout) is cut at the deadline: OUTCOME_UNKNOWN, well before it ends.
    `config(url)`: a config of the kind that sends to `url`."""
    async with raw_http(huge_answer(status, start)) as url:
        provider = build_provider(kind, config(url), allow_private_networks=True)
        [taken] = await provider.send([message])
        await provider.close()
    async with raw_http(dripping_answer(status)) as url:
        provider = build_provider(kind, {**config(url), "timeout_s": 0.2}, allow_private_networks=True)
        started = time.monotonic()
        [result] = await provider.send([message])
        assert outcomes([result]) == [(False, False, OUTCOME_UNKNOWN)] and time.monotonic() - started < 1.5
        await provider.close()
    return taken
