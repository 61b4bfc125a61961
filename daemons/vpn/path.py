"""The VPN path model and the backend-neutral path API.

A :class:`VpnPath` is one protected path between two network apparatuses (FA, HA, CN-GW), as
seen from the node that installs it: ``local`` is this node's gateway endpoint, ``remote`` the
peer's.  The AAAH describes a path once; each end gets its own view (:meth:`VpnPath.mirrored`).

Backends (:class:`PathBackend`) turn paths into IPsec state: the xfrm backend writes SAs and
policies straight into the kernel (keys and SPIs from the AAAH), the strongswan backend lets
charon negotiate the CHILD_SAs with an AAAH-distributed IKE pre-shared secret.  What a backend
can do beyond the common API, it says in :attr:`PathBackend.capabilities` (a
:class:`Capability` flag set), the way strongSwan's kernel interfaces answer ``get_features()``.

**When a path comes up** (``VpnPath.on_traffic``, claim 5): by default a backend brings the
SAs up at ``install`` (at registration).  A path with ``on_traffic`` set is installed as a
*trap*: its policies (and whatever the backend needs to recognise the path's first packet) are
in place, but no outbound SA exists until the first packet that matches the path's selectors
arrives at this node; then the backend sets the SAs up itself (xfrm: on the kernel's
XFRM_MSG_ACQUIRE it installs the SAs it holds, keys from the AAAH; strongswan: charon
negotiates the CHILD_SA).  Until then the path reports :attr:`PathState.TRAPPED`; the first
packet itself is dropped (IPsec acquire semantics), later ones are carried.

Secrets are :class:`daemons.runtime.secret.Secret`; nothing here prints them, and
:class:`PathStatus` (what ``list`` and ``show paths`` report) never holds key material.
"""

from __future__ import annotations

import abc
import builtins
import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from daemons.runtime.secret import Secret

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

# Path ids become charon CHILD_SA names, tc comments and log keys: keep them to a safe charset.
_PATH_ID_RE = re.compile(r"^[A-Za-z0-9@._:+-]{1,200}$")


class EndpointType(enum.Enum):
    """The kind of network apparatus at one end of a path."""

    FA = "fa"
    HA = "ha"
    CNGW_STATIC = "cngw-static"
    CNGW_DYNAMIC = "cngw-dynamic"


class EspSuite(enum.Enum):
    """ESP transforms; the value is strongSwan's proposal keyword."""

    AES128GCM16 = "aes128gcm16"
    AES256GCM16 = "aes256gcm16"
    AES128_SHA256 = "aes128-sha256"  # AES-CBC-128 + HMAC-SHA-256-128

    @property
    def is_aead(self) -> bool:
        return self in (EspSuite.AES128GCM16, EspSuite.AES256GCM16)

    @property
    def enc_key_len(self) -> int:
        """Encryption key bytes (for GCM including the 4-byte salt, RFC 4106)."""
        return {
            EspSuite.AES128GCM16: 16 + 4,
            EspSuite.AES256GCM16: 32 + 4,
            EspSuite.AES128_SHA256: 16,
        }[self]

    @property
    def auth_key_len(self) -> int:
        """Integrity key bytes (0 for AEAD suites)."""
        return 0 if self.is_aead else 32

    def esp_proposal(self) -> str:
        """strongSwan ESP proposal string (no PFS: the IKE_SA is the pair's, DH buys nothing)."""
        return self.value

    def ike_proposal(self) -> str:
        """A matching IKEv2 proposal for the gateway pair's IKE_SA."""
        if self is EspSuite.AES256GCM16:
            return "aes256gcm16-prfsha384-ecp384"
        return "aes128gcm16-prfsha256-ecp256"


@dataclass(frozen=True)
class Endpoint:
    """A gateway end of a path: its (outer) IPv4 address and its role."""

    address: IPv4Address
    type: EndpointType

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", ipaddress.IPv4Address(self.address))
        object.__setattr__(self, "type", EndpointType(self.type))


@dataclass(frozen=True)
class DirectionKeys:
    """Manually keyed ESP SA for one direction (xfrm backend)."""

    spi: int
    enc_key: Secret
    auth_key: Secret | None = None

    def __post_init__(self) -> None:
        if not 256 <= self.spi <= 0xFFFFFFFF:
            raise ValueError(f"SPI {self.spi:#x} out of range (256..2^32-1)")


@dataclass(frozen=True)
class SecurityService:
    """How a path is protected.

    Either ``outbound``/``inbound`` keys (xfrm backend: SPIs and keys from the AAAH) or
    ``psk`` (strongswan backend: the IKE pre-shared secret); a profile may carry both so that
    either backend can install it.  The strongswan backend runs one IKE_SA per path, so
    ``psk`` is the path's own (fresh from the AAAH at every registration); only a standing
    network-to-network tunnel carries its gateway pair's.
    """

    suite: EspSuite = EspSuite.AES128GCM16
    outbound: DirectionKeys | None = None
    inbound: DirectionKeys | None = None
    psk: Secret | None = None
    lifetime: int = 3600  # seconds

    def __post_init__(self) -> None:
        object.__setattr__(self, "suite", EspSuite(self.suite))
        if self.lifetime <= 0:
            raise ValueError("lifetime must be positive")
        if (self.outbound is None) != (self.inbound is None):
            raise ValueError("manual keys need both directions")
        if self.outbound is None and self.psk is None:
            raise ValueError("need manual keys or an IKE pre-shared secret")
        for keys in (self.outbound, self.inbound):
            if keys is None:
                continue
            if len(keys.enc_key) != self.suite.enc_key_len:
                raise ValueError(
                    f"{self.suite.value}: encryption key must be {self.suite.enc_key_len} bytes"
                )
            want_auth = self.suite.auth_key_len
            got_auth = 0 if keys.auth_key is None else len(keys.auth_key)
            if got_auth != want_auth:
                raise ValueError(f"{self.suite.value}: integrity key must be {want_auth} bytes")
        if self.psk is not None and len(self.psk) < 16:
            raise ValueError("IKE pre-shared secret must be at least 16 bytes")

    @property
    def manual(self) -> bool:
        return self.outbound is not None

    def mirrored(self) -> SecurityService:
        return replace(self, outbound=self.inbound, inbound=self.outbound)


@dataclass(frozen=True)
class SealedSecurity:
    """A path's security service whose key material is sealed for one recipient (the agent
    that installs the path): what a relay holds, e.g. the local AAA's cached copy or the HA's
    copy of a dynamic CN-GW's path. The suite, lifetime and SPIs are readable; the keys and
    the PSK are in ``blob`` (the VPN-Sealed-Keys envelope, ``daemons.vpn.seal``), which only
    the recipient can open. No backend installs it: open it first (``seal.unseal``)."""

    suite: EspSuite
    lifetime: int
    spi_in: int | None
    spi_out: int | None
    blob: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "suite", EspSuite(self.suite))
        if (self.spi_in is None) != (self.spi_out is None):
            raise ValueError("SPIs need both directions")

    @property
    def manual(self) -> bool:
        return self.spi_in is not None

    def mirrored(self) -> SealedSecurity:
        raise ValueError("sealed keys belong to one recipient's view: they cannot be mirrored")

    def __repr__(self) -> str:
        return f"SealedSecurity({self.suite.value}, spi_in={self.spi_in}, spi_out={self.spi_out}, " \
               f"sealed={len(self.blob)} bytes)"


@dataclass(frozen=True)
class Qos:
    """Service quality for the user's traffic on a path (HTB class parameters)."""

    rate: int  # bit/s guaranteed
    ceil: int | None = None  # bit/s ceiling (default: rate)
    priority: int = 4  # HTB prio 0 (highest) .. 7

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.ceil is not None and self.ceil < self.rate:
            raise ValueError("ceil must be >= rate")
        if not 0 <= self.priority <= 7:
            raise ValueError("priority must be 0..7")

    @property
    def effective_ceil(self) -> int:
        return self.ceil if self.ceil is not None else self.rate


def _networks(items: Sequence[IPv4Network | str]) -> tuple[IPv4Network, ...]:
    nets = tuple(ipaddress.IPv4Network(x) for x in items)
    if not nets:
        raise ValueError("a traffic selector list must not be empty")
    return nets


@dataclass(frozen=True)
class VpnPath:
    """One VPN path as seen from the installing node (``local`` = this gateway)."""

    id: str
    local: Endpoint
    remote: Endpoint
    local_ts: tuple[IPv4Network, ...]
    remote_ts: tuple[IPv4Network, ...]
    security: SecurityService | SealedSecurity  # sealed: a relay's copy, not installable
    qos: Qos | None = None
    #: claim 5: set the SAs up at the first packet that matches the path, not at install
    on_traffic: bool = False

    def __post_init__(self) -> None:
        if not _PATH_ID_RE.match(self.id):
            raise ValueError("path id must be 1-200 chars of [A-Za-z0-9@._:+-]")
        object.__setattr__(self, "local_ts", _networks(self.local_ts))
        object.__setattr__(self, "remote_ts", _networks(self.remote_ts))
        if self.local.address == self.remote.address:
            raise ValueError("local and remote endpoint are the same address")

    @property
    def pair(self) -> tuple[IPv4Address, IPv4Address]:
        """The gateway pair (local, remote) this path runs between."""
        return (self.local.address, self.remote.address)

    def mirrored(self) -> VpnPath:
        """The same path as the other end sees it."""
        return replace(
            self,
            local=self.remote,
            remote=self.local,
            local_ts=self.remote_ts,
            remote_ts=self.local_ts,
            security=self.security.mirrored(),
        )

    def user_addresses(self) -> tuple[IPv4Network, ...]:
        """Host (/32) selectors on either side: the users the path is for."""
        return tuple(n for n in (*self.local_ts, *self.remote_ts) if n.prefixlen == 32)


class PathState(enum.Enum):
    UP = "up"  # SAs installed in both directions
    CONNECTING = "connecting"  # negotiation in progress
    WAITING = "waiting"  # installed, waiting for the peer (responder side, or peer not ready)
    TRAPPED = "trapped"  # on-traffic path: policies installed, no SA until the first packet
    DOWN = "down"  # configured but no SA
    STRAY = "stray"  # found in the backend but not installed by us


@dataclass(frozen=True)
class PathStatus:
    """What a backend reports about one path.  Never holds key material."""

    id: str
    state: PathState
    local: IPv4Address | None = None
    remote: IPv4Address | None = None
    spi_in: int | None = None
    spi_out: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    local_ts: tuple[IPv4Network, ...] = ()
    remote_ts: tuple[IPv4Network, ...] = ()
    detail: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form (``mipvpn show paths --json``)."""
        return {
            "id": self.id,
            "state": self.state.value,
            "local": str(self.local) if self.local else None,
            "remote": str(self.remote) if self.remote else None,
            "spi_in": f"{self.spi_in:08x}" if self.spi_in is not None else None,
            "spi_out": f"{self.spi_out:08x}" if self.spi_out is not None else None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "local_ts": [str(n) for n in self.local_ts],
            "remote_ts": [str(n) for n in self.remote_ts],
            **({"detail": dict(self.detail)} if self.detail else {}),
        }


class PathError(Exception):
    """A backend could not install/update/remove a path.  Messages never contain secrets."""


class Capability(enum.Flag):
    """What a backend can do, or needs, beyond the path API itself (cf. strongSwan's
    ``kernel_feature_t``, from ``kernel_ipsec_t.get_features()``).  Callers ask
    ``Capability.X in backend.capabilities``; nothing above ``daemons.vpn`` looks at a
    backend's name to decide what it can do.
    """

    NONE = 0
    #: F6 (claims 22, 23): the backend can install the old FA -> new FA forwarding path
    #: (any -> home address) next to the path to the HA.  Not with kernel xfrm: the forwarding
    #: path's in/fwd policies would shadow those of the path to the HA, whose template the
    #: kernel checks (that needs per-path priorities, which are not done).
    FORWARDING_PATHS = enum.auto()
    #: The node must own an address inside a path's local selector before the path can be
    #: installed (kernel-libipsec refuses the outbound policy otherwise): an FA, whose local
    #: selector is the MN's home address, calls :meth:`PathBackend.prepare_local_selector`
    #: first and :meth:`PathBackend.release_local_selector` when no path needs it any more.
    LOCAL_SELECTOR_ADDRESS = enum.auto()


class PathBackend(abc.ABC):
    """The one path API the agents use (cf. strongSwan's kernel_ipsec interface).

    - ``install`` is idempotent: installing an identical path again is harmless; installing a
      different path under an existing id behaves like ``update``.
    - ``update`` replaces a path (e.g. new remote endpoint after a move).
    - ``remove`` leaves nothing behind (SAs, policies, routes, rules, tc classes); removing an
      unknown id is not an error.
    - ``list`` reports state and counters, never keys.
    - ``flush`` removes everything the backend manages on this node.
    - ``reconcile`` makes installed == wanted (e.g. after a daemon restart) and removes strays.

    **VPN-only access** (an FA): no visitor's traffic leaves the node in clear, whatever the
    backend.  The FA calls :meth:`guard_access` at its start, before it takes any registration,
    :meth:`guard_visitor` for a visitor it takes in, before the host route that makes it
    reachable, and :meth:`release_visitor` after that route is gone; how the backend keeps the
    promise is its own (see daemons/vpn/access.py).

    What a backend can do beyond that is :attr:`capabilities`; the hooks below have no-op
    defaults, so a caller calls them whatever the backend (``wait_ready`` after start, ``close``
    at the end) or when a capability says so (``prepare_local_selector``).
    """

    #: the backend's name, for people (logs, ``show``, benchmarks); never to decide features
    name: ClassVar[str]
    #: duration of the last negotiation the backend ran itself (IKE/CHILD_SA), for benchmarks;
    #: None if it negotiates nothing (keys from the AAAH) or the last one failed
    last_negotiation_ms: float | None = None

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capability:
        """What this backend can do or needs (see :class:`Capability`)."""

    @abc.abstractmethod
    async def install(self, path: VpnPath) -> PathStatus: ...

    @abc.abstractmethod
    async def update(self, path: VpnPath) -> PathStatus: ...

    @abc.abstractmethod
    async def remove(self, path_id: str) -> None: ...

    @abc.abstractmethod
    async def list(self) -> builtins.list[PathStatus]: ...

    @abc.abstractmethod
    async def flush(self) -> None: ...

    @abc.abstractmethod
    async def reconcile(self, wanted: Sequence[VpnPath]) -> builtins.list[PathStatus]: ...

    @abc.abstractmethod
    async def guard_access(self, access_ifname: str, visitors: Sequence[str]) -> None:
        """VPN-only access on ``access_ifname`` (an FA's access segment): from now on nothing
        that arrives there is forwarded in clear, except what a path of this backend carries
        for a visitor.  ``visitors``: the home addresses of the visitors the FA holds (after a
        restart); their guards are made exactly these.  Idempotent."""

    @abc.abstractmethod
    async def guard_visitor(self, home_address: str) -> None:
        """The FA takes in a visitor: what it sends (source ``home_address``) may be forwarded
        from now on, but only through a path of this backend; until one is up (and while none
        is, during a move or a profile change) it is dropped, never sent in clear.  Call before
        the visitor's host route.  Idempotent."""

    @abc.abstractmethod
    async def release_visitor(self, home_address: str) -> None:
        """Undo :meth:`guard_visitor` once the visitor is gone (after its host route); what it
        still sends is dropped again.  Releasing an unknown address is not an error."""

    async def wait_ready(self) -> str | None:
        """Wait until whatever the backend drives is up (strongswan: charon on VICI, ``ipsec0``);
        call after every (re)start of that, then :meth:`reconcile`.  Returns what it found
        (e.g. charon's version), None if there is nothing to wait for."""
        return None

    async def close(self) -> None:
        """Release the backend's sockets and threads (installed paths stay)."""
        return None  # nothing to do unless a backend says otherwise

    async def prepare_local_selector(self, address: str, access_ifname: str) -> None:
        """Make this node own ``address`` (a path's local selector, the MN's home address at an
        FA, whose MNs are on ``access_ifname``), where :attr:`Capability.LOCAL_SELECTOR_ADDRESS`
        says the backend needs it.  Idempotent."""
        return None  # nothing to do unless a backend says otherwise

    async def release_local_selector(self, address: str) -> None:
        """Undo :meth:`prepare_local_selector` for ``address``."""
        return None  # nothing to do unless a backend says otherwise
