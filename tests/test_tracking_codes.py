"""Click and open codes (shared/platform/signing.py): what a valid one says, and that no change to
one reads as a code at all."""
from __future__ import annotations

import base64
import hmac
import uuid

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared.platform.signing import (
    PURPOSE_CLICK,
    PURPOSE_OPEN,
    TRACKING_CODE_CHARS,
    Signer,
    Tracked,
    read_tracking,
    read_unsubscribe,
    tracking_kid,
)

SECRET, OTHER = b"s" * 32, b"o" * 32
LINKS = Signer(7, SECRET).tracking_links(123_456)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_a_click_code_names_its_key_contact_and_link_and_an_open_code_link_zero():
    click, opened = LINKS.click(42, 3), LINKS.open(42)
    assert len(click) == len(opened) == TRACKING_CODE_CHARS == 44
    assert read_tracking(click, SECRET) == Tracked(purpose=PURPOSE_CLICK, key=123_456, contact_id=42, link=3, kid=7)
    assert read_tracking(opened, SECRET) == Tracked(purpose=PURPOSE_OPEN, key=123_456, contact_id=42, link=0, kid=7)
    assert tracking_kid(click) == 7


def test_the_mac_is_a_slice_of_rfc_2104_hmac_sha512_over_the_message_and_its_block_of_four_links():
    raw = base64.urlsafe_b64decode(LINKS.click(2**48 - 1, 2**24 - 1))
    # purpose | kid | key | contact | link | mac
    assert (raw[1:3], raw[3:9], raw[9:15], raw[15:18]) == ((7).to_bytes(2, "big"), (123_456).to_bytes(6, "big"),
                                                           b"\xff" * 6, b"\xff" * 3)
    digest = hmac.digest(SECRET, b"\x02" + raw[1:9] + ((2**24 - 1) // 4).to_bytes(3, "big") + raw[9:15], "sha512")
    assert raw[18:] == digest[45:60]  # the last link there can be is the 4th of its block
    together = LINKS.codes(9, [0, 1, 2, 3, 4, 11, 8])
    assert together == [LINKS.open(9), *(LINKS.click(9, n) for n in (1, 2, 3, 4, 11, 8))]
    assert [read_tracking(c, SECRET).link for c in together] == [0, 1, 2, 3, 4, 11, 8]


def test_a_code_under_another_key_or_of_another_kind_is_nothing():
    click = LINKS.click(42, 3)
    assert read_tracking(click, OTHER) is None
    assert read_unsubscribe(click, SECRET) is None  # a click code never reads as an unsubscribe
    unsubscribe = Signer(7, SECRET).unsubscribe_code(uuid.UUID(int=1), uuid.UUID(int=2), 42, "email")
    assert read_tracking(unsubscribe, SECRET) is None


@hsettings(max_examples=400, deadline=None)
@given(contact=st.integers(1, 2**48 - 1), link=st.integers(1, 2**24 - 1), data=st.data())
def test_no_change_to_a_valid_code_reads_as_a_code(contact, link, data):
    code = LINKS.click(contact, link)
    assert read_tracking(code, SECRET) == Tracked(purpose=PURPOSE_CLICK, key=123_456, contact_id=contact, link=link,
                                                  kid=7)
    position = data.draw(st.integers(0, len(code) - 1))
    replacement = data.draw(st.sampled_from(ALPHABET).filter(lambda c: c != code[position]))
    changed = code[:position] + replacement + code[position + 1:]
    assert read_tracking(changed, SECRET) is None
    cut = data.draw(st.integers(0, len(code) - 1))
    assert read_tracking(code[:cut], SECRET) is None and read_tracking(code + "A", SECRET) is None
