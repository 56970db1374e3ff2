"""`POST /v1/broadcasts/{id}/retry` on the real stack (API, relay, planner, workers, SMTP peer): the
latest run's failed (and, when asked, unknown) recipients are sent again, each once, nobody else is,
and the broadcast's counters count every recipient once, by its latest outcome."""
from __future__ import annotations

import uuid
from collections import Counter

from shared.broadcasts.counters import ENGAGEMENT
from tests.smtp_peer import SmtpPeer
from tests.stack import Api, api_for, sender_in_process
from tests.test_send_e2e import audience, smtp_broadcast

NO_ENGAGEMENT = dict.fromkeys(ENGAGEMENT, 0)  # nothing opened, clicked, received back

ENDED = {"completed", "partially_failed", "failed", "cancelled"}
EVERYONE = {f"person{i}@example.com" for i in range(20)}


def problem_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


async def retry(api: Api, broadcast_id: str, body: dict | None = None, key: str | None = None):
    headers = {**api.headers, **({"Idempotency-Key": key} if key else {})}
    return await api.client.post(f"/v1/broadcasts/{broadcast_id}/retry", json=body, headers=headers)


async def run_records(api: Api, broadcast_id: str, run: int) -> list[dict]:
    return [m for m in await api.all_messages(broadcast_id) if m["run"] == run]


async def test_a_retry_of_the_failed_sends_exactly_them_once_and_the_broadcast_ends_completed(settings):
    dead = {"person3@example.com", "person5@example.com", "person7@example.com"}
    with SmtpPeer(fail_permanently=dead) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id = await smtp_broadcast(api, peer, await audience(api, 20), max_retries=0)
            # A draft has no run to retry
            draft = problem_of(await retry(api, broadcast_id), 409)
            assert (draft["code"], draft["current_status"]) == ("wrong_status", "draft")

            # Given a run in which three recipients were refused (550)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            first = await api.wait_for_status(broadcast_id, ENDED)
            assert first["status"] == "partially_failed"
            assert first["status_reason"] == "3 of 20 recipients failed"
            assert first["counters"] == {"total": 20, "queued": 0, "sent": 17, "failed": 3, "unknown": 0, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}
            # (statuses other than failed and unknown, or none, are refused naming the field)
            for body in ({"statuses": []}, {"statuses": ["sent"]}, {"statuses": "failed"}, {"status": ["failed"]}):
                fields = [e["field"] for e in problem_of(await retry(api, broadcast_id, body), 422)["errors"]]
                assert any(f.startswith("status") for f in fields), (body, fields)

            # When the server takes them now, and the failed ones are retried (with an Idempotency-Key, twice)
            peer.configure(fail_permanently=())
            accepted = await retry(api, broadcast_id, {"statuses": ["failed"]}, key="retry-1")
            again = await retry(api, broadcast_id, {"statuses": ["failed"]}, key="retry-1")
            done = await api.wait_for_status(broadcast_id, ENDED)
            retried = await run_records(api, broadcast_id, 2)
            history = (await api.get(f"/v1/broadcasts/{broadcast_id}/events"))["items"]
            # Then there is nobody left to retry, and a top-up finds nobody left to reach
            nothing = problem_of(await retry(api, broadcast_id, {"statuses": ["failed", "unknown"]}), 409)
            top_up = await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)

    assert accepted.status_code == 202
    assert accepted.json() == {"status": "queued", "queued": 3, "run": 2, "retry_of": 1, "statuses": ["failed"]}
    assert again.json() == accepted.json() and again.headers["idempotent-replayed"] == "true"
    # Then each of the three was sent once more, and nobody else was contacted again
    per_address = Counter(a for r in peer.received for a in r.rcpt_tos)
    assert set(per_address) == EVERYONE and set(per_address.values()) == {1}
    assert all(peer.attempts(a) == 2 for a in dead)
    assert all(peer.attempts(a) == 1 for a in EVERYONE - dead)
    assert sorted(m["address"] for m in retried) == sorted(dead) and {m["status"] for m in retried} == {"sent"}
    # and the broadcast counts them as sent, once: the retry's total does not add to the first run's
    assert done["status"] == "completed" and done["status_reason"] is None and done["run"] == 2
    assert done["counters"] == {"total": 20, "queued": 0, "sent": 20, "failed": 0, "unknown": 0, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}
    started, snapshotted, completed = history[-3:]
    assert (started["type"], started["data"]["retry_of"], started["data"]["retry_statuses"],
            started["data"]["top_up"], started["data"]["audience_size"]) == ("BroadcastStarted", 1, ["failed"], False, 3)
    assert (snapshotted["data"]["recipients"], snapshotted["data"]["retried_failed"]) == (3, 3)
    assert (completed["type"], completed["data"]["total"], completed["data"]["sent"]) == ("BroadcastCompleted", 3, 3)
    assert (nothing["code"], nothing["run"], nothing["statuses"]) == ("nothing_to_retry", 2, ["failed", "unknown"])
    assert top_up == {"status": "completed", "queued": 0, "run": 2}


async def test_unknown_outcomes_are_counted_apart_and_retried_only_when_asked_for(settings):
    # Given a run where person5 is refused, person11 too (and then deleted), and the connection is
    # cut after person7's and person9's messages were written, before the server answered (unknown)
    refused, gone, lost = "person5@example.com", "person11@example.com", {"person7@example.com", "person9@example.com"}
    with SmtpPeer(fail_permanently={refused, gone}, drop_after_data={a: 1 for a in lost}) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id = await smtp_broadcast(api, peer, await audience(api, 20), max_retries=0)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            first = await api.wait_for_status(broadcast_id, ENDED)
            unknown = (await api.get(f"/v1/broadcasts/{broadcast_id}/messages", params={"status": "unknown"}))["items"]
            # A top-up leaves the unknown ones out: they may have arrived
            remaining = (await api.get(f"/v1/broadcasts/{broadcast_id}"))["remaining"]

            # When person11 is deleted, the server heals, and both statuses are retried
            gone_id = next(m["contact_id"] for m in await run_records(api, broadcast_id, 1) if m["address"] == gone)
            await api.call("DELETE", f"/v1/contacts/{gone_id}")
            peer.configure(fail_permanently=())
            accepted = await retry(api, broadcast_id, {"statuses": ["unknown", "failed"]})
            done = await api.wait_for_status(broadcast_id, ENDED)
            retried = await run_records(api, broadcast_id, 2)

    assert first["status"] == "partially_failed"
    assert first["status_reason"] == "2 of 20 recipients failed; outcome unknown for 2"
    assert first["counters"] == {"total": 20, "queued": 0, "sent": 16, "failed": 2, "unknown": 2, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}
    assert {m["address"] for m in unknown} == lost and all(m["error"].startswith("outcome unknown") for m in unknown)
    assert remaining == 2  # the two refused, not the two unknown
    # Then the retry went to the refused and the unknown ones who still exist, each once
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"status": "queued", "queued": 3, "run": 2, "retry_of": 1,
                               "statuses": ["failed", "unknown"]}
    assert sorted(m["address"] for m in retried) == sorted(lost | {refused})
    per_address = Counter(a for r in peer.received for a in r.rcpt_tos)
    assert set(per_address) == EVERYONE - {gone} and set(per_address.values()) == {1}
    # and the deleted one stays failed in the first run, the others count as sent now
    assert done["status"] == "completed" and done["status_reason"] is None
    assert done["counters"] == {"total": 20, "queued": 0, "sent": 19, "failed": 1, "unknown": 0, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}


async def test_a_retry_without_a_body_takes_the_failed_only(settings):
    # Given a run with one refused and one unknown recipient
    with SmtpPeer(fail_permanently={"person2@example.com"}, drop_after_data={"person4@example.com": 1}) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id = await smtp_broadcast(api, peer, await audience(api, 6), max_retries=0)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            await api.wait_for_status(broadcast_id, ENDED)
            # When it is retried without a body (the peer still refuses person2)
            accepted = await retry(api, broadcast_id)
            done = await api.wait_for_status(broadcast_id, ENDED)
            # Then only person2 was tried again, and failed again: the retry run failed as a whole
            unknown_left = problem_of(await retry(api, broadcast_id, {"statuses": ["unknown"]}), 409)

    assert accepted.json() == {"status": "queued", "queued": 1, "run": 2, "retry_of": 1, "statuses": ["failed"]}
    assert peer.attempts("person2@example.com") == 2 and peer.attempts("person4@example.com") == 1
    assert done["status"] == "failed" and done["status_reason"] == "every recipient failed"
    assert done["counters"] == {"total": 6, "queued": 0, "sent": 4, "failed": 1, "unknown": 1, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}
    # The latest run (the retry) has no unknown recipient: person4's is in run 1, out of a retry's reach now
    assert unknown_left["code"] == "nothing_to_retry"


async def test_a_retry_of_a_missing_broadcast_is_404_and_the_messages_filter_knows_unknown(settings):
    async with api_for(settings) as api:
        missing = problem_of(await retry(api, str(uuid.uuid4()), {"statuses": ["failed"]}), 404)
        draft = await api.post("/v1/broadcasts", {"name": "x", "content": {"subject": "Hi"}})
        unknown = await api.get(f"/v1/broadcasts/{draft['id']}/messages", params={"status": "unknown"})
        bogus = await api.client.get(f"/v1/broadcasts/{draft['id']}/messages", params={"status": "bogus"},
                                     headers=api.headers)

    assert missing["code"] == "not_found"
    assert unknown == {"items": [], "total": 0, "limit": 100, "offset": 0}
    assert bogus.status_code in (400, 422) and bogus.headers["content-type"].startswith("application/problem+json")
