"""The single exception type the protocol layer raises for bad input."""

from __future__ import annotations

from otpgate.protocol.codes import MAX_MESSAGE_LENGTH, ResultCode


class ProtocolError(Exception):
    """Bad input, answered with ``code`` and a merchant-actionable ``message`` (≤ 64 chars).

    Raised by header, time, signature and body parsing; the server turns it into a signed
    response. Nothing else may escape the parsers for any input.
    """

    def __init__(self, code: ResultCode, message: str | None = None) -> None:
        text = message if message else code.default_message
        if len(text) > MAX_MESSAGE_LENGTH:
            text = text[: MAX_MESSAGE_LENGTH - 3] + "..."
        super().__init__(text)
        self.code = code
        self.message = text
