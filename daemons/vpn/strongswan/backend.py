"""strongSwan backend of the path API: one charon per node, driven over VICI.

The backend composes the package's parts: :mod:`.charon` (charon's configuration and launch,
the VICI session), :mod:`.routes` (cleartext into ``ipsec0``), :mod:`.addresses` (the
addresses an FA must own), :mod:`.traps` (on-traffic paths) and :mod:`daemons.vpn.qos`.

Design
------
* **One IKE_SA per path, authenticated with that path's own PSK.**  Each path is one VICI
  connection ``mipvpn-LOCAL-REMOTE/PATH`` (:func:`~.charon.conn_name`) with one child, the
  path.  Its IKE identities name the path at both ends (``@ADDRESS/PATH``,
  :func:`~.charon.ike_ids`), so among many connections between the same two gateways the
  responder picks exactly this one and its key.  The PSK (``SecurityService.psk``) is the
  path's: the AAAH draws a fresh one at every registration, sealed for the two gateways
  (issue 15); a standing network-to-network tunnel (a static CN-GW's) keeps the pair's ids and
  PSK.  Loaded with ``load-shared`` (id ``mipvpn-psk-LOCAL-REMOTE/PATH``, owners = the two ids)
  and unloaded with the path.  A path must not share an IKE_SA with another user's: the
  responder signs its AUTH with the one key it finds for the identities, so per-user keys need
  per-user identities (seen: with 20 keys loaded for the same pair of ids, no IKE_SA came up).
* **Rotation:** a re-registration that brings the same path with new keys replaces the PSK in
  charon and keeps the established SAs (the PSK only authenticates an IKE_AUTH; what runs was
  keyed by its DH): the old key is gone, so no later IKE_SA can be authenticated with it.
  ESP keys come from IKE here; the AAAH's per-direction ESP keys are the xfrm backend's.
* **Cost:** a new path is one ``load-conn`` of one child and a full IKE_SA (IKE_SA_INIT +
  IKE_AUTH with the child) — O(1) in the paths already there, where a pair connection was
  reloaded with all its children; measured (VICI ``initiate`` alone, two namespaces, 2-core
  VM): IKE_SA + first CHILD_SA 3.3-3.9 ms, where a further CHILD_SA in a pair's IKE_SA took
  1.3-1.9 ms.  charon's IKE_SA table is hashed for many IKE_SAs (``strongswan_conf``).  Every
  IKE_SA runs its own DPD (30 s).
* **Who initiates:** both ends install and both try to initiate; the end that installs first
  finds its peer unconfigured (fails fast: NO_PROPOSAL_CHOSEN, or AUTHENTICATION_FAILED where
  the peer has other paths to us but no connection for these identities) and reports
  ``WAITING``, the end that installs second brings the CHILD_SA up.  An end that already has a
  CHILD_SA for the path does not initiate again (install is idempotent).
* **kernel-libipsec fixups** (no ESP in the kernel): charon's ``lookup 220`` rule is deleted
  after start and cleartext is routed into ``ipsec0`` by us, derived from the installed set
  (see :mod:`.routes`).  FA-like nodes must own the MN's home address (see :mod:`.addresses`):
  :attr:`Capability.LOCAL_SELECTOR_ADDRESS`, :meth:`StrongswanBackend.prepare_local_selector`.
* **On-traffic paths** (``VpnPath.on_traffic``, claim 5): the child is loaded as charon's trap
  and the backend supplies the acquire kernel-libipsec does not raise; an on-traffic path that
  an established path shadows is trapped in nftables instead.  ``_sync_traps`` re-decides after
  every change of the path set (a path becomes shadowed or free again as others come and go).
  See :mod:`.traps`.  Until its first packet the path reports ``TRAPPED``.
* QoS (optional per path): an HTB class + u32 filter on ``ipsec0`` (where the cleartext with
  the user's address is visible), see :mod:`daemons.vpn.qos`.

Operation
---------
* Start charon with :func:`daemons.vpn.strongswan.charon.charon_command` (inside the node's
  namespace), then :meth:`StrongswanBackend.wait_ready` (VICI up, ``ipsec0`` present, rule 220
  deleted, algorithms checked) and :meth:`StrongswanBackend.reconcile` with the wanted paths.
  Do the same after every charon restart: the new TUN device has lost our routes, and the
  peer's stale IKE_SA is replaced thanks to INITIAL_CONTACT.
* ``install`` blocks at most ``initiate_timeout_ms`` (5 s) when the peer is unreachable and
  then reports ``WAITING``; charon keeps retrying in the background (3 retransmits).
* charon needs the gcm and openssl plugins (Debian ``libstrongswan-standard-plugins``, which
  ``--no-install-recommends`` leaves out) besides ``libcharon-extra-plugins``.
* On a kernel with ESP, use the xfrm backend; this one always loads kernel-libipsec.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ipaddress
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import vici
from vici.exception import CommandException, SessionException

from daemons.runtime.log import EventLog
from daemons.vpn.access import AccessGuard
from daemons.vpn.path import (
    Capability,
    PathBackend,
    PathError,
    PathState,
    PathStatus,
    VpnPath,
)
from daemons.vpn.qos import HtbQos
from daemons.vpn.strongswan.addresses import prepare_local_selector, release_local_selector
from daemons.vpn.strongswan.charon import (
    CONN_PREFIX,
    PSK_PREFIX,
    Vici,
    children,
    conn_name,
    ike_ids,
    number,
    psk_id,
    text,
    vici_socket_path,
)
from daemons.vpn.strongswan.routes import TUN_IFNAME, TunRouting
from daemons.vpn.strongswan.traps import UP_STATES, Traps

log = EventLog("mipvpn.strongswan")

# IKE proposals are the same for every pair so that reloading a pair's connection with other
# children never changes its IKE config (which would orphan the established IKE_SA).
IKE_PROPOSALS = ["aes128gcm16-prfsha256-ecp256", "aes256gcm16-prfsha384-ecp384"]
INITIATE_TIMEOUT_MS = 5000
TERMINATE_TIMEOUT_MS = 3000


class StrongswanBackend(PathBackend):
    """Path backend on one node's charon (see the module docstring for the design)."""

    name = "strongswan"

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
        self._lock = asyncio.Lock()
        self.vici = Vici(node, self.socket_path)
        self.routing = TunRouting(node, netns, tun_ifname)
        self.traps = Traps(node, netns, self.socket_path, tun_ifname, initiate_timeout_ms, lambda: self._paths)
        self.qos = HtbQos(netns, tun_ifname)

    @property
    def capabilities(self) -> Capability:
        """kernel-libipsec: the local selector's address owned; F6 forwarding paths work (a
        CHILD_SA per path, no kernel policy template to collide with)."""
        return Capability.FORWARDING_PATHS | Capability.LOCAL_SELECTOR_ADDRESS

    @property
    def socket_path(self) -> Path:
        return vici_socket_path(self.run_dir, self.node)

    @property
    def acquires(self) -> int:
        """Number of on-traffic acquires turned into an initiate (for tests and show)."""
        return self.traps.acquires

    async def close(self) -> None:
        """Release the VICI session and netlink socket (charon keeps running)."""
        await asyncio.to_thread(self.traps.stop)  # joins threads: not on the event loop
        await self.vici.close()
        await self.routing.close()

    # ---- charon lifecycle ---------------------------------------------------------------

    async def wait_ready(self, within: float = 10.0) -> str:
        """Wait until charon answers on VICI and ``ipsec0`` exists, then apply the
        post-start fixups (delete charon's ``lookup 220`` rule).  Returns charon's version.
        Call after every charon (re)start, then :meth:`reconcile`."""
        deadline = time.monotonic() + within
        while True:
            try:
                version = await self.vici.version()
                if await self.routing.tun_present():
                    break
            except (OSError, SessionException):
                pass
            if time.monotonic() > deadline:
                raise PathError(f"charon on {self.node} not ready after {within} s")
            await asyncio.sleep(0.05)
        await self.routing.delete_charon_rules()
        await self.vici.check_algorithms()
        return version

    # ---- the addresses an FA must own ---------------------------------------------------

    async def prepare_local_selector(self, address: str, access_ifname: str) -> None:
        """See :func:`daemons.vpn.strongswan.addresses.prepare_local_selector`."""
        await prepare_local_selector(self.netns, address, access_ifname)

    async def release_local_selector(self, address: str) -> None:
        """See :func:`daemons.vpn.strongswan.addresses.release_local_selector`."""
        await release_local_selector(self.netns, address)

    # ---- VPN-only access (an FA) --------------------------------------------------------

    async def guard_access(self, access_ifname: str, visitors: Sequence[str]) -> None:
        """Route-based: cleartext enters the tunnel only by our per-user source rules into
        ``ipsec0`` (there exactly while the user's path is), so the access segment's blackhole
        (:class:`daemons.vpn.access.AccessGuard`) catches everything else, visitors included:
        nothing per visitor to keep."""
        guard = AccessGuard(access_ifname, self.netns)
        try:
            await guard.install()
        finally:
            guard.close()

    async def guard_visitor(self, home_address: str) -> None:
        """Nothing to do: until the visitor's path (and with it its source rule) is up, what it
        sends hits the access segment's blackhole (:meth:`guard_access`)."""
        return None

    async def release_visitor(self, home_address: str) -> None:
        """Nothing to do (see :meth:`guard_visitor`)."""
        return None

    # ---- VICI messages ------------------------------------------------------------------

    def _conn_message(self, path: VpnPath) -> dict[str, Any]:
        name = conn_name(path)
        life = path.security.lifetime
        child: dict[str, Any] = {
            "mode": "tunnel",
            "local_ts": [str(n) for n in path.local_ts],
            "remote_ts": [str(n) for n in path.remote_ts],
            "esp_proposals": [path.security.suite.esp_proposal()],
            # on-traffic: charon installs the trap policy when the connection is loaded
            "start_action": "trap" if self.traps.trapped(path) else "none",
            "close_action": "none",
            "dpd_action": "clear",
            "life_time": f"{life}s",
            "rekey_time": f"{max(1, life * 9 // 10)}s",
            "rand_time": f"{max(0, life // 20)}s",
        }
        if self.traps.trapped(path):
            child["reqid"] = str(self.traps.reqid(name, path.id))
        local_id, remote_id = ike_ids(path)
        return {
            name: {
                "version": "2",
                "local_addrs": [str(path.local.address)],
                "remote_addrs": [str(path.remote.address)],
                "proposals": IKE_PROPOSALS,
                "encap": "yes",
                "childless": "allow",
                "unique": "no",
                "mobike": "no",
                "dpd_delay": "30s",
                "rekey_time": "4h",
                "local": {"auth": "psk", "id": local_id},
                "remote": {"auth": "psk", "id": remote_id},
                "children": {path.id: child},
            }
        }

    async def _load_psk(self, path: VpnPath) -> None:
        """Load (or replace: rotation) the path's IKE PSK, owned by its two IKE identities."""
        psk = path.security.psk
        if psk is None:
            raise PathError(f"path {path.id}: the strongswan backend needs an IKE PSK")
        msg = {"id": psk_id(conn_name(path)), "type": "IKE", "data": psk.reveal(), "owners": list(ike_ids(path))}
        await self.vici.call(lambda s: s.load_shared(msg))

    async def _load_conn(self, path: VpnPath) -> None:
        name = conn_name(path)
        trapped = self.traps.trapped(path)
        self.traps.prune(name, [path.id] if trapped else [])
        if trapped:
            await self.traps.watching()
        msg = self._conn_message(path)
        try:
            await self.vici.call(lambda s: s.load_conn(msg))
        except CommandException as e:
            raise PathError(f"load-conn {name}: {e}") from None

    async def _unload_conn(self, name: str) -> None:
        """Unload a connection and its PSK (its SAs are terminated by the caller)."""
        self.traps.prune(name, [])
        for command, what in (("unload_conn", {"name": name}), ("unload_shared", {"id": psk_id(name)})):
            with contextlib.suppress(CommandException):
                await self.vici.call(lambda s, c=command, w=what: getattr(s, c)(w))

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
            await self.vici.call(run)
            self.last_negotiation_ms = (time.perf_counter() - t0) * 1000.0
            return True
        except CommandException as e:
            self.last_negotiation_ms = None
            log.info("path.initiate_failed", gw=self.node, path=path.id, error=e)  # waiting for the peer
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
            await self.vici.call(run)
        except CommandException as e:
            log.info("vici.terminate_failed", gw=self.node, child_id=child_id, ike_id=ike_id, error=e)

    async def _terminate_conn(self, conn: str) -> None:
        """End the IKE_SA(s) of a path's connection, and with them its CHILD_SA."""
        for sa in await self.vici.list_sas(conn):
            if sa["name"] == conn:
                await self._terminate(ike_id=number(sa.get("uniqueid")))

    # ---- routing into ipsec0, traps -----------------------------------------------------

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
            if self.traps.loaded_as_trap(name, p.id) != self.traps.trapped(p):
                await self._load_conn(p)
            if self.traps.trapped(p):
                continue
            if any(text(c.get("state")) in UP_STATES
                   for _sa, c in children(await self.vici.list_sas(name), name, p.id)):
                continue
            armed[p.id] = self.traps.token(p.id)
        await self.traps.arm(armed, force)

    # ---- status -------------------------------------------------------------------------

    def _status(self, path_id: str, sas: Sequence[dict[str, Any]]) -> PathStatus:
        path = self._paths.get(path_id)
        conn = conn_name(path) if path else None
        best: dict[str, Any] | None = None
        ike: dict[str, Any] | None = None
        for sa, c in children(sas, conn, path_id):
            if best is None or text(c.get("state")) == "INSTALLED":
                best, ike = c, sa
        if best is None:
            trapped = path is not None and (self.traps.trapped(path) or self.traps.armed(path.id))
            state = PathState.DOWN if path is None else PathState.TRAPPED if trapped else PathState.WAITING
            return PathStatus(
                path_id,
                state,
                local=path.local.address if path else None,
                remote=path.remote.address if path else None,
                local_ts=path.local_ts if path else (),
                remote_ts=path.remote_ts if path else (),
                detail=self.traps.start_detail(path),
            )
        cstate = text(best.get("state"))
        state = {"INSTALLED": PathState.UP, "CREATED": PathState.CONNECTING,
                 "INSTALLING": PathState.CONNECTING, "REKEYING": PathState.UP,
                 "REKEYED": PathState.UP}.get(cstate, PathState.DOWN)
        if path is None:
            state = PathState.STRAY

        def nets(key: str) -> tuple[ipaddress.IPv4Network, ...]:
            return tuple(ipaddress.IPv4Network(text(n)) for n in best.get(key) or ())

        assert ike is not None
        return PathStatus(
            path_id,
            state,
            local=ipaddress.IPv4Address(text(ike.get("local-host"))),
            remote=ipaddress.IPv4Address(text(ike.get("remote-host"))),
            spi_in=number(best.get("spi-in"), 16),
            spi_out=number(best.get("spi-out"), 16),
            bytes_in=number(best.get("bytes-in")) or 0,
            bytes_out=number(best.get("bytes-out")) or 0,
            packets_in=number(best.get("packets-in")) or 0,
            packets_out=number(best.get("packets-out")) or 0,
            local_ts=nets("local-ts"),
            remote_ts=nets("remote-ts"),
            detail={"ike": ike["name"], "ike_state": text(ike.get("state")),
                    "child_state": cstate, "encap": text(best.get("encap", "no")),
                    "protocol": text(best.get("protocol", "")),
                    **self.traps.start_detail(path)},
        )

    async def status(self, path_id: str) -> PathStatus:
        path = self._paths.get(path_id)
        return self._status(path_id, await self.vici.list_sas(conn_name(path) if path else None))

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
        await self._load_psk(path)
        self._paths[path.id] = path
        try:
            await self._load_conn(path)
            await self.routing.add(path)
            if path.qos is not None:
                await self.qos.apply(path.id, path.qos, path.local_ts, path.remote_ts)
        except Exception:
            await self._forget(path)
            raise
        # a path new to this object cannot have a CHILD_SA yet (the peer can only negotiate
        # what we have configured); a known one is checked so a repeat install is a no-op
        sas = await self.vici.list_sas(name) if known else []
        if not path.on_traffic and not any(
            text(c.get("state")) == "INSTALLED" for _sa, c in children(sas, name, path.id)
        ):
            await self._initiate(path)
        await self._sync_traps()
        return self._status(path.id, await self.vici.list_sas(name))

    async def _forget(self, path: VpnPath) -> None:
        """Remove a path's config, PSK, routing and QoS (SAs are terminated by the caller)."""
        self._paths.pop(path.id, None)
        await self._unload_conn(conn_name(path))
        await self.routing.remove(path.id)
        await self.qos.remove(path.id)

    async def update(self, path: VpnPath) -> PathStatus:
        async with self._lock:
            old = self._paths.get(path.id)
            if old is None or old == path:
                return await self._install_locked(path)
            return await self._update_locked(old, path)

    async def _update_locked(self, old: VpnPath, new: VpnPath) -> PathStatus:
        old_conn, new_conn = conn_name(old), conn_name(new)
        if old_conn != new_conn:
            # a far (or near) end moved: make-before-break, the new connection's SAs first,
            # then the old connection's IKE_SA goes
            await self._load_psk(new)
            self._paths[new.id] = new
            await self._load_conn(new)
            await self.routing.add(new)
            await self.qos.remove(new.id)
            if new.qos is not None:
                await self.qos.apply(new.id, new.qos, new.local_ts, new.remote_ts)
            if not new.on_traffic:
                await self._initiate(new)
            await self._terminate_conn(old_conn)
            await self._unload_conn(old_conn)
            await self._sync_traps()
            return await self.status(new.id)
        keys = replace(old.security, outbound=new.security.outbound, inbound=new.security.inbound,
                       psk=new.security.psk)
        if replace(old, security=keys, qos=new.qos, on_traffic=new.on_traffic) == new:
            # the same path with new keys (a re-registration: rotation), QoS or start: the SAs stay
            self._paths[new.id] = new
            if new.security.psk != old.security.psk:
                await self._load_psk(new)  # replaces the old key: no later IKE_SA can use it
                log.info("psk.rotated", gw=self.node, path=new.id)
            if new.on_traffic != old.on_traffic:
                # charon swaps the child config: the trap goes or comes, an established
                # CHILD_SA stays; a path no longer on-traffic is brought up now
                await self._load_conn(new)
            if new.qos != old.qos:
                if new.qos is None:
                    await self.qos.remove(new.id)
                else:
                    await self.qos.apply(new.id, new.qos, new.local_ts, new.remote_ts)
            if not new.on_traffic and (await self.status(new.id)).state is not PathState.UP:
                await self._initiate(new)
            await self._sync_traps()
            return await self.status(new.id)
        # same pair, other selectors/suite/lifetime: break-before-make (same connection name)
        await self._terminate_conn(old_conn)
        await self.qos.remove(old.id)
        return await self._install_locked(new)

    async def remove(self, path_id: str) -> None:
        async with self._lock:
            await self._remove_locked(path_id)

    async def _remove_locked(self, path_id: str) -> None:
        path = self._paths.get(path_id)
        if path is None:
            # unknown to this object (e.g. after a restart): remove whatever charon has
            for name, child_names in (await self.vici.list_conns()).items():
                if name.startswith(CONN_PREFIX) and path_id in child_names:
                    await self._terminate_conn(name)
                    await self._unload_conn(name)
            return
        await self._terminate_conn(conn_name(path))
        await self._forget(path)
        await self._sync_traps()

    async def list(self) -> builtins.list[PathStatus]:
        sas = await self.vici.list_sas()
        out = [self._status(pid, sas) for pid in sorted(self._paths)]
        for sa in sas:
            if not sa["name"].startswith(CONN_PREFIX):
                continue
            for c in (sa.get("child-sas") or {}).values():
                cname = text(c.get("name"))
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
                await self._load_psk(p)
                await self._load_conn(p)
            # strays: IKE_SAs, duplicate children, connections and PSKs not wanted
            for sa in await self.vici.list_sas():
                if not sa["name"].startswith(CONN_PREFIX):
                    continue
                if sa["name"] not in wanted_conns:
                    await self._terminate(ike_id=number(sa.get("uniqueid")))
                    continue
                seen: set[str] = set()
                for c in (sa.get("child-sas") or {}).values():
                    cname = text(c.get("name"))
                    if cname not in self._paths or cname in seen:
                        await self._terminate(child_id=number(c.get("uniqueid")))
                    elif text(c.get("state")) == "INSTALLED":
                        seen.add(cname)
            for name in await self.vici.list_conns():
                if name.startswith(CONN_PREFIX) and name not in wanted_conns:
                    await self._unload_conn(name)
            wanted_keys = {psk_id(c) for c in wanted_conns}
            shared = await self.vici.call(lambda s: s.get_shared())
            for key in shared.get("keys") or ():
                key = text(key)
                if key.startswith(PSK_PREFIX) and key not in wanted_keys:
                    with contextlib.suppress(CommandException):
                        await self.vici.call(lambda s, k=key: s.unload_shared({"id": k}))
            await self.routing.sync(wanted, rescan=True)
            await self.qos.flush()
            for p in wanted:
                if p.qos is not None:
                    await self.qos.apply(p.id, p.qos, p.local_ts, p.remote_ts)
            # bring up what is wanted but not established (the peer may not be ready)
            sas = await self.vici.list_sas()
            for p in wanted:
                if not p.on_traffic and not any(
                    text(c.get("state")) == "INSTALLED"
                    for _sa, c in children(sas, conn_name(p), p.id)
                ):
                    await self._initiate(p)
            await self._sync_traps(force=True)
            sas = await self.vici.list_sas()
            return [self._status(p.id, sas) for p in wanted]
