"""`mipvpn profile ...` against a real profile API server (HTTPS on 127.0.0.1, its certificate
from a lab CA, real SQLite database): the server verified against the CA (the lab's by default,
another CA's certificate refused, http:// refused), the token from the environment or a file
and never from the command line; `mipvpn db token issue --out`; and `mipvpn mn service-update`
error handling without a daemon."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from daemons.aaa.profileapi import ProfileApi, server_context
from daemons.cli.main import main
from daemons.provision import pki
from daemons.provision.configs import lab_ca_dir, lab_ca_file
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


class Token(str):
    """A token that a failing assertion prints as ``Token(***)`` (pytest shows a call's arguments)."""

    def __repr__(self) -> str:
        return "Token(***)"


def issue(db: VpnDatabase, nai: str) -> Token:
    return Token(db.issue_token(nai))


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A lab's run directory with its CA (``RUN_DIR/pki``), as provisioning makes it; the CLI
    runs "inside the lab" ($MIPVPN_RUN_DIR) and trusts that CA by default."""
    run_dir = tmp_path / "run"
    pki.make_ca(lab_ca_dir(run_dir))
    monkeypatch.setenv("MIPVPN_RUN_DIR", str(run_dir))
    for name in ("MIPVPN_CA", "MIPVPN_TOKEN", "MIPVPN_TOKEN_FILE", "MIPVPN_API"):
        monkeypatch.delenv(name, raising=False)
    return run_dir


@pytest.fixture
def api(db: VpnDatabase, run_dir: Path, tmp_path: Path) -> Iterator[str]:
    """A real HTTPS server (certificate for 127.0.0.1 from the lab's CA) on its own event loop in
    a thread (the CLI is synchronous)."""
    issued = pki.issue(pki.make_ca(lab_ca_dir(run_dir)), "aaah.home.example", tmp_path / "aaah", ips=["127.0.0.1"])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = ProfileApi(db, "127.0.0.1", 0, tls=server_context(issued.cert, issued.key))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield f"https://127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def cli(api: str, token: str | None, *args: str, code: int = 0, secret: str | None = None,
        env: dict[str, str] | None = None) -> str:
    """`mipvpn profile ARGS`, the token (if given) in $MIPVPN_TOKEN; ``secret``: a token that
    reaches the CLI some other way and must not show either."""
    env = {"MIPVPN_API": api, **({"MIPVPN_TOKEN": token} if token is not None else {}), **(env or {})}
    result = CliRunner().invoke(main, ["profile", *args], env=env, catch_exceptions=False)
    token = token or secret
    assert result.exit_code == code, result.output
    if token:
        leaked = token in result.output  # a bool: pytest would print the token and the output
        assert not leaked, "the API token showed in the CLI's output"
    return result.output


def test_user_lists_changes_adds_and_deletes_own_profiles(db: VpnDatabase, api: str) -> None:
    token = issue(db, NAI)
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
    token, bob = issue(db, NAI), issue(db, NAI2)
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
    assert "cannot reach the profile API at https://127.0.0.1:9" in cli("https://127.0.0.1:9", token, "list", code=1)
    assert db.profiles_for(NAI)[0].gateway == "cngw" and db.profiles_for(NAI)[0].lifetime == 3600


def test_token_from_a_file_never_from_the_command_line(db: VpnDatabase, api: str, tmp_path: Path) -> None:
    token = issue(db, NAI)
    # No option takes a token: the old --token is gone (a command line is visible to every user).
    result = CliRunner().invoke(main, ["profile", "--api", api, "--token", token, "list"])
    assert result.exit_code == 2 and "No such option '--token'" in result.output
    group = main.commands["profile"]
    assert isinstance(group, click.Group)
    for command in (group, *group.commands.values()):  # no option of any subcommand takes one either
        names = [o for p in command.params for o in p.opts if "token" in o]
        assert names in ([], ["--token-file"]), (command.name, names)
    assert "no API token: set MIPVPN_TOKEN or give --token-file FILE" in cli(api, None, "list", code=2)
    # From a file (mode 0600): as an option or $MIPVPN_TOKEN_FILE.
    path = tmp_path / "token"
    pki.write_private(path, f"{token}\n".encode())
    rows = json.loads(cli(api, None, "--token-file", str(path), "list", "--json", secret=token))
    assert [p["nai"] for p in rows] == [NAI]
    assert json.loads(cli(api, None, "list", "--json", secret=token, env={"MIPVPN_TOKEN_FILE": str(path)})) == rows
    # The file wins over the environment (here: another user's token, which would get 403).
    assert json.loads(cli(api, issue(db, NAI2), "--token-file", str(path), "list", "--json", secret=token)) \
        == rows
    path.chmod(0o644)  # a token others can read: refused, naming the option, the token not shown
    out = cli(api, None, "--token-file", str(path), "list", code=2, secret=token)
    assert "--token-file" in out and "mode 0644" in out
    path.chmod(0o600)
    path.write_text("\n")
    assert "is empty" in cli(api, None, "--token-file", str(path), "list", code=2)


def test_server_verified_against_the_ca(db: VpnDatabase, api: str, run_dir: Path, tmp_path: Path) -> None:
    """The lab's CA by default inside the lab, or --ca/$MIPVPN_CA; another CA's certificate
    and plain http:// are refused before a token is sent."""
    token = issue(db, NAI)
    lab_ca = str(lab_ca_file(run_dir))
    for out in (cli(api, token, "--ca", lab_ca, "list"), cli(api, token, "list", env={"MIPVPN_CA": lab_ca})):
        assert "198.18.2.0/24" in out  # (the output in a variable: a failing assert would print the call's token)
    other = pki.make_ca(tmp_path / "other-ca")
    for env in ({"MIPVPN_CA": str(other.cert_path)}, {"MIPVPN_RUN_DIR": str(tmp_path / "no-lab")}):
        out = cli(api, token, "list", code=1, env=env)  # another CA / the system's trust store
        assert "failed certificate verification" in out and "--ca FILE" in out
    out = cli(api.replace("https://", "http://"), token, "list", code=2)
    assert "must be an https:// URL" in out


def test_token_issue_out_writes_a_private_file(db: VpnDatabase, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'vpn.db'}"
    out = tmp_path / "alice.token"
    result = CliRunner().invoke(main, ["db", "token", "issue", NAI, "--out", str(out), "--url", url])
    assert result.exit_code == 0, result.output
    token = out.read_text().strip()
    assert (out.stat().st_mode & 0o777) == 0o600 and db.authenticate_token(token) == NAI
    leaked = token in result.output
    assert not leaked and f"written to {out}" in result.output
    out.chmod(0o644)  # re-issuing replaces the token and makes the file private again
    assert CliRunner().invoke(main, ["db", "token", "issue", NAI, "--out", str(out), "--url", url]).exit_code == 0
    assert (out.stat().st_mode & 0o777) == 0o600 and out.read_text().strip() != token
    assert db.authenticate_token(token) is None and db.authenticate_token(out.read_text().strip()) == NAI
    # Without --out the token is printed once, as before.
    printed = CliRunner().invoke(main, ["db", "token", "issue", NAI, "--url", url]).output.strip()
    assert db.authenticate_token(printed) == NAI


def test_mn_service_update_without_a_daemon(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["mn", "service-update", "--node", "mn1", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "mn1: daemon control socket" in result.output and "not reachable" in result.output
