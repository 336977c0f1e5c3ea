"""Administration commands: clients, users, tokens, inbox, outbox, audit."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from otpgate.cli.output import CommandError, emit, iso, table, with_store
from otpgate.core.contacts import normalize_email, normalize_phone
from otpgate.core.models import (
    CHANNELS,
    MAX_CLIENT_ID_LENGTH,
    Client,
    ClientKey,
    User,
    UserStatus,
)
from otpgate.core.otp import hash_token, new_token
from otpgate.protocol.signing import load_public_key, public_key_pem
from otpgate.store import Store
from otpgate.store.audit import first_broken_row


def _read_public_key(path: str) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read public key file {path}: {exc.strerror}") from None
    try:
        return public_key_pem(load_public_key(raw))
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}") from None


def _version(value: int) -> int:
    if value < 1:
        raise CommandError("--key-version must be a positive integer")
    return value


# ---- clients -----------------------------------------------------------------------


def cmd_client_add(args: argparse.Namespace) -> int:
    channels = frozenset(c.strip().upper() for c in args.channels.split(",") if c.strip())
    if not channels or channels - set(CHANNELS):
        raise CommandError("--channels takes SMS, EMAIL or SMS,EMAIL")
    if not args.client_id or len(args.client_id) > MAX_CLIENT_ID_LENGTH:
        raise CommandError(f"CLIENT_ID must be 1 to {MAX_CLIENT_ID_LENGTH} characters")
    client = Client(
        client_id=args.client_id,
        sandbox=args.sandbox or args.client_id.startswith("SANDBOX_"),
        display_name=args.name,
        channels=channels,
        rate_per_second=args.rate,
        keys=(ClientKey(_version(args.key_version), _read_public_key(args.public_key)),),
    )

    async def work(store: Store) -> None:
        await store.add_client(client)

    with_store(args, work)
    emit(
        args,
        {"clientId": client.client_id, "keyVersion": args.key_version, "sandbox": client.sandbox},
        f"client {client.client_id} added (key version {args.key_version}"
        f"{', sandbox' if client.sandbox else ''})",
    )
    return 0


def cmd_client_key_add(args: argparse.Namespace) -> int:
    key = ClientKey(_version(args.key_version), _read_public_key(args.public_key))

    async def work(store: Store) -> None:
        await store.add_client_key(args.client_id, key)

    with_store(args, work)
    emit(
        args,
        {"clientId": args.client_id, "keyVersion": key.key_version},
        f"client {args.client_id}: key version {key.key_version} added",
    )
    return 0


def cmd_client_key_revoke(args: argparse.Namespace) -> int:
    async def work(store: Store) -> None:
        await store.revoke_client_key(args.client_id, args.key_version)

    with_store(args, work)
    emit(
        args,
        {"clientId": args.client_id, "keyVersion": args.key_version, "revoked": True},
        f"client {args.client_id}: key version {args.key_version} revoked",
    )
    return 0


def cmd_client_enable(args: argparse.Namespace) -> int:
    async def work(store: Store) -> None:
        await store.set_client_enabled(args.client_id, args.enabled)

    with_store(args, work)
    state = "enabled" if args.enabled else "disabled"
    emit(
        args,
        {"clientId": args.client_id, "enabled": args.enabled},
        f"client {args.client_id} {state}",
    )
    return 0


def cmd_client_list(args: argparse.Namespace) -> int:
    clients = with_store(args, lambda store: store.list_clients())
    document = [
        {
            "clientId": c.client_id,
            "enabled": c.enabled,
            "sandbox": c.sandbox,
            "name": c.display_name,
            "channels": sorted(c.channels),
            "keyVersions": [k.key_version for k in c.keys],
            "ratePerSecond": c.rate_per_second,
        }
        for c in clients
    ]
    rows = [
        (
            c.client_id,
            "yes" if c.enabled else "no",
            "yes" if c.sandbox else "no",
            ",".join(sorted(c.channels)),
            ",".join(str(k.key_version) for k in c.keys),
        )
        for c in clients
    ]
    emit(args, document, table(rows, ["CLIENT", "ENABLED", "SANDBOX", "CHANNELS", "KEYS"]))
    return 0


# ---- users -------------------------------------------------------------------------


def _contact(kind: str, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    normalize = normalize_phone if kind == "phone" else normalize_email
    try:
        return normalize(value)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _user_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 128:
        raise CommandError("user id must be a string of 1 to 128 characters")
    return value


def cmd_user_add(args: argparse.Namespace) -> int:
    user = User(
        _user_id(args.user_id),
        UserStatus.NORMAL,
        _contact("phone", args.phone),
        _contact("email", args.email),
        args.locale,
    )

    async def work(store: Store) -> int:
        return await store.add_users([user])

    with_store(args, work)
    emit(
        args,
        _user_document(user.user_id, "NORMAL", user.phone, user.email, user.locale),
        f"user {user.user_id} added",
    )
    return 0


def cmd_user_set(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    if args.phone is not None:
        changes["phone"] = _contact("phone", args.phone)
    if args.email is not None:
        changes["email"] = _contact("email", args.email)
    if args.locale is not None:
        changes["locale"] = args.locale or None
    if not changes:
        raise CommandError("nothing to change: give --phone, --email or --locale")

    async def work(store: Store) -> None:
        await store.update_user(args.user_id, **changes)

    with_store(args, work)
    emit(args, {"userId": args.user_id, **changes}, f"user {args.user_id} updated")
    return 0


def cmd_user_set_status(args: argparse.Namespace) -> int:
    async def work(store: Store) -> None:
        await store.update_user(args.user_id, status=args.status)

    with_store(args, work)
    emit(
        args,
        {"userId": args.user_id, "status": args.status},
        f"user {args.user_id} is now {args.status}",
    )
    return 0


def cmd_user_delete(args: argparse.Namespace) -> int:
    async def work(store: Store) -> None:
        await store.delete_user(args.user_id)

    with_store(args, work)
    emit(args, {"userId": args.user_id, "deleted": True}, f"user {args.user_id} deleted")
    return 0


def _user_document(
    user_id: str, status: str, phone: str | None, email: str | None, locale: str | None
) -> dict[str, Any]:
    return {"userId": user_id, "status": status, "phone": phone, "email": email, "locale": locale}


def cmd_user_list(args: argparse.Namespace) -> int:
    users = with_store(args, lambda store: store.list_users(args.limit))
    now = time.time()
    document = [
        {
            **_user_document(u.user_id, u.status, u.phone, u.email, u.locale),
            "lockedUntil": iso(u.locked_until) if u.locked_until > now else None,
        }
        for u in users
    ]
    rows = [
        (d["userId"], d["status"], d["phone"], d["email"], d["locale"], d["lockedUntil"])
        for d in document
    ]
    emit(args, document, table(rows, ["USER", "STATUS", "PHONE", "EMAIL", "LOCALE", "LOCKED"]))
    return 0


def _imported_user(line: str, seen: set[str]) -> User:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise CommandError("not a JSON object")
    user_id = _user_id(record.get("userId"))
    if user_id in seen:
        raise CommandError(f"user id {user_id} appears twice")
    seen.add(user_id)
    locale = record.get("locale")
    if locale is not None and not isinstance(locale, str):
        raise CommandError("locale must be a string")
    return User(
        user_id,
        UserStatus.NORMAL,
        _contact("phone", record.get("phone")),
        _contact("email", record.get("email")),
        locale,
    )


def cmd_user_import(args: argparse.Namespace) -> int:
    """Validate every line first; load all or nothing."""
    users: list[User] = []
    seen: set[str] = set()
    try:
        lines = Path(args.file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {args.file}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            users.append(_imported_user(line, seen))
        except json.JSONDecodeError as exc:
            raise CommandError(f"{args.file} line {number}: not JSON ({exc.msg})") from None
        except CommandError as exc:
            raise CommandError(f"{args.file} line {number}: {exc}") from None

    async def work(store: Store) -> int:
        return await store.add_users(users)

    count = with_store(args, work)
    emit(args, {"imported": count}, f"imported {count} users")
    return 0


# ---- tokens ------------------------------------------------------------------------


def _scopes(values: list[str]) -> frozenset[str]:
    scopes = frozenset(v.strip() for v in values if v.strip())
    if not scopes:
        raise CommandError("--scope needs at least one scope")
    return scopes


def _ttl(value: int) -> int:
    if value < 1:
        raise CommandError("--ttl-seconds must be at least 1")
    return value


def cmd_token_issue(args: argparse.Namespace) -> int:
    token = new_token()
    expires_at = time.time() + _ttl(args.ttl_seconds)
    scopes = _scopes(args.scope)

    async def work(store: Store) -> None:
        await store.add_tokens([(hash_token(token), args.client, args.user, scopes, expires_at)])

    with_store(args, work)
    emit(args, {"accessToken": token, "accessTokenExpiryTime": iso(expires_at)}, token)
    return 0


def cmd_token_issue_batch(args: argparse.Namespace) -> int:
    try:
        user_ids = [
            line.strip() for line in Path(args.users_file).read_text().splitlines() if line.strip()
        ]
    except OSError as exc:
        raise CommandError(f"cannot read {args.users_file}: {exc.strerror}") from None
    expires_at = time.time() + _ttl(args.ttl_seconds)
    scopes = _scopes(args.scope)
    issued = [(user_id, new_token()) for user_id in user_ids]

    async def work(store: Store) -> None:
        await store.add_tokens(
            [
                (hash_token(token), args.client, user_id, scopes, expires_at)
                for user_id, token in issued
            ]
        )

    with_store(args, work)
    expiry = iso(expires_at)
    for user_id, token in issued:
        print(
            json.dumps({"userId": user_id, "accessToken": token, "accessTokenExpiryTime": expiry})
        )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    async def work(store: Store) -> None:
        await store.revoke_token(hash_token(args.token))

    with_store(args, work)
    emit(args, {"revoked": True}, "token revoked")
    return 0


# ---- inbox, outbox, audit ------------------------------------------------------------


def cmd_inbox_list(args: argparse.Namespace) -> int:
    messages = with_store(args, lambda store: store.list_inbox(args.user, max(1, args.limit)))
    document = [
        {
            "channel": m.channel,
            "destination": m.destination,
            "text": m.text,
            "createdAt": iso(m.created_at),
            "userId": m.user_id,
            "clientId": m.client_id,
        }
        for m in messages
    ]
    rows = [
        (d["createdAt"], d["userId"], d["channel"], d["destination"], d["text"]) for d in document
    ]
    emit(args, document, table(rows, ["CREATED", "USER", "CHANNEL", "TO", "TEXT"]))
    return 0


def cmd_outbox_list(args: argparse.Namespace) -> int:
    entries = with_store(args, lambda store: store.list_outbox(max(1, args.limit), args.status))
    document = [
        {
            "id": e.outbox_id,
            "clientId": e.client_id,
            "userId": e.user_id,
            "channel": e.channel,
            "destination": e.destination,
            "provider": e.provider,
            "status": e.status,
            "tries": e.tries,
            "lastError": e.last_error,
            "createdAt": iso(e.created_at),
        }
        for e in entries
    ]
    rows = [
        (
            d["id"],
            d["channel"],
            d["destination"],
            d["provider"],
            d["status"],
            d["tries"],
            d["lastError"],
        )
        for d in document
    ]
    emit(
        args,
        document,
        table(rows, ["ID", "CHANNEL", "TO", "PROVIDER", "STATUS", "TRIES", "LAST ERROR"]),
    )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    rows = with_store(args, lambda store: store.audit_rows())
    broken = first_broken_row(rows)
    if broken is None:
        head = rows[-1].row_hash.hex() if rows else None
        emit(
            args,
            {"intact": True, "rows": len(rows), "head": head},
            f"audit chain intact ({len(rows)} rows, head {head})",
        )
        return 0
    seq, reason = broken
    emit(
        args,
        {"intact": False, "rows": len(rows), "firstBadRow": seq, "reason": reason},
        f"audit chain broken at row {seq}: {reason}",
    )
    return 1
