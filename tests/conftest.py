"""Fixtures shared by the black-box tests: a data dir, a running server, a merchant world."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.harness import (
    Server,
    World,
    add_merchant,
    add_user,
    init_data_dir,
    issue_token,
    running_server,
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return init_data_dir(tmp_path / "data")


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    with running_server(data_dir) as srv:
        yield srv


@pytest.fixture
def world(server: Server) -> World:
    merchant = add_merchant(server.data_dir, "M_SHOP", "--name", "Shop")
    add_user(server.data_dir, "alice", "--phone", "+14155550123", "--email", "alice@example.com")
    token = issue_token(server.data_dir, "M_SHOP", "alice")
    return World(server, merchant, "alice", token)
