"""The Broadcast aggregate: its events, state, and the pure `decide` and `evolve`.

One stream per broadcast (`broadcast-<id>`). Per-recipient outcomes are not events here; they
live in the messages ledger (docs/architecture.md).
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import assert_never

import msgspec
from msgspec import UNSET, UnsetType

from shared.broadcasts.status import (
    ACTIVE,
    CANCELLABLE,
    DELETABLE,
    EDITABLE,
    RESETTABLE,
    RETRYABLE,
    RUNNING,
    SCHEDULABLE,
    SENDABLE,
    STOPPABLE,
    Status,
)
from shared.kernel import streams
from shared.kernel.audience import Audience
from shared.kernel.content import CHANNEL_POLICIES, CHANNELS, Content, missing_channels
from shared.kernel.errors import AlreadyExists, Conflict, Invalid, NotFound, WrongStatus
from shared.kernel.limits import (
    MAX_CONTENT_BYTES,
    MAX_PROVIDER_POOL,
    MAX_SCHEDULE_AHEAD_DAYS,
)

CATEGORY = "broadcast"


def stream_name(broadcast_id: uuid.UUID) -> str:
    return streams.stream_name(CATEGORY, broadcast_id)


def id_from_stream(stream_name: str) -> uuid.UUID:
    """The broadcast id of a `broadcast-<id>` stream; ValueError for anything else."""
    return uuid.UUID(streams.id_of(stream_name))


# An occurrence due this long ago is still sent under missed_policy "skip" (scheduler tick jitter).
SKIP_GRACE_S = 60

# The ledger statuses a retry may go to again: `failed` (the provider refused, or gave up after its
# retries) and `unknown` (handed over, then nobody heard back: it may have arrived, so a retry of
# it is the user's choice, never automatic). In this order in events, whatever order was asked.
RETRY_STATUSES = ("failed", "unknown")


class Recurrence(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cron: str  # 5 fields, in `timezone`
    timezone: str = "UTC"


class Schedule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When a scheduled broadcast fires. One-off (`recurrence` None) or recurring (a cron)."""

    recurrence: Recurrence | None = None
    timezone: str = "UTC"
    # What to do with an occurrence that was due while nothing ran: "send" it late (unless later
    # than max_lateness_s) or "skip" it (anything later than SKIP_GRACE_S), recording the skip.
    missed_policy: str = "send"
    max_lateness_s: int = 3600


class Routing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """The channels a broadcast sends on beyond its first (`channel`), how a recipient's are
    picked, and the provider of each (the first channel's is `provider_id`)."""

    channels: tuple[str, ...] = ()  # all of them, `channel` first; () means just `channel`
    channel_policy: str = "all"  # or "first_available" (shared/kernel/content.py)
    providers: dict[str, uuid.UUID] = {}  # channel -> provider, for the channels after the first


def provider_of(channel: str, first: str, first_provider: uuid.UUID | None, routing: Routing | None) -> uuid.UUID | None:
    """The provider a broadcast sends `channel` through: `first_provider` for its first channel,
    the routing's for the others (None when it names none)."""
    if channel == first or routing is None:
        return first_provider
    return routing.providers.get(channel)


class Tracking(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a broadcast tracks (shared/tracking): opens (a pixel in email HTML), clicks (every
    literal http(s) link in email HTML becomes a signed redirect per recipient), and with
    `text_links` the links in plain text too (the email's text part, SMS, Telegram, push)."""

    opens: bool = False
    clicks: bool = False
    text_links: bool = False


NO_TRACKING = Tracking()


# ---- events (class names are the stored types: never rename) ----


class BroadcastCreated(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    broadcast_id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    channel: str
    list_id: uuid.UUID | None
    provider_id: uuid.UUID | None
    content: Content
    at: datetime
    # Who it goes to, when more than one list (`list_id` is then None); the two are never both set.
    audience: Audience | None = None
    routing: Routing | None = None  # more than one channel
    template_id: uuid.UUID | None = None  # the content is this template's (then `content` is empty)
    provider_ids: tuple[uuid.UUID, ...] = ()  # see State.provider_ids
    tracking: Tracking = NO_TRACKING


class BroadcastEdited(msgspec.Struct, frozen=True, kw_only=True, tag=True, omit_defaults=True):
    name: str | UnsetType = UNSET
    list_id: uuid.UUID | None | UnsetType = UNSET
    audience: Audience | None | UnsetType = UNSET
    provider_id: uuid.UUID | None | UnsetType = UNSET
    content: Content | UnsetType = UNSET
    at: datetime
    channel: str | UnsetType = UNSET
    routing: Routing | None | UnsetType = UNSET
    template_id: uuid.UUID | None | UnsetType = UNSET
    provider_ids: tuple[uuid.UUID, ...] | UnsetType = UNSET
    tracking: Tracking | UnsetType = UNSET


class BroadcastDeleted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    at: datetime


class BroadcastStarted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A run began: the planner snapshots the audience and splits it into batch jobs."""

    run: int
    tenant_id: uuid.UUID
    channel: str
    list_id: uuid.UUID | None  # the audience when it is one list (then `audience` is None)
    provider_id: uuid.UUID
    audience_size: int  # the audience counted when the send was accepted; the snapshot has the final figure
    at: datetime
    # A top-up run goes only to members not reached by runs after `reset_run`; a recurring
    # occurrence goes to the whole current audience.
    top_up: bool = True
    reset_run: int = 0
    occurrence_at: datetime | None = None  # the scheduled time it fired for, if any
    # A retry run (`top_up` false) goes to the recipients of run `retry_of` whose ledger status is
    # one of `retry_statuses` and who still have an address; `audience_size` of them when accepted,
    # of whom `retried_failed` had failed and `retried_unknown` had an unknown outcome (the
    # counters take them out of run `retry_of`'s figures: a recipient counts once, by its latest run).
    retry_of: int = 0
    retry_statuses: tuple[str, ...] = ()
    retried_failed: int = 0
    retried_unknown: int = 0
    audience: Audience | None = None
    routing: Routing | None = None
    template_id: uuid.UUID | None = None
    template_version: int = 0  # the template's version the run renders (a later edit does not reach it)
    provider_ids: tuple[uuid.UUID, ...] = ()  # see State.provider_ids

    @property
    def channels(self) -> tuple[str, ...]:
        return self.routing.channels if self.routing is not None and self.routing.channels else (self.channel,)

    def provider_of(self, channel: str) -> uuid.UUID:
        found = provider_of(channel, self.channel, self.provider_id, self.routing)
        assert found is not None  # a run starts only with a provider for each channel (_require_sendable)
        return found

    @property
    def target(self) -> Audience:
        """Who the run goes to (a retry: who of them the run retried reached, see above)."""
        if self.audience is not None:
            return self.audience
        return Audience(lists=(self.list_id,) if self.list_id is not None else ())


class AudienceSnapshotted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    run: int
    recipients: int
    batches: int
    at: datetime
    # A retry run's final split of `recipients` by their status in the run retried (the snapshot
    # leaves out contacts deleted or without an address since the retry was accepted).
    retried_failed: int = 0
    retried_unknown: int = 0
    # A multi-channel run: (recipient, channel) pairs left out for want of an address, recorded in the
    # ledger as `skipped` (not part of `recipients`).
    skipped: int = 0


class BroadcastCompleted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Every recipient of the run was sent (`unknown` is always 0 here: kept for one shape)."""

    run: int
    total: int
    sent: int
    failed: int
    at: datetime
    unknown: int = 0


class BroadcastPartiallyFailed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Not every recipient is known to have been sent: some failed, or their outcome is unknown
    (handed to the provider, no answer: they may have arrived), or both. `reason` says which."""

    run: int
    total: int
    sent: int
    failed: int
    at: datetime
    unknown: int = 0
    reason: str | None = None  # None in events stored before it was added


class BroadcastFailed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Every recipient failed for sure, or the run could not be carried out at all (`reason`)."""

    run: int
    reason: str
    total: int = 0
    sent: int = 0
    failed: int = 0
    at: datetime
    unknown: int = 0


class BroadcastScheduled(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """It will start by itself at `scheduled_at` (for a recurring one: its next occurrence)."""

    scheduled_at: datetime
    schedule: Schedule
    at: datetime


class OccurrenceSkipped(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An occurrence was due while nothing ran, and the missed policy said not to send it late."""

    occurrence_at: datetime
    reason: str
    at: datetime


class BroadcastPaused(msgspec.Struct, frozen=True, kw_only=True, tag=True, omit_defaults=True):
    run: int
    at: datetime
    # Why, when not by hand: "provider_error" when a provider's errors opened the breaker (the
    # provider's answer in `detail`); a resume tries again.
    reason: str | None = None
    detail: str | None = None


class BroadcastResumed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    run: int
    resumes: int  # how many times this run was resumed, this one included (new job ids per resume)
    at: datetime


class BroadcastCancelled(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Stopped for good; unsent messages of the run are dropped, the reached set is kept."""

    run: int
    at: datetime


class BroadcastStopped(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Back to draft; unsent messages of the run are dropped, the reached set is kept."""

    run: int
    at: datetime


class BroadcastReset(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Back to draft with the reached set cleared: runs up to `through_run` no longer count."""

    through_run: int
    at: datetime


class TestSent(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The content was sent to these addresses as a test; not part of any run or counter."""

    addresses: list[str]
    sent: int
    failed: int
    at: datetime


Event = (
    BroadcastCreated
    | BroadcastEdited
    | BroadcastDeleted
    | BroadcastStarted
    | AudienceSnapshotted
    | BroadcastCompleted
    | BroadcastPartiallyFailed
    | BroadcastFailed
    | BroadcastScheduled
    | OccurrenceSkipped
    | BroadcastPaused
    | BroadcastResumed
    | BroadcastCancelled
    | BroadcastStopped
    | BroadcastReset
    | TestSent
)


# ---- commands (time comes in the command: deciders read no clock) ----


class CreateBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    broadcast_id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    channel: str = "email"
    list_id: uuid.UUID | None = None
    audience: Audience | None = None  # instead of list_id: lists, segments, excludes, recipients
    provider_id: uuid.UUID | None = None
    content: Content
    at: datetime
    routing: Routing | None = None
    template_id: uuid.UUID | None = None
    provider_ids: tuple[uuid.UUID, ...] = ()  # see State.provider_ids
    tracking: Tracking = NO_TRACKING


# An edit of the content: the fields given replace the stored ones (a section replaces a section).
ContentChanges = msgspec.defstruct(
    "ContentChanges",
    [(f.name, f.type | UnsetType, UNSET) for f in msgspec.structs.fields(Content)],
    frozen=True, kw_only=True, forbid_unknown_fields=True, module=__name__,
)


class EditBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    name: str | UnsetType = UNSET
    list_id: uuid.UUID | None | UnsetType = UNSET  # replaces the audience with this one list
    audience: Audience | None | UnsetType = UNSET  # replaces the list (or the audience)
    provider_id: uuid.UUID | None | UnsetType = UNSET
    content: ContentChanges | UnsetType = UNSET  # type: ignore[valid-type]
    at: datetime
    channel: str | UnsetType = UNSET
    routing: Routing | None | UnsetType = UNSET
    template_id: uuid.UUID | None | UnsetType = UNSET
    provider_ids: tuple[uuid.UUID, ...] | UnsetType = UNSET  # sets provider_id to the first
    tracking: Tracking | UnsetType = UNSET


class DeleteBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime


class SendBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    audience_size: int
    at: datetime
    template_version: int = 0  # the template's current version, read by the handler (0: no template)


class RetryBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    """Send the latest run again to its recipients whose ledger status is one of `statuses`.

    `failed` and `unknown` are how many of that run's recipients had each status and still have
    an address, counted by the handler in the command's transaction (the decider reads no ledger)."""

    statuses: tuple[str, ...]
    failed: int
    unknown: int
    at: datetime
    template_version: int = 0


class RecordSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    run: int
    recipients: int
    batches: int
    at: datetime
    retried_failed: int = 0  # a retry run: of `recipients`, how many had failed in the run retried
    retried_unknown: int = 0  # ... and how many had an unknown outcome there
    skipped: int = 0  # a multi-channel run: pairs skipped for want of an address


class FinishRun(msgspec.Struct, frozen=True, kw_only=True):
    """Every batch of the run has an outcome; the counts come from the ledger."""

    run: int
    total: int
    sent: int
    failed: int
    at: datetime
    unknown: int = 0


class FailRun(msgspec.Struct, frozen=True, kw_only=True):
    run: int
    reason: str
    at: datetime


class ScheduleBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    """Schedule (or reschedule). One-off: `scheduled_at`; recurring: `schedule.recurrence`."""

    scheduled_at: datetime | None
    schedule: Schedule
    at: datetime
    # The shortest time a cron may leave between two occurrences (0: any): the deployment's
    # CRIER_MIN_CRON_INTERVAL_S, given by the caller, as the decider reads no settings.
    min_interval_s: int = 0


class FireOccurrence(msgspec.Struct, frozen=True, kw_only=True):
    """The scheduler found the broadcast due at `occurrence_at`."""

    occurrence_at: datetime
    audience_size: int
    at: datetime
    template_version: int = 0


class PauseBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    reason: str | None = None  # see BroadcastPaused
    detail: str | None = None
    run: int | None = None  # a sender's pause is for the run it sends: a later run is not paused by it


class ResumeBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime


class CancelBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime


class StopBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime


class ResetBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime


class RecordTestSend(msgspec.Struct, frozen=True, kw_only=True):
    addresses: list[str]
    sent: int
    failed: int
    at: datetime


Command = (
    CreateBroadcast
    | EditBroadcast
    | DeleteBroadcast
    | SendBroadcast
    | RetryBroadcast
    | RecordSnapshot
    | FinishRun
    | FailRun
    | ScheduleBroadcast
    | FireOccurrence
    | PauseBroadcast
    | ResumeBroadcast
    | CancelBroadcast
    | StopBroadcast
    | ResetBroadcast
    | RecordTestSend
)


# ---- state ----


class State(msgspec.Struct, frozen=True, kw_only=True):
    exists: bool = False
    deleted: bool = False
    status: Status = Status.DRAFT
    tenant_id: uuid.UUID | None = None
    name: str = ""
    channel: str = "email"
    list_id: uuid.UUID | None = None
    audience: Audience | None = None  # set instead of list_id for anything but one list
    provider_id: uuid.UUID | None = None
    content: Content | None = None
    routing: Routing | None = None
    template_id: uuid.UUID | None = None
    # The first channel's providers when it has more than one: `provider_id` is the first of them,
    # and they share its load by weight (their `weight` setting), a failing one skipped (the
    # sender's fail-over, sender_service/provider_pool.py). () when `provider_id` alone sends it.
    provider_ids: tuple[uuid.UUID, ...] = ()
    tracking: Tracking = NO_TRACKING  # like the content, an edit while paused reaches the rest of the run
    run: int = 0  # the latest run started (0: never sent)
    snapshotted: bool = False  # the latest run's audience has been split into batches
    resumes: int = 0  # times the latest run was resumed
    reset_run: int = 0  # runs up to this one no longer count as reached (a reset)
    retry_of: int = 0  # the latest run is a retry of this run (0: it is not a retry)
    retry_statuses: tuple[str, ...] = ()  # ... of its recipients with these ledger statuses
    scheduled_at: datetime | None = None  # the next occurrence, while scheduled (or recurring)
    schedule: Schedule | None = None

    @property
    def target(self) -> Audience | None:
        """Who the next run goes to: the audience, or the one list."""
        if self.audience is not None:
            return self.audience
        return Audience(lists=(self.list_id,)) if self.list_id is not None else None

    @property
    def recurring(self) -> bool:
        return self.schedule is not None and self.schedule.recurrence is not None

    @property
    def channels(self) -> tuple[str, ...]:
        """Every channel it sends on, `channel` first."""
        return self.routing.channels if self.routing is not None and self.routing.channels else (self.channel,)

    def provider_of(self, channel: str) -> uuid.UUID | None:
        return provider_of(channel, self.channel, self.provider_id, self.routing)

    @property
    def live(self) -> bool:
        """Created and not deleted: commands other than create act only on a live broadcast."""
        return self.exists and not self.deleted


INITIAL = State()


def evolve(state: State, event: Event) -> State:
    match event:
        case BroadcastCreated():
            return msgspec.structs.replace(
                state,
                exists=True,
                status=Status.DRAFT,
                tenant_id=event.tenant_id,
                name=event.name,
                channel=event.channel,
                list_id=event.list_id,
                audience=event.audience,
                provider_id=event.provider_id,
                content=event.content,
                routing=event.routing,
                template_id=event.template_id,
                provider_ids=event.provider_ids,
                tracking=event.tracking,
            )
        case BroadcastEdited():
            changes = {
                f: getattr(event, f)
                for f in _EDITABLE_FIELDS
                if getattr(event, f) is not UNSET
            }
            return msgspec.structs.replace(state, **changes)
        case BroadcastDeleted():
            return msgspec.structs.replace(state, deleted=True)
        case BroadcastStarted():
            # A recurring broadcast keeps its schedule (the next occurrence is set when the run ends);
            # a one-off schedule is used up.
            schedule = state.schedule if state.recurring else None
            return msgspec.structs.replace(
                state, status=Status.QUEUED, run=event.run, snapshotted=False, resumes=0, scheduled_at=None,
                schedule=schedule, retry_of=event.retry_of, retry_statuses=event.retry_statuses,
            )
        case AudienceSnapshotted():
            # Only a queued run is snapshotted: a run can be paused once it is `sending`, after this.
            return msgspec.structs.replace(state, status=Status.SENDING, snapshotted=True)
        case BroadcastCompleted():
            return msgspec.structs.replace(state, status=Status.COMPLETED)
        case BroadcastPartiallyFailed():
            return msgspec.structs.replace(state, status=Status.PARTIALLY_FAILED)
        case BroadcastFailed():
            return msgspec.structs.replace(state, status=Status.FAILED)
        case BroadcastScheduled():
            return msgspec.structs.replace(
                state, status=Status.SCHEDULED, scheduled_at=event.scheduled_at, schedule=event.schedule
            )
        case OccurrenceSkipped():
            # A recurring broadcast is rescheduled by the BroadcastScheduled that follows; a one-off
            # one goes back to draft.
            return msgspec.structs.replace(state, status=Status.DRAFT, scheduled_at=None, schedule=None)
        case BroadcastPaused():
            return msgspec.structs.replace(state, status=Status.PAUSED)
        case BroadcastResumed():
            return msgspec.structs.replace(state, status=Status.SENDING, resumes=event.resumes)
        case BroadcastCancelled():
            return msgspec.structs.replace(state, status=Status.CANCELLED, scheduled_at=None, schedule=None)
        case BroadcastStopped():
            return msgspec.structs.replace(state, status=Status.DRAFT, scheduled_at=None, schedule=None)
        case BroadcastReset():
            return msgspec.structs.replace(
                state, status=Status.DRAFT, reset_run=event.through_run, scheduled_at=None, schedule=None
            )
        case TestSent():
            return state
        case _:
            assert_never(event)


def fold(events: list[Event], state: State = INITIAL) -> State:
    for event in events:
        state = evolve(state, event)
    return state


# What an edit may change, in BroadcastEdited as in the state.
_EDITABLE_FIELDS = ("name", "list_id", "audience", "provider_id", "content", "channel", "routing", "template_id",
                    "provider_ids", "tracking")


def merge_content(current: Content, changes: ContentChanges) -> Content:  # type: ignore[valid-type]
    given = {f: v for f in ContentChanges.__struct_fields__ if (v := getattr(changes, f)) is not UNSET}
    return msgspec.structs.replace(current, **given)


def _check_content_size(content: Content) -> None:
    """The content as the event carries it stays under MAX_CONTENT_BYTES (shared/kernel/limits.py):
    an event over nats-server's max_payload could not be published. Measured as JSON bytes, since
    the per-field limits count characters; checked here because an edit merges into the stored content."""
    size = len(_encode(content))
    if size > MAX_CONTENT_BYTES:
        raise Invalid(
            "content",
            f"subject, html and text together must be at most {MAX_CONTENT_BYTES:,} bytes as JSON, not {size:,}",
        )


_encode = msgspec.json.Encoder().encode


def decide(command: Command, state: State) -> list[Event]:
    match command:
        case CreateBroadcast():
            if state.exists:
                same = state.tenant_id == command.tenant_id and state.name == command.name and (
                    state.content == command.content
                )
                if same and not state.deleted:
                    return []  # a retried create
                raise AlreadyExists(f"broadcast {command.broadcast_id} already exists")
            _check_content_size(command.content)
            _check_routing(command.channel, command.routing)
            provider_id, provider_ids = _pool(command.provider_id, command.provider_ids)
            return [
                BroadcastCreated(
                    broadcast_id=command.broadcast_id,
                    tenant_id=command.tenant_id,
                    name=command.name,
                    channel=command.channel,
                    list_id=command.list_id if command.audience is None else None,
                    provider_id=provider_id,
                    content=command.content,
                    at=command.at,
                    audience=command.audience,
                    routing=command.routing,
                    template_id=command.template_id,
                    provider_ids=provider_ids,
                    tracking=command.tracking,
                )
            ]
        case EditBroadcast():
            _require_live(state)
            if state.status not in EDITABLE:
                raise WrongStatus("edit", state.status.value)
            assert state.content is not None
            changed: dict[str, object] = {}
            edit = command
            if command.provider_ids is not UNSET:  # a pool given: its first is the provider
                given = command.provider_id if command.provider_id is not UNSET else (
                    None if command.provider_ids else state.provider_id)
                provider_id, provider_ids = _pool(given, command.provider_ids)
                edit = msgspec.structs.replace(command, provider_id=provider_id, provider_ids=provider_ids)
            elif command.provider_id is not UNSET and command.provider_id != state.provider_id:
                edit = msgspec.structs.replace(command, provider_ids=())  # another provider replaces the pool
            for f in ("name", "list_id", "audience", "provider_id", "channel", "routing", "template_id", "provider_ids",
                      "tracking"):
                value = getattr(edit, f)
                if value is not UNSET and value != getattr(state, f):
                    changed[f] = value
            # One list or an audience, never both: setting either clears the other.
            if changed.get("list_id") is not None and state.audience is not None:
                changed["audience"] = None
            if changed.get("audience") is not None and state.list_id is not None:
                changed["list_id"] = None
            if "channel" in changed or "routing" in changed:
                _check_routing(changed.get("channel", state.channel), changed.get("routing", state.routing))  # type: ignore[arg-type]
            if command.content is not UNSET:
                content = merge_content(state.content, command.content)
                if content != state.content:
                    _check_content_size(content)
                    changed["content"] = content
            if "template_id" in changed and state.status is Status.PAUSED:
                # The paused run renders the template version it started with (BroadcastStarted);
                # another template (or inline content instead) has no such version to go on with.
                raise Invalid("template_id", "cannot change while the run is paused: stop or cancel it first")
            if not changed:
                return []  # nothing new: a retried or empty edit
            return [BroadcastEdited(**changed, at=command.at)]
        case DeleteBroadcast():
            if not state.exists:
                raise NotFound("broadcast not found")
            if state.deleted:
                return []
            if state.status not in DELETABLE:
                raise WrongStatus("delete", state.status.value)
            return [BroadcastDeleted(at=command.at)]
        case SendBroadcast():
            return _send(command, state)
        case RetryBroadcast():
            return _retry(command, state)
        case RecordSnapshot():
            return _record_snapshot(command, state)
        case FinishRun():
            return _finish(command, state)
        case FailRun():
            _require_live(state)
            if command.run != state.run or state.status not in ACTIVE:
                return []  # that run already ended (or a newer one began): nothing to fail
            return _then_reschedule([BroadcastFailed(run=command.run, reason=command.reason, at=command.at)], state)
        case ScheduleBroadcast():
            return _schedule(command, state)
        case FireOccurrence():
            return _fire(command, state)
        case PauseBroadcast():
            _require_live(state)
            if state.status is Status.PAUSED or (command.run is not None and command.run != state.run):
                return []
            if state.status is not Status.SENDING:
                raise WrongStatus("pause", state.status.value)
            return [BroadcastPaused(run=state.run, at=command.at, reason=command.reason, detail=command.detail)]
        case ResumeBroadcast():
            _require_live(state)
            if state.status in RUNNING:
                return []  # a retried resume
            if state.status is not Status.PAUSED:
                raise WrongStatus("resume", state.status.value)
            return [BroadcastResumed(run=state.run, resumes=state.resumes + 1, at=command.at)]
        case CancelBroadcast():
            _require_live(state)
            if state.status is Status.CANCELLED:
                return []
            if state.status not in CANCELLABLE:
                raise WrongStatus("cancel", state.status.value)
            return [BroadcastCancelled(run=state.run, at=command.at)]
        case StopBroadcast():
            _require_live(state)
            if state.status is Status.DRAFT:
                return []  # a retried stop
            if state.status not in STOPPABLE:
                raise WrongStatus("stop", state.status.value)
            return [BroadcastStopped(run=state.run, at=command.at)]
        case ResetBroadcast():
            _require_live(state)
            if state.status is Status.DRAFT and state.reset_run == state.run:
                return []  # nothing reached since the last reset (or a retried reset)
            if state.status not in RESETTABLE:
                raise WrongStatus("reset", state.status.value)
            return [BroadcastReset(through_run=state.run, at=command.at)]
        case RecordTestSend():
            _require_live(state)
            return [TestSent(addresses=command.addresses, sent=command.sent, failed=command.failed, at=command.at)]
        case _:
            assert_never(command)


def _require_live(state: State) -> None:
    if not state.live:
        raise NotFound("broadcast not found")


def _send(command: SendBroadcast, state: State) -> list[Event]:
    _require_live(state)
    if state.status in RUNNING:
        return []  # a retried send: the run it started is under way
    if state.status not in SENDABLE:
        raise WrongStatus("send", state.status.value)
    _require_sendable(state)
    if command.audience_size == 0:
        return []  # everybody in the audience was reached already: nothing to top up
    return [_started(state, command.audience_size, command.at, top_up=True, template_version=command.template_version)]


def _require_sendable(state: State) -> None:
    if state.target is None:
        raise Invalid("list_id", "a broadcast needs a list (or an audience) to be sent")
    if state.target.empty:
        raise Invalid("audience", "a broadcast needs lists, segments or recipients to be sent to")
    if state.provider_id is None:
        raise Invalid("provider_id", "a broadcast needs a provider to be sent")
    for channel in state.channels[1:]:
        if state.provider_of(channel) is None:
            raise Invalid(f"providers.{channel}", f"a broadcast on {channel} needs a provider for it")
    if state.template_id is None and state.content is not None:
        if missing := missing_channels(state.content, state.channels):
            raise Invalid(f"content.{missing[0]}" if missing[0] != "email" else "content.subject",
                          f"the content has nothing to send on {missing[0]}")


def _pool(provider_id: uuid.UUID | None, provider_ids: tuple[uuid.UUID, ...]) -> tuple[uuid.UUID | None, tuple[uuid.UUID, ...]]:
    """`provider_id` and `provider_ids` as stored: a pool of one is just its provider (no pool),
    and a pool's first is the provider (a `provider_id` given too must be that one)."""
    if not provider_ids:
        return provider_id, ()
    if len(provider_ids) > MAX_PROVIDER_POOL:
        raise Invalid("provider_ids", f"at most {MAX_PROVIDER_POOL} providers")
    for i, one in enumerate(provider_ids):
        if one in provider_ids[:i]:
            raise Invalid(f"provider_ids[{i}]", "listed twice")
    if provider_id is not None and provider_id != provider_ids[0]:
        raise Invalid("provider_id", "differs from the first of provider_ids: give one of them")
    return provider_ids[0], provider_ids if len(provider_ids) > 1 else ()


def _check_routing(channel: str, routing: Routing | None) -> None:
    """The channels are known and each listed once, the first is `channel`, the policy is known,
    and providers are named only for listed channels."""
    if routing is None:
        return
    for i, one in enumerate(routing.channels):
        if one not in CHANNELS:
            raise Invalid(f"channels[{i}]", f"unknown channel {one!r}; known: {', '.join(CHANNELS)}")
        if one in routing.channels[:i]:
            raise Invalid(f"channels[{i}]", f"{one} is listed twice")
    if routing.channels and routing.channels[0] != channel:
        raise Invalid("channels", f"the first channel must be the broadcast's channel {channel!r}")
    if routing.channel_policy not in CHANNEL_POLICIES:
        raise Invalid("channel_policy", f"one of {', '.join(CHANNEL_POLICIES)}")
    for one in routing.providers:
        if one not in routing.channels[1:]:
            raise Invalid(f"providers.{one}", f"{one} is not one of the broadcast's other channels")


def _started(
    state: State, audience_size: int, at: datetime, *, top_up: bool, occurrence_at: datetime | None = None,
    retry_of: int = 0, retry_statuses: tuple[str, ...] = (), retried_failed: int = 0, retried_unknown: int = 0,
    template_version: int = 0,
) -> BroadcastStarted:
    assert state.tenant_id is not None and state.target is not None and state.provider_id is not None
    return BroadcastStarted(
        run=state.run + 1,
        tenant_id=state.tenant_id,
        channel=state.channel,
        list_id=state.list_id,
        audience=state.audience,
        provider_id=state.provider_id,
        provider_ids=state.provider_ids,
        audience_size=audience_size,
        at=at,
        top_up=top_up,
        reset_run=state.reset_run,
        occurrence_at=occurrence_at,
        retry_of=retry_of,
        retry_statuses=retry_statuses,
        retried_failed=retried_failed,
        retried_unknown=retried_unknown,
        routing=state.routing,
        template_id=state.template_id,
        template_version=template_version if state.template_id is not None else 0,
    )


def _retry_statuses(asked: tuple[str, ...]) -> tuple[str, ...]:
    """The statuses asked for, checked, in RETRY_STATUSES order (so a repeat in another order is
    recognised as the same retry)."""
    if not asked:
        raise Invalid("statuses", f"give at least one of {', '.join(RETRY_STATUSES)}")
    if wrong := sorted(set(asked) - set(RETRY_STATUSES)):
        raise Invalid("statuses", f"{', '.join(wrong)}: only {' and '.join(RETRY_STATUSES)} recipients can be retried")
    return tuple(s for s in RETRY_STATUSES if s in asked)


def _retry(command: RetryBroadcast, state: State) -> list[Event]:
    """A new run to the latest run's recipients with those ledger statuses, once that run ended.

    Only after the run ended (completed, partially failed, failed, cancelled): while it runs or is
    paused its outcomes are not all known yet. Not from draft: a stop or a reset sent it back
    there to be changed, and `send` is the way on from a draft. Not while scheduled: the next
    occurrence (or a one-off send) is under way to be started."""
    _require_live(state)
    statuses = _retry_statuses(command.statuses)
    if state.status in RUNNING and state.retry_of and state.retry_statuses == statuses:
        return []  # a repeated retry: the run it started is under way
    if state.status not in RETRYABLE:
        raise WrongStatus("retry", state.status.value)
    _require_sendable(state)
    failed = command.failed if "failed" in statuses else 0
    unknown = command.unknown if "unknown" in statuses else 0
    if failed + unknown == 0:
        raise Conflict(
            "nothing_to_retry",
            f"run {state.run} has no recipient with status {' or '.join(statuses)} who can still be reached",
            run=state.run, statuses=list(statuses),
        )
    return [_started(state, failed + unknown, command.at, top_up=False, retry_of=state.run, retry_statuses=statuses,
                     retried_failed=failed, retried_unknown=unknown, template_version=command.template_version)]


def _schedule(command: ScheduleBroadcast, state: State) -> list[Event]:
    from shared.broadcasts.schedule import zone

    _require_live(state)
    if state.status not in SCHEDULABLE:
        raise WrongStatus("schedule", state.status.value)
    schedule = command.schedule
    if schedule.missed_policy not in ("send", "skip"):
        raise Invalid("missed_policy", "must be send or skip")
    try:
        zone(schedule.timezone)
    except ValueError as exc:
        raise Invalid("timezone", str(exc)) from exc
    if schedule.recurrence is not None:
        scheduled_at = _first_occurrence(schedule.recurrence, command)
    else:
        scheduled_at = _one_off_time(command)
    if state.status is Status.SCHEDULED and state.scheduled_at == scheduled_at and state.schedule == schedule:
        return []  # a retried schedule
    return [BroadcastScheduled(scheduled_at=scheduled_at, schedule=schedule, at=command.at)]


def _first_occurrence(recurrence: Recurrence, command: ScheduleBroadcast) -> datetime:
    """A cron's first occurrence after the command; Invalid("cron") for one that is malformed, never
    fires (`0 0 31 2 *`), or fires more often than the command's minimum interval."""
    from shared.broadcasts.schedule import (
        check_cron,
        check_interval,
        next_occurrence,
        zone,
    )

    try:
        zone(recurrence.timezone)
        check_cron(recurrence.cron)
        first = next_occurrence(recurrence.cron, recurrence.timezone, command.at)  # first: "never fires"
        check_interval(recurrence.cron, timedelta(seconds=command.min_interval_s))
        return first
    except ValueError as exc:
        raise Invalid("cron", str(exc)) from exc


def _one_off_time(command: ScheduleBroadcast) -> datetime:
    """A one-off `scheduled_at`: in the future, and not past MAX_SCHEDULE_AHEAD_DAYS (a year-9999
    typo would sit scheduled for ever)."""
    if command.scheduled_at is None:
        raise Invalid("scheduled_at", "required unless the broadcast is recurring")
    if command.scheduled_at <= command.at:
        raise Invalid("scheduled_at", "must be in the future")
    if command.scheduled_at - command.at > timedelta(days=MAX_SCHEDULE_AHEAD_DAYS):
        raise Invalid("scheduled_at", f"must be at most {MAX_SCHEDULE_AHEAD_DAYS:,} days (10 years) ahead")
    return command.scheduled_at


def _fire(command: FireOccurrence, state: State) -> list[Event]:
    if not state.live:
        return []
    if state.status is not Status.SCHEDULED or state.scheduled_at != command.occurrence_at:
        return []  # fired already (by this or another scheduler), rescheduled, or stopped meanwhile
    assert state.schedule is not None
    policy = state.schedule
    lateness = (command.at - command.occurrence_at).total_seconds()
    allowed = SKIP_GRACE_S if policy.missed_policy == "skip" else policy.max_lateness_s
    if lateness > allowed:
        reason = f"missed by {int(lateness)} s ({policy.missed_policy} policy allows {allowed} s)"
        skipped: list[Event] = [OccurrenceSkipped(occurrence_at=command.occurrence_at, reason=reason, at=command.at)]
        return _then_reschedule(skipped, state, after=command.at)
    if state.target is None or state.target.empty or state.provider_id is None:
        skipped = [OccurrenceSkipped(occurrence_at=command.occurrence_at, reason="no audience or provider", at=command.at)]
        return _then_reschedule(skipped, state, after=command.at)
    # A one-off schedule is a deferred `send` (a top-up); each recurring occurrence is a new run to
    # the whole current audience.
    return [
        _started(state, command.audience_size, command.at, top_up=not state.recurring,
                 occurrence_at=command.occurrence_at, template_version=command.template_version)
    ]


def _then_reschedule(events: list[Event], state: State, after: datetime | None = None) -> list[Event]:
    """A recurring broadcast is scheduled for its next occurrence once a run (or a skip) ends."""
    if not state.recurring:
        return events
    from shared.broadcasts.schedule import next_occurrence

    assert state.schedule is not None and state.schedule.recurrence is not None
    at = after or events[-1].at  # type: ignore[union-attr]
    recurrence = state.schedule.recurrence
    next_at = next_occurrence(recurrence.cron, recurrence.timezone, at)
    return [*events, BroadcastScheduled(scheduled_at=next_at, schedule=state.schedule, at=at)]


def _record_snapshot(command: RecordSnapshot, state: State) -> list[Event]:
    _require_live(state)
    if command.run != state.run or state.snapshotted or state.status not in ACTIVE:
        return []  # already recorded, or the run was stopped meanwhile
    events: list[Event] = [
        AudienceSnapshotted(run=command.run, recipients=command.recipients, batches=command.batches, at=command.at,
                            retried_failed=command.retried_failed, retried_unknown=command.retried_unknown,
                            skipped=command.skipped)
    ]
    if command.recipients == 0:  # nobody to send to: the run is complete at once
        events.append(BroadcastCompleted(run=command.run, total=0, sent=0, failed=0, at=command.at))
        return _then_reschedule(events, state)
    return events


def _finish(command: FinishRun, state: State) -> list[Event]:
    _require_live(state)
    # A run can finish while paused: the batches in flight at the pause were its last ones.
    if command.run != state.run or state.status not in (Status.SENDING, Status.PAUSED) or not state.snapshotted:
        return []  # already finished (a replayed outcome), or not this run
    c = command
    counts = dict(run=c.run, total=c.total, sent=c.sent, failed=c.failed, unknown=c.unknown, at=c.at)
    if c.failed == 0 and c.unknown == 0:
        return _then_reschedule([BroadcastCompleted(**counts)], state)
    # `failed` only when nobody can have received it: an unknown outcome may have been delivered.
    if c.sent == 0 and c.unknown == 0:
        return _then_reschedule([BroadcastFailed(reason="every recipient failed", **counts)], state)
    return _then_reschedule([BroadcastPartiallyFailed(reason=shortfall(c.total, c.failed, c.unknown), **counts)], state)


def shortfall(total: int, failed: int, unknown: int) -> str:
    """Why a run partially failed, as its event and the API say it: "2 of 20 recipients failed",
    "outcome unknown for 1 of 20 recipients", or both."""
    def recipients(n: int) -> str:
        return f"{n} of {total} recipient{'' if total == 1 else 's'}"

    if not unknown:
        return f"{recipients(failed)} failed"
    if not failed:
        return f"outcome unknown for {recipients(unknown)}"
    return f"{recipients(failed)} failed; outcome unknown for {unknown}"
