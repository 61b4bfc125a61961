"""`mipvpn profile ...` against a real profile API server (127.0.0.1, real SQLite database), and
`mipvpn mn service-update` error handling without a daemon."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemons.aaa.profileapi import ProfileApi
from daemons.cli.main import main
from daemons.runtime.secret import Secret
from daemons.store.vpndb import VpnDatabase, open_database

NAI, NAI2 = "alice@home.example", "bob@home.example"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[VpnDatabase]:
    db = open_database(f"sqlite:///{tmp_path / 'vpn.db'}", create=True)
    db.add_gateway("cngw", "198.18.0.30", "cngw-static")
    db.add_gateway("cngw2", "198.18.0.34", "cngw-dynamic")
    db.add_route("cngw", "198.18.2.0/24")
    db.add_route("cngw2", "198.18.3.0/24")
    for nai, hoa in ((NAI, "198.18.100.10"), (NAI2, "198.18.100.11")):
        db.add_user(nai, hoa, "198.18.100.1", 0x3000, Secret(b"s" * 16))
        db.add_profile(nai, "198.18.2.0/24", "cngw")
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def api(db: VpnDatabase) -> Iterator[str]:
    """A real server on its own event loop in a thread (the CLI is synchronous)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = ProfileApi(db, "127.0.0.1", 0)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def cli(api: str, token: str | None, *args: str, code: int = 0) -> str:
    env = {"MIPVPN_API": api, **({"MIPVPN_TOKEN": token} if token is not None else {})}
    result = CliRunner().invoke(main, ["profile", *args], env=env, catch_exceptions=False)
    assert result.exit_code == code, result.output
    if token:
        leaked = token in result.output  # a bool: pytest would print the token and the output
        assert not leaked, "the API token showed in the CLI's output"
    return result.output


def test_user_lists_changes_adds_and_deletes_own_profiles(db: VpnDatabase, api: str) -> None:
    token = db.issue_token(NAI)
    (rows,) = [json.loads(cli(api, token, "list", "--json"))]
    assert [(p["nai"], p["gateway"]) for p in rows] == [(NAI, "cngw")]
    pid = rows[0]["id"]
    assert "198.18.2.0/24" in cli(api, token, "list")
    out = cli(api, token, "set", str(pid), "--gateway", "cngw2", "--qos-rate", "10M")
    assert f"updated profile {pid}" in out and "cngw2 (dynamic)" in out and "QoS 10000000" in out
    shown = json.loads(cli(api, token, "show", str(pid), "--json"))
    assert (shown["gateway"], shown["gateway_type"], shown["qos_rate"]) == ("cngw2", "dynamic", 10_000_000)
    assert "QoS" not in cli(api, token, "set", str(pid), "--no-qos")
    added = json.loads(cli(api, token, "add", "198.18.3.0/24", "--lifetime", "600", "--json"))
    assert (added["gateway"], added["lifetime"]) == ("cngw2", 600)
    assert f"profile {added['id']} deleted" in cli(api, token, "delete", str(added["id"]))
    assert "cngw-dynamic" in cli(api, token, "gateways")
    assert [p.gateway for p in db.profiles_for(NAI)] == ["cngw2"]


def test_errors_are_clear_and_exit_non_zero(db: VpnDatabase, api: str) -> None:
    token, bob = db.issue_token(NAI), db.issue_token(NAI2)
    pid = db.profiles_for(NAI)[0].id
    assert "400 invalid: gateway: unknown gateway 'nowhere'" in cli(api, token, "set", str(pid), "--gateway",
                                                                    "nowhere", code=1)
    assert "400 invalid: destination:" in cli(api, token, "add", "198.18.2.1/24", code=1)
    assert "409 conflict: destination:" in cli(api, token, "add", "198.18.2.0/24", code=1)
    assert "404 not_found: profile:" in cli(api, token, "show", "999", code=1)
    assert "403 forbidden" in cli(api, bob, "--user", NAI, "set", str(pid), "--lifetime", "60", code=1)
    assert "401 unauthorized" in cli(api, token + "x", "list", code=1)
    assert "no API token" in cli(api, None, "list", code=2)
    assert "nothing to change" in cli(api, token, "set", str(pid), code=2)
    assert "cannot reach the profile API at http://127.0.0.1:9" in cli("http://127.0.0.1:9", token, "list", code=1)
    assert db.profiles_for(NAI)[0].gateway == "cngw" and db.profiles_for(NAI)[0].lifetime == 3600


def test_mn_service_update_without_a_daemon(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["mn", "service-update", "--node", "mn1", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "mn1: daemon control socket" in result.output and "not reachable" in result.output
