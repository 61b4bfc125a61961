"""VPN information: the service profile that travels from the AAAH to every apparatus.

The "MA protocol processing section" of claim 9: it parses the VPN info out of messages
into ``VpnPath`` objects (and builds it), nothing else; ``daemons.vpn.mavpn`` turns paths into
tunnels. One wire format everywhere: a ``VPN-Info`` grouped Diameter AVP (vendor 32473,
docs/protocol.md) per path — at top level in AMA/HAR/HAA, and as the payload of a Mobile IP
CVSE (vendor 32473, type VPN_INFO) in Binding Updates, so there is one codec for both.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from daemons.runtime.config import StaticPath
from daemons.runtime.secret import Secret
from daemons.vpn.keys import forward_psk, static_esp_key
from daemons.vpn.path import (
    DirectionKeys,
    Endpoint,
    EndpointType,
    EspSuite,
    Qos,
    SealedSecurity,
    SecurityService,
    VpnPath,
)
from daemons.wire.diameter import Avp, DecodeError
from daemons.wire.diameter.avp import decode_avps

ENDPOINT_CODES = {EndpointType.FA: 1, EndpointType.HA: 2, EndpointType.CNGW_STATIC: 3,
                  EndpointType.CNGW_DYNAMIC: 4}
ENDPOINT_TYPES = {v: k for k, v in ENDPOINT_CODES.items()}
AT_REGISTRATION, ON_TRAFFIC = 0, 1


class VpnInfoError(ValueError):
    """A VPN-Info that cannot become a path; the message names the member."""


class ClearKeysRefused(VpnInfoError):
    """A VPN-Info from a wire carries keys in clear (VPN-Key-In/Out, VPN-IKE-PSK): nobody
    sends them any more (they travel sealed, VPN-Sealed-Keys), so such a message is refused."""


CLEAR_KEY_AVPS = ("VPN-Key-In", "VPN-Key-Out", "VPN-IKE-PSK")


@dataclass(frozen=True)
class VpnInfo:
    """One path of one user, as the receiving node will install it."""

    nai: str
    path_id: int
    path: VpnPath
    distribution: int = AT_REGISTRATION

    @staticmethod
    def path_name(nai: str, path_id: int) -> str:
        return f"{nai}:{path_id}"

    def mirrored(self) -> VpnInfo:
        """The same path for the other end (endpoints, selectors and SA directions swap)."""
        return VpnInfo(self.nai, self.path_id, self.path.mirrored(), self.distribution)

    def with_endpoints(self, local: IPv4Address | None = None, remote: IPv4Address | None = None) -> VpnInfo:
        """A copy with an endpoint moved (an MN changed FA): claims 17, 18, 20-23."""
        from dataclasses import replace

        path = self.path
        if local is not None:
            path = replace(path, local=Endpoint(local, path.local.type))
        if remote is not None:
            path = replace(path, remote=Endpoint(remote, path.remote.type))
        return VpnInfo(self.nai, self.path_id, path, self.distribution)

    # ---- to and from the VPN-Info AVP ---------------------------------------------------
    def to_avp(self) -> Avp:
        """The VPN-Info AVP as it goes on a wire: never a key in clear. A sealed path carries
        its VPN-Sealed-Keys envelope (``daemons.vpn.seal``: opaque to whoever passes it on);
        an open one only its SPIs, for a receiver that derives its keys itself (F6,
        :func:`forward_security`)."""
        return Avp.new("VPN-Info", self._members())

    def _members(self) -> list[Avp]:
        p = self.path
        sec = p.security
        members = [
            Avp.new("VPN-Path-Id", self.path_id),
            Avp.new("VPN-Endpoint-Local", p.local.address),
            Avp.new("VPN-Endpoint-Remote", p.remote.address),
            Avp.new("VPN-Endpoint-Local-Type", ENDPOINT_CODES[p.local.type]),
            Avp.new("VPN-Endpoint-Remote-Type", ENDPOINT_CODES[p.remote.type]),
            *(Avp.new("VPN-Selector-Local", str(n)) for n in p.local_ts),
            *(Avp.new("VPN-Selector-Remote", str(n)) for n in p.remote_ts),
            Avp.new("VPN-ESP-Suite", sec.suite.value),
            Avp.new("VPN-Lifetime", sec.lifetime),
            Avp.new("VPN-Distribution", self.distribution),
        ]
        spis = spis_of(sec)
        if spis is not None:
            members += [Avp.new("VPN-SPI-In", spis[0]), Avp.new("VPN-SPI-Out", spis[1])]
        if isinstance(sec, SealedSecurity):
            members.append(Avp.new("VPN-Sealed-Keys", sec.blob))
        if p.qos is not None:
            members += [Avp.new("VPN-QoS-Rate", p.qos.rate), Avp.new("VPN-QoS-Ceil", p.qos.effective_ceil),
                        Avp.new("VPN-QoS-Priority", p.qos.priority)]
        return members

    def record_avp(self) -> Avp:
        """The VPN-Info as a private state file keeps it: keys in clear (VPN-Key-In/Out,
        VPN-IKE-PSK), for this node only; never sent (:meth:`to_avp` is the wire form)."""
        members = self._members()
        sec = self.path.security
        if isinstance(sec, SecurityService):
            if sec.inbound is not None and sec.outbound is not None:
                members += [Avp.new("VPN-Key-In", _key_bytes(sec.inbound)),
                            Avp.new("VPN-Key-Out", _key_bytes(sec.outbound))]
            if sec.psk is not None:
                members.append(Avp.new("VPN-IKE-PSK", sec.psk))
        return Avp.new("VPN-Info", members)

    @classmethod
    def from_avp(cls, avp: Avp, nai: str, derive: SecretSource | None = None, *,
                 clear_keys: bool = False) -> VpnInfo:
        """Parse one VPN-Info. A VPN-Sealed-Keys envelope is kept as it is (a
        :class:`SealedSecurity`: the recipient opens it with ``daemons.vpn.seal.unseal``).
        Keys in clear are refused (:class:`ClearKeysRefused`) unless ``clear_keys`` (a state
        file's record, :func:`from_record`). Without key material, ``derive`` (if given)
        supplies the security service from the endpoints, suite, SPIs and lifetime (F6)."""

        def need(name: str):
            value = avp.get(name)
            if value is None:
                raise VpnInfoError(f"VPN-Info: missing {name}")
            return value

        try:
            suite = EspSuite(need("VPN-ESP-Suite"))
        except ValueError:
            raise VpnInfoError(f"VPN-Info: unknown VPN-ESP-Suite {avp.get('VPN-ESP-Suite')!r}") from None
        path_id = int(need("VPN-Path-Id"))
        clear = [name for name in CLEAR_KEY_AVPS if avp.find(name) is not None]
        if clear and not clear_keys:
            raise ClearKeysRefused(f"VPN-Info {path_id}: key material in clear ({', '.join(clear)}) refused")
        try:
            qos = None
            if avp.find("VPN-QoS-Rate") is not None:
                qos = Qos(int(need("VPN-QoS-Rate")), avp.get("VPN-QoS-Ceil"),
                          int(avp.get("VPN-QoS-Priority", default=4)))
            local = Endpoint(IPv4Address(need("VPN-Endpoint-Local")),
                             ENDPOINT_TYPES[int(need("VPN-Endpoint-Local-Type"))])
            remote = Endpoint(IPv4Address(need("VPN-Endpoint-Remote")),
                              ENDPOINT_TYPES[int(need("VPN-Endpoint-Remote-Type"))])
            lifetime = int(avp.get("VPN-Lifetime", default=3600))
            sealed = avp.get("VPN-Sealed-Keys")
            security: SecurityService | SealedSecurity
            if sealed is not None:
                spi_in, spi_out = avp.get("VPN-SPI-In"), avp.get("VPN-SPI-Out")
                security = SealedSecurity(suite, lifetime, None if spi_in is None else int(spi_in),
                                          None if spi_out is None else int(spi_out), bytes(sealed))
            elif clear:
                inbound = outbound = None
                if avp.find("VPN-Key-In") is not None:
                    inbound = direction_keys(suite, need("VPN-SPI-In"), need("VPN-Key-In"))
                    outbound = direction_keys(suite, need("VPN-SPI-Out"), need("VPN-Key-Out"))
                security = SecurityService(suite, outbound, inbound, avp.get("VPN-IKE-PSK"), lifetime)
            elif derive is not None:
                security = derive(local.address, remote.address, suite, int(need("VPN-SPI-Out")),
                                  int(need("VPN-SPI-In")), lifetime)
            else:
                raise VpnInfoError(f"VPN-Info {path_id}: no key material (no VPN-Sealed-Keys)")
            path = VpnPath(
                id=cls.path_name(nai, path_id), local=local, remote=remote,
                local_ts=tuple(IPv4Network(a.value) for a in avp.find_all("VPN-Selector-Local")),
                remote_ts=tuple(IPv4Network(a.value) for a in avp.find_all("VPN-Selector-Remote")),
                security=security, qos=qos)
        except VpnInfoError:
            raise
        except (KeyError, ValueError) as exc:  # every malformed member ends up as VpnInfoError
            raise VpnInfoError(f"VPN-Info {path_id}: {exc}") from None
        return cls(nai, path_id, path, int(avp.get("VPN-Distribution", default=AT_REGISTRATION)))

    @property
    def sealed(self) -> bool:
        """Its keys are sealed for a recipient (a relay's copy; not installable as it is)."""
        return isinstance(self.path.security, SealedSecurity)


def spis_of(security: SecurityService | SealedSecurity) -> tuple[int, int] | None:
    """(SPI-In, SPI-Out) of a manually keyed path, sealed or not; None without SPIs."""
    if isinstance(security, SealedSecurity):
        if security.spi_in is None or security.spi_out is None:
            return None
        return security.spi_in, security.spi_out
    if security.inbound is None or security.outbound is None:
        return None
    return security.inbound.spi, security.outbound.spi


def _key_bytes(keys: DirectionKeys) -> Secret:
    auth = keys.auth_key.reveal() if keys.auth_key is not None else b""
    return Secret(keys.enc_key.reveal() + auth)


def direction_keys(suite: EspSuite, spi: int, material: Secret) -> DirectionKeys:
    """One VPN-Key AVP holds the encryption key (with salt for GCM) followed by the
    integrity key for non-AEAD suites."""
    raw = material.reveal()
    want = suite.enc_key_len + suite.auth_key_len
    if len(raw) != want:
        raise VpnInfoError(f"VPN-Key for {suite.value} must be {want} bytes")
    auth = Secret(raw[suite.enc_key_len:]) if suite.auth_key_len else None
    return DirectionKeys(int(spi), Secret(raw[: suite.enc_key_len]), auth)


def from_message(container, nai: str) -> list[VpnInfo]:
    """Every VPN-Info at the top level of a Diameter message."""
    return [VpnInfo.from_avp(avp, nai) for avp in container.find_all("VPN-Info")]


def moved_to(infos: Iterable[VpnInfo], coa: IPv4Address | str) -> list[VpnInfo]:
    """The paths with their FA end moved to the care-of address ``coa`` (an MN changed FA:
    claims 7, 17, 18, 20, 21): the local end of a path the FA installs, else the remote end
    of a path to an FA; paths without an FA end, or already there, are kept as they are."""
    coa = IPv4Address(coa)
    out = []
    for info in infos:
        local, remote = info.path.local, info.path.remote
        if local.type is EndpointType.FA:
            if local.address != coa:
                info = info.with_endpoints(local=coa)
        elif remote.type is EndpointType.FA and remote.address != coa:
            info = info.with_endpoints(remote=coa)
        out.append(info)
    return out


# ---- persistence: what a state file holds (key material: the file must be private) ----------
def to_record(infos: Iterable[VpnInfo]) -> list[str]:
    """Paths as a state file keeps them: each VPN-Info AVP, keys included (in clear if this
    node holds them so, else sealed), in hex."""
    return [info.record_avp().encode().hex() for info in infos]


def from_record(record: Iterable[str], nai: str) -> list[VpnInfo]:
    """The paths of :func:`to_record`; VpnInfoError when the record is not one."""
    try:
        return [VpnInfo.from_avp(avp, nai, clear_keys=True) for h in record for avp in decode_avps(bytes.fromhex(h))]
    except VpnInfoError:
        raise
    except (ValueError, TypeError, KeyError) as exc:  # DecodeError is a ValueError
        raise VpnInfoError(f"stored VPN info of {nai}: {type(exc).__name__}: {exc}") from None


def encode_for_mip(infos: list[VpnInfo]) -> bytes:
    """The payload of a Mobile IP CVSE carrying VPN info: the same VPN-Info AVPs (no key in
    clear: sealed, or none for a receiver that derives them, F6)."""
    return b"".join(info.to_avp().encode() for info in infos)


def decode_from_mip(data: bytes, nai: str, derive: SecretSource | None = None) -> list[VpnInfo]:
    try:
        avps = decode_avps(data)
    except DecodeError as exc:
        raise VpnInfoError(f"VPN info in vendor extension: {exc}") from None
    return [VpnInfo.from_avp(a, nai, derive) for a in avps if a.name == "VPN-Info"]


# ---- smooth handoff (F6, claims 22, 23) ---------------------------------------------------
FORWARD_PATH_ID = 0  # the AAAH numbers a user's paths from 1
# (local, remote, suite, spi_out, spi_in, lifetime) -> the security service of a path
SecretSource = Callable[[IPv4Address, IPv4Address, EspSuite, int, int, int], SecurityService]


def forward_security(fa_fa_key: Secret) -> SecretSource:
    """Keys of a forwarding path between two FAs, derived from the FA-FA security
    association both already share: the path's IKE PSK (bound to its ends and SPIs) and, per direction, ESP keys
    bound to the SPI. Both FAs compute the same values, so the Binding Update that carries
    the VPN info copy carries no key material."""

    def derive(local: IPv4Address, remote: IPv4Address, suite: EspSuite, spi_out: int, spi_in: int,
               lifetime: int) -> SecurityService:
        return SecurityService(
            suite,
            outbound=direction_keys(suite, spi_out, static_esp_key(fa_fa_key, local, remote, spi_out, suite)),
            inbound=direction_keys(suite, spi_in, static_esp_key(fa_fa_key, remote, local, spi_in, suite)),
            psk=forward_psk(fa_fa_key, local, spi_in, remote, spi_out), lifetime=lifetime)

    return derive


def forward_copy(info: VpnInfo, old_fa: IPv4Address, lifetime: int, fa_fa_key: Secret) -> VpnInfo:
    """Claims 22/23: the new FA's copy of its FA⇄HA VPN info for the previous FA, origin
    rewritten to the old FA and destination to the new one, as the old FA will install it:
    whatever reaches the old FA for the MN's home address (any ⇄ home address) goes to the
    new FA, with the same ESP suite and QoS, for ``lifetime`` seconds. SPIs are random in a
    range the AAAH never hands out (it counts up from 0x10000)."""
    new_fa = info.path.local.address
    spi_out, spi_in = (0xF0000000 | secrets.randbits(28) for _ in range(2))
    path = VpnPath(
        id=VpnInfo.path_name(info.nai, FORWARD_PATH_ID),
        local=Endpoint(old_fa, EndpointType.FA), remote=Endpoint(new_fa, EndpointType.FA),
        local_ts=(IPv4Network("0.0.0.0/0"),), remote_ts=info.path.local_ts,
        security=forward_security(fa_fa_key)(old_fa, new_fa, info.path.security.suite, spi_out, spi_in, lifetime),
        qos=info.path.qos)
    return VpnInfo(info.nai, FORWARD_PATH_ID, path, info.distribution)


STATIC_OWNER = "static"  # the cache key of configured (non-AAA) paths


def from_static(cfg: StaticPath) -> VpnInfo:
    """A path from the daemon's configuration (e.g. the CN-GW's static tunnel to the HA)."""
    suite = EspSuite(cfg.suite)
    inbound = outbound = None
    if cfg.spi_in and cfg.key_in is not None and cfg.key_out is not None:
        inbound = direction_keys(suite, cfg.spi_in, cfg.key_in)
        outbound = direction_keys(suite, cfg.spi_out, cfg.key_out)
    path = VpnPath(id=VpnInfo.path_name(STATIC_OWNER, cfg.path_id),
                   local=Endpoint(cfg.local, EndpointType(cfg.local_type)),
                   remote=Endpoint(cfg.remote, EndpointType(cfg.remote_type)),
                   local_ts=tuple(cfg.local_ts), remote_ts=tuple(cfg.remote_ts),
                   security=SecurityService(suite, outbound, inbound, cfg.psk))
    return VpnInfo(STATIC_OWNER, cfg.path_id, path)
