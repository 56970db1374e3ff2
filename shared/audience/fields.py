"""What a contact's fields may hold, and their normal forms: checks shared by the API's upserts and
the streaming import.

An import checks millions of contacts, so the common case goes through compiled regexes (about
0.3 µs per address): every email the fast regex accepts, email-validator accepts too; only when it
refuses one does that address go to email-validator (~20 µs), which decides. Phones: an E.164
regex and a length check per country code, cached from phonenumbers' metadata (parsing each number
would cost ~12 µs); anything else (spaces, dashes, a national number with its region) is parsed by
phonenumbers.
"""
from __future__ import annotations

import re
import zoneinfo
from functools import lru_cache

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE as _COUNTRY_CODES

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_END = r"(?:\n|\Z)"
# One address per line: a dot-atom local part of at most 64 characters; labels of letters and digits
# joined by single hyphens, at most 63 characters; a last label ending with a letter (as every TLD
# does) that is not a special-use name; 254 characters in all. Whatever this does not accept
# (double hyphens as in Punycode, IP literals, quoting, non-ASCII) is left to email-validator.
_EMAIL_LINE = (
    rf"(?=[^@\n]{{1,64}}@)(?=[^\n]{{1,254}}{_END}){_ATEXT}+(?:\.{_ATEXT}+)*@"
    rf"(?:(?=[A-Za-z0-9-]{{1,63}}\.)[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\.)+"
    rf"(?!(?i:arpa|invalid|local|localhost|onion|test){_END})(?=[A-Za-z0-9-]{{1,63}}{_END})"
    r"(?:[A-Za-z0-9]+-)*[A-Za-z0-9]*[A-Za-z]"
)
_FAST_EMAIL = re.compile(_EMAIL_LINE)
_FAST_EMAILS = re.compile(rf"(?:(?>{_EMAIL_LINE})\n)*+(?>{_EMAIL_LINE})")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_LOCALE = re.compile(
    r"([A-Za-z]{2,3})(?:[-_]([A-Za-z]{4}))?(?:[-_]([A-Za-z]{2}|[0-9]{3}))?((?:[-_](?:[A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*)"
)


def checked_email(address: str) -> tuple[str | None, str | None]:
    """(the address in its normal form, None) or (None, why it is not a valid email address)."""
    if _FAST_EMAIL.fullmatch(address):
        local, _, domain = address.rpartition("@")
        return f"{local}@{domain.lower()}", None
    try:
        return validate_email(address, check_deliverability=False).normalized, None
    except EmailNotValidError as e:
        return None, str(e)


def email_problem(address: str) -> str | None:
    """Why an address is not a valid email address, or None; email-validator's rules, without DNS."""
    if _FAST_EMAIL.fullmatch(address):
        return None
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as e:
        return str(e)
    return None


def normal_email(address: str) -> str:
    """A valid address in email-validator's normal form (the domain in lower case, Unicode NFC)."""
    if _FAST_EMAIL.fullmatch(address):
        local, _, domain = address.rpartition("@")
        return f"{local}@{domain.lower()}"
    return validate_email(address, check_deliverability=False).normalized


def all_fast_emails(addresses: list[str]) -> bool:
    """True if every address passes the fast path: one regex over all of them, no call per address."""
    joined = "\n".join(addresses)
    return joined.count("\n") == len(addresses) - 1 and _FAST_EMAILS.fullmatch(joined) is not None


@lru_cache(maxsize=4096)
def _possible_length(country_code: int, length: int) -> str | None:
    """phonenumbers' possible-number check depends only on the country code and the length."""
    number = phonenumbers.PhoneNumber(country_code=country_code, national_number=int("1" * length))
    if phonenumbers.is_possible_number_with_reason(number) == phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    return f"a +{country_code} number cannot have {length} digits after the country code"


@lru_cache(maxsize=16384)
def _shape_problem(head: str, length: int) -> str | None:
    """The check of an E.164 number depends only on its first four characters (+ and the country
    calling code, which has at most three digits) and its length: one cached call per number."""
    for size in (1, 2, 3):  # country calling codes are prefix-free
        code = int(head[1 : 1 + size])
        if code in _COUNTRY_CODES:
            return _possible_length(code, length - 1 - size)
    return f"{head}… does not start with a country calling code"


def phone_problem(number: str) -> str | None:
    """Why `number` is not a possible E.164 number, or None."""
    if not _E164.fullmatch(number):
        return "must be an E.164 number: + and 7 to 15 digits, no spaces (e.g. +14155550100)"
    return _shape_problem(number[:4], len(number))


_ALL_E164 = re.compile(r"(?:\+[1-9][0-9]{6,14}\n)*+\+[1-9][0-9]{6,14}")


def all_e164(numbers: list[str]) -> bool:
    """True if every number is written in E.164: one regex over all of them, no call per number
    (each still needs phone_problem's length check, cached by country code and length)."""
    joined = "\n".join(numbers)
    return joined.count("\n") == len(numbers) - 1 and _ALL_E164.fullmatch(joined) is not None


def shape_problems(numbers: list[str]) -> bool:
    """True if some number that all_e164 accepted is not possible for its country code."""
    return any(_shape_problem(head, length) for head, length in {(n[:4], len(n)) for n in numbers})


_REGION = re.compile(r"[A-Za-z]{2}")
REGION_REASON = "must be an ISO 3166-1 alpha-2 code of a region with phone numbers, such as DE or US"


def region_problem(region: str) -> str | None:
    """Why `region` cannot be the region of a national phone number, or None."""
    if _REGION.fullmatch(region) and region.upper() in phonenumbers.SUPPORTED_REGIONS:
        return None
    return REGION_REASON


def e164(number: str, region: str | None = None) -> tuple[str | None, str | None]:
    """(the number in E.164, None) or (None, why not). An E.164 number is checked as it is; any
    other form ("+49 30 1234567", "(415) 555-0100") is parsed by phonenumbers, and a national
    number needs its region (ISO 3166 alpha-2, "DE")."""
    if _E164.fullmatch(number):
        return (None, reason) if (reason := phone_problem(number)) else (number, None)
    if region is not None and region_problem(region):
        return None, f"region {REGION_REASON}"
    if not number.lstrip().startswith("+") and region is None:
        return None, "a national number needs a region (e.g. \"phone_region\": \"DE\"), or write it in E.164 (+4930…)"
    try:
        parsed = phonenumbers.parse(number, region.upper() if region else None)
    except phonenumbers.NumberParseException as e:
        return None, f"not a phone number: {e._msg}"
    if not phonenumbers.is_possible_number(parsed):
        return None, "not a possible phone number for its country"
    if parsed.extension:  # E.164 has no extensions, and no text message or chat reaches one
        return None, "an extension cannot be stored: give the number without it"
    normal = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return (None, reason) if (reason := phone_problem(normal)) else (normal, None)


@lru_cache(maxsize=1024)
def canonical_locale(tag: str) -> str | None:
    """The tag in canonical case with hyphens (pt_br → pt-BR), or None if it is not BCP 47-like."""
    m = _LOCALE.fullmatch(tag)
    if m is None:
        return None
    language, script, region, variants = m.groups()
    parts = [language.lower()]
    if script:
        parts.append(script.title())
    if region:
        parts.append(region.upper())
    if variants:
        parts.extend(v.lower() for v in variants[1:].replace("_", "-").split("-"))
    return "-".join(parts)


LOCALE_REASON = "must be a BCP 47 language tag such as en, en-GB or pt-BR"


@lru_cache(maxsize=1)
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


TIMEZONE_REASON = "must be an IANA time zone such as Europe/Berlin or America/New_York"


def timezone_problem(name: str) -> str | None:
    """Why `name` is not an IANA time zone this machine knows, or None."""
    if name in _time_zones():
        return None
    return TIMEZONE_REASON


@lru_cache(maxsize=1)
def _time_zones_by_folded_name() -> dict[str, str]:
    return {name.casefold(): name for name in _time_zones()}


def canonical_timezone(name: str) -> str | None:
    """The IANA name as the database spells it (europe/berlin → Europe/Berlin), or None if there is
    no such zone. Names differ by more than case (Europe/Berlin, America/Port-au-Prince), so a
    zone is matched ignoring case only, never guessed."""
    if name in _time_zones():
        return name
    return _time_zones_by_folded_name().get(name.casefold())


# A Telegram chat id: a user or group id (an integer, negative for groups) or a public channel's
# @username (5-32 letters, digits and underscores).
_TELEGRAM_CHAT = re.compile(r"-?[1-9][0-9]{0,15}|@[A-Za-z][A-Za-z0-9_]{4,31}")


def telegram_chat_id_problem(chat_id: str) -> str | None:
    if _TELEGRAM_CHAT.fullmatch(chat_id):
        return None
    return "must be a Telegram chat id (an integer, e.g. 123456789 or -1001234567890) or a channel's @username"


MAX_PUSH_TOKENS = 20  # devices per contact
MAX_PUSH_TOKEN_CHARS = 4096  # FCM registration tokens are ~160-200 characters, APNs 64 hex digits
_PUSH_TOKEN = re.compile(r"[A-Za-z0-9:_\-.]+")


# The same rule as a JSON Schema pattern, for the OpenAPI document ((?!\n): Python's $ also matches
# before a final newline).
PUSH_TOKEN_PATTERN = "^[A-Za-z0-9:_\\-.]+(?!\\n)$"
PUSH_TOKEN_REASON = f"must be a device token of 1 to {MAX_PUSH_TOKEN_CHARS} letters, digits and :_-."


def push_token_problem(token: str) -> str | None:
    if 0 < len(token) <= MAX_PUSH_TOKEN_CHARS and _PUSH_TOKEN.fullmatch(token):
        return None
    return PUSH_TOKEN_REASON


def unique_tokens(tokens: list[str]) -> list[str]:
    """The tokens without repeats, in the order first given (a device registered twice is one)."""
    return tokens if len(set(tokens)) == len(tokens) else list(dict.fromkeys(tokens))
