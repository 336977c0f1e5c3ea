"""Settings: defaults, overridden by ``<data dir>/config.toml``, overridden by ``OTPGATE_<NAME>``.

Every setting is named as in OPERATOR.md (upper-case in the file and the environment, the
lower-case attribute here). Unknown names in the file are an operator error, reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otpgate.protocol.messages import MAX_BODY_BYTES

DEFAULT_DATA_DIR = "./otpgate-data"
CONFIG_FILE = "config.toml"


class ConfigError(Exception):
    """A setting has a bad value; the message says which and what is expected."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR))
    # OTP rules (PROTOCOL.md §6)
    otp_ttl_seconds: int = 300
    otp_max_attempts: int = 5
    otp_length: int = 6
    request_time_window_seconds: int = 600
    user_send_interval_seconds: int = 30
    user_sends_per_10_min: int = 5
    user_failure_budget: int = 10
    user_lockout_seconds: int = 900
    user_lockout_max_seconds: int = 86_400
    client_rate_per_second: int = 100
    # HTTP
    max_body_bytes: int = MAX_BODY_BYTES  # can only be lowered: the body decoder caps it
    server_key_version: int = 1
    client_cache_seconds: float = 1.0
    # Backends
    database_url: str = ""
    redis_url: str = ""
    redis_prefix: str = "otpgate"
    # Delivery
    email_provider: str = "inbox"
    sms_provider: str = "inbox"
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_tls: str = "none"
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_from: str = "otpgate@localhost"
    smtp_timeout_seconds: float = 10.0
    sms_http_url: str = ""
    sms_http_headers: str = "{}"
    sms_http_timeout_seconds: float = 10.0
    sms_http_preset: str = "json"
    sms_http_from: str = ""
    outbox_max_tries: int = 8
    outbox_lease_seconds: float = 30.0
    outbox_poll_seconds: float = 0.2
    outbox_retry_base_seconds: float = 1.0
    delivery_in_process: bool = True
    log_level: str = "info"
    access_log: bool = True

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "otpgate.db"

    @property
    def uses_sqlite(self) -> bool:
        return not self.database_url or self.database_url.startswith("sqlite")

    def sms_headers(self) -> dict[str, str]:
        try:
            value = json.loads(self.sms_http_headers or "{}")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"SMS_HTTP_HEADERS must be a JSON object: {exc}") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError("SMS_HTTP_HEADERS must be a JSON object of strings")
        return value


_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "data_dir"}


def _coerce(name: str, raw: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind == "int":
            number = int(raw)
            if number < 0:
                raise ValueError(raw)
            return number
        if kind == "float":
            real = float(raw)
            if not real >= 0:
                raise ValueError(raw)
            return real
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name.upper()} must be a non-negative {kind}, got {raw!r}") from None


def load_settings(data_dir: str | os.PathLike[str] | None = None) -> Settings:
    """Read the settings for ``data_dir`` (or ``OTPGATE_DATA_DIR``, or the default)."""
    directory = Path(data_dir or os.environ.get("OTPGATE_DATA_DIR") or DEFAULT_DATA_DIR)
    values: dict[str, Any] = {}
    config_file = directory / CONFIG_FILE
    if config_file.exists():
        try:
            document = tomllib.loads(config_file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid TOML: {exc}") from None
        for key, raw in document.items():
            name = key.lower()
            if name not in _FIELDS:
                raise ConfigError(f"{config_file}: unknown setting {key}")
            values[name] = _coerce(name, raw)
    for name in _FIELDS:
        env = os.environ.get(f"OTPGATE_{name.upper()}")
        if env is not None:
            values[name] = _coerce(name, env)
    settings = Settings(data_dir=directory, **values)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if not 6 <= s.otp_length <= 10:
        raise ConfigError("OTP_LENGTH must be between 6 and 10")
    if s.otp_max_attempts < 1 or s.otp_ttl_seconds < 1:
        raise ConfigError("OTP_MAX_ATTEMPTS and OTP_TTL_SECONDS must be at least 1")
    if not 1 <= s.max_body_bytes <= MAX_BODY_BYTES:
        raise ConfigError(f"MAX_BODY_BYTES must be between 1 and {MAX_BODY_BYTES}")
    if s.email_provider not in {"inbox", "smtp"}:
        raise ConfigError("EMAIL_PROVIDER must be inbox or smtp")
    if s.sms_provider not in {"inbox", "http"}:
        raise ConfigError("SMS_PROVIDER must be inbox or http")
    if s.smtp_tls not in {"none", "starttls", "implicit"}:
        raise ConfigError("SMTP_TLS must be none, starttls or implicit")
    if s.sms_provider == "http" and not s.sms_http_url:
        raise ConfigError("SMS_PROVIDER=http needs SMS_HTTP_URL")
    if s.database_url and not s.database_url.startswith(("postgresql://", "postgres://", "sqlite")):
        raise ConfigError("DATABASE_URL must start with postgresql:// (or be empty for SQLite)")


def default_config_text() -> str:
    """The commented config file ``otpgate init`` writes: every setting at its default."""
    lines = [
        "# otpgate settings. Uncomment to change; OTPGATE_<NAME> environment variables win.",
        "",
    ]
    defaults = Settings()
    for name in _FIELDS:
        value = getattr(defaults, name)
        rendered = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        lines.append(f"# {name.upper()} = {rendered}")
    return "\n".join(lines) + "\n"
