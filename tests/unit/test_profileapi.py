"""The user self-service profile API (claim 24, F7): a real aiohttp server on 127.0.0.1 over a
real SQLite VPN database; HTTPS only (a plain HTTP request gets no answer, a client that does not
trust the lab's CA gets no connection; plain HTTP only when asked for, with a warning; the key
file must be private); authentication (401), authorisation (403), validation (400 naming the
field) and the changes themselves."""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemons.aaa.profileapi import ProfileApi, TlsFileError, server_context
from daemons.provision import pki
from daemons.runtime.log import EventFormatter
from daemons.runtime.secret import Secret
from daemons.store.vpndb import VpnDatabase, open_database, token_owner
from tests.unit.httpskit import make_pki

NAI = "alice@home.example"
NAI2 = "bob@home.example"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[VpnDatabase]:
    db = open_database(f"sqlite:///{tmp_path / 'vpn.db'}", create=True)
    db.add_realm("home.example", home_aaa="aaah")
    db.add_gateway("ha", "198.18.100.1", "ha", "home.example")
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


Call = Callable[..., Awaitable[tuple[int, Any, Any]]]


def serve(db: VpnDatabase, body: Callable[[Call, ProfileApi], Awaitable[None]]) -> None:
    """Run ``body(call, api)`` against a real HTTPS server on 127.0.0.1 (any free port, a
throwaway CA's certificate; the client verifies it against that CA), then stop it."""

    async def main(tls: Any) -> None:
        api = ProfileApi(db, "127.0.0.1", 0, tls=tls.server_context())
        await api.start()
        try:
            base = f"https://127.0.0.1:{api.port}"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client_context())) as session:
                async def call(method: str, path: str, token: str | None = None, json: Any = None,
                               data: bytes | None = None,
                               headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
                    hdrs = dict(headers or {})
                    if token is not None:
                        hdrs["Authorization"] = f"Bearer {token}"
                    async with session.request(method, base + path, json=json, data=data, headers=hdrs) as resp:
                        text = await resp.text()
                        try:
                            payload = await resp.json(content_type=None) if text else None
                        except ValueError:
                            payload = text
                        return resp.status, payload, resp.headers

                await body(call, api)
        finally:
            await api.stop()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(main(make_pki(Path(directory))))


def profiles_path(nai: str = NAI) -> str:
    return f"/v1/users/{nai}/profiles"


def test_token_names_its_owner(db: VpnDatabase) -> None:
    token = db.issue_token(NAI)
    assert token.startswith("mvt_") and token_owner(token) == NAI
    assert db.authenticate_token(token) == NAI
    assert db.authenticate_token(token[:-2]) is None
    for bad in ("", "mvt_", "mvt_.x", "Bearer x", "mvt_!!!.x", "mvt_YWxpY2U.x", "x" * 2000):
        assert db.authenticate_token(bad) is None, bad


def test_missing_or_bad_token_is_401(db: VpnDatabase) -> None:
    token = db.issue_token(NAI)
    forged = "mvt_" + token[4:].split(".")[0] + ".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

    async def body(call: Call, api: ProfileApi) -> None:
        for kwargs in ({}, {"headers": {"Authorization": "Basic YWxpY2U6cHc="}},
                       {"headers": {"Authorization": "Bearer"}}, {"token": "nonsense"}, {"token": forged},
                       {"token": "mvt_" + "A" * 43}):
            status, payload, headers = await call("GET", profiles_path(), **kwargs)
            assert status == 401, kwargs
            assert payload["error"] == "unauthorized"
            assert headers["WWW-Authenticate"].startswith("Bearer")
        # A write without a token changes nothing.
        status, _, _ = await call("POST", profiles_path(), json={"destination": "198.18.3.0/24"})
        assert status == 401
        status, _, _ = await call("GET", "/v1/gateways")
        assert status == 401
        status, payload, _ = await call("GET", profiles_path(), token=token)
        assert status == 200 and len(payload["profiles"]) == 1

    serve(db, body)
    assert len(db.profiles_for(NAI)) == 1


def test_revoked_token_and_disabled_user_are_401(db: VpnDatabase) -> None:
    token = db.issue_token(NAI)

    async def body(call: Call, api: ProfileApi) -> None:
        assert (await call("GET", profiles_path(), token=token))[0] == 200
        db.set_user_enabled(NAI, False)
        assert (await call("GET", profiles_path(), token=token))[0] == 401
        db.set_user_enabled(NAI, True)
        newer = db.issue_token(NAI)  # re-issuing invalidates the old one
        assert (await call("GET", profiles_path(), token=token))[0] == 401
        assert (await call("GET", profiles_path(), token=newer))[0] == 200
        db.revoke_token(NAI)
        assert (await call("GET", profiles_path(), token=newer))[0] == 401

    serve(db, body)


def test_another_users_token_is_403_and_changes_nothing(db: VpnDatabase) -> None:
    db.issue_token(NAI)
    bob = db.issue_token(NAI2)
    pid = db.profiles_for(NAI)[0].id
    before = db.profiles_for(NAI)

    async def body(call: Call, api: ProfileApi) -> None:
        for method, path, payload in (
            ("GET", profiles_path(), None),
            ("POST", profiles_path(), {"destination": "198.18.3.0/24"}),
            ("GET", f"{profiles_path()}/{pid}", None),
            ("PATCH", f"{profiles_path()}/{pid}", {"gateway": "cngw2"}),
            ("DELETE", f"{profiles_path()}/{pid}", None),
            ("GET", profiles_path("nobody@home.example"), None),  # no such user: still 403
        ):
            status, answer, _ = await call(method, path, token=bob, json=payload)
            assert status == 403, (method, path)
            assert answer["error"] == "forbidden"
        # Bob's own profiles are his to read.
        status, answer, _ = await call("GET", profiles_path(NAI2), token=bob)
        assert status == 200 and [p["nai"] for p in answer["profiles"]] == [NAI2]

    serve(db, body)
    assert db.profiles_for(NAI) == before


def test_user_changes_own_profiles(db: VpnDatabase) -> None:
    token = db.issue_token(NAI)
    pid = db.profiles_for(NAI)[0].id
    changes: list[tuple[str, str]] = []

    async def body(call: Call, api: ProfileApi) -> None:
        api.on_change = lambda nai, action, profile: changes.append((nai, action))
        status, answer, _ = await call("GET", profiles_path(), token=token)
        assert status == 200 and answer["nai"] == NAI
        (p,) = answer["profiles"]
        assert (p["id"], p["destination"], p["gateway"], p["gateway_type"]) == (pid, "198.18.2.0/24", "cngw",
                                                                                 "static")
        # Switch the gateway to the dynamic one: its type follows (route optimisation, F4).
        status, answer, _ = await call("PATCH", f"{profiles_path()}/{pid}", token=token,
                                       json={"gateway": "cngw2", "qos_rate": 2_000_000, "suite": "aes256gcm16"})
        assert status == 200, answer
        assert (answer["gateway"], answer["gateway_type"], answer["qos_rate"], answer["suite"]) == \
            ("cngw2", "dynamic", 2_000_000, "aes256gcm16")
        # Dropping QoS with null.
        status, answer, _ = await call("PATCH", f"{profiles_path()}/{pid}", token=token, json={"qos_rate": None})
        assert status == 200 and answer["qos_rate"] is None
        # Add one (the correspondence table picks the gateway), read it, delete it.
        status, answer, headers = await call("POST", profiles_path(), token=token,
                                             json={"destination": "198.18.3.0/24", "lifetime": 600})
        assert status == 201, answer
        assert (answer["gateway"], answer["gateway_type"], answer["lifetime"]) == ("cngw2", "dynamic", 600)
        location = headers["Location"]
        assert location == f"{profiles_path()}/{answer['id']}"
        status, got, _ = await call("GET", location, token=token)
        assert status == 200 and got == answer
        status, _, _ = await call("DELETE", location, token=token)
        assert status == 204
        status, answer, _ = await call("GET", location, token=token)
        assert status == 404 and answer["error"] == "not_found"
        status, answer, _ = await call("DELETE", location, token=token)
        assert status == 404
        status, answer, _ = await call("GET", "/v1/gateways", token=token)
        assert status == 200
        assert answer["gateways"] == [{"name": "cngw", "type": "cngw-static", "realm": None},
                                      {"name": "cngw2", "type": "cngw-dynamic", "realm": None}]

    serve(db, body)
    (p,) = db.profiles_for(NAI)
    assert (p.gateway, p.gateway_type.value, p.suite.value, p.qos_rate) == ("cngw2", "dynamic", "aes256gcm16", None)
    assert db.profiles_for(NAI2)[0].gateway == "cngw"  # the other user untouched
    assert changes == [(NAI, "update"), (NAI, "update"), (NAI, "add"), (NAI, "remove")]


@pytest.mark.parametrize(("method", "payload", "status", "field"), [
    ("PATCH", {"gateway": "nowhere"}, 400, "gateway"),
    ("PATCH", {"gateway": "ha"}, 400, "gateway"),  # not a CN-GW
    ("PATCH", {"destination": "198.18.2.1/24"}, 400, "destination"),  # host bits set
    ("PATCH", {"destination": "not-a-prefix"}, 400, "destination"),
    ("PATCH", {"suite": "des"}, 400, "suite"),
    ("PATCH", {"lifetime": "300"}, 400, "lifetime"),  # JSON types: a string is not a number
    ("PATCH", {"lifetime": 0}, 400, "lifetime"),
    ("PATCH", {"lifetime": True}, 400, "lifetime"),
    ("PATCH", {"qos_rate": 1000, "qos_ceil": 10}, 400, "qos_ceil"),
    ("PATCH", {"qos_priority": 9, "qos_rate": 1000}, 400, "qos_priority"),
    ("PATCH", {"gateway_type": "static", "gateway": "cngw2"}, 400, "gateway_type"),
    ("PATCH", {"distribution": "sometimes"}, 400, "distribution"),
    ("PATCH", {"colour": "blue"}, 400, "colour"),
    ("PATCH", {"nai": "bob@home.example"}, 400, "nai"),
    ("PATCH", {"id": 7}, 400, "id"),
    ("PATCH", {"suite": None}, 400, "suite"),
    ("PATCH", {}, 400, "body"),
    ("PATCH", [1, 2], 400, "body"),
    ("POST", {"gateway": "cngw"}, 400, "destination"),  # required
    ("POST", {"destination": "198.18.9.0/24"}, 400, "gateway"),  # nobody accommodates it
    ("POST", {"destination": "198.18.2.0/24"}, 409, "destination"),  # already has one
])
def test_validation_names_the_field(db: VpnDatabase, method: str, payload: Any, status: int, field: str) -> None:
    token = db.issue_token(NAI)
    pid = db.profiles_for(NAI)[0].id
    before = db.profiles_for(NAI)
    path = f"{profiles_path()}/{pid}" if method == "PATCH" else profiles_path()

    async def body(call: Call, api: ProfileApi) -> None:
        got, answer, _ = await call(method, path, token=token, json=payload)
        assert got == status, answer
        assert answer["field"] == field, answer
        assert answer["message"].startswith(field), answer
        assert answer["error"] == ("conflict" if status == 409 else "invalid")

    serve(db, body)
    assert db.profiles_for(NAI) == before


def test_malformed_bodies_and_ids(db: VpnDatabase) -> None:
    token = db.issue_token(NAI)

    async def body(call: Call, api: ProfileApi) -> None:
        status, answer, _ = await call("POST", profiles_path(), token=token, data=b"{not json",
                                       headers={"Content-Type": "application/json"})
        assert status == 400 and answer["field"] == "body"
        status, answer, _ = await call("POST", profiles_path(), token=token, data=b"\xff\xfe",
                                       headers={"Content-Type": "application/json"})
        assert status == 400 and answer["field"] == "body"
        status, answer, _ = await call("POST", profiles_path(), token=token, data=b" " * (70 * 1024))
        assert status == 413 and answer["error"] == "too_large"
        for pid in ("abc", "-1", "99999"):
            status, answer, _ = await call("GET", f"{profiles_path()}/{pid}", token=token)
            assert status == 404 and answer["field"] == "profile", pid
        status, answer, _ = await call("PUT", profiles_path(), token=token, json={})
        assert status == 405 and answer["error"] == "method_not_allowed"
        status, answer, _ = await call("GET", "/v1/elsewhere", token=token)
        assert status == 404 and answer["error"] == "not_found"

    serve(db, body)


def test_tokens_never_in_logs_or_answers(db: VpnDatabase, caplog: pytest.LogCaptureFixture) -> None:
    token = db.issue_token(NAI)
    bob = db.issue_token(NAI2)
    answers: list[str] = []

    async def body(call: Call, api: ProfileApi) -> None:
        pid = db.profiles_for(NAI)[0].id
        for tok in (token, bob, token + "x", None):
            for method, path, payload in (("GET", profiles_path(), None),
                                          ("PATCH", f"{profiles_path()}/{pid}", {"gateway": "nowhere"}),
                                          ("PATCH", f"{profiles_path()}/{pid}", {"lifetime": 700})):
                _, answer, headers = await call(method, path, token=tok, json=payload)
                answers.append(repr((answer, dict(headers))))

    with caplog.at_level(logging.DEBUG):
        serve(db, body)
    lines = "\n".join(EventFormatter().format(r) for r in caplog.records)
    text = lines + "\n".join(answers) + "".join(repr(r.__dict__) for r in caplog.records)
    secret_parts = [t.split(".", 1)[1] for t in (token, bob)]
    assert [i for i, p in enumerate(secret_parts) if p in text] == []  # leaked ones by index, not by value
    assert "event=api.request" in lines and "event=profile.changed" in lines
    assert f"caller={NAI2}" in lines and "status=403" in lines  # the refused caller is named, not their token


def test_guessing_tokens_is_throttled_per_address(db: VpnDatabase) -> None:
    from daemons.aaa.profileapi import FAILURE_WINDOW, MAX_FAILURES

    token = db.issue_token(NAI)
    now = [1000.0]

    async def body(call: Call, api: ProfileApi) -> None:
        api.clock = lambda: now[0]
        for _ in range(MAX_FAILURES):
            assert (await call("GET", profiles_path(), token="mvt_guess"))[0] == 401
        status, answer, headers = await call("GET", profiles_path(), token=token)  # even the right one
        assert status == 429 and answer["error"] == "too_many_failures" and "Retry-After" in headers
        assert api.counters["throttled"] == 1
        now[0] += FAILURE_WINDOW + 1
        assert (await call("GET", profiles_path(), token=token))[0] == 200
        # A 403 (valid token, wrong user) is not a failed authentication.
        bob = db.issue_token(NAI2)
        for _ in range(MAX_FAILURES + 1):
            assert (await call("GET", profiles_path(), token=bob))[0] == 403
        assert (await call("GET", profiles_path(), token=token))[0] == 200

    serve(db, body)


# ---- transport: HTTPS only ---------------------------------------------------------------------


def serve_tls(db: VpnDatabase, directory: Path,
              body: Callable[[ProfileApi, Any], Awaitable[None]]) -> None:
    """Run ``body(api, pki)`` against a real HTTPS server on 127.0.0.1 with a fresh CA's certificate."""
    tls = make_pki(directory)

    async def main() -> None:
        api = ProfileApi(db, "127.0.0.1", 0, tls=tls.server_context())
        await api.start()
        try:
            await body(api, tls)
        finally:
            await api.stop()

    asyncio.run(main())


async def get(url: str, token: str, ssl_arg: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_arg)) as session, \
            session.get(url, headers={"Authorization": f"Bearer {token}"},
                        timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, await resp.json()


def test_api_talks_tls_only_and_verifies_against_the_ca(db: VpnDatabase, tmp_path: Path) -> None:
    """A plain HTTP request (token in it) gets no HTTP answer; HTTPS verified against the CA
    works (TLS 1.3); a client that does not trust the CA gets no connection."""
    token = db.issue_token(NAI)

    async def body(api: ProfileApi, tls: Any) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(f"GET /v1/gateways HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(4096), 10)
        except ConnectionError:
            answer = b""
        writer.close()
        assert not answer.startswith(b"HTTP/"), answer[:64]  # at most a TLS alert, never an HTTP answer
        with pytest.raises(aiohttp.ClientError):
            await get(f"http://127.0.0.1:{api.port}/v1/gateways", token, None)

        url = f"https://127.0.0.1:{api.port}/v1/gateways"
        status, payload = await get(url, token, tls.client_context())
        assert status == 200 and {g["name"] for g in payload["gateways"]} == {"cngw", "cngw2"}
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(url, token, True)  # the system's trust store: not the lab's CA

        # The negotiated protocol: TLS 1.3 for a client that has it; TLS 1.2 still accepted.
        context = tls.client_context()
        _, writer = await asyncio.open_connection("127.0.0.1", api.port, ssl=context, server_hostname="127.0.0.1")
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.close()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        _, writer = await asyncio.open_connection("127.0.0.1", api.port, ssl=context, server_hostname="127.0.0.1")
        tls12 = writer.get_extra_info("ssl_object")
        assert tls12.version() == "TLSv1.2" and tls12.cipher()[0].startswith("ECDHE-")
        writer.close()

    serve_tls(db, tmp_path, body)


def test_client_refuses_a_certificate_from_another_ca(db: VpnDatabase, tmp_path: Path) -> None:
    """The same server, a client that trusts another CA (the right name, the wrong issuer): no connection."""
    token = db.issue_token(NAI)
    other = make_pki(tmp_path / "other")

    async def body(api: ProfileApi, tls: Any) -> None:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(f"https://127.0.0.1:{api.port}/v1/gateways", token, other.client_context())

    serve_tls(db, tmp_path / "server", body)


def test_plain_http_only_when_asked_for_with_a_warning(db: VpnDatabase, caplog: pytest.LogCaptureFixture) -> None:
    token = db.issue_token(NAI)

    async def main() -> None:
        api = ProfileApi(db, "127.0.0.1", 0, tls=None)
        with caplog.at_level(logging.INFO, logger="mipvpn.profileapi"):
            await api.start()
        try:
            status, _ = await get(f"http://127.0.0.1:{api.port}/v1/gateways", token, None)
            assert status == 200
        finally:
            await api.stop()

    asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "profile_api.plain_http" in warnings[0].getMessage()


def test_key_file_must_be_readable_by_its_owner_only(tmp_path: Path) -> None:
    tls = make_pki(tmp_path)
    tls.server.key.chmod(0o640)
    with pytest.raises(TlsFileError) as info:
        server_context(tls.server.cert, tls.server.key)
    assert info.value.field == "key_file" and "0640" in info.value.problem
    assert "PRIVATE KEY" not in str(info.value)
    tls.server.key.chmod(0o600)
    assert isinstance(server_context(tls.server.cert, tls.server.key), ssl.SSLContext)
    with pytest.raises(TlsFileError) as info:
        server_context(tmp_path / "missing.pem", tls.server.key)
    assert info.value.field == "cert_file"
    with pytest.raises(TlsFileError) as info:  # a key that is not the certificate's
        server_context(tls.server.cert, pki.issue(tls.ca, "other", tmp_path / "other").key)
    assert info.value.field == "cert_file"


def test_config_wants_certificate_and_key_unless_tls_is_off() -> None:
    from daemons.runtime.config import ConfigError, ProfileApiConfig, build

    with pytest.raises(ConfigError, match=r"aaah.yaml: profile_api.cert_file: required"):
        build(ProfileApiConfig, {"address": "127.0.0.1"}, "aaah.yaml", "profile_api")
    with pytest.raises(ConfigError, match=r"aaah.yaml: profile_api.key_file: required"):
        build(ProfileApiConfig, {"address": "127.0.0.1", "cert_file": "/c.pem"}, "aaah.yaml", "profile_api")
    plain = build(ProfileApiConfig, {"address": "127.0.0.1", "tls": False}, "aaah.yaml", "profile_api")
    assert not plain.tls and plain.port == 8443
