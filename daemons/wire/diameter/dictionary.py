"""The Diameter dictionary: AVP and command definitions, looked up by code or by name.

Contents: RFC 6733 base AVPs and commands, the RFC 4004 Mobile IPv4 application (id 2),
Origin-AAA-Protocol (RFC 7155) and our VPN AVPs under vendor 32473 (docs/protocol.md).
Codes and types were cross-checked against Wireshark's dictionary (mobileipv4.xml,
dictionary.xml, nasreq.xml); where Wireshark disagrees with the RFC, the RFC wins and the
difference is noted next to the entry.

Commands are data entries keyed by ``(code, is_request)``; one :class:`Message` class
serves them all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from . import constants as c
from .datatypes import AvpType


class Rule(enum.Enum):
    """An AVP flag rule (RFC 6733 §4.5 table columns)."""

    MUST = "must"
    MAY = "may"
    MUST_NOT = "mustnot"


@dataclass(frozen=True)
class AvpDef:
    code: int
    name: str
    dtype: AvpType
    vendor_id: int = c.VENDOR_IETF
    m_rule: Rule = Rule.MUST
    enum: type[enum.IntEnum] | type[enum.IntFlag] | None = None
    secret: bool = False  # value held as daemons.runtime.secret.Secret
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[int, int]:
        return (self.code, self.vendor_id)

    @property
    def vendor_flag(self) -> bool:
        return self.vendor_id != c.VENDOR_IETF


@dataclass(frozen=True)
class CommandDef:
    code: int
    request: bool
    name: str  # "AA-Mobile-Node-Request"
    abbrev: str  # "AMR"
    application_id: int | None  # None: the application of the session (e.g. STR, RAR)
    proxiable: bool

    @property
    def key(self) -> tuple[int, bool]:
        return (self.code, self.request)


@dataclass
class Dictionary:
    avps: dict[tuple[int, int], AvpDef] = field(default_factory=dict)
    avp_names: dict[str, AvpDef] = field(default_factory=dict)
    commands: dict[tuple[int, bool], CommandDef] = field(default_factory=dict)
    command_names: dict[str, CommandDef] = field(default_factory=dict)

    def add_avp(self, d: AvpDef) -> AvpDef:
        for name in (d.name, *d.aliases):
            if name in self.avp_names and self.avp_names[name] != d:
                raise ValueError(f"AVP name {name!r} already defined")
        if d.key in self.avps and self.avps[d.key] != d:
            raise ValueError(f"AVP {d.key} already defined")
        self.avps[d.key] = d
        for name in (d.name, *d.aliases):
            self.avp_names[name] = d
        return d

    def add_command(self, d: CommandDef) -> CommandDef:
        if d.key in self.commands and self.commands[d.key] != d:
            raise ValueError(f"command {d.key} already defined")
        self.commands[d.key] = d
        self.command_names[d.name] = d
        self.command_names[d.abbrev] = d
        return d

    def avp(self, code: int, vendor_id: int | None = None) -> AvpDef | None:
        return self.avps.get((code, vendor_id or c.VENDOR_IETF))

    def avp_by_name(self, name: str) -> AvpDef:
        try:
            return self.avp_names[name]
        except KeyError:
            raise KeyError(f"unknown AVP name {name!r}") from None

    def command(self, code: int, request: bool) -> CommandDef | None:
        return self.commands.get((code, request))

    def command_by_name(self, name: str) -> CommandDef:
        try:
            return self.command_names[name]
        except KeyError:
            raise KeyError(f"unknown command {name!r}") from None


DICTIONARY = Dictionary()

T = AvpType
MUST, MAY, MUST_NOT = Rule.MUST, Rule.MAY, Rule.MUST_NOT

_BASE: list[AvpDef] = [
    # RFC 6733 §4.5 and the RADIUS-derived AVPs it uses
    AvpDef(1, "User-Name", T.UTF8STRING),
    AvpDef(25, "Class", T.OCTET_STRING),
    AvpDef(27, "Session-Timeout", T.UNSIGNED32),
    AvpDef(33, "Proxy-State", T.OCTET_STRING),
    AvpDef(44, "Acct-Session-Id", T.OCTET_STRING),
    # Wireshark calls 50 "Accounting-Multi-Session-Id"
    AvpDef(50, "Acct-Multi-Session-Id", T.UTF8STRING, aliases=("Accounting-Multi-Session-Id",)),
    AvpDef(55, "Event-Timestamp", T.TIME),
    AvpDef(85, "Acct-Interim-Interval", T.UNSIGNED32),
    AvpDef(257, "Host-IP-Address", T.ADDRESS),
    AvpDef(258, "Auth-Application-Id", T.UNSIGNED32),
    AvpDef(259, "Acct-Application-Id", T.UNSIGNED32),
    AvpDef(260, "Vendor-Specific-Application-Id", T.GROUPED),
    AvpDef(261, "Redirect-Host-Usage", T.ENUMERATED, enum=c.RedirectHostUsage),
    AvpDef(262, "Redirect-Max-Cache-Time", T.UNSIGNED32),
    AvpDef(263, "Session-Id", T.UTF8STRING),
    AvpDef(264, "Origin-Host", T.DIAMETER_IDENTITY),
    AvpDef(265, "Supported-Vendor-Id", T.UNSIGNED32),
    AvpDef(266, "Vendor-Id", T.UNSIGNED32),
    AvpDef(267, "Firmware-Revision", T.UNSIGNED32, m_rule=MUST_NOT),
    # Wireshark: Enumerated (Integer32); RFC 6733: Unsigned32. Same 4 bytes.
    AvpDef(268, "Result-Code", T.UNSIGNED32, enum=c.ResultCode),
    AvpDef(269, "Product-Name", T.UTF8STRING, m_rule=MUST_NOT),
    AvpDef(270, "Session-Binding", T.UNSIGNED32),
    AvpDef(271, "Session-Server-Failover", T.ENUMERATED, enum=c.SessionServerFailover),
    AvpDef(272, "Multi-Round-Time-Out", T.UNSIGNED32),
    AvpDef(273, "Disconnect-Cause", T.ENUMERATED, enum=c.DisconnectCause),
    AvpDef(274, "Auth-Request-Type", T.ENUMERATED, enum=c.AuthRequestType),
    AvpDef(276, "Auth-Grace-Period", T.UNSIGNED32),
    AvpDef(277, "Auth-Session-State", T.ENUMERATED, enum=c.AuthSessionState),
    AvpDef(278, "Origin-State-Id", T.UNSIGNED32),
    AvpDef(279, "Failed-AVP", T.GROUPED),
    AvpDef(280, "Proxy-Host", T.DIAMETER_IDENTITY),
    AvpDef(281, "Error-Message", T.UTF8STRING, m_rule=MUST_NOT),
    AvpDef(282, "Route-Record", T.DIAMETER_IDENTITY),
    AvpDef(283, "Destination-Realm", T.DIAMETER_IDENTITY),
    AvpDef(284, "Proxy-Info", T.GROUPED),
    AvpDef(285, "Re-Auth-Request-Type", T.ENUMERATED, enum=c.ReAuthRequestType),
    AvpDef(287, "Accounting-Sub-Session-Id", T.UNSIGNED64),
    # Wireshark: Integer32; RFC 6733 §8.9: Unsigned32. Same 4 bytes.
    AvpDef(291, "Authorization-Lifetime", T.UNSIGNED32),
    AvpDef(292, "Redirect-Host", T.DIAMETER_URI),
    AvpDef(293, "Destination-Host", T.DIAMETER_IDENTITY),
    AvpDef(294, "Error-Reporting-Host", T.DIAMETER_IDENTITY, m_rule=MUST_NOT),
    AvpDef(295, "Termination-Cause", T.ENUMERATED, enum=c.TerminationCause),
    AvpDef(296, "Origin-Realm", T.DIAMETER_IDENTITY),
    AvpDef(297, "Experimental-Result", T.GROUPED),
    AvpDef(298, "Experimental-Result-Code", T.UNSIGNED32),
    AvpDef(299, "Inband-Security-Id", T.UNSIGNED32, enum=c.InbandSecurityId),
    # RFC 7155 (NASREQ), used by AAA agents translating from RADIUS
    AvpDef(408, "Origin-AAA-Protocol", T.ENUMERATED, enum=c.OriginAAAProtocol),
]

_MIP4: list[AvpDef] = [
    # RFC 4004 §7 and §9; all M=must, V=mustnot. Wireshark types Address AVPs as
    # "IPAddress" (same Address encoding) and MIP-Feature-Vector as Enumerated (RFC: Unsigned32).
    AvpDef(318, "MIP-FA-to-HA-SPI", T.UNSIGNED32),
    AvpDef(319, "MIP-FA-to-MN-SPI", T.UNSIGNED32),
    AvpDef(320, "MIP-Reg-Request", T.OCTET_STRING),
    AvpDef(321, "MIP-Reg-Reply", T.OCTET_STRING),
    AvpDef(322, "MIP-MN-AAA-Auth", T.GROUPED),
    AvpDef(323, "MIP-HA-to-FA-SPI", T.UNSIGNED32),
    AvpDef(325, "MIP-MN-to-FA-MSA", T.GROUPED),
    AvpDef(326, "MIP-FA-to-MN-MSA", T.GROUPED),
    AvpDef(328, "MIP-FA-to-HA-MSA", T.GROUPED),
    AvpDef(329, "MIP-HA-to-FA-MSA", T.GROUPED),
    AvpDef(331, "MIP-MN-to-HA-MSA", T.GROUPED),
    AvpDef(332, "MIP-HA-to-MN-MSA", T.GROUPED),
    AvpDef(333, "MIP-Mobile-Node-Address", T.ADDRESS),
    AvpDef(334, "MIP-Home-Agent-Address", T.ADDRESS),
    AvpDef(335, "MIP-Nonce", T.OCTET_STRING),
    AvpDef(336, "MIP-Candidate-Home-Agent-Host", T.DIAMETER_IDENTITY),
    AvpDef(337, "MIP-Feature-Vector", T.UNSIGNED32, enum=c.MipFeatureVector),
    AvpDef(338, "MIP-Auth-Input-Data-Length", T.UNSIGNED32),
    AvpDef(339, "MIP-Authenticator-Length", T.UNSIGNED32),
    AvpDef(340, "MIP-Authenticator-Offset", T.UNSIGNED32),
    AvpDef(341, "MIP-MN-AAA-SPI", T.UNSIGNED32),
    AvpDef(342, "MIP-Filter-Rule", T.IP_FILTER_RULE),
    AvpDef(343, "MIP-Session-Key", T.OCTET_STRING, secret=True),
    AvpDef(344, "MIP-FA-Challenge", T.OCTET_STRING),
    AvpDef(345, "MIP-Algorithm-Type", T.ENUMERATED, enum=c.MipAlgorithmType),
    AvpDef(346, "MIP-Replay-Mode", T.ENUMERATED, enum=c.MipReplayMode),
    AvpDef(347, "MIP-Originating-Foreign-AAA", T.GROUPED),
    AvpDef(348, "MIP-Home-Agent-Host", T.GROUPED),
    AvpDef(367, "MIP-MSA-Lifetime", T.UNSIGNED32),
]

V = c.VENDOR_MIPVPN
_VPN: list[AvpDef] = [
    # Our VPN information, vendor 32473: V bit set, M bit clear (docs/protocol.md)
    AvpDef(1, "VPN-Info", T.GROUPED, V, MUST_NOT),
    AvpDef(2, "VPN-Path-Id", T.UNSIGNED32, V, MUST_NOT),
    AvpDef(3, "VPN-Endpoint-Local", T.ADDRESS, V, MUST_NOT),
    AvpDef(4, "VPN-Endpoint-Remote", T.ADDRESS, V, MUST_NOT),
    AvpDef(5, "VPN-Endpoint-Local-Type", T.ENUMERATED, V, MUST_NOT, enum=c.VpnEndpointType),
    AvpDef(6, "VPN-Endpoint-Remote-Type", T.ENUMERATED, V, MUST_NOT, enum=c.VpnEndpointType),
    AvpDef(7, "VPN-Selector-Local", T.IP_PREFIX, V, MUST_NOT),
    AvpDef(8, "VPN-Selector-Remote", T.IP_PREFIX, V, MUST_NOT),
    AvpDef(9, "VPN-ESP-Suite", T.UTF8STRING, V, MUST_NOT),
    AvpDef(10, "VPN-SPI-In", T.UNSIGNED32, V, MUST_NOT),
    AvpDef(11, "VPN-SPI-Out", T.UNSIGNED32, V, MUST_NOT),
    AvpDef(12, "VPN-Key-In", T.OCTET_STRING, V, MUST_NOT, secret=True),
    AvpDef(13, "VPN-Key-Out", T.OCTET_STRING, V, MUST_NOT, secret=True),
    AvpDef(14, "VPN-IKE-PSK", T.OCTET_STRING, V, MUST_NOT, secret=True),
    AvpDef(15, "VPN-Lifetime", T.UNSIGNED32, V, MUST_NOT),
    AvpDef(16, "VPN-QoS-Rate", T.UNSIGNED64, V, MUST_NOT),
    AvpDef(17, "VPN-QoS-Ceil", T.UNSIGNED64, V, MUST_NOT),
    AvpDef(18, "VPN-QoS-Priority", T.UNSIGNED32, V, MUST_NOT),
    AvpDef(19, "VPN-Distribution", T.ENUMERATED, V, MUST_NOT, enum=c.VpnDistribution),
    # The keys and PSK of the path, sealed for the agent that installs it (daemons.vpn.seal):
    # opaque to every relay; 12-14 are no longer sent.
    AvpDef(20, "VPN-Sealed-Keys", T.OCTET_STRING, V, MUST_NOT),
    # The AAAH -> AAAF key of the AAAF's local answer (claim 17, daemons.wire.mip.localanswer),
    # sealed for the AAAF (daemons.vpn.seal.seal_secret): opaque to relays and to the FA.
    AvpDef(21, "VPN-Local-Answer-Key", T.OCTET_STRING, V, MUST_NOT),
]

_COMMANDS: list[tuple[int, str, str, int | None, bool]] = [
    # code, name (+ "-Request"/"-Answer"), abbreviation stem (+ "R"/"A"), application, proxiable
    (c.CMD_CAPABILITIES_EXCHANGE, "Capabilities-Exchange", "CE", c.APP_COMMON, False),
    (c.CMD_RE_AUTH, "Re-Auth", "RA", None, True),
    (c.CMD_ABORT_SESSION, "Abort-Session", "AS", None, True),
    (c.CMD_SESSION_TERMINATION, "Session-Termination", "ST", None, True),
    (c.CMD_DEVICE_WATCHDOG, "Device-Watchdog", "DW", c.APP_COMMON, False),
    (c.CMD_DISCONNECT_PEER, "Disconnect-Peer", "DP", c.APP_COMMON, False),
    (c.CMD_AA_MOBILE_NODE, "AA-Mobile-Node", "AM", c.APP_MOBILE_IPV4, True),
    (c.CMD_HOME_AGENT_MIP, "Home-Agent-MIP", "HA", c.APP_MOBILE_IPV4, True),
]

for _d in (*_BASE, *_MIP4, *_VPN):
    DICTIONARY.add_avp(_d)
for _code, _name, _ab, _app, _pxy in _COMMANDS:
    DICTIONARY.add_command(CommandDef(_code, True, f"{_name}-Request", f"{_ab}R", _app, _pxy))
    DICTIONARY.add_command(CommandDef(_code, False, f"{_name}-Answer", f"{_ab}A", _app, _pxy))

SECRET_AVP_NAMES = frozenset(d.name for d in DICTIONARY.avps.values() if d.secret)
