"""The Broadcast aggregate: its events, state, and the pure `decide` and `evolve`.

One stream per broadcast (`broadcast-<id>`). Per-recipient outcomes are not events here; they
live in the messages ledger (DESIGN.md).
"""
from __future__ import annotations

import uuid
from datetime import datetime
from enum import Enum
from typing import assert_never

import msgspec
from msgspec import UNSET, UnsetType

from shared.domain.errors import AlreadyExists, Invalid, NotFound, WrongStatus

CATEGORY = "broadcast"


def stream_name(broadcast_id: uuid.UUID) -> str:
    return f"{CATEGORY}-{broadcast_id}"


class Status(str, Enum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    PAUSED = "paused"
    COMPLETED = "completed"
    PARTIALLY_FAILED = "partially_failed"
    FAILED = "failed"
    CANCELLED = "cancelled"


EDITABLE = frozenset({Status.DRAFT, Status.SCHEDULED, Status.PAUSED})
FINISHED = frozenset({Status.COMPLETED, Status.PARTIALLY_FAILED, Status.FAILED})
RUNNING = frozenset({Status.QUEUED, Status.SENDING})
# Until top-up sends exist (each run only to members not reached yet), a run starts from draft only.
SENDABLE = frozenset({Status.DRAFT})
DELETABLE = frozenset(Status) - {Status.QUEUED, Status.SENDING, Status.PAUSED}


class Content(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    subject: str
    html: str = ""
    text: str = ""
    from_email: str | None = None
    reply_to: str | None = None


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


class BroadcastEdited(msgspec.Struct, frozen=True, kw_only=True, tag=True, omit_defaults=True):
    name: str | UnsetType = UNSET
    list_id: uuid.UUID | None | UnsetType = UNSET
    provider_id: uuid.UUID | None | UnsetType = UNSET
    content: Content | UnsetType = UNSET
    at: datetime


class BroadcastDeleted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    at: datetime


class BroadcastStarted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A run began: the planner snapshots the audience and splits it into batch jobs."""

    run: int
    tenant_id: uuid.UUID
    channel: str
    list_id: uuid.UUID
    provider_id: uuid.UUID
    audience_size: int  # the audience counted when the send was accepted; the snapshot has the final figure
    at: datetime


class AudienceSnapshotted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    run: int
    recipients: int
    batches: int
    at: datetime


class BroadcastCompleted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    run: int
    total: int
    sent: int
    failed: int
    at: datetime


class BroadcastPartiallyFailed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    run: int
    total: int
    sent: int
    failed: int
    at: datetime


class BroadcastFailed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    run: int
    reason: str
    total: int = 0
    sent: int = 0
    failed: int = 0
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
)


# ---- commands (time comes in the command: deciders read no clock) ----


class CreateBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    broadcast_id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    channel: str = "email"
    list_id: uuid.UUID | None = None
    provider_id: uuid.UUID | None = None
    content: Content
    at: datetime


class ContentChanges(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    subject: str | UnsetType = UNSET
    html: str | UnsetType = UNSET
    text: str | UnsetType = UNSET
    from_email: str | None | UnsetType = UNSET
    reply_to: str | None | UnsetType = UNSET


class EditBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    name: str | UnsetType = UNSET
    list_id: uuid.UUID | None | UnsetType = UNSET
    provider_id: uuid.UUID | None | UnsetType = UNSET
    content: ContentChanges | UnsetType = UNSET
    at: datetime


class DeleteBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime


class SendBroadcast(msgspec.Struct, frozen=True, kw_only=True):
    audience_size: int
    at: datetime


class RecordSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    run: int
    recipients: int
    batches: int
    at: datetime


class FinishRun(msgspec.Struct, frozen=True, kw_only=True):
    """Every batch of the run has an outcome; the counts come from the ledger."""

    run: int
    total: int
    sent: int
    failed: int
    at: datetime


class FailRun(msgspec.Struct, frozen=True, kw_only=True):
    run: int
    reason: str
    at: datetime


Command = CreateBroadcast | EditBroadcast | DeleteBroadcast | SendBroadcast | RecordSnapshot | FinishRun | FailRun


# ---- state ----


class State(msgspec.Struct, frozen=True, kw_only=True):
    exists: bool = False
    deleted: bool = False
    status: Status = Status.DRAFT
    tenant_id: uuid.UUID | None = None
    name: str = ""
    channel: str = "email"
    list_id: uuid.UUID | None = None
    provider_id: uuid.UUID | None = None
    content: Content | None = None
    run: int = 0  # the latest run started (0: never sent)
    snapshotted: bool = False  # the latest run's audience has been split into batches


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
                provider_id=event.provider_id,
                content=event.content,
            )
        case BroadcastEdited():
            changes = {
                f: getattr(event, f)
                for f in ("name", "list_id", "provider_id", "content")
                if getattr(event, f) is not UNSET
            }
            return msgspec.structs.replace(state, **changes)
        case BroadcastDeleted():
            return msgspec.structs.replace(state, deleted=True)
        case BroadcastStarted():
            return msgspec.structs.replace(state, status=Status.QUEUED, run=event.run, snapshotted=False)
        case AudienceSnapshotted():
            return msgspec.structs.replace(state, status=Status.SENDING, snapshotted=True)
        case BroadcastCompleted():
            return msgspec.structs.replace(state, status=Status.COMPLETED)
        case BroadcastPartiallyFailed():
            return msgspec.structs.replace(state, status=Status.PARTIALLY_FAILED)
        case BroadcastFailed():
            return msgspec.structs.replace(state, status=Status.FAILED)
        case _:
            assert_never(event)


def fold(events: list[Event], state: State = INITIAL) -> State:
    for event in events:
        state = evolve(state, event)
    return state


def _merge_content(current: Content, changes: ContentChanges) -> Content:
    given = {f: v for f in ContentChanges.__struct_fields__ if (v := getattr(changes, f)) is not UNSET}
    return msgspec.structs.replace(current, **given)


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
            return [
                BroadcastCreated(
                    broadcast_id=command.broadcast_id,
                    tenant_id=command.tenant_id,
                    name=command.name,
                    channel=command.channel,
                    list_id=command.list_id,
                    provider_id=command.provider_id,
                    content=command.content,
                    at=command.at,
                )
            ]
        case EditBroadcast():
            _require_live(state)
            if state.status not in EDITABLE:
                raise WrongStatus("edit", state.status.value)
            assert state.content is not None
            changed: dict[str, object] = {}
            for f in ("name", "list_id", "provider_id"):
                value = getattr(command, f)
                if value is not UNSET and value != getattr(state, f):
                    changed[f] = value
            if command.content is not UNSET:
                content = _merge_content(state.content, command.content)
                if content != state.content:
                    changed["content"] = content
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
        case RecordSnapshot():
            return _record_snapshot(command, state)
        case FinishRun():
            return _finish(command, state)
        case FailRun():
            _require_live(state)
            if command.run != state.run or state.status not in RUNNING:
                return []  # that run already ended (or a newer one began): nothing to fail
            return [BroadcastFailed(run=command.run, reason=command.reason, at=command.at)]
        case _:
            assert_never(command)


def _require_live(state: State) -> None:
    if not state.exists or state.deleted:
        raise NotFound("broadcast not found")


def _send(command: SendBroadcast, state: State) -> list[Event]:
    _require_live(state)
    if state.status in RUNNING:
        return []  # a retried send: the run it started is under way
    if state.status not in SENDABLE:
        raise WrongStatus("send", state.status.value)
    if state.list_id is None:
        raise Invalid("list_id", "a broadcast needs a list to be sent")
    if state.provider_id is None:
        raise Invalid("provider_id", "a broadcast needs a provider to be sent")
    assert state.tenant_id is not None
    return [
        BroadcastStarted(
            run=state.run + 1,
            tenant_id=state.tenant_id,
            channel=state.channel,
            list_id=state.list_id,
            provider_id=state.provider_id,
            audience_size=command.audience_size,
            at=command.at,
        )
    ]


def _record_snapshot(command: RecordSnapshot, state: State) -> list[Event]:
    _require_live(state)
    if command.run != state.run or state.status is not Status.QUEUED:
        return []  # already recorded, or the run was stopped meanwhile
    events: list[Event] = [
        AudienceSnapshotted(run=command.run, recipients=command.recipients, batches=command.batches, at=command.at)
    ]
    if command.recipients == 0:  # nobody to send to: the run is complete at once
        events.append(BroadcastCompleted(run=command.run, total=0, sent=0, failed=0, at=command.at))
    return events


def _finish(command: FinishRun, state: State) -> list[Event]:
    _require_live(state)
    if command.run != state.run or state.status is not Status.SENDING:
        return []  # already finished (a replayed outcome), or not this run
    counts = dict(run=command.run, total=command.total, sent=command.sent, failed=command.failed, at=command.at)
    if command.failed == 0:
        return [BroadcastCompleted(**counts)]
    if command.sent == 0:
        return [BroadcastFailed(reason="every recipient failed", **counts)]
    return [BroadcastPartiallyFailed(**counts)]
