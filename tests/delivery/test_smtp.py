"""SmtpProvider against real aiosmtpd servers started by the tests (plain, AUTH, STARTTLS, TLS)."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import email.utils
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from otpgate.delivery.base import (
    OutgoingMessage,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from otpgate.delivery.smtp import SmtpProvider
from otpgate.delivery.templates import render_message

# aiosmtpd warns when AUTH is allowed without TLS, which the plain-AUTH tests do on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

CODE = "482913"
FROM = "Acme Wallet <no-reply@acme.example>"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Collector:
    """aiosmtpd handler keeping every accepted envelope; can refuse RCPT like a real server."""

    envelopes: list[Envelope] = field(default_factory=list)
    rcpt_reply: str | None = None

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def parsed(self, index: int = 0) -> EmailMessage:
        content = self.envelopes[index].original_content
        assert isinstance(content, bytes)
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def smtp_server(collector: Collector) -> Iterator[Controller]:
    controller = Controller(collector, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller
    controller.stop()


def otp_message(
    *,
    message_id: str = "msg-0001",
    destination: str = "alice@example.com",
    locale: str = "en",
    minutes: int = 5,
) -> OutgoingMessage:
    subject, text = render_message(
        channel="EMAIL", locale=locale, brand="Acme", code=CODE, minutes=minutes
    )
    return OutgoingMessage(
        message_id=message_id,
        channel="EMAIL",
        destination=destination,
        subject=subject,
        text=text,
    )


def provider_for(controller: Controller, **overrides: Any) -> SmtpProvider:
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": controller.port,
        "tls": "none",
        "username": None,
        "password": None,
        "from_address": FROM,
        "timeout_seconds": 5.0,
    }
    options.update(overrides)
    return SmtpProvider(**options)


def unfolded(value: str) -> str:
    """A header value as a reader sees it: long Message-IDs are folded onto their own line
    (legal, RFC 5322 §3.2.2), and Python keeps the folding whitespace in the parsed value."""
    return re.sub(r"\s+", " ", value).strip()


def assert_code_free(exc: BaseException) -> None:
    assert CODE not in str(exc)
    assert "verification code is" not in str(exc)


async def test_sends_plain_text_email_with_headers(
    smtp_server: Controller, collector: Collector
) -> None:
    provider = provider_for(smtp_server)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)

    await provider.send(otp_message(message_id="0f8e6c2a-1"))

    assert len(collector.envelopes) == 1
    envelope = collector.envelopes[0]
    assert envelope.mail_from == "no-reply@acme.example"
    assert envelope.rcpt_tos == ["alice@example.com"]

    mail = collector.parsed()
    assert mail["From"] == FROM
    assert mail["To"] == "alice@example.com"
    assert mail["Subject"] == "Your Acme verification code"
    assert mail.get_content_type() == "text/plain"
    assert mail.get_content_charset() == "utf-8"
    body = mail.get_content().replace("\r\n", "\n")
    assert f"    {CODE}\n" in body
    assert "It expires in 5 minutes." in body

    # formatdate(localtime=False) writes UTC as "-0000" (RFC 5322: UTC, local zone not given).
    assert re.fullmatch(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} -0000", mail["Date"])
    sent_at = email.utils.parsedate_to_datetime(mail["Date"]).replace(tzinfo=dt.UTC)
    assert before - dt.timedelta(seconds=1) <= sent_at <= dt.datetime.now(dt.UTC)

    message_id = unfolded(mail["Message-ID"])
    assert re.fullmatch(r"<[A-Za-z0-9._-]+@acme\.example>", message_id), message_id
    assert "0f8e6c2a-1" in message_id
    assert mail["Auto-Submitted"] == "auto-generated"
    await provider.aclose()


async def test_message_ids_are_unique_and_sanitised(
    smtp_server: Controller, collector: Collector
) -> None:
    provider = provider_for(smtp_server)
    await provider.send(otp_message(message_id="row 42 <x@y>"))
    await provider.send(otp_message(message_id="row 42 <x@y>"))

    first = unfolded(collector.parsed(0)["Message-ID"])
    second = unfolded(collector.parsed(1)["Message-ID"])
    assert first != second
    for value in (first, second):
        assert re.fullmatch(r"<[A-Za-z0-9._-]+@acme\.example>", value), value
        assert "row-42--x-y-" in value


async def test_long_message_id_is_folded_legally(
    smtp_server: Controller, collector: Collector
) -> None:
    outbox_id = "3f2c9a7e-5b1d-4c8e-9f0a-1b2c3d4e5f60"
    await provider_for(smtp_server).send(otp_message(message_id=outbox_id))

    raw = collector.envelopes[0].original_content
    assert isinstance(raw, bytes)
    header = re.search(rb"^Message-ID:(.*?)\r\n(?! )", raw, re.MULTILINE | re.DOTALL)
    assert header is not None
    value = re.sub(rb"\r\n ", b" ", header.group(1)).strip().decode()
    assert re.fullmatch(r"<[A-Za-z0-9._-]+@acme\.example>", value), value
    assert outbox_id in value


async def test_non_ascii_subject_and_body_survive(
    smtp_server: Controller, collector: Collector
) -> None:
    provider = provider_for(smtp_server)
    await provider.send(otp_message(locale="zh-CN", minutes=3))

    mail = collector.parsed()
    assert mail["Subject"] == "您的Acme验证码"
    assert "3分钟内有效" in mail.get_content()
    assert CODE in mail.get_content()


async def test_server_not_listening_is_transient() -> None:
    port = free_port()
    provider = SmtpProvider(
        host="127.0.0.1",
        port=port,
        tls="none",
        username=None,
        password=None,
        from_address=FROM,
        timeout_seconds=5.0,
    )
    with pytest.raises(TransientDeliveryError) as info:
        await provider.send(otp_message())
    assert str(info.value).startswith(f"SMTP connection to 127.0.0.1:{port} failed")
    assert "refused" in str(info.value).lower()
    assert_code_free(info.value)


async def test_server_that_never_greets_times_out_in_time() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = SmtpProvider(
        host="127.0.0.1",
        port=port,
        tls="none",
        username=None,
        password=None,
        from_address=FROM,
        timeout_seconds=0.5,
    )
    started = time.monotonic()
    try:
        with pytest.raises(TransientDeliveryError) as info:
            await provider.send(otp_message())
    finally:
        server.close()
    assert time.monotonic() - started < 2.0
    assert str(info.value) == f"SMTP timeout after 0.5s (127.0.0.1:{port})"


async def test_recipient_refused_with_550_is_permanent(
    smtp_server: Controller, collector: Collector
) -> None:
    collector.rcpt_reply = "550 5.1.1 <alice@example.com>: user unknown"
    provider = provider_for(smtp_server)

    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(otp_message())

    assert str(info.value) == (
        "SMTP server refused the recipient: 550 5.1.1 <alice@example.com>: user unknown"
    )
    assert collector.envelopes == []
    assert_code_free(info.value)


async def test_recipient_refused_with_450_is_transient(
    smtp_server: Controller, collector: Collector
) -> None:
    collector.rcpt_reply = "450 4.2.1 mailbox busy, try later"
    provider = provider_for(smtp_server)

    with pytest.raises(TransientDeliveryError) as info:
        await provider.send(otp_message())
    assert str(info.value) == "SMTP server refused the recipient: 450 4.2.1 mailbox busy, try later"


def authenticator(
    server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"mailer", b"s3cret pass")
    # handled=False: let aiosmtpd answer "535 ..." itself on failure.
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def auth_server(collector: Collector) -> Iterator[Controller]:
    controller = Controller(
        collector,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=False,
    )
    controller.start()
    yield controller
    controller.stop()


async def test_auth_with_username_and_password(
    auth_server: Controller, collector: Collector
) -> None:
    provider = provider_for(auth_server, username="mailer", password="s3cret pass")
    await provider.send(otp_message())
    assert len(collector.envelopes) == 1
    assert collector.envelopes[0].rcpt_tos == ["alice@example.com"]


async def test_wrong_password_is_permanent_and_does_not_leak_it(
    auth_server: Controller, collector: Collector
) -> None:
    provider = provider_for(auth_server, username="mailer", password="wrong-horse")
    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(otp_message())
    assert str(info.value).startswith(
        "SMTP server refused the login (check SMTP_USERNAME/SMTP_PASSWORD): 535"
    )
    assert "wrong-horse" not in str(info.value)
    assert collector.envelopes == []


async def test_auth_required_but_not_configured_is_permanent(auth_server: Controller) -> None:
    provider = provider_for(auth_server)
    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(otp_message())
    assert str(info.value).startswith("SMTP server refused the sender (check SMTP_FROM): 530")


# --- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert_file))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost, made fresh for this test run."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otpgate test SMTP")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert_file, key_file)


@pytest.fixture
def starttls_server(collector: Collector, certificate: Certificate) -> Iterator[Controller]:
    """A submission-style server: STARTTLS required, AUTH only after it."""
    controller = Controller(
        collector,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=certificate.server_context(),
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    )
    controller.start()
    yield controller
    controller.stop()


async def test_starttls_then_auth(
    starttls_server: Controller, collector: Collector, certificate: Certificate
) -> None:
    provider = provider_for(
        starttls_server,
        tls="starttls",
        username="mailer",
        password="s3cret pass",
        tls_context=certificate.client_context(),
    )
    await provider.send(otp_message())

    assert len(collector.envelopes) == 1
    assert CODE in collector.parsed().get_content()


async def test_starttls_with_untrusted_certificate_is_permanent(
    starttls_server: Controller, collector: Collector
) -> None:
    provider = provider_for(
        starttls_server, tls="starttls", username="mailer", password="s3cret pass"
    )
    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(otp_message())
    assert str(info.value) == (
        f"SMTP server 127.0.0.1:{starttls_server.port} presented a certificate that is not trusted"
    )
    assert collector.envelopes == []


async def test_starttls_against_a_server_without_it_is_permanent(smtp_server: Controller) -> None:
    provider = provider_for(smtp_server, tls="starttls")
    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(otp_message())
    assert "STARTTLS" in str(info.value)


async def test_tls_none_never_upgrades(starttls_server: Controller, collector: Collector) -> None:
    # The server insists on STARTTLS; with tls="none" the provider must not upgrade on its own.
    provider = provider_for(starttls_server)
    with pytest.raises(PermanentDeliveryError) as info:
        await provider.send(otp_message())
    assert "530" in str(info.value)
    assert collector.envelopes == []


async def test_implicit_tls(collector: Collector, certificate: Certificate) -> None:
    controller = Controller(
        collector,
        hostname="127.0.0.1",
        port=free_port(),
        ssl_context=certificate.server_context(),
    )
    controller.start()
    try:
        provider = provider_for(
            controller, tls="implicit", tls_context=certificate.client_context()
        )
        await provider.send(otp_message())
    finally:
        controller.stop()
    assert len(collector.envelopes) == 1


# --- construction and hygiene ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls": "ssl"}, "SMTP TLS mode must be 'none', 'starttls' or 'implicit', not 'ssl'"),
        ({"username": "mailer"}, "SMTP username and password must be set together"),
        ({"from_address": "Acme"}, "SMTP from address 'Acme' has no user@domain part"),
        ({"timeout_seconds": 0}, "SMTP timeout must be a positive number of seconds"),
    ],
)
def test_rejects_bad_configuration(overrides: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {
        "host": "smtp.example.com",
        "port": 587,
        "tls": "starttls",
        "username": None,
        "password": None,
        "from_address": FROM,
    }
    options.update(overrides)
    with pytest.raises(ValueError) as info:
        SmtpProvider(**options)
    assert str(info.value) == message


def test_message_repr_hides_the_text() -> None:
    message = otp_message()
    assert CODE not in repr(message)
    assert "msg-0001" in repr(message)


def test_provider_repr_hides_the_password() -> None:
    provider = SmtpProvider(
        host="smtp.example.com",
        port=587,
        tls="starttls",
        username="mailer",
        password="s3cret pass",
        from_address=FROM,
    )
    assert provider.name == "smtp"
    assert "s3cret" not in repr(provider)
