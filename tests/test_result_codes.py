"""Every result code of PROTOCOL.md §5, provoked by a real request to a running server.

Each answer is checked for HTTP 200, a valid response signature (``Server.check``), the code,
its fixed status and a specific message.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from support.harness import (
    Answer,
    World,
    add_merchant,
    add_user,
    cli,
    inbox_codes,
    init_body,
    init_data_dir,
    issue_token,
    running_server,
    verify_body,
)

INIT = "initAuthentication"
VERIFY = "verifyAuthentication"


def expect(answer: Answer, code: str, status: str, in_message: str = "") -> None:
    assert (answer.code, answer.status) == (code, status), answer.body
    assert len(answer.message) <= 64
    assert in_message.lower() in answer.message.lower(), answer.message


def init(world: World, request_id: str, channel: str = "SMS", token: str | None = None) -> Answer:
    return world.server.post(
        world.merchant, INIT, init_body(request_id, token or world.token, channel)
    )


def verify(world: World, request_id: str, value: str) -> Answer:
    return world.server.post(world.merchant, VERIFY, verify_body(request_id, value))


def wrong_code(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


def test_success_init_and_verify(world: World) -> None:
    answer = init(world, "r-success")
    expect(answer, "SUCCESS", "S")
    assert answer.body["authenticationRequestId"] == "r-success"
    (code,) = inbox_codes(world.server.data_dir, "alice")
    passed = verify(world, "r-success", code)
    expect(passed, "SUCCESS", "S")
    assert passed.body["isPassed"] is True


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "json"),
        (b"[1, 2]", "object"),
        ({"authenticationType": "OTP", "authenticationChannelType": "SMS"}, "required"),
        ({**init_body("x", "t"), "authenticationChannelType": "FAX"}, "SMS or EMAIL"),
        ({**init_body("x", "t"), "authenticationRequestId": "r" * 65}, "64"),
        ({**init_body("x", "t"), "authenticationRequestId": 42}, "authenticationRequestId"),
    ],
)
def test_param_illegal_init_body(
    world: World, body: dict[str, object] | bytes, message: str
) -> None:
    expect(world.server.post(world.merchant, INIT, body), "PARAM_ILLEGAL", "F", message)


def test_param_illegal_non_numeric_code(world: World) -> None:
    expect(verify(world, "whatever", "12ab56"), "PARAM_ILLEGAL", "F", "digits")


def test_param_illegal_stale_request_time(world: World) -> None:
    stale = str(int((time.time() - 3600) * 1000))
    answer = world.server.post(
        world.merchant, INIT, init_body("r1", world.token), request_time=stale
    )
    expect(answer, "PARAM_ILLEGAL", "F", "Request-Time")


def test_param_illegal_garbage_request_time(world: World) -> None:
    answer = world.server.post(
        world.merchant, INIT, init_body("r1", world.token), request_time="yesterday"
    )
    expect(answer, "PARAM_ILLEGAL", "F", "Request-Time")


def test_param_illegal_id_reused_with_other_parameters(world: World) -> None:
    expect(init(world, "r-reuse", "SMS"), "SUCCESS", "S")
    expect(init(world, "r-reuse", "EMAIL"), "PARAM_ILLEGAL", "F", "other parameters")


def test_param_illegal_body_too_large(world: World) -> None:
    body = {**init_body("r-big", world.token), "padding": "x" * 70_000}
    expect(world.server.post(world.merchant, INIT, body), "PARAM_ILLEGAL", "F", "exceeds")


def test_process_fail_no_contact_for_channel(world: World) -> None:
    data = world.server.data_dir
    add_user(data, "bob", "--phone", "+14155550124")
    token = issue_token(data, "M_SHOP", "bob")
    expect(init(world, "r-bob", "EMAIL", token), "PROCESS_FAIL", "F", "email")


def test_unknown_exception_on_internal_fault(world: World) -> None:
    db = sqlite3.connect(world.server.data_dir / "otpgate.db")
    db.execute("ALTER TABLE challenges RENAME TO challenges_gone")
    db.close()
    answer = init(world, "r-fault")
    expect(answer, "UNKNOWN_EXCEPTION", "U")
    assert "Traceback" not in answer.raw.decode()


def test_key_not_found(world: World) -> None:
    world.merchant.key_version = 9
    expect(init(world, "r-key"), "KEY_NOT_FOUND", "F", "9")


@pytest.mark.parametrize("path", ["/ams/api/v1/users/deleteEverything", "/ams/api/v2/pay", "/x"])
def test_api_invalid(world: World, path: str) -> None:
    answer = world.server.post(world.merchant, INIT, init_body("r", world.token), path=path)
    expect(answer, "API_INVALID", "F")


def test_client_invalid_unknown_client(world: World) -> None:
    answer = world.server.post(
        world.merchant, INIT, init_body("r", world.token), client_id="NOBODY"
    )
    expect(answer, "CLIENT_INVALID", "F")


def test_client_invalid_disabled_client(world: World) -> None:
    assert cli(world.server.data_dir, "client", "disable", "M_SHOP")[0] == 0
    time.sleep(1.2)  # the per-process client cache lives 1 s
    expect(init(world, "r-disabled"), "CLIENT_INVALID", "F", "disabled")


def test_client_invalid_sandbox_path_for_normal_client(world: World) -> None:
    answer = world.server.post(
        world.merchant,
        INIT,
        init_body("r", world.token),
        path="/ams/sandbox/api/v1/users/initAuthentication",
    )
    expect(answer, "CLIENT_INVALID", "F", "sandbox")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing"),
        ("algorithm=RSA256,keyVersion=1,signature=" + "A" * 344, "verify"),
        ("algorithm=MD5,keyVersion=1,signature=abc", "RSA256"),
        ("complete garbage", ""),
    ],
)
def test_signature_invalid(world: World, header: str | None, message: str) -> None:
    if header is None:
        answer = world.server.post(world.merchant, INIT, init_body("r", world.token), sign=False)
    else:
        answer = world.server.post(
            world.merchant, INIT, init_body("r", world.token), headers={"Signature": header}
        )
    expect(answer, "SIGNATURE_INVALID", "F", message)


def test_signature_invalid_when_signed_content_differs(world: World) -> None:
    # The signature covers path, client id, Request-Time and the exact body bytes.
    forged_time = world.server.post(
        world.merchant,
        INIT,
        init_body("r-tamper", world.token),
        headers={"Request-Time": str(int(time.time() * 1000) + 1)},
    )
    expect(forged_time, "SIGNATURE_INVALID", "F", "verify")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_method_not_supported(world: World, method: str) -> None:
    answer = world.server.post(world.merchant, INIT, b"", method=method)
    expect(answer, "METHOD_NOT_SUPPORTED", "F", method)


def test_request_traffic_exceed_limit_client_rate(world: World) -> None:
    data = world.server.data_dir
    merchant = add_merchant(data, "M_SLOW", "--rate", "2")
    with httpx.Client(timeout=10) as http:
        answers = [
            world.server.post(merchant, VERIFY, verify_body("r", "123456"), http=http)
            for _ in range(6)
        ]
    limited = [a for a in answers if a.code == "REQUEST_TRAFFIC_EXCEED_LIMIT"]
    assert limited, [a.code for a in answers]
    expect(limited[0], "REQUEST_TRAFFIC_EXCEED_LIMIT", "U", "rate")


def test_request_traffic_exceed_limit_user_send_interval(world: World) -> None:
    expect(init(world, "r-first"), "SUCCESS", "S")
    expect(init(world, "r-second"), "REQUEST_TRAFFIC_EXCEED_LIMIT", "U", "30s")


def test_access_denied_scope(world: World) -> None:
    token = issue_token(world.server.data_dir, "M_SHOP", "alice", "--scope", "READ_PROFILE")
    expect(init(world, "r-scope", token=token), "ACCESS_DENIED", "F", "SEND_OTP")


def test_access_denied_channel(world: World) -> None:
    data = world.server.data_dir
    merchant = add_merchant(data, "M_SMSONLY", "--channels", "SMS")
    token = issue_token(data, "M_SMSONLY", "alice")
    answer = world.server.post(merchant, INIT, init_body("r-ch", token, "EMAIL"))
    expect(answer, "ACCESS_DENIED", "F", "EMAIL")


def test_user_not_exist(world: World) -> None:
    assert cli(world.server.data_dir, "user", "delete", "alice")[0] == 0
    expect(init(world, "r-gone"), "USER_NOT_EXIST", "F")


def test_user_status_abnormal_frozen(world: World) -> None:
    assert cli(world.server.data_dir, "user", "set-status", "alice", "FROZEN")[0] == 0
    expect(init(world, "r-frozen"), "USER_STATUS_ABNORMAL", "F", "frozen")


def test_invalid_access_token(world: World) -> None:
    expect(init(world, "r-t1", token="otk_nonsense"), "INVALID_ACCESS_TOKEN", "F", "unknown")
    assert cli(world.server.data_dir, "token", "revoke", world.token)[0] == 0
    expect(init(world, "r-t2"), "INVALID_ACCESS_TOKEN", "F", "revoked")


def test_invalid_access_token_of_another_client(world: World) -> None:
    data = world.server.data_dir
    other = add_merchant(data, "M_OTHER")
    answer = world.server.post(other, INIT, init_body("r-cross", world.token))
    expect(answer, "INVALID_ACCESS_TOKEN", "F")


def test_verify_unmatched_then_times_exceed_limit(world: World) -> None:
    expect(init(world, "r-guess"), "SUCCESS", "S")
    (code,) = inbox_codes(world.server.data_dir, "alice")
    bad = wrong_code(code)
    for left in (4, 3, 2, 1):
        answer = verify(world, "r-guess", bad)
        expect(answer, "VERIFY_UNMATCHED", "F", f"{left} attempt")
        assert answer.body["isPassed"] is False
    expect(verify(world, "r-guess", bad), "VERIFY_TIMES_EXCEED_LIMIT", "F")
    expect(verify(world, "r-guess", code), "VERIFY_TIMES_EXCEED_LIMIT", "F")


def test_authentication_request_id_invalid_unknown(world: World) -> None:
    expect(verify(world, "never-initiated", "123456"), "AUTHENTICATION_REQUEST_ID_INVALID", "F")


def test_authentication_request_id_invalid_other_clients_id(world: World) -> None:
    expect(init(world, "r-mine"), "SUCCESS", "S")
    (code,) = inbox_codes(world.server.data_dir, "alice")
    other = add_merchant(world.server.data_dir, "M_SNOOP")
    answer = world.server.post(other, VERIFY, verify_body("r-mine", code))
    expect(answer, "AUTHENTICATION_REQUEST_ID_INVALID", "F")


def test_authentication_request_id_invalid_superseded_and_used(
    tmp_path: Path,
) -> None:
    data = init_data_dir(tmp_path / "d", user_send_interval_seconds=0)
    merchant = add_merchant(data, "M_SHOP")
    add_user(data, "alice", "--phone", "+14155550123")
    token = issue_token(data, "M_SHOP", "alice")
    with running_server(data) as server:
        assert server.post(merchant, INIT, init_body("old", token)).code == "SUCCESS"
        (old_code,) = inbox_codes(data, "alice")
        assert server.post(merchant, INIT, init_body("new", token)).code == "SUCCESS"
        new_code = inbox_codes(data, "alice", count=2)[0]
        expect(
            server.post(merchant, VERIFY, verify_body("old", old_code)),
            "AUTHENTICATION_REQUEST_ID_INVALID",
            "F",
            "newer",
        )
        expect(server.post(merchant, VERIFY, verify_body("new", new_code)), "SUCCESS", "S")
        # A retry with the same value is the same success; any other value is refused.
        expect(server.post(merchant, VERIFY, verify_body("new", new_code)), "SUCCESS", "S")
        expect(
            server.post(merchant, VERIFY, verify_body("new", wrong_code(new_code))),
            "AUTHENTICATION_REQUEST_ID_INVALID",
            "F",
            "completed",
        )


def test_authentication_request_id_invalid_expired(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "d", otp_ttl_seconds=1)
    merchant = add_merchant(data, "M_SHOP")
    add_user(data, "alice", "--phone", "+14155550123")
    token = issue_token(data, "M_SHOP", "alice")
    with running_server(data) as server:
        assert server.post(merchant, INIT, init_body("r-exp", token)).code == "SUCCESS"
        (code,) = inbox_codes(data, "alice")
        time.sleep(1.3)
        expect(
            server.post(merchant, VERIFY, verify_body("r-exp", code)),
            "AUTHENTICATION_REQUEST_ID_INVALID",
            "F",
            "expired",
        )


def test_every_catalogue_code_is_covered() -> None:
    """Guard: a new catalogue entry must get a test above."""
    from otpgate.protocol import ResultCode

    source = Path(__file__).read_text()
    missing = [c.name for c in ResultCode if f'"{c.name}"' not in source]
    assert missing == []
