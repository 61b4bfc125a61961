"""The Mobile IPv4 Diameter application (RFC 4004) as mipvpn's roles speak it: one typed
builder and one parser per message, and nothing else (no I/O; the codec is
``daemons.wire.diameter``, the Mobile IP one ``daemons.wire.mip``).

Who sends what (flows F1-F3, docs/protocol.md)::

    FA    --AMR(RRQ, MN-AAA)-->  AAAF  --AMR-->  AAAH  --HAR(RRQ, VPN-Info: HA view)-->  HA
    FA  <--AMA(RRP, VPN-Info: FA view)--  AAAF  <--AMA--  AAAH  <--HAA(RRP)--  HA
    FA    --STR-->  AAAF  (the user left that FA)   AAAF --STA--> FA

``build_amr`` / ``parse_amr`` and so on: a builder returns a :class:`Message` ready for
``DiameterNode.request`` (or, for an answer, for the handler to return; Origin-Host and
Origin-Realm are left to the node unless given); a parser returns a frozen dataclass holding
what the roles use, with the Mobile IP message inside (MIP-Reg-Request / MIP-Reg-Reply)
already decoded and the VPN-Info AVPs already turned into :class:`VpnInfo` — decoded once at
each hop and handed on as objects. The raw RRQ/RRP bytes travel alongside: their
authenticators cover exactly those bytes, so they are relayed unchanged.

A message that cannot be used raises :class:`ApplicationError` (``MissingAvp``: 5005,
``InvalidAvp``: 5004, ``BadRegistration``: an RRQ that is none), carrying the Result-Code and
the Failed-AVP for the error answer; the texts name AVPs, never their data.

AVP order is part of the wire contract (tests/unit/test_application.py pins it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from daemons.vpn import vpninfo
from daemons.vpn.vpninfo import VpnInfo
from daemons.wire import mip
from daemons.wire.diameter import (
    APP_MOBILE_IPV4,
    CMD_AA_MOBILE_NODE,
    CMD_HOME_AGENT_MIP,
    CMD_SESSION_TERMINATION,
    AuthSessionState,
    Avp,
    Message,
    ResultCode,
    TerminationCause,
)

APPLICATION_ID = APP_MOBILE_IPV4  # 2
AMR_COMMAND = CMD_AA_MOBILE_NODE  # AMR/AMA, 260
HAR_COMMAND = CMD_HOME_AGENT_MIP  # HAR/HAA, 262
STR_COMMAND = CMD_SESSION_TERMINATION  # STR/STA, 275 (in this application's sessions)
# What a server needs before it can look at a request (``DiameterNode.register_handler``'s
# ``required``: 5005 with an example of each missing AVP); the parsers check the same.
AMR_REQUIRED = ("User-Name", "MIP-Reg-Request")
HAR_REQUIRED = ("User-Name", "MIP-Reg-Request")


# ---- errors ----------------------------------------------------------------------------------


class ApplicationError(ValueError):
    """A message of the application that cannot be used as it is.

    ``result_code`` and ``failed_avp`` (AVP names, for which the node builds examples, or
    ``(name, value)`` pairs) are what the error answer carries; ``str(error)`` is its
    Error-Message. The cause, if any (a ``mip.DecodeError``, a ``VpnInfoError``), is
    ``__cause__``.
    """

    def __init__(self, message: str, result_code: int, failed_avp: Iterable[str | tuple[str, Any]] = ()) -> None:
        super().__init__(message)
        self.result_code = int(result_code)
        self.failed_avp: list[str | tuple[str, Any]] = list(failed_avp)


class MissingAvp(ApplicationError):
    """Mandatory AVPs are absent (5005 DIAMETER_MISSING_AVP)."""

    def __init__(self, command: str, names: Iterable[str]) -> None:
        self.names = tuple(names)
        super().__init__(f"{command}: missing AVP: {', '.join(self.names)}", ResultCode.DIAMETER_MISSING_AVP,
                         self.names)


class InvalidAvp(ApplicationError):
    """An AVP whose value cannot be used (5004 DIAMETER_INVALID_AVP_VALUE)."""

    def __init__(self, message: str, failed_avp: Iterable[str | tuple[str, Any]] = ()) -> None:
        super().__init__(message, ResultCode.DIAMETER_INVALID_AVP_VALUE, failed_avp)


class BadRegistration(InvalidAvp):
    """MIP-Reg-Request is not a registration request; ``raw`` is what it holds (the HA
    answers such bytes as RFC 5944 §3.8.2.1 says, as it would on UDP 434)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        super().__init__("MIP-Reg-Request is not a registration request", [("MIP-Reg-Request", raw)])


# ---- parsed messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Amr:
    """An AA-Mobile-Node-Request (RFC 4004 §5.1)."""

    request: Message = field(repr=False, compare=False)  # what it was parsed from (to answer it)
    session_id: str | None
    nai: str  # User-Name
    origin_host: str | None
    rrq: mip.RegistrationRequest  # MIP-Reg-Request, decoded
    rrq_raw: bytes  # ... as the MN sent it (its authenticators cover these bytes)
    feature_vector: int = 0  # MIP-Feature-Vector (0 when absent), passed on in the HAR
    route_record: tuple[str, ...] = ()  # the relays it passed (RFC 6733 §6.7.1)
    origin_realm: str | None = None  # the FA's realm: the AAAH seals the FA's keys for its domain


@dataclass(frozen=True)
class Ama:
    """An AA-Mobile-Node-Answer (RFC 4004 §5.2). ``vpn`` is read from a successful answer
    only (a refusal carries none)."""

    session_id: str | None
    result_code: int | None
    rrp: mip.RegistrationReply | None  # MIP-Reg-Reply, decoded (None: the answer has none)
    rrp_raw: bytes | None
    vpn: tuple[VpnInfo, ...] = ()
    local_key: bytes | None = None  # VPN-Local-Answer-Key, sealed for the AAAF (claim 17): see LOCAL_KEY_AVP

    @property
    def success(self) -> bool:
        return self.result_code == ResultCode.DIAMETER_SUCCESS

    @property
    def answered_locally(self) -> bool:
        """Claim 17 (F2): the local AAA answered an intra-domain move itself: success and VPN
        info, but no registration reply (the FA sends the RRQ straight to the HA)."""
        return self.rrp_raw is None and self.success and bool(self.vpn)


@dataclass(frozen=True)
class Har:
    """A Home-Agent-MIP-Request (RFC 4004 §5.3), with the VPN info for the HA (claim 16)."""

    session_id: str | None
    nai: str
    rrq: mip.RegistrationRequest
    rrq_raw: bytes
    vpn: tuple[VpnInfo, ...] = ()


@dataclass(frozen=True)
class Haa:
    """A Home-Agent-MIP-Answer (RFC 4004 §5.4), as the AAAH reads it: whatever the HA says
    ends in an AMA, so nothing here raises. ``rrp_raw`` is the MIP-Reg-Reply when it decodes as
    a Mobile IP message (None: absent or unreadable), ``rrp`` that message if it is a
    registration reply."""

    session_id: str | None
    result_code: int | None
    rrp: mip.RegistrationReply | None
    rrp_raw: bytes | None

    @property
    def accepted(self) -> bool:
        """The HA's registration reply says yes (whatever the Result-Code)."""
        return self.rrp is not None and self.rrp.accepted


@dataclass(frozen=True)
class Str:
    """A Session-Termination-Request (RFC 6733 §8.4.1) in this application."""

    session_id: str | None
    nai: str | None


@dataclass(frozen=True)
class Sta:
    """A Session-Termination-Answer (RFC 6733 §8.4.2)."""

    session_id: str | None
    result_code: int | None


# ---- AMR ------------------------------------------------------------------------------------------


def realm_of(nai: str) -> str:
    """The realm of ``user@realm`` (where the AMR and the STR are routed)."""
    return nai.split("@", 1)[-1]


def build_amr(session_id: str, nai: str, rrq: mip.RegistrationRequest, rrq_raw: bytes) -> Message:
    """The FA's AMR for the RRQ ``rrq_raw`` (decoded: ``rrq``) of ``nai``: MIP-FA-Challenge and
    MIP-MN-AAA-Auth from the RRQ's challenge and MN-AAA extensions, when it has them."""
    avps: list[Any] = [
        ("Session-Id", session_id),
        ("Auth-Application-Id", APPLICATION_ID), ("Destination-Realm", realm_of(nai)),
        ("User-Name", nai), ("MIP-Reg-Request", rrq_raw),
        ("MIP-Mobile-Node-Address", rrq.home_address), ("MIP-Home-Agent-Address", rrq.home_agent),
        ("MIP-Feature-Vector", 0)]
    challenge = rrq.find(mip.MNFAChallengeExtension)
    if challenge is not None:
        avps.append(("MIP-FA-Challenge", challenge.challenge))
    auth = rrq.find(mip.GeneralizedAuthExtension)
    location = mip.authenticator_location(rrq_raw, mip.EXT_GEN_AUTH)
    if auth is not None and location is not None:
        covered, offset, length = location
        avps.append(("MIP-MN-AAA-Auth", [Avp.new("MIP-MN-AAA-SPI", auth.spi),
                                         Avp.new("MIP-Auth-Input-Data-Length", covered),
                                         Avp.new("MIP-Authenticator-Length", length),
                                         Avp.new("MIP-Authenticator-Offset", offset)]))
    return Message.request("AMR", avps=avps)


def parse_amr(msg: Message) -> Amr:
    """An AMR, its RRQ decoded. MissingAvp without User-Name or MIP-Reg-Request,
    BadRegistration when MIP-Reg-Request is not a registration request."""
    _expect(msg, AMR_COMMAND)
    _require(msg, AMR_REQUIRED)
    raw, rrq = _registration(msg)
    return Amr(msg, msg.session_id, msg.get("User-Name"), msg.get("Origin-Host"), rrq, raw,
               int(msg.get("MIP-Feature-Vector", default=0)), tuple(str(a.value) for a in msg.find_all("Route-Record")),
               msg.get("Origin-Realm"))


# ---- AMA ------------------------------------------------------------------------------------------


def build_ama(amr: Amr, result_code: int, *, rrp_raw: bytes | None = None, vpn: Iterable[VpnInfo] = (),
              error: str | None = None, origin_host: str | None = None, origin_realm: str | None = None,
              local_key: bytes | None = None) -> Message:
    """The answer to ``amr``: the HA's registration reply (if any) and the FA's VPN info.

    The home AAA server answers with ``rrp_raw`` (2001, or 4005 when the HA refused) and, for an
    accepted registration, the AAAF's ``local_key`` sealed for it (the AAAF strips it:
    ``take_local_key``); the
    local one, answering an intra-domain move itself (claim 17), with VPN info alone."""
    avps: list[Any] = []
    if origin_host is not None:
        avps.append(("Origin-Host", origin_host))
    if origin_realm is not None:
        avps.append(("Origin-Realm", origin_realm))
    avps += [("Auth-Application-Id", APPLICATION_ID), ("User-Name", amr.nai)]  # RFC 4004 §5.2
    if error:
        avps.append(("Error-Message", error))
    if rrp_raw is not None:
        avps.append(("MIP-Reg-Reply", rrp_raw))
    avps += [("MIP-Home-Agent-Address", amr.rrq.home_agent), ("MIP-Mobile-Node-Address", amr.rrq.home_address)]
    avps += [info.to_avp() for info in vpn]
    if local_key is not None:
        avps.append((LOCAL_KEY_AVP, local_key))
    return amr.request.answer(result_code, avps)


def parse_ama(msg: Message, nai: str) -> Ama:
    """An AMA; the VPN-Info of a successful one as paths of ``nai``. InvalidAvp when
    MIP-Reg-Reply is not a registration reply or a VPN-Info cannot become a path."""
    try:
        raw, reply = _reply(msg)
    except mip.DecodeError as exc:
        raise InvalidAvp(f"MIP-Reg-Reply: {exc}", ["MIP-Reg-Reply"]) from exc
    if raw is not None and not isinstance(reply, mip.RegistrationReply):
        raise InvalidAvp("MIP-Reg-Reply is not a registration reply", ["MIP-Reg-Reply"])
    rrp = reply if isinstance(reply, mip.RegistrationReply) else None
    code = msg.result_code
    vpn = _vpn_info(msg, nai) if code == ResultCode.DIAMETER_SUCCESS else ()
    return Ama(msg.session_id, code, rrp, raw, vpn, _local_key(msg) if code == ResultCode.DIAMETER_SUCCESS else None)


# ---- the AAAF's local-answer key (claim 17, issue #15) -------------------------------------------

# The AAAH's AMA carries it to the AAAF (``daemons.wire.mip.localanswer``: the key an MN proves
# in its next intra-domain move), sealed for the AAAF (``daemons.vpn.seal.seal_secret``, bound to
# ``local_key_context``); the AAAF takes it out before the AMA goes on to the FA.
LOCAL_KEY_AVP = "VPN-Local-Answer-Key"


def local_key_context(nai: str, session_id: str) -> bytes:
    """What the sealed local-answer key is bound to: the user and the Diameter session."""
    return b"local answer key|" + nai.encode() + b"|" + session_id.encode()


def local_aaa(amr: Amr, peer_host: str) -> str:
    """The Diameter identity of the local AAA the AMR came through: the agent the FA's request
    reached first. It named the FA in the first Route-Record (RFC 6733 §6.7.1); whoever relayed
    it next named that agent in the second, and without a second it is our own peer."""
    return amr.route_record[1] if len(amr.route_record) > 1 else peer_host


def _local_key(msg: Message) -> bytes | None:
    value = msg.get(LOCAL_KEY_AVP)
    return None if value is None else bytes(value)


def take_local_key(ama: Message) -> bool:
    """Remove every VPN-Local-Answer-Key from ``ama`` (an AMA going on to the FA): True if it had any."""
    return ama.remove(LOCAL_KEY_AVP) > 0


# ---- HAR ------------------------------------------------------------------------------------------


def build_har(amr: Amr, *, origin_host: str, origin_realm: str, destination_realm: str, destination_host: str,
              home_address: IPv4Address, vpn: Iterable[VpnInfo] = ()) -> Message:
    """The home AAA server's HAR for ``amr`` to the HA ``destination_host``: the RRQ as the
    MN sent it, the user's home address and the paths in the HA's view (claim 16)."""
    rrq = amr.rrq
    return Message.request("HAR", [
        ("Session-Id", amr.session_id or ""), ("Auth-Application-Id", APPLICATION_ID),
        ("Origin-Host", origin_host), ("Origin-Realm", origin_realm),
        ("Destination-Realm", destination_realm), ("Destination-Host", destination_host),
        ("Authorization-Lifetime", rrq.lifetime), ("Auth-Session-State", AuthSessionState.NO_STATE_MAINTAINED),
        ("User-Name", amr.nai), ("MIP-Reg-Request", amr.rrq_raw), ("MIP-Feature-Vector", amr.feature_vector),
        ("MIP-Home-Agent-Address", rrq.home_agent), ("MIP-Mobile-Node-Address", home_address),
        *(info.to_avp() for info in vpn)])


def parse_har(msg: Message) -> Har:
    """A HAR, its VPN info and RRQ decoded. MissingAvp without User-Name or MIP-Reg-Request,
    InvalidAvp for a VPN-Info that cannot become a path, BadRegistration when
    MIP-Reg-Request is not a registration request."""
    _expect(msg, HAR_COMMAND)
    _require(msg, HAR_REQUIRED)
    nai = msg.get("User-Name")
    vpn = _vpn_info(msg, nai)
    raw, rrq = _registration(msg)
    return Har(msg.session_id, nai, rrq, raw, vpn)


# ---- HAA ------------------------------------------------------------------------------------------


def build_haa(har: Message, rrp_raw: bytes, accepted: bool) -> Message:
    """The HA's answer to ``har`` with its registration reply: 2001 when it accepted the
    registration, 4005 DIAMETER_ERROR_MIP_REPLY_FAILURE when it refused."""
    code = ResultCode.DIAMETER_SUCCESS if accepted else ResultCode.DIAMETER_ERROR_MIP_REPLY_FAILURE
    return har.answer(code, avps=[("MIP-Reg-Reply", rrp_raw), ("User-Name", har.get("User-Name"))])


def parse_haa(msg: Message) -> Haa:
    """A HAA (never raises on its content: see :class:`Haa`)."""
    try:
        raw, reply = _reply(msg)
    except mip.DecodeError:
        raw, reply = None, None
    return Haa(msg.session_id, msg.result_code, reply if isinstance(reply, mip.RegistrationReply) else None, raw)


# ---- STR / STA --------------------------------------------------------------------------------------


def build_str(session_id: str, nai: str, cause: TerminationCause) -> Message:
    """The FA's STR: the user of ``session_id`` left (RFC 6733 §8.4), routed to its realm."""
    return Message.request("STR", application_id=APPLICATION_ID, avps=[
        ("Session-Id", session_id), ("Destination-Realm", realm_of(nai)),
        ("Auth-Application-Id", APPLICATION_ID), ("User-Name", nai), ("Termination-Cause", cause)])


def parse_str(msg: Message) -> Str:
    """An STR (its AVPs may be absent: the receiver then has no session to end)."""
    _expect(msg, STR_COMMAND)
    return Str(msg.session_id, msg.get("User-Name"))


def build_sta(str_: Message) -> Message:
    """The answer to an STR: 2001 (RFC 6733 §8.4.2)."""
    return str_.answer(ResultCode.DIAMETER_SUCCESS)


def parse_sta(msg: Message) -> Sta:
    return Sta(msg.session_id, msg.result_code)


# ---- shared ---------------------------------------------------------------------------------------


def _expect(msg: Message, command: int) -> None:
    """Requests are parsed by what they are (answers: the answer to our request, whatever
    command code the peer put in: the node matches them by their identifiers)."""
    if msg.command_code != command or not msg.is_request:
        raise ApplicationError(f"{msg.name} is not a request of command {command}",
                               ResultCode.DIAMETER_COMMAND_UNSUPPORTED)


def _require(msg: Message, names: Iterable[str]) -> None:
    missing = [n for n in names if msg.find(n) is None]
    if missing:
        raise MissingAvp(msg.name, missing)


def _registration(msg: Message) -> tuple[bytes, mip.RegistrationRequest]:
    raw = bytes(msg.get("MIP-Reg-Request"))
    try:
        rrq = mip.decode_message(raw)
    except mip.DecodeError as exc:
        raise BadRegistration(raw) from exc
    if not isinstance(rrq, mip.RegistrationRequest):
        raise BadRegistration(raw)
    return raw, rrq


def _reply(msg: Message) -> tuple[bytes | None, mip.Message | None]:
    """MIP-Reg-Reply and what it decodes to ((None, None) when absent); mip.DecodeError."""
    raw = msg.get("MIP-Reg-Reply")
    if raw is None:
        return None, None
    raw = bytes(raw)
    return raw, mip.decode_message(raw)


def _vpn_info(msg: Message, nai: str) -> tuple[VpnInfo, ...]:
    try:
        return tuple(vpninfo.from_message(msg, nai))
    except vpninfo.VpnInfoError as exc:
        raise InvalidAvp(str(exc)) from exc


__all__ = [
    "AMR_COMMAND",
    "AMR_REQUIRED",
    "APPLICATION_ID",
    "HAR_COMMAND",
    "HAR_REQUIRED",
    "LOCAL_KEY_AVP",
    "STR_COMMAND",
    "Ama",
    "Amr",
    "ApplicationError",
    "BadRegistration",
    "Haa",
    "Har",
    "InvalidAvp",
    "MissingAvp",
    "Sta",
    "Str",
    "build_ama",
    "build_amr",
    "build_haa",
    "build_har",
    "build_sta",
    "build_str",
    "local_aaa",
    "local_key_context",
    "parse_ama",
    "parse_amr",
    "parse_haa",
    "parse_har",
    "parse_sta",
    "parse_str",
    "realm_of",
    "take_local_key",
]
