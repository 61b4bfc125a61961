"""strongSwan backend of the path API: one charon per node, driven over VICI.

Design
------
* **One IKE_SA per gateway pair, one CHILD_SA per path.**  Each (local, remote) gateway pair
  is one VICI connection ``mipvpn-<local>-<remote>`` whose ``children`` are the paths (one per
  mobile node) between the two gateways.  The first path brings the IKE_SA up; every further
  path costs a single CREATE_CHILD_SA exchange and the IKE_SA survives handovers of single
  users.  Measured (VICI ``initiate`` alone, two namespaces, 2-core VM): IKE_SA + first
  CHILD_SA 3.3-3.9 ms, a further CHILD_SA 1.3-1.9 ms; a whole ``install`` until up 4-5.5 ms
  (environment.md measured ~3 ms against ~9-10 ms).  A connection per path would pay the
  full IKE_SA (and a DH) per user and handover, and multiply IKE_SAs and DPD traffic by the
  number of users between the same two gateways.
  Reloading a connection whose IKE parameters are unchanged only replaces its children in
  charon, so established SAs of other users are untouched.  The IKE parameters are therefore
  constant per pair (proposal list covering every :class:`EspSuite`).
* **Authentication: one IKE PSK per gateway pair.**  The IKE_SA belongs to the pair, so it is
  authenticated with the pair's PSK, which every path between the two gateways carries
  (``SecurityService.psk``; the AAAH keeps/derives one per gateway pair).  It is loaded with
  ``load-shared`` (id ``mipvpn-psk-<local>-<remote>``, owners = the two gateway addresses,
  which are the IKE ids) and unloaded with the pair's last path.  Per-user PSKs cannot work
  with a shared IKE_SA: the responder signs its AUTH with *one* key (its best match), which
  the initiator may not hold — seen in the benchmark: with 20 different keys loaded at the
  responder no IKE_SA came up.  A path that brings a different PSK replaces the pair's key
  (logged, without the key) — that is key rotation for the next IKE_SA.
* **Who initiates:** both ends install and both try to initiate; the end that installs first
  finds its peer unconfigured (fails fast: NO_PROPOSAL_CHOSEN / TS_UNACCEPTABLE) and reports
  ``WAITING``, the end that installs second brings the CHILD_SA up.  An end that already has a
  CHILD_SA for the path does not initiate again (install is idempotent).
* **kernel-libipsec fixups** (no ESP in the kernel): charon's ``lookup 220`` rule is deleted
  after start; cleartext is routed into ``ipsec0`` by us — FA-like nodes (local endpoint FA)
  with a rule per user *from* the local selectors (table 222, ``default dev ipsec0``), HA and
  CN-GW-like nodes with *destination* routes for the remote selectors (table 221, one rule
  ``lookup 221``).  Routes/rules are derived from the installed set (reference counted), so two
  paths with the same selectors (make-before-break) don't step on each other.
  FA-like nodes must own the MN's home address: call :func:`prepare_local_selector` first.
* **On-traffic paths** (``VpnPath.on_traffic``, claim 5): the child is loaded with
  ``start_action = trap`` (charon installs the trap policy at ``load-conn``, nothing is
  initiated) and a fixed ``reqid`` of our own (``TRAP_REQID_BASE`` band, one per path and pair);
  the routes into ``ipsec0`` are installed as for any path, so the first packet reaches
  libipsec.  kernel-libipsec (strongSwan 5.9.8) raises **no acquire** for a trap policy —
  measured in namespaces: the packet is dropped with ``[ESP] could not find an outbound IPsec
  SA for reqid {N}, dropping packet`` and charon's trap manager never hears of it.  So the
  backend supplies the acquire itself: a watcher thread subscribed to charon's VICI ``log``
  event stream turns that message for one of its trap reqids into a VICI ``initiate`` of that
  child (at most once per second and path, and only while the child has no INSTALLED SA).
  The triggering packet is lost, as with a kernel acquire; later packets are carried.  Both
  ends may trap: whichever end sees the first packet negotiates, the other responds from its
  loaded child config.  Until then the path reports ``TRAPPED``; the trap stays after the
  CHILD_SA goes (rekey failure, DPD, peer restart), so the next packet brings it up again.
* **Shadowed traps.**  libipsec ranks every trap policy below every established SA's policy,
  whatever the selector sizes (a child's fixed ``priority`` is not honoured) — measured: at an
  FA whose home-address ⇄ any path to the HA is up, a trapped home-address ⇄ correspondent
  path never saw a packet, the ping went through the HA path.  Such an on-traffic path (one
  overlapping a path brought up at install) is trapped by us instead: an nftables table
  ``mipvpn-trap`` logs (NFLOG group ``NFLOG_GROUP``, rate-limited) and drops its packets on
  their way into ``ipsec0`` while it has no CHILD_SA; a listener thread on that NFLOG group
  initiates the child and removes the rule.  ``_sync_traps`` re-decides after every change
  (a path becomes shadowed or free again as others come and go).  Unlike charon's trap it is
  not re-armed when the CHILD_SA goes later (only at the next change of the path set).
* QoS (optional per path): an HTB class + u32 filter on ``ipsec0`` (where the cleartext with
  the user's address is visible), see :mod:`daemons.vpn.qos`.

Operation
---------
* Start charon with :func:`charon_command` (inside the node's namespace), then
  :meth:`StrongswanBackend.wait_ready` (VICI up, ``ipsec0`` present, rule 220 deleted,
  algorithms checked) and :meth:`StrongswanBackend.reconcile` with the wanted paths.  Do the
  same after every charon restart: the new TUN device has lost our routes, and the peer's
  stale IKE_SA is replaced thanks to INITIAL_CONTACT.
* ``install`` blocks at most ``initiate_timeout_ms`` (5 s) when the peer is unreachable and
  then reports ``WAITING``; charon keeps retrying in the background (3 retransmits).
* charon needs the gcm and openssl plugins (Debian ``libstrongswan-standard-plugins``, which
  ``--no-install-recommends`` leaves out) besides ``libcharon-extra-plugins``.
* On a kernel with ESP, use the xfrm backend; this one always loads kernel-libipsec.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import vici
from vici.exception import CommandException, SessionException

from daemons.vpn.path import (
    Capability,
    EndpointType,
    PathBackend,
    PathError,
    PathState,
    PathStatus,
    VpnPath,
)
from daemons.vpn.qos import HtbQos

log = logging.getLogger(__name__)

T = TypeVar("T")

CHARON = "/usr/lib/ipsec/charon"
CHARON_LOAD = (
    "kdf random nonce aes sha1 sha2 hmac gcm openssl pem pkcs1 x509 pubkey "
    "kernel-libipsec kernel-netlink socket-default vici"
)
TUN_IFNAME = "ipsec0"
CHARON_TABLE = 220  # charon's own routing table (rule deleted after start)
DEST_TABLE = 221  # destination routes into ipsec0 (HA / CN-GW-like nodes)
SRC_TABLE = 222  # `default dev ipsec0`, used by per-user source rules (FA-like nodes)
ACCESS_TABLE = 223  # FA recipe: `HOA dev ACCESS`
SRC_RULE_PREF = 900  # .. 964: + (64 - src_len - dst_len), see _rule_pref
BYPASS_RULE_PREF = 800  # `to PEER lookup main`: the tunnel never swallows packets to its own peer
MAIN_TABLE = 254
DEST_RULE_PREF = 1000  # .. 1064
ACCESS_RULE_PREF = 50
LOCAL_RULE_PREF = 100
CONN_PREFIX = "mipvpn-"
PSK_PREFIX = "mipvpn-psk-"
# IKE proposals are the same for every pair so that reloading a pair's connection with other
# children never changes its IKE config (which would orphan the established IKE_SA).
IKE_PROPOSALS = ["aes128gcm16-prfsha256-ecp256", "aes256gcm16-prfsha384-ecp384"]
INITIATE_TIMEOUT_MS = 5000
# reqids of trapped children (on-traffic paths): our own band, far above charon's own
# allocation (which counts from 1)
TRAP_REQID_BASE = 0x6D740000
TRAP_REQID_SPAN = 0x00010000
# what libipsec logs (group ESP, level 1) when a packet hits a policy whose SA does not exist:
# the acquire that kernel-libipsec never raises
_NO_SA_RE = re.compile(r"could not find an outbound IPsec SA for reqid \{(\d+)\}")
ACQUIRE_MIN_INTERVAL = 1.0  # seconds between two initiates of the same trapped path
# our own trap for on-traffic paths that an established SA shadows (see _shadowing): an
# nftables table that logs (NFLOG) and drops their packets on the way into ipsec0
NFT_TABLE = "mipvpn-trap"
NFLOG_GROUP = 2701
NFLOG_PREFIX = "mipvpn-trap "
NETLINK_NETFILTER = 12
TERMINATE_TIMEOUT_MS = 3000


# --------------------------------------------------------------------------- configuration


def node_dir(run_dir: str | os.PathLike[str], node: str) -> Path:
    return Path(run_dir) / node


def vici_socket_path(run_dir: str | os.PathLike[str], node: str) -> Path:
    return node_dir(run_dir, node) / "charon.vici"


def strongswan_conf(run_dir: str | os.PathLike[str], node: str) -> str:
    """strongswan.conf text for one node.

    Log levels: filelog at 1 for every group.  strongSwan's level 4 ("private") dumps key
    material (``ike``/``cfg``/``enc``/``knl``...), level 3 raw packets; never go above 2 in a
    deployment, and never above 1 in the groups that touch secrets (``ike``, ``cfg``, ``knl``,
    ``enc``, ``esp``, ``lib``).  No syslog logger: each node logs to its own file only.
    """
    nd = node_dir(run_dir, node)
    return f"""# generated by mipvpn for node {node}; do not edit
charon {{
    load = {CHARON_LOAD}
    install_routes = no
    install_virtual_ip = no
    retransmit_tries = 3
    retransmit_timeout = 1.0
    plugins {{
        vici {{
            socket = unix://{nd / "charon.vici"}
        }}
    }}
    filelog {{
        mipvpn {{
            path = {nd / "charon.log"}
            time_format = %F %T
            ike_name = yes
            append = no
            flush_line = yes
            default = 1
            ike = 1
            cfg = 1
            knl = 1
            enc = 0
            esp = 1
            lib = 1
            net = 0
        }}
    }}
    syslog {{
    }}
}}
"""


def write_config(run_dir: str | os.PathLike[str], node: str) -> Path:
    """Write RUN_DIR/NODE/strongswan.conf (mode 0600 dir) and return its path."""
    nd = node_dir(run_dir, node)
    nd.mkdir(parents=True, exist_ok=True)
    os.chmod(nd, 0o700)
    conf = nd / "strongswan.conf"
    conf.write_text(strongswan_conf(run_dir, node))
    return conf


def charon_command(run_dir: str | os.PathLike[str], node: str) -> list[str]:
    """The command that runs this node's charon; run it inside the node's namespace
    (e.g. prefixed with ``ip netns exec NS``).

    Writes the config.  The process ``exec``s all the way down (``unshare`` without ``--fork``,
    ``sh -c '... exec charon'``), so its PID *is* charon's PID and signals reach charon
    directly; SIGTERM/SIGINT stop it cleanly.

    A private mount namespace with a tmpfs on ``/run`` gives every charon its own
    ``/run/charon.pid``.  The node directory is opened as fd 3 first and bind-mounted back
    after the tmpfs is mounted, so it stays reachable at the same path even if ``run_dir``
    lies under ``/run`` (the default ``/run/mipvpn``).
    """
    conf = write_config(run_dir, node)
    nd = str(node_dir(run_dir, node).resolve())
    script = (
        'exec 3<"$1" && mount -t tmpfs -o mode=755 tmpfs /run && mkdir -p "$1" '
        '&& mount --no-canonicalize --bind /proc/self/fd/3 "$1" && exec 3<&- '
        f'&& STRONGSWAN_CONF="$2" exec {CHARON}'
    )
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "charon-sh", nd,
            str(conf.resolve())]


# --------------------------------------------------------------------------- netlink helpers


def _ipr(netns: str | None) -> Any:
    from pyroute2 import IPRoute

    return IPRoute(netns=netns) if netns else IPRoute()


@dataclass(frozen=True)
class _Route:
    table: int
    dst: ipaddress.IPv4Network


@dataclass(frozen=True)
class _Rule:
    pref: int
    table: int
    src: ipaddress.IPv4Network | None = None
    dst: ipaddress.IPv4Network | None = None


def _rule_pref(base: int, src: ipaddress.IPv4Network, dst: ipaddress.IPv4Network) -> int:
    """More specific selectors get a smaller pref (looked up first), and two rules that differ
    in specificity never share a pref: the kernel's duplicate check on RTM_NEWRULE (EXCL)
    compares only the selectors the *new* rule sets, so ``to H lookup T`` next to an existing
    ``from S to H lookup T`` at the same pref fails with EEXIST (seen: an FA-HA anchor with
    local 0/0 next to a correspondent path with local S, at a destination-mode node)."""
    return base + 64 - src.prefixlen - dst.prefixlen


def _rule_kwargs(rule: _Rule) -> dict[str, Any]:
    kw: dict[str, Any] = {"priority": rule.pref, "table": rule.table, "family": socket.AF_INET}
    if rule.src is not None and rule.src.prefixlen:
        kw.update(src=str(rule.src.network_address), src_len=rule.src.prefixlen)
    if rule.dst is not None and rule.dst.prefixlen:
        kw.update(dst=str(rule.dst.network_address), dst_len=rule.dst.prefixlen)
    return kw


def _rule_from_msg(msg: Any) -> _Rule:
    def net(key: str) -> ipaddress.IPv4Network | None:
        addr = msg.get(key)
        plen = msg[f"{key}_len"]
        return ipaddress.IPv4Network(f"{addr}/{plen}") if addr and plen else None

    return _Rule(msg.get("priority") or 0, msg.get("table"), net("src"), net("dst"))


def _sysctl(netns: str | None, key: str, value: str) -> None:
    import subprocess

    cmd = ["sysctl", "-qw", f"{key}={value}"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    subprocess.run(cmd, check=True, capture_output=True)


def _prepare_local_selector_sync(
    netns: str | None, address: str, access_ifname: str, table: int
) -> None:
    addr = ipaddress.IPv4Address(address)
    ipr = _ipr(netns)
    try:
        lo = ipr.link_lookup(ifname="lo")[0]
        acc = ipr.link_lookup(ifname=access_ifname)
        if not acc:
            raise PathError(f"no interface {access_ifname}")
        acc_idx = acc[0]
        have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=lo, family=2)}
        if (str(addr), 32) not in have:
            ipr.addr("add", index=lo, address=str(addr), prefixlen=32)
        rules = [_rule_from_msg(r) for r in ipr.get_rules(family=socket.AF_INET)]
        if not any(r.pref == LOCAL_RULE_PREF and r.table == 255 for r in rules):
            ipr.rule("add", priority=LOCAL_RULE_PREF, table=255, family=socket.AF_INET)
        if any(r.pref == 0 and r.table == 255 for r in rules):
            ipr.rule("del", priority=0, table=255, family=socket.AF_INET)
        ipr.route("replace", dst=f"{addr}/32", oif=acc_idx, table=table)
        hoa_rule = _Rule(ACCESS_RULE_PREF, table, None, ipaddress.IPv4Network(f"{addr}/32"))
        if hoa_rule not in rules:
            ipr.rule("add", **_rule_kwargs(hoa_rule))
    finally:
        ipr.close()
    _sysctl(netns, f"net.ipv4.conf.{access_ifname}.accept_local", "1")
    _sysctl(netns, f"net.ipv4.conf.{access_ifname}.arp_ignore", "1")


async def prepare_local_selector(
    netns: str | None, address: str, access_ifname: str, table: int = ACCESS_TABLE
) -> None:
    """FA recipe for kernel-libipsec: make the node own ``address`` (the MN's home address,
    the FA-side local traffic selector) without stealing the MN's traffic.

    Needed on any node whose local traffic selector contains none of its own addresses
    (typically the FA, local selector = MN home address/32) and only with the strongswan
    backend on kernels without ESP (kernel-libipsec refuses to install the outbound policy
    otherwise).  HA and CN-GW normally own an address inside the prefix they protect (home
    link / LAN address) and need nothing.  Idempotent.  Does: ``address/32`` on ``lo``; the
    ``local`` rule moved from pref 0 to 100; ``to address lookup TABLE`` at pref 50 with
    ``address dev ACCESS`` in TABLE; ``accept_local=1``, ``arp_ignore=1`` on ACCESS.
    """
    await asyncio.to_thread(_prepare_local_selector_sync, netns, address, access_ifname, table)


def _release_local_selector_sync(netns: str | None, address: str, table: int) -> None:
    addr = ipaddress.IPv4Address(address)
    ipr = _ipr(netns)
    try:
        lo = ipr.link_lookup(ifname="lo")[0]
        with contextlib.suppress(Exception):
            ipr.addr("del", index=lo, address=str(addr), prefixlen=32)
        with contextlib.suppress(Exception):
            ipr.route("del", dst=f"{addr}/32", table=table)
        hoa_rule = _Rule(ACCESS_RULE_PREF, table, None, ipaddress.IPv4Network(f"{addr}/32"))
        with contextlib.suppress(Exception):
            ipr.rule("del", **_rule_kwargs(hoa_rule))
    finally:
        ipr.close()


async def release_local_selector(
    netns: str | None, address: str, table: int = ACCESS_TABLE
) -> None:
    """Undo :func:`prepare_local_selector` for one address (the node-wide ``local`` rule move
    and the sysctls stay; they are harmless)."""
    await asyncio.to_thread(_release_local_selector_sync, netns, address, table)


# --------------------------------------------------------------------------- the backend


def conn_name(path: VpnPath) -> str:
    return f"{CONN_PREFIX}{path.local.address}-{path.remote.address}"


def psk_id(conn: str) -> str:
    """The VICI shared-key id of a gateway pair's IKE PSK."""
    return f"{PSK_PREFIX}{conn[len(CONN_PREFIX):]}"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any, base: int = 10) -> int | None:
    if value is None:
        return None
    try:
        return int(_s(value), base)
    except ValueError:
        return None


class StrongswanBackend(PathBackend):
    """Path backend on one node's charon (see the module docstring for the design)."""

    name = "strongswan"

    @property
    def capabilities(self) -> Capability:
        """kernel-libipsec: route-based (``ipsec0``), the local selector's address owned; F6
        forwarding paths work (a CHILD_SA per path, no kernel policy template to collide with)."""
        return Capability.FORWARDING_PATHS | Capability.LOCAL_SELECTOR_ADDRESS | Capability.ROUTE_BASED

    def __init__(
        self,
        node: str,
        run_dir: str | os.PathLike[str],
        netns: str | None,
        *,
        tun_ifname: str = TUN_IFNAME,
        initiate_timeout_ms: int = INITIATE_TIMEOUT_MS,
    ) -> None:
        self.node = node
        self.run_dir = Path(run_dir)
        self.netns = netns
        self.tun_ifname = tun_ifname
        self.initiate_timeout_ms = initiate_timeout_ms
        self._paths: dict[str, VpnPath] = {}
        self._routes: set[_Route] = set()
        self._rules: set[_Rule] = set()
        self._vici_pool = concurrent.futures.ThreadPoolExecutor(1, f"vici-{node}")
        self._nl_pool = concurrent.futures.ThreadPoolExecutor(1, f"nl-{node}")
        self._session: vici.Session | None = None
        self._sock: socket.socket | None = None
        self._ipr: Any = None
        self._lock = asyncio.Lock()
        self.qos = HtbQos(netns, tun_ifname)
        # on-traffic paths: (connection, path id) -> reqid of the trapped child, and back
        self._trap_reqids: dict[tuple[str, str], int] = {}
        self._next_trap_reqid = TRAP_REQID_BASE
        self._trap_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._watch_ready = threading.Event()  # subscribed to charon's log (reset on disconnect)
        self._watch_sock: socket.socket | None = None
        self._acquire_last: dict[str, float] = {}  # child name -> last initiate attempt
        #: number of acquires the watcher turned into an initiate (for tests and show)
        self.acquires = 0
        # shadowed on-traffic paths waiting for their first packet in our nftables trap:
        # path id -> token (the NFLOG prefix names it)
        self._armed: dict[str, int] = {}
        self._next_token = 1
        self._nft_lock = threading.Lock()
        self._nft_present = False
        self._nflog: threading.Thread | None = None
        self._nflog_ready = threading.Event()

    # ---- plumbing -----------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return vici_socket_path(self.run_dir, self.node)

    def _vici_sync(self, fn: Callable[[vici.Session], T]) -> T:
        for attempt in (1, 2):
            if self._session is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(self.socket_path))
                self._sock = sock
                self._session = vici.Session(sock)
            try:
                return fn(self._session)
            except (OSError, SessionException):
                self._close_session()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _close_session(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._session = None

    async def _vici(self, fn: Callable[[vici.Session], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._vici_pool, self._vici_sync, fn)

    def _nl_sync(self, fn: Callable[[Any], T]) -> T:
        if self._ipr is None:
            self._ipr = _ipr(self.netns)
        return fn(self._ipr)

    async def _nl(self, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._nl_pool, self._nl_sync, fn)

    async def close(self) -> None:
        """Release the VICI session and netlink socket (charon keeps running)."""
        await asyncio.to_thread(self._stop_watcher)  # joins threads: not on the event loop
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._vici_pool, self._close_session)

        def close_ipr() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        await loop.run_in_executor(self._nl_pool, close_ipr)
        self._vici_pool.shutdown(wait=False)
        self._nl_pool.shutdown(wait=False)

    # ---- charon lifecycle ---------------------------------------------------------------

    async def wait_ready(self, within: float = 10.0) -> str:
        """Wait until charon answers on VICI and ``ipsec0`` exists, then apply the
        post-start fixups (delete charon's ``lookup 220`` rule).  Returns charon's version.
        Call after every charon (re)start, then :meth:`reconcile`."""
        deadline = time.monotonic() + within
        version: dict[str, Any] | None = None
        while True:
            try:
                version = await self._vici(lambda s: s.version())
                if await self._nl(lambda ipr: bool(ipr.link_lookup(ifname=self.tun_ifname))):
                    break
            except (OSError, SessionException):
                pass
            if time.monotonic() > deadline:
                raise PathError(f"charon on {self.node} not ready after {within} s")
            await asyncio.sleep(0.05)
        await self._nl(self._delete_charon_rules)
        await self._check_algorithms()
        return f"{_s(version.get('daemon'))} {_s(version.get('version'))}"

    async def _check_algorithms(self) -> None:
        """Fail early and clearly if charon lacks what the suites need (Debian ships the
        gcm and openssl plugins in libstrongswan-standard-plugins, only *recommended* by
        strongswan-charon: ``--no-install-recommends`` leaves them out and IKE then fails with
        "configured DH group ECP_256 not supported")."""
        algs = await self._vici(lambda s: s.get_algorithms())
        have = {
            ("dh" if _s(kind) == "ke" else _s(kind), _s(name))  # "ke" in strongSwan >= 6
            for kind, names in algs.items()
            for name in names
        }
        need = {("aead", "AES_GCM_16"), ("dh", "ECP_256"), ("integrity", "HMAC_SHA2_256_128"),
                ("kdf", "KDF_PRF_PLUS")}
        missing = sorted(f"{k}:{n}" for k, n in need - have)
        if missing:
            raise PathError(
                f"charon on {self.node} lacks {', '.join(missing)}: install the Debian package "
                "libstrongswan-standard-plugins (gcm, openssl) and load kdf"
            )

    @staticmethod
    def _delete_charon_rules(ipr: Any) -> int:
        n = 0
        for msg in ipr.get_rules(family=socket.AF_INET):
            r = _rule_from_msg(msg)
            if r.table == CHARON_TABLE:
                ipr.rule("del", **_rule_kwargs(r))
                n += 1
        return n

    # ---- the addresses an FA must own ---------------------------------------------------

    async def prepare_local_selector(self, address: str, access_ifname: str) -> None:
        """See :func:`prepare_local_selector`."""
        await prepare_local_selector(self.netns, address, access_ifname)

    async def release_local_selector(self, address: str) -> None:
        """See :func:`release_local_selector`."""
        await release_local_selector(self.netns, address)

    # ---- VICI messages ------------------------------------------------------------------

    def _pair_paths(self, name: str) -> list[VpnPath]:
        return [p for p in self._paths.values() if conn_name(p) == name]

    def _conn_message(self, name: str, paths: Sequence[VpnPath]) -> dict[str, Any]:
        first = paths[0]
        children: dict[str, Any] = {}
        for p in paths:
            life = p.security.lifetime
            children[p.id] = {
                "mode": "tunnel",
                "local_ts": [str(n) for n in p.local_ts],
                "remote_ts": [str(n) for n in p.remote_ts],
                "esp_proposals": [p.security.suite.esp_proposal()],
                # on-traffic: charon installs the trap policy when the connection is loaded
                "start_action": "trap" if self._trapped(p) else "none",
                "close_action": "none",
                "dpd_action": "clear",
                "life_time": f"{life}s",
                "rekey_time": f"{max(1, life * 9 // 10)}s",
                "rand_time": f"{max(0, life // 20)}s",
            }
            if self._trapped(p):
                children[p.id]["reqid"] = str(self._trap_reqid(name, p.id))
        local, remote = str(first.local.address), str(first.remote.address)
        return {
            name: {
                "version": "2",
                "local_addrs": [local],
                "remote_addrs": [remote],
                "proposals": IKE_PROPOSALS,
                "encap": "yes",
                "childless": "allow",
                "unique": "no",
                "mobike": "no",
                "dpd_delay": "30s",
                "rekey_time": "4h",
                "local": {"auth": "psk", "id": local},
                "remote": {"auth": "psk", "id": remote},
                "children": children,
            }
        }

    def _load_psk(self, path: VpnPath) -> Callable[[vici.Session], Any]:
        psk = path.security.psk
        if psk is None:
            raise PathError(f"path {path.id}: the strongswan backend needs an IKE PSK")
        name = conn_name(path)
        others = [p for p in self._pair_paths(name) if p.id != path.id]
        if any(p.security.psk != psk for p in others):
            log.warning("%s: path %s brings another IKE PSK for pair %s than the paths "
                        "already installed; the newest is used", self.node, path.id, name)
        msg = {
            "id": psk_id(name),
            "type": "IKE",
            "data": psk.reveal(),
            "owners": [str(path.local.address), str(path.remote.address)],
        }
        return lambda s: s.load_shared(msg)

    # ---- on-traffic paths: trap reqids and the acquire watcher ---------------------------

    def _shadowing(self, path: VpnPath) -> VpnPath | None:
        """Another path of this node, brought up at install, whose selectors overlap ``path``'s.

        kernel-libipsec puts every trap policy in a lower priority class than any established
        SA's policy (whatever the selector sizes; a fixed child ``priority`` is not honoured —
        both measured), so the first packets of such a path would go into the other path's SA
        and never hit the trap: e.g. at an FA the MN's home-address ⇄ any path to the HA covers
        the home-address ⇄ correspondent path to a dynamic CN-GW."""
        for q in self._paths.values():
            if q.id == path.id or q.on_traffic:
                continue
            if any(lt.overlaps(ql) for lt in path.local_ts for ql in q.local_ts) and \
                    any(rt.overlaps(qr) for rt in path.remote_ts for qr in q.remote_ts):
                return q
        return None

    def _start_detail(self, path: VpnPath | None) -> dict[str, str]:
        if path is None or not path.on_traffic:
            return {}
        shadow = self._shadowing(path)
        return {"start": "on-traffic", **({"shadowed_by": shadow.id} if shadow is not None else {}),
                **({"trap": "nftables"} if path.id in self._armed else {})}

    def _trapped(self, path: VpnPath) -> bool:
        """Is ``path`` installed as a trap?  On-traffic and not shadowed (see
        :meth:`_shadowing`; a shadowed on-traffic path is brought up at install instead)."""
        return path.on_traffic and self._shadowing(path) is None

    async def _sync_traps(self, force: bool = False) -> None:
        """After any change of the path set: every on-traffic path is trapped the way that
        works for it now.  Not shadowed: charon's trap (its child config says so; reload a pair
        whose config does not match).  Shadowed: our nftables trap, armed while the path has no
        CHILD_SA, so its first packets are logged (the acquire) and dropped instead of going
        into the shadowing path's SA.  ``force``: rewrite the nftables trap even if nothing
        changed (after a restart: a table left by the previous process goes)."""
        armed: dict[str, int] = {}
        for p in list(self._paths.values()):
            if not p.on_traffic:
                continue
            name = conn_name(p)
            with self._trap_lock:
                loaded_as_trap = (name, p.id) in self._trap_reqids
            if loaded_as_trap != self._trapped(p):
                await self._load_pair(name)
            if self._trapped(p):
                continue
            if any(_s(c.get("state")) in ("INSTALLED", "INSTALLING", "CREATED")
                   for _sa, c in self._children(await self._list_sas(name), name, p.id)):
                continue
            armed[p.id] = self._armed.get(p.id) or self._new_token()
        if force:
            self._nft_present = True
        if armed != self._armed or force:
            for path_id in armed.keys() - self._armed.keys():
                log.info("%s: on-traffic path %s overlaps path %s (libipsec would send its first packets "
                         "into that one): trapped in nftables", self.node, path_id,
                         getattr(self._shadowing(self._paths[path_id]), "id", "?"))
            if armed:
                self._ensure_watcher()  # child-updown: a CHILD_SA the peer brought up disarms
                self._ensure_nflog()
                if not await asyncio.to_thread(self._nflog_ready.wait, 5.0):
                    log.warning("%s: NFLOG listener not ready", self.node)
            await asyncio.to_thread(self._set_armed, armed)

    def _new_token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token

    def _set_armed(self, armed: dict[str, int]) -> None:
        """Write the nftables trap for ``armed`` (any thread)."""
        with self._nft_lock:
            self._armed = dict(armed)
            lines = [f"table ip {NFT_TABLE}", f"delete table ip {NFT_TABLE}"]
            if armed:
                lines += [f"table ip {NFT_TABLE} {{", "  chain post {",
                          "    type filter hook postrouting priority 0; policy accept;"]
                for path_id, token in sorted(armed.items(), key=lambda kv: kv[1]):
                    path = self._paths.get(path_id)
                    if path is None:
                        continue
                    for src in path.local_ts:
                        for dst in path.remote_ts:
                            match = f'oifname "{self.tun_ifname}"'
                            match += f" ip saddr {src}" if src.prefixlen else ""
                            match += f" ip daddr {dst}" if dst.prefixlen else ""
                            lines.append(f'    {match} limit rate 10/second log prefix "{NFLOG_PREFIX}{token} " '
                                         f"group {NFLOG_GROUP}")
                            lines.append(f"    {match} drop")
                lines += ["  }", "}"]
            if not armed and not self._nft_present:
                return
            import shutil

            if shutil.which("nft") is None:
                if armed:
                    raise PathError(f"{self.node}: on-traffic paths under an established path need nftables "
                                    "(Debian package nftables)")
                self._nft_present = False
                return
            cmd = ["nft", "-f", "-"]
            if self.netns:
                cmd = ["ip", "netns", "exec", self.netns, *cmd]
            proc = subprocess.run(cmd, input="\n".join(lines) + "\n", text=True, capture_output=True, timeout=10)
            if proc.returncode != 0:
                raise PathError(f"{self.node}: nft (on-traffic trap): {proc.stderr.strip()}")
            self._nft_present = bool(armed)

    def _ensure_nflog(self) -> None:
        if self._nflog is not None and self._nflog.is_alive():
            return
        self._watch_stop.clear()
        self._nflog_ready.clear()
        self._nflog = threading.Thread(target=self._nflog_loop, name=f"nflog-{self.node}", daemon=True)
        self._nflog.start()

    def _nflog_loop(self) -> None:
        """Thread: NFLOG messages from our nftables trap -> initiate the path they name."""
        import select
        import struct

        from pyroute2 import netns as pr2_netns

        sock = pr2_netns.create_socket(self.netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) \
            if self.netns else socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        session: vici.Session | None = None
        try:
            sock.bind((0, 0))
            for attr, payload in ((1, struct.pack("B", 1)),  # NFULA_CFG_CMD: bind the group
                                  (2, struct.pack(">IBx", 0, 1)),  # NFULA_CFG_MODE: metadata only
                                  (4, struct.pack(">I", 0)),  # NFULA_CFG_TIMEOUT: no batching (default 1 s)
                                  (5, struct.pack(">I", 1))):  # NFULA_CFG_QTHRESH: one message per packet
                nla = struct.pack("HH", 4 + len(payload), attr) + payload
                nla += b"\0" * (-len(nla) % 4)
                body = struct.pack("BBH", socket.AF_UNSPEC, 0, socket.htons(NFLOG_GROUP)) + nla
                sock.send(struct.pack("IHHII", 16 + len(body), (4 << 8) | 1, 0x1 | 0x4, 1, 0) + body)
                ack = sock.recv(4096)
                if len(ack) >= 20 and struct.unpack_from("i", ack, 16)[0] != 0:
                    raise OSError(-struct.unpack_from("i", ack, 16)[0], "NFLOG bind refused")
            self._nflog_ready.set()
            while not self._watch_stop.is_set():
                ready, _, _ = select.select([sock], [], [], 0.5)
                if not ready:
                    continue
                data = sock.recv(65535)
                for token in _nflog_tokens(data):
                    path_id = next((pid for pid, t in self._armed.items() if t == token), None)
                    path = self._paths.get(path_id) if path_id else None
                    if path is None:
                        continue
                    session, up = self._initiate_trapped(conn_name(path), path.id, session)
                    if up:
                        try:
                            self._set_armed({pid: t for pid, t in self._armed.items() if pid != path.id})
                        except (PathError, subprocess.SubprocessError) as e:
                            log.warning("%s: on-traffic trap: %s", self.node, e)
        except (OSError, SessionException, CommandException, PathError) as e:
            log.warning("%s: NFLOG trap listener stopped: %s", self.node, e)
        finally:
            self._nflog_ready.clear()
            sock.close()

    def _trap_reqid(self, conn: str, path_id: str) -> int:
        """The fixed reqid of a trapped child (stable while the path stays on this pair)."""
        with self._trap_lock:
            reqid = self._trap_reqids.get((conn, path_id))
            if reqid is None:
                used = set(self._trap_reqids.values())
                for _ in range(TRAP_REQID_SPAN):
                    reqid = self._next_trap_reqid
                    self._next_trap_reqid = TRAP_REQID_BASE + (reqid + 1 - TRAP_REQID_BASE) % TRAP_REQID_SPAN
                    if reqid not in used:
                        break
                else:
                    raise PathError(f"{self.node}: no free trap reqid")
                self._trap_reqids[(conn, path_id)] = reqid
            return reqid

    def _prune_traps(self, conn: str) -> None:
        keep = {p.id for p in self._pair_paths(conn) if self._trapped(p)}
        with self._trap_lock:
            for key in [k for k in self._trap_reqids if k[0] == conn and k[1] not in keep]:
                self._trap_reqids.pop(key)

    def _trapped_by_reqid(self, reqid: int) -> tuple[str, str] | None:
        with self._trap_lock:
            return next((key for key, r in self._trap_reqids.items() if r == reqid), None)

    def _ensure_watcher(self) -> None:
        """Start the acquire watcher (once) when the first on-traffic path is configured."""
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch, name=f"acquire-{self.node}", daemon=True)
        self._watcher.start()

    def _stop_watcher(self) -> None:
        self._watch_stop.set()
        sock = self._watch_sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in (self._watcher, self._nflog):
            if thread is not None:
                thread.join(timeout=3)
        self._watcher = self._nflog = None

    def _watch(self) -> None:
        """Thread: follow charon's VICI log stream; a libipsec "no outbound SA for reqid N"
        for one of our trap reqids is the first packet of an on-traffic path (the acquire
        kernel-libipsec does not raise): initiate that child.  Reconnects after a charon
        restart; ends when the backend closes."""
        session: vici.Session | None = None  # for the initiates (the listener's is busy)
        while not self._watch_stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
                self._watch_sock = sock
                for kind, event in vici.Session(sock).listen(["log", "child-updown"], timeout=0.2):
                    self._watch_ready.set()  # registered: nothing logged from now on is missed
                    if self._watch_stop.is_set():
                        break
                    if event and _s(kind) == "child-updown":
                        try:
                            self._child_updown(event)
                        except (PathError, subprocess.SubprocessError) as e:
                            log.warning("%s: on-traffic trap: %s", self.node, e)
                        continue
                    if not event or _s(event.get("group", "")) != "ESP":
                        continue
                    m = _NO_SA_RE.search(_s(event.get("msg", "")))
                    if m:
                        session = self._acquire(int(m.group(1)), session)
            except (OSError, SessionException, CommandException, ValueError) as e:
                self._watch_ready.clear()
                if not self._watch_stop.is_set():
                    log.debug("%s: acquire watcher: %s; reconnecting", self.node, e)
                    session = None
                    self._watch_stop.wait(0.1)
            finally:
                self._watch_ready.clear()
                self._watch_sock = None
                with contextlib.suppress(OSError):
                    sock.close()

    def _child_updown(self, event: dict[str, Any]) -> None:
        """In the watcher thread: a CHILD_SA came up (e.g. the peer's first packet made the
        peer negotiate it): an nftables trap of ours for it would only drop the next packet."""
        if _s(event.get("up", "")) != "yes" or not self._armed:
            return
        names = {_s(c.get("name")) for ike in event.values() if isinstance(ike, dict)
                 for c in (ike.get("child-sas") or {}).values()}
        if names & self._armed.keys():
            self._set_armed({pid: t for pid, t in self._armed.items() if pid not in names})

    def _acquire(self, reqid: int, session: vici.Session | None) -> vici.Session | None:
        """In the watcher thread: a packet hit the charon trap with ``reqid``."""
        key = self._trapped_by_reqid(reqid)
        if key is None:
            return session
        return self._initiate_trapped(*key, session)[0]

    def _initiate_trapped(self, conn: str, child: str,
                          session: vici.Session | None) -> tuple[vici.Session | None, bool]:
        """In a watcher thread: bring up a trapped child unless it is up or was tried less
        than ``ACQUIRE_MIN_INTERVAL`` ago.  Returns the (lazily made) session and whether the
        child is up now."""
        now = time.monotonic()
        if now - self._acquire_last.get(child, -1e9) < ACQUIRE_MIN_INTERVAL:
            return session, False
        self._acquire_last[child] = now
        if session is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.socket_path))
            session = vici.Session(sock)
        sas = []
        for entry in session.list_sas({"ike": conn}):
            for ike_name, sa in entry.items():
                sas.append({**sa, "name": _s(ike_name)})
        if any(_s(c.get("state")) in ("INSTALLED", "INSTALLING", "CREATED")
               for _sa, c in self._children(sas, conn, child)):
            return session, True
        log.info("%s: first packet for trapped path %s: initiating", self.node, child)
        msg = {"ike": conn, "child": child, "timeout": str(self.initiate_timeout_ms),
               "init-limits": "no", "loglevel": "-1"}
        up = False
        try:
            for _ in session.initiate(msg):
                pass
            self.acquires += 1
            up = True
        except CommandException as e:
            log.info("%s: on-traffic initiate of %s failed (%s); the next packet retries", self.node, child, e)
        self._acquire_last[child] = time.monotonic()
        return session, up

    async def _load_pair(self, name: str) -> None:
        paths = self._pair_paths(name)
        self._prune_traps(name)
        if any(self._trapped(p) for p in paths):
            self._ensure_watcher()
            # a trap must not fire before the watcher listens (e.g. right after a charon restart)
            if not await asyncio.to_thread(self._watch_ready.wait, 5.0):
                log.warning("%s: acquire watcher not subscribed to charon's log yet", self.node)
        try:
            if paths:
                msg = self._conn_message(name, paths)
                await self._vici(lambda s: s.load_conn(msg))
            else:
                await self._vici(lambda s: s.unload_conn({"name": name}))
        except CommandException as e:
            if paths:
                raise PathError(f"load-conn {name}: {e}") from None

    async def _list_sas(self, conn: str | None = None) -> list[dict[str, Any]]:
        """list-sas (of one connection if ``conn``) flattened: one dict per IKE_SA, with
        its connection name as 'name'."""
        filters = {"ike": conn} if conn else None

        def run(s: vici.Session) -> list[dict[str, Any]]:
            out = []
            for entry in s.list_sas(filters):
                for ike_name, sa in entry.items():
                    sa = dict(sa)
                    sa["name"] = _s(ike_name)
                    out.append(sa)
            return out

        return await self._vici(run)

    async def _list_conns(self) -> dict[str, list[str]]:
        def run(s: vici.Session) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for entry in s.list_conns():
                for name, conn in entry.items():
                    out[_s(name)] = [_s(c) for c in (conn.get("children") or {})]
            return out

        return await self._vici(run)

    @staticmethod
    def _children(sas: Iterable[dict[str, Any]], conn: str | None, child: str | None):
        """(ike_sa, child_sa) pairs matching conn/child name (None = any)."""
        for sa in sas:
            if conn is not None and sa["name"] != conn:
                continue
            for c in (sa.get("child-sas") or {}).values():
                if child is not None and _s(c.get("name")) != child:
                    continue
                yield sa, c

    async def _initiate(self, path: VpnPath) -> bool:
        msg = {
            "ike": conn_name(path),
            "child": path.id,
            "timeout": str(self.initiate_timeout_ms),
            "init-limits": "no",
            "loglevel": "0",
        }

        def run(s: vici.Session) -> None:
            for _ in s.initiate(msg):
                pass

        t0 = time.perf_counter()
        try:
            await self._vici(run)
            self.last_negotiation_ms = (time.perf_counter() - t0) * 1000.0
            return True
        except CommandException as e:
            self.last_negotiation_ms = None
            log.info("%s: initiating %s failed (%s); waiting for the peer", self.node, path.id, e)
            return False

    async def _terminate(self, *, child_id: int | None = None, ike_id: int | None = None) -> None:
        msg: dict[str, str] = {"timeout": str(TERMINATE_TIMEOUT_MS), "loglevel": "-1"}
        if child_id is not None:
            msg["child-id"] = str(child_id)
        if ike_id is not None:
            msg["ike-id"] = str(ike_id)
            msg["force"] = "yes"

        def run(s: vici.Session) -> None:
            for _ in s.terminate(msg):
                pass

        try:
            await self._vici(run)
        except CommandException as e:
            log.info("%s: terminate %s: %s", self.node, msg, e)

    async def _terminate_children(self, conn: str, child: str) -> None:
        for _sa, c in self._children(await self._list_sas(conn), conn, child):
            await self._terminate(child_id=_int(c.get("uniqueid")))

    async def _terminate_empty_ike(self, conn: str) -> None:
        if self._pair_paths(conn):
            return
        for sa in await self._list_sas(conn):
            if sa["name"] == conn:
                await self._terminate(ike_id=_int(sa.get("uniqueid")))

    # ---- routing into ipsec0 ------------------------------------------------------------

    @staticmethod
    def route_mode(path: VpnPath) -> str:
        """'source' at FA-like nodes (per-user rule by source), 'destination' elsewhere."""
        return "source" if path.local.type is EndpointType.FA else "destination"

    def _wanted_routing(self) -> tuple[set[_Route], set[_Rule]]:
        routes: set[_Route] = set()
        rules: set[_Rule] = set()
        for p in self._paths.values():
            # When the remote selector covers the peer gateway's own address (a CN-GW
            # protecting the home prefix that holds the HA's address), IKE and ESP-in-UDP to
            # the peer must still take the ordinary route, not the tunnel they build.
            if any(p.remote.address in d for d in p.remote_ts):
                rules.add(_Rule(BYPASS_RULE_PREF, MAIN_TABLE, None, ipaddress.IPv4Network(f"{p.remote.address}/32")))
            if self.route_mode(p) == "source":
                routes.add(_Route(SRC_TABLE, ipaddress.IPv4Network("0.0.0.0/0")))
                for s in p.local_ts:
                    for d in p.remote_ts:
                        rules.add(_Rule(_rule_pref(SRC_RULE_PREF, s, d), SRC_TABLE, s if s.prefixlen else None,
                                        d if d.prefixlen else None))
            else:
                # Only the protected traffic (from the local selectors to the remote ones):
                # the gateway's own traffic to the same destinations keeps its normal route.
                for d in p.remote_ts:
                    routes.add(_Route(DEST_TABLE, d))
                    for s in p.local_ts:
                        rules.add(_Rule(_rule_pref(DEST_RULE_PREF, s, d), DEST_TABLE, s if s.prefixlen else None,
                                        d if d.prefixlen else None))
        return routes, rules

    def _scan_routing(self, ipr: Any) -> tuple[set[_Route], set[_Rule]]:
        routes: set[_Route] = set()
        for table in (SRC_TABLE, DEST_TABLE):
            for r in ipr.get_routes(family=socket.AF_INET, table=table):
                if r.get("table") != table:
                    continue
                dst = r.get("dst") or "0.0.0.0"
                routes.add(_Route(table, ipaddress.IPv4Network(f"{dst}/{r['dst_len']}")))
        rules = {
            rule
            for rule in (_rule_from_msg(m) for m in ipr.get_rules(family=socket.AF_INET))
            if (rule.table == SRC_TABLE and SRC_RULE_PREF <= rule.pref <= SRC_RULE_PREF + 64)
            or (rule.table == DEST_TABLE and DEST_RULE_PREF <= rule.pref <= DEST_RULE_PREF + 64)
            or (rule.table == MAIN_TABLE and rule.pref == BYPASS_RULE_PREF)
        }
        return routes, rules

    async def _sync_routing(self, rescan: bool = False) -> None:
        want_routes, want_rules = self._wanted_routing()

        def run(ipr: Any) -> None:
            if rescan:
                self._routes, self._rules = self._scan_routing(ipr)
            tun = ipr.link_lookup(ifname=self.tun_ifname)
            if not tun and (want_routes - self._routes):
                raise PathError(f"{self.node}: no {self.tun_ifname} (is charon running?)")
            for rule in self._rules - want_rules:
                with contextlib.suppress(Exception):
                    ipr.rule("del", **_rule_kwargs(rule))
                self._rules.discard(rule)
            for route in self._routes - want_routes:
                with contextlib.suppress(Exception):
                    ipr.route("del", dst=str(route.dst), table=route.table)
                self._routes.discard(route)
            for route in want_routes - self._routes:
                ipr.route("replace", dst=str(route.dst), oif=tun[0], table=route.table)
                self._routes.add(route)
            for rule in want_rules - self._rules:
                ipr.rule("add", **_rule_kwargs(rule))
                self._rules.add(rule)

        await self._nl(run)

    # ---- status -------------------------------------------------------------------------

    def _status(self, path_id: str, sas: Sequence[dict[str, Any]]) -> PathStatus:
        path = self._paths.get(path_id)
        conn = conn_name(path) if path else None
        best: dict[str, Any] | None = None
        ike: dict[str, Any] | None = None
        for sa, c in self._children(sas, conn, path_id):
            if best is None or _s(c.get("state")) == "INSTALLED":
                best, ike = c, sa
        if best is None:
            trapped = path is not None and (self._trapped(path) or path.id in self._armed)
            state = PathState.DOWN if path is None else PathState.TRAPPED if trapped else PathState.WAITING
            return PathStatus(
                path_id,
                state,
                local=path.local.address if path else None,
                remote=path.remote.address if path else None,
                local_ts=path.local_ts if path else (),
                remote_ts=path.remote_ts if path else (),
                detail=self._start_detail(path),
            )
        cstate = _s(best.get("state"))
        state = {"INSTALLED": PathState.UP, "CREATED": PathState.CONNECTING,
                 "INSTALLING": PathState.CONNECTING, "REKEYING": PathState.UP,
                 "REKEYED": PathState.UP}.get(cstate, PathState.DOWN)
        if path is None:
            state = PathState.STRAY

        def nets(key: str) -> tuple[ipaddress.IPv4Network, ...]:
            return tuple(ipaddress.IPv4Network(_s(n)) for n in best.get(key) or ())

        assert ike is not None
        return PathStatus(
            path_id,
            state,
            local=ipaddress.IPv4Address(_s(ike.get("local-host"))),
            remote=ipaddress.IPv4Address(_s(ike.get("remote-host"))),
            spi_in=_int(best.get("spi-in"), 16),
            spi_out=_int(best.get("spi-out"), 16),
            bytes_in=_int(best.get("bytes-in")) or 0,
            bytes_out=_int(best.get("bytes-out")) or 0,
            packets_in=_int(best.get("packets-in")) or 0,
            packets_out=_int(best.get("packets-out")) or 0,
            local_ts=nets("local-ts"),
            remote_ts=nets("remote-ts"),
            detail={"ike": ike["name"], "ike_state": _s(ike.get("state")),
                    "child_state": cstate, "encap": _s(best.get("encap", "no")),
                    "protocol": _s(best.get("protocol", "")),
                    **self._start_detail(path)},
        )

    async def status(self, path_id: str) -> PathStatus:
        path = self._paths.get(path_id)
        return self._status(path_id, await self._list_sas(conn_name(path) if path else None))

    # ---- the path API -------------------------------------------------------------------

    async def install(self, path: VpnPath) -> PathStatus:
        async with self._lock:
            old = self._paths.get(path.id)
            if old is not None and old != path:
                return await self._update_locked(old, path)
            return await self._install_locked(path)

    async def _install_locked(self, path: VpnPath) -> PathStatus:
        name = conn_name(path)
        known = path.id in self._paths
        await self._vici(self._load_psk(path))
        self._paths[path.id] = path
        try:
            await self._load_pair(name)
            await self._sync_routing()
            if path.qos is not None:
                await self.qos.apply(path.id, path.qos, path.local_ts, path.remote_ts)
        except Exception:
            await self._forget(path)
            raise
        # a path new to this object cannot have a CHILD_SA yet (the peer can only negotiate
        # what we have configured); a known one is checked so a repeat install is a no-op
        sas = await self._list_sas(name) if known else []
        if not path.on_traffic and not any(
            _s(c.get("state")) == "INSTALLED" for _sa, c in self._children(sas, name, path.id)
        ):
            await self._initiate(path)
        await self._sync_traps()
        return self._status(path.id, await self._list_sas(name))

    async def _forget(self, path: VpnPath) -> None:
        """Remove a path's config, routing, QoS and PSK (SAs are terminated by the caller)."""
        self._paths.pop(path.id, None)
        await self._load_pair(conn_name(path))
        await self._sync_routing()
        await self.qos.remove(path.id)
        name = conn_name(path)
        if not self._pair_paths(name):
            with contextlib.suppress(CommandException):
                await self._vici(lambda s: s.unload_shared({"id": psk_id(name)}))

    async def update(self, path: VpnPath) -> PathStatus:
        async with self._lock:
            old = self._paths.get(path.id)
            if old is None or old == path:
                return await self._install_locked(path)
            return await self._update_locked(old, path)

    async def _update_locked(self, old: VpnPath, new: VpnPath) -> PathStatus:
        from dataclasses import replace

        if replace(old, qos=new.qos, on_traffic=new.on_traffic) == new:  # only QoS / start changed
            self._paths[new.id] = new
            if new.on_traffic != old.on_traffic:
                # charon swaps the child config: the trap goes or comes, an established
                # CHILD_SA stays; a path no longer on-traffic is brought up now
                await self._load_pair(conn_name(new))
            if new.qos is None:
                await self.qos.remove(new.id)
            else:
                await self.qos.apply(new.id, new.qos, new.local_ts, new.remote_ts)
            if not new.on_traffic and (await self.status(new.id)).state is not PathState.UP:
                await self._initiate(new)
            await self._sync_traps()
            return await self.status(new.id)
        old_conn, new_conn = conn_name(old), conn_name(new)
        if old_conn != new_conn:
            # make-before-break: the new pair's CHILD_SA first, then drop the old one
            await self._vici(self._load_psk(new))
            self._paths[new.id] = new
            await self._load_pair(new_conn)
            await self._load_pair(old_conn)
            await self._sync_routing()
            await self.qos.remove(new.id)
            if new.qos is not None:
                await self.qos.apply(new.id, new.qos, new.local_ts, new.remote_ts)
            if not new.on_traffic:
                await self._initiate(new)
            await self._terminate_children(old_conn, old.id)
            await self._terminate_empty_ike(old_conn)
            await self._sync_traps()
            return await self.status(new.id)
        # same pair, other selectors/suite: break-before-make (same CHILD_SA name)
        await self._terminate_children(old_conn, old.id)
        await self.qos.remove(old.id)
        return await self._install_locked(new)

    async def remove(self, path_id: str) -> None:
        async with self._lock:
            await self._remove_locked(path_id)

    async def _remove_locked(self, path_id: str) -> None:
        path = self._paths.get(path_id)
        if path is None:
            # unknown to this object (e.g. after a restart): remove whatever charon has
            for name, children in (await self._list_conns()).items():
                if name.startswith(CONN_PREFIX) and path_id in children:
                    await self._terminate_children(name, path_id)
            return
        name = conn_name(path)
        await self._terminate_children(name, path_id)
        await self._forget(path)
        await self._terminate_empty_ike(name)
        await self._sync_traps()

    async def list(self) -> builtins.list[PathStatus]:
        sas = await self._list_sas()
        out = [self._status(pid, sas) for pid in sorted(self._paths)]
        for sa in sas:
            if not sa["name"].startswith(CONN_PREFIX):
                continue
            for c in (sa.get("child-sas") or {}).values():
                cname = _s(c.get("name"))
                if cname not in self._paths:
                    out.append(self._status(cname, [{**sa, "child-sas": {"x": c}}]))
        return out

    async def flush(self) -> None:
        await self.reconcile([])

    async def reconcile(self, wanted: Sequence[VpnPath]) -> builtins.list[PathStatus]:
        async with self._lock:
            ids = [p.id for p in wanted]
            if len(set(ids)) != len(ids):
                raise PathError("duplicate path ids in the wanted set")
            self._paths = {p.id: p for p in wanted}
            wanted_conns = {conn_name(p) for p in wanted}
            for p in wanted:
                await self._vici(self._load_psk(p))
            for name in wanted_conns:
                await self._load_pair(name)
            # strays: children/IKE_SAs not wanted, connections and PSKs not wanted
            sas = await self._list_sas()
            for sa in sas:
                if not sa["name"].startswith(CONN_PREFIX):
                    continue
                if sa["name"] not in wanted_conns:
                    await self._terminate(ike_id=_int(sa.get("uniqueid")))
                    continue
                keep = {p.id for p in self._pair_paths(sa["name"])}
                seen: set[str] = set()
                for c in (sa.get("child-sas") or {}).values():
                    cname = _s(c.get("name"))
                    if cname not in keep or cname in seen:
                        await self._terminate(child_id=_int(c.get("uniqueid")))
                    elif _s(c.get("state")) == "INSTALLED":
                        seen.add(cname)
            for name in await self._list_conns():
                if name.startswith(CONN_PREFIX) and name not in wanted_conns:
                    await self._load_pair(name)  # no paths -> unload
            shared = await self._vici(lambda s: s.get_shared())
            for key in shared.get("keys") or ():
                key = _s(key)
                if key.startswith(PSK_PREFIX) and key not in {psk_id(c) for c in wanted_conns}:
                    with contextlib.suppress(CommandException):
                        await self._vici(lambda s, k=key: s.unload_shared({"id": k}))
            await self._sync_routing(rescan=True)
            await self.qos.flush()
            for p in wanted:
                if p.qos is not None:
                    await self.qos.apply(p.id, p.qos, p.local_ts, p.remote_ts)
            # bring up what is wanted but not established (the peer may not be ready)
            sas = await self._list_sas()
            for p in wanted:
                if not p.on_traffic and not any(
                    _s(c.get("state")) == "INSTALLED"
                    for _sa, c in self._children(sas, conn_name(p), p.id)
                ):
                    await self._initiate(p)
            await self._sync_traps(force=True)
            sas = await self._list_sas()
            return [self._status(p.id, sas) for p in wanted]


def _nflog_tokens(data: bytes) -> list[int]:
    """The trap tokens named by the NFLOG packet messages in one netlink read."""
    import struct

    tokens = []
    off = 0
    while off + 16 <= len(data):
        length, mtype = struct.unpack_from("IH", data, off)
        if length < 16:
            break
        if mtype == (4 << 8) | 0:  # NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET
            attr = off + 16 + 4  # nlmsghdr, nfgenmsg
            while attr + 4 <= off + length:
                alen, atype = struct.unpack_from("HH", data, attr)
                if alen < 4:
                    break
                if atype & 0x7FFF == 10:  # NFULA_PREFIX
                    prefix = data[attr + 4:attr + alen].split(b"\0", 1)[0].decode(errors="replace")
                    if prefix.startswith(NFLOG_PREFIX):
                        with contextlib.suppress(ValueError):
                            tokens.append(int(prefix[len(NFLOG_PREFIX):].strip()))
                attr += (alen + 3) & ~3
        off += (length + 3) & ~3
    return tokens
