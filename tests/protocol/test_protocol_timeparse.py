"""Request-Time in every SDK dialect, and nothing but ProtocolError for anything else."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otpgate.protocol import (
    MAX_MESSAGE_LENGTH,
    ProtocolError,
    ResultCode,
    format_response_time,
    parse_request_time,
)

# 2026-11-28T19:17:23Z
BASE = datetime(2026, 11, 28, 19, 17, 23, tzinfo=UTC).timestamp()
assert BASE == 1795893443


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1685599933871", 1685599933.871),  # Java / Go: epoch milliseconds
        ("0", 0.0),
        ("2026-11-28T19:17:23+00:00", BASE),  # Python SDK
        ("2026-11-28T19:17:23.1234567Z", BASE + 0.1234567),  # .NET
        ("2026-11-28T19:17:23+0000", BASE),  # PHP in UTC
        ("2026-11-28T19:17:23+0800", BASE - 8 * 3600),  # PHP in Asia/Shanghai
        ("2026-11-28T19:17:23-0530", BASE + 5.5 * 3600),
        ("2026-11-28T19:17:23-05:30", BASE + 5.5 * 3600),
        ("2026-11-28T19:17:23+08", BASE - 8 * 3600),
        ("2026-11-28T19:17:23Z", BASE),
        ("2026-11-28t19:17:23z", BASE),
        ("2026-11-28T19:17:23-00:00", BASE),
        ("2026-11-28T19:17:23.5Z", BASE + 0.5),
        ("2026-11-28T19:17:23.123+00:00", BASE + 0.123),
        ("2026-11-28T19:17:23.123456+00:00", BASE + 0.123456),
        ("2026-11-28T19:17:23.123456789+00:00", BASE + 0.123456789),
        ("2026-11-28T19:17:23,25Z", BASE + 0.25),  # ISO-8601 allows a comma
        ("2024-02-29T00:00:00Z", datetime(2024, 2, 29, tzinfo=UTC).timestamp()),
        ("2026-11-28T19:17:23+18:00", BASE - 18 * 3600),
    ],
)
def test_dialects(value: str, expected: float) -> None:
    assert parse_request_time(value) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("digits", range(1, 10))
def test_fraction_lengths(digits: int) -> None:
    value = f"2026-11-28T19:17:23.{'9' * digits}Z"
    assert parse_request_time(value) == pytest.approx(BASE + 1 - 10**-digits, abs=1e-6)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "Request-Time is missing"),
        (" ", "Request-Time is not a valid time"),
        ("garbage", "Request-Time is not a valid time"),
        ("2026-11-28T19:17:23", "Request-Time is not a valid time"),  # naive: no offset
        ("2026-11-28", "Request-Time is not a valid time"),
        ("2026-11-28T19:17Z", "Request-Time is not a valid time"),
        ("2026-11-28T19:17:23.Z", "Request-Time is not a valid time"),
        ("2026-11-28T19:17:23.1234567890Z", "Request-Time is not a valid time"),  # 10 digits
        ("2026-11-28T19:17:23+8", "Request-Time is not a valid time"),
        ("2026-11-28T19:17:23 +00:00", "Request-Time is not a valid time"),
        ("2026-11-28T19:17:23Z\n", "Request-Time is not a valid time"),
        ("\n2026-11-28T19:17:23Z", "Request-Time is not a valid time"),
        ("2026-11-28T19:17:23\x00Z", "Request-Time is not a valid time"),
        ("+1685599933871", "Request-Time is not a valid time"),
        ("-1685599933871", "Request-Time is not a valid time"),
        ("1685599933871.5", "Request-Time is not a valid time"),
        ("1_685_599_933_871", "Request-Time is not a valid time"),
        ("0x1F", "Request-Time is not a valid time"),
        ("1e12", "Request-Time is not a valid time"),
        ("NaN", "Request-Time is not a valid time"),
        ("inf", "Request-Time is not a valid time"),
        ("1" * 40, "Request-Time is not a valid time"),
        ("\u0661\u0666\u0668\u0665\u0665\u0669\u0669", "Request-Time is not a valid time"),
        ("\uff12\uff10\uff12\uff16-11-28T19:17:23Z", "Request-Time is not a valid time"),
        ("99999999999999", "Request-Time is out of range"),
        ("0001-01-01T00:00:00Z", "Request-Time is out of range"),
        ("1969-12-31T23:59:59Z", "Request-Time is out of range"),
        ("9999-12-31T23:59:59+00:00", "Request-Time is out of range"),
        ("2026-02-29T00:00:00Z", "Request-Time is not a valid calendar date"),
        ("2026-13-01T00:00:00Z", "Request-Time is not a valid calendar date"),
        ("2026-11-28T24:00:00Z", "Request-Time is not a valid calendar date"),
        ("2026-11-28T23:60:00Z", "Request-Time is not a valid calendar date"),
        ("2026-11-28T23:59:60Z", "Request-Time is not a valid calendar date"),
        ("2026-11-28T19:17:23+19:00", "Request-Time has an invalid UTC offset"),
        ("2026-11-28T19:17:23+0099", "Request-Time has an invalid UTC offset"),
    ],
)
def test_rejects(value: str, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request_time(value)
    assert info.value.code is ResultCode.PARAM_ILLEGAL
    assert info.value.message == message


@given(st.text())
def test_raises_only_protocol_error(value: str) -> None:
    try:
        result = parse_request_time(value)
    except ProtocolError as exc:
        assert exc.code is ResultCode.PARAM_ILLEGAL
        assert len(exc.message) <= MAX_MESSAGE_LENGTH
    else:
        assert isinstance(result, float) and math.isfinite(result)


@given(st.from_regex(r"\A[0-9]{1,4}-[0-9]{1,2}-[0-9]{1,2}T[0-9:.,+\-Zz]{0,30}\Z"))
def test_near_misses_raise_only_protocol_error(value: str) -> None:
    try:
        assert math.isfinite(parse_request_time(value))
    except ProtocolError as exc:
        assert exc.code is ResultCode.PARAM_ILLEGAL


offsets = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
)
moments = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2998, 12, 31), timezones=offsets
)


@given(moments)
def test_python_isoformat_round_trip(moment: datetime) -> None:
    assert parse_request_time(moment.isoformat()) == pytest.approx(moment.timestamp(), abs=1e-6)


@given(moments)
def test_php_and_dotnet_round_trip(moment: datetime) -> None:
    php = moment.strftime("%Y-%m-%dT%H:%M:%S%z")  # DATE_ISO8601: +0800
    assert parse_request_time(php) == moment.replace(microsecond=0).timestamp()
    utc = moment.astimezone(UTC)
    dotnet = utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond * 10:07d}Z"
    assert parse_request_time(dotnet) == pytest.approx(moment.timestamp(), abs=1e-6)


@given(st.integers(min_value=0, max_value=32503680000000))
def test_epoch_millis_round_trip(millis: int) -> None:
    assert parse_request_time(str(millis)) == millis / 1000


def test_format_response_time() -> None:
    assert format_response_time(BASE + 0.123) == "2026-11-28T19:17:23.123+00:00"
    assert format_response_time(BASE) == "2026-11-28T19:17:23.000+00:00"


@given(st.floats(min_value=0, max_value=32503679999, allow_nan=False))
def test_format_response_time_parses_back(epoch: float) -> None:
    text = format_response_time(epoch)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", text)
    assert parse_request_time(text) == pytest.approx(epoch, abs=1e-3)
