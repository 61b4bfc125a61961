"""The VPN database of the home AAA server (claims 1-8, 24).

What it holds (design.md, "VPN information"):

* **users**: NAI, home address, home agent address, the MN-AAA SPI and shared secret (the AAAH
  needs the secret itself to verify the MN-AAA authenticator, so it is stored as given), an
  optional MN-HA SPI + key, an enabled flag;
* **realms**: a realm (NAI domain) and the host names of its home / local AAA server;
* **gateways** (network apparatuses): name, outer IPv4 address, type (FA, HA, static or
  dynamic CN-GW) and realm;
* the **correspondence table** (claim 8): which gateway accommodates which host or prefix;
  :meth:`VpnDatabase.gateway_for` is a longest-prefix match over it;
* **VPN profiles** per user: destination host/prefix, the CN-GW in front of it and its type
  (static/dynamic), the ESP suite and lifetime, the QoS (HTB rate/ceil/priority) and when the
  AAAH distributes the path (at registration, claim 4, or on traffic, claim 5);
* one **API token** per user for self-service changes (claim 24), stored only as a salted
  scrypt hash; a token reads ``mvt_<base64url(NAI)>.<256 random bits>``, so the profile API
  (``daemons.aaa.profileapi``) knows whose hash to check.

Storage: SQLite (the embedded default: a file path or ``sqlite:///path``) or PostgreSQL
(``postgresql://...``, psycopg 3) behind one :class:`VpnDatabase` interface; the SQL is
written once. Calls are synchronous and serialised by a lock, so the same object may be used
from several threads; :attr:`VpnDatabase.aio` gives the asyncio view (each call runs in a
worker thread with :func:`asyncio.to_thread`).

Secrets are :class:`daemons.runtime.secret.Secret` everywhere: no repr, error message or listing of
this module contains them.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import ipaddress
import os
import secrets
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemons.runtime.secret import Secret
from daemons.vpn.path import EndpointType, EspSuite, Qos

if TYPE_CHECKING:
    from lab.topology import Topology

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

# The gateway (network apparatus) types are the path endpoint types of daemons.vpn.path.
GatewayType = EndpointType

DEFAULT_URL = "sqlite:////var/lib/mipvpn/vpn.db"
URL_ENV = "MIPVPN_DB_URL"
DEFAULT_MN_AAA_SPI = 0x3000  # the lab's MN-AAA SPI (daemons.provision.configs.SPI_MN_AAA)
DEFAULT_LIFETIME = 3600
MIN_SECRET_LEN = 16
MAX_LIFETIME = 0xFFFFFFFF
SCHEMA_VERSION = 1

# scrypt parameters for API tokens (RFC 7914: N=2^14, r=8, p=1 is the interactive setting).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _SCRYPT_LEN = 2**14, 8, 1, 32


class Distribution(enum.Enum):
    """When the AAAH hands the path out: with the registration (claim 4) or when the
    correspondent's traffic first arrives at the gateway (claim 5)."""

    AT_REGISTRATION = "at_registration"
    ON_TRAFFIC = "on_traffic"


class CngwMode(enum.Enum):
    """A profile's gateway type: a static CN-GW (standing tunnel to the HA) or a dynamic one
    (paths to the FA set up on Binding Update)."""

    STATIC = "static"
    DYNAMIC = "dynamic"


_MODE_OF_TYPE = {GatewayType.CNGW_STATIC: CngwMode.STATIC, GatewayType.CNGW_DYNAMIC: CngwMode.DYNAMIC}


# ---- errors --------------------------------------------------------------------------------


class VpnDbError(Exception):
    """Any database problem. ``field`` names the offending field; the message starts with it.

    Messages never contain secret values."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


class ValidationError(VpnDbError):
    """A value is malformed or out of range."""


class NotFound(VpnDbError):
    """The named user, gateway, realm, route or profile does not exist."""


class AlreadyExists(VpnDbError):
    """A unique name, prefix or destination is already taken."""


class InUse(VpnDbError):
    """The object is still referenced (e.g. a gateway by a profile)."""


# ---- model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Realm:
    name: str
    home_aaa: str | None = None  # host name of the realm's home AAA server
    local_aaa: str | None = None  # host name of the realm's local (foreign) AAA server


@dataclass(frozen=True)
class Gateway:
    name: str
    address: IPv4Address
    type: GatewayType
    realm: str | None = None


@dataclass(frozen=True)
class Route:
    """One correspondence-table row: ``gateway`` accommodates ``prefix`` (a /32 for a host)."""

    gateway: str
    prefix: IPv4Network


@dataclass(frozen=True)
class User:
    nai: str
    home_address: IPv4Address
    home_agent: IPv4Address
    mn_aaa_spi: int
    mn_aaa_secret: Secret = field(repr=False)
    mn_ha_spi: int | None = None
    mn_ha_key: Secret | None = field(default=None, repr=False)
    enabled: bool = True

    def summary(self) -> dict[str, Any]:
        """What listings show: SPIs, never secrets."""
        return {"nai": self.nai, "home_address": str(self.home_address), "home_agent": str(self.home_agent),
                "mn_aaa_spi": self.mn_aaa_spi, "mn_ha_spi": self.mn_ha_spi, "enabled": self.enabled}


@dataclass(frozen=True)
class VpnProfile:
    id: int
    nai: str
    destination: IPv4Network
    gateway: str
    gateway_type: CngwMode
    suite: EspSuite = EspSuite.AES128GCM16
    lifetime: int = DEFAULT_LIFETIME
    qos_rate: int | None = None  # bit/s; None: no QoS
    qos_ceil: int | None = None
    qos_priority: int | None = None
    distribution: Distribution = Distribution.AT_REGISTRATION

    @property
    def qos(self) -> Qos | None:
        if self.qos_rate is None:
            return None
        return Qos(self.qos_rate, self.qos_ceil, 4 if self.qos_priority is None else self.qos_priority)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(destination=str(self.destination), gateway_type=self.gateway_type.value, suite=self.suite.value,
                 distribution=self.distribution.value)
        return d


# ---- validation ----------------------------------------------------------------------------


def _address(value: Any, name: str) -> IPv4Address:
    try:
        return IPv4Address(str(value).strip())
    except ValueError:
        raise ValidationError(name, f"malformed IPv4 address {str(value)!r}") from None


def _network(value: Any, name: str) -> IPv4Network:
    """A host (``a.b.c.d`` -> /32) or a prefix without host bits."""
    try:
        return IPv4Network(str(value).strip(), strict=True)
    except ValueError as exc:
        raise ValidationError(name, f"malformed host or prefix {str(value)!r}: {exc}") from None


def _spi(value: Any, name: str) -> int:
    try:
        spi = int(value)
    except (TypeError, ValueError):
        raise ValidationError(name, f"not an integer: {value!r}") from None
    if not 256 <= spi <= 0xFFFFFFFF:
        raise ValidationError(name, f"SPI {spi} out of range (256..4294967295; 0-255 are reserved)")
    return spi


def _secret(value: Any, name: str) -> Secret:
    if isinstance(value, Secret):
        sec = value
    elif isinstance(value, bytes | bytearray):
        sec = Secret(bytes(value))
    else:
        raise ValidationError(name, "must be a Secret or bytes (value withheld)")
    if len(sec) < MIN_SECRET_LEN:
        raise ValidationError(name, f"too short: at least {MIN_SECRET_LEN} bytes (value withheld)")
    return sec


def _enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in cls)
        raise ValidationError(name, f"unknown value {value!r} (one of: {allowed})") from None


def _int_range(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise ValidationError(name, f"not an integer: {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValidationError(name, f"not an integer: {value!r}") from None
    if not lo <= n <= hi:
        raise ValidationError(name, f"{n} out of range ({lo}..{hi})")
    return n


def _name(value: Any, name: str) -> str:
    text = str(value).strip() if value is not None else ""
    if not text or len(text) > 253 or any(c.isspace() for c in text):
        raise ValidationError(name, f"must be a non-empty name without spaces (at most 253 characters): {value!r}")
    return text


def _nai(value: Any) -> str:
    nai = _name(value, "nai")
    user, sep, realm = nai.partition("@")
    if not sep or not user or not realm:
        raise ValidationError("nai", f"NAI {nai!r} must be user@realm")
    return nai


def _qos(rate: Any, ceil: Any, priority: Any) -> tuple[int | None, int | None, int | None]:
    if rate is None:
        if ceil is not None:
            raise ValidationError("qos_rate", "required when qos_ceil is set")
        if priority is not None:
            raise ValidationError("qos_rate", "required when qos_priority is set")
        return None, None, None
    r = _int_range(rate, "qos_rate", 1, 2**63 - 1)
    c = None if ceil is None else _int_range(ceil, "qos_ceil", 1, 2**63 - 1)
    if c is not None and c < r:
        raise ValidationError("qos_ceil", f"{c} is below qos_rate {r}")
    p = None if priority is None else _int_range(priority, "qos_priority", 0, 7)
    return r, c, p


# ---- API tokens ----------------------------------------------------------------------------


def _hash_token(token: str, salt: bytes, n: int = _SCRYPT_N, r: int = _SCRYPT_R, p: int = _SCRYPT_P) -> bytes:
    return hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, maxmem=128 * r * n * 2 + 2**20,
                          dklen=_SCRYPT_LEN)


def _token_record(token: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _hash_token(token, salt)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


TOKEN_PREFIX = "mvt_"


def _new_token(nai: str) -> str:
    """``mvt_`` + the owner's NAI (base64url, unpadded) + ``.`` + 256 random bits (base64url).
    The NAI part only says which user's hash to check; the random part is the secret."""
    owner = base64.urlsafe_b64encode(nai.encode()).decode().rstrip("=")
    return f"{TOKEN_PREFIX}{owner}.{secrets.token_urlsafe(32)}"


def token_owner(token: str) -> str | None:
    """The NAI a token claims to belong to (unverified: check it with ``verify_token``);
    ``None`` if the token is not of that form."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 1024:
        return None
    owner, dot, rest = token[len(TOKEN_PREFIX):].partition(".")
    if not dot or not owner or not rest:
        return None
    try:
        nai = base64.urlsafe_b64decode(owner + "=" * (-len(owner) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return nai if "@" in nai and nai.isprintable() else None


def _token_matches(token: str, record: str | None) -> bool:
    if record is None:  # same work either way, so timing does not tell whether a user has a token
        _hash_token(token, b"\0" * 16)
        return False
    try:
        algo, n, r, p, salt, digest = record.split("$")
        if algo != "scrypt":
            return False
        got = _hash_token(token, bytes.fromhex(salt), int(n), int(r), int(p))
        return hmac.compare_digest(got, bytes.fromhex(digest))
    except ValueError:
        return False


# ---- schema --------------------------------------------------------------------------------

# Migrations: version -> DDL statements. {id} and {blob} are filled in per dialect. Never edit
# a released migration; append a new version instead.
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE realms (
            name TEXT PRIMARY KEY,
            home_aaa TEXT,
            local_aaa TEXT)""",
        """CREATE TABLE gateways (
            name TEXT PRIMARY KEY,
            address TEXT NOT NULL,
            type TEXT NOT NULL CHECK (type IN ('fa', 'ha', 'cngw-static', 'cngw-dynamic')),
            realm TEXT REFERENCES realms(name) ON DELETE RESTRICT)""",
        """CREATE TABLE correspondence (
            prefix TEXT PRIMARY KEY,
            gateway TEXT NOT NULL REFERENCES gateways(name) ON DELETE CASCADE,
            net_first BIGINT NOT NULL,
            net_last BIGINT NOT NULL,
            prefix_len INTEGER NOT NULL)""",
        "CREATE INDEX correspondence_range ON correspondence (net_first, net_last)",
        """CREATE TABLE users (
            nai TEXT PRIMARY KEY,
            home_address TEXT NOT NULL,
            home_agent TEXT NOT NULL,
            mn_aaa_spi BIGINT NOT NULL,
            mn_aaa_secret {blob} NOT NULL,
            mn_ha_spi BIGINT,
            mn_ha_key {blob},
            enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)))""",
        """CREATE TABLE user_tokens (
            nai TEXT PRIMARY KEY REFERENCES users(nai) ON DELETE CASCADE,
            token_hash TEXT NOT NULL,
            issued_at TEXT NOT NULL)""",
        """CREATE TABLE profiles (
            id {id},
            nai TEXT NOT NULL REFERENCES users(nai) ON DELETE CASCADE,
            destination TEXT NOT NULL,
            gateway TEXT NOT NULL REFERENCES gateways(name) ON DELETE RESTRICT,
            gateway_type TEXT NOT NULL CHECK (gateway_type IN ('static', 'dynamic')),
            suite TEXT NOT NULL,
            lifetime BIGINT NOT NULL,
            qos_rate BIGINT,
            qos_ceil BIGINT,
            qos_priority INTEGER,
            distribution TEXT NOT NULL CHECK (distribution IN ('at_registration', 'on_traffic')),
            UNIQUE (nai, destination))""",
    ],
}

_USER_COLS = "nai, home_address, home_agent, mn_aaa_spi, mn_aaa_secret, mn_ha_spi, mn_ha_key, enabled"
_PROFILE_COLS = ("id, nai, destination, gateway, gateway_type, suite, lifetime, qos_rate, qos_ceil, qos_priority, "
                 "distribution")


def _user_row(row: Sequence[Any]) -> User:
    nai, hoa, ha, spi, sec, ha_spi, ha_key, enabled = row
    return User(nai, IPv4Address(hoa), IPv4Address(ha), int(spi), Secret(bytes(sec)),
                None if ha_spi is None else int(ha_spi), None if ha_key is None else Secret(bytes(ha_key)),
                bool(enabled))


def _profile_row(row: Sequence[Any]) -> VpnProfile:
    pid, nai, dest, gw, gw_type, suite, lifetime, rate, ceil, prio, dist = row
    return VpnProfile(int(pid), nai, IPv4Network(dest), gw, CngwMode(gw_type), EspSuite(suite), int(lifetime),
                      None if rate is None else int(rate), None if ceil is None else int(ceil),
                      None if prio is None else int(prio), Distribution(dist))


def _gateway_row(row: Sequence[Any]) -> Gateway:
    name, address, gtype, realm = row
    return Gateway(name, IPv4Address(address), GatewayType(gtype), realm)


# ---- the database --------------------------------------------------------------------------


class VpnDatabase(ABC):
    """The VPN database; :func:`open_database` picks the implementation from a URL."""

    _id_column: str
    _blob_type: str

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        self._conn: Any = None

    # -- dialect hooks ------------------------------------------------------------------------
    @abstractmethod
    def _connect(self) -> Any: ...

    @abstractmethod
    def _begin(self, conn: Any, write: bool) -> None: ...

    @abstractmethod
    def _is_integrity_error(self, exc: BaseException) -> bool: ...

    def _sql(self, sql: str) -> str:
        return sql

    def _lock_schema(self, cur: Any) -> None:  # noqa: B027 - optional hook
        """Serialise concurrent schema creation (PostgreSQL: an advisory lock)."""

    # -- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    def __enter__(self) -> VpnDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.safe_url!r})"

    @property
    def safe_url(self) -> str:
        """The URL without a password."""
        return _redact_url(self.url)

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[_Cursor]:
        """One transaction on the (lazily opened, lock-serialised) connection."""
        with self._lock:
            if self._conn is None or getattr(self._conn, "closed", False) or getattr(self._conn, "broken", False):
                self._conn = None
                self._conn = self._connect()
            conn = self._conn
            self._begin(conn, write)
            cur = _Cursor(conn.cursor(), self._sql)
            try:
                yield cur
                conn.commit()
            except BaseException:
                try:
                    conn.rollback()
                except Exception:  # a broken connection: drop it, the next call reconnects
                    self.close()
                raise
            finally:
                cur.close()

    def _write(self, what: str, fn: Any) -> Any:
        """Run ``fn(cur)`` in a write transaction; turn constraint violations nobody checked for
        into an error naming ``what`` (never the values)."""
        try:
            with self._tx(write=True) as cur:
                return fn(cur)
        except VpnDbError:
            raise
        except Exception as exc:
            if self._is_integrity_error(exc):
                raise AlreadyExists(what, "conflicts with an existing entry") from None
            raise

    # -- schema --------------------------------------------------------------------------------
    def create_schema(self) -> int:
        """Create or migrate the schema (idempotent); return the schema version."""
        with self._tx(write=True) as cur:
            self._lock_schema(cur)
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
            cur.execute("SELECT MAX(version) FROM schema_version")
            current = cur.fetchone()[0] or 0
            if current > SCHEMA_VERSION:
                raise VpnDbError("url", f"schema version {current} is newer than this software ({SCHEMA_VERSION})")
            for version in sorted(v for v in _MIGRATIONS if v > current):
                for ddl in _MIGRATIONS[version]:
                    cur.execute(ddl.format(id=self._id_column, blob=self._blob_type))
                cur.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, _now()))
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        """The database's schema version; 0 if it has no mipvpn schema."""
        with self._tx() as cur:
            if not self._has_table(cur, "schema_version"):
                return 0
            cur.execute("SELECT MAX(version) FROM schema_version")
            return int(cur.fetchone()[0] or 0)

    @abstractmethod
    def _has_table(self, cur: _Cursor, name: str) -> bool: ...

    def check_schema(self) -> None:
        """Raise a clear error unless the schema is present and current."""
        version = self.schema_version()
        if version == 0:
            raise VpnDbError("url", f"{self.safe_url} has no mipvpn schema: run `mipvpn db init`")
        if version != SCHEMA_VERSION:
            raise VpnDbError("url", f"{self.safe_url} has schema version {version}, this software needs "
                             f"{SCHEMA_VERSION}: run `mipvpn db init` to migrate")

    # -- realms --------------------------------------------------------------------------------
    def add_realm(self, name: str, home_aaa: str | None = None, local_aaa: str | None = None, *,
                  replace: bool = False) -> Realm:
        realm = Realm(_name(name, "realm"), None if home_aaa is None else _name(home_aaa, "home_aaa"),
                      None if local_aaa is None else _name(local_aaa, "local_aaa"))

        def run(cur: _Cursor) -> Realm:
            if cur.one("SELECT 1 FROM realms WHERE name = ?", (realm.name,)):
                if not replace:
                    raise AlreadyExists("realm", f"realm {realm.name!r} already exists")
                cur.execute("UPDATE realms SET home_aaa = ?, local_aaa = ? WHERE name = ?",
                            (realm.home_aaa, realm.local_aaa, realm.name))
            else:
                cur.execute("INSERT INTO realms (name, home_aaa, local_aaa) VALUES (?, ?, ?)",
                            (realm.name, realm.home_aaa, realm.local_aaa))
            return realm

        return self._write("realm", run)

    def realms(self) -> list[Realm]:
        with self._tx() as cur:
            cur.execute("SELECT name, home_aaa, local_aaa FROM realms ORDER BY name")
            return [Realm(*row) for row in cur.fetchall()]

    def realm(self, name: str) -> Realm | None:
        with self._tx() as cur:
            row = cur.one("SELECT name, home_aaa, local_aaa FROM realms WHERE name = ?", (name,))
            return Realm(*row) if row else None

    def remove_realm(self, name: str) -> None:
        def run(cur: _Cursor) -> None:
            if cur.one("SELECT 1 FROM gateways WHERE realm = ?", (name,)):
                raise InUse("realm", f"realm {name!r} still has gateways")
            cur.execute("DELETE FROM realms WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFound("realm", f"no realm {name!r}")

        self._write("realm", run)

    # -- gateways (network apparatuses) --------------------------------------------------------
    def add_gateway(self, name: str, address: Any, type: GatewayType | str, realm: str | None = None, *,
                    replace: bool = False) -> Gateway:
        gw = Gateway(_name(name, "name"), _address(address, "address"), _enum(GatewayType, type, "type"),
                     None if realm is None else _name(realm, "realm"))

        def run(cur: _Cursor) -> Gateway:
            if gw.realm is not None and not cur.one("SELECT 1 FROM realms WHERE name = ?", (gw.realm,)):
                raise NotFound("realm", f"unknown realm {gw.realm!r}")
            if cur.one("SELECT 1 FROM gateways WHERE name = ?", (gw.name,)):
                if not replace:
                    raise AlreadyExists("name", f"gateway {gw.name!r} already exists")
                mode = _MODE_OF_TYPE.get(gw.type)
                used = cur.one("SELECT COUNT(*) FROM profiles WHERE gateway = ?", (gw.name,))[0]
                if used and mode is None:
                    raise InUse("type", f"gateway {gw.name!r} is used by {used} profile(s); a profile's gateway "
                                "must be a CN-GW")
                cur.execute("UPDATE gateways SET address = ?, type = ?, realm = ? WHERE name = ?",
                            (str(gw.address), gw.type.value, gw.realm, gw.name))
                if mode is not None:
                    cur.execute("UPDATE profiles SET gateway_type = ? WHERE gateway = ?", (mode.value, gw.name))
            else:
                cur.execute("INSERT INTO gateways (name, address, type, realm) VALUES (?, ?, ?, ?)",
                            (gw.name, str(gw.address), gw.type.value, gw.realm))
            return gw

        return self._write("name", run)

    def gateway(self, name: str) -> Gateway | None:
        with self._tx() as cur:
            row = cur.one("SELECT name, address, type, realm FROM gateways WHERE name = ?", (name,))
            return _gateway_row(row) if row else None

    def gateways(self) -> list[Gateway]:
        with self._tx() as cur:
            cur.execute("SELECT name, address, type, realm FROM gateways ORDER BY name")
            return [_gateway_row(r) for r in cur.fetchall()]

    def remove_gateway(self, name: str) -> None:
        def run(cur: _Cursor) -> None:
            used = cur.one("SELECT COUNT(*) FROM profiles WHERE gateway = ?", (name,))[0]
            if used:
                raise InUse("gateway", f"gateway {name!r} is used by {used} profile(s)")
            cur.execute("DELETE FROM gateways WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFound("gateway", f"no gateway {name!r}")

        self._write("gateway", run)

    # -- correspondence table (claim 8) --------------------------------------------------------
    def add_route(self, gateway: str, prefix: Any, *, replace: bool = False) -> Route:
        """Record that ``gateway`` accommodates ``prefix`` (a host address means a /32)."""
        net = _network(prefix, "prefix")

        def run(cur: _Cursor) -> Route:
            if not cur.one("SELECT 1 FROM gateways WHERE name = ?", (gateway,)):
                raise NotFound("gateway", f"unknown gateway {gateway!r}")
            owner = cur.one("SELECT gateway FROM correspondence WHERE prefix = ?", (str(net),))
            if owner:
                if not replace and owner[0] != gateway:
                    raise AlreadyExists("prefix", f"{net} is already accommodated by gateway {owner[0]!r}")
                cur.execute("DELETE FROM correspondence WHERE prefix = ?", (str(net),))
            cur.execute("INSERT INTO correspondence (prefix, gateway, net_first, net_last, prefix_len) "
                        "VALUES (?, ?, ?, ?, ?)", (str(net), gateway, int(net.network_address),
                                                   int(net.broadcast_address), net.prefixlen))
            return Route(gateway, net)

        return self._write("prefix", run)

    def routes(self, gateway: str | None = None) -> list[Route]:
        with self._tx() as cur:
            if gateway is None:
                cur.execute("SELECT gateway, prefix FROM correspondence ORDER BY gateway, net_first, prefix_len")
            else:
                cur.execute("SELECT gateway, prefix FROM correspondence WHERE gateway = ? "
                            "ORDER BY net_first, prefix_len", (gateway,))
            return [Route(g, IPv4Network(p)) for g, p in cur.fetchall()]

    def remove_route(self, gateway: str, prefix: Any) -> None:
        net = _network(prefix, "prefix")

        def run(cur: _Cursor) -> None:
            cur.execute("DELETE FROM correspondence WHERE gateway = ? AND prefix = ?", (gateway, str(net)))
            if cur.rowcount == 0:
                raise NotFound("prefix", f"gateway {gateway!r} has no route {net}")

        self._write("prefix", run)

    def gateway_for(self, destination: Any) -> Gateway | None:
        """The gateway accommodating ``destination`` (host or prefix): the longest correspondence
        prefix that contains all of it; ``None`` if no row does."""
        net = _network(destination, "destination")
        with self._tx() as cur:
            return self._gateway_for(cur, net)

    def _gateway_for(self, cur: _Cursor, net: IPv4Network) -> Gateway | None:
        row = cur.one(
            "SELECT g.name, g.address, g.type, g.realm FROM correspondence c JOIN gateways g ON g.name = c.gateway "
            "WHERE c.net_first <= ? AND c.net_last >= ? ORDER BY c.prefix_len DESC, g.name LIMIT 1",
            (int(net.network_address), int(net.broadcast_address)))
        return _gateway_row(row) if row else None

    # -- users ---------------------------------------------------------------------------------
    def add_user(self, nai: str, home_address: Any, home_agent: Any, mn_aaa_spi: int, mn_aaa_secret: Secret, *,
                 mn_ha_spi: int | None = None, mn_ha_key: Secret | None = None, enabled: bool = True,
                 replace: bool = False) -> User:
        if (mn_ha_spi is None) != (mn_ha_key is None):
            raise ValidationError("mn_ha_key" if mn_ha_key is None else "mn_ha_spi",
                                  "MN-HA SPI and key go together: give both or neither")
        user = User(_nai(nai), _address(home_address, "home_address"), _address(home_agent, "home_agent"),
                    _spi(mn_aaa_spi, "mn_aaa_spi"), _secret(mn_aaa_secret, "mn_aaa_secret"),
                    None if mn_ha_spi is None else _spi(mn_ha_spi, "mn_ha_spi"),
                    None if mn_ha_key is None else _secret(mn_ha_key, "mn_ha_key"), bool(enabled))
        values = (str(user.home_address), str(user.home_agent), user.mn_aaa_spi, user.mn_aaa_secret.reveal(),
                  user.mn_ha_spi, None if user.mn_ha_key is None else user.mn_ha_key.reveal(), int(user.enabled))

        def run(cur: _Cursor) -> User:
            if cur.one("SELECT 1 FROM users WHERE nai = ?", (user.nai,)):
                if not replace:
                    raise AlreadyExists("nai", f"user {user.nai!r} already exists")
                cur.execute("UPDATE users SET home_address = ?, home_agent = ?, mn_aaa_spi = ?, mn_aaa_secret = ?, "
                            "mn_ha_spi = ?, mn_ha_key = ?, enabled = ? WHERE nai = ?", (*values, user.nai))
            else:
                cur.execute(f"INSERT INTO users ({_USER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (user.nai, *values))
            return user

        return self._write("nai", run)

    def user_by_nai(self, nai: str) -> User | None:
        with self._tx() as cur:
            row = cur.one(f"SELECT {_USER_COLS} FROM users WHERE nai = ?", (nai,))
            return _user_row(row) if row else None

    def users(self) -> list[User]:
        with self._tx() as cur:
            cur.execute(f"SELECT {_USER_COLS} FROM users ORDER BY nai")
            return [_user_row(r) for r in cur.fetchall()]

    def set_user_enabled(self, nai: str, enabled: bool) -> None:
        def run(cur: _Cursor) -> None:
            cur.execute("UPDATE users SET enabled = ? WHERE nai = ?", (int(bool(enabled)), nai))
            if cur.rowcount == 0:
                raise NotFound("nai", f"no user {nai!r}")

        self._write("nai", run)

    def remove_user(self, nai: str) -> None:
        """Remove a user with their profiles and token."""

        def run(cur: _Cursor) -> None:
            cur.execute("DELETE FROM users WHERE nai = ?", (nai,))
            if cur.rowcount == 0:
                raise NotFound("nai", f"no user {nai!r}")

        self._write("nai", run)

    def mn_aaa_secret(self, nai: str, spi: int) -> Secret | None:
        """The MN-AAA shared secret to verify a registration's MN-AAA authenticator with; ``None``
        if the user is unknown or disabled or ``spi`` is not the user's MN-AAA SPI."""
        user = self.user_by_nai(nai)
        if user is None or not user.enabled or user.mn_aaa_spi != spi:
            return None
        return user.mn_aaa_secret

    # -- VPN profiles --------------------------------------------------------------------------
    def add_profile(self, nai: str, destination: Any, gateway: str | None = None, *,
                    gateway_type: CngwMode | str | None = None, suite: EspSuite | str = EspSuite.AES128GCM16,
                    lifetime: int = DEFAULT_LIFETIME, qos_rate: int | None = None, qos_ceil: int | None = None,
                    qos_priority: int | None = None,
                    distribution: Distribution | str = Distribution.AT_REGISTRATION) -> VpnProfile:
        """Add a profile. Without ``gateway`` the correspondence table picks the gateway for
        ``destination``; without ``gateway_type`` the gateway's own type decides."""
        fields = self._validate_profile(destination=destination, gateway=gateway, gateway_type=gateway_type,
                                        suite=suite, lifetime=lifetime, qos_rate=qos_rate, qos_ceil=qos_ceil,
                                        qos_priority=qos_priority, distribution=distribution)
        nai = _nai(nai)

        def run(cur: _Cursor) -> VpnProfile:
            if not cur.one("SELECT 1 FROM users WHERE nai = ?", (nai,)):
                raise NotFound("nai", f"no user {nai!r}")
            self._resolve_gateway(cur, fields)
            if cur.one("SELECT 1 FROM profiles WHERE nai = ? AND destination = ?", (nai, str(fields["destination"]))):
                raise AlreadyExists("destination", f"user {nai!r} already has a profile for {fields['destination']}")
            row = cur.one(
                "INSERT INTO profiles (nai, destination, gateway, gateway_type, suite, lifetime, qos_rate, qos_ceil, "
                "qos_priority, distribution) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (nai, *self._profile_values(fields)))
            return VpnProfile(int(row[0]), nai, **fields)

        return self._write("destination", run)

    def profiles_for(self, nai: str) -> list[VpnProfile]:
        with self._tx() as cur:
            cur.execute(f"SELECT {_PROFILE_COLS} FROM profiles WHERE nai = ? ORDER BY id", (nai,))
            return [_profile_row(r) for r in cur.fetchall()]

    def profiles(self) -> list[VpnProfile]:
        with self._tx() as cur:
            cur.execute(f"SELECT {_PROFILE_COLS} FROM profiles ORDER BY nai, id")
            return [_profile_row(r) for r in cur.fetchall()]

    def profile(self, nai: str, profile_id: int) -> VpnProfile | None:
        with self._tx() as cur:
            row = cur.one(f"SELECT {_PROFILE_COLS} FROM profiles WHERE nai = ? AND id = ?", (nai, int(profile_id)))
            return _profile_row(row) if row else None

    def update_profile(self, nai: str, profile_id: int, /, **changes: Any) -> VpnProfile:
        """Change some fields of one of ``nai``'s profiles (what a user may do with their token,
        claim 24). Changing ``gateway`` without ``gateway_type`` takes the new gateway's type;
        changing ``destination`` without ``gateway`` keeps the gateway. Set ``qos_rate=None`` to
        drop QoS."""
        allowed = {"destination", "gateway", "gateway_type", "suite", "lifetime", "qos_rate", "qos_ceil",
                   "qos_priority", "distribution"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValidationError(unknown[0], f"not a profile field (one of: {', '.join(sorted(allowed))})")

        def run(cur: _Cursor) -> VpnProfile:
            row = cur.one(f"SELECT {_PROFILE_COLS} FROM profiles WHERE nai = ? AND id = ?", (nai, int(profile_id)))
            if not row:
                raise NotFound("profile", f"user {nai!r} has no profile {profile_id}")
            old = _profile_row(row)
            merged = {k: getattr(old, k) for k in allowed}
            if "gateway" in changes and "gateway_type" not in changes:
                merged["gateway_type"] = None
            if "qos_rate" in changes and changes["qos_rate"] is None:
                merged.update(qos_ceil=None, qos_priority=None)
            merged.update(changes)
            fields = self._validate_profile(**merged)
            self._resolve_gateway(cur, fields)
            dest = str(fields["destination"])
            if cur.one("SELECT 1 FROM profiles WHERE nai = ? AND destination = ? AND id <> ?",
                       (nai, dest, old.id)):
                raise AlreadyExists("destination", f"user {nai!r} already has a profile for {dest}")
            cur.execute("UPDATE profiles SET destination = ?, gateway = ?, gateway_type = ?, suite = ?, lifetime = ?, "
                        "qos_rate = ?, qos_ceil = ?, qos_priority = ?, distribution = ? WHERE id = ?",
                        (*self._profile_values(fields), old.id))
            return VpnProfile(old.id, nai, **fields)

        return self._write("destination", run)

    def remove_profile(self, nai: str, profile_id: int) -> None:
        def run(cur: _Cursor) -> None:
            cur.execute("DELETE FROM profiles WHERE nai = ? AND id = ?", (nai, int(profile_id)))
            if cur.rowcount == 0:
                raise NotFound("profile", f"user {nai!r} has no profile {profile_id}")

        self._write("profile", run)

    @staticmethod
    def _validate_profile(*, destination: Any, gateway: Any, gateway_type: Any, suite: Any, lifetime: Any,
                          qos_rate: Any, qos_ceil: Any, qos_priority: Any, distribution: Any) -> dict[str, Any]:
        rate, ceil, prio = _qos(qos_rate, qos_ceil, qos_priority)
        return {
            "destination": _network(destination, "destination"),
            "gateway": None if gateway is None else _name(gateway, "gateway"),
            "gateway_type": None if gateway_type is None else _enum(CngwMode, gateway_type, "gateway_type"),
            "suite": _enum(EspSuite, suite, "suite"),
            "lifetime": _int_range(lifetime, "lifetime", 1, MAX_LIFETIME),
            "qos_rate": rate, "qos_ceil": ceil, "qos_priority": prio,
            "distribution": _enum(Distribution, distribution, "distribution"),
        }

    def _resolve_gateway(self, cur: _Cursor, fields: dict[str, Any]) -> None:
        """Fill in / check the gateway and its type (in place)."""
        if fields["gateway"] is None:
            gw = self._gateway_for(cur, fields["destination"])
            if gw is None:
                raise NotFound("gateway", f"no gateway accommodates {fields['destination']}: add a route "
                               "(correspondence) or name the gateway")
        else:
            row = cur.one("SELECT name, address, type, realm FROM gateways WHERE name = ?", (fields["gateway"],))
            if not row:
                raise NotFound("gateway", f"unknown gateway {fields['gateway']!r}")
            gw = _gateway_row(row)
        mode = _MODE_OF_TYPE.get(gw.type)
        if mode is None:
            raise ValidationError("gateway", f"gateway {gw.name!r} is of type {gw.type.value}; a profile's gateway "
                                  "must be a CN-GW (cngw-static or cngw-dynamic)")
        if fields["gateway_type"] is not None and fields["gateway_type"] is not mode:
            raise ValidationError("gateway_type", f"{fields['gateway_type'].value} does not match gateway "
                                  f"{gw.name!r}, which is {mode.value}")
        fields["gateway"], fields["gateway_type"] = gw.name, mode

    @staticmethod
    def _profile_values(f: dict[str, Any]) -> tuple[Any, ...]:
        return (str(f["destination"]), f["gateway"], f["gateway_type"].value, f["suite"].value, f["lifetime"],
                f["qos_rate"], f["qos_ceil"], f["qos_priority"], f["distribution"].value)

    # -- API tokens (claim 24) -----------------------------------------------------------------
    def issue_token(self, nai: str) -> str:
        """A fresh API token for ``nai``, returned once and stored only as a salted scrypt hash;
        it replaces any earlier token."""
        token = _new_token(nai)
        record = _token_record(token)

        def run(cur: _Cursor) -> str:
            if not cur.one("SELECT 1 FROM users WHERE nai = ?", (nai,)):
                raise NotFound("nai", f"no user {nai!r}")
            cur.execute("DELETE FROM user_tokens WHERE nai = ?", (nai,))
            cur.execute("INSERT INTO user_tokens (nai, token_hash, issued_at) VALUES (?, ?, ?)",
                        (nai, record, _now()))
            return token

        return self._write("nai", run)

    def revoke_token(self, nai: str) -> bool:
        def run(cur: _Cursor) -> bool:
            cur.execute("DELETE FROM user_tokens WHERE nai = ?", (nai,))
            return cur.rowcount > 0

        return self._write("nai", run)

    def has_token(self, nai: str) -> bool:
        with self._tx() as cur:
            return cur.one("SELECT 1 FROM user_tokens WHERE nai = ?", (nai,)) is not None

    def authenticate_token(self, token: str) -> str | None:
        """The NAI whose current token ``token`` is (user enabled), or ``None``. The token names
        its owner (:func:`token_owner`), so one hash is checked, not every user's."""
        owner = token_owner(token)
        return owner if owner is not None and self.verify_token(owner, token) else None

    def verify_token(self, nai: str, token: str) -> bool:
        """True if ``token`` is the current token of the enabled user ``nai``."""
        with self._tx() as cur:
            row = cur.one("SELECT t.token_hash, u.enabled FROM user_tokens t JOIN users u ON u.nai = t.nai "
                          "WHERE t.nai = ?", (nai,))
        ok = _token_matches(str(token), row[0] if row else None)
        return ok and bool(row and row[1])

    # -- seeding -------------------------------------------------------------------------------
    def seed_from_topology(self, topology: Topology, secrets_by_nai: Mapping[str, Secret | bytes], *,
                           mn_aaa_spi: int = DEFAULT_MN_AAA_SPI,
                           mn_ha: Mapping[str, tuple[int, Secret]] | None = None,
                           cngw_type: GatewayType | str = GatewayType.CNGW_STATIC,
                           suite: EspSuite | str = EspSuite.AES128GCM16,
                           lifetime: int = DEFAULT_LIFETIME) -> None:
        """Fill the database from a lab topology (idempotent: existing rows are updated).

        * realms from ``topology.domains`` (the ``aaa`` node is the home AAA if its role is
          ``aaah``, the local AAA if ``aaaf``);
        * gateways from the nodes with role ``fa``, ``ha`` and ``cngw``: an HA at its home-link
          (segment) address, the others at the address of their upstream link; CN-GWs get
          ``cngw_type``;
        * the correspondence table: every CN-GW accommodates ``topology.prefixes_behind(node)``;
        * users from ``topology.users`` with the MN-AAA secret from ``secrets_by_nai`` (and the
          MN-HA SPI + key from ``mn_ha`` if given); the home agent is its gateway address;
        * one default profile per user and prefix behind each CN-GW: that gateway, its type,
          ``suite``, ``lifetime``, no QoS, distributed at registration.
        """
        cngw_type = _enum(GatewayType, cngw_type, "cngw_type")
        if cngw_type not in _MODE_OF_TYPE:
            raise ValidationError("cngw_type", "must be cngw-static or cngw-dynamic")
        missing = [u.nai for u in topology.users if u.nai not in secrets_by_nai]
        if missing:
            raise ValidationError("secrets_by_nai", f"no MN-AAA secret for {', '.join(missing)}")
        kinds = {"fa": GatewayType.FA, "ha": GatewayType.HA, "cngw": cngw_type}

        for dname, spec in topology.domains.items():
            aaa = spec.get("aaa")
            role = topology.nodes[aaa].role if aaa in topology.nodes else None
            self.add_realm(dname, home_aaa=aaa if role == "aaah" else None,
                           local_aaa=aaa if role == "aaaf" else None, replace=True)
        addresses: dict[str, IPv4Address] = {}
        for node in topology.nodes.values():
            if node.role not in kinds:
                continue
            addresses[node.name] = _node_address(topology, node.name)
            self.add_gateway(node.name, addresses[node.name], kinds[node.role], node.domain, replace=True)
        cngws = [n.name for n in topology.nodes.values() if n.role == "cngw"]
        for gw in cngws:
            for prefix in topology.prefixes_behind(gw):
                self.add_route(gw, prefix, replace=True)
        for user in topology.users:
            ha_spi, ha_key = (mn_ha or {}).get(user.nai, (None, None))
            home_agent = addresses.get(user.home_agent) or _node_address(topology, user.home_agent)
            secret = _secret(secrets_by_nai[user.nai], "secrets_by_nai")
            self.add_user(user.nai, user.home_address, home_agent, mn_aaa_spi, secret,
                          mn_ha_spi=ha_spi, mn_ha_key=ha_key, replace=True)
            existing = {p.destination for p in self.profiles_for(user.nai)}
            for gw in cngws:
                for prefix in topology.prefixes_behind(gw):
                    if prefix not in existing:
                        self.add_profile(user.nai, prefix, gw, suite=suite, lifetime=lifetime)

    # -- asyncio -------------------------------------------------------------------------------
    @property
    def aio(self) -> AsyncVpnDatabase:
        return AsyncVpnDatabase(self)


def _node_address(topology: Topology, node: str) -> IPv4Address:
    """A gateway's address: an HA's home-link address, otherwise its upstream link address
    (or its first address if it has no upstream link)."""
    if topology.nodes[node].role == "ha":
        seg = topology.segment_of(node)
        if seg is not None:
            return seg.address
    up = topology.nodes[node].upstream
    link = topology.link_between(node, up) if up else None
    if link is not None:
        return link.address_of(node)
    addrs = topology.addresses(node)
    if not addrs:
        raise ValidationError("topology", f"node {node!r} has no address")
    return addrs[0][1].ip


class AsyncVpnDatabase:
    """The asyncio view of a :class:`VpnDatabase`: the same calls, each run in a worker thread."""

    def __init__(self, db: VpnDatabase) -> None:
        self.db = db

    async def run(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def user_by_nai(self, nai: str) -> User | None:
        return await asyncio.to_thread(self.db.user_by_nai, nai)

    async def mn_aaa_secret(self, nai: str, spi: int) -> Secret | None:
        return await asyncio.to_thread(self.db.mn_aaa_secret, nai, spi)

    async def profiles_for(self, nai: str) -> list[VpnProfile]:
        return await asyncio.to_thread(self.db.profiles_for, nai)

    async def gateway(self, name: str) -> Gateway | None:
        return await asyncio.to_thread(self.db.gateway, name)

    async def gateway_for(self, destination: Any) -> Gateway | None:
        return await asyncio.to_thread(self.db.gateway_for, destination)

    async def realm(self, name: str) -> Realm | None:
        return await asyncio.to_thread(self.db.realm, name)

    async def verify_token(self, nai: str, token: str) -> bool:
        return await asyncio.to_thread(self.db.verify_token, nai, token)

    async def authenticate_token(self, token: str) -> str | None:
        return await asyncio.to_thread(self.db.authenticate_token, token)

    async def profile(self, nai: str, profile_id: int) -> VpnProfile | None:
        return await asyncio.to_thread(self.db.profile, nai, profile_id)

    async def add_profile(self, nai: str, destination: Any, gateway: str | None = None, /,
                          **fields: Any) -> VpnProfile:
        return await asyncio.to_thread(self.db.add_profile, nai, destination, gateway, **fields)

    async def update_profile(self, nai: str, profile_id: int, /, **changes: Any) -> VpnProfile:
        return await asyncio.to_thread(self.db.update_profile, nai, profile_id, **changes)

    async def remove_profile(self, nai: str, profile_id: int) -> None:
        await asyncio.to_thread(self.db.remove_profile, nai, profile_id)

    async def close(self) -> None:
        await asyncio.to_thread(self.db.close)


# ---- implementations -----------------------------------------------------------------------


class _Cursor:
    """A DB-API cursor that takes ``?`` placeholders on every dialect."""

    def __init__(self, cur: Any, translate: Any) -> None:
        self._cur, self._translate = cur, translate

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cur.execute(self._translate(sql), tuple(params))

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row or None (reads all rows: a statement left open would block COMMIT)."""
        self.execute(sql, params)
        rows = self._cur.fetchall()
        return rows[0] if rows else None

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    def close(self) -> None:
        self._cur.close()


class SqliteVpnDatabase(VpnDatabase):
    """SQLite: a file (created mode 0600: it holds secrets), or ``:memory:``."""

    _id_column = "INTEGER PRIMARY KEY AUTOINCREMENT"
    _blob_type = "BLOB"

    def __init__(self, url: str, path: str, create: bool = True) -> None:
        super().__init__(url)
        self.path, self.create = path, create

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            p = Path(self.path)
            if not p.exists():
                if not self.create:
                    raise VpnDbError("url", f"{p} does not exist: run `mipvpn db init`")
                try:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
                except OSError as exc:
                    raise VpnDbError("url", f"cannot create {p}: {exc.strerror}") from None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            conn.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as exc:
            raise VpnDbError("url", f"cannot open {self.path}: {exc}") from None
        return conn

    def _begin(self, conn: sqlite3.Connection, write: bool) -> None:
        # Writers take the write lock up front (no deadlock-prone lock upgrade later).
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _is_integrity_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def _has_table(self, cur: _Cursor, name: str) -> bool:
        return cur.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) is not None


class PostgresVpnDatabase(VpnDatabase):
    """PostgreSQL through psycopg 3 (one connection, serialised; reconnects when broken)."""

    _id_column = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    _blob_type = "BYTEA"

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise VpnDbError("url", "PostgreSQL needs the psycopg package (pip install 'psycopg[binary]')") from None
        try:
            return psycopg.connect(self.url, autocommit=False, connect_timeout=10)
        except psycopg.Error as exc:
            raise VpnDbError("url", f"cannot connect to {self.safe_url}: {_first_line(exc)}") from None

    def _begin(self, conn: Any, write: bool) -> None:
        pass  # psycopg opens a transaction with the first statement

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _lock_schema(self, cur: _Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(?)", (0x6D697076,))  # "mipv"

    def _is_integrity_error(self, exc: BaseException) -> bool:
        try:
            import psycopg
        except ImportError:
            return False
        return isinstance(exc, psycopg.IntegrityError)

    def _has_table(self, cur: _Cursor, name: str) -> bool:
        return cur.one("SELECT to_regclass(?)", (name,))[0] is not None


def open_database(url: str | os.PathLike[str] | None = None, *, create: bool = False) -> VpnDatabase:
    """Open the database at ``url``: ``postgresql://...`` (or ``postgres://``), ``sqlite:///path``
    (``sqlite:////abs/path`` for an absolute one, ``sqlite://`` for in-memory) or a plain file
    path. Default: ``$MIPVPN_DB_URL`` or :data:`DEFAULT_URL`. With ``create`` the schema is
    created or migrated; otherwise it must already be current."""
    text = os.fspath(url) if url is not None else os.environ.get(URL_ENV, DEFAULT_URL)
    if not text:
        raise VpnDbError("url", "empty database URL")
    db: VpnDatabase
    if text.startswith(("postgresql://", "postgres://")):
        db = PostgresVpnDatabase(text)
    elif text.startswith("sqlite:"):
        if text in ("sqlite://", "sqlite:///:memory:"):
            path = ":memory:"
        elif text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
            path = text[len("sqlite:///"):]
        else:
            raise VpnDbError("url", f"malformed SQLite URL {text!r} (sqlite:///relative or sqlite:////absolute)")
        db = SqliteVpnDatabase(text, path, create)
    elif "://" in text:
        raise VpnDbError("url", f"unsupported database URL scheme in {_redact_url(text)!r} "
                         "(postgresql://, sqlite:/// or a file path)")
    else:
        db = SqliteVpnDatabase(text, text, create)
    try:
        if create:
            db.create_schema()
        else:
            db.check_schema()
    except BaseException:
        db.close()
        raise
    return db


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}{at}{host}"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
