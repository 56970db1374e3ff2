"""`crier bench --channel sms|whatsapp|telegram|push|webhook`: one HTTP channel's send throughput,
end to end on the embedded stack, against a local stand-in for the provider's API (stand_in.py)
that answers every request after `latency_ms`.

The same stack and steps as the email bench (bench.py): a database of its own, `crier api` and
`senders` `crier sender` processes, N contacts imported through the REST API (each with an address
on the channel), a list of them, a provider of the channel's kind pointed at the stand-in (no rate
limit: `rate_limits: []`, so that the account's documented ceiling does not set the figure), a
broadcast on that channel, `send`, and the progress stream followed to `finished`. Then checked:
the run `completed`, every ledger row `sent`, and the stand-in took exactly N messages, one per
recipient, to exactly the ledger's addresses. One JSON line per run: recipients/s, the seconds
from `send` to `completed`, the ceiling that `concurrency` requests in flight per sender at
`latency_ms` each set, peak memory and the CPU each part used during the send (the stand-in's
thread apart; Postgres and nats-server are the bench's own when it started them).
"""
from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.tooling.bench import (
    Servers,
    _phases,
    crier_stack,
    embedded_servers,
    import_contacts,
    list_of_everyone,
    send_and_watch,
)
from shared.tooling.stand_in import StandIn


def _phone(i: int) -> str:
    return f"+1415{i:07d}"  # E.164, a possible US number: +1 415 and seven digits (10 million of them)


@dataclass(frozen=True)
class Channel:
    """How the bench sends on one channel: the provider kind, a contact's address on it, the content."""

    kind: str
    address: Callable[[int], dict[str, Any]]  # the i-th contact's address fields
    content: dict[str, Any]  # the broadcast's content (the channel's section)


CHANNELS: dict[str, Channel] = {
    "sms": Channel("twilio", lambda i: {"phone": _phone(i)},
                   {"sms": {"body": "Hello {{ first_name }}, your order {{ order }} has shipped."}}),
    "whatsapp": Channel("whatsapp_cloud", lambda i: {"whatsapp": _phone(i)},
                        {"whatsapp": {"template_name": "order_update", "language": "en",
                                      "parameters": {"1": "{{ first_name }}", "2": "{{ order }}"}}}),
    # MarkdownV2: the literal text holds none of its reserved characters; Liquid escapes the values.
    "telegram": Channel("telegram_bot", lambda i: {"telegram_chat_id": str(100_000_000 + i)},
                        {"telegram": {"text": "Hello {{ first_name }}, your order {{ order }} has shipped"}}),
    "push": Channel("fcm", lambda i: {"push_tokens": [f"d{i:010d}:APA91b{'x' * 134}"]},
                    {"push": {"title": "Hello {{ first_name }}", "body": "Your order {{ order }} has shipped."}}),
    # A webhook goes to the provider's URL once per contact: every contact is a recipient.
    "webhook": Channel("webhook", lambda i: {},
                       {"webhook": {"payload": {"event": "order_shipped", "name": "{{ first_name }}",
                                                "order": "{{ order }}"}}}),
}


def _contacts(channel: Channel) -> Callable[[int, int], list[dict]]:
    def make(start: int, count: int) -> list[dict]:
        return [{"external_id": f"u{i}", "attributes": {"first_name": f"First{i % 97}", "order": f"A{i}"},
                 **channel.address(i)}
                for i in range(start, start + count)]
    return make


async def _one_run(servers: Servers, name: str, n: int, senders: int, latency_ms: float, concurrency: int) -> dict:
    channel = CHANNELS[name]
    # What `concurrency` requests in flight per sender, each answered after latency_ms, allow at most.
    ceiling = senders * concurrency / (latency_ms / 1000) if latency_ms > 0 else None
    # Long enough for a run at a tenth of the ceiling (or 100/s), so that a stuck run ends saying its state.
    timeout_s = 120 + 10 * n / (ceiling or 1000)
    # The provider's host is the stand-in on 127.0.0.1: refused unless private networks are allowed.
    env = {"CRIER_ALLOW_PRIVATE_NETWORKS": "true"}
    with StandIn(latency_ms) as peer:
        async with crier_stack(servers.admin_url, servers.nats_url, senders, env) as stack:
            con = stack.con
            async with stack.api() as api:
                import_s = await import_contacts(api, _contacts(channel), n)
                lst, list_s = await list_of_everyone(api, con)
                r = await api.post("/v1/providers", json={
                    "name": f"bench {channel.kind}", "channel": name, "kind": channel.kind,
                    **peer.provider_config(channel.kind), "concurrency": concurrency, "rate_limits": [],
                    "batch_size": 500, "batch_delay_ms": 0, "max_retries": 0,
                })
                assert r.status_code == 201, r.text
                provider = r.json()
                r = await api.post("/v1/broadcasts", json={
                    "name": f"bench {name}", "list_id": lst["id"], "channels": [name], "provider_id": provider["id"],
                    "content": channel.content,
                })
                assert r.status_code == 201, r.text
                broadcast = r.json()
                reach = (await api.get(f"/v1/broadcasts/{broadcast['id']}/audience")).json()
                assert reach.get("reach") == n, reach  # everyone has an address on the channel
                try:
                    async with asyncio.timeout(timeout_s):
                        send_s, send_cpu = await send_and_watch(api, stack, broadcast["id"], servers=servers,
                                                                extra_cpu={"stand_in": peer.cpu_seconds})
                except TimeoutError:
                    got = (await api.get(f"/v1/broadcasts/{broadcast['id']}")).json()
                    raise TimeoutError(f"not finished after {timeout_s:.0f} s: {got['status']} {got['counters']}, "
                                       f"the stand-in took {peer.requests}") from None
                got = (await api.get(f"/v1/broadcasts/{broadcast['id']}")).json()
            ledger = {r["status"]: r["n"] for r in await con.fetch(
                "SELECT status, count(*) AS n FROM messages GROUP BY status")}
            errors = [r["error"] for r in await con.fetch(
                "SELECT DISTINCT error FROM messages WHERE error IS NOT NULL LIMIT 3")]
            addresses = {r["address"] for r in await con.fetch("SELECT address FROM messages")}
            phases = await _phases(con)
            peaks = stack.peak_rss_mb()
    assert got["status"] == "completed", (got["status"], got.get("status_reason"), got["counters"], errors)
    assert ledger == {"sent": n} and got["counters"]["sent"] == got["counters"]["total"] == n, (
        ledger, got["counters"], errors)
    assert peer.requests == n and len(peer.recipients) == n, (
        f"the stand-in took {peer.requests} messages for {len(peer.recipients)} recipients, not {n}")
    assert set(peer.recipients) == addresses, "the stand-in's recipients are not the ledger's addresses"
    assert peer.refused == 0, f"the stand-in refused {peer.refused} requests"
    return {
        "channel": name,
        "kind": channel.kind,
        "recipients": n,
        "senders": senders,
        "concurrency": concurrency,
        "latency_ms": latency_ms,
        "import_s": round(import_s, 2),
        "list_build_s": round(list_s, 2),
        "send_to_completed_s": round(send_s, 2),
        "recipients_per_s": round(n / send_s),
        "per_sender_per_s": round(n / send_s / senders),
        "ceiling_per_s": round(ceiling) if ceiling else None,
        "of_ceiling": round(n / send_s / ceiling, 2) if ceiling else None,
        "stand_in": {"max_in_flight": peer.max_in_flight, "connections": peer.connections,
                     "token_requests": peer.token_requests},
        "peak_rss_mb": peaks,
        "phases_s": phases,
        "send_cpu_s": send_cpu,
    }


def run_channel_bench(channels: tuple[str, ...], n: int, runs: int, senders: int, latency_ms: float,
                      concurrency: int) -> None:
    """`runs` times, each channel in turn, on one pair of servers: one JSON line per send."""
    with embedded_servers() as servers:
        results: dict[str, list[float]] = {c: [] for c in channels}
        for i in range(runs):
            for name in channels:
                result = asyncio.run(_one_run(servers, name, n, senders, latency_ms, concurrency))
                results[name].append(result["recipients_per_s"])
                print(json.dumps({"run": i + 1, **result}), flush=True)
        if runs > 1:
            print("median of", runs, "runs:", ", ".join(
                f"{c} {statistics.median(r):,.0f}/s" for c, r in results.items()), flush=True)
