"""Plain records the domain works with. Stores build them; nothing here does I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

CHANNELS = ("SMS", "EMAIL")
APIS = ("initAuthentication", "verifyAuthentication")
SCOPE_SEND_OTP = "SEND_OTP"
MAX_CLIENT_ID_LENGTH = 64  # registered ids; longer ones are refused before any lookup


class UserStatus(enum.StrEnum):
    NORMAL = "NORMAL"
    FROZEN = "FROZEN"


@dataclass(frozen=True, slots=True)
class ClientKey:
    key_version: int
    public_key: str  # PEM
    active: bool = True


@dataclass(frozen=True, slots=True)
class Client:
    """A registered merchant."""

    client_id: str
    enabled: bool = True
    sandbox: bool = False
    display_name: str = ""
    channels: frozenset[str] = frozenset(CHANNELS)
    apis: frozenset[str] = frozenset(APIS)
    rate_per_second: int | None = None  # None: the server-wide default
    keys: tuple[ClientKey, ...] = ()

    @property
    def brand(self) -> str:
        return self.display_name or self.client_id


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    status: UserStatus
    phone: str | None = None
    email: str | None = None
    locale: str | None = None
    locked_until: float = 0.0

    def contact(self, channel: str) -> str | None:
        return self.phone if channel == "SMS" else self.email


@dataclass(frozen=True, slots=True)
class AccessToken:
    client_id: str
    user_id: str
    scopes: frozenset[str]
    expires_at: float
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class NewChallenge:
    """Everything the store needs to create a challenge and queue its message atomically."""

    client_id: str
    request_id: str
    user_id: str
    channel: str
    destination: str
    params_hash: bytes
    code_mac: bytes
    key_id: str
    created_at: float
    expires_at: float
    max_attempts: int
    message_subject: str
    message_text: str  # holds the code: the store seals it before writing
    provider: str  # "inbox" for sandbox clients, else the channel's configured provider


@dataclass(frozen=True, slots=True)
class SendLimits:
    """Per-user send limits, enforced in the same transaction as the challenge insert."""

    min_interval_seconds: int = 30
    max_per_window: int = 5
    window_seconds: int = 600


@dataclass(frozen=True, slots=True)
class FailurePolicy:
    """Per-user failure budget across challenges and its growing lockout (PROTOCOL.md §6)."""

    budget: int = 10
    lockout_seconds: int = 900
    max_lockout_seconds: int = 86_400

    def lockout_for(self, level: int) -> float:
        """Lockout length for the ``level``-th lockout (0-based): doubling, capped."""
        return float(min(self.lockout_seconds * (2 ** min(level, 32)), self.max_lockout_seconds))


@dataclass(frozen=True, slots=True)
class AuditEvent:
    api: str
    client_id: str
    request_id: str | None
    user_id: str | None
    result_code: str
    detail: str = ""
    at: float = 0.0


class InitStatus(enum.Enum):
    CREATED = "created"
    REPLAYED = "replayed"  # same id, same parameters: the stored SUCCESS again, nothing sent
    CONFLICT = "conflict"  # same id, different parameters
    SEND_INTERVAL = "send_interval"
    SEND_WINDOW = "send_window"
    LOCKED = "locked"


@dataclass(frozen=True, slots=True)
class InitDecision:
    status: InitStatus
    outbox_id: int | None = None


class VerifyStatus(enum.Enum):
    PASSED = "passed"  # this call passed the challenge
    REPLAYED = "replayed"  # already passed with this same value
    UNMATCHED = "unmatched"
    EXHAUSTED = "exhausted"  # attempts used up (by this call or before)
    EXPIRED = "expired"
    SUPERSEDED = "superseded"
    USED = "used"  # already passed, with another value
    UNKNOWN = "unknown"  # no such id for this client
    LOCKED = "locked"  # the user is locked out by the failure budget


@dataclass(frozen=True, slots=True)
class VerifyDecision:
    status: VerifyStatus
    attempts_left: int = 0
    user_id: str | None = None
    locked_now: bool = False  # this failure exhausted the user's budget
    extra: dict[str, str] = field(default_factory=dict)
