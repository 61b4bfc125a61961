"""xfrm backend of the path API: manually keyed ESP SAs and policies written into the kernel.

Design
------
* **What a path becomes.**  Two ESP tunnel-mode SAs (outbound ``local -> remote`` with
  ``security.outbound``'s SPI and keys, inbound ``remote -> local`` with ``security.inbound``)
  and, for every ``local_ts x remote_ts`` combination, three policies: ``out`` (local -> remote
  selector), ``in`` and ``fwd`` (remote -> local selector), each with one template naming the
  tunnel endpoints and the path's reqid.  Keys and SPIs come from the AAAH, so installing a
  path is five netlink round trips (for one selector pair) and no negotiation.
* **Ownership.**  Every SA and policy template we write carries a reqid from our own band
  ``REQID_BASE .. REQID_BASE + REQID_SPAN - 1`` (one reqid per path).  ``flush``, ``reconcile``
  and ``list`` only ever look at entries whose reqid (of the SA, or of a policy's template) lies
  in that band; SAs and policies of anything else on the host (an IKE daemon, ``ip xfrm`` by
  hand) are never touched.  An install that would collide with a foreign entry (same SPI and
  destination, or same policy selector and direction) fails with a :class:`XfrmPathError`
  instead of overwriting it.  Marks were not used: a marked policy only matches marked packets,
  which would change the data path, while the reqid is pure bookkeeping.
* **Priorities.**  ``PRIORITY_BASE + (64 - src_len - dst_len)``: more specific selectors win
  (lower value = preferred), and our policies sit in one recognisable band.
* **Idempotent install.**  SAs and policies are added with ``NLM_F_EXCL``; on ``EEXIST`` the
  kernel's entry is read back and left alone when equal, replaced when ours and different.
* **update** (e.g. new remote endpoint after a move) is make-before-break where the kernel
  allows it: new SAs are added first, policies switched atomically with UPDPOLICY, then the
  old SAs deleted.  An SA whose (destination, SPI) stays the same but whose contents change
  (the inbound SA when only the remote endpoint moved and the AAAH kept the SPIs: the kernel
  keys inbound SAs by local address + SPI and cannot change an SA's source or algorithm in
  place) is deleted and re-added right after the policy switch; inbound packets arriving in
  that window (one netlink round trip) are dropped.  With fresh SPIs from the AAAH the switch is
  loss-free.  (XFRM_MSG_MIGRATE would avoid even that, but needs CONFIG_XFRM_MIGRATE.)
* **remove** deletes the path's SAs and policies (and its QoS class).  The kernel does not
  store path ids, so an id unknown to this object (after a restart) cannot be removed by id:
  call :meth:`XfrmBackend.reconcile` with the wanted set after a restart, which removes every
  entry of ours that no wanted path explains.  ``reconcile`` adopts the reqid of an existing
  outbound SA of a wanted path, so kept paths are not re-installed (their counters survive).
* **Routing.**  None added: with kernel xfrm the ``out`` policy is consulted after the route
  lookup for the inner destination, so the node only needs *some* route for the remote
  selectors (normally its default route towards the peer); ``fwd``/``in`` policies admit the
  decrypted traffic, which is then routed normally.  The strongswan backend's ``ipsec0``
  routes/rules exist only because of kernel-libipsec.
* **QoS.**  With kernel xfrm, tc on the physical egress device sees the packet *after* ESP
  encapsulation (inner addresses invisible).  Per path we therefore classify on the outer
  header: an HTB class (see :mod:`daemons.vpn.qos`) on the egress interface towards the
  remote endpoint (found by a route lookup) with a u32 filter on ``protocol 50``, the outer
  ``src``/``dst`` and the outbound SPI (``at 20``: the kernel adds no IP options to the outer
  header).  The SPI is per path, so this is per user.  Only the egress (upstream) direction is
  shaped, as with the strongswan backend.
* **On-traffic paths** (``VpnPath.on_traffic``, claim 5).  Installed without the outbound
  SA: the inbound SA and all policies go in at once (the template names the path's reqid), the
  outbound SA is *held* by the backend.  The first packet that matches the ``out`` policy finds
  no SA, so the kernel queues an XFRM_MSG_ACQUIRE (and, with the default
  ``xfrm_larval_drop``, drops the packet); a monitor thread on the ACQUIRE multicast group
  matches the acquire's template reqid to the path and installs the held SA (the keys came
  from the AAAH at registration, so no negotiation: one netlink round trip), which also
  replaces the kernel's larval state.  The inbound SA must not wait: the peer's first packet
  may arrive before this end sends anything (the peer's own trap fired), and a missing
  inbound SA just drops ESP without telling anyone.  Until the acquire the path reports
  ``TRAPPED``; an outbound SA the kernel already holds (after a restart) is kept.
* **VPN-only access** (an FA, :meth:`XfrmBackend.guard_access`).  The access segment's
  blackhole (:class:`daemons.vpn.access.AccessGuard`) drops whatever arrives there unclaimed;
  a visitor the FA takes in (:meth:`XfrmBackend.guard_visitor`, before its host route) is
  claimed by a rule ``from HOA iif ACCESS lookup main`` and, first, guarded by two ``out``
  policies with action BLOCK, ``HOA/32 -> 0.0.0.0/1`` and ``HOA/32 -> 128.0.0.0/1``
  (:func:`guard_policies`), at :data:`GUARD_PRIORITY`, a priority number above every path
  policy's: the kernel looks ``out`` policies up for forwarded packets too, the lowest number
  wins, so a path's ALLOW policy with its template (encrypt) takes what it covers and the
  guard drops the rest — before the path is up, while it is replaced during a move, and for
  destinations no path covers.  Two halves, not ``0.0.0.0/0``: the kernel identifies a policy
  by selector and direction, not priority, and ``HOA/32 -> any`` is the path to the HA's own
  selector.  Only ``out``: ``in``/``fwd`` policies check what arrives (decrypted traffic
  toward the MN, with the path's templates), and a ``fwd`` block on the source would refuse
  the visitor's traffic even with its path up (no ``fwd`` policy of a path has the home
  address as source); what the FA delivers to itself or to the MN is not sourced from the
  home address.  The guard policies carry no template, so :func:`policy_is_ours` (paths) never
  sees them: they are ours by action, priority and shape (:func:`is_guard_policy`); ``flush``
  removes them, ``reconcile`` (paths) leaves them alone, ``guard_access`` reconciles them with
  the FA's visitors.
* Errors: kernel errors become :class:`XfrmPathError` (a :class:`PathError`) whose message is
  the kernel's (``XfrmError`` text incl. extended ack), the ``XfrmError`` is ``.cause``.

Keys are :class:`daemons.runtime.secret.Secret` all the way into the netlink message; ``list`` reports
SPIs and counters only.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import ipaddress
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from daemons.runtime.log import EventLog
from daemons.vpn.access import AccessGuard
from daemons.vpn.path import (
    Capability,
    PathBackend,
    PathError,
    PathState,
    PathStatus,
    Qos,
    VpnPath,
)
from daemons.vpn.qos import HtbQos, QosClass, QosError
from daemons.vpn.xfrm.netlink import XfrmError, XfrmMonitor, XfrmSocket
from daemons.wire.xfrm import IPPROTO_ESP, SA, XFRMNLGRP_ACQUIRE, Policy, Selector, Tmpl

log = EventLog("mipvpn.xfrm")

REQID_BASE = 0x6D700000  # "mp": reqids of mipvpn's paths
REQID_SPAN = 0x00100000
PRIORITY_BASE = 0x2F00
#: the access guard's BLOCK policies: a larger number (less preferred) than any path policy
#: (PRIORITY_BASE .. PRIORITY_BASE + 64)
GUARD_PRIORITY = PRIORITY_BASE + 0x80
_HALVES = (ipaddress.IPv4Network("0.0.0.0/1"), ipaddress.IPv4Network("128.0.0.0/1"))
_GONE = (errno.ENOENT, errno.ESRCH)


class XfrmPathError(PathError):
    """A path operation failed in the kernel; the message is the kernel's (no secrets)."""

    def __init__(self, message: str, cause: XfrmError | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.errno = cause.errno if cause is not None else None


def ours(reqid: int) -> bool:
    return REQID_BASE <= reqid < REQID_BASE + REQID_SPAN


def sa_is_ours(sa: SA) -> bool:
    return ours(sa.reqid)


def policy_is_ours(pol: Policy) -> bool:
    return any(ours(t.reqid) for t in pol.tmpls)


def _policy_reqid(pol: Policy) -> int:
    return next((t.reqid for t in pol.tmpls if ours(t.reqid)), 0)


# --------------------------------------------------------------------------- what a path is


@dataclass(frozen=True)
class PathEntries:
    """The kernel entries of one path: (outbound SA, inbound SA) and its policies."""

    reqid: int
    sa_out: SA
    sa_in: SA
    policies: tuple[Policy, ...]

    @property
    def sas(self) -> tuple[SA, SA]:
        return (self.sa_out, self.sa_in)


def priority(src: ipaddress.IPv4Network, dst: ipaddress.IPv4Network) -> int:
    return PRIORITY_BASE + (64 - src.prefixlen - dst.prefixlen)


def path_entries(path: VpnPath, reqid: int) -> PathEntries:
    """The SAs and policies that make up ``path`` (pure: no I/O)."""
    sec = path.security
    if not sec.manual or sec.outbound is None or sec.inbound is None:
        raise PathError(f"path {path.id}: the xfrm backend needs manual keys (SPIs and keys from the AAAH)")
    local, remote = str(path.local.address), str(path.remote.address)

    def sa(src: str, dst: str, keys) -> SA:  # type: ignore[no-untyped-def]
        if sec.suite.is_aead:
            return SA.gcm(src, dst, keys.spi, keys.enc_key, reqid)
        assert keys.auth_key is not None
        return SA.cbc_sha256(src, dst, keys.spi, keys.enc_key, keys.auth_key, reqid)

    out_tmpl = (Tmpl(local, remote, reqid=reqid),)
    in_tmpl = (Tmpl(remote, local, reqid=reqid),)
    policies: list[Policy] = []
    for lts in path.local_ts:
        for rts in path.remote_ts:
            prio = priority(lts, rts)
            policies.append(Policy(Selector.of(lts, rts), "out", out_tmpl, priority=prio))
            policies.append(Policy(Selector.of(rts, lts), "in", in_tmpl, priority=prio))
            policies.append(Policy(Selector.of(rts, lts), "fwd", in_tmpl, priority=prio))
    return PathEntries(reqid, sa(local, remote, sec.outbound), sa(remote, local, sec.inbound), tuple(policies))


def guard_policies(home_address: str) -> tuple[Policy, ...]:
    """The access guard of one visitor (pure: no I/O): nothing from ``home_address`` is
    forwarded unless a path's ``out`` policy takes it (see the module doc)."""
    src = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(home_address)}/32")
    return tuple(Policy(Selector.of(src, half), "out", (), priority=GUARD_PRIORITY, action="block")
                 for half in _HALVES)


def is_guard_policy(pol: Policy) -> bool:
    """One of :func:`guard_policies`' (of any home address)."""
    sel = pol.selector
    return (pol.dir == "out" and pol.action == "block" and not pol.tmpls and pol.priority == GUARD_PRIORITY
            and sel.src.version == 4 and sel.src.prefixlen == 32 and sel.dst in _HALVES
            and (sel.proto, sel.sport, sel.dport, sel.ifindex) == (0, 0, 0, 0))


def _sa_key(sa: SA) -> tuple[str, int, int]:
    return (sa.dst, sa.spi, sa.proto)


def _pol_key(pol: Policy) -> tuple[Selector, str]:
    return (pol.selector, pol.dir)


def _sa_same(a: SA, b: SA) -> bool:
    """Equal in everything we set (kernels may add flags/defaults we don't model)."""
    def proj(s: SA) -> tuple[object, ...]:
        return (s.src, s.dst, s.spi, s.proto, s.reqid, s.mode, s.aead, s.enc, s.auth, s.encap, s.mark, s.if_id)

    return proj(a) == proj(b)


def _pol_same(a: Policy, b: Policy) -> bool:
    return replace(a, index=0) == replace(b, index=0)


# --------------------------------------------------------------------------- QoS on the outer header


class EspQos(HtbQos):
    """HTB classes on a physical egress interface, classified by the outer ESP header."""

    async def apply_esp(self, key: str, qos: Qos, spi: int, src: str, dst: str) -> QosClass:
        match = ["match", "ip", "protocol", "50", "0xff", "match", "ip", "src", f"{src}/32",
                 "match", "ip", "dst", f"{dst}/32", "match", "u32", f"0x{spi:08x}", "0xffffffff", "at", "20"]
        return await self.classify(key, qos, [match], spi=f"0x{spi:08x}")


# --------------------------------------------------------------------------- the backend


class XfrmBackend(PathBackend):
    """Path backend writing SAs/policies over NETLINK_XFRM in one namespace (see module doc)."""

    name = "xfrm"

    @property
    def capabilities(self) -> Capability:
        """Policy-based (the kernel's policy lookup steers cleartext), keys from the AAAH: no
        address to own, no routes; no F6 forwarding paths (see :attr:`Capability.FORWARDING_PATHS`)."""
        return Capability.NONE

    def __init__(self, node: str, netns: str | None = None, *, qos: bool = True,
                 xfrm: XfrmSocket | None = None) -> None:
        self.node = node
        self.netns = netns
        self.qos_enabled = qos
        self._xs = xfrm if xfrm is not None else XfrmSocket(netns)
        self._own_socket = xfrm is None
        self._paths: dict[str, VpnPath] = {}
        self._entries: dict[str, PathEntries] = {}
        self._by_reqid: dict[int, str] = {}
        self._kernel_reqids: set[int] | None = None  # reqids of ours seen in the kernel at first use
        self._next_reqid = REQID_BASE + 1
        self._qos: dict[str, EspQos] = {}  # by interface
        self._qos_if: dict[str, str] = {}  # path id -> interface
        self._lock = asyncio.Lock()
        # on-traffic paths: path id -> outbound SA held back until the kernel's ACQUIRE
        self._held: dict[str, SA] = {}
        self._held_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()
        #: number of acquires turned into an installed outbound SA (for tests and show)
        self.acquires = 0
        self._access: AccessGuard | None = None  # an FA's access segment (guard_access)

    def __repr__(self) -> str:
        return f"XfrmBackend(node={self.node!r}, netns={self.netns!r}, paths={len(self._paths)})"

    async def close(self) -> None:
        if self._access is not None:
            self._access.close()
        await asyncio.to_thread(self._stop_watcher)
        if self._own_socket:
            await asyncio.to_thread(self._xs.close)

    # ---- plumbing -----------------------------------------------------------------------

    async def _x(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run ``fn`` on the xfrm socket's worker thread; XfrmError -> XfrmPathError."""
        try:
            return await self._xs.acall(fn, *args)
        except XfrmError as exc:
            raise XfrmPathError(f"{self.node}: {exc}", exc) from exc

    def _scan_reqids_sync(self) -> set[int]:
        used = {sa.reqid for sa in self._xs.dump_sas() if sa_is_ours(sa)}
        used |= {_policy_reqid(p) for p in self._xs.dump_policies() if policy_is_ours(p)}
        return used

    async def _alloc_reqid(self) -> int:
        if self._kernel_reqids is None:
            self._kernel_reqids = await self._x(self._scan_reqids_sync)
        for _ in range(REQID_SPAN):
            r = self._next_reqid
            self._next_reqid = REQID_BASE + 1 + (r - REQID_BASE) % (REQID_SPAN - 1)
            if r not in self._by_reqid and r not in self._kernel_reqids:
                return r
        raise PathError(f"{self.node}: no free reqid")

    # ---- kernel writes (run on the socket's worker thread) -------------------------------

    def _apply_sync(self, want: PathEntries, old: PathEntries | None,
                    hold_out: bool = False) -> dict[tuple[str, int, int], SA]:
        """Make the kernel hold ``want``; remove what of ``old`` ``want`` does not need.

        Returns the path's SAs as the kernel now holds them (with counters where they already
        existed), so ``install`` needs no extra round trips for its status.
        On failure, entries this call added are deleted again (nothing else is touched).
        ``hold_out``: leave the outbound SA out (an on-traffic path before its first packet)."""
        xs = self._xs
        now: dict[tuple[str, int, int], SA] = {}
        added_sas: list[SA] = []
        added_pols: list[Policy] = []
        try:
            replace_later: list[SA] = []
            for sa in (want.sa_in,) if hold_out else want.sas:
                now[_sa_key(sa)] = sa
                try:
                    xs.add_sa(sa)
                    added_sas.append(sa)
                    continue
                except XfrmError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                cur = xs.get_sa(sa.dst, sa.spi)
                if not sa_is_ours(cur):
                    raise PathError(f"{self.node}: {sa.describe()}: SPI already used by an SA mipvpn does not manage")
                if _sa_same(cur, sa):
                    now[_sa_key(sa)] = cur
                else:
                    replace_later.append(sa)
            for pol in want.policies:
                try:
                    xs.add_policy(pol)
                    added_pols.append(pol)
                    continue
                except XfrmError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                cur_pol = xs.get_policy(pol.selector, pol.dir)
                if not policy_is_ours(cur_pol):
                    raise PathError(f"{self.node}: {pol.describe()}: selector already used by a policy "
                                    "mipvpn does not manage")
                other = self._by_reqid.get(_policy_reqid(cur_pol))
                mine = self._by_reqid.get(want.reqid)
                if other is not None and other != mine:
                    raise PathError(f"{self.node}: {pol.describe()}: selector already used by path {other}")
                if not _pol_same(cur_pol, pol):
                    xs.update_policy(pol)  # atomic switch to the new template
        except BaseException:
            for pol in added_pols:
                with contextlib.suppress(XfrmError):
                    xs.delete_policy(pol.selector, pol.dir)
            for sa in added_sas:
                with contextlib.suppress(XfrmError):
                    xs.delete_sa(sa.dst, sa.spi, proto=sa.proto)
            raise
        for sa in replace_later:  # same (dst, SPI), other contents: delete + add
            with contextlib.suppress(XfrmError):
                xs.delete_sa(sa.dst, sa.spi)
            xs.add_sa(sa)
        if old is not None:
            self._delete_sync(old, keep=want)
        if hold_out:  # an outbound SA of ours left from before (the path was up) goes
            with contextlib.suppress(XfrmError):
                if sa_is_ours(xs.get_sa(want.sa_out.dst, want.sa_out.spi)):
                    xs.delete_sa(want.sa_out.dst, want.sa_out.spi, proto=want.sa_out.proto)
        return now

    # ---- on-traffic paths: the ACQUIRE monitor ------------------------------------------

    def _ensure_watcher(self) -> None:
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._watch_stop.clear()
        monitor = XfrmMonitor(self.netns, (XFRMNLGRP_ACQUIRE,))  # subscribed before we return
        self._watcher = threading.Thread(target=self._watch, args=(monitor,), name=f"acquire-{self.node}",
                                         daemon=True)
        self._watcher.start()

    def _stop_watcher(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=3)
            self._watcher = None

    def _watch(self, monitor: XfrmMonitor) -> None:
        """Thread: ACQUIREs for one of our held paths install its outbound SA."""
        try:
            while not self._watch_stop.is_set():
                try:
                    events = monitor.read(timeout=0.5)
                except Exception as exc:  # keep listening whatever one read did
                    log.warning("xfrm.monitor_failed", gw=self.node, error=exc)
                    self._watch_stop.wait(0.5)
                    continue
                for event in events:
                    if event.kind == "acquire" and event.policy is not None:
                        for tmpl in event.policy.tmpls:
                            if ours(tmpl.reqid):
                                self._acquire(tmpl.reqid)
        finally:
            monitor.close()

    def _acquire(self, reqid: int) -> None:
        path_id = self._by_reqid.get(reqid)
        if path_id is None:
            return
        with self._held_lock:
            sa = self._held.get(path_id)
            if sa is None or sa.reqid != reqid:
                return
            try:
                self._xs.add_sa(sa)  # replaces the kernel's larval (acquire) state
            except XfrmError as exc:
                if exc.errno != errno.EEXIST:
                    log.warning("trap.install_failed", gw=self.node, path=path_id, error=exc)
                    return
            del self._held[path_id]
            self.acquires += 1
        log.info("trap.acquired", gw=self.node, path=path_id, spi_out=f"0x{sa.spi:08x}")

    def _delete_sync(self, old: PathEntries, keep: PathEntries | None = None) -> None:
        xs = self._xs
        keep_pols = {_pol_key(p) for p in keep.policies} if keep else set()
        keep_sas = {_sa_key(s) for s in keep.sas} if keep else set()
        for pol in old.policies:
            if _pol_key(pol) in keep_pols:
                continue
            try:
                xs.delete_policy(pol.selector, pol.dir)
            except XfrmError as exc:
                if exc.errno not in _GONE:
                    raise
        for sa in old.sas:
            if _sa_key(sa) in keep_sas:
                continue
            try:
                xs.delete_sa(sa.dst, sa.spi, proto=sa.proto)
            except XfrmError as exc:
                if exc.errno not in _GONE:
                    raise

    def _remove_strays_sync(self, wanted: Iterable[PathEntries]) -> int:
        """Delete every entry of ours that none of ``wanted`` accounts for."""
        xs = self._xs
        want_sas = {_sa_key(s) for e in wanted for s in e.sas}
        want_pols = {_pol_key(p) for e in wanted for p in e.policies}
        n = 0
        for pol in xs.dump_policies():
            if policy_is_ours(pol) and _pol_key(pol) not in want_pols:
                with contextlib.suppress(XfrmError):
                    xs.delete_policy(pol.selector, pol.dir, mark=pol.mark, if_id=pol.if_id)
                    n += 1
        for sa in xs.dump_sas():
            if sa_is_ours(sa) and _sa_key(sa) not in want_sas:
                with contextlib.suppress(XfrmError):
                    xs.delete_sa(sa.dst, sa.spi, proto=sa.proto)
                    n += 1
        return n

    # ---- QoS ----------------------------------------------------------------------------

    def _egress_ifname(self, dst: str) -> str | None:
        from pyroute2 import IPRoute

        ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        try:
            routes = ipr.route("get", dst=dst)
            oif = routes[0].get("RTA_OIF") if routes else None
            if oif is None:
                return None
            links = ipr.get_links(oif)
            return links[0].get("IFLA_IFNAME") if links else None
        finally:
            ipr.close()

    async def _qos_apply(self, path: VpnPath, entries: PathEntries) -> None:
        await self._qos_remove(path.id)
        if path.qos is None or not self.qos_enabled:
            return
        try:
            ifname = await asyncio.to_thread(self._egress_ifname, str(path.remote.address))
        except Exception as exc:  # no route: nothing to shape on
            ifname = None
            log.warning("qos.no_route", gw=self.node, path=path.id, remote=path.remote.address, error=exc)
        if ifname is None:
            return
        qos = self._qos.setdefault(ifname, EspQos(self.netns, ifname))
        try:
            await qos.apply_esp(path.id, path.qos, entries.sa_out.spi, entries.sa_out.src, entries.sa_out.dst)
        except QosError as exc:
            raise PathError(f"{self.node}: qos for {path.id}: {exc}") from None
        self._qos_if[path.id] = ifname

    async def _qos_remove(self, path_id: str) -> None:
        ifname = self._qos_if.pop(path_id, None)
        if ifname is not None:
            await self._qos[ifname].remove(path_id)

    # ---- VPN-only access (an FA; see the module doc) -------------------------------------

    def _guard_sync(self, home_address: str) -> None:
        added: list[Policy] = []
        try:
            for pol in guard_policies(home_address):
                try:
                    self._xs.add_policy(pol)
                    added.append(pol)
                except XfrmError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    if not is_guard_policy(self._xs.get_policy(pol.selector, pol.dir)):
                        raise PathError(f"{self.node}: access guard: {pol.describe()}: selector already used "
                                        "by another policy") from None
        except BaseException:
            for pol in added:
                with contextlib.suppress(XfrmError):
                    self._xs.delete_policy(pol.selector, pol.dir)
            raise

    def _unguard_sync(self, home_address: str) -> None:
        for pol in guard_policies(home_address):
            try:
                self._xs.delete_policy(pol.selector, pol.dir)
            except XfrmError as exc:
                if exc.errno not in _GONE:
                    raise

    def _guarded_sync(self) -> set[str]:
        """The home addresses the kernel holds a guard policy for."""
        return {str(p.selector.src.network_address) for p in self._xs.dump_policies() if is_guard_policy(p)}

    async def guard_access(self, access_ifname: str, visitors: Sequence[str]) -> None:
        """The access segment's blackhole, then every visitor's guard made exactly ``visitors``
        (guards of the gone released: rule first, then policies; the missing added)."""
        if self._access is None or self._access.interface != access_ifname:
            if self._access is not None:
                self._access.close()
            self._access = AccessGuard(access_ifname, self.netns)
        await self._access.install()
        want = {str(ipaddress.IPv4Address(v)) for v in visitors}
        have = await self._x(self._guarded_sync) | await self._access.admitted()
        for hoa in sorted(have - want):
            await self.release_visitor(hoa)
        for hoa in sorted(want):
            await self.guard_visitor(hoa)

    async def guard_visitor(self, home_address: str) -> None:
        """BLOCK policies first, then the rule that lets the visitor's traffic past the
        access segment's blackhole: whatever it sends from then on is routed, and leaves in
        a path's ESP or not at all."""
        await self._x(self._guard_sync, home_address)
        if self._access is not None:
            await self._access.admit(home_address)

    async def release_visitor(self, home_address: str) -> None:
        """The rule first (what the address sends hits the blackhole again), then the policies."""
        if self._access is not None:
            await self._access.refuse(home_address)
        await self._x(self._unguard_sync, home_address)

    # ---- the path API -------------------------------------------------------------------

    async def install(self, path: VpnPath) -> PathStatus:
        async with self._lock:
            return await self._install_locked(path)

    async def update(self, path: VpnPath) -> PathStatus:
        async with self._lock:
            return await self._install_locked(path)

    async def _install_locked(self, path: VpnPath) -> PathStatus:
        old = self._entries.get(path.id)
        reqid = old.reqid if old is not None else await self._alloc_reqid()
        want = path_entries(path, reqid)
        unchanged = old == want and self._paths.get(path.id) == path
        # on-traffic: hold the outbound SA back unless this very SA is already up (acquired)
        hold = path.on_traffic and not (old is not None and path.id not in self._held
                                        and _sa_same(old.sa_out, want.sa_out))
        if hold:
            self._ensure_watcher()
        self._by_reqid[reqid] = path.id
        with self._held_lock:
            try:
                sas = await self._x(self._apply_sync, want, old, hold)  # rolls back what it added on failure
            except BaseException:
                if old is None:
                    self._by_reqid.pop(reqid, None)
                raise
            if hold:
                self._held[path.id] = want.sa_out
            else:
                self._held.pop(path.id, None)
        self._paths[path.id] = path
        self._entries[path.id] = want
        if not unchanged or (path.qos is not None and path.id not in self._qos_if):
            await self._qos_apply(path, want)
        return self._status_from(path.id, want, sas, {_pol_key(p) for p in want.policies})

    async def remove(self, path_id: str) -> None:
        async with self._lock:
            entries = self._entries.get(path_id)
            if entries is None:
                log.debug("path.unknown", gw=self.node, path=path_id)
                return
            with self._held_lock:
                self._held.pop(path_id, None)
            await self._x(self._delete_sync, entries)
            await self._qos_remove(path_id)
            self._entries.pop(path_id)
            self._paths.pop(path_id)
            self._by_reqid.pop(entries.reqid, None)

    async def flush(self) -> None:
        async with self._lock:
            await self._x(self._remove_strays_sync, ())
            admitted = await self._access.admitted() if self._access is not None else set()
            for hoa in await self._x(self._guarded_sync) | admitted:  # the access blackhole stays
                await self.release_visitor(hoa)
            for qos in self._qos.values():
                for key in list(qos.classes):
                    await qos.remove(key)
            self._qos_if.clear()
            self._paths.clear()
            with self._held_lock:
                self._held.clear()
            self._entries.clear()
            self._by_reqid.clear()
            self._kernel_reqids = set()

    async def reconcile(self, wanted: Sequence[VpnPath]) -> builtins.list[PathStatus]:
        async with self._lock:
            ids = [p.id for p in wanted]
            if len(set(ids)) != len(ids):
                raise PathError("duplicate path ids in the wanted set")
            sas = await self._x(self._xs.dump_sas)
            # adopt the reqid of a wanted path's existing outbound SA (no re-install, counters kept)
            existing = {_sa_key(sa): sa.reqid for sa in sas if sa_is_ours(sa)}
            taken: set[int] = set()
            reqids: dict[str, int] = {}
            for p in wanted:
                if p.security.outbound is None:
                    raise PathError(f"path {p.id}: the xfrm backend needs manual keys")
                r = existing.get((str(p.remote.address), p.security.outbound.spi, IPPROTO_ESP))
                if r is None and p.id in self._entries:
                    r = self._entries[p.id].reqid
                if r is not None and r not in taken:
                    reqids[p.id] = r
                    taken.add(r)
            self._kernel_reqids = set(existing.values()) | await self._x(self._scan_reqids_sync)
            self._by_reqid = {r: pid for pid, r in reqids.items()}
            for p in wanted:
                if p.id not in reqids:
                    reqids[p.id] = await self._alloc_reqid()
                    self._by_reqid[reqids[p.id]] = p.id
            entries = {p.id: path_entries(p, reqids[p.id]) for p in wanted}
            removed = await self._x(self._remove_strays_sync, entries.values())
            if removed:
                log.info("paths.strays_removed", gw=self.node, entries=removed)
            self._paths = {p.id: p for p in wanted}
            self._entries = {}
            with self._held_lock:
                self._held.clear()
            if any(p.on_traffic for p in wanted):
                self._ensure_watcher()
            for p in wanted:
                # an on-traffic path whose outbound SA the kernel holds already stays up
                hold = p.on_traffic and _sa_key(entries[p.id].sa_out) not in existing
                with self._held_lock:
                    await self._x(self._apply_sync, entries[p.id], None, hold)
                    if hold:
                        self._held[p.id] = entries[p.id].sa_out
                self._entries[p.id] = entries[p.id]
            # QoS: start from a clean slate on every interface we shaped or will shape
            for qos in self._qos.values():
                await qos.flush()
            self._qos_if.clear()
            for p in wanted:
                await self._qos_apply(p, entries[p.id])
            return await self._status_all([p.id for p in wanted])

    # ---- status -------------------------------------------------------------------------

    def _status_from(self, path_id: str, e: PathEntries, sas: dict[tuple[str, int, int], SA],
                     pols: set[tuple[Selector, str]]) -> PathStatus:
        path = self._paths[path_id]
        out = sas.get(_sa_key(e.sa_out))
        inn = sas.get(_sa_key(e.sa_in))
        n_pol = sum(1 for p in e.policies if _pol_key(p) in pols)
        state = PathState.UP if out is not None and inn is not None and n_pol == len(e.policies) else PathState.DOWN
        if path_id in self._held and out is None:
            state = PathState.TRAPPED if inn is not None and n_pol == len(e.policies) else PathState.DOWN
        return PathStatus(
            path_id, state, local=path.local.address, remote=path.remote.address,
            spi_in=e.sa_in.spi, spi_out=e.sa_out.spi,
            bytes_in=inn.bytes if inn else 0, bytes_out=out.bytes if out else 0,
            packets_in=inn.packets if inn else 0, packets_out=out.packets if out else 0,
            local_ts=path.local_ts, remote_ts=path.remote_ts,
            detail={"reqid": f"0x{e.reqid:08x}", "policies": f"{n_pol}/{len(e.policies)}",
                    "suite": path.security.suite.value, "mode": "tunnel",
                    **({"start": "on-traffic"} if path.on_traffic else {}),
                    **({"qos_dev": self._qos_if[path_id]} if path_id in self._qos_if else {})},
        )

    def _dump_sync(self) -> tuple[list[SA], list[Policy]]:
        return self._xs.dump_sas(), self._xs.dump_policies()

    async def status(self, path_id: str) -> PathStatus:
        if path_id not in self._entries:
            return PathStatus(path_id, PathState.DOWN)
        return (await self._status_all([path_id]))[0]

    async def _status_all(self, ids: Sequence[str], strays: bool = False) -> builtins.list[PathStatus]:
        sa_list, pol_list = await self._x(self._dump_sync)
        sas = {_sa_key(sa): sa for sa in sa_list if sa_is_ours(sa)}
        pols = {_pol_key(p) for p in pol_list if policy_is_ours(p)}
        out = [self._status_from(pid, self._entries[pid], sas, pols) for pid in ids]
        if strays:
            out += self._strays(sa_list, pol_list)
        return out

    def _strays(self, sa_list: Sequence[SA], pol_list: Sequence[Policy]) -> builtins.list[PathStatus]:
        """Entries of ours that no path of this object explains, grouped by reqid."""
        known_sas = {_sa_key(s) for e in self._entries.values() for s in e.sas}
        known_pols = {_pol_key(p) for e in self._entries.values() for p in e.policies}
        by_reqid: dict[int, tuple[list[SA], list[Policy]]] = {}
        for sa in sa_list:
            if sa_is_ours(sa) and _sa_key(sa) not in known_sas:
                by_reqid.setdefault(sa.reqid, ([], []))[0].append(sa)
        for pol in pol_list:
            if policy_is_ours(pol) and _pol_key(pol) not in known_pols:
                by_reqid.setdefault(_policy_reqid(pol), ([], []))[1].append(pol)
        out = []
        for reqid, (s_list, p_list) in sorted(by_reqid.items()):
            out_t = next((t for p in p_list if p.dir == "out" for t in p.tmpls), None)
            sa_out = next((s for s in s_list if out_t and (s.src, s.dst) == (out_t.src, out_t.dst)), None)
            sa_in = next((s for s in s_list if s is not sa_out), None)
            out_pols = [p for p in p_list if p.dir == "out"]
            out.append(PathStatus(
                f"xfrm-reqid-0x{reqid:08x}", PathState.STRAY,
                local=ipaddress.IPv4Address(out_t.src) if out_t else None,
                remote=ipaddress.IPv4Address(out_t.dst) if out_t else None,
                spi_in=sa_in.spi if sa_in else None, spi_out=sa_out.spi if sa_out else None,
                bytes_in=sa_in.bytes if sa_in else 0, bytes_out=sa_out.bytes if sa_out else 0,
                packets_in=sa_in.packets if sa_in else 0, packets_out=sa_out.packets if sa_out else 0,
                local_ts=tuple(ipaddress.IPv4Network(p.selector.src) for p in out_pols
                               if p.selector.family == socket.AF_INET),
                remote_ts=tuple(ipaddress.IPv4Network(p.selector.dst) for p in out_pols
                                if p.selector.family == socket.AF_INET),
                detail={"reqid": f"0x{reqid:08x}", "sas": str(len(s_list)), "policies": str(len(p_list))},
            ))
        return out

    async def list(self) -> builtins.list[PathStatus]:
        return await self._status_all(sorted(self._entries), strays=True)
