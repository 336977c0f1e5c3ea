# Chinese texts use full-width commas and colons, as Chinese typography requires.
# ruff: noqa: RUF001
"""The words around the code: per-locale SMS and email texts.

Templates live in code rather than in files so that a missing or broken translation is a test
failure, not a runtime surprise in the delivery worker.  Adding a language is adding one
:class:`Template` to ``_TEMPLATES`` (and, if a bare language tag should reach it, to ``_ALIASES``).

The locale is the user's stored tag (``otpgate user add --locale TAG``).  It is matched forgivingly:
case and ``_``/``-`` do not matter, ``en-GB`` falls back to ``en``, ``zh-Hans-CN`` to ``zh-CN``, and
anything unknown gets English, because a message in the wrong language still beats no message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "DEFAULT_LOCALE",
    "available_locales",
    "minutes_left",
    "render_message",
    "resolve_locale",
]

DEFAULT_LOCALE = "en"


@dataclass(frozen=True, slots=True)
class Template:
    """One locale's texts.  Placeholders: ``{brand}``, ``{code}``, ``{minutes}`` (e.g. "5 minutes").

    ``minute`` and ``minutes`` are the singular and plural forms of the unit; languages without
    grammatical number use the same word twice.
    """

    sms: str
    subject: str
    email: str
    minute: str
    minutes: str


_EN = Template(
    sms="Your {brand} verification code is {code}. It expires in {minutes}. Never share it.",
    subject="Your {brand} verification code",
    email=(
        "Hello,\n"
        "\n"
        "Your {brand} verification code is:\n"
        "\n"
        "    {code}\n"
        "\n"
        "It expires in {minutes}. Never share this code with anyone, not even {brand} staff.\n"
        "\n"
        "If you did not request this code, you can ignore this email.\n"
    ),
    minute="1 minute",
    minutes="{n} minutes",
)

_ES = Template(
    # Short on purpose: "ó" is not in the GSM-7 alphabet, so this SMS goes out as UCS-2, where a
    # single segment holds only 70 characters.
    sms="Código de {brand}: {code}. Caduca en {minutes}. No lo compartas.",
    subject="Tu código de verificación de {brand}",
    email=(
        "Hola:\n"
        "\n"
        "Tu código de verificación de {brand} es:\n"
        "\n"
        "    {code}\n"
        "\n"
        "Caduca en {minutes}. No compartas este código con nadie, ni siquiera con el personal "
        "de {brand}.\n"
        "\n"
        "Si no has solicitado este código, puedes ignorar este correo.\n"
    ),
    minute="1 minuto",
    minutes="{n} minutos",
)

# Chinese carriers expect the sender's signature in 【】 at the start of an SMS.
_ZH_CN = Template(
    sms="【{brand}】您的验证码是{code}，{minutes}内有效。请勿泄露给他人。",
    subject="您的{brand}验证码",
    email=(
        "您好：\n"
        "\n"
        "您的{brand}验证码是：\n"
        "\n"
        "    {code}\n"
        "\n"
        "该验证码{minutes}内有效。请勿将验证码告诉任何人，包括{brand}的工作人员。\n"
        "\n"
        "如果这不是您本人的操作，请忽略此邮件。\n"
    ),
    minute="1分钟",
    minutes="{n}分钟",
)

_ZH_TW = Template(
    sms="【{brand}】您的驗證碼是{code}，{minutes}內有效。請勿洩露給他人。",
    subject="您的{brand}驗證碼",
    email=(
        "您好：\n"
        "\n"
        "您的{brand}驗證碼是：\n"
        "\n"
        "    {code}\n"
        "\n"
        "此驗證碼{minutes}內有效。請勿將驗證碼告訴任何人，包括{brand}的工作人員。\n"
        "\n"
        "如果這不是您本人的操作，請忽略此郵件。\n"
    ),
    minute="1分鐘",
    minutes="{n}分鐘",
)

_TEMPLATES: dict[str, Template] = {
    "en": _EN,
    "es": _ES,
    "zh-cn": _ZH_CN,
    "zh-tw": _ZH_TW,
}

# Tags that do not reduce to a template key by dropping subtags.
_ALIASES: dict[str, str] = {
    "zh": "zh-cn",
    "zh-hans": "zh-cn",
    "zh-sg": "zh-cn",
    "zh-hant": "zh-tw",
    "zh-hk": "zh-tw",
    "zh-mo": "zh-tw",
}

_CHANNELS = frozenset({"SMS", "EMAIL"})


def available_locales() -> list[str]:
    """The locales with their own texts, in canonical spelling (``["en", "es", "zh-CN", ...]``)."""
    return [_canonical(key) for key in _TEMPLATES]


def resolve_locale(locale: str | None) -> str:
    """Map a user's locale tag to the locale whose texts will be used (canonical spelling).

    Subtags are dropped from the right until something matches, so ``zh-Hant-HK`` tries
    ``zh-hant-hk``, ``zh-hant`` (an alias of ``zh-TW``) and stops there.
    """
    if locale:
        parts = locale.strip().replace("_", "-").lower().split("-")
        while parts:
            tag = "-".join(parts)
            tag = _ALIASES.get(tag, tag)
            if tag in _TEMPLATES:
                return _canonical(tag)
            parts.pop()
    return DEFAULT_LOCALE


def minutes_left(seconds: float) -> int:
    """Remaining validity for the message: whole minutes rounded up, at least 1.

    Rounding up keeps the promise honest from the user's side ("expires in 5 minutes" for 300 s),
    and a code that is about to expire still says "1 minute" rather than the puzzling "0 minutes".
    """
    return max(1, math.ceil(seconds / 60))


def render_message(
    *, channel: str, locale: str | None, brand: str, code: str, minutes: int
) -> tuple[str, str]:
    """Return ``(subject, text)`` for a one-time-code message.

    ``subject`` is meant for email (SMS providers ignore it) and never contains the code, because
    subjects show up in notification previews and mail logs.  ``minutes`` below 1 is shown as 1.
    """
    if channel not in _CHANNELS:
        raise ValueError(f"channel must be 'SMS' or 'EMAIL', not {channel!r}")
    template = _TEMPLATES[resolve_locale(locale).lower()]
    minutes = max(1, minutes)
    duration = template.minute if minutes == 1 else template.minutes.format(n=minutes)
    values = {"brand": brand, "code": code, "minutes": duration}
    subject = template.subject.format_map(values)
    body = template.sms if channel == "SMS" else template.email
    return subject, body.format_map(values)


def _canonical(key: str) -> str:
    language, _, region = key.partition("-")
    return f"{language}-{region.upper()}" if region else language
