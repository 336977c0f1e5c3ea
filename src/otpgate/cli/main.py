"""``otpgate``: the operator command line (OPERATOR.md is the contract).

Every command takes ``--data-dir`` (env ``OTPGATE_DATA_DIR``) and, where it prints a result,
``--json``. Operator mistakes end with a sentence on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from otpgate.cli import admin, run
from otpgate.cli.output import CommandError

_SUPPRESS = argparse.SUPPRESS


def _common(json_output: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--data-dir", default=_SUPPRESS, help="data directory (env OTPGATE_DATA_DIR)"
    )
    if json_output:
        parent.add_argument("--json", action="store_true", default=_SUPPRESS, help="print JSON")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otpgate", description="Self-hosted OTP authentication service."
    )
    parser.add_argument("--data-dir", default=None, help="data directory (env OTPGATE_DATA_DIR)")
    parser.add_argument("--json", action="store_true", default=False, help="print JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()

    p = commands.add_parser("init", parents=[common], help="create the data dir, keys and database")
    p.set_defaults(handler=run.cmd_init)

    p = commands.add_parser("public-key", parents=[common], help="print the server's public key")
    p.add_argument("--bare", action="store_true", help="one-line base64 (what the SDKs take)")
    p.set_defaults(handler=run.cmd_public_key)

    p = commands.add_parser("serve", parents=[common], help="run the API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(handler=run.cmd_serve)

    p = commands.add_parser("worker", parents=[common], help="run delivery alone (scale-out)")
    p.set_defaults(handler=run.cmd_worker)

    p = commands.add_parser("demo", parents=[common], help="end-to-end run on a temporary dir")
    p.set_defaults(handler=run.cmd_demo)

    _client_commands(
        commands.add_parser("client", help="merchants").add_subparsers(
            dest="action", required=True, metavar="ACTION"
        ),
        common,
    )
    _user_commands(
        commands.add_parser("user", help="wallet users").add_subparsers(
            dest="action", required=True, metavar="ACTION"
        ),
        common,
    )
    _token_commands(
        commands.add_parser("token", help="wallet access tokens").add_subparsers(
            dest="action", required=True, metavar="ACTION"
        ),
        common,
    )

    inbox = commands.add_parser("inbox", help="the local provider's messages").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = inbox.add_parser("list", parents=[common], help="messages, newest first")
    p.add_argument("--user", default=None)
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(handler=admin.cmd_inbox_list)

    outbox = commands.add_parser("outbox", help="queued messages").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = outbox.add_parser("list", parents=[common], help="messages and their delivery status")
    p.add_argument("--status", choices=["queued", "sent", "failed", "expired"], default=None)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=admin.cmd_outbox_list)

    audit = commands.add_parser("audit", help="the audit chain").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = audit.add_parser("verify", parents=[common], help="check the hash chain")
    p.set_defaults(handler=admin.cmd_audit_verify)
    return parser


def _client_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("add", parents=[common], help="register a merchant")
    p.add_argument("client_id", metavar="CLIENT_ID")
    p.add_argument("--public-key", required=True, metavar="FILE")
    p.add_argument("--key-version", type=int, default=1)
    p.add_argument("--sandbox", action="store_true")
    p.add_argument("--name", default="", help="display name, used as the brand in messages")
    p.add_argument("--channels", default="SMS,EMAIL", help="allowed channels (default SMS,EMAIL)")
    p.add_argument("--rate", type=int, default=None, help="requests/s (default: server setting)")
    p.set_defaults(handler=admin.cmd_client_add)
    p = sub.add_parser("key-add", parents=[common], help="add a key version (rotation)")
    p.add_argument("client_id", metavar="CLIENT_ID")
    p.add_argument("--public-key", required=True, metavar="FILE")
    p.add_argument("--key-version", type=int, required=True)
    p.set_defaults(handler=admin.cmd_client_key_add)
    p = sub.add_parser("key-revoke", parents=[common], help="remove a key version")
    p.add_argument("client_id", metavar="CLIENT_ID")
    p.add_argument("--key-version", type=int, required=True)
    p.set_defaults(handler=admin.cmd_client_key_revoke)
    for name, enabled in (("disable", False), ("enable", True)):
        p = sub.add_parser(name, parents=[common], help=f"{name} a merchant")
        p.add_argument("client_id", metavar="CLIENT_ID")
        p.set_defaults(handler=admin.cmd_client_enable, enabled=enabled)
    p = sub.add_parser("list", parents=[common], help="registered merchants")
    p.set_defaults(handler=admin.cmd_client_list)


def _user_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("add", parents=[common], help="create a wallet user (status NORMAL)")
    p.add_argument("user_id", metavar="USER_ID")
    p.add_argument("--phone", default=None, help="E.164, e.g. +14155550123")
    p.add_argument("--email", default=None)
    p.add_argument("--locale", default=None, help="e.g. en, zh-CN")
    p.set_defaults(handler=admin.cmd_user_add)
    p = sub.add_parser("set", parents=[common], help="change a user's phone, email or locale")
    p.add_argument("user_id", metavar="USER_ID")
    p.add_argument("--phone", default=None)
    p.add_argument("--email", default=None)
    p.add_argument("--locale", default=None)
    p.set_defaults(handler=admin.cmd_user_set)
    p = sub.add_parser("set-status", parents=[common], help="NORMAL or FROZEN")
    p.add_argument("user_id", metavar="USER_ID")
    p.add_argument("status", choices=["NORMAL", "FROZEN"])
    p.set_defaults(handler=admin.cmd_user_set_status)
    p = sub.add_parser("delete", parents=[common], help="delete a user")
    p.add_argument("user_id", metavar="USER_ID")
    p.set_defaults(handler=admin.cmd_user_delete)
    p = sub.add_parser("list", parents=[common], help="wallet users")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(handler=admin.cmd_user_list)
    p = sub.add_parser("import", parents=[common], help="bulk load JSON Lines")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(handler=admin.cmd_user_import)


def _token_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("issue", parents=[common], help="issue a wallet access token")
    p.add_argument("--client", required=True, metavar="CLIENT_ID")
    p.add_argument("--user", required=True, metavar="USER_ID")
    p.add_argument("--ttl-seconds", type=int, default=30 * 86_400)
    p.add_argument("--scope", nargs="+", default=["SEND_OTP"], metavar="S")
    p.set_defaults(handler=admin.cmd_token_issue)
    p = sub.add_parser("issue-batch", parents=[common], help="one token per user id in FILE")
    p.add_argument("--client", required=True, metavar="CLIENT_ID")
    p.add_argument("--users-file", required=True, metavar="FILE")
    p.add_argument("--ttl-seconds", type=int, default=30 * 86_400)
    p.add_argument("--scope", nargs="+", default=["SEND_OTP"], metavar="S")
    p.set_defaults(handler=admin.cmd_token_issue_batch)
    p = sub.add_parser("revoke", parents=[common], help="revoke a token")
    p.add_argument("token", metavar="TOKEN")
    p.set_defaults(handler=admin.cmd_token_revoke)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_dir is None:
        args.data_dir = os.environ.get("OTPGATE_DATA_DIR") or "./otpgate-data"
    try:
        code: int = args.handler(args)
    except CommandError as exc:
        print(f"otpgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
