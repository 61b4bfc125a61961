"""The user self-service HTTPS API of the home AAA server (claim 24, flow F7).

A user reads and changes their *own* VPN profiles in the VPN database; the change takes
effect with the user's next registration, which the mobile node can ask for at once with a
service-update request (an RRQ carrying the service-update NVSE, ``daemons.wire.mip.vendor``).

Endpoints (JSON in and out)::

    GET    /v1/users/{nai}/profiles          the user's profiles
    POST   /v1/users/{nai}/profiles          add one            -> 201 + Location
    GET    /v1/users/{nai}/profiles/{id}     one profile
    PATCH  /v1/users/{nai}/profiles/{id}     change some fields
    DELETE /v1/users/{nai}/profiles/{id}     remove it          -> 204
    GET    /v1/gateways                      the CN-GWs a profile may name

Transport: HTTPS only (:func:`server_context`: TLS 1.2 or later, 1.3 when the client has it;
TLS 1.2 with forward-secret AEAD suites only), the server's certificate and key from the
configuration (the key file readable by its owner only, refused at start otherwise). Plain
HTTP only when the configuration says ``tls: false`` (e.g. behind a TLS-terminating proxy on
the same host), with a warning at start: bearer tokens would travel in clear.

Authentication: ``Authorization: Bearer TOKEN`` with the user's API token (issued by the
operator, ``mipvpn db token issue NAI``, stored only as a salted scrypt hash). The token names
its owner, so one hash is checked per request. No or a wrong token: 401; a valid token used
on another user's profiles: 403 (also when that user does not exist: nothing is revealed).

Errors are ``{"error": KIND, "field": FIELD, "message": TEXT}`` with ``field`` naming the
offending field where there is one: 400 ``invalid`` (type, range, unknown gateway, bad prefix,
unknown suite...), 404 ``not_found``, 409 ``conflict`` (e.g. a second profile for the same
destination), 401 ``unauthorized``, 403 ``forbidden``, 429 ``too_many_failures`` (more than
:data:`MAX_FAILURES` failed authentications from one address within :data:`FAILURE_WINDOW`
seconds: guessing tokens).

Tokens never appear in logs, answers or error messages; the log has one line per request
(method, route, user, caller, status).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from daemons.runtime.config import private_file_problem
from daemons.runtime.log import EventLog
from daemons.store.vpndb import (
    AlreadyExists,
    GatewayType,
    InUse,
    NotFound,
    VpnDatabase,
    VpnDbError,
    VpnProfile,
)

log = EventLog("mipvpn.profileapi")
MAX_BODY = 64 * 1024
REALM = 'Bearer realm="mipvpn"'
# Guessing tokens: after this many failed authentications from one address within the window,
# that address gets 429 until the window has passed (scrypt already makes each guess cost).
MAX_FAILURES, FAILURE_WINDOW = 20, 60.0

# The fields a user may set, with the JSON types they take (None: may be null).
STRING_FIELDS = {"destination": False, "gateway": True, "gateway_type": True, "suite": False,
                 "distribution": False}
INT_FIELDS = {"lifetime": False, "qos_rate": True, "qos_ceil": True, "qos_priority": True}
SETTABLE = {**STRING_FIELDS, **INT_FIELDS}
READ_ONLY = ("id", "nai")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ChangeHook = Callable[[str, str, VpnProfile | None], None]


class ApiError(Exception):
    """An error answer: HTTP status, kind, optional field, message (never a secret)."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.kind, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        headers = {"WWW-Authenticate": REALM} if self.status == 401 else \
            {"Retry-After": str(int(FAILURE_WINDOW))} if self.status == 429 else None
        return web.json_response(body, status=self.status, headers=headers)


def _db_error(exc: VpnDbError) -> ApiError:
    """A database error as an API error (the message names the field, never a value of a secret)."""
    if isinstance(exc, NotFound) and exc.field in ("profile", "nai"):
        return ApiError(404, "not_found", str(exc), exc.field)
    if isinstance(exc, AlreadyExists | InUse):
        return ApiError(409, "conflict", str(exc), exc.field)
    return ApiError(400, "invalid", str(exc), exc.field)  # ValidationError, unknown gateway...


def check_fields(body: Any, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settable fields of a request body, type-checked (JSON types: no "300" for 300)."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid", "body: must be a JSON object", "body")
    for name in body:
        if name in READ_ONLY:
            raise ApiError(400, "invalid", f"{name}: read-only", name)
        if name not in SETTABLE:
            raise ApiError(400, "invalid", f"{name}: not a profile field (one of: {', '.join(sorted(SETTABLE))})",
                           name)
    for name in required:
        if body.get(name) is None:
            raise ApiError(400, "invalid", f"{name}: required", name)
    out: dict[str, Any] = {}
    for name, value in body.items():
        nullable = SETTABLE[name]
        if value is None:
            if not nullable:
                raise ApiError(400, "invalid", f"{name}: must not be null", name)
        elif name in STRING_FIELDS and not isinstance(value, str):
            raise ApiError(400, "invalid", f"{name}: must be a string", name)
        elif name in INT_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
            raise ApiError(400, "invalid", f"{name}: must be an integer", name)
        out[name] = value
    return out


class TlsFileError(ValueError):
    """A certificate or key file the server cannot use: ``field`` names the configuration field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def check_private_file(path: Path, field: str) -> None:
    """A private key's file must be readable by its owner only (0600 or 0400)."""
    problem = private_file_problem(path)
    if problem is not None:
        raise TlsFileError(field, problem)


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The API's TLS server context: TLS 1.2 minimum (1.3 negotiated whenever the client has
    it), forward-secret AEAD suites only for 1.2, no client certificate (tokens authenticate)."""
    check_private_file(key_file, "key_file")
    if not cert_file.is_file():
        raise TlsFileError("cert_file", f"{cert_file}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2 only: the 1.3 suites are all AEAD
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:  # the reason names what is wrong, never the key
        raise TlsFileError("cert_file", f"cannot use {cert_file} with key_file {key_file}: "
                                        f"{exc.reason or 'not a PEM certificate and matching key'}") from None
    return context


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if not header:
        raise ApiError(401, "unauthorized", "missing Authorization: Bearer token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "the Authorization header must be: Bearer TOKEN")
    return token.strip()


class ProfileApi:
    """The server; ``start()`` listens on ``address:port`` (port 0: any free one). ``tls`` is
    the TLS server context (:func:`server_context`); ``None`` serves plain HTTP, with a warning."""

    def __init__(self, db: VpnDatabase, address: str, port: int, *, tls: ssl.SSLContext | None,
                 node: str = "aaah", on_change: ChangeHook | None = None) -> None:
        self.db = db
        self.tls = tls
        self.address = address
        self.requested_port = port
        self.node = node
        self.on_change = on_change
        self.runner: web.AppRunner | None = None
        self.counters: dict[str, int] = {"requests": 0, "unauthorized": 0, "forbidden": 0, "invalid": 0,
                                         "throttled": 0, "changes": 0}
        self.failures: dict[str, list[float]] = {}  # remote address -> times of failed authentications
        self.clock: Callable[[], float] = time.monotonic
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        prefix = "/v1/users/{nai}/profiles"
        self.app.router.add_get(prefix, self.list_profiles)
        self.app.router.add_post(prefix, self.add_profile)
        self.app.router.add_get(prefix + "/{id}", self.get_profile)
        self.app.router.add_patch(prefix + "/{id}", self.update_profile)
        self.app.router.add_delete(prefix + "/{id}", self.delete_profile)
        self.app.router.add_get("/v1/gateways", self.list_gateways)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.address, self.requested_port, reuse_address=True,
                           ssl_context=self.tls)
        await site.start()
        if self.tls is None:
            log.warning("profile_api.plain_http", address=self.address, port=self.port,
                        note="tls: false: bearer tokens travel in clear (only behind a TLS proxy on this host)")
        log.info("profile_api.ready", address=self.address, port=self.port,
                 scheme="http" if self.tls is None else "https")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def port(self) -> int | None:
        if self.runner is None:
            return None
        for addr in self.runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                return int(addr[1])
        return None

    # ---- plumbing ------------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.counters["requests"] += 1
        caller: str | None = None
        try:
            if request.match_info.http_exception is not None:
                raise request.match_info.http_exception
            if request.path.startswith("/v1/"):
                self._check_throttle(request.remote or "-")
                caller = await self._authenticate(request)
                nai = request.match_info.get("nai")
                if nai is not None and nai != caller:
                    raise ApiError(403, "forbidden", "a token gives access to its own user's profiles only")
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
            self.counters[{401: "unauthorized", 403: "forbidden", 429: "throttled"}.get(exc.status, "invalid")] += 1
            if exc.status == 401:
                self._failed(request.remote or "-")
        except web.HTTPException as exc:  # 404 no such route, 405, 413 body too large ...
            kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "error")
            response = web.json_response({"error": kind, "message": exc.reason}, status=exc.status)
        log.info("api.request", method=request.method, route=_route(request), mn=request.match_info.get("nai"),
                 caller=caller, remote=request.remote, status=response.status)
        return response

    def _failed(self, remote: str) -> None:
        now = self.clock()
        self.failures.setdefault(remote, []).append(now)
        if len(self.failures) > 4096:  # many addresses: forget those quiet for a window
            self.failures = {k: v for k, v in self.failures.items() if now - v[-1] < FAILURE_WINDOW}

    def _check_throttle(self, remote: str) -> None:
        now = self.clock()
        recent = [t for t in self.failures.get(remote, []) if now - t < FAILURE_WINDOW]
        if recent:
            self.failures[remote] = recent
        else:
            self.failures.pop(remote, None)
        if len(recent) >= MAX_FAILURES:
            raise ApiError(429, "too_many_failures",
                           f"{len(recent)} failed authentications from {remote}: try again later")

    async def _authenticate(self, request: web.Request) -> str:
        token = bearer_token(request)
        caller = await self.db.aio.authenticate_token(token)
        if caller is None:
            raise ApiError(401, "unauthorized", "invalid or revoked token")
        return caller

    @staticmethod
    def _profile_id(request: web.Request) -> int:
        text = request.match_info["id"]
        if not text.isdigit() or len(text) > 18:
            raise ApiError(404, "not_found", f"profile: no profile {text!r}", "profile")
        return int(text)

    @staticmethod
    async def _body(request: web.Request) -> Any:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "too_large", f"body: larger than {MAX_BODY} bytes", "body") from None
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "invalid", "body: not valid JSON", "body") from None

    def _changed(self, nai: str, action: str, profile: VpnProfile | None, profile_id: int,
                 fields: list[str]) -> None:
        self.counters["changes"] += 1
        log.info("profile.changed", mn=nai, profile=profile_id, action=action, fields=",".join(fields) or None,
                 note="takes effect with the next registration (service update)")
        if self.on_change is not None:
            try:
                self.on_change(nai, action, profile)
            except Exception as exc:  # the owner's hook must not fail the request
                log.error("profile.hook_failed", mn=nai, error=repr(exc))

    # ---- handlers ------------------------------------------------------------------------------
    async def list_profiles(self, request: web.Request) -> web.Response:
        nai = request.match_info["nai"]
        profiles = await self.db.aio.profiles_for(nai)
        return web.json_response({"nai": nai, "profiles": [p.summary() for p in profiles]})

    async def get_profile(self, request: web.Request) -> web.Response:
        nai, pid = request.match_info["nai"], self._profile_id(request)
        profile = await self.db.aio.profile(nai, pid)
        if profile is None:
            raise ApiError(404, "not_found", f"profile: user {nai!r} has no profile {pid}", "profile")
        return web.json_response(profile.summary())

    async def add_profile(self, request: web.Request) -> web.Response:
        nai = request.match_info["nai"]
        fields = check_fields(await self._body(request), required=("destination",))
        destination, gateway = fields.pop("destination"), fields.pop("gateway", None)
        try:
            profile = await self.db.aio.add_profile(nai, destination, gateway, **fields)
        except VpnDbError as exc:
            raise _db_error(exc) from None
        self._changed(nai, "add", profile, profile.id, sorted(["destination", "gateway", *fields]))
        return web.json_response(profile.summary(), status=201,
                                 headers={"Location": f"/v1/users/{nai}/profiles/{profile.id}"})

    async def update_profile(self, request: web.Request) -> web.Response:
        nai, pid = request.match_info["nai"], self._profile_id(request)
        changes = check_fields(await self._body(request))
        if not changes:
            raise ApiError(400, "invalid", f"body: nothing to change (fields: {', '.join(sorted(SETTABLE))})",
                           "body")
        try:
            profile = await self.db.aio.update_profile(nai, pid, **changes)
        except VpnDbError as exc:
            raise _db_error(exc) from None
        self._changed(nai, "update", profile, pid, sorted(changes))
        return web.json_response(profile.summary())

    async def delete_profile(self, request: web.Request) -> web.Response:
        nai, pid = request.match_info["nai"], self._profile_id(request)
        try:
            await self.db.aio.remove_profile(nai, pid)
        except VpnDbError as exc:
            raise _db_error(exc) from None
        self._changed(nai, "remove", None, pid, [])
        return web.Response(status=204)

    async def list_gateways(self, request: web.Request) -> web.Response:
        gateways = await self.db.aio.run(self.db.gateways)
        return web.json_response({"gateways": [
            {"name": g.name, "type": g.type.value, "realm": g.realm} for g in gateways
            if g.type in (GatewayType.CNGW_STATIC, GatewayType.CNGW_DYNAMIC)]})


def _route(request: web.Request) -> str:
    resource = getattr(request.match_info.route, "resource", None)
    return resource.canonical if resource is not None else "-"


__all__ = ["ApiError", "ProfileApi", "TlsFileError", "check_fields", "check_private_file", "server_context"]
