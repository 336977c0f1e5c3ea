"""Phone and email normalisation, and the error messages an operator gets for bad values."""

from __future__ import annotations

import pytest

from otpgate.core.contacts import normalize_email, normalize_phone

E164_HINT = "phone number must be in E.164 form, e.g. +14155550123"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("+14155550123", "+14155550123"),
        ("+1 (415) 555-0123", "+14155550123"),
        ("+1.415.555.0123", "+14155550123"),
        ("  +14155550123\n", "+14155550123"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+86 138 0013 8000", "+8613800138000"),
        ("+49 30 901820", "+4930901820"),
        ("+34 612 34 56 78", "+34612345678"),
    ],
)
def test_valid_phones_become_e164(value: str, expected: str) -> None:
    assert normalize_phone(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "14155550123",  # no "+": region would have to be guessed
        "004414155550123",
        "",
        "+",
        "+999",
        "+1 800 FLOWERS",  # vanity letters
        "+1 415 555 0123 ext. 5",  # extensions cannot receive SMS
        "++14155550123",
        "tel:+14155550123",
    ],
)
def test_malformed_phones_ask_for_e164(value: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_phone(value)
    assert str(info.value) == f"{E164_HINT}; got {value!r}"


@pytest.mark.parametrize("value", ["+1415555012", "+1 415 555 01234", "+44 20 7946 095"])
def test_well_formed_but_invalid_numbers(value: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_phone(value)
    assert str(info.value) == (
        f"phone number {value!r} is not a valid number for its country code "
        "(check the country code and the number of digits)"
    )


def test_long_input_is_cut_in_the_message() -> None:
    value = "+" + "1" * 500
    with pytest.raises(ValueError) as info:
        normalize_phone(value)
    assert len(str(info.value)) < 200
    assert str(info.value).endswith("…")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice.Smith@Example.COM", "Alice.Smith@example.com"),
        ("  bob@example.org ", "bob@example.org"),
        ("user+tag@sub.example.co.uk", "user+tag@sub.example.co.uk"),
        ("jörg@bücher.example.com", "jörg@bücher.example.com"),
    ],
)
def test_valid_emails_are_normalised(value: str, expected: str) -> None:
    assert normalize_email(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("alice", "An email address must have an @-sign."),
        ("alice@example", "The part after the @-sign is not valid. It should have a period."),
        ("a..b@example.com", "An email address cannot have two periods in a row."),
        ("", "An email address must have an @-sign."),
        (
            "Alice <alice@example.com>",
            "A display name and angle brackets around the email address are not permitted here.",
        ),
    ],
)
def test_invalid_emails_say_why(value: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_email(value)
    assert str(info.value) == f"email address {value!r} is not valid: {reason}"
