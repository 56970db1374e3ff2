"""Request and response bodies of the broadcasts API."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from api_service.schemas.common import Input, Name, text
from api_service.schemas.content import ContentIn, ContentOut, ContentPatch
from shared.kernel import limits as lim
from shared.kernel.audience import MAX_AUDIENCE_RECIPIENTS, MAX_AUDIENCE_SETS
from shared.kernel.content import CHANNELS

Timezone = text(lim.MAX_TIMEZONE_CHARS, min_length=1, description="an IANA time zone")
Cron = text(lim.MAX_CRON_CHARS, min_length=1, description=(
    "5 fields, in `timezone`; it must fire within the next 10 years, and at most once per the server's "
    "minimum interval (CRIER_MIN_CRON_INTERVAL_S, 1 hour by default)"
))
TestAddress = text(254)


class ScheduleFields(Input, kw_only=True):
    """When a broadcast starts by itself. One-off: `scheduled_at` (an offset, or local time in
    `timezone`). Recurring: `recurring: true` with a 5-field `cron` in `timezone`."""

    scheduled_at: Annotated[datetime | None, Meta(
        description=f"in the future, and at most {lim.MAX_SCHEDULE_AHEAD_DAYS:,} days (10 years) ahead",
    )] = None
    timezone: Timezone = "UTC"
    recurring: bool = False
    cron: Cron | None = None
    missed_policy: Literal["send", "skip"] = "send"
    # "send": later than this, an occurrence is skipped
    max_lateness_s: Annotated[int, Meta(ge=0, le=lim.MAX_LATENESS_S, description=(
        "under missed_policy send: an occurrence found later than this many seconds is skipped (at most 7 days)"
    ))] = 3600


class ScheduleIn(ScheduleFields, kw_only=True):
    pass


ContactRef = Annotated[int, Meta(ge=1, le=2**63 - 1)]
ExternalRef = text(255, min_length=1)


class InlineAddress(Input, kw_only=True):
    """A recipient by address, `email` or `phone` (one of the two): the tenant's contact with that
    address, created if there is none."""

    email: Annotated[str, Meta(max_length=254)] | None = None
    phone: Annotated[str, Meta(max_length=32, description="E.164, or international with spaces")] | None = None


_SETS = Meta(max_length=MAX_AUDIENCE_SETS)


class AudienceIn(Input, kw_only=True):
    """Who a broadcast goes to: every contact in any of `lists`, `segments` or `recipients`, less
    those in any of `exclude_lists` or `exclude_segments`, each once. Segments are evaluated when a
    run starts. Suppressed contacts and addresses are always left out."""

    lists: Annotated[list[uuid.UUID], _SETS] = []
    segments: Annotated[list[uuid.UUID], _SETS] = []
    exclude_lists: Annotated[list[uuid.UUID], _SETS] = []
    exclude_segments: Annotated[list[uuid.UUID], _SETS] = []
    recipients: Annotated[list[ContactRef | ExternalRef | InlineAddress], Meta(
        max_length=MAX_AUDIENCE_RECIPIENTS,
        description="contact ids (numbers), external ids (strings), or `{\"email\": ...}` / `{\"phone\": ...}` "
                    "(a contact with that address, created if the tenant has none)",
    )] = []


class AudienceOut(msgspec.Struct, kw_only=True):
    lists: list[uuid.UUID] = []
    segments: list[uuid.UUID] = []
    exclude_lists: list[uuid.UUID] = []
    exclude_segments: list[uuid.UUID] = []
    recipients: list[int] = []  # contact ids


class AudienceCount(msgspec.Struct, kw_only=True):
    """The next send's audience, contact by contact, each counted once under the first that applies:
    `excluded`, `suppressed`, `reached` (by an earlier run: a send is a top-up), `no_address` (on
    the channel), else `reach` (who it would send to). Counted by the planner's own conditions."""

    channel: str
    included: int
    excluded: int
    suppressed: int
    reached: int
    no_address: int
    reach: int


Channel = Literal["email", "sms", "whatsapp", "telegram", "push", "webhook"]
Channels = Annotated[list[Channel], Meta(min_length=1, max_length=len(CHANNELS), description=(
    "the channels it sends on, in order of preference (`email` when left out); each once"))]
ChannelPolicy = Annotated[Literal["all", "first_available"], Meta(description=(
    "`all`: every listed channel the contact has an address on; `first_available`: only the first of "
    "them. A recipient's channels without an address are recorded as `skipped` (`no_address`)"))]
Providers = Annotated[dict[Channel, uuid.UUID], Meta(description=(
    "the provider of each channel (the first channel's may be given as `provider_id` instead)"))]
ProviderIds = Annotated[list[uuid.UUID], Meta(min_length=1, max_length=lim.MAX_PROVIDER_POOL, description=(
    "several providers for the first channel (the email API's `email_server_ids`), instead of "
    "`provider_id`: they share its load by their `weight`, and one that fails (down, refusing the "
    "login) is skipped while the others send"))]


TrackOpens = Annotated[bool, Meta(description="count opens: a 1x1 image per recipient in the email's HTML")]
TrackClicks = Annotated[bool, Meta(description=(
    "count clicks: each literal http(s) link in the email's HTML goes through a signed redirect per recipient"))]
TrackTextLinks = Annotated[bool, Meta(description=(
    "with track_clicks, the links in plain text too: the email's text part, SMS, Telegram, push"))]


class BroadcastCreate(ScheduleFields, kw_only=True):
    name: Name
    list_id: Annotated[uuid.UUID | None, Meta(description="shorthand for `audience: {lists: [list_id]}`")] = None
    audience: AudienceIn | None = None
    provider_id: uuid.UUID | None = None
    provider_ids: ProviderIds | None = None
    channels: Channels | None = None
    channel_policy: ChannelPolicy = "all"
    providers: Providers = {}
    template_id: Annotated[uuid.UUID | None, Meta(description=(
        "the content is this template's (a run renders the version current when it started); "
        "give it or `content`"))] = None
    content: ContentIn | None = None
    track_opens: TrackOpens = False
    track_clicks: TrackClicks = False
    track_text_links: TrackTextLinks = False


class TestSendIn(Input, kw_only=True):
    """Where to send a test: up to 10 addresses and/or contacts (rendered with their variables)."""

    emails: Annotated[list[TestAddress], Meta(max_length=10)] = []
    contact_ids: Annotated[list[Annotated[int, Meta(ge=1, le=2**63 - 1)]], Meta(max_length=10)] = []


class TestResult(msgspec.Struct, kw_only=True):
    address: str
    ok: bool
    error: str | None


class TestSent(msgspec.Struct, kw_only=True):
    results: list[TestResult]


class PreviewChannelMessage(msgspec.Struct, kw_only=True):
    channel: str
    address: str
    # as the provider would get it: email {subject, html, text, from_email, reply_to}, sms {body},
    # telegram {text, media_url, media_type, button_label, button_url}, whatsapp {template_name,
    # language, parameters}, push {title, body, image_url, url, data}, webhook {payload}
    content: dict[str, Any]
    error: str | None = None  # why it could not be rendered: the send would fail this message


class PreviewMessage(msgspec.Struct, kw_only=True):
    """One recipient: the channels it gets by the policy, the locale variant chosen, and each
    channel's message. `channel`, `address`, `subject`, `html`, `text`: its first message's."""

    contact_id: int
    channel: str
    address: str
    subject: str
    html: str
    text: str
    locale: str | None = None
    channels: list[str] = []
    skipped: list[str] = []  # channels the policy would have used, without an address on them
    messages: list[PreviewChannelMessage] = []


class Preview(msgspec.Struct, kw_only=True):
    items: list[PreviewMessage]


class BroadcastPatch(Input, kw_only=True):
    name: Name | UnsetType = UNSET
    list_id: uuid.UUID | None | UnsetType = UNSET  # replaces the audience with this one list
    audience: AudienceIn | None | UnsetType = UNSET  # replaces the list (or the audience)
    provider_id: uuid.UUID | None | UnsetType = UNSET  # another provider replaces provider_ids
    provider_ids: ProviderIds | UnsetType = UNSET
    channels: Channels | UnsetType = UNSET
    channel_policy: ChannelPolicy | UnsetType = UNSET
    providers: Providers | UnsetType = UNSET  # replaces them all
    # setting one clears the inline content; inline content given clears the template
    template_id: uuid.UUID | None | UnsetType = UNSET
    content: ContentPatch | UnsetType = UNSET
    track_opens: TrackOpens | UnsetType = UNSET
    track_clicks: TrackClicks | UnsetType = UNSET
    track_text_links: TrackTextLinks | UnsetType = UNSET


class Counters(msgspec.Struct, kw_only=True):
    """Each recipient counted once, by its latest outcome (a retry moves its recipients out of
    `failed`/`unknown`); total = queued + sent + failed + unknown + suppressed + dropped. Then what
    happened after sending (opens, clicks, receipts, unsubscribes)."""

    total: int = 0
    queued: int = 0
    sent: int = 0
    failed: int = 0
    # handed to the provider, then no answer (a sender died): may have arrived; never resent by
    # itself, only by a retry that asks for `unknown`
    unknown: int = 0
    # suppressed (unsubscribed, bounced, by hand) after the run's snapshot and before their batch was
    # sent: not sent (suppressed contacts are left out of a snapshot, so they are not in `total` then)
    suppressed: int = 0
    dropped: int = 0  # not sent because the run was cancelled or stopped
    # a multi-channel broadcast: (recipient, channel) pairs left out for want of an address on the
    # channel (ledger status `skipped`, error `no_address`); not part of `total`
    skipped: int = 0
    # What happened after sending, summed over the runs and channels: messages, each counted once
    # (`opened`: how many messages were opened), except `opens`, `proxy_opens` and `clicks`, which
    # count every time.
    delivered: int = 0  # the provider's receipt says delivered
    read: int = 0  # a read receipt (WhatsApp, RCS)
    opened: int = 0  # emails whose open pixel a person's mail client fetched
    opens: int = 0
    # emails whose pixel a mail privacy proxy fetched (Apple Mail Privacy Protection on delivery, the
    # Gmail and Yahoo image proxies): counted apart, since it is no sign anyone read them
    proxy_opened: int = 0
    proxy_opens: int = 0
    clicked: int = 0  # messages with at least one tracked link clicked
    clicks: int = 0
    bounced: int = 0  # the provider's receipt says bounced (after it took the message: not `failed`)
    complained: int = 0  # marked as spam (a complaint receipt)
    unsubscribed: int = 0  # contacts whose first unsubscribe came through this broadcast's link


class ScheduleOut(msgspec.Struct, kw_only=True):
    timezone: str
    cron: str | None
    missed_policy: str
    max_lateness_s: int


class Broadcast(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    name: str
    status: str
    # why the latest run ended `failed` or `partially_failed`: "2 of 20 recipients failed", "outcome
    # unknown for 1 of 20 recipients", both, or why the run could not be carried out; why it is
    # `paused` when a sender paused it ("provider_error: <the provider's answer>"); else null
    status_reason: str | None = None
    channel: str
    list_id: uuid.UUID | None  # when the audience is this one list
    audience: AudienceOut  # always set: {lists: [list_id]} for a broadcast created with list_id
    provider_id: uuid.UUID | None
    provider_ids: list[uuid.UUID]  # the first channel's providers sharing its load ([] when just provider_id)
    channels: list[str]  # `channel` first
    channel_policy: str
    providers: dict[str, uuid.UUID]  # every channel's, `channel`'s (provider_id) included
    track_opens: bool
    track_clicks: bool
    track_text_links: bool
    template_id: uuid.UUID | None
    template_version: int  # of the template, the latest run renders (0: no template or no run yet)
    content: ContentOut  # the inline content ({} with a template)
    counters: Counters
    run: int
    scheduled_at: datetime | None
    started_at: datetime | None  # when the latest run started (null: never sent)
    sent_at: datetime | None  # when the latest run finished (null while it runs, if it was called off, or never sent)
    next_run_at: datetime | None  # a recurring broadcast's next occurrence
    recurring: bool
    schedule: ScheduleOut | None
    audience_total: int | None  # when not running: the list's current size
    remaining: int | None  # when not running: audience members this broadcast has not reached yet
    version: int
    created_at: datetime
    updated_at: datetime


class SendAccepted(msgspec.Struct, kw_only=True):
    status: str
    queued: int
    run: int


RetryStatus = Literal["failed", "unknown"]


class RetryIn(Input, kw_only=True):
    """Which recipients of the latest run to send again, by their status in it. Without a body
    (or without `statuses`): the failed ones only. `unknown` ones may have arrived (their sender
    died before the provider answered), so a retry sends them again only when asked to."""

    statuses: Annotated[list[RetryStatus], Meta(
        min_length=1, max_length=2, description='the ledger statuses to retry; default `["failed"]`',
    )] = msgspec.field(default_factory=lambda: ["failed"])


class RetryAccepted(msgspec.Struct, kw_only=True):
    status: str
    queued: int  # recipients of the retry run (those of `retry_of` with these statuses and an address)
    run: int  # the retry run
    retry_of: int  # the run whose recipients it sends again
    statuses: list[str]


class Message(msgspec.Struct, kw_only=True):
    """One recipient's record in one run: queued until its batch is attempted, then sent, failed or
    unknown (handed to the provider, no answer), or suppressed (unsubscribed, bounced or suppressed by
    hand after the snapshot: not sent); dropped if the run was called off first."""

    run: int
    contact_id: int
    channel: str
    address: str
    status: str
    attempts: int
    error: str | None
    provider_message_id: str | None
    sent_at: datetime | None


class HistoryEvent(msgspec.Struct, kw_only=True):
    """One entry of a broadcast's history: what happened, with which data, by whom, when."""

    position: int
    id: uuid.UUID
    type: str
    data: dict[str, Any]
    actor: str | None
    correlation_id: str | None
    created_at: datetime
