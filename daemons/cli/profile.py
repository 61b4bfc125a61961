"""`mipvpn profile ...`: a user's own VPN profiles through the AAAH's profile API (claim 24, F7),
and `mipvpn mn service-update`: tell a mobile node to make its changed profile take effect.

    mipvpn profile --api https://198.18.0.6:8443 --token-file ~/.mipvpn-token list
    MIPVPN_TOKEN=... mipvpn profile set 1 --gateway cngw2   # or the token from the environment
    mipvpn mn service-update --node mn1  # the MN re-registers with the service-update NVSE

HTTPS only: the server's certificate is verified against ``--ca FILE`` (``$MIPVPN_CA``), by
default the lab's CA (``RUN_DIR/pki/ca.pem``) when a lab runs here, else the system's trust
store; verification is never turned off and an ``http://`` URL is refused. The token (from
the operator: ``mipvpn db token issue NAI --out FILE``) comes from ``--token-file FILE``
(``$MIPVPN_TOKEN_FILE``; readable by its owner only) or ``$MIPVPN_TOKEN``, never from a
command-line argument (other users see those in the process list). The user is the token's
owner unless ``--user`` names another (the API then answers 403). Errors print the API's
message (which names the field) and exit non-zero; the token is never printed.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import click

from daemons.cli.db import profile_changes, profile_options, profile_row, table
from daemons.provision.configs import control_socket, lab_ca_file
from daemons.runtime import control
from daemons.store.vpndb import token_owner
from lab.lab import DEFAULT_RUN_DIR

API_ENV, TOKEN_ENV, TOKEN_FILE_ENV, CA_ENV = "MIPVPN_API", "MIPVPN_TOKEN", "MIPVPN_TOKEN_FILE", "MIPVPN_CA"
DEFAULT_API = "https://127.0.0.1:8443"


def read_token(token_file: Path | None) -> str | None:
    """The API token: from ``token_file`` (a regular file must be readable by its owner only),
    else from ``$MIPVPN_TOKEN``; None if neither gives one."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        mode = os.stat(token_file).st_mode
        if stat.S_ISREG(mode) and stat.S_IMODE(mode) & 0o077:
            raise click.BadParameter(f"{token_file} has mode {stat.S_IMODE(mode):04o}: a token file must be "
                                     f"readable by its owner only (chmod 600)", param_hint="--token-file")
        text = token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {token_file}: {getattr(exc, 'strerror', None) or 'not text'}",
                                 param_hint="--token-file") from None
    if not text:
        raise click.BadParameter(f"{token_file} is empty", param_hint="--token-file")
    return text


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the server (certificate chain and host name, always) against ``ca_file``, else
    the lab's CA when a lab runs here, else the system's trust store; TLS 1.2 or later."""
    if ca_file is None:
        lab = lab_ca_file(Path(os.environ.get("MIPVPN_RUN_DIR", DEFAULT_RUN_DIR)))
        ca_file = lab if lab.is_file() else None
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise click.BadParameter(f"cannot load CA certificates from {ca_file}: {exc}", param_hint="--ca") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ApiClient:
    def __init__(self, api: str, token: str | None, user: str | None, tls: ssl.SSLContext,
                 timeout: float = 15.0) -> None:
        if urlsplit(api).scheme != "https":
            raise click.BadParameter(f"{api!r}: must be an https:// URL (the token never travels in clear)",
                                     param_hint="--api")
        self.api = api.rstrip("/")
        self._token = token
        self._user = user
        self.tls = tls
        self.timeout = timeout

    @property
    def token(self) -> str:
        if not self._token:
            raise click.UsageError(f"no API token: set {TOKEN_ENV} or give --token-file FILE "
                                   f"(a token is never taken from the command line)")
        return self._token

    @property
    def user(self) -> str:
        user = self._user or token_owner(self.token)
        if not user:
            raise click.UsageError("cannot tell the user from this token: give --user NAI")
        return user

    def profiles_url(self, profile_id: int | None = None) -> str:
        url = f"/v1/users/{quote(self.user, safe='@')}/profiles"
        return url if profile_id is None else f"{url}/{profile_id}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json",
                                              **({"Content-Type": "application/json"} if data else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.tls) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise click.ClickException(_api_error(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise click.ClickException(
                    f"the profile API at {self.api} failed certificate verification ({reason.verify_message}): "
                    f"--ca FILE names the CA that signed its certificate") from None
            raise click.ClickException(f"cannot reach the profile API at {self.api}: {reason}") from None
        return json.loads(raw) if raw else None


def _api_error(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    message = body.get("message") or exc.reason
    kind = body.get("error", "error")
    return f"{exc.code} {kind}: {message}"


def _show(p: dict[str, Any], as_json: bool, verb: str = "") -> None:
    if as_json:
        click.echo(json.dumps(p, indent=2))
    else:
        click.echo(f"{verb}profile {p['id']}: {p['nai']} -> {p['destination']} via {p['gateway']} "
                   f"({p['gateway_type']}), {p['suite']}, lifetime {p['lifetime']}s"
                   + (f", QoS {profile_row(p, with_nai=False)['qos']}" if p.get("qos_rate") is not None else ""))


@click.group("profile")
@click.option("--api", envvar=API_ENV, default=DEFAULT_API, show_default=True, show_envvar=True,
              help="The profile API of your home AAA server (https:// only).")
@click.option("--ca", "ca_file", envvar=CA_ENV, show_envvar=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA certificate(s) to verify the server with [default: the lab's CA when a lab runs here, "
                   "else the system's trust store].")
@click.option("--token-file", envvar=TOKEN_FILE_ENV, show_envvar=True, type=click.Path(dir_okay=False, path_type=Path),
              help=f"File holding your API token (mode 0600) [default: the token from ${TOKEN_ENV}].")
@click.option("--user", help="The NAI whose profiles to use (default: the token's owner).")
@click.pass_context
def profile_group(ctx: click.Context, api: str, ca_file: Path | None, token_file: Path | None,
                  user: str | None) -> None:
    """Your own VPN profiles, through the home AAA server's profile API (claim 24), over HTTPS.
    The token comes from --token-file or $MIPVPN_TOKEN, never from the command line. A change
    takes effect with your next registration: `mipvpn mn service-update` makes that now."""
    ctx.obj = ApiClient(api, read_token(token_file), user, client_context(ca_file))


@profile_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def profile_list(client: ApiClient, as_json: bool) -> None:
    """List your profiles."""
    profiles = client.call("GET", client.profiles_url())["profiles"]
    rows = [profile_row(p, with_nai=False) for p in profiles]
    click.echo(json.dumps(profiles, indent=2) if as_json else table(rows, "no profiles"))


@profile_group.command("show")
@click.argument("profile_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def profile_show(client: ApiClient, profile_id: int, as_json: bool) -> None:
    """Show one profile."""
    _show(client.call("GET", client.profiles_url(profile_id)), as_json)


@profile_group.command("add")
@click.argument("destination")
@profile_options(defaults=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def profile_add(client: ApiClient, destination: str, as_json: bool, **opts: Any) -> None:
    """Add a profile towards DESTINATION (host or prefix); unset options take the server's defaults."""
    body = {"destination": destination, **{k: v for k, v in opts.items() if v is not None}}
    _show(client.call("POST", client.profiles_url(), body), as_json, "added ")


@profile_group.command("set")
@click.argument("profile_id", type=int)
@click.option("--destination", help="New destination host or prefix.")
@click.option("--no-qos", is_flag=True, help="Drop the QoS.")
@profile_options(defaults=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def profile_set(client: ApiClient, profile_id: int, destination: str | None, no_qos: bool, as_json: bool,
                **opts: Any) -> None:
    """Change fields of profile PROFILE_ID (only the options given)."""
    changes = profile_changes(destination, no_qos, opts)
    _show(client.call("PATCH", client.profiles_url(profile_id), changes), as_json, "updated ")


@profile_group.command("delete")
@click.argument("profile_id", type=int)
@click.pass_obj
def profile_delete(client: ApiClient, profile_id: int) -> None:
    """Remove profile PROFILE_ID."""
    client.call("DELETE", client.profiles_url(profile_id))
    click.echo(f"profile {profile_id} deleted")


@profile_group.command("gateways")
@click.pass_obj
def profile_gateways(client: ApiClient) -> None:
    """The correspondent gateways a profile may name."""
    click.echo(table(client.call("GET", "/v1/gateways")["gateways"], "no gateways"))


# ---- the mobile node's side ------------------------------------------------------------------


@click.group("mn")
def mn_group() -> None:
    """Ask a running mobile node daemon to do something."""


@mn_group.command("service-update")
@click.option("--node", required=True, help="The lab node of the mobile node daemon.")
@click.option("--run-dir", type=click.Path(path_type=Path), envvar="MIPVPN_RUN_DIR", show_envvar=True,
              default=DEFAULT_RUN_DIR, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def mn_service_update(node: str, run_dir: Path, as_json: bool) -> None:
    """Re-register now with a service-update request (F7): the home AAA server rebuilds the
    VPN info from the changed profile. Prints the registration's reply code."""
    try:
        result = control.call(control_socket(run_dir.absolute(), node), "service-update", timeout=45.0)
    except control.ControlUnavailable as exc:
        raise click.ClickException(f"{node}: {exc}") from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{node}: service update {result['sequence']} "
                   f"{'accepted' if result['accepted'] else 'refused'} (code {result['code']}) via "
                   f"{result['care_of_address']}")
    if not result["accepted"]:
        raise SystemExit(1)


__all__ = ["mn_group", "profile_group"]
