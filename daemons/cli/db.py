"""`mipvpn db`: the home AAA server's VPN database (users, gateways, correspondence, profiles).

Every command takes ``--url`` (default ``$MIPVPN_DB_URL``, else ``sqlite:////var/lib/mipvpn/vpn.db``).
Listings show SPIs, never secrets; errors name the field and exit non-zero.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from daemons.runtime.secret import Secret
from daemons.store.vpndb import (
    DEFAULT_MN_AAA_SPI,
    DEFAULT_URL,
    URL_ENV,
    CngwMode,
    Distribution,
    GatewayType,
    VpnDatabase,
    VpnDbError,
    open_database,
)
from daemons.vpn.path import EspSuite


def url_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--url", envvar=URL_ENV, default=DEFAULT_URL, show_default=True, show_envvar=True,
                        help="Database URL: sqlite:///PATH, sqlite:////ABS/PATH, a file path, or postgresql://...")(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)


@contextmanager
def _db(url: str, create: bool = False) -> Iterator[VpnDatabase]:
    try:
        db = open_database(url, create=create)
    except VpnDbError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield db
    except VpnDbError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        db.close()


def table(rows: list[dict[str, Any]], empty: str) -> str:
    if not rows:
        return empty
    cols = list(rows[0])
    cell = {c: [("-" if r.get(c) is None else str(r.get(c))) for r in rows] for c in cols}
    widths = {c: max(len(c), *(len(v) for v in cell[c])) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(cell[c][i].ljust(widths[c]) for c in cols).rstrip() for i in range(len(rows))]
    return "\n".join(lines)


def _emit(rows: list[dict[str, Any]], as_json: bool, empty: str) -> None:
    click.echo(json.dumps(rows, indent=2) if as_json else table(rows, empty))


def _read_secret(path: Path, option: str) -> Secret:
    """A secret from a file holding it as hex (whitespace ignored); the value is never echoed."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.ClickException(f"{option}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise click.ClickException(f"{option}: {path} is not a hex text file (value withheld)") from None
    try:
        return Secret.from_hex("".join(text.split()))
    except ValueError:
        raise click.ClickException(f"{option}: {path} does not hold a hex string (value withheld)") from None


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit|bps|b/s)?\s*$", re.IGNORECASE)


class RateType(click.ParamType):
    """A rate in bit/s: ``1000000``, ``10M``, ``1.5G``, ``512kbit``."""

    name = "RATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = _RATE.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a rate in bit/s (e.g. 1000000, 10M, 1.5G)", param, ctx)
        rate = int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()])
        if rate <= 0:
            self.fail("must be positive", param, ctx)
        return rate


RATE = RateType()


@click.group("db")
def db_group() -> None:
    """The VPN database of the home AAA server: users, gateways, correspondence, VPN profiles."""


@db_group.command("init")
@url_option
def db_init(url: str) -> None:
    """Create (or migrate) the schema; idempotent. SQLite files are created mode 0600."""
    with _db(url, create=True) as db:
        click.echo(f"{db.safe_url}: schema version {db.schema_version()}")


# ---- realms --------------------------------------------------------------------------------


@db_group.group("realm")
def realm_group() -> None:
    """Realms (NAI domains) and their AAA servers."""


@realm_group.command("add")
@click.argument("name")
@click.option("--home-aaa", help="Host name of the realm's home AAA server.")
@click.option("--local-aaa", help="Host name of the realm's local (foreign) AAA server.")
@url_option
def realm_add(name: str, home_aaa: str | None, local_aaa: str | None, url: str) -> None:
    with _db(url) as db:
        db.add_realm(name, home_aaa, local_aaa)
    click.echo(f"realm {name} added")


@realm_group.command("list")
@json_option
@url_option
def realm_list(as_json: bool, url: str) -> None:
    with _db(url) as db:
        rows = [{"name": r.name, "home_aaa": r.home_aaa, "local_aaa": r.local_aaa} for r in db.realms()]
    _emit(rows, as_json, "no realms")


@realm_group.command("remove")
@click.argument("name")
@url_option
def realm_remove(name: str, url: str) -> None:
    with _db(url) as db:
        db.remove_realm(name)
    click.echo(f"realm {name} removed")


# ---- users ---------------------------------------------------------------------------------


@db_group.group("user")
def user_group() -> None:
    """Users: NAI, home address, home agent, MN-AAA (and MN-HA) security associations."""


@user_group.command("add")
@click.argument("nai")
@click.option("--home-address", required=True, help="The MN's home address.")
@click.option("--home-agent", required=True, help="The home agent's address.")
@click.option("--mn-aaa-spi", type=int, default=DEFAULT_MN_AAA_SPI, show_default=True, help="MN-AAA SPI.")
@click.option("--mn-aaa-secret-file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="File holding the MN-AAA shared secret as hex (at least 16 bytes).")
@click.option("--mn-ha-spi", type=int, help="MN-HA SPI (optional; with --mn-ha-key-file).")
@click.option("--mn-ha-key-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File holding the MN-HA key as hex.")
@click.option("--disabled", is_flag=True, help="Add the user disabled.")
@click.option("--replace", is_flag=True, help="Overwrite an existing user of that NAI.")
@url_option
def user_add(nai: str, home_address: str, home_agent: str, mn_aaa_spi: int, mn_aaa_secret_file: Path,
             mn_ha_spi: int | None, mn_ha_key_file: Path | None, disabled: bool, replace: bool, url: str) -> None:
    """Add a user. Secrets are read from files, never from the command line."""
    secret = _read_secret(mn_aaa_secret_file, "mn-aaa-secret-file")
    ha_key = _read_secret(mn_ha_key_file, "mn-ha-key-file") if mn_ha_key_file else None
    with _db(url) as db:
        user = db.add_user(nai, home_address, home_agent, mn_aaa_spi, secret, mn_ha_spi=mn_ha_spi,
                           mn_ha_key=ha_key, enabled=not disabled, replace=replace)
    click.echo(f"user {user.nai} added (MN-AAA SPI {user.mn_aaa_spi})")


@user_group.command("list")
@json_option
@url_option
def user_list(as_json: bool, url: str) -> None:
    """List users with their SPIs (never their secrets)."""
    with _db(url) as db:
        rows = [{**u.summary(), "token": db.has_token(u.nai)} for u in db.users()]
    _emit(rows, as_json, "no users")


@user_group.command("remove")
@click.argument("nai")
@url_option
def user_remove(nai: str, url: str) -> None:
    """Remove a user with their profiles and token."""
    with _db(url) as db:
        db.remove_user(nai)
    click.echo(f"user {nai} removed")


@user_group.command("enable")
@click.argument("nai")
@url_option
def user_enable(nai: str, url: str) -> None:
    with _db(url) as db:
        db.set_user_enabled(nai, True)
    click.echo(f"user {nai} enabled")


@user_group.command("disable")
@click.argument("nai")
@url_option
def user_disable(nai: str, url: str) -> None:
    """Disable a user: registrations fail MN-AAA authentication, the token stops working."""
    with _db(url) as db:
        db.set_user_enabled(nai, False)
    click.echo(f"user {nai} disabled")


# ---- gateways ------------------------------------------------------------------------------

GATEWAY_TYPES = [t.value for t in GatewayType]


@db_group.group("gateway")
def gateway_group() -> None:
    """Gateways (network apparatuses): FA, HA, static or dynamic CN-GW."""


@gateway_group.command("add")
@click.argument("name")
@click.option("--address", required=True, help="The gateway's (outer) IPv4 address.")
@click.option("--type", "gtype", type=click.Choice(GATEWAY_TYPES), required=True)
@click.option("--realm", help="The realm the gateway belongs to (must exist).")
@click.option("--replace", is_flag=True, help="Overwrite an existing gateway of that name.")
@url_option
def gateway_add(name: str, address: str, gtype: str, realm: str | None, replace: bool, url: str) -> None:
    with _db(url) as db:
        gw = db.add_gateway(name, address, gtype, realm, replace=replace)
    click.echo(f"gateway {gw.name} added ({gw.type.value} at {gw.address})")


@gateway_group.command("list")
@json_option
@url_option
def gateway_list(as_json: bool, url: str) -> None:
    with _db(url) as db:
        routes: dict[str, list[str]] = {}
        for r in db.routes():
            routes.setdefault(r.gateway, []).append(str(r.prefix))
        rows = [{"name": g.name, "address": str(g.address), "type": g.type.value, "realm": g.realm,
                 "accommodates": routes.get(g.name, []) if as_json else ",".join(routes.get(g.name, [])) or None}
                for g in db.gateways()]
    _emit(rows, as_json, "no gateways")


@gateway_group.command("remove")
@click.argument("name")
@url_option
def gateway_remove(name: str, url: str) -> None:
    """Remove a gateway and its correspondence rows (refused while a profile uses it)."""
    with _db(url) as db:
        db.remove_gateway(name)
    click.echo(f"gateway {name} removed")


# ---- correspondence ------------------------------------------------------------------------


@db_group.group("route")
def route_group() -> None:
    """The correspondence table: which gateway accommodates which host or prefix (claim 8)."""


@route_group.command("add")
@click.argument("gateway")
@click.argument("prefix")
@url_option
def route_add(gateway: str, prefix: str, url: str) -> None:
    """GATEWAY accommodates PREFIX (a host address means a /32)."""
    with _db(url) as db:
        route = db.add_route(gateway, prefix)
    click.echo(f"{route.prefix} via gateway {route.gateway}")


@route_group.command("list")
@click.option("--gateway", help="Only this gateway's rows.")
@json_option
@url_option
def route_list(gateway: str | None, as_json: bool, url: str) -> None:
    with _db(url) as db:
        rows = [{"prefix": str(r.prefix), "gateway": r.gateway} for r in db.routes(gateway)]
    _emit(rows, as_json, "no routes")


@route_group.command("remove")
@click.argument("gateway")
@click.argument("prefix")
@url_option
def route_remove(gateway: str, prefix: str, url: str) -> None:
    with _db(url) as db:
        db.remove_route(gateway, prefix)
    click.echo(f"{prefix} removed from gateway {gateway}")


@route_group.command("lookup")
@click.argument("destination")
@url_option
def route_lookup(destination: str, url: str) -> None:
    """Which gateway accommodates DESTINATION (longest-prefix match)."""
    with _db(url) as db:
        gw = db.gateway_for(destination)
    if gw is None:
        raise click.ClickException(f"destination: no gateway accommodates {destination}")
    click.echo(f"{destination} via gateway {gw.name} ({gw.type.value} at {gw.address})")


# ---- profiles ------------------------------------------------------------------------------


def profile_options(defaults: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The profile fields as options; without ``defaults`` an option left out means "unchanged"."""

    def d(value: Any) -> Any:
        return value if defaults else None

    options = [
        click.option("--gateway", help="The CN-GW in front of the destination (default: from the correspondence "
                     "table)."),
        click.option("--gateway-type", type=click.Choice([m.value for m in CngwMode]),
                     help="static or dynamic (default: the gateway's own type)."),
        click.option("--suite", type=click.Choice([s.value for s in EspSuite]), default=d(EspSuite.AES128GCM16.value),
                     show_default=defaults, help="ESP suite."),
        click.option("--lifetime", type=int, default=d(3600), show_default=defaults, help="SA lifetime in seconds."),
        click.option("--qos-rate", type=RATE, help="Guaranteed rate in bit/s (10M, 1.5G ...)."),
        click.option("--qos-ceil", type=RATE, help="Ceiling in bit/s (default: the rate)."),
        click.option("--qos-priority", type=int, help="HTB priority 0 (highest) .. 7."),
        click.option("--distribution", type=click.Choice([m.value for m in Distribution]),
                     default=d(Distribution.AT_REGISTRATION.value), show_default=defaults,
                     help="Distribute the path at registration (claim 4) or on traffic (claim 5)."),
    ]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def profile_changes(destination: str | None, no_qos: bool, opts: dict[str, Any]) -> dict[str, Any]:
    """The fields a `profile set`/`update` asked to change (the options given), for the
    database or the profile API alike."""
    changes = {k: v for k, v in opts.items() if v is not None}
    if destination is not None:
        changes["destination"] = destination
    if no_qos:
        changes["qos_rate"] = None
    if not changes:
        raise click.UsageError("nothing to change")
    return changes


def profile_row(s: dict[str, Any], with_nai: bool = True) -> dict[str, Any]:
    """A profile's table row from its summary (``VpnProfile.summary()``, or the profile API's
    JSON, which is the same; a user's own listing leaves the NAI out)."""
    qos = None
    if s.get("qos_rate") is not None:
        prio = 4 if s.get("qos_priority") is None else s["qos_priority"]
        qos = f"{s['qos_rate']}/{s.get('qos_ceil') or s['qos_rate']} prio {prio}"
    return {"id": s["id"], **({"nai": s["nai"]} if with_nai else {}), "destination": s["destination"],
            "gateway": s["gateway"], "type": s["gateway_type"], "suite": s["suite"], "lifetime": s["lifetime"],
            "qos": qos, "distribution": s["distribution"]}


@db_group.group("profile")
def profile_group() -> None:
    """VPN profiles: per user and destination, the gateway, security service and QoS."""


@profile_group.command("add")
@click.argument("nai")
@click.argument("destination")
@profile_options(defaults=True)
@url_option
def profile_add(nai: str, destination: str, url: str, **opts: Any) -> None:
    """Add a profile for NAI towards DESTINATION (host or prefix)."""
    with _db(url) as db:
        p = db.add_profile(nai, destination, **opts)
    click.echo(f"profile {p.id} added: {p.nai} -> {p.destination} via {p.gateway} ({p.gateway_type.value})")



@profile_group.command("update")
@click.argument("nai")
@click.argument("profile_id", type=int)
@click.option("--destination", help="New destination host or prefix.")
@click.option("--no-qos", is_flag=True, help="Drop the QoS.")
@profile_options(defaults=False)
@url_option
def profile_update(nai: str, profile_id: int, destination: str | None, no_qos: bool, url: str,
                   **opts: Any) -> None:
    """Change fields of profile PROFILE_ID of NAI (only the options given)."""
    changes = profile_changes(destination, no_qos, opts)
    with _db(url) as db:
        p = db.update_profile(nai, profile_id, **changes)
    click.echo(f"profile {p.id} updated: {p.nai} -> {p.destination} via {p.gateway} ({p.gateway_type.value})")



@profile_group.command("list")
@click.argument("nai", required=False)
@json_option
@url_option
def profile_list(nai: str | None, as_json: bool, url: str) -> None:
    """List the profiles (of NAI, or everyone's)."""
    with _db(url) as db:
        profiles = db.profiles_for(nai) if nai else db.profiles()
    rows = [p.summary() for p in profiles] if as_json else [profile_row(p.summary()) for p in profiles]
    _emit(rows, as_json, "no profiles")


@profile_group.command("remove")
@click.argument("nai")
@click.argument("profile_id", type=int)
@url_option
def profile_remove(nai: str, profile_id: int, url: str) -> None:
    with _db(url) as db:
        db.remove_profile(nai, profile_id)
    click.echo(f"profile {profile_id} of {nai} removed")


# ---- tokens --------------------------------------------------------------------------------


@db_group.group("token")
def token_group() -> None:
    """The user's API token for changing their own profiles (claim 24)."""


@token_group.command("issue")
@click.argument("nai")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the token to FILE (mode 0600) instead of printing it (keeps it out of terminal "
                   "scrollback and logs); the user passes it to `mipvpn profile --token-file FILE`.")
@url_option
def token_issue(nai: str, out: Path | None, url: str) -> None:
    """Issue a new token for NAI (replacing any earlier one): print it once, or write it to --out FILE."""
    fd = None
    if out is not None:  # opened before the token is issued: a file we cannot write loses no token
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, 0o600)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            raise click.BadParameter(f"cannot write {out}: {exc.strerror}", param_hint="--out") from None
    try:
        with _db(url) as db:
            token = db.issue_token(nai)
        if fd is None:
            click.echo(token)
        else:  # emptied only now: a failed issue leaves an earlier file as it was
            os.ftruncate(fd, 0)
            os.write(fd, f"{token}\n".encode())
    finally:
        if fd is not None:
            os.close(fd)
    if out is not None:
        click.echo(f"token of {nai} written to {out} (mode 0600)")


@token_group.command("revoke")
@click.argument("nai")
@url_option
def token_revoke(nai: str, url: str) -> None:
    with _db(url) as db:
        had = db.revoke_token(nai)
    click.echo(f"token of {nai} revoked" if had else f"{nai} had no token")
