"""End to end through HTTP providers at their local peers: the breaker that pauses a broadcast when
its provider fails, dead addresses, and the claimed send's bounded concurrency."""
from __future__ import annotations

from collections import Counter

from tests.stack import Api, api_for, sender_in_process
from tests.twilio_peer import TwilioPeer


async def sms_broadcast(api: Api, twilio: TwilioPeer, n: int, **provider: object) -> tuple[str, list[str]]:
    numbers = [f"+4915200{i:06d}" for i in range(n)]
    ids = (await api.post("/v1/contacts", [{"phone": p, "attributes": {"i": i}} for i, p in enumerate(numbers)]))["ids"]
    lst = await api.post("/v1/lists", {"name": "texters"})
    await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
    texts = await api.post("/v1/providers", {"name": "texts", "kind": "twilio", **twilio.provider_config(),
                                             "allow_insecure_auth": True, "batch_size": 10, "batch_delay_ms": 0,
                                             "rate_limits": [],
                                             **provider})
    created = await api.post("/v1/broadcasts", {"name": "sms", "list_id": lst["id"], "channels": ["sms"],
                                                "provider_id": texts["id"], "content": {"sms": {"body": "n{{ i }}"}}})
    return created["id"], numbers


async def test_a_provider_that_starts_refusing_pauses_the_broadcast_and_a_resume_finishes_it(settings):
    # Given an SMS broadcast to 120 numbers whose Twilio account is revoked after 30 requests
    with TwilioPeer(revoke_after=30, delay=0.01) as twilio:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id, numbers = await sms_broadcast(api, twilio, 120, concurrency=4)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            # When its provider's errors open the breaker
            paused = await api.wait_for_status(broadcast_id, {"paused", "completed", "partially_failed", "failed"})
            history = [e["data"] for e in (await api.get(f"/v1/broadcasts/{broadcast_id}/events"))["items"]
                       if e["type"] == "BroadcastPaused"]
            received_while_paused = len(twilio.received)
            # Then the broadcast is paused with the provider's answer, nobody failed
            assert paused["status"] == "paused", paused
            assert paused["status_reason"].startswith("provider_error: ") and "20003" in paused["status_reason"]
            assert history[0]["reason"] == "provider_error"
            assert paused["counters"]["failed"] == 0
            # When the account works again and the broadcast is resumed
            twilio.configure(revoke_after=None)
            await api.post(f"/v1/broadcasts/{broadcast_id}/resume")
            done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"})
    # Then it finishes, everyone got exactly one message
    assert received_while_paused <= 30
    assert done["status"] == "completed", done
    assert Counter(r.to for r in twilio.received) == Counter(numbers)
    assert done["counters"]["sent"] == 120 and done["counters"]["failed"] == 0


async def test_a_dead_number_fails_for_good_and_is_suppressed(settings):
    with TwilioPeer(fail_permanently={"+4915200000003": 21610}) as twilio:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id, numbers = await sms_broadcast(api, twilio, 6)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"})
            suppressed = (await api.get("/v1/suppressions", params={"channel": "sms"}))["items"]
    assert done["counters"]["sent"] == 5 and done["counters"]["failed"] == 1
    assert [(s["address"], s["reason"], s["broadcast_id"]) for s in suppressed] == [
        ("+4915200000003", "bounced", broadcast_id)]


async def test_http_sends_go_concurrency_at_a_time(settings):
    with TwilioPeer(delay=0.05) as twilio:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id, numbers = await sms_broadcast(api, twilio, 40, concurrency=5)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"})
    assert done["status"] == "completed"
    # several at once, never more than the account's concurrency per sender (one sender here,
    # which works on up to CRIER_SENDER_CONCURRENCY jobs at once: the bound is per account and process)
    assert 2 <= twilio.max_in_flight <= 5
    assert Counter(r.to for r in twilio.received) == Counter(numbers)
