"""How large the inputs that end up in an event, a job or a message may be: spelled once here.

Why these numbers: every event goes through NATS as one message, and nats-server refuses a
message over its `max_payload` (1 MiB by default). An event the relay could not publish once
held up every later event of every tenant (the relay now sets such an event aside, but it is then
missing from the event stream). So the largest event, `BroadcastCreated` or `BroadcastEdited`
carrying a whole content plus a name, a schedule and metadata, must stay well under 1 MiB:

    content ≤ MAX_CONTENT_BYTES (704 KiB, as JSON: subject, html, text and addresses together)
    + name ≤ 200 characters, schedule fields, ids, metadata: a few KiB
    + the envelope (id, stream, positions, time): under 1 KiB
    = under 712 KiB, leaving over 300 KiB of the 1 MiB for headers and whatever grows later.

704 KiB holds html and text at their limits in plain ASCII (640 KiB) with room for the quotes
and backslashes JSON escapes; html of mostly non-ASCII text reaches it before its 512 Ki characters.

The per-field limits count characters (JSON Schema's maxLength, shown in the OpenAPI schema); the
content limit counts bytes of JSON, where a character can take up to 6 (a control character as
`\\u0001`) or 4 (UTF-8), so it is the one that actually bounds the event.

A recipient travels in a batch job with its attributes, and the planner cuts jobs under 512 KiB
(`sender_service.planner.JOB_BYTES`): one contact must always fit in a job of its own, so its
attributes are capped far below that.
"""
from __future__ import annotations

KiB = 1024

# -- broadcast content (events BroadcastCreated / BroadcastEdited, and every rendered message) -----
MAX_SUBJECT_CHARS = 998  # RFC 5322's line limit
MAX_HTML_CHARS = 512 * KiB
MAX_TEXT_CHARS = 128 * KiB
MAX_ADDRESS_CHARS = 320  # from_email / reply_to: 64 + @ + 255, or `Name <address>`
# subject + html + text + addresses, as the JSON the event carries: see the module's docstring.
MAX_CONTENT_BYTES = 704 * KiB

# -- other fields of broadcast events ------------------------------------------------------------
MAX_NAME_CHARS = 200  # broadcast, list and provider names
MAX_TIMEZONE_CHARS = 64  # IANA names are at most ~32 characters
MAX_CRON_CHARS = 200  # a 5-field cron expression
# max_lateness_s: an occurrence found later than this is skipped. A week covers any outage worth
# catching up on; content sent weeks late is more likely a surprise than a service.
MAX_LATENESS_S = 7 * 24 * 3600
# How far ahead a one-off `scheduled_at` may be: past this it is a typo (year 9999) more likely than
# a plan, and the provider, list and content it names would long be gone.
MAX_SCHEDULE_AHEAD_DAYS = 3653  # ten years
# croniter looks this many years ahead for a cron's next occurrence; one with none is refused.
MAX_CRON_GAP_YEARS = 10

# How long a contact's former data is kept (migration 031): a message recorded within this many days
# shows the recipient data it was made from (GET /v1/messages/{id}); an older one may show later data.
CONTACT_VERSIONS_KEPT_DAYS = 90

# -- paging ----------------------------------------------------------------------------------------
MAX_OFFSET = 2**63 - 1  # Postgres's OFFSET is a bigint: a larger one is a 422, not a driver overflow

# -- characters ------------------------------------------------------------------------------------
# Postgres text and jsonb cannot hold U+0000, so no string that is stored or queried by may contain
# it. Header values (subject, from, reply-to) are single lines: a CR or LF there could never be sent
# (Python's email package refuses it) and would otherwise inject headers. Both are JSON Schema
# patterns on the API's strings (schemas/common.py); the (?!\n) is for Python's `$`, which also
# matches before a final newline. The reasons are what a 422 says instead of the pattern.
NO_NUL_PATTERN = r"^[^\x00]*$"
ONE_LINE_PATTERN = r"^[^\x00\r\n]*(?!\n)$"
PATTERN_REASONS = {
    NO_NUL_PATTERN: "cannot contain the character U+0000",
    ONE_LINE_PATTERN: "must be one line: no CR, LF or U+0000",
}

# -- contacts (every batch job carries each recipient's attributes) ------------------------------
# A contact's attributes as compact JSON, per request (what msgspec encodes).
MAX_ATTRIBUTES_BYTES = 64 * KiB
# As stored after merges (Postgres prints jsonb with a space after each `:` and `,`, up to 1.5 times
# the compact size, and that text is what a job carries). An update that merges new keys into the
# stored ones is refused past this: one recipient always stays under a quarter of a job (512 KiB).
MAX_STORED_ATTRIBUTES_BYTES = 128 * KiB
MAX_ATTRIBUTE_KEYS = 100  # keys of the attributes object, and of each object nested in it
MAX_ATTRIBUTE_KEY_CHARS = 128
MAX_ATTRIBUTE_DEPTH = 4  # the attributes object and up to three levels of objects/arrays inside it

# -- templates: the other channels' content and per-locale variants (shared/content/checks.py) ----
# Each is a provider's own limit, or a round number above what a real message holds; the content as a
# whole is still bounded by MAX_CONTENT_BYTES, which keeps every event under NATS's 1 MiB.
MAX_I18N_VARIANTS = 20  # locales per `*_i18n` field: more is a data-entry accident, not a translation plan
MAX_LOCALE_CHARS = 35  # RFC 5646 asks implementations to take tags of at least 35 characters
# BCP 47-ish: a 2-3 letter language, then subtags of 2-8 letters or digits (`de`, `pt-BR`, `zh-Hant-TW`).
LOCALE_PATTERN = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$"
MAX_PREHEADER_CHARS = 1000  # inboxes show ~100 characters of it; the rest is hidden filler
MAX_LABEL_CHARS = 200  # a button's label (email, Telegram)
MAX_FROM_NAME_CHARS = 200  # the display name of From: a header value
MAX_URL_CHARS = 2048  # what browsers and providers reliably take
MAX_SMS_CHARS = 1600  # Twilio's cap: 10 concatenated segments of UCS-2, ~10 of GSM-7
MAX_TELEGRAM_CHARS = 4096  # sendMessage's text limit
MAX_PUSH_TITLE_CHARS = 200
MAX_PUSH_BODY_CHARS = 4096  # APNs' and FCM's whole payload is 4 KiB: nobody needs more
MAX_PUSH_DATA_KEYS = 50
MAX_PUSH_DATA_KEY_CHARS = 128
MAX_WHATSAPP_PARAMETERS = 20
MAX_WHATSAPP_PARAMETER_CHARS = 1024  # Meta's limit for a body parameter
# A name `{{1}}` or `{{first_name}}` in the approved template.
WHATSAPP_PARAMETER_PATTERN = r"^[A-Za-z0-9_]{1,64}$"
# Meta's rule for a template's name.
WHATSAPP_TEMPLATE_PATTERN = r"^[a-z0-9_]{1,512}$"
# Meta's language codes (`en`, `en_US`, `pt_BR`, `zh_HK`); a hyphen is taken too.
WHATSAPP_LANGUAGE_PATTERN = r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})*$"
MAX_WHATSAPP_LANGUAGE_CHARS = 16
MAX_WEBHOOK_PAYLOAD_BYTES = 64 * KiB  # as compact JSON; receivers' body limits start around here
MAX_WEBHOOK_DEPTH = 10  # objects and arrays nested in the payload, the payload itself counting one
MAX_PROVIDER_POOL = 8  # providers sharing one broadcast's channel (provider_ids)
MAX_PROVIDER_WEIGHT = 1000  # a provider's share of a pool's load (its `weight`)
