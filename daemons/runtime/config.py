"""Daemon configuration: YAML files checked against typed dataclasses.

A wrong configuration stops the daemon at start with a message naming the file and the
field (``ha.yaml: mobile_nodes[0].key: missing``). Secrets are hex strings in the file and
``Secret`` objects in memory; an error about a secret never repeats its value.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from daemons.runtime.secret import Secret

T = TypeVar("T")
# Placeholders for fields that each role makes mandatory (daemons.roles: Role.required).
NO_ADDRESS = ipaddress.IPv4Address(0)
NO_PREFIX = ipaddress.IPv4Network("0.0.0.0/32")


class ConfigError(ValueError):
    def __init__(self, source: str, where: str, problem: str) -> None:
        super().__init__(f"{source}: {where}: {problem}")


class FieldError(ValueError):
    """A value of the right type that a configuration class refuses (its ``__post_init__``);
    loading a file turns it into a :class:`ConfigError` naming the file and the field."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


def _at_least(config: Any, minimum: float, *names: str, strictly: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value < minimum or (strictly and value == minimum):
            raise FieldError(name, f"must be {'greater than' if strictly else 'at least'} {minimum}, got {value!r}")


# ---- the configurations -----------------------------------------------------------------


@dataclass(frozen=True)
class SecurityAssociation:
    """A Mobile IP security association (RFC 5944 §1.6): SPI + key, HMAC-MD5."""

    spi: int
    key: Secret


@dataclass(frozen=True)
class MobileNodeEntry:
    """What the HA knows about one of its mobile nodes."""

    nai: str
    home_address: ipaddress.IPv4Address
    spi: int
    key: Secret


@dataclass(frozen=True)
class PeerAgent:
    """An FA-HA security association, seen from either side."""

    address: ipaddress.IPv4Address
    spi: int
    key: Secret


@dataclass(frozen=True)
class StaticPath:
    """A VPN path configured at start (claim 16: the CN-GW's static tunnel to the HA)."""

    path_id: int
    local: ipaddress.IPv4Address
    remote: ipaddress.IPv4Address
    local_type: str  # fa | ha | cngw-static | cngw-dynamic
    remote_type: str
    local_ts: list[ipaddress.IPv4Network]
    remote_ts: list[ipaddress.IPv4Network]
    psk: Secret
    suite: str = "aes128gcm16"
    spi_in: int = 0  # manual keys (xfrm backend); 0 = none
    spi_out: int = 0
    key_in: Secret | None = None
    key_out: Secret | None = None


@dataclass(frozen=True)
class SealKey:
    """A seal key (daemons.vpn.seal): the 256-bit key the AAAH shares with the agents that
    install paths, kept in a file of its own (64 hex digits, mode 0600). ``name`` is the
    recipient it opens envelopes for: an HA's Diameter identity, a dynamic CN-GW's name in
    the VPN database, the realm of a visited domain for its FAs."""

    name: str
    key_file: Path


SEAL_KEY_BYTES = 32


def private_file_problem(path: Path) -> str | None:
    """What is wrong with ``path`` as a file of key material (a seal key, a TLS private key):
    missing, not a regular file, or open to group or others; None when only its owner may use it.
    The one check every key file of every role gets (the callers name their field)."""
    try:
        st = Path(path).stat()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_mode & 0o077:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: key material must not be readable or writable by " \
               "group or others (chmod 600)"
    return None


def read_key_file(ref: SealKey, source: str, where: str) -> Secret:
    """The key in ``ref.key_file``; ConfigError naming ``where`` if the file is missing, open to
    group or others, or not 64 hex digits (the value is never repeated)."""
    path = Path(ref.key_file)
    problem = private_file_problem(path)
    if problem is not None:
        raise ConfigError(source, where, problem)
    try:
        with path.open() as f:
            text = f.read(4 * SEAL_KEY_BYTES).strip()
    except OSError as exc:
        raise ConfigError(source, where, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        text = ""
    try:
        key = Secret.from_hex(text)
    except ValueError:
        key = Secret(b"")
    if len(key) != SEAL_KEY_BYTES:
        raise ConfigError(source, where, f"{path} must hold {2 * SEAL_KEY_BYTES} hex digits (value withheld)")
    return key


def agent_seal_key(ref: SealKey | None, source: str, needed: bool, why: str) -> tuple[str, Secret] | None:
    """An agent's own seal key (its ``seal`` field): (recipient name, key), None when not
    configured; ConfigError ``seal`` when ``needed`` (``why``) and missing."""
    if ref is None:
        if needed:
            raise ConfigError(source, "seal", f"missing: {why} (a seal key file the AAAH shares)")
        return None
    return ref.name, read_key_file(ref, source, "seal.key_file")


@dataclass(frozen=True)
class DiameterPeer:
    """A Diameter peer we dial (and that may also connect to us, from ``address`` or
    ``source_addresses``)."""

    host: str  # Diameter identity: the Origin-Host its CEA/CER (and its TLS certificate) must carry
    realm: str  # its own realm: the Origin-Realm its CEA/CER must carry
    address: ipaddress.IPv4Address
    port: int | None = None  # None: the transport's port (TLS 5658, TCP 3868)
    # Other addresses it may connect to us from (e.g. a relay that also dials us, from the interface
    # that faces us); its own connections from anywhere else are refused (RFC 6733 §5.3: 3010).
    source_addresses: list[ipaddress.IPv4Network] = field(default_factory=list)
    # Realms whose requests we send it (an AAAF: the home realms behind a relay); empty: its realm.
    routes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AcceptedPeer:
    """A Diameter peer that may connect to us (RFC 6733 §5.3: a CER from anyone else is answered
    3010 DIAMETER_UNKNOWN_PEER): its identity and realm, and the addresses its connections come
    from (hosts or prefixes); over TLS its certificate must name the identity too."""

    host: str
    realm: str
    addresses: list[ipaddress.IPv4Network] = field(default_factory=list)  # at least one
    agent: bool = False  # it forwards others' requests (an AAAF, a relay): their Origin-Host is not its own


@dataclass(frozen=True)
class DiameterLimits:
    """What one peer may cost us (the Diameter engine's limits, daemons.diameter.local.Settings)."""

    max_message: int = 65536  # bytes of a message after the capabilities exchange (before: 4096)
    connections_per_source: int = 8  # transport connections from one source address
    pending_per_peer: int = 256  # requests of one peer in flight; beyond: 3004 DIAMETER_TOO_BUSY


@dataclass(frozen=True)
class DiameterTls:
    """This node's TLS credentials for Diameter (RFC 6733 §13; daemons.diameter.tls): the CA its
    peers' certificates must chain to, its own certificate (subjectAltName DNS = its
    ``diameter_host``) and private key (readable by its owner only), all PEM files. ``keylog``:
    write the TLS session secrets there for Wireshark (a lab and debugging aid: a warning at start)."""

    ca: Path
    cert: Path
    key: Path
    keylog: Path | None = None


@dataclass(frozen=True)
class Common:
    node: str
    role: str
    state_dir: Path
    control_socket: Path
    log_level: str = "INFO"
    ipsec_backend: str = "none"  # none | strongswan | xfrm
    run_dir: Path | None = None  # strongswan: where the node's charon keeps its VICI socket
    diameter_host: str = ""  # our Diameter identity, when we speak Diameter
    diameter_realm: str = ""
    aaa: DiameterPeer | None = None  # the AAA server we ask (FA: its AAAF)
    # The Diameter peers that may connect to us (HA: its AAAH(s); AAAF: its FAs; AAAH: its AAAFs or
    # relay). Nobody else gets in (RFC 6733 §5.3: 3010).
    accept_peers: list[AcceptedPeer] = field(default_factory=list)
    diameter_limits: DiameterLimits = field(default_factory=DiameterLimits)
    # How we speak Diameter: tls (RFC 6733 §13, port 5658, needs diameter_tls) or tcp (plain: peers
    # unauthenticated, keys in clear on the wire; a warning at start).
    diameter_transport: str = "tls"
    diameter_tls: DiameterTls | None = None
    static_paths: list[StaticPath] = field(default_factory=list)


@dataclass(frozen=True)
class HAConfig(Common):
    address: ipaddress.IPv4Address = NO_ADDRESS  # the Home Agent field of RRQs
    home_prefix: ipaddress.IPv4Network = NO_PREFIX
    home_interface: str = "access"
    max_lifetime: int = 300
    replay_window: float = 7.0  # seconds, RFC 5944 §5.7 timestamps
    mobile_nodes: list[MobileNodeEntry] = field(default_factory=list)
    foreign_agents: list[PeerAgent] = field(default_factory=list)
    # Dynamic CN-GWs (by tunnel address) and our binding security association with each (F4, F5, F8).
    correspondent_gateways: list[PeerAgent] = field(default_factory=list)
    binding_ack_timeout: float = 0.4  # first wait for a CN-GW's Binding Acknowledge; doubles, 3 tries
    seal: SealKey | None = None  # opens the keys the AAAH sealed for us (needed with Diameter)


@dataclass(frozen=True)
class FAConfig(Common):
    access_interface: str = "access"
    access_address: ipaddress.IPv4Address = NO_ADDRESS
    care_of_address: ipaddress.IPv4Address = NO_ADDRESS
    advertisement_interval: float = 1.0
    max_lifetime: int = 300
    replay_window: float = 7.0  # seconds, as the HA's: Binding Update timestamps from other FAs (RFC 5944 §5.7)
    challenge: bool = True
    # A challenge is accepted for (window - 1) .. window advertisement intervals after it was advertised
    # (daemons.agents.challenges: no list, so solicitations cannot push one out).
    challenge_window: int = 8
    registration_timeout: float = 5.0  # no reply from the HA (or AAA) by then: code 78
    home_agents: list[PeerAgent] = field(default_factory=list)
    # Neighbouring FAs (by care-of address) we exchange Binding Updates with when an MN moves.
    peer_agents: list[PeerAgent] = field(default_factory=list)
    forwarding_lifetime: int = 10  # how long an old FA keeps forwarding for a moved MN (F6)
    smooth_handoff: bool = True  # give the previous FA a forwarding path to us (F6); off: only tell it
    seal: SealKey | None = None  # our domain's: opens the keys the AAAH sealed for its FAs (needed with aaa)
    # Per-source limits on the access side (token buckets, daemons.runtime.ratelimit): a source may
    # send `burst` at once, then `rate` a second; the rest is dropped and counted (`show counters`).
    # An MN sends one RRQ per registration, its retransmissions back off from 1 s, and 1-4
    # solicitations when it attaches: far below these.
    rrq_rate: float = 2.0
    rrq_burst: int = 10
    solicitation_rate: float = 20.0
    solicitation_burst: int = 20
    rate_limit_sources: int = 4096  # sources tracked per limit; when busy beyond, newcomers share one bucket

    def __post_init__(self) -> None:
        _at_least(self, 0, "advertisement_interval", "rrq_rate", "solicitation_rate", strictly=True)
        _at_least(self, 1, "challenge_window", "rrq_burst", "solicitation_burst", "rate_limit_sources")


@dataclass(frozen=True)
class MNConfig(Common):
    nai: str = ""
    home_address: ipaddress.IPv4Address = NO_ADDRESS
    home_prefix: ipaddress.IPv4Network = NO_PREFIX
    home_agent: ipaddress.IPv4Address = NO_ADDRESS
    interface: str = "eth0"
    lifetime: int = 300
    mn_ha: SecurityAssociation | None = None
    mn_aaa: SecurityAssociation | None = None
    retransmit_initial: float = 1.0  # RFC 5944 §3.6.3: back-off doubles up to the maximum
    retransmit_max: float = 8.0


@dataclass(frozen=True)
class CNGWConfig(Common):
    address: ipaddress.IPv4Address = NO_ADDRESS  # our tunnel endpoint
    # Dynamic mode (F4, F5, F8): the home agents that may send us Binding Updates, with our
    # binding security association with each (none: static only).
    home_agents: list[PeerAgent] = field(default_factory=list)
    binding_request_threshold: float = 10.0  # remaining binding lifetime (s) below which we ask the HA (BR)
    binding_request_interval: float = 1.0  # while below it, one Binding Request per interval at most
    replay_window: float = 7.0  # seconds, as the HA's: Binding Update timestamps (RFC 5944 §5.7)
    seal: SealKey | None = None  # opens the keys the AAAH sealed for us (needed in dynamic mode)


@dataclass(frozen=True)
class HomeAgentRef:
    """A home agent the home AAA server sends HARs to (it dials the HA)."""

    address: ipaddress.IPv4Address  # the Home Agent field of RRQs: picks the HA
    diameter_host: str  # its Diameter identity (Destination-Host of the HAR)
    home_prefix: ipaddress.IPv4Network  # its side of the static HA-CN-GW tunnel
    port: int | None = None  # None: the transport's Diameter port
    diameter_address: ipaddress.IPv4Address | None = None  # where to dial it, if not at ``address``
    diameter_realm: str = ""  # its realm (its CEA's Origin-Realm), if not ours


@dataclass(frozen=True)
class AAAHConfig(Common):
    address: ipaddress.IPv4Address = NO_ADDRESS  # we listen here for Diameter (AAAFs dial us)
    port: int | None = None  # None: the transport's Diameter port (TLS 5658, TCP 3868)
    db_url: str = ""  # the VPN database (users, profiles, correspondence table): sqlite:/// or postgresql://
    master_secret: Secret | None = None  # the domain's master secret: static tunnels' PSKs and keys
    home_agents: list[HomeAgentRef] = field(default_factory=list)
    har_timeout: float = 3.0  # no HAA by then: 4006 DIAMETER_ERROR_HA_NOT_AVAILABLE (below the FA's timeout)
    static_suite: str = "aes128gcm16"  # ESP suite of the static HA-CN-GW tunnels (as the CN-GWs are provisioned)
    profile_api: ProfileApiConfig | None = None  # users' HTTP API to their own profiles (claim 24); None: off
    # The seal key of every recipient we seal keys for (daemons.vpn.seal): each HA (its Diameter
    # identity), each dynamic CN-GW (its name in the VPN database), each visited domain's FAs (realm).
    seal_keys: list[SealKey] = field(default_factory=list)


@dataclass(frozen=True)
class ProfileApiConfig:
    """Where the AAAH serves the user self-service profile API (claim 24, F7; daemons.aaa.profileapi):
    HTTPS (TLS 1.2 or later) with ``cert_file`` and ``key_file`` (the key mode 0600: checked at
    start); plain HTTP only with ``tls: false`` (a warning at start: bearer tokens in clear)."""

    address: ipaddress.IPv4Address
    port: int = 8443
    tls: bool = True
    cert_file: Path | None = None  # PEM: the server's certificate (chain)
    key_file: Path | None = None  # PEM: its private key, readable by its owner only

    def __post_init__(self) -> None:
        if self.tls:
            for name in ("cert_file", "key_file"):
                if getattr(self, name) is None:
                    raise FieldError(name, "required: the API serves HTTPS (tls: false for plain HTTP)")


@dataclass(frozen=True)
class AAAFConfig(Common):
    address: ipaddress.IPv4Address = NO_ADDRESS  # we listen here for Diameter (FAs dial us)
    port: int | None = None  # None: the transport's Diameter port (TLS 5658, TCP 3868)
    home_servers: list[DiameterPeer] = field(default_factory=list)  # the AAAH of each realm; we dial them
    relay_timeout: float = 4.0  # no AMA from the AAAH by then: 3002 back to the FA
    # Opens the local-answer keys the AAAH seals for us (claim 17); without it every move goes
    # to the AAAH.
    seal: SealKey | None = None


# ---- loading ------------------------------------------------------------------------------


def read(path: Path) -> tuple[dict[str, Any], str]:
    """A configuration file's mapping and the name errors give it (``daemons.roles.load_config``
    checks it against its role and builds it)."""
    source = path.name
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), "file", f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        # Only the problem and the line: PyYAML's message quotes the offending text, which in
        # a daemon's configuration may be a key.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(source, "file", f"not valid YAML{where}: {getattr(exc, 'problem', None) or 'syntax error'}") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(source, "file", "must be a mapping")
    return data, source


def dump(config: Any) -> dict[str, Any]:
    """A config object as YAML-ready data (secrets as hex: only for writing config files)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue  # leave defaults out: the file says only what differs
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        out[f.name] = _dump_value(value)
    return out


def _dump_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dump(value)
    if isinstance(value, list):
        return [_dump_value(v) for v in value]
    if isinstance(value, Secret):
        return value.reveal().hex()
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv4Network, Path)):
        return str(value)
    return value


def build(cls: type[T], data: Any, source: str, where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(source, where or "file", "must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(source, _join(where, unknown[0]), f"unknown field (known: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        here = _join(where, f.name)
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, here, "missing")
            continue
        values[f.name] = _convert(hints[f.name], data[f.name], source, here)
    try:
        return cls(**values)
    except FieldError as exc:
        raise ConfigError(source, _join(where, exc.field), exc.problem) from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(hint: Any, value: Any, source: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(args[0], value, source, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, where, "must be a list")
        (item,) = typing.get_args(hint)
        return [_convert(item, v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, where)  # type: ignore[arg-type]
    if hint is Secret:
        if not isinstance(value, str):
            raise ConfigError(source, where, "must be a hex string")
        try:
            return Secret.from_hex(value)
        except ValueError:
            raise ConfigError(source, where, "not a hex string (value withheld)") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, where, f"must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and isinstance(value, float)):
            raise ConfigError(source, where, f"must be a{'n integer' if hint is int else ' number'}, got {value!r}")
        if value < 0:
            raise ConfigError(source, where, f"must not be negative, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(source, where, f"must be a non-empty string, got {value!r}")
        return value
    if hint is Path:
        return Path(str(value))
    if hint in (ipaddress.IPv4Address, ipaddress.IPv4Network):
        try:
            return hint(str(value))
        except ValueError as exc:
            raise ConfigError(source, where, f"malformed {hint.__name__[4:].lower()}: {exc}") from None
    raise ConfigError(source, where, f"unsupported type {hint!r}")  # a bug in this module
