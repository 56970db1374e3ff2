"""Given/when/then for the Broadcast decider: create, edit, delete, send and a run's outcome.

The rest of the lifecycle (schedule, pause, cancel, stop, reset, top-up) is in test_broadcast_lifecycle.py."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import msgspec
import pytest

from shared.broadcasts import decider as b
from shared.broadcasts.handlers import DECIDER
from shared.kernel.errors import AlreadyExists, Conflict, Invalid, NotFound, WrongStatus
from tests.gwt import given_for

given = given_for(DECIDER)
T0 = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
T1 = datetime(2026, 11, 22, 12, 5, tzinfo=timezone.utc)
BID, TENANT, LIST, PROVIDER = (uuid.UUID(int=i) for i in (1, 2, 3, 4))
CONTENT = b.Content(subject="Hello {{ first_name }}", html="<p>Hi</p>", text="Hi")

CREATED = b.BroadcastCreated(
    broadcast_id=BID, tenant_id=TENANT, name="November news", channel="email",
    list_id=LIST, provider_id=PROVIDER, content=CONTENT, at=T0,
)
CREATE = b.CreateBroadcast(
    broadcast_id=BID, tenant_id=TENANT, name="November news", list_id=LIST, provider_id=PROVIDER,
    content=CONTENT, at=T0,
)


def test_create_makes_a_draft():
    state = given().when(CREATE).then(CREATED)
    assert state.status is b.Status.DRAFT and state.name == "November news"


def test_create_retried_is_a_no_op():
    given(CREATED).when(CREATE).then()


def test_create_with_an_existing_id_and_other_content_is_refused():
    other = b.CreateBroadcast(broadcast_id=BID, tenant_id=TENANT, name="Other", content=CONTENT, at=T1)
    given(CREATED).when(other).then_raises(AlreadyExists)


def test_create_after_delete_is_refused():
    given(CREATED, b.BroadcastDeleted(at=T1)).when(CREATE).then_raises(AlreadyExists)


def test_edit_a_draft_records_only_what_changed():
    edit = b.EditBroadcast(name="December news", list_id=LIST, at=T1)
    state = given(CREATED).when(edit).then(b.BroadcastEdited(name="December news", at=T1))
    assert state.name == "December news" and state.list_id == LIST


def test_edit_content_merges_the_given_fields():
    edit = b.EditBroadcast(content=b.ContentChanges(subject="New subject"), at=T1)
    merged = b.Content(subject="New subject", html="<p>Hi</p>", text="Hi")
    state = given(CREATED).when(edit).then(b.BroadcastEdited(content=merged, at=T1))
    assert state.content == merged


def test_edit_can_clear_the_list():
    given(CREATED).when(b.EditBroadcast(list_id=None, at=T1)).then(b.BroadcastEdited(list_id=None, at=T1))


@pytest.mark.parametrize(
    "edit",
    [
        b.EditBroadcast(at=T1),
        b.EditBroadcast(name="November news", at=T1),
        b.EditBroadcast(content=b.ContentChanges(subject=CONTENT.subject), at=T1),
    ],
    ids=["empty", "same name", "same subject"],
)
def test_edit_without_a_change_is_a_no_op(edit):
    given(CREATED).when(edit).then()


def test_edit_of_a_missing_broadcast_is_not_found():
    given().when(b.EditBroadcast(name="x", at=T1)).then_raises(NotFound)


def test_edit_of_a_deleted_broadcast_is_not_found():
    given(CREATED, b.BroadcastDeleted(at=T1)).when(b.EditBroadcast(name="x", at=T1)).then_raises(NotFound)


def test_delete_a_draft():
    state = given(CREATED).when(b.DeleteBroadcast(at=T1)).then(b.BroadcastDeleted(at=T1))
    assert state.deleted


def test_delete_retried_is_a_no_op():
    given(CREATED, b.BroadcastDeleted(at=T1)).when(b.DeleteBroadcast(at=T1)).then()


def test_delete_of_a_missing_broadcast_is_not_found():
    given().when(b.DeleteBroadcast(at=T1)).then_raises(NotFound)


# ---- send, snapshot, finish ----

STARTED = b.BroadcastStarted(
    run=1, tenant_id=TENANT, channel="email", list_id=LIST, provider_id=PROVIDER, audience_size=3, at=T1
)
SNAPSHOTTED = b.AudienceSnapshotted(run=1, recipients=3, batches=1, at=T1)


def test_send_a_draft_starts_run_one():
    state = given(CREATED).when(b.SendBroadcast(audience_size=3, at=T1)).then(STARTED)
    assert state.status is b.Status.QUEUED and state.run == 1


def test_send_retried_while_running_is_a_no_op():
    given(CREATED, STARTED).when(b.SendBroadcast(audience_size=3, at=T1)).then()
    given(CREATED, STARTED, SNAPSHOTTED).when(b.SendBroadcast(audience_size=3, at=T1)).then()


@pytest.mark.parametrize("missing", ["list_id", "provider_id"])
def test_send_without_list_or_provider_names_the_field(missing):
    created = b.BroadcastCreated(**{**{f: getattr(CREATED, f) for f in CREATED.__struct_fields__}, missing: None})
    given(created).when(b.SendBroadcast(audience_size=0, at=T1)).then_raises(Invalid, field=missing)


def test_snapshot_moves_a_queued_run_to_sending():
    command = b.RecordSnapshot(run=1, recipients=3, batches=1, at=T1)
    state = given(CREATED, STARTED).when(command).then(SNAPSHOTTED)
    assert state.status is b.Status.SENDING


def test_snapshot_recorded_twice_is_a_no_op():
    given(CREATED, STARTED, SNAPSHOTTED).when(b.RecordSnapshot(run=1, recipients=3, batches=1, at=T1)).then()


def test_an_empty_audience_completes_at_once():
    command = b.RecordSnapshot(run=1, recipients=0, batches=0, at=T1)
    state = given(CREATED, STARTED).when(command).then(
        b.AudienceSnapshotted(run=1, recipients=0, batches=0, at=T1),
        b.BroadcastCompleted(run=1, total=0, sent=0, failed=0, at=T1),
    )
    assert state.status is b.Status.COMPLETED


# How a run ends, from its ledger counts. `failed` only when every recipient failed for sure: an
# unknown outcome (handed to the provider, no answer) may have been delivered, so a run with
# unknowns is partially failed, never completed, and its reason says so.
FINISHES = {  # (total, sent, failed, unknown): the event
    "all sent": ((20, 20, 0, 0), b.BroadcastCompleted(run=1, total=20, sent=20, failed=0, unknown=0, at=T1)),
    "some failed": ((20, 18, 2, 0), b.BroadcastPartiallyFailed(
        run=1, total=20, sent=18, failed=2, unknown=0, reason="2 of 20 recipients failed", at=T1)),
    "only unknowns": ((20, 19, 0, 1), b.BroadcastPartiallyFailed(
        run=1, total=20, sent=19, failed=0, unknown=1, reason="outcome unknown for 1 of 20 recipients", at=T1)),
    "failed and unknown": ((20, 17, 2, 1), b.BroadcastPartiallyFailed(
        run=1, total=20, sent=17, failed=2, unknown=1, reason="2 of 20 recipients failed; outcome unknown for 1",
        at=T1)),
    "all failed": ((20, 0, 20, 0), b.BroadcastFailed(
        run=1, reason="every recipient failed", total=20, sent=0, failed=20, unknown=0, at=T1)),
    "all unknown": ((20, 0, 0, 20), b.BroadcastPartiallyFailed(
        run=1, total=20, sent=0, failed=0, unknown=20, reason="outcome unknown for 20 of 20 recipients", at=T1)),
    "failed and unknown, none sent": ((20, 0, 19, 1), b.BroadcastPartiallyFailed(
        run=1, total=20, sent=0, failed=19, unknown=1, reason="19 of 20 recipients failed; outcome unknown for 1",
        at=T1)),
    "one recipient, unknown": ((1, 0, 0, 1), b.BroadcastPartiallyFailed(
        run=1, total=1, sent=0, failed=0, unknown=1, reason="outcome unknown for 1 of 1 recipient", at=T1)),
}
STATUS_AFTER = {"all sent": "completed", "all failed": "failed"}  # partially_failed otherwise


@pytest.mark.parametrize("case", list(FINISHES))
def test_the_ledger_counts_decide_how_a_run_ends(case):
    (total, sent, failed, unknown), expected = FINISHES[case]
    finish = b.FinishRun(run=1, total=total, sent=sent, failed=failed, unknown=unknown, at=T1)
    state = given(CREATED, STARTED, SNAPSHOTTED).when(finish).then(expected)
    assert state.status.value == STATUS_AFTER.get(case, "partially_failed")


def test_finish_replayed_after_the_run_ended_is_a_no_op():
    done = b.BroadcastCompleted(run=1, total=3, sent=3, failed=0, at=T1)
    given(CREATED, STARTED, SNAPSHOTTED, done).when(b.FinishRun(run=1, total=3, sent=3, failed=0, at=T1)).then()


def test_finish_of_another_run_is_ignored():
    given(CREATED, STARTED, SNAPSHOTTED).when(b.FinishRun(run=2, total=3, sent=3, failed=0, at=T1)).then()


def test_a_run_that_cannot_be_carried_out_fails():
    state = given(CREATED, STARTED).when(b.FailRun(run=1, reason="provider gone", at=T1)).then(
        b.BroadcastFailed(run=1, reason="provider gone", at=T1)
    )
    assert state.status is b.Status.FAILED


@pytest.mark.parametrize("status", [b.Status.QUEUED, b.Status.SENDING])
def test_a_running_broadcast_cannot_be_edited_or_deleted(status):
    events = [CREATED, STARTED] + ([SNAPSHOTTED] if status is b.Status.SENDING else [])
    given(*events).when(b.EditBroadcast(name="x", at=T1)).then_raises(WrongStatus, status=status.value)
    given(*events).when(b.DeleteBroadcast(at=T1)).then_raises(WrongStatus, status=status.value)


# ---- retry: the latest run's failed / unknown recipients again ----

T2 = datetime(2026, 11, 22, 12, 10, tzinfo=timezone.utc)
PARTIAL = b.BroadcastPartiallyFailed(run=1, total=20, sent=17, failed=2, unknown=1,
                                     reason="2 of 20 recipients failed; outcome unknown for 1", at=T1)
ENDED_RUN = {  # each status a run can end in, reached by a plausible history
    "completed": (CREATED, STARTED, SNAPSHOTTED, b.BroadcastCompleted(run=1, total=3, sent=3, failed=0, at=T1)),
    "partially_failed": (CREATED, STARTED, SNAPSHOTTED, PARTIAL),
    "failed": (CREATED, STARTED, SNAPSHOTTED,
               b.BroadcastFailed(run=1, reason="every recipient failed", total=3, sent=0, failed=3, at=T1)),
    "cancelled": (CREATED, STARTED, SNAPSHOTTED, b.BroadcastCancelled(run=1, at=T1)),
}


def retry_started(run: int = 2, retry_of: int = 1, statuses=("failed",), failed: int = 2, unknown: int = 0,
                  reset_run: int = 0) -> b.BroadcastStarted:
    return b.BroadcastStarted(
        run=run, tenant_id=TENANT, channel="email", list_id=LIST, provider_id=PROVIDER, audience_size=failed + unknown,
        at=T2, top_up=False, reset_run=reset_run, retry_of=retry_of, retry_statuses=statuses,
        retried_failed=failed, retried_unknown=unknown,
    )


def test_a_retry_of_the_failed_starts_a_run_to_them_alone():
    # The handler counted 2 failed and 1 unknown in run 1; only the failed were asked for.
    retry = b.RetryBroadcast(statuses=("failed",), failed=2, unknown=1, at=T2)
    state = given(*ENDED_RUN["partially_failed"]).when(retry).then(retry_started(failed=2, unknown=0))
    assert (state.status, state.run, state.retry_of, state.retry_statuses) == (b.Status.QUEUED, 2, 1, ("failed",))


def test_a_retry_of_both_statuses_names_them_in_one_order_whatever_was_asked():
    retry = b.RetryBroadcast(statuses=("unknown", "failed", "unknown"), failed=2, unknown=1, at=T2)
    given(*ENDED_RUN["partially_failed"]).when(retry).then(
        retry_started(statuses=("failed", "unknown"), failed=2, unknown=1))


def test_a_retry_of_the_unknown_only():
    retry = b.RetryBroadcast(statuses=("unknown",), failed=2, unknown=1, at=T2)
    given(*ENDED_RUN["partially_failed"]).when(retry).then(retry_started(statuses=("unknown",), failed=0, unknown=1))


@pytest.mark.parametrize("status", list(ENDED_RUN))
def test_a_retry_may_start_once_the_latest_run_ended_however(status):
    retry = b.RetryBroadcast(statuses=("failed",), failed=1, unknown=0, at=T2)
    given(*ENDED_RUN[status]).when(retry).then(retry_started(failed=1))


REFUSED = {  # a retry is refused (409 naming the status) unless the latest run ended
    "draft, never sent": (CREATED,),
    "draft, after a stop": (CREATED, STARTED, SNAPSHOTTED, b.BroadcastStopped(run=1, at=T1)),
    "draft, after a reset": (*ENDED_RUN["partially_failed"], b.BroadcastReset(through_run=1, at=T1)),
    "scheduled": (CREATED, b.BroadcastScheduled(scheduled_at=T2, schedule=b.Schedule(), at=T0)),
    "queued": (CREATED, STARTED),
    "sending": (CREATED, STARTED, SNAPSHOTTED),
    "paused": (CREATED, STARTED, SNAPSHOTTED, b.BroadcastPaused(run=1, at=T1)),
    "paused retry": (*ENDED_RUN["partially_failed"], retry_started(),
                     b.AudienceSnapshotted(run=2, recipients=2, batches=1, at=T2, retried_failed=2),
                     b.BroadcastPaused(run=2, at=T2)),
    "another retry under way": (*ENDED_RUN["partially_failed"], retry_started(statuses=("unknown",), failed=0,
                                                                              unknown=1)),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_retry_before_the_latest_run_ended_is_refused_naming_the_status(case):
    history = REFUSED[case]
    retry = b.RetryBroadcast(statuses=("failed",), failed=1, unknown=0, at=T2)
    given(*history).when(retry).then_raises(WrongStatus, status=b.fold(list(history)).status.value)


@pytest.mark.parametrize("statuses", [("failed",), ("failed", "failed")])
def test_a_retry_repeated_while_the_run_it_started_is_under_way_is_a_no_op(statuses):
    retry = b.RetryBroadcast(statuses=statuses, failed=2, unknown=0, at=T2)
    queued = (*ENDED_RUN["partially_failed"], retry_started())
    given(*queued).when(retry).then()
    given(*queued, b.AudienceSnapshotted(run=2, recipients=2, batches=1, at=T2, retried_failed=2)).when(retry).then()


def test_a_retry_with_nobody_to_retry_is_a_conflict_naming_the_run_and_statuses():
    retry = b.RetryBroadcast(statuses=("unknown", "failed"), failed=0, unknown=0, at=T2)
    given(*ENDED_RUN["completed"]).when(retry).then_raises(
        Conflict, code="nothing_to_retry", extra={"run": 1, "statuses": ["failed", "unknown"]})


def test_counts_of_statuses_not_asked_for_do_not_make_a_retry():
    retry = b.RetryBroadcast(statuses=("failed",), failed=0, unknown=5, at=T2)
    given(*ENDED_RUN["partially_failed"]).when(retry).then_raises(Conflict, code="nothing_to_retry")


@pytest.mark.parametrize("statuses", [(), ("sent",), ("failed", "queued")])
def test_a_retry_of_other_statuses_is_invalid_naming_the_field(statuses):
    retry = b.RetryBroadcast(statuses=statuses, failed=2, unknown=1, at=T2)
    given(*ENDED_RUN["partially_failed"]).when(retry).then_raises(Invalid, field="statuses")


def test_a_retry_of_a_missing_or_deleted_broadcast_is_not_found():
    retry = b.RetryBroadcast(statuses=("failed",), failed=2, unknown=0, at=T2)
    given().when(retry).then_raises(NotFound)
    given(*ENDED_RUN["partially_failed"], b.BroadcastDeleted(at=T2)).when(retry).then_raises(NotFound)


def test_a_retry_run_records_its_snapshot_split_and_ends_by_its_own_outcome():
    started = (*ENDED_RUN["partially_failed"], retry_started(statuses=("failed", "unknown"), failed=2, unknown=1))
    # The snapshot left out one failed recipient deleted since the retry was accepted.
    snapshot = b.RecordSnapshot(run=2, recipients=2, batches=1, at=T2, retried_failed=1, retried_unknown=1)
    snapshotted = b.AudienceSnapshotted(run=2, recipients=2, batches=1, at=T2, retried_failed=1, retried_unknown=1)
    given(*started).when(snapshot).then(snapshotted)
    state = given(*started, snapshotted).when(b.FinishRun(run=2, total=2, sent=2, failed=0, at=T2)).then(
        b.BroadcastCompleted(run=2, total=2, sent=2, failed=0, unknown=0, at=T2))
    assert state.status is b.Status.COMPLETED


def test_a_retry_of_a_retry_goes_back_one_run_and_a_send_after_it_is_a_top_up_again():
    retried = (*ENDED_RUN["partially_failed"], retry_started(),
               b.AudienceSnapshotted(run=2, recipients=2, batches=1, at=T2, retried_failed=2),
               b.BroadcastPartiallyFailed(run=2, total=2, sent=1, failed=1, reason="1 of 2 recipients failed", at=T2))
    retry = b.RetryBroadcast(statuses=("failed",), failed=1, unknown=0, at=T2)
    given(*retried).when(retry).then(retry_started(run=3, retry_of=2, failed=1))
    state = given(*retried).when(b.SendBroadcast(audience_size=4, at=T2)).then(b.BroadcastStarted(
        run=3, tenant_id=TENANT, channel="email", list_id=LIST, provider_id=PROVIDER, audience_size=4, at=T2))
    assert (state.retry_of, state.retry_statuses) == (0, ())


def test_tracking_is_set_at_create_and_changed_by_an_edit():
    tracks = b.Tracking(opens=True, clicks=True)
    created = msgspec.structs.replace(CREATED, tracking=tracks)
    given().when(msgspec.structs.replace(CREATE, tracking=tracks)).then(created)
    state = given(created).when(b.EditBroadcast(tracking=b.Tracking(clicks=True), at=T1)).then(
        b.BroadcastEdited(tracking=b.Tracking(clicks=True), at=T1))
    assert state.tracking == b.Tracking(opens=False, clicks=True, text_links=False)
    given(created).when(b.EditBroadcast(tracking=tracks, at=T1)).then()  # unchanged: nothing recorded
