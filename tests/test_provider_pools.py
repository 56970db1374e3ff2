"""Several providers for a broadcast's channel (`provider_ids`): the decider's rules, which provider
a batch goes to first, and (end to end, against real SMTP peers) the load shared by weight and a
failing server skipped with nobody sent twice."""
from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime, timezone

import pytest

from sender_service import provider_pool
from sender_service.provider_pool import FailingProviders, first_choice, order
from shared.broadcasts import decider as b
from shared.broadcasts.handlers import DECIDER
from shared.kernel.errors import Invalid
from tests.gwt import given_for
from tests.smtp_peer import SmtpPeer, free_port
from tests.stack import api_for, sender_in_process
from tests.test_send_e2e import audience

given = given_for(DECIDER)
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
T1 = datetime(2026, 12, 1, 12, 5, tzinfo=timezone.utc)
BID, TENANT, LIST = (uuid.UUID(int=i) for i in (1, 2, 3))
A, B, C = (uuid.UUID(int=i) for i in (10, 11, 12))
CONTENT = b.Content(subject="Hello", html="<p>Hi</p>", text="Hi")


def created(provider_id: uuid.UUID | None, provider_ids: tuple[uuid.UUID, ...] = ()) -> b.BroadcastCreated:
    return b.BroadcastCreated(broadcast_id=BID, tenant_id=TENANT, name="News", channel="email", list_id=LIST,
                              provider_id=provider_id, content=CONTENT, at=T0, provider_ids=provider_ids)


def create(**fields: object) -> b.CreateBroadcast:
    return b.CreateBroadcast(broadcast_id=BID, tenant_id=TENANT, name="News", list_id=LIST, content=CONTENT, at=T0,
                             **fields)


# ---- the decider ----

@pytest.mark.parametrize(("given_fields", "stored"), [
    ({"provider_ids": (A, B)}, (A, (A, B))),  # a pool: its first is the provider
    ({"provider_id": A, "provider_ids": (A, B, C)}, (A, (A, B, C))),  # both given, agreeing
    ({"provider_ids": (A,)}, (A, ())),  # a pool of one is just its provider
    ({"provider_id": A}, (A, ())),
])
def test_create_stores_the_provider_and_its_pool(given_fields, stored):
    given().when(create(**given_fields)).then(created(*stored))


@pytest.mark.parametrize(("given_fields", "field"), [
    ({"provider_id": B, "provider_ids": (A, B)}, "provider_id"),  # not the pool's first
    ({"provider_ids": (A, B, A)}, "provider_ids[2]"),  # listed twice
    ({"provider_ids": tuple(uuid.UUID(int=100 + i) for i in range(9))}, "provider_ids"),  # over 8
])
def test_a_pool_that_does_not_add_up_is_refused_naming_the_field(given_fields, field):
    given().when(create(**given_fields)).then_raises(Invalid, field=field)


def test_an_edit_to_another_provider_replaces_the_pool():
    state = given(created(A, (A, B))).when(b.EditBroadcast(provider_id=C, at=T1)).then(
        b.BroadcastEdited(provider_id=C, provider_ids=(), at=T1))
    assert (state.provider_id, state.provider_ids) == (C, ())


def test_an_edit_naming_the_same_provider_keeps_the_pool():
    given(created(A, (A, B))).when(b.EditBroadcast(provider_id=A, at=T1)).then()


def test_an_edit_of_the_pool_moves_the_provider_to_its_first():
    given(created(A, (A, B))).when(b.EditBroadcast(provider_ids=(C, A), at=T1)).then(
        b.BroadcastEdited(provider_id=C, provider_ids=(C, A), at=T1))


def test_a_run_takes_the_pool_with_it():
    given(created(A, (A, B))).when(b.SendBroadcast(audience_size=10, at=T1)).then(
        b.BroadcastStarted(run=1, tenant_id=TENANT, channel="email", list_id=LIST, provider_id=A, audience_size=10,
                           at=T1, provider_ids=(A, B)))


# ---- which provider a batch goes to ----

def test_batches_go_first_to_providers_in_proportion_to_their_weights():
    # frac(seq * 0.618...) = 0, .618, .236, .854, .472, .090, .708, .326, .944, .562 against the shares
    assert [first_choice(seq, [1, 1]) for seq in range(10)] == [0, 1, 0, 1, 0, 0, 1, 0, 1, 1]
    assert [first_choice(seq, [3, 1]) for seq in range(10)] == [0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    # Any stretch of consecutive batches is split close to the weights, not only the whole run
    for start in (0, 37, 1000):
        split = Counter(first_choice(seq, [3, 1]) for seq in range(start, start + 40))
        assert abs(split[0] - 30) <= 2, split
    assert Counter(first_choice(seq, [5, 2, 1]) for seq in range(800)) == Counter({0: 501, 1: 200, 2: 99})


def test_a_failing_provider_is_tried_last_and_the_others_keep_their_turn():
    assert order(1, [A, B, C], [1, 1, 1], set()) == [B, C, A]
    assert order(1, [A, B, C], [1, 1, 1], {B}) == [C, A, B]
    assert order(1, [A, B, C], [1, 1, 1], {A, B, C}) == [B, C, A]


def test_a_failing_provider_is_skipped_only_for_a_while():
    now = [100.0]
    failing = FailingProviders(clock=lambda: now[0])
    failing.mark(A)
    assert failing.now() == {A}
    now[0] += provider_pool.SKIP_S - 1
    assert failing.now() == {A}
    now[0] += 1
    assert failing.now() == set()


# ---- end to end: SMTP servers sharing a broadcast ----

async def pooled_broadcast(api, list_id: str, providers: list[dict]) -> str:
    ids = []
    for i, config in enumerate(providers):
        created_provider = await api.post("/v1/providers", {
            "name": f"server {i}", "channel": "email", "kind": "smtp", "starttls": False,
            "from_email": "news@example.com", "batch_size": 10, "batch_delay_ms": 0, "max_retries": 1,
            "timeout_s": 5.0, **config})
        ids.append(created_provider["id"])
    made = await api.post("/v1/broadcasts", {
        "name": "News", "list_id": list_id, "provider_ids": ids,
        "content": {"subject": "Hi {{ first_name }}", "html": "<p>Hi</p>", "text": "Hi"}})
    assert made["provider_ids"] == ids and made["provider_id"] == ids[0]
    return made["id"]


async def send_and_wait(api, broadcast_id: str) -> dict:
    await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
    return await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"}, timeout=120)


def everyone(n: int) -> set[str]:
    return {f"person{i}@example.com" for i in range(n)}


async def test_a_server_that_is_down_is_skipped_and_everyone_is_sent_once_through_the_others(settings):
    # Given a pool of two SMTP servers, the first of which nothing answers at
    n = 200
    with SmtpPeer() as up:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id = await pooled_broadcast(api, await audience(api, n), [
                {"host": "127.0.0.1", "port": free_port()}, {"host": up.host, "port": up.port}])
            # When the broadcast is sent
            done = await send_and_wait(api, broadcast_id)
    # Then it completes, every recipient got one copy, all through the server that is up
    assert done["status"] == "completed" and done["counters"]["sent"] == n
    per_address = Counter(a for r in up.received for a in r.rcpt_tos)
    assert set(per_address) == everyone(n) and set(per_address.values()) == {1}


async def test_a_server_that_refuses_the_login_is_skipped_like_one_that_is_down(settings):
    # Given a pool whose first server refuses the account's password
    n = 100
    with SmtpPeer(credentials={"news": "right"}) as locked, SmtpPeer() as up:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id = await pooled_broadcast(api, await audience(api, n), [
                {"host": locked.host, "port": locked.port, "username": "news", "password": "wrong",
                 "allow_insecure_auth": True},
                {"host": up.host, "port": up.port}])
            done = await send_and_wait(api, broadcast_id)
            history = [e["type"] for e in (await api.get(f"/v1/broadcasts/{broadcast_id}/events"))["items"]]
    # Then the other server sent everyone once, and the broadcast was never paused by the breaker
    assert done["status"] == "completed" and done["counters"]["sent"] == n
    assert locked.received == []
    per_address = Counter(a for r in up.received for a in r.rcpt_tos)
    assert set(per_address) == everyone(n) and set(per_address.values()) == {1}
    assert "BroadcastPaused" not in history


async def test_the_servers_share_the_load_by_weight(settings):
    # Given two healthy servers weighted 3 and 1, and 40 batches of 10
    n, size = 400, 10
    with SmtpPeer() as big, SmtpPeer() as small:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id = await pooled_broadcast(api, await audience(api, n), [
                {"host": big.host, "port": big.port, "weight": 3},
                {"host": small.host, "port": small.port, "weight": 1}])
            done = await send_and_wait(api, broadcast_id)
    # Then each got the batches whose first choice it is (31 and 9 of the 40), everyone once
    assert done["status"] == "completed"
    firsts = Counter(first_choice(seq, [3, 1]) for seq in range(n // size))
    assert firsts == Counter({0: 31, 1: 9})
    assert (len(big.received), len(small.received)) == (size * firsts[0], size * firsts[1])
    per_address = Counter(a for r in big.received + small.received for a in r.rcpt_tos)
    assert set(per_address) == everyone(n) and set(per_address.values()) == {1}


async def test_a_pool_is_checked_like_a_provider_and_an_edit_to_one_provider_replaces_it(settings):
    async with api_for(settings) as api:
        email = await api.post("/v1/providers", {"name": "e", "kind": "null", "channel": "email"})
        other_email = await api.post("/v1/providers", {"name": "e2", "kind": "null", "channel": "email"})
        sms = await api.post("/v1/providers", {"name": "s", "kind": "null", "channel": "sms"})
        content = {"subject": "Hi", "html": "<p>Hi</p>"}
        wrong = await api.post("/v1/broadcasts", {"name": "x", "provider_ids": [email["id"], sms["id"]],
                                                  "content": content}, expect=422)
        assert "provider_ids[1]" in str(wrong) and "sms" in str(wrong)
        missing = await api.post("/v1/broadcasts", {"name": "x", "provider_ids": [email["id"], str(uuid.uuid4())],
                                                    "content": content}, expect=422)
        assert "provider_ids[1]" in str(missing)
        made = await api.post("/v1/broadcasts", {"name": "x", "provider_ids": [email["id"], other_email["id"]],
                                                 "content": content})
        assert made["provider_ids"] == [email["id"], other_email["id"]]
        edited = await api.patch(f"/v1/broadcasts/{made['id']}", {"provider_id": other_email["id"]})
        assert (edited["provider_id"], edited["provider_ids"]) == (other_email["id"], [])
        await api.patch(f"/v1/broadcasts/{made['id']}", {"provider_ids": [other_email["id"], email["id"]]})
        fetched = await api.get(f"/v1/broadcasts/{made['id']}")
        assert (fetched["provider_id"], fetched["provider_ids"]) == (other_email["id"], [other_email["id"], email["id"]])
