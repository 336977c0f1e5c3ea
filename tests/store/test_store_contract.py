"""The store contract: what every store (SQLite, PostgreSQL) answers, run against each.

Times come from a fake clock (``NOW``) passed to every call, so limits, expiry and leases are
checked at exact boundaries. Where a claim is about what is stored (a wiped payload, the
attempts counter, the audit chain), the test reads the database directly.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from otpgate.core.models import (
    AccessToken,
    AuditEvent,
    Client,
    ClientKey,
    FailurePolicy,
    InitDecision,
    InitStatus,
    SendLimits,
    User,
    UserStatus,
    VerifyDecision,
    VerifyStatus,
)
from otpgate.store.audit import first_broken_row
from otpgate.store.base import Store
from otpgate.store.errors import StoreConflict
from otpgate.store.records import UserRecord
from store.conftest import (
    ALICE,
    BOB,
    CODE,
    NOW,
    OTHER,
    SHOP,
    Backend,
    challenge,
    init_event,
    mac,
    pem,
    verify,
)

NO_LIMITS = SendLimits(min_interval_seconds=0, max_per_window=0)


async def create(
    store: Store, request_id: str = "r-1", *, limits: SendLimits = NO_LIMITS, **fields: Any
) -> InitDecision:
    """Init as the service does it, without send limits unless given."""
    c = challenge(request_id, **fields)
    return await store.create_challenge(c, limits, init_event(c))


async def attempts(backend: Backend, request_id: str = "r-1", client_id: str = SHOP) -> int:
    return int(
        await backend.fetchval(
            "SELECT attempts FROM challenges WHERE client_id = ? AND request_id = ?",
            client_id,
            request_id,
        )
    )


async def count(backend: Backend, table: str) -> int:
    return int(await backend.fetchval(f"SELECT count(*) FROM {table}"))


def conflict(message: str) -> pytest.RaisesExc[StoreConflict]:
    """Expect a StoreConflict with exactly this message (both stores word them alike)."""
    return pytest.raises(StoreConflict, match=f"^{re.escape(message)}$")


async def user_record(store: Store, user_id: str = ALICE) -> UserRecord:
    (record,) = [u for u in await store.list_users() if u.user_id == user_id]
    return record


# ---- clients ------------------------------------------------------------------------


async def test_client_round_trip(store: Store) -> None:
    client = Client(
        "M_FULL",
        enabled=True,
        sandbox=True,
        display_name="Full Shop",
        channels=frozenset({"SMS"}),
        apis=frozenset({"verifyAuthentication"}),
        rate_per_second=50,
        keys=(ClientKey(2, pem(2)), ClientKey(1, pem(1))),
    )
    await store.add_client(client)
    await store.add_client(Client("M_BARE"))

    assert await store.get_client("M_FULL") == Client(
        "M_FULL",
        enabled=True,
        sandbox=True,
        display_name="Full Shop",
        channels=frozenset({"SMS"}),
        apis=frozenset({"verifyAuthentication"}),
        rate_per_second=50,
        keys=(ClientKey(1, pem(1)), ClientKey(2, pem(2))),  # by key version
    )
    assert await store.get_client("M_BARE") == Client("M_BARE")
    assert await store.get_client("M_NONE") is None


async def test_duplicate_client_conflicts(store: Store) -> None:
    await store.add_client(Client(SHOP, display_name="first"))
    with conflict(f"client {SHOP} already exists"):
        await store.add_client(Client(SHOP, display_name="second"))
    assert (await store.get_client(SHOP)) == Client(SHOP, display_name="first")


async def test_client_keys_add_and_revoke(store: Store) -> None:
    await store.add_client(Client(SHOP, keys=(ClientKey(1, pem(1)),)))
    await store.add_client_key(SHOP, ClientKey(2, pem(2)))
    with conflict(f"client {SHOP} already has key version 2"):
        await store.add_client_key(SHOP, ClientKey(2, pem(3)))
    with conflict("no client M_NONE"):
        await store.add_client_key("M_NONE", ClientKey(1, pem(1)))

    await store.revoke_client_key(SHOP, 1)
    client = await store.get_client(SHOP)
    assert client is not None
    assert client.keys == (ClientKey(2, pem(2)),)
    with conflict(f"client {SHOP} has no active key version 1"):
        await store.revoke_client_key(SHOP, 1)
    with conflict(f"client {SHOP} has no active key version 9"):
        await store.revoke_client_key(SHOP, 9)


async def test_enable_and_disable_client(store: Store) -> None:
    await store.add_client(Client(SHOP))
    await store.set_client_enabled(SHOP, False)
    disabled = await store.get_client(SHOP)
    assert disabled is not None and disabled.enabled is False
    await store.set_client_enabled(SHOP, True)
    enabled = await store.get_client(SHOP)
    assert enabled is not None and enabled.enabled is True
    with conflict("no client M_NONE"):
        await store.set_client_enabled("M_NONE", False)


async def test_list_clients_sorts_bytewise_with_active_keys(store: Store) -> None:
    for name in ("b_shop", "B_SHOP", "a_shop"):
        await store.add_client(Client(name, keys=(ClientKey(1, pem(1)), ClientKey(2, pem(2)))))
    await store.revoke_client_key("a_shop", 2)
    clients = await store.list_clients()
    assert [c.client_id for c in clients] == ["B_SHOP", "a_shop", "b_shop"]
    assert [len(c.keys) for c in clients] == [2, 1, 2]


# ---- users --------------------------------------------------------------------------


async def test_users_round_trip(store: Store) -> None:
    added = await store.add_users(
        [
            User("carol", UserStatus.NORMAL, phone="+14155550100", locale="de"),
            User("Bob", UserStatus.FROZEN, email="bob@example.com"),
        ]
    )
    assert added == 2
    assert await store.get_user("carol") == User(
        "carol", UserStatus.NORMAL, "+14155550100", None, "de", 0.0
    )
    assert await store.get_user("nobody") is None

    await store.update_user("carol", status=UserStatus.FROZEN, email="c@example.com", phone=None)
    assert await store.get_user("carol") == User(
        "carol", UserStatus.FROZEN, None, "c@example.com", "de", 0.0
    )
    assert await store.list_users() == [
        UserRecord("Bob", "FROZEN", None, "bob@example.com", None, 0.0, 0),
        UserRecord("carol", "FROZEN", None, "c@example.com", "de", 0.0, 0),
    ]
    assert [u.user_id for u in await store.list_users(limit=1)] == ["Bob"]

    with conflict("no user nobody"):
        await store.update_user("nobody", locale="fr")
    with pytest.raises(ValueError, match="can only change"):
        await store.update_user("carol", locked_until=0)
    with pytest.raises(ValueError, match="can only change"):
        await store.update_user("carol")


async def test_duplicate_user_conflicts_and_adds_nothing(store: Store) -> None:
    await store.add_users([User(ALICE, UserStatus.NORMAL)])
    with pytest.raises(StoreConflict, match=r"^a user already exists \("):
        await store.add_users([User("carol", UserStatus.NORMAL), User(ALICE, UserStatus.NORMAL)])
    assert [u.user_id for u in await store.list_users()] == [ALICE]


async def test_delete_user_supersedes_pending_challenges(seeded: Store) -> None:
    store = seeded
    assert (await create(store)).status is InitStatus.CREATED
    await store.delete_user(ALICE)
    assert await store.get_user(ALICE) is None
    assert (await verify(store)).status is VerifyStatus.SUPERSEDED
    with conflict(f"no user {ALICE}"):
        await store.delete_user(ALICE)


# ---- tokens -------------------------------------------------------------------------


async def test_tokens_add_get_revoke(seeded: Store) -> None:
    store = seeded
    scopes = frozenset({"SEND_OTP", "OTHER"})
    await store.add_tokens(
        [(b"h" * 32, SHOP, ALICE, scopes, NOW + 3600), (b"i" * 32, OTHER, BOB, scopes, NOW)]
    )
    assert await store.get_token(b"h" * 32) == AccessToken(SHOP, ALICE, scopes, NOW + 3600, False)
    assert await store.get_token(b"x" * 32) is None

    await store.revoke_token(b"h" * 32)
    assert await store.get_token(b"h" * 32) == AccessToken(SHOP, ALICE, scopes, NOW + 3600, True)
    with conflict("no active token matches"):
        await store.revoke_token(b"h" * 32)
    with conflict("no active token matches"):
        await store.revoke_token(b"x" * 32)


async def test_tokens_need_existing_clients_and_users(seeded: Store) -> None:
    store = seeded
    scopes = frozenset({"SEND_OTP"})
    with conflict("no user ghost"):
        await store.add_tokens(
            [(b"a" * 32, SHOP, ALICE, scopes, NOW), (b"b" * 32, SHOP, "ghost", scopes, NOW)]
        )
    with conflict("no client M_NONE"):
        await store.add_tokens([(b"a" * 32, "M_NONE", ALICE, scopes, NOW)])
    # Every token's client is checked, not only the first one's.
    with conflict("no client M_NONE"):
        await store.add_tokens(
            [(b"a" * 32, SHOP, ALICE, scopes, NOW), (b"b" * 32, "M_NONE", BOB, scopes, NOW)]
        )
    assert await store.get_token(b"a" * 32) is None
    assert await store.get_token(b"b" * 32) is None


async def test_duplicate_token_conflicts(seeded: Store) -> None:
    store = seeded
    scopes = frozenset({"SEND_OTP"})
    await store.add_tokens([(b"a" * 32, SHOP, ALICE, scopes, NOW)])
    with conflict("a token already exists"):
        await store.add_tokens([(b"a" * 32, SHOP, BOB, scopes, NOW)])
    assert await store.get_token(b"a" * 32) == AccessToken(SHOP, ALICE, scopes, NOW)


# ---- initAuthentication ---------------------------------------------------------------


async def test_init_creates_challenge_and_sealed_message(seeded: Store, backend: Backend) -> None:
    store = seeded
    c = challenge("r-1")
    decision = await store.create_challenge(c, NO_LIMITS, init_event(c))
    assert decision.status is InitStatus.CREATED
    assert decision.outbox_id is not None
    assert await store.find_init(SHOP, "r-1") == c.params_hash
    assert await store.find_init(OTHER, "r-1") is None  # ids are scoped per client

    (entry,) = await store.list_outbox(10)
    assert entry.outbox_id == decision.outbox_id
    assert (entry.client_id, entry.user_id, entry.channel) == (SHOP, ALICE, "SMS")
    assert (entry.destination, entry.provider, entry.status) == ("+14155550123", "inbox", "queued")
    assert (entry.tries, entry.last_error, entry.created_at, entry.finished_at) == (
        0,
        None,
        NOW,
        None,
    )
    assert await store.outbox_depth() == 1

    stored = bytes(await backend.fetchval("SELECT payload FROM outbox"))
    assert CODE.encode() not in stored  # sealed at rest
    assert bytes(await backend.fetchval("SELECT code_mac FROM challenges")) == c.code_mac
    assert await backend.fetchval("SELECT state FROM challenges") == "pending"


async def test_init_replay_and_conflict(seeded: Store, backend: Backend) -> None:
    store = seeded
    first = await create(store, "r-1")
    assert first.status is InitStatus.CREATED
    again = await create(store, "r-1", now=NOW + 5)
    assert again == InitDecision(InitStatus.REPLAYED)
    clash = await create(store, "r-1", now=NOW + 6, params=b"EMAIL|token-of-alice")
    assert clash == InitDecision(InitStatus.CONFLICT)
    # Another client may use the same id.
    assert (await create(store, "r-1", client_id=OTHER, now=NOW + 7)).status is InitStatus.CREATED

    assert await count(backend, "challenges") == 2
    assert await count(backend, "outbox") == 2
    codes = [(row.client_id, row.result_code) for row in await store.audit_rows()]
    assert codes == [(SHOP, "SUCCESS"), (SHOP, "SUCCESS"), (SHOP, "CONFLICT"), (OTHER, "SUCCESS")]


async def test_send_interval(seeded: Store) -> None:
    store = seeded
    limits = SendLimits(min_interval_seconds=30, max_per_window=0)
    assert (await create(store, "r-1", limits=limits)).status is InitStatus.CREATED
    refused = await create(store, "r-2", limits=limits, now=NOW + 29.9)
    assert refused == InitDecision(InitStatus.SEND_INTERVAL)
    # Per user, across clients; another user is not held back.
    assert (await create(store, "r-3", limits=limits, client_id=OTHER, now=NOW + 10)).status is (
        InitStatus.SEND_INTERVAL
    )
    assert (await create(store, "r-4", limits=limits, user_id=BOB, now=NOW + 10)).status is (
        InitStatus.CREATED
    )
    assert (await create(store, "r-5", limits=limits, now=NOW + 30)).status is InitStatus.CREATED
    assert [row.result_code for row in await store.audit_rows()] == [
        "SUCCESS",
        "SEND_INTERVAL",
        "SEND_INTERVAL",
        "SUCCESS",
        "SUCCESS",
    ]


async def test_send_window(seeded: Store) -> None:
    store = seeded
    limits = SendLimits(min_interval_seconds=0, max_per_window=3, window_seconds=600)
    for n in range(3):
        assert (
            await create(store, f"r-{n}", limits=limits, now=NOW + n)
        ).status is InitStatus.CREATED
    assert await create(store, "r-3", limits=limits, now=NOW + 599) == InitDecision(
        InitStatus.SEND_WINDOW
    )
    # At NOW + 600 the first send has left the window.
    assert (await create(store, "r-4", limits=limits, now=NOW + 600)).status is InitStatus.CREATED
    assert (
        await create(store, "r-5", limits=limits, now=NOW + 600)
    ).status is InitStatus.SEND_WINDOW


async def test_init_for_locked_user(seeded: Store, backend: Backend) -> None:
    store = seeded
    assert (await create(store, "r-1")).status is InitStatus.CREATED
    await backend.execute("UPDATE users SET locked_until = ? WHERE user_id = ?", NOW + 100, ALICE)
    assert await create(store, "r-2", now=NOW + 50) == InitDecision(InitStatus.LOCKED)
    # A replay is answered before the lockout is considered.
    assert (await create(store, "r-1", now=NOW + 50)).status is InitStatus.REPLAYED
    assert (await create(store, "r-3", now=NOW + 100)).status is InitStatus.CREATED
    assert await count(backend, "challenges") == 2


async def test_init_supersedes_pending_challenge_of_same_client(seeded: Store) -> None:
    store = seeded
    await create(store, "r-1")
    await create(store, "r-other", client_id=OTHER)
    await create(store, "r-bob", user_id=BOB)
    await create(store, "r-2", now=NOW + 1)

    assert (await verify(store, "r-1", now=NOW + 2)).status is VerifyStatus.SUPERSEDED
    assert (await verify(store, "r-2", now=NOW + 2)).status is VerifyStatus.PASSED
    assert (
        await verify(store, "r-other", client_id=OTHER, now=NOW + 2)
    ).status is VerifyStatus.PASSED
    assert (await verify(store, "r-bob", now=NOW + 2)).status is VerifyStatus.PASSED


# ---- verifyAuthentication -----------------------------------------------------------


async def test_wrong_values_count_down_then_exhaust(seeded: Store, backend: Backend) -> None:
    store = seeded
    await create(store)
    lefts = []
    for n in range(4):
        decision = await verify(store, value=f"00000{n}")
        assert (decision.status, decision.user_id, decision.locked_now) == (
            VerifyStatus.UNMATCHED,
            ALICE,
            False,
        )
        lefts.append(decision.attempts_left)
    assert lefts == [4, 3, 2, 1]
    last = await verify(store, value="000009")
    assert (last.status, last.attempts_left) == (VerifyStatus.EXHAUSTED, 0)
    right = await verify(store, value=CODE)
    assert (right.status, right.user_id) == (VerifyStatus.EXHAUSTED, ALICE)

    assert await attempts(backend) == 5
    assert await backend.fetchval("SELECT state FROM challenges") == "exhausted"
    assert [row.result_code for row in (await store.audit_rows())[1:]] == [
        *["VERIFY_UNMATCHED"] * 4,
        "VERIFY_TIMES_EXCEED_LIMIT",
        "VERIFY_TIMES_EXCEED_LIMIT",
    ]


async def test_right_value_on_last_attempt_passes(seeded: Store) -> None:
    store = seeded
    await create(store)
    for _ in range(4):
        await verify(store, value="000000")
    assert (await verify(store, value=CODE)).status is VerifyStatus.PASSED


async def test_pass_then_replay_then_used(seeded: Store, backend: Backend) -> None:
    store = seeded
    await create(store)
    passed = await verify(store)
    assert (passed.status, passed.user_id) == (VerifyStatus.PASSED, ALICE)
    assert (await verify(store, now=NOW + 2)).status is VerifyStatus.REPLAYED
    assert (await verify(store, value="654321", now=NOW + 3)).status is VerifyStatus.USED
    assert await attempts(backend) == 1  # neither replays nor later values count
    assert await backend.fetchval("SELECT finished_at FROM challenges") == NOW + 1
    rows = (await store.audit_rows())[1:]
    assert [(row.result_code, row.user_id) for row in rows] == [
        ("SUCCESS", ALICE),
        ("SUCCESS", ALICE),
        ("AUTHENTICATION_REQUEST_ID_INVALID", ALICE),
    ]


async def test_any_current_key_mac_passes(seeded: Store) -> None:
    store = seeded
    await create(store)
    rotated = [mac(SHOP, "r-1", CODE, key=b"new-key"), mac(SHOP, "r-1", CODE)]
    assert (await verify(store, macs=rotated)).status is VerifyStatus.PASSED


async def test_expired(seeded: Store, backend: Backend) -> None:
    store = seeded
    await create(store, ttl=300)
    assert (await verify(store, value="000000", now=NOW + 299.5)).status is VerifyStatus.UNMATCHED
    assert (await verify(store, now=NOW + 300)).status is VerifyStatus.EXPIRED
    assert await attempts(backend) == 1


async def test_unknown_and_other_clients_ids(seeded: Store, backend: Backend) -> None:
    store = seeded
    await create(store, "r-1")
    assert await verify(store, "r-nope") == VerifyDecision(VerifyStatus.UNKNOWN)
    # SHOP's id is unknown to OTHER, and OTHER's guess costs SHOP's challenge nothing.
    assert await verify(store, "r-1", client_id=OTHER) == VerifyDecision(VerifyStatus.UNKNOWN)
    assert await attempts(backend) == 0
    row = (await store.audit_rows())[-1]
    assert (row.client_id, row.request_id, row.user_id, row.result_code) == (
        OTHER,
        "r-1",
        None,
        "AUTHENTICATION_REQUEST_ID_INVALID",
    )


async def test_failure_budget_locks_across_challenges(seeded: Store, backend: Backend) -> None:
    store = seeded
    policy = FailurePolicy(budget=3, lockout_seconds=100, max_lockout_seconds=250)

    async def wrong(request_id: str, now: float) -> tuple[VerifyStatus, bool]:
        d = await verify(store, request_id, "000000", now=now, policy=policy)
        return d.status, d.locked_now

    await create(store, "r-1")
    assert await wrong("r-1", NOW + 1) == (VerifyStatus.UNMATCHED, False)
    assert await wrong("r-1", NOW + 2) == (VerifyStatus.UNMATCHED, False)
    await create(store, "r-2", now=NOW + 3)  # a new code does not reset the budget
    assert (await user_record(store)).failed_verifies == 2
    assert await wrong("r-2", NOW + 4) == (VerifyStatus.UNMATCHED, True)
    locked = await store.get_user(ALICE)
    assert locked is not None and locked.locked_until == NOW + 4 + 100
    assert (await user_record(store)).failed_verifies == 0

    # While locked: verify is refused without spending an attempt, even with the right code.
    assert (await verify(store, "r-2", now=NOW + 50, policy=policy)).status is VerifyStatus.LOCKED
    assert await attempts(backend, "r-2") == 1
    assert (await create(store, "r-3", now=NOW + 50)).status is InitStatus.LOCKED

    # The second lockout doubles, the third is capped.
    t = NOW + 104
    for expected in (200, 250):
        await create(store, f"r-{t}", now=t)
        for n in range(3):
            _, locked_now = await wrong(f"r-{t}", t + n)
            assert locked_now is (n == 2)
        user = await store.get_user(ALICE)
        assert user is not None and user.locked_until == t + 2 + expected
        t = t + 2 + expected

    # A pass resets the count and the lockout level.
    await create(store, "r-pass", now=t)
    assert await wrong("r-pass", t) == (VerifyStatus.UNMATCHED, False)
    assert (await verify(store, "r-pass", now=t + 1, policy=policy)).status is VerifyStatus.PASSED
    assert (await user_record(store)).failed_verifies == 0
    await create(store, "r-after", now=t + 2)
    for n in range(3):
        await wrong("r-after", t + 3 + n)
    user = await store.get_user(ALICE)
    assert user is not None and user.locked_until == t + 5 + 100  # level 0 again


# ---- outbox and inbox ---------------------------------------------------------------


async def test_outbox_lease_retry_and_finish(seeded: Store, backend: Backend) -> None:
    store = seeded
    decision = await create(store)
    (claimed,) = await store.claim_due(NOW, 10, 30)
    assert claimed.outbox_id == decision.outbox_id
    assert (claimed.subject, claimed.text, claimed.tries) == (
        "Your code",
        f"Your code is {CODE}",
        1,
    )
    assert (claimed.destination, claimed.expires_at) == ("+14155550123", NOW + 300)
    assert await store.claim_due(NOW + 29, 10, 30) == []  # leased

    await store.retry_message(claimed.outbox_id, NOW + 60, "gateway busy")
    assert await store.claim_due(NOW + 59, 10, 30) == []  # not due yet
    (again,) = await store.claim_due(NOW + 60, 10, 30)
    assert (again.outbox_id, again.tries) == (claimed.outbox_id, 2)
    (entry,) = await store.list_outbox(10)
    assert (entry.status, entry.tries, entry.last_error) == ("queued", 2, "gateway busy")

    # A lease that runs out (worker died) makes the message claimable again.
    (third,) = await store.claim_due(NOW + 90, 10, 30)
    assert third.tries == 3

    await store.finish_message(claimed.outbox_id, "sent", NOW + 95)
    assert await backend.fetchval("SELECT payload FROM outbox") is None
    (entry,) = await store.list_outbox(10)
    assert (entry.status, entry.finished_at, entry.last_error) == ("sent", NOW + 95, "gateway busy")
    assert await store.outbox_depth() == 0
    assert await store.claim_due(NOW + 1000, 10, 30) == []


async def test_finish_records_the_error(seeded: Store, backend: Backend) -> None:
    store = seeded
    await create(store)
    (claimed,) = await store.claim_due(NOW, 10, 30)
    await store.finish_message(claimed.outbox_id, "failed", NOW + 1, "rejected number")
    (entry,) = await store.list_outbox(10, status="failed")
    assert (entry.last_error, entry.finished_at) == ("rejected number", NOW + 1)
    assert await backend.fetchval("SELECT payload FROM outbox") is None


async def test_claim_takes_earliest_due_first_up_to_limit(seeded: Store) -> None:
    store = seeded
    await create(store, "r-late", user_id=BOB, now=NOW + 2)
    await create(store, "r-early", now=NOW)
    await create(store, "r-mid", client_id=OTHER, now=NOW + 1)
    claimed = await store.claim_due(NOW + 10, 2, 30)
    assert sorted(m.client_id + "/" + m.user_id for m in claimed) == [
        "M_OTHER/alice",
        "M_SHOP/alice",
    ]
    (rest,) = await store.claim_due(NOW + 10, 2, 30)
    assert rest.user_id == BOB


async def test_deliver_to_inbox_is_idempotent(seeded: Store, backend: Backend) -> None:
    store = seeded
    await create(store)
    await create(store, "r-bob", user_id=BOB, now=NOW + 1)
    first, second = sorted(await store.claim_due(NOW + 1, 10, 30), key=lambda m: m.outbox_id)
    await store.deliver_to_inbox([first], NOW + 2)
    await store.deliver_to_inbox([first], NOW + 3)  # a retry after a lost answer
    await store.deliver_to_inbox([second], NOW + 4)

    (alices,) = await store.list_inbox(ALICE, 10)
    assert (alices.client_id, alices.user_id, alices.channel) == (SHOP, ALICE, "SMS")
    assert (alices.destination, alices.text, alices.created_at) == (
        "+14155550123",
        f"Your code is {CODE}",
        NOW + 2,
    )
    assert [m.user_id for m in await store.list_inbox(None, 10)] == [BOB, ALICE]  # newest first
    assert [m.user_id for m in await store.list_inbox(None, 1)] == [BOB]
    assert await store.list_inbox("nobody", 10) == []
    assert CODE.encode() not in bytes(
        await backend.fetchval("SELECT payload FROM inbox WHERE user_id = ?", ALICE)
    )

    statuses = [(e.user_id, e.status, e.finished_at) for e in await store.list_outbox(10)]
    assert statuses == [(BOB, "sent", NOW + 4), (ALICE, "sent", NOW + 3)]
    assert await backend.fetchval("SELECT count(*) FROM outbox WHERE payload IS NOT NULL") == 0


async def test_list_outbox_newest_first_with_filter(seeded: Store) -> None:
    store = seeded
    await create(store, "r-1")
    await create(store, "r-2", user_id=BOB)
    (claimed,) = [m for m in await store.claim_due(NOW, 10, 30) if m.user_id == ALICE]
    await store.finish_message(claimed.outbox_id, "expired", NOW + 1, "code expired")
    assert [e.user_id for e in await store.list_outbox(10)] == [BOB, ALICE]
    assert [e.user_id for e in await store.list_outbox(1)] == [BOB]
    assert [e.user_id for e in await store.list_outbox(10, status="queued")] == [BOB]
    assert [e.user_id for e in await store.list_outbox(10, status="expired")] == [ALICE]
    assert await store.outbox_depth() == 1


# ---- audit chain --------------------------------------------------------------------


async def test_audit_chain_intact_then_tampered(seeded: Store, backend: Backend) -> None:
    store = seeded
    await store.record_audit(
        AuditEvent("initAuthentication", SHOP, "r-0", None, "ACCESS_DENIED", "no", NOW)
    )
    await create(store, "r-1")
    await create(store, "r-1")  # replay
    await verify(store, "r-1", "000000")
    await verify(store, "r-1")
    await verify(store, "r-nope")
    await store.record_audit(
        AuditEvent("verifyAuthentication", OTHER, None, BOB, "X", 'ünïcode "q"', NOW + 9.25)
    )

    rows = await store.audit_rows()
    assert [row.seq for row in rows] == list(range(1, 8))
    assert [row.result_code for row in rows] == [
        "ACCESS_DENIED",
        "SUCCESS",
        "SUCCESS",
        "VERIFY_UNMATCHED",
        "SUCCESS",
        "AUTHENTICATION_REQUEST_ID_INVALID",
        "X",
    ]
    assert rows[3].user_id == ALICE and rows[5].user_id is None
    assert (rows[6].detail, rows[6].at) == ('ünïcode "q"', NOW + 9.25)
    assert first_broken_row(rows) is None

    await backend.execute("UPDATE audit SET detail = ? WHERE seq = ?", "edited", 4)
    broken = first_broken_row(await store.audit_rows())
    assert broken == (4, "row content does not match its hash (row edited)")


async def test_audit_chain_detects_a_deleted_row(seeded: Store, backend: Backend) -> None:
    store = seeded
    for n in range(3):
        await store.record_audit(
            AuditEvent("initAuthentication", SHOP, f"r-{n}", None, "X", "", NOW)
        )
    await backend.execute("DELETE FROM audit WHERE seq = ?", 2)
    assert first_broken_row(await store.audit_rows()) == (3, "row 2 is missing (found 3 after it)")


# ---- concurrency --------------------------------------------------------------------


async def test_200_concurrent_wrong_guesses_claim_exactly_five(
    seeded: Store, backend: Backend
) -> None:
    store = seeded
    await create(store)
    decisions = await backend.concurrently(200, lambda s: verify(s, value="000000"))

    statuses = Counter(d.status for d in decisions)
    assert statuses == {VerifyStatus.UNMATCHED: 4, VerifyStatus.EXHAUSTED: 196}
    unmatched = sorted(d.attempts_left for d in decisions if d.status is VerifyStatus.UNMATCHED)
    assert unmatched == [1, 2, 3, 4]
    assert await attempts(backend) == 5
    assert (await user_record(store)).failed_verifies == 5  # only claimed attempts are charged
    rows = await store.audit_rows()
    assert len(rows) == 201 and first_broken_row(rows) is None


async def test_concurrent_right_values_pass_once(seeded: Store, backend: Backend) -> None:
    store = seeded
    await create(store)
    decisions = await backend.concurrently(50, lambda s: verify(s))
    assert Counter(d.status for d in decisions) == {
        VerifyStatus.PASSED: 1,
        VerifyStatus.REPLAYED: 49,
    }
    assert await attempts(backend) == 1


async def test_50_concurrent_duplicate_inits_create_once(seeded: Store, backend: Backend) -> None:
    store = seeded
    decisions = await backend.concurrently(50, lambda s: create(s, "r-dup"))
    statuses = Counter(d.status for d in decisions)
    assert statuses == {InitStatus.CREATED: 1, InitStatus.REPLAYED: 49}
    assert await count(backend, "challenges") == 1
    assert await count(backend, "outbox") == 1
    rows = await store.audit_rows()
    assert len(rows) == 50 and first_broken_row(rows) is None


async def test_concurrent_same_id_for_different_users(seeded: Store, backend: Backend) -> None:
    store = seeded

    async def init(s: Store, user_id: str) -> InitDecision:
        return await create(s, "r-same", user_id=user_id, params=user_id.encode())

    users = [ALICE, BOB] * 10
    decisions = await backend.concurrently(20, lambda s: init(s, users.pop()))
    # One wins; its user's other nine are replays, the other user's ten conflict.
    statuses = Counter(d.status for d in decisions)
    assert statuses == {InitStatus.CREATED: 1, InitStatus.REPLAYED: 9, InitStatus.CONFLICT: 10}
    assert await count(backend, "challenges") == 1
    assert await count(backend, "outbox") == 1
    rows = await store.audit_rows()
    assert len(rows) == 20 and first_broken_row(rows) is None


async def test_20_concurrent_inits_for_one_user_respect_the_interval(
    seeded: Store, backend: Backend
) -> None:
    limits = SendLimits(min_interval_seconds=30)
    ids = iter(range(20))
    decisions = await backend.concurrently(
        20, lambda store: create(store, f"r-{next(ids)}", limits=limits)
    )
    statuses = Counter(d.status for d in decisions)
    assert statuses == {InitStatus.CREATED: 1, InitStatus.SEND_INTERVAL: 19}
    assert await count(backend, "challenges") == 1
    assert await count(backend, "outbox") == 1


async def test_concurrent_guesses_across_challenges_respect_the_budget(
    seeded: Store, backend: Backend
) -> None:
    store = seeded
    await create(store, "r-shop")
    await create(store, "r-other", client_id=OTHER)
    policy = FailurePolicy(budget=7, lockout_seconds=100)
    targets = [(SHOP, "r-shop"), (OTHER, "r-other")] * 30

    async def guess(s: Store) -> VerifyStatus:
        client_id, request_id = targets.pop()
        d = await verify(s, request_id, "000000", client_id=client_id, policy=policy)
        return d.status

    statuses = Counter(await backend.concurrently(60, guess))
    # Exactly the budget is evaluated; then the user is locked.
    claimed = await attempts(backend, "r-shop") + await attempts(backend, "r-other", OTHER)
    assert claimed == 7
    assert set(statuses) <= {VerifyStatus.UNMATCHED, VerifyStatus.EXHAUSTED, VerifyStatus.LOCKED}
    assert statuses[VerifyStatus.LOCKED] > 0
    user = await store.get_user(ALICE)
    assert user is not None and user.locked_until == NOW + 1 + 100
    record = await user_record(store)
    assert record.failed_verifies == 0
    assert await backend.fetchval("SELECT lockout_level FROM users WHERE user_id = ?", ALICE) == 1


async def test_mixed_concurrent_traffic_keeps_one_chain(seeded: Store, backend: Backend) -> None:
    """Inits, verifies, audit-only rows and outbox claims for two users, all at once: no
    deadlock or error, every outcome audited, one unbroken chain."""
    store = seeded
    for user in (ALICE, BOB):
        await create(store, f"r-{user}", user_id=user)
    plan = [n % 5 for n in range(200)]

    async def step(s: Store) -> str:
        kind, n = plan.pop(), len(plan)
        user = (ALICE, BOB)[n % 2]
        if kind == 0:
            return (await create(s, f"r-{n}", user_id=user, now=NOW + n)).status.name
        if kind in (1, 2):
            value = CODE if n % 7 == 0 else "000000"
            return (await verify(s, f"r-{user}", value, now=NOW + 1)).status.name
        if kind == 3:
            event = AuditEvent("initAuthentication", SHOP, f"r-{n}", user, "ACCESS_DENIED")
            await s.record_audit(event)
            return "audited"
        return f"claimed {len(await s.claim_due(NOW + 1000, 3, 30))}"

    outcomes = await backend.concurrently(200, step)
    assert len(outcomes) == 200
    rows = await store.audit_rows()
    claims = sum(1 for outcome in outcomes if outcome.startswith("claimed"))
    assert len(rows) == 2 + 200 - claims
    assert first_broken_row(rows) is None
    assert await count(backend, "challenges") == 2 + 40
    assert await count(backend, "outbox") == 2 + 40
