"""`crier bench --clicks [--clicks-n 20000]`: the click endpoint's throughput on one API process.

The stack of the other benches (bench.py: a database of its own, `crier api` and one `crier sender`
on the embedded servers): `--recipients` contacts (default 2,000) imported and sent a broadcast
through the `null` provider, so the ledger has their messages; a tracking key of that run with
LINKS links (the rows the sender makes when it renders tracked content); then `--clicks-n` GET
/r/{code} requests, each a signed code of (contact, link) taken in turn, from this process over
`--concurrency` keep-alive connections (a small HTTP/1.1 client on asyncio streams: httpx would
spend more CPU than the server it measures). Every answer must be a 302 to its link's URL. Then
checked: `link_clicks` holds exactly one click per request, and the engagement counters say the
same (`clicks` = requests, `clicked` = the messages clicked).

One JSON line per run: redirects/s, latency percentiles, and the CPU seconds each part used during
the clicks (the API, Postgres and nats-server, and this process, the client). The sender is idle
then.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid

from shared.platform import signing
from shared.tooling.bench import (
    _contacts,
    _cpu_by_part,
    crier_stack,
    embedded_servers,
    import_contacts,
    list_of_everyone,
    send_and_watch,
)

LINKS = 5
WARM_UP = 200  # requests before the clock starts: the API's key ring, caches and connections


async def _client(host: str, port: int, paths: list[str], expected: list[str], latencies: list[float]) -> None:
    """One keep-alive connection sending its requests one after another; every answer must be a 302
    to the expected Location."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for path, location in zip(paths, expected):
            started = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: crier-bench\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = lines[0].split(" ", 2)[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            if (length := int(headers.get("content-length", "0"))) > 0:
                await reader.readexactly(length)
            if status != "302" or headers.get("location") != location:
                raise AssertionError(f"GET {path}: {status} {headers}")
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def _clicks(port: int, paths: list[str], expected: list[str], concurrency: int) -> list[float]:
    latencies: list[float] = []
    await asyncio.gather(*(_client("127.0.0.1", port, paths[i::concurrency], expected[i::concurrency], latencies)
                           for i in range(concurrency)))
    return latencies


async def _one_run(admin_url: str, nats_url: str, servers: object, recipients: int, clicks: int,
                   concurrency: int) -> dict:
    async with crier_stack(admin_url, nats_url, senders=1) as stack:
        con = stack.con
        async with stack.api() as api:
            await import_contacts(api, _contacts, recipients)
            lst, _ = await list_of_everyone(api, con)
            provider = (await api.post("/v1/providers", json={
                "name": "null", "channel": "email", "kind": "null", "from_email": "news@example.com",
                "batch_size": 500, "batch_delay_ms": 0, "max_retries": 0})).json()
            broadcast = (await api.post("/v1/broadcasts", json={
                "name": "clicks", "list_id": lst["id"], "provider_id": provider["id"],
                "content": {"subject": "Hello", "html": "<p>Hello</p>", "text": "Hello"}})).json()
            await send_and_watch(api, stack, broadcast["id"])
        broadcast_id = uuid.UUID(broadcast["id"])
        tenant_id = await con.fetchval("SELECT tenant_id FROM broadcasts WHERE id = $1", broadcast_id)
        contacts = [r["contact_id"] for r in await con.fetch(
            "SELECT contact_id FROM messages WHERE broadcast_id = $1 AND status = 'sent' ORDER BY contact_id",
            broadcast_id)]
        assert len(contacts) == recipients, (len(contacts), recipients)
        # What the sender makes for tracked content: a key of the run's content, its links.
        key = await con.fetchval("""INSERT INTO tracking_keys (tenant_id, broadcast_id, run, version, channel)
                                    VALUES ($1, $2, 1, 1, 'email') RETURNING key""", tenant_id, broadcast_id)
        urls = {link: f"https://shop.example.com/offer/{link}?utm_source=crier&utm_campaign=clicks"
                for link in range(1, LINKS + 1)}
        await con.executemany("INSERT INTO tracked_links (key, link, url) VALUES ($1, $2, $3)",
                              [(key, link, url) for link, url in urls.items()])
        codes = (await signing.load_signer(con)).tracking_links(key)
        # Request i: contact i mod N, link (i div N) mod LINKS + 1: every message clicked, each link in turn.
        wanted = [(contacts[i % recipients], (i // recipients) % LINKS + 1) for i in range(WARM_UP + clicks)]
        paths = [f"/r/{codes.click(contact, link)}" for contact, link in wanted]
        expected = [urls[link] for _, link in wanted]

        await _clicks(stack.port, paths[:WARM_UP], expected[:WARM_UP], min(concurrency, WARM_UP))
        await con.execute("CHECKPOINT")
        cpu_before, client_before = _cpu_by_part(stack.procs, servers), time.process_time()  # type: ignore[arg-type]
        started = time.perf_counter()
        latencies = await _clicks(stack.port, paths[WARM_UP:], expected[WARM_UP:], concurrency)
        took = time.perf_counter() - started
        cpu_after, client_after = _cpu_by_part(stack.procs, servers), time.process_time()  # type: ignore[arg-type]

        total = WARM_UP + clicks
        recorded = await con.fetchval("SELECT coalesce(sum(clicks), 0) FROM link_clicks WHERE key = $1", key)
        counters = await con.fetchrow("SELECT clicks, clicked FROM engagement_counters WHERE broadcast_id = $1",
                                      broadcast_id)
        clicked = len({contact for contact, _ in wanted})
        assert len(latencies) == clicks, (len(latencies), clicks)
        assert recorded == total, f"link_clicks holds {recorded} clicks for {total} requests"
        assert (counters["clicks"], counters["clicked"]) == (total, clicked), (dict(counters), total, clicked)
        peaks = stack.peak_rss_mb()
    latencies.sort()
    cpu = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 2) for k in cpu_after}
    cpu["client"] = round(client_after - client_before, 2)
    return {
        "clicks": clicks,
        "recipients": recipients,
        "links": LINKS,
        "concurrency": concurrency,
        "seconds": round(took, 2),
        "redirects_per_s": round(clicks / took),
        "latency_ms": {p: round(latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1000, 1)
                       for p, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "recorded": recorded,
        "cpu_s": cpu,
        "api_cpu_ms_per_click": round(cpu["api"] * 1000 / clicks, 3),
        "peak_rss_mb": peaks,
    }


def run_click_bench(clicks: int, runs: int, recipients: int, concurrency: int) -> None:
    """`runs` times on one pair of servers: one JSON line per run, then the median."""
    with embedded_servers() as servers:
        rates = []
        for i in range(runs):
            result = asyncio.run(_one_run(servers.admin_url, servers.nats_url, servers, recipients, clicks,
                                          concurrency))
            rates.append(result["redirects_per_s"])
            print(json.dumps({"run": i + 1, **result}), flush=True)
        if runs > 1:
            print(f"median of {runs}: {statistics.median(rates):,.0f} redirects/s", flush=True)
