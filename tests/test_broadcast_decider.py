"""Given/when/then for the Broadcast decider: create, edit, delete, send and a run's outcome.

The rest of the lifecycle (schedule, pause, cancel, stop, reset, top-up) is in test_broadcast_lifecycle.py."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from shared.broadcasts import decider as b
from shared.broadcasts.handlers import DECIDER
from shared.kernel.errors import AlreadyExists, Invalid, NotFound, WrongStatus
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


@pytest.mark.parametrize(
    "sent, failed, expected",
    [
        (3, 0, b.BroadcastCompleted(run=1, total=3, sent=3, failed=0, at=T1)),
        (2, 1, b.BroadcastPartiallyFailed(run=1, total=3, sent=2, failed=1, at=T1)),
        (0, 3, b.BroadcastFailed(run=1, reason="every recipient failed", total=3, sent=0, failed=3, at=T1)),
    ],
    ids=["completed", "partially_failed", "failed"],
)
def test_the_last_batch_outcome_decides_the_final_status(sent, failed, expected):
    given(CREATED, STARTED, SNAPSHOTTED).when(b.FinishRun(run=1, total=3, sent=sent, failed=failed, at=T1)).then(
        expected
    )


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
