"""Message texts: locales, fallback, plural forms, and that the code lands where it should."""
# Chinese texts use full-width commas, as Chinese typography requires.
# ruff: noqa: RUF001

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otpgate.delivery.templates import (
    available_locales,
    minutes_left,
    render_message,
    resolve_locale,
)


def test_english_sms() -> None:
    subject, text = render_message(
        channel="SMS", locale="en", brand="Acme", code="123456", minutes=5
    )
    assert subject == "Your Acme verification code"
    assert text == "Your Acme verification code is 123456. It expires in 5 minutes. Never share it."


def test_english_email() -> None:
    subject, text = render_message(
        channel="EMAIL", locale="en", brand="Acme", code="123456", minutes=5
    )
    assert subject == "Your Acme verification code"
    assert text == (
        "Hello,\n"
        "\n"
        "Your Acme verification code is:\n"
        "\n"
        "    123456\n"
        "\n"
        "It expires in 5 minutes. Never share this code with anyone, not even Acme staff.\n"
        "\n"
        "If you did not request this code, you can ignore this email.\n"
    )


def test_singular_minute() -> None:
    _, en = render_message(channel="SMS", locale="en", brand="Acme", code="123456", minutes=1)
    _, es = render_message(channel="SMS", locale="es", brand="Acme", code="123456", minutes=1)
    assert "It expires in 1 minute." in en
    assert "Caduca en 1 minuto." in es


@pytest.mark.parametrize("minutes", [0, -3])
def test_minutes_below_one_read_as_one(minutes: int) -> None:
    _, text = render_message(
        channel="SMS", locale="en", brand="Acme", code="123456", minutes=minutes
    )
    assert "It expires in 1 minute." in text


def test_spanish() -> None:
    subject, text = render_message(
        channel="SMS", locale="es", brand="Acme", code="123456", minutes=10
    )
    assert subject == "Tu código de verificación de Acme"
    assert text == "Código de Acme: 123456. Caduca en 10 minutos. No lo compartas."


def test_simplified_chinese() -> None:
    subject, text = render_message(
        channel="SMS", locale="zh-CN", brand="Acme", code="123456", minutes=5
    )
    assert subject == "您的Acme验证码"
    assert text == "【Acme】您的验证码是123456，5分钟内有效。请勿泄露给他人。"
    _, email = render_message(
        channel="EMAIL", locale="zh-CN", brand="Acme", code="123456", minutes=5
    )
    assert "    123456\n" in email
    assert "该验证码5分钟内有效。" in email


def test_traditional_chinese() -> None:
    _, text = render_message(channel="SMS", locale="zh-TW", brand="Acme", code="123456", minutes=5)
    assert text == "【Acme】您的驗證碼是123456，5分鐘內有效。請勿洩露給他人。"


@pytest.mark.parametrize(
    ("tag", "resolved"),
    [
        ("en", "en"),
        ("en-GB", "en"),
        ("en_US", "en"),
        ("EN-gb", "en"),
        ("es", "es"),
        ("es-MX", "es"),
        ("es-419", "es"),
        ("zh-CN", "zh-CN"),
        ("zh_cn", "zh-CN"),
        ("zh", "zh-CN"),
        ("zh-Hans", "zh-CN"),
        ("zh-Hans-CN", "zh-CN"),
        ("zh-SG", "zh-CN"),
        ("zh-TW", "zh-TW"),
        ("zh-Hant", "zh-TW"),
        ("zh-Hant-HK", "zh-TW"),
        ("zh-HK", "zh-TW"),
        ("fr-FR", "en"),
        ("tlh", "en"),
        ("", "en"),
        ("  ", "en"),
        (None, "en"),
    ],
)
def test_resolve_locale(tag: str | None, resolved: str) -> None:
    assert resolve_locale(tag) == resolved


def test_unknown_locale_renders_english() -> None:
    assert render_message(
        channel="EMAIL", locale="fr-CA", brand="Acme", code="123456", minutes=5
    ) == render_message(channel="EMAIL", locale="en", brand="Acme", code="123456", minutes=5)


def test_regional_english_renders_english() -> None:
    assert render_message(
        channel="SMS", locale="en-GB", brand="Acme", code="123456", minutes=5
    ) == render_message(channel="SMS", locale="en", brand="Acme", code="123456", minutes=5)


def test_available_locales() -> None:
    assert available_locales() == ["en", "es", "zh-CN", "zh-TW"]


def test_brand_is_not_interpreted_as_a_template() -> None:
    subject, text = render_message(
        channel="SMS", locale="en", brand="{code}", code="123456", minutes=5
    )
    assert subject == "Your {code} verification code"
    assert text.startswith("Your {code} verification code is 123456.")


def test_unknown_channel_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^channel must be 'SMS' or 'EMAIL', not 'PUSH'$"):
        render_message(channel="PUSH", locale="en", brand="Acme", code="123456", minutes=5)


@pytest.mark.parametrize(
    ("seconds", "minutes"),
    [(300, 5), (301, 6), (299.5, 5), (240.01, 5), (60, 1), (59, 1), (1, 1), (0, 1), (-5, 1)],
)
def test_minutes_left_rounds_up(seconds: float, minutes: int) -> None:
    assert minutes_left(seconds) == minutes


@given(
    locale=st.sampled_from([*available_locales(), "en-GB", "pt-BR", None]),
    channel=st.sampled_from(["SMS", "EMAIL"]),
    code=st.from_regex(r"[0-9]{6,10}", fullmatch=True),
    minutes=st.integers(min_value=1, max_value=24 * 60),
)
def test_every_text_carries_code_and_minutes_and_no_subject_does(
    locale: str | None, channel: str, code: str, minutes: int
) -> None:
    subject, text = render_message(
        channel=channel, locale=locale, brand="Acme", code=code, minutes=minutes
    )
    assert code in text
    assert str(minutes) in text
    assert "Acme" in text or channel == "EMAIL"
    assert "Acme" in subject
    assert code not in subject
    assert "{" not in text and "}" not in text


# The GSM 03.38 default alphabet (without the escape table).  A text made only of these goes out
# as GSM-7 (160 characters a segment); anything else forces UCS-2 (70 a segment).
GSM7 = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)


@pytest.mark.parametrize("locale", available_locales())
def test_sms_fits_one_segment_for_a_typical_brand(locale: str) -> None:
    _, text = render_message(
        channel="SMS", locale=locale, brand="Acme Wallet", code="123456", minutes=5
    )
    limit = 160 if set(text) <= GSM7 else 70
    assert len(text) <= limit, (len(text), limit)
