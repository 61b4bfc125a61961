"""The MAVPN control section (claim 9): turns a user's VPN info into installed paths.

It keeps, per user, the VPN info the node was given (its "VPN cache"), installs and removes
paths through whichever backend the node runs (xfrm or strongswan: the agents never care
which), and persists the cache so a restarted agent reconciles its paths: against the users
its daemon says are still live (:meth:`MavpnControl.reconcile`), never the whole cache. The
cache is one record per user (``vpn.db``, ``daemons.store.records``), written when that user's
paths change. It holds key material: it lives in the daemon's private state directory
(0700, files 0600), like the configuration files that hold the Mobile IP keys.

Distribution (claim 5): a VpnInfo with ``VPN-Distribution = ON_TRAFFIC`` becomes a backend path
with ``on_traffic`` set — installed as a trap, its SAs set up by the backend at the first
packet (``show paths`` says ``trapped`` until then).  A network-to-network path shared by
several users (the HA's side of a static CN-GW tunnel) is on-traffic only while *every* user
that needs it asks for that: one user whose profile says at-registration brings it up.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from daemons.runtime.config import Common
from daemons.runtime.log import EventLog
from daemons.runtime.tasks import background
from daemons.store.records import RecordStore
from daemons.vpn.factory import make_backend
from daemons.vpn.path import Capability, EndpointType, PathBackend, PathError, PathStatus, VpnPath
from daemons.vpn.vpninfo import ON_TRAFFIC, STATIC_OWNER, VpnInfo, from_record, from_static, to_record

log = EventLog("mipvpn.mavpn")


class MavpnControl:
    def __init__(self, backend: PathBackend, state: RecordStore, access_interface: str | None = None) -> None:
        self.backend = backend
        self.state = state
        self.access_interface = access_interface  # FA: where the MNs are
        self.cache: dict[str, dict[int, VpnInfo]] = {}  # nai -> path id -> info
        self.lock = asyncio.Lock()

    @classmethod
    async def start(cls, config: Common, access_interface: str | None = None) -> MavpnControl | None:
        """The node's path control on the backend its configuration names (None: no IPsec),
        with its cache restored and the configured static paths added. Nothing is installed
        yet: the daemon that owns the bindings calls :meth:`reconcile` with the users whose
        binding is still live."""
        if config.ipsec_backend == "none":
            return None
        backend = make_backend(config.ipsec_backend, config.node, config.run_dir or config.state_dir)
        await backend.wait_ready()  # e.g. strongswan: charon must be up, ipsec0 there
        control = cls(backend, RecordStore.in_dir(config.state_dir, "vpn"), access_interface)
        control.restore()
        static = [from_static(p) for p in config.static_paths]
        if static:
            control.cache[STATIC_OWNER] = {i.path_id: i for i in static}
        return control

    # ---- persistence -----------------------------------------------------------------------
    def restore(self) -> None:
        """The cached VPN info from the state store (``vpn.db``, one record per user); a user
        whose entry cannot be read is dropped (``state.record_dropped``) rather than keeping
        the agent from starting: the next registration brings it again."""
        restored = self.state.load_records({"vpn": lambda nai, hexes: from_record(hexes, nai)})["vpn"]
        self.cache = {nai: {i.path_id: i for i in infos} for nai, infos in restored.items()}

    def persist(self, nai: str) -> None:
        """The cache entry of one user as it stands (none: its record goes)."""
        infos = self.cache.get(nai)
        if infos:
            self.state.put("vpn", nai, to_record(infos.values()))
        else:
            self.state.delete("vpn", nai)

    def wanted(self) -> list[VpnInfo]:
        return [info for infos in self.cache.values() for info in infos.values()]

    def reconcile(self, live_users: Iterable[str], lapsed: Iterable[tuple[str, int]] = ()) -> asyncio.Task[None]:
        """After a (re)start: the cache keeps only the users the caller says are live (their
        binding, visitor or session did not run out while the daemon was down) and the
        configured static paths; ``lapsed``: (user, path id) of paths of a live user that
        ran out meanwhile (an FA's F6 forwarding path). The MAVPN does not judge liveness:
        the daemon that owns the bindings does.

        The cache is cut at once (persisted before this returns, so no later :meth:`apply`
        sees the dead users); the backend is brought to exactly the cached paths in the
        background (a path whose peer is not up yet may take seconds to give up, and the
        daemon must serve meanwhile): paths of the dropped users are removed, the others
        installed, strays removed. Returns that task (await it to wait for the backend)."""
        live = {*live_users, STATIC_OWNER}
        gone = {(nai, path_id) for nai, path_id in lapsed if nai in live and path_id in self.cache.get(nai, {})}
        owned = self._owned_home_addresses()
        before = self.backend_paths()
        dropped = {nai: len(infos) for nai, infos in self.cache.items() if nai not in live}
        for nai in dropped:
            del self.cache[nai]
        for nai, path_id in gone:
            del self.cache[nai][path_id]
            if not self.cache[nai]:
                del self.cache[nai]
        for nai, paths in dropped.items():
            log.info("paths.dropped", mn=nai, paths=paths, reason="no live binding")
        for nai, path_id in sorted(gone):
            log.info("paths.dropped", mn=nai, path=path_id, reason="lapsed")
        with self.state.batch():
            for nai in {*dropped, *(nai for nai, _ in gone)}:
                self.persist(nai)
        stale = [path_id for path_id in before if path_id not in self.backend_paths()]
        return background(self._reconcile_backend(stale, owned))

    async def _reconcile_backend(self, stale: list[str], owned: set[str]) -> None:
        async with self.lock:
            stale = [path_id for path_id in stale if path_id not in self.backend_paths()]  # not re-applied since
            for path_id in stale:  # the backend's reconcile would too; a log line per path
                await self.backend.remove(path_id)
                log.info("path.removed", path=path_id, reason="not live")
            await self._release(owned - self._owned_home_addresses())
            for info in self.wanted():
                await self._prepare(info)
            await self.backend.reconcile(list(self.backend_paths().values()))
        log.info("paths.reconciled", paths=len(self.wanted()), removed=len(stale))

    # ---- per user ----------------------------------------------------------------------------
    async def apply(self, nai: str, infos: list[VpnInfo]) -> None:
        """Make this user's paths exactly ``infos``: new ones installed, changed ones updated
        (e.g. a new far endpoint after a move), the rest removed.

        A network-to-network path (no per-user /32 selector, e.g. the HA's side of the CN-GW's
        static tunnel) is the same tunnel for every user: it is installed once, under a name
        of its own, and removed with the last user that needs it.
        """
        sealed = [i.path_id for i in infos if i.sealed]
        if sealed:  # a relay's copy reached a backend: a bug upstream, never install it
            raise PathError(f"{nai}: paths {sealed} still have their keys sealed")
        async with self.lock:
            before = self.backend_paths()
            owned = self._owned_home_addresses()
            if infos:
                self.cache[nai] = {i.path_id: i for i in infos}
            else:
                self.cache.pop(nai, None)
            after = self.backend_paths()
            for path_id, path in before.items():
                if path_id not in after or after[path_id].pair != path.pair:
                    await self.backend.remove(path_id)
                    log.info("path.removed", mn=nai, path=path_id, remote=path.remote.address)
            await self._release(owned - self._owned_home_addresses())
            for info in infos:
                await self._prepare(info)
            for path_id, path in after.items():
                if before.get(path_id) == path:
                    continue
                same_pair = path_id in before and before[path_id].pair == path.pair
                status = await (self.backend.update(path) if same_pair else self.backend.install(path))
                log.info("path.installed", mn=nai, path=path_id, local=path.local.address,
                         remote=path.remote.address, state=status.state.value)
            self.persist(nai)

    async def remove_user(self, nai: str) -> None:
        await self.apply(nai, [])

    def backend_paths(self) -> dict[str, VpnPath]:
        """What should be installed, by backend path id, over every cached user (a shared
        path waits for traffic only if every user of it says so)."""
        out: dict[str, VpnPath] = {}
        for info in self.wanted():
            path = self.backend_path(info)
            have = out.get(path.id)
            out[path.id] = path if have is None or not path.on_traffic else have
        return out

    @staticmethod
    def backend_path(info: VpnInfo) -> VpnPath:
        """A user's path as the backend installs it: a network-to-network path (no per-user
        /32 selector) gets a name of its own, shared by every user that needs it."""
        path = info.path
        if (info.distribution == ON_TRAFFIC) != path.on_traffic:
            path = replace(path, on_traffic=info.distribution == ON_TRAFFIC)
        if path.user_addresses():
            return path
        digest = hashlib.sha256(repr((path.local_ts, path.remote_ts)).encode()).hexdigest()[:8]
        return replace(path, id=f"net:{path.local.address}-{path.remote.address}:{digest}")

    def infos(self, nai: str) -> list[VpnInfo]:
        return list(self.cache.get(nai, {}).values())

    def _selector_interface(self) -> str | None:
        """An FA on a backend that must own its local selectors
        (:attr:`Capability.LOCAL_SELECTOR_ADDRESS`): the access interface its MNs are on."""
        if Capability.LOCAL_SELECTOR_ADDRESS not in self.backend.capabilities:
            return None
        return self.access_interface

    async def _prepare(self, info: VpnInfo) -> None:
        """An FA's local selector is the MN's home address: with user-space ESP the FA must
        own that address (:meth:`PathBackend.prepare_local_selector`)."""
        access = self._selector_interface()
        if info.path.local.type is not EndpointType.FA or access is None:
            return
        for net in info.path.local_ts:
            if net.prefixlen == 32:  # a home address (not an F6 forwarding path's "any")
                await self.backend.prepare_local_selector(str(net.network_address), access)

    def _owned_home_addresses(self) -> set[str]:
        """The home addresses _prepare made this node own for the cached paths."""
        if self._selector_interface() is None:
            return set()
        return {str(net.network_address) for info in self.wanted() if info.path.local.type is EndpointType.FA
                for net in info.path.local_ts if net.prefixlen == 32}

    async def _release(self, addresses: set[str]) -> None:
        """A home address no path needs any more is given back: left on ``lo`` (with its
        access rule) it would swallow what still arrives for the MN after it left."""
        for address in addresses:
            await self.backend.release_local_selector(address)

    # ---- VPN-only access (an FA) ----------------------------------------------------------------
    async def guard_access(self, visitors: Iterable[str]) -> None:
        """At the FA's start, before any registration: nothing from the access segment leaves
        in clear; ``visitors``: the home addresses of the visitors the FA holds
        (:meth:`PathBackend.guard_access`)."""
        assert self.access_interface is not None, "an FA's path control knows its access interface"
        await self.backend.guard_access(self.access_interface, list(visitors))
        log.info("access.guarded", interface=self.access_interface, backend=self.backend.name)

    async def guard_visitor(self, home_address: str) -> None:
        """Before the visitor's host route (:meth:`PathBackend.guard_visitor`)."""
        await self.backend.guard_visitor(home_address)

    async def release_visitor(self, home_address: str) -> None:
        """After the visitor's host route is gone (:meth:`PathBackend.release_visitor`)."""
        await self.backend.release_visitor(home_address)

    # ---- show ----------------------------------------------------------------------------------
    async def show(self) -> list[dict[str, Any]]:
        statuses: dict[str, PathStatus] = {s.id: s for s in await self.backend.list()}
        users: dict[str, set[str]] = {}
        for info in self.wanted():
            users.setdefault(self.backend_path(info).id, set()).add(info.nai)
        rows = []
        for path_id, path in self.backend_paths().items():
            status = statuses.pop(path_id, None)
            row: dict[str, Any] = {"users": ",".join(sorted(users.get(path_id, ()))), "path": path_id,
                                   "local": str(path.local.address), "remote": str(path.remote.address),
                                   "remote_type": path.remote.type.value}
            row.update({k: v for k, v in (status.as_dict() if status else {"state": "missing"}).items()
                        if k not in ("id", "local", "remote")})
            rows.append(row)
        for stray in statuses.values():
            rows.append({"users": "", "path": stray.id, **stray.as_dict()})
        return rows
