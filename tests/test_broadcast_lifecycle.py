"""Given/when/then for every lifecycle transition, allowed and refused, with idempotent repeats: the
whole transition table written out, then the details of each kind of transition."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import msgspec
import pytest

from shared.broadcasts import decider as b
from shared.kernel.errors import Invalid, WrongStatus
from tests.test_broadcast_decider import CREATED, SNAPSHOTTED, STARTED, T1, given

T2 = T1 + timedelta(minutes=5)
LATER = T1 + timedelta(days=1)
ONE_OFF = b.Schedule(timezone="Europe/Berlin")
DAILY = b.Schedule(recurrence=b.Recurrence(cron="0 9 * * *", timezone="America/New_York"), missed_policy="skip")
SCHEDULED = b.BroadcastScheduled(scheduled_at=LATER, schedule=ONE_OFF, at=T1)
PAUSED = b.BroadcastPaused(run=1, at=T2)
COMPLETED = b.BroadcastCompleted(run=1, total=3, sent=3, failed=0, at=T2)
CANCELLED = b.BroadcastCancelled(run=1, at=T2)

# Every status, reached by a plausible history.
HISTORY = {
    b.Status.DRAFT: (CREATED,),
    b.Status.SCHEDULED: (CREATED, SCHEDULED),
    b.Status.QUEUED: (CREATED, STARTED),
    b.Status.SENDING: (CREATED, STARTED, SNAPSHOTTED),
    b.Status.PAUSED: (CREATED, STARTED, SNAPSHOTTED, PAUSED),
    b.Status.COMPLETED: (CREATED, STARTED, SNAPSHOTTED, COMPLETED),
    b.Status.PARTIALLY_FAILED: (CREATED, STARTED, SNAPSHOTTED,
                                b.BroadcastPartiallyFailed(run=1, total=3, sent=2, failed=1, at=T2)),
    b.Status.FAILED: (CREATED, STARTED, b.BroadcastFailed(run=1, reason="provider gone", at=T2)),
    b.Status.CANCELLED: (CREATED, STARTED, SNAPSHOTTED, CANCELLED),
}


def status_after(*events: b.Event) -> b.Status:
    return b.fold(list(events)).status


def test_every_history_reaches_its_status():
    for status, events in HISTORY.items():
        assert status_after(*events) is status


# ---- the transition table ------------------------------------------------------------------------
# Each cell: the event a command in that status produces and the status it leaves, "no-op" (a
# retried command that already took effect: nothing is appended), or 409 (refused, naming the
# status). Written out by hand, so that a wrong status group in the decider shows up here.

COMMANDS = {
    "send": b.SendBroadcast(audience_size=2, at=T2),
    "schedule": b.ScheduleBroadcast(scheduled_at=LATER + timedelta(days=9), schedule=ONE_OFF, at=T2),
    "pause": b.PauseBroadcast(at=T2),
    "resume": b.ResumeBroadcast(at=T2),
    "cancel": b.CancelBroadcast(at=T2),
    "stop": b.StopBroadcast(at=T2),
    "reset": b.ResetBroadcast(at=T2),
    "edit": b.EditBroadcast(name="Renamed", at=T2),
    "delete": b.DeleteBroadcast(at=T2),
    # the handler counted one failed recipient in the latest run (a run in the table is no retry)
    "retry": b.RetryBroadcast(statuses=("failed",), failed=1, unknown=0, at=T2),
}
TABLE = {  # status: (send, schedule, pause, resume, cancel, stop, reset, edit, delete, retry)
    "draft": ("BroadcastStarted queued", "BroadcastScheduled scheduled", 409, 409, 409, "no-op", "no-op",
              "BroadcastEdited draft", "BroadcastDeleted draft", 409),
    "scheduled": ("BroadcastStarted queued", "BroadcastScheduled scheduled", 409, 409, "BroadcastCancelled cancelled",
                  "BroadcastStopped draft", 409, "BroadcastEdited scheduled", "BroadcastDeleted scheduled", 409),
    "queued": ("no-op", 409, 409, "no-op", "BroadcastCancelled cancelled", "BroadcastStopped draft", 409, 409, 409,
               409),
    "sending": ("no-op", 409, "BroadcastPaused paused", "no-op", "BroadcastCancelled cancelled",
                "BroadcastStopped draft", 409, 409, 409, 409),
    "paused": (409, 409, "no-op", "BroadcastResumed sending", "BroadcastCancelled cancelled", "BroadcastStopped draft",
               409, "BroadcastEdited paused", 409, 409),
    "completed": ("BroadcastStarted queued", 409, 409, 409, 409, 409, "BroadcastReset draft", 409,
                  "BroadcastDeleted completed", "BroadcastStarted queued"),
    "partially_failed": ("BroadcastStarted queued", 409, 409, 409, 409, 409, "BroadcastReset draft", 409,
                         "BroadcastDeleted partially_failed", "BroadcastStarted queued"),
    "failed": ("BroadcastStarted queued", 409, 409, 409, 409, 409, "BroadcastReset draft", 409,
               "BroadcastDeleted failed", "BroadcastStarted queued"),
    "cancelled": ("BroadcastStarted queued", 409, 409, 409, "no-op", 409, "BroadcastReset draft", 409,
                  "BroadcastDeleted cancelled", "BroadcastStarted queued"),
}
CELLS = [(status, command, TABLE[status][i]) for status in TABLE for i, command in enumerate(COMMANDS)]


def test_the_table_covers_every_status():
    assert sorted(TABLE) == sorted(s.value for s in b.Status)


@pytest.mark.parametrize("status, command, expected", CELLS, ids=[f"{s}-{c}" for s, c, _ in CELLS])
def test_transition_table(status, command, expected):
    scenario = given(*HISTORY[b.Status(status)]).when(COMMANDS[command])
    if expected == 409:
        scenario.then_raises(WrongStatus, status=status)
        return
    state = b.fold(list(HISTORY[b.Status(status)]))
    produced = b.decide(COMMANDS[command], state)
    if expected == "no-op":
        assert produced == []
        return
    event_type, after = expected.split()
    assert [type(e).__name__ for e in produced] == [event_type]
    assert b.fold(produced, state).status.value == after


# ---- send (always a top-up) ----------------------------------------------------------------------

def test_send_after_a_cancel_starts_a_top_up_run():
    state = given(*HISTORY[b.Status.CANCELLED]).when(b.SendBroadcast(audience_size=2, at=T2)).then(
        b.BroadcastStarted(run=2, tenant_id=STARTED.tenant_id, channel="email", list_id=STARTED.list_id,
                           provider_id=STARTED.provider_id, audience_size=2, at=T2, top_up=True, reset_run=0)
    )
    assert state.status is b.Status.QUEUED and state.scheduled_at is None


def test_send_with_nobody_left_to_reach_changes_nothing():
    given(*HISTORY[b.Status.COMPLETED]).when(b.SendBroadcast(audience_size=0, at=T2)).then()


def test_a_top_up_after_a_reset_counts_only_runs_after_it():
    reset = b.BroadcastReset(through_run=1, at=T2)
    started = given(*HISTORY[b.Status.COMPLETED], reset).when(b.SendBroadcast(audience_size=3, at=T2)).then(
        b.BroadcastStarted(run=2, tenant_id=STARTED.tenant_id, channel="email", list_id=STARTED.list_id,
                           provider_id=STARTED.provider_id, audience_size=3, at=T2, top_up=True, reset_run=1)
    )
    assert started.run == 2


# ---- schedule -------------------------------------------------------------------------------------

def test_schedule_a_draft_for_later():
    state = given(CREATED).when(b.ScheduleBroadcast(scheduled_at=LATER, schedule=ONE_OFF, at=T1)).then(SCHEDULED)
    assert state.status is b.Status.SCHEDULED and state.scheduled_at == LATER


def test_reschedule_and_retried_schedule():
    other = LATER + timedelta(hours=1)
    given(CREATED, SCHEDULED).when(b.ScheduleBroadcast(scheduled_at=other, schedule=ONE_OFF, at=T2)).then(
        b.BroadcastScheduled(scheduled_at=other, schedule=ONE_OFF, at=T2)
    )
    given(CREATED, SCHEDULED).when(b.ScheduleBroadcast(scheduled_at=LATER, schedule=ONE_OFF, at=T2)).then()


@pytest.mark.parametrize("when", [T1, T1 - timedelta(seconds=1)], ids=["now", "past"])
def test_a_time_not_in_the_future_is_invalid(when):
    given(CREATED).when(b.ScheduleBroadcast(scheduled_at=when, schedule=ONE_OFF, at=T1)).then_raises(
        Invalid, field="scheduled_at"
    )


def test_a_recurring_schedule_is_set_to_the_next_cron_occurrence_in_its_zone():
    state = given(CREATED).when(b.ScheduleBroadcast(scheduled_at=None, schedule=DAILY, at=T1)).then(
        b.BroadcastScheduled(scheduled_at=datetime(2026, 11, 22, 14, 0, tzinfo=timezone.utc), schedule=DAILY, at=T1)
    )
    assert state.recurring


@pytest.mark.parametrize("field, schedule", [
    ("cron", b.Schedule(recurrence=b.Recurrence(cron="61 * * * *"))),
    ("cron", b.Schedule(recurrence=b.Recurrence(cron="* * * *"))),
    ("timezone", b.Schedule(timezone="Mars/Olympus")),
    ("missed_policy", b.Schedule(missed_policy="maybe")),
])
def test_a_bad_schedule_names_its_field(field, schedule):
    given(CREATED).when(b.ScheduleBroadcast(scheduled_at=LATER, schedule=schedule, at=T1)).then_raises(
        Invalid, field=field
    )


# ---- the scheduler firing -------------------------------------------------------------------------

def test_a_due_one_off_occurrence_starts_a_top_up_run_once():
    fire = b.FireOccurrence(occurrence_at=LATER, audience_size=3, at=LATER + timedelta(seconds=2))
    started = b.BroadcastStarted(run=1, tenant_id=STARTED.tenant_id, channel="email", list_id=STARTED.list_id,
                                 provider_id=STARTED.provider_id, audience_size=3, at=fire.at, top_up=True,
                                 occurrence_at=LATER)
    given(CREATED, SCHEDULED).when(fire).then(started)
    given(CREATED, SCHEDULED, started).when(fire).then()  # a second scheduler, or a retry


def test_an_occurrence_that_is_no_longer_the_scheduled_one_does_nothing():
    given(CREATED, SCHEDULED).when(b.FireOccurrence(occurrence_at=T2, audience_size=3, at=LATER)).then()


def test_a_recurring_run_goes_to_the_whole_audience_and_is_rescheduled_when_it_ends():
    first = datetime(2026, 11, 22, 14, 0, tzinfo=timezone.utc)
    scheduled = b.BroadcastScheduled(scheduled_at=first, schedule=DAILY, at=T1)
    fire = b.FireOccurrence(occurrence_at=first, audience_size=3, at=first)
    state = given(CREATED, scheduled).when(fire).then(
        b.BroadcastStarted(run=1, tenant_id=STARTED.tenant_id, channel="email", list_id=STARTED.list_id,
                           provider_id=STARTED.provider_id, audience_size=3, at=first, top_up=False,
                           occurrence_at=first)
    )
    assert state.recurring
    started = b.fold([CREATED, scheduled, b.BroadcastStarted(
        run=1, tenant_id=STARTED.tenant_id, channel="email", list_id=STARTED.list_id,
        provider_id=STARTED.provider_id, audience_size=3, at=first, top_up=False, occurrence_at=first)])
    done_at = first + timedelta(minutes=3)
    events = b.decide(b.RecordSnapshot(run=1, recipients=3, batches=1, at=done_at), started)
    state = b.fold(events, started)
    events = b.decide(b.FinishRun(run=1, total=3, sent=3, failed=0, at=done_at), state)
    assert events == [
        b.BroadcastCompleted(run=1, total=3, sent=3, failed=0, at=done_at),
        b.BroadcastScheduled(scheduled_at=first + timedelta(days=1), schedule=DAILY, at=done_at),
    ]
    assert b.fold(events, state).status is b.Status.SCHEDULED


def test_a_missed_occurrence_under_skip_is_recorded_and_the_next_one_scheduled():
    first = datetime(2026, 11, 22, 14, 0, tzinfo=timezone.utc)
    scheduled = b.BroadcastScheduled(scheduled_at=first, schedule=DAILY, at=T1)
    late = first + timedelta(hours=2)
    given(CREATED, scheduled).when(b.FireOccurrence(occurrence_at=first, audience_size=3, at=late)).then(
        b.OccurrenceSkipped(occurrence_at=first, reason="missed by 7200 s (skip policy allows 60 s)", at=late),
        b.BroadcastScheduled(scheduled_at=first + timedelta(days=1), schedule=DAILY, at=late),
    )


def test_a_missed_occurrence_under_send_goes_out_late_within_max_lateness_only():
    policy = b.Schedule(missed_policy="send", max_lateness_s=3600)
    scheduled = b.BroadcastScheduled(scheduled_at=LATER, schedule=policy, at=T1)
    events = b.decide(b.FireOccurrence(occurrence_at=LATER, audience_size=3, at=LATER + timedelta(minutes=50)),
                      b.fold([CREATED, scheduled]))
    assert [type(e) for e in events] == [b.BroadcastStarted]
    too_late = LATER + timedelta(hours=2)
    state = given(CREATED, scheduled).when(b.FireOccurrence(occurrence_at=LATER, audience_size=3, at=too_late)).then(
        b.OccurrenceSkipped(occurrence_at=LATER, reason="missed by 7200 s (send policy allows 3600 s)", at=too_late)
    )
    assert state.status is b.Status.DRAFT  # a skipped one-off schedule goes back to draft


# ---- pause / resume -------------------------------------------------------------------------------

def test_pause_a_sending_run_and_resume_it():
    state = given(*HISTORY[b.Status.SENDING]).when(b.PauseBroadcast(at=T2)).then(PAUSED)
    assert state.status is b.Status.PAUSED
    state = given(*HISTORY[b.Status.PAUSED]).when(b.ResumeBroadcast(at=T2)).then(
        b.BroadcastResumed(run=1, resumes=1, at=T2)
    )
    assert state.status is b.Status.SENDING


def test_pause_and_resume_repeated_are_no_ops():
    given(*HISTORY[b.Status.PAUSED]).when(b.PauseBroadcast(at=T2)).then()
    given(*HISTORY[b.Status.SENDING]).when(b.ResumeBroadcast(at=T2)).then()


def test_a_paused_run_whose_last_batches_were_in_flight_still_finishes():
    given(*HISTORY[b.Status.PAUSED]).when(b.FinishRun(run=1, total=3, sent=3, failed=0, at=T2)).then(
        b.BroadcastCompleted(run=1, total=3, sent=3, failed=0, at=T2)
    )


# ---- cancel / stop / reset ------------------------------------------------------------------------

def test_cancel_of_a_scheduled_broadcast_drops_its_schedule():
    state = given(*HISTORY[b.Status.SCHEDULED]).when(b.CancelBroadcast(at=T2)).then(b.BroadcastCancelled(run=0, at=T2))
    assert (state.status, state.scheduled_at, state.schedule) == (b.Status.CANCELLED, None, None)


def test_reset_clears_the_reached_set_through_the_last_run():
    state = given(*HISTORY[b.Status.PARTIALLY_FAILED]).when(b.ResetBroadcast(at=T2)).then(
        b.BroadcastReset(through_run=1, at=T2))
    assert (state.status, state.reset_run) == (b.Status.DRAFT, 1)


def test_cancel_repeated_is_a_no_op():
    given(*HISTORY[b.Status.CANCELLED]).when(b.CancelBroadcast(at=T2)).then()


def test_stop_repeated_is_a_no_op():
    given(*HISTORY[b.Status.SENDING], b.BroadcastStopped(run=1, at=T2)).when(b.StopBroadcast(at=T2)).then()


def test_reset_repeated_is_a_no_op():
    given(*HISTORY[b.Status.COMPLETED], b.BroadcastReset(through_run=1, at=T2)).when(b.ResetBroadcast(at=T2)).then()



def test_a_paused_run_keeps_its_template():
    # Given a template broadcast whose run is paused
    template = uuid.UUID(int=50)
    created = msgspec.structs.replace(CREATED, content=b.Content(), template_id=template)
    started = msgspec.structs.replace(STARTED, template_id=template, template_version=3)
    paused = b.BroadcastPaused(run=1, at=T1)
    # When another template, or inline content, is asked for, it is refused naming the field
    for edit in (b.EditBroadcast(template_id=uuid.UUID(int=51), at=T1), b.EditBroadcast(template_id=None, at=T1)):
        given(created, started, paused).when(edit).then_raises(Invalid, field="template_id")
