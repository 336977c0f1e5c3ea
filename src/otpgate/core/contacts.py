"""Validation and normalisation of the contact points a code is sent to.

Phone numbers and email addresses are normalised once, when a user is stored, so that the
delivery providers can trust ``destination`` and two spellings of one number are one number.
These functions are pure (no DNS, no network): they run for every line of ``otpgate user import``.
Their ``ValueError`` messages are meant for the operator who typed or imported the value.
"""

from __future__ import annotations

import re

import phonenumbers
from email_validator import EmailNotValidError, validate_email

__all__ = ["normalize_email", "normalize_phone"]

_E164_HINT = "phone number must be in E.164 form, e.g. +14155550123"

# A leading "+" and then only digits and the usual grouping characters.  Letters are refused on
# purpose: phonenumbers would read "+1 800 FLOWERS" as a vanity number and "ext. 5" as an
# extension, and neither can receive an SMS.
_PHONE_SHAPE = re.compile(r"\+[\d\s().-]+")


def normalize_phone(value: str) -> str:
    """Return ``value`` as an E.164 number (``+14155550123``) or raise ``ValueError``.

    A leading ``+`` and country code are required: guessing a default region would silently send
    codes to the wrong country.  Spaces, dashes, dots and parentheses are accepted and dropped.
    The number must be *valid* for its country (right length and prefix), not just well-formed.
    """
    candidate = value.strip()
    if not _PHONE_SHAPE.fullmatch(candidate):
        raise ValueError(f"{_E164_HINT}; got {_quote(value)}")
    try:
        number = phonenumbers.parse(candidate, None)
    except phonenumbers.NumberParseException:
        raise ValueError(f"{_E164_HINT}; got {_quote(value)}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError(
            f"phone number {_quote(value)} is not a valid number for its country code "
            f"(check the country code and the number of digits)"
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_email(value: str) -> str:
    """Return the normalised form of an email address or raise ``ValueError``.

    Normalisation (by ``email-validator``) lower-cases the domain and applies Unicode NFC, but keeps
    the local part's case, which mail servers are entitled to treat as significant.  Deliverability
    (MX records) is not checked: that would need DNS and make imports slow and flaky.
    """
    try:
        result = validate_email(value.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"email address {_quote(value)} is not valid: {exc}") from None
    return result.normalized


def _quote(value: str, limit: int = 64) -> str:
    """``repr`` of the operator's input, cut short: one bad line must not flood a terminal."""
    if len(value) > limit:
        return repr(value[:limit]) + "…"
    return repr(value)
