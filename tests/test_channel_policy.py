"""Which channels a recipient gets, by the broadcast's channel policy (shared/sending/channel_policy.py)."""
from __future__ import annotations

import pytest

from shared.sending.channel_policy import choose_channels

EMAIL, PHONE = "a@example.com", "+4915112345678"


@pytest.mark.parametrize(
    ("policy", "addresses", "chosen", "skipped"),
    [
        # given the addresses a contact has        then it gets           and these are skipped
        ("all", {"email": EMAIL, "sms": PHONE}, ("email", "sms"), ()),
        ("all", {"email": EMAIL, "sms": None}, ("email",), ("sms",)),
        ("all", {"email": None, "sms": PHONE}, ("sms",), ("email",)),
        ("all", {"email": None, "sms": None}, (), ("email", "sms")),
        ("first_available", {"email": EMAIL, "sms": PHONE}, ("email",), ()),
        ("first_available", {"email": EMAIL, "sms": None}, ("email",), ()),
        ("first_available", {"email": None, "sms": PHONE}, ("sms",), ("email",)),
        ("first_available", {"email": None, "sms": None}, (), ("email", "sms")),
        ("first_available", {"email": "", "sms": PHONE}, ("sms",), ("email",)),  # empty is no address
    ],
)
def test_channels_by_policy(policy, addresses, chosen, skipped):
    # When the channels of a broadcast on email then sms are chosen for the contact
    choice = choose_channels(("email", "sms"), policy, addresses)
    # Then it gets exactly these, in the broadcast's order, and the skipped ones are recorded
    assert choice.chosen == chosen and choice.skipped == skipped


def test_the_broadcasts_order_decides_which_is_first():
    addresses = {"email": EMAIL, "sms": PHONE, "telegram": "4711"}
    assert choose_channels(("telegram", "sms", "email"), "first_available", addresses).chosen == ("telegram",)
    assert choose_channels(("sms", "email"), "first_available", addresses).chosen == ("sms",)
