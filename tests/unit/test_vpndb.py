"""The home AAA server's VPN database, on SQLite and on a real PostgreSQL server.

The PostgreSQL variant starts a private server (initdb + pg_ctl, as an unprivileged user, on a
unix socket in a temporary directory), gives every test a fresh database, and stops the server
and removes the directory afterwards whatever happens. It is skipped only if the PostgreSQL
server binaries or psycopg are missing.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner

from daemons.cli.db import db_group
from daemons.provision.kinds import load_topology
from daemons.runtime.secret import Secret
from daemons.store.vpndb import (
    SCHEMA_VERSION,
    AlreadyExists,
    CngwMode,
    Distribution,
    GatewayType,
    InUse,
    NotFound,
    ValidationError,
    VpnDatabase,
    VpnDbError,
    open_database,
)
from daemons.vpn.path import EspSuite

SECRET = Secret(bytes.fromhex("5ec7e75ec7e75ec7e75ec7e75ec7e7aa"))
SECRET2 = Secret(bytes.fromhex("0badc0de0badc0de0badc0de0badc0de"))
NAI = "alice@home.example"
NAI2 = "bob@home.example"


# ---- a private PostgreSQL server -------------------------------------------------------------


def _pg_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0, reverse=True)
    for d in candidates:
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb).resolve().parent
    return None


class PgServer:
    def __init__(self, bindir: Path, root: Path, runas: list[str]) -> None:
        self.bindir, self.root, self.runas = bindir, root, runas
        self.data, self.log = root / "data", root / "server.log"

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.runas, *argv], cwd=self.root, capture_output=True, text=True, timeout=120)

    def url(self, dbname: str) -> str:
        return f"postgresql:///{dbname}?host={quote(str(self.root), safe='')}&user=postgres"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install 'psycopg[binary]'")
    runas: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:  # the server refuses to run as root: run it as an unprivileged user
        for name in ("postgres", "nobody"):
            try:
                owner = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        if owner is None:
            pytest.skip("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")
        runas = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups"]
    root = Path(tempfile.mkdtemp(prefix="mipvpn-pg-"))  # in /tmp: the server user must reach it
    server = PgServer(bindir, root, runas)
    try:
        if owner is not None:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        proc = server.run(str(bindir / "initdb"), "-D", str(server.data), "-U", "postgres", "-A", "trust",
                          "-E", "UTF8", "--locale=C", "--no-sync")
        assert proc.returncode == 0, f"initdb failed:\n{proc.stdout}\n{proc.stderr}"
        opts = f"-k {root} -c listen_addresses='' -F -c max_connections=50"
        proc = server.run(str(bindir / "pg_ctl"), "-D", str(server.data), "-l", str(server.log), "-o", opts,
                          "-w", "-t", "60", "start")
        if proc.returncode != 0:
            log = server.log.read_text() if server.log.exists() else ""
            raise AssertionError(f"pg_ctl start failed:\n{proc.stdout}\n{proc.stderr}\n{log}")
        yield server
    finally:
        pidfile = server.data / "postmaster.pid"
        if pidfile.exists():
            stop = server.run(str(bindir / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "-w", "stop")
            if stop.returncode != 0 and pidfile.exists():  # pg_ctl failed: end the postmaster we started
                try:
                    os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'vpn.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = server.url("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.url(name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(db_url: str) -> Iterator[VpnDatabase]:
    database = open_database(db_url, create=True)
    try:
        yield database
    finally:
        database.close()


def corp(db: VpnDatabase) -> None:
    """Two users, a realm, the HA, an FA and a static and a dynamic CN-GW."""
    db.add_realm("home.example", home_aaa="aaah")
    db.add_gateway("ha", "198.18.100.1", GatewayType.HA, "home.example")
    db.add_gateway("fa1", "198.18.0.14", "fa")
    db.add_gateway("gwstatic", "198.18.0.30", "cngw-static")
    db.add_gateway("gwdyn", "198.18.0.34", "cngw-dynamic")
    db.add_route("gwstatic", "198.18.2.0/24")
    db.add_route("gwdyn", "198.18.3.0/24")
    db.add_user(NAI, "198.18.100.10", "198.18.100.1", 0x3000, SECRET)
    db.add_user(NAI2, "198.18.100.11", "198.18.100.1", 0x3001, SECRET2, mn_ha_spi=0x1000, mn_ha_key=SECRET)


# ---- schema ----------------------------------------------------------------------------------


def test_schema_is_idempotent_and_versioned(db_url: str) -> None:
    with pytest.raises(VpnDbError, match=r"^url: .*(no mipvpn schema|does not exist): run `mipvpn db init`"):
        open_database(db_url)
    with open_database(db_url, create=True) as db:
        assert db.create_schema() == SCHEMA_VERSION
        db.add_user(NAI, "198.18.100.10", "198.18.100.1", 0x3000, SECRET)
        assert db.create_schema() == SCHEMA_VERSION  # again: nothing lost, nothing duplicated
        assert db.schema_version() == SCHEMA_VERSION
    with open_database(db_url, create=True) as db, open_database(db_url) as again:
        assert [u.nai for u in again.users()] == [NAI]
        assert db.schema_version() == SCHEMA_VERSION


def test_urls() -> None:
    with pytest.raises(VpnDbError, match=r"^url: unsupported database URL scheme"):
        open_database("mysql://u:pw@host/db")
    with pytest.raises(VpnDbError) as info:
        open_database("mysql://u:hunter2@host/db")
    assert "hunter2" not in str(info.value)
    with open_database("sqlite://", create=True) as mem:
        assert mem.users() == []


def test_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "vpn.db"
    with open_database(str(path), create=True):
        pass
    assert path.stat().st_mode & 0o077 == 0


# ---- users -----------------------------------------------------------------------------------


def test_user_crud(db: VpnDatabase) -> None:
    corp(db)
    alice = db.user_by_nai(NAI)
    assert alice is not None
    assert (str(alice.home_address), str(alice.home_agent), alice.mn_aaa_spi) == ("198.18.100.10", "198.18.100.1",
                                                                                 0x3000)
    assert alice.mn_aaa_secret == SECRET and alice.mn_ha_spi is None and alice.enabled
    bob = db.user_by_nai(NAI2)
    assert bob is not None and bob.mn_ha_spi == 0x1000 and bob.mn_ha_key == SECRET
    assert [u.nai for u in db.users()] == [NAI, NAI2]
    assert db.user_by_nai("nobody@home.example") is None

    with pytest.raises(AlreadyExists, match=r"^nai: user 'alice@home.example' already exists"):
        db.add_user(NAI, "198.18.100.12", "198.18.100.1", 0x3000, SECRET)
    db.add_user(NAI, "198.18.100.12", "198.18.100.1", 0x3005, SECRET2, replace=True)
    alice = db.user_by_nai(NAI)
    assert alice is not None and str(alice.home_address) == "198.18.100.12" and alice.mn_aaa_secret == SECRET2

    # MN-AAA secret lookup: right SPI only, enabled users only.
    assert db.mn_aaa_secret(NAI, 0x3005) == SECRET2
    assert db.mn_aaa_secret(NAI, 0x3000) is None
    assert db.mn_aaa_secret("nobody@home.example", 0x3005) is None
    db.set_user_enabled(NAI, False)
    assert db.mn_aaa_secret(NAI, 0x3005) is None
    db.set_user_enabled(NAI, True)
    assert asyncio.run(db.aio.mn_aaa_secret(NAI, 0x3005)) == SECRET2

    db.add_profile(NAI, "198.18.2.10")
    db.remove_user(NAI)  # takes the profiles along
    assert db.user_by_nai(NAI) is None and db.profiles_for(NAI) == []
    with pytest.raises(NotFound, match=r"^nai: no user"):
        db.remove_user(NAI)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"nai": "no-realm"}, "nai"),
    ({"home_address": "198.18.100.300"}, "home_address"),
    ({"home_agent": "ha"}, "home_agent"),
    ({"mn_aaa_spi": 255}, "mn_aaa_spi"),
    ({"mn_aaa_spi": 2**32}, "mn_aaa_spi"),
    ({"mn_aaa_secret": Secret(b"short")}, "mn_aaa_secret"),
    ({"mn_ha_spi": 0x1000}, "mn_ha_key"),
    ({"mn_ha_key": SECRET}, "mn_ha_spi"),
])
def test_user_validation_names_the_field(db: VpnDatabase, kwargs: dict, field: str) -> None:
    args = {"nai": NAI, "home_address": "198.18.100.10", "home_agent": "198.18.100.1", "mn_aaa_spi": 0x3000,
            "mn_aaa_secret": SECRET, **kwargs}
    with pytest.raises(ValidationError) as info:
        db.add_user(**args)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")
    assert db.users() == []


# ---- gateways, correspondence ----------------------------------------------------------------


def test_longest_prefix_correspondence(db: VpnDatabase) -> None:
    for name, prefix in (("wide", "198.18.0.0/16"), ("corp", "198.18.2.0/24"), ("lab", "198.18.2.128/25"),
                         ("host", "198.18.2.200")):
        db.add_gateway(name, "198.18.0.30", "cngw-static")
        db.add_route(name, prefix)
    expect = {"198.18.2.200": "host", "198.18.2.201": "lab", "198.18.2.10": "corp", "198.18.9.9": "wide",
              "198.18.2.0/24": "corp", "198.18.2.128/26": "lab", "198.18.2.0/23": "wide", "198.18.2.200/32": "host"}
    for dest, gw in expect.items():
        found = db.gateway_for(dest)
        assert found is not None and found.name == gw, dest
    assert db.gateway_for("10.0.0.1") is None
    assert db.gateway_for("198.0.0.0/8") is None  # wider than every row
    assert asyncio.run(db.aio.gateway_for("198.18.2.201")).name == "lab"  # type: ignore[union-attr]

    with pytest.raises(AlreadyExists, match=r"^prefix: 198.18.2.0/24 is already accommodated by gateway 'corp'"):
        db.add_route("wide", "198.18.2.0/24")
    with pytest.raises(NotFound, match=r"^gateway: unknown gateway 'nosuch'"):
        db.add_route("nosuch", "198.18.7.0/24")
    with pytest.raises(ValidationError, match=r"^prefix: malformed"):
        db.add_route("wide", "198.18.2.1/24")
    with pytest.raises(ValidationError, match=r"^destination: malformed"):
        db.gateway_for("not-an-address")
    db.remove_route("lab", "198.18.2.128/25")
    assert db.gateway_for("198.18.2.201").name == "corp"  # type: ignore[union-attr]
    db.remove_gateway("host")  # its rows go with it
    assert db.gateway_for("198.18.2.200").name == "corp"  # type: ignore[union-attr]
    assert {r.gateway for r in db.routes()} == {"wide", "corp"}


def test_gateways_and_realms(db: VpnDatabase) -> None:
    corp(db)
    gw = db.gateway("ha")
    assert gw is not None and gw.type is GatewayType.HA and gw.realm == "home.example"
    assert [g.name for g in db.gateways()] == ["fa1", "gwdyn", "gwstatic", "ha"]
    with pytest.raises(AlreadyExists, match=r"^name: gateway 'ha' already exists"):
        db.add_gateway("ha", "198.18.100.1", "ha")
    with pytest.raises(ValidationError, match=r"^type: unknown value 'router'"):
        db.add_gateway("r1", "198.18.0.1", "router")
    with pytest.raises(ValidationError, match=r"^address: malformed"):
        db.add_gateway("r1", "198.18.0", "fa")
    with pytest.raises(NotFound, match=r"^realm: unknown realm 'elsewhere.example'"):
        db.add_gateway("r1", "198.18.0.1", "fa", "elsewhere.example")
    with pytest.raises(InUse, match=r"^realm: realm 'home.example' still has gateways"):
        db.remove_realm("home.example")
    db.add_profile(NAI, "198.18.2.0/24")
    with pytest.raises(InUse, match=r"^gateway: gateway 'gwstatic' is used by 1 profile"):
        db.remove_gateway("gwstatic")
    with pytest.raises(NotFound, match=r"^gateway: no gateway 'nosuch'"):
        db.remove_gateway("nosuch")


# ---- profiles --------------------------------------------------------------------------------


def test_profile_crud(db: VpnDatabase) -> None:
    corp(db)
    p = db.add_profile(NAI, "198.18.2.10")  # gateway and type from the correspondence table
    assert (p.gateway, p.gateway_type, p.suite, p.lifetime, p.qos, p.distribution) == (
        "gwstatic", CngwMode.STATIC, EspSuite.AES128GCM16, 3600, None, Distribution.AT_REGISTRATION)
    assert str(p.destination) == "198.18.2.10/32"
    q = db.add_profile(NAI, "198.18.3.0/24", "gwdyn", gateway_type="dynamic", suite="aes256gcm16", lifetime=600,
                       qos_rate=10_000_000, qos_ceil=20_000_000, qos_priority=1, distribution="on_traffic")
    assert q.qos is not None and (q.qos.rate, q.qos.effective_ceil, q.qos.priority) == (10_000_000, 20_000_000, 1)
    assert db.profiles_for(NAI) == [p, q]
    assert db.profiles_for(NAI2) == []
    assert db.profile(NAI, q.id) == q and db.profile(NAI2, q.id) is None

    # Claim 24: the user moves the destination to a dynamic gateway; the type follows it.
    moved = db.update_profile(NAI, p.id, gateway="gwdyn", destination="198.18.3.10")
    assert (moved.gateway, moved.gateway_type, str(moved.destination)) == ("gwdyn", CngwMode.DYNAMIC,
                                                                           "198.18.3.10/32")
    assert moved.suite is EspSuite.AES128GCM16 and db.profiles_for(NAI)[0] == moved
    no_qos = db.update_profile(NAI, q.id, qos_rate=None)
    assert no_qos.qos is None and no_qos.qos_ceil is None and no_qos.qos_priority is None
    upd = asyncio.run(db.aio.update_profile(NAI, q.id, lifetime=1200))
    assert upd.lifetime == 1200 and asyncio.run(db.aio.profiles_for(NAI))[1].lifetime == 1200

    with pytest.raises(NotFound, match=r"^profile: user 'bob@home.example' has no profile"):
        db.update_profile(NAI2, q.id, lifetime=5)  # not bob's profile
    db.remove_profile(NAI, p.id)
    assert [x.id for x in db.profiles_for(NAI)] == [q.id]
    with pytest.raises(NotFound, match=r"^profile: "):
        db.remove_profile(NAI, p.id)


@pytest.mark.parametrize(("kwargs", "exc", "field", "text"), [
    ({"destination": "198.18.2.0/16"}, ValidationError, "destination", "malformed"),
    ({"destination": "nowhere"}, ValidationError, "destination", "malformed"),
    ({"destination": "10.1.0.0/16"}, NotFound, "gateway", "no gateway accommodates 10.1.0.0/16"),
    ({"gateway": "nosuch"}, NotFound, "gateway", "unknown gateway 'nosuch'"),
    ({"gateway": "fa1"}, ValidationError, "gateway", "must be a CN-GW"),
    ({"gateway_type": "dynamic"}, ValidationError, "gateway_type", "does not match gateway 'gwstatic'"),
    ({"gateway_type": "sometimes"}, ValidationError, "gateway_type", "unknown value"),
    ({"suite": "des-md5"}, ValidationError, "suite", "unknown value 'des-md5'"),
    ({"lifetime": 0}, ValidationError, "lifetime", "out of range"),
    ({"lifetime": "soon"}, ValidationError, "lifetime", "not an integer"),
    ({"qos_rate": 0}, ValidationError, "qos_rate", "out of range"),
    ({"qos_rate": 10, "qos_ceil": 5}, ValidationError, "qos_ceil", "below qos_rate"),
    ({"qos_ceil": 5}, ValidationError, "qos_rate", "required when qos_ceil"),
    ({"qos_rate": 10, "qos_priority": 8}, ValidationError, "qos_priority", "out of range"),
    ({"distribution": "whenever"}, ValidationError, "distribution", "unknown value"),
    ({"nai": "carol@home.example"}, NotFound, "nai", "no user"),
    ({"destination": "198.18.2.0/24"}, AlreadyExists, "destination", "already has a profile"),
])
def test_profile_validation_names_the_field(db: VpnDatabase, kwargs: dict, exc: type, field: str,
                                            text: str) -> None:
    corp(db)
    db.add_profile(NAI, "198.18.2.0/24")
    args = {"nai": NAI, "destination": "198.18.2.10", **kwargs}
    with pytest.raises(exc) as info:
        db.add_profile(**args)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ") and text in str(info.value)
    assert len(db.profiles()) == 1
    # The same checks guard updates, and a failed update changes nothing. (An update keeps the
    # profile's gateway unless it names another, so an unrouted destination is not an error there.)
    changes = {k: v for k, v in kwargs.items() if k != "nai"}
    if "nai" not in kwargs and changes.get("destination") not in ("198.18.2.0/24", "10.1.0.0/16"):
        pid = db.add_profile(NAI, "198.18.2.20").id
        before = db.profile(NAI, pid)
        with pytest.raises(exc) as info:
            db.update_profile(NAI, pid, **changes)
        assert info.value.field == field
        assert db.profile(NAI, pid) == before


def test_update_profile_refuses_unknown_fields(db: VpnDatabase) -> None:
    corp(db)
    p = db.add_profile(NAI, "198.18.2.10")
    with pytest.raises(ValidationError, match=r"^nai: not a profile field"):
        db.update_profile(NAI, p.id, nai=NAI2)


def test_async_view_from_many_tasks(db: VpnDatabase) -> None:
    corp(db)

    async def main() -> None:
        aio = db.aio
        added = await asyncio.gather(*(aio.run(db.add_profile, NAI, f"198.18.2.{i}") for i in range(1, 11)))
        assert sorted(p.id for p in added) == sorted({p.id for p in added})
        reads = await asyncio.gather(*(aio.profiles_for(NAI) for _ in range(10)),
                                     *(aio.user_by_nai(NAI2) for _ in range(10)))
        assert all(len(r) == 10 for r in reads[:10])  # type: ignore[arg-type]
        assert all(u.nai == NAI2 for u in reads[10:])  # type: ignore[union-attr]

    asyncio.run(main())


# ---- tokens ----------------------------------------------------------------------------------


def test_token_verify(db: VpnDatabase, db_url: str) -> None:
    corp(db)
    assert not db.verify_token(NAI, "anything")  # no token yet
    token = db.issue_token(NAI)
    assert db.verify_token(NAI, token)
    assert asyncio.run(db.aio.verify_token(NAI, token))
    assert not db.verify_token(NAI, token + "x")
    assert not db.verify_token(NAI, "")
    assert not db.verify_token(NAI2, token)  # another user's token
    assert not db.verify_token("nobody@home.example", token)
    other = db.issue_token(NAI2)
    assert other != token and db.verify_token(NAI2, other) and not db.verify_token(NAI, other)
    # Re-issuing invalidates the old token; disabling the user stops it; revoking removes it.
    newer = db.issue_token(NAI)
    assert not db.verify_token(NAI, token) and db.verify_token(NAI, newer)
    db.set_user_enabled(NAI, False)
    assert not db.verify_token(NAI, newer)
    db.set_user_enabled(NAI, True)
    assert db.revoke_token(NAI) and not db.verify_token(NAI, newer) and not db.revoke_token(NAI)
    with pytest.raises(NotFound, match=r"^nai: no user"):
        db.issue_token("nobody@home.example")
    # Only a salted hash is stored.
    stored = _dump(db_url)
    assert other not in stored and "scrypt$" in stored


def _dump(url: str) -> str:
    """Everything in the token table, as text."""
    if url.startswith("sqlite:"):
        import sqlite3

        conn = sqlite3.connect(url[len("sqlite:///"):])
        try:
            return repr(conn.execute("SELECT * FROM user_tokens").fetchall())
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(url) as conn:
        return repr(conn.execute("SELECT * FROM user_tokens").fetchall())


# ---- seeding ---------------------------------------------------------------------------------


def test_seed_from_default_topology(db: VpnDatabase) -> None:
    topo = load_topology()
    nai = topo.users[0].nai
    db.seed_from_topology(topo, {nai: SECRET})
    db.seed_from_topology(topo, {nai: SECRET})  # idempotent
    user = db.user_by_nai(nai)
    assert user is not None
    assert str(user.home_address) == "198.18.100.10" and str(user.home_agent) == "198.18.100.1"
    assert user.mn_aaa_spi == 0x3000 and db.mn_aaa_secret(nai, 0x3000) == SECRET

    gws = {g.name: (str(g.address), g.type, g.realm) for g in db.gateways()}
    assert gws == {
        "ha": ("198.18.100.1", GatewayType.HA, "home.example"),
        "fa1": ("198.18.0.14", GatewayType.FA, "visit-a.example"),
        "fa2": ("198.18.0.18", GatewayType.FA, "visit-a.example"),
        "fa3": ("198.18.0.26", GatewayType.FA, "visit-b.example"),
        "cngw": ("198.18.0.30", GatewayType.CNGW_STATIC, "corp.example"),
        # seed_from_topology gives every CN-GW ``cngw_type``; provisioning then makes cngw2 dynamic
        "cngw2": ("198.18.0.34", GatewayType.CNGW_STATIC, "corp.example"),
    }
    assert [(r.gateway, str(r.prefix)) for r in db.routes()] == [("cngw", "198.18.2.0/24"), ("cngw2", "198.18.3.0/24")]
    assert db.gateway_for("198.18.2.10").name == "cngw"  # type: ignore[union-attr]
    assert db.gateway_for("198.18.3.10").name == "cngw2"  # type: ignore[union-attr]
    realms = {r.name: (r.home_aaa, r.local_aaa) for r in db.realms()}
    assert realms["home.example"] == ("aaah", None) and realms["visit-a.example"] == (None, "aaaf1")

    profile, profile2 = db.profiles_for(nai)
    assert (str(profile.destination), profile.gateway, profile.gateway_type, profile.suite, profile.qos) == (
        "198.18.2.0/24", "cngw", CngwMode.STATIC, EspSuite.AES128GCM16, None)
    assert (str(profile2.destination), profile2.gateway) == ("198.18.3.0/24", "cngw2")

    # New secrets on the next lab run replace the old ones; the profile stays.
    db.seed_from_topology(topo, {nai: SECRET2}, cngw_type="cngw-dynamic")
    assert db.mn_aaa_secret(nai, 0x3000) == SECRET2
    assert [(p.id, p.gateway_type) for p in db.profiles_for(nai)] == [(profile.id, CngwMode.DYNAMIC),
                                                                      (profile2.id, CngwMode.DYNAMIC)]
    with pytest.raises(ValidationError, match=r"^secrets_by_nai: no MN-AAA secret for mn1@home.example"):
        db.seed_from_topology(topo, {})


# ---- secrets stay secret ---------------------------------------------------------------------


def test_secrets_never_in_repr(db: VpnDatabase) -> None:
    corp(db)
    for nai in (NAI, NAI2):
        user = db.user_by_nai(nai)
        for text in (repr(user), str(user), repr(db.users()), json.dumps(user.summary())):  # type: ignore[union-attr]
            for secret in (SECRET, SECRET2):
                assert secret.reveal().hex() not in text
                assert repr(secret.reveal()) not in text


def test_cli_never_prints_secrets(db_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    secret_file = tmp_path / "mn-aaa.hex"
    secret_file.write_text(SECRET.reveal().hex() + "\n")
    key_file = tmp_path / "mn-ha.hex"
    key_file.write_text(SECRET2.reveal().hex())
    short_file = tmp_path / "short.hex"
    short_file.write_text("00112233")
    hexes = [SECRET.reveal().hex(), SECRET2.reveal().hex(), "00112233"]
    outputs: list[str] = []

    def cli(*args: str, code: int = 0) -> str:
        result = runner.invoke(db_group, [*args, "--url", db_url], catch_exceptions=False)
        assert result.exit_code == code, f"{args}: {result.output}"
        outputs.append(result.output)
        return result.output

    assert "run `mipvpn db init`" in cli("user", "list", code=1)
    cli("init")
    cli("init")
    cli("user", "add", NAI, "--home-address", "198.18.100.10", "--home-agent", "198.18.100.1",
        "--mn-aaa-secret-file", str(secret_file), "--mn-ha-spi", "4096", "--mn-ha-key-file", str(key_file))
    out = cli("user", "add", NAI2, "--home-address", "198.18.100.11", "--home-agent", "198.18.100.1",
              "--mn-aaa-secret-file", str(short_file), code=1)
    assert "mn_aaa_secret: too short" in out
    out = cli("user", "add", NAI2, "--home-address", "198.18.100.300", "--home-agent", "198.18.100.1",
              "--mn-aaa-secret-file", str(secret_file), code=1)
    assert "home_address: malformed IPv4 address" in out
    out = cli("user", "add", NAI2, "--home-address", "198.18.100.11", "--home-agent", "198.18.100.1",
              "--mn-aaa-secret-file", str(tmp_path / "missing"), code=1)
    assert "mn-aaa-secret-file: cannot read" in out
    out = cli("user", "list")
    assert NAI in out and "12288" in out and "4096" in out
    rows = json.loads(cli("user", "list", "--json"))
    assert rows == [{"nai": NAI, "home_address": "198.18.100.10", "home_agent": "198.18.100.1",
                     "mn_aaa_spi": 0x3000, "mn_ha_spi": 4096, "enabled": True, "token": False}]

    cli("realm", "add", "corp.example")
    cli("gateway", "add", "cngw", "--address", "198.18.0.30", "--type", "cngw-static", "--realm", "corp.example")
    assert "type" in cli("gateway", "add", "bad", "--address", "198.18.0.31", "--type", "router", code=2)
    assert "address: malformed" in cli("gateway", "add", "bad", "--address", "x", "--type", "fa", code=1)
    cli("route", "add", "cngw", "198.18.2.0/24")
    assert "gateway: unknown gateway 'nope'" in cli("route", "add", "nope", "198.18.5.0/24", code=1)
    assert "via gateway cngw" in cli("route", "lookup", "198.18.2.10")
    assert "198.18.2.0/24" in cli("gateway", "list")
    assert json.loads(cli("gateway", "list", "--json"))[0]["accommodates"] == ["198.18.2.0/24"]

    assert "profile 1 added" in cli("profile", "add", NAI, "198.18.2.0/24", "--qos-rate", "10M", "--qos-priority",
                                    "2")
    assert "lifetime: 0 out of range" in cli("profile", "add", NAI, "198.18.2.10", "--lifetime", "0", code=1)
    assert "gateway_type: dynamic does not match" in cli("profile", "add", NAI, "198.18.2.10", "--gateway-type",
                                                         "dynamic", code=1)
    assert "destination: no gateway accommodates" not in cli("profile", "list")
    (profile,) = json.loads(cli("profile", "list", NAI, "--json"))
    assert (profile["qos_rate"], profile["qos_priority"], profile["suite"]) == (10_000_000, 2, "aes128gcm16")
    cli("profile", "update", NAI, "1", "--suite", "aes256gcm16", "--no-qos")
    (profile,) = json.loads(cli("profile", "list", "--json"))
    assert (profile["suite"], profile["qos_rate"]) == ("aes256gcm16", None)
    assert "qos_priority: 9 out of range" in cli("profile", "update", NAI, "1", "--qos-rate", "1M",
                                                  "--qos-priority", "9", code=1)

    token = cli("token", "issue", NAI).strip()
    with open_database(db_url) as db:
        assert db.verify_token(NAI, token)
    assert json.loads(cli("user", "list", "--json"))[0]["token"] is True
    assert "nai: no user" in cli("token", "issue", "nobody@home.example", code=1)

    assert "gateway: gateway 'cngw' is used by 1 profile" in cli("gateway", "remove", "cngw", code=1)
    cli("profile", "remove", NAI, "1")
    cli("route", "remove", "cngw", "198.18.2.0/24")
    cli("gateway", "remove", "cngw")
    cli("user", "disable", NAI)
    cli("user", "remove", NAI)
    assert "no users" in cli("user", "list")
    assert "nai: no user" in cli("user", "remove", NAI, code=1)

    everything = "\n".join(outputs)
    for h in hexes:
        assert h not in everything and h.upper() not in everything
