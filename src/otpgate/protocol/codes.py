"""The result-code catalogue of PROTOCOL.md §5.

Every answer the server gives, errors included, carries one of these codes. The status
(S, F or U) is fixed per code: merchants branch on it, so it must never vary.
"""

from __future__ import annotations

import enum


class ResultStatus(enum.StrEnum):
    SUCCESS = "S"
    FAILED = "F"
    UNKNOWN = "U"


class ResultCode(enum.Enum):
    """A catalogue entry: ``code.name`` is the wire code, ``code.status`` its fixed status."""

    SUCCESS = ("S", "Success")
    PARAM_ILLEGAL = ("F", "Illegal parameters exist.")
    PROCESS_FAIL = ("F", "A general business failure occurred. Do not retry.")
    UNKNOWN_EXCEPTION = ("U", "An API calling is failed, which is caused by unknown reasons.")
    KEY_NOT_FOUND = ("F", "The key is not found.")
    API_INVALID = ("F", "API is invalid or not active.")
    CLIENT_INVALID = ("F", "The client is invalid.")
    SIGNATURE_INVALID = ("F", "The signature is invalid.")
    METHOD_NOT_SUPPORTED = ("F", "The server does not implement the requested HTTP method.")
    REQUEST_TRAFFIC_EXCEED_LIMIT = ("U", "The request traffic exceeds the limit.")
    ACCESS_DENIED = ("F", "Access denied")
    USER_NOT_EXIST = ("F", "The user does not exist.")
    USER_STATUS_ABNORMAL = ("F", "The user status is abnormal.")
    INVALID_ACCESS_TOKEN = ("F", "The access token is invalid.")
    VERIFY_TIMES_EXCEED_LIMIT = ("F", "The verification code was failed too many times.")
    VERIFY_UNMATCHED = ("F", "The verification code is invalid.")
    AUTHENTICATION_REQUEST_ID_INVALID = ("F", "The value of authenticationRequestId is invalid")

    @property
    def status(self) -> ResultStatus:
        return ResultStatus(self.value[0])

    @property
    def default_message(self) -> str:
        message: str = self.value[1]
        return message


# resultMessage is String(64) in the interface document.
MAX_MESSAGE_LENGTH = 64
