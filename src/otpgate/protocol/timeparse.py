"""``Request-Time`` parsing and ``response-time`` formatting (PROTOCOL.md §3, §7).

``Request-Time`` is signed as an opaque string, but the freshness check needs the instant it
names, and every SDK writes it differently: epoch milliseconds (Java, Go), ISO-8601 with
``+00:00`` (Python), seven fractional digits and ``Z`` (.NET), ``+0800`` (PHP, in its
configured zone). One precompiled regex covers all of them; it runs on every request, so
there is no trial-and-error over ``strptime`` formats.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from otpgate.protocol.codes import ResultCode
from otpgate.protocol.errors import ProtocolError

__all__ = ["format_response_time", "parse_request_time"]

# A request can only be fresh if it is near "now": years outside this range are client bugs
# (or overflow probes), never a clock that is merely off.
_MIN_YEAR = 1970
_MAX_YEAR = 2999
_MAX_EPOCH_MS = 32503680000000  # 3000-01-01T00:00:00Z
_MAX_OFFSET_MINUTES = 18 * 60  # the widest offset ISO-8601 tooling (java.time) accepts

_EPOCH_MS = re.compile(r"[0-9]{1,14}", re.ASCII)
_ISO_8601 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:[.,]([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2})(?::?([0-9]{2}))?)",
    re.ASCII,
)


def _invalid(message: str = "Request-Time is not a valid time") -> ProtocolError:
    return ProtocolError(ResultCode.PARAM_ILLEGAL, message)


def parse_request_time(value: str) -> float:
    """Return the instant ``value`` names, in epoch seconds.

    Accepts epoch milliseconds and ISO-8601 with a ``Z`` or numeric offset (``+00:00``,
    ``+0000``, ``+08``) and 1-9 fractional digits. A time without an offset is rejected:
    it could be off by up to a day. Raises only ``ProtocolError(PARAM_ILLEGAL)``.
    """
    if not value:
        raise _invalid("Request-Time is missing")

    if _EPOCH_MS.fullmatch(value):
        millis = int(value)
        if millis > _MAX_EPOCH_MS:
            raise _invalid("Request-Time is out of range")
        return millis / 1000

    match = _ISO_8601.fullmatch(value)
    if match is None:
        raise _invalid()
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()

    if not _MIN_YEAR <= int(year) <= _MAX_YEAR:
        raise _invalid("Request-Time is out of range")
    offset_minutes = 0
    if not zulu:
        offset_minutes = int(off_h) * 60 + int(off_m or 0)
        if int(off_m or 0) > 59 or offset_minutes > _MAX_OFFSET_MINUTES:
            raise _invalid("Request-Time has an invalid UTC offset")
        if sign == "-":
            offset_minutes = -offset_minutes
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError:
        raise _invalid("Request-Time is not a valid calendar date") from None

    seconds = moment.timestamp() - offset_minutes * 60
    if fraction:
        seconds += int(fraction) / 10 ** len(fraction)
    return seconds


def format_response_time(epoch_seconds: float) -> str:
    """ISO-8601 in UTC with millisecond precision and an explicit offset.

    ``2026-11-28T19:17:23.123+00:00``: the ``+00:00`` form is what the Python SDK itself
    sends, and every SDK's parser reads it.
    """
    return datetime.fromtimestamp(epoch_seconds, UTC).isoformat(timespec="milliseconds")
