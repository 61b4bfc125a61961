"""On-traffic paths (claim 5) with charon and kernel-libipsec: the traps and their acquires.

* **charon's trap.**  An on-traffic path's child is loaded with ``start_action = trap`` (charon
  installs the trap policy at ``load-conn``, nothing is initiated) and a fixed ``reqid`` of our
  own (:data:`TRAP_REQID_BASE` band, one per path and pair, :meth:`Traps.reqid`).
  kernel-libipsec (strongSwan 5.9.8) raises **no acquire** for a trap policy — measured in
  namespaces: the packet is dropped with ``[ESP] could not find an outbound IPsec SA for reqid
  {N}, dropping packet`` and charon's trap manager never hears of it.  So we supply the acquire:
  a watcher thread subscribed to charon's VICI ``log`` event stream turns that message for one
  of our trap reqids into a VICI ``initiate`` of that child (at most once per second and path,
  and only while the child has no INSTALLED SA).  The triggering packet is lost, as with a
  kernel acquire; later packets are carried.  The trap stays after the CHILD_SA goes (rekey
  failure, DPD, peer restart), so the next packet brings it up again.
* **Shadowed traps.**  libipsec ranks every trap policy below every established SA's policy,
  whatever the selector sizes (a child's fixed ``priority`` is not honoured) — measured: at an
  FA whose home-address ⇄ any path to the HA is up, a trapped home-address ⇄ correspondent
  path never saw a packet, the ping went through the HA path.  Such an on-traffic path (one
  overlapping a path brought up at install, :func:`shadowing`) is trapped by us instead: an
  nftables table ``mipvpn-trap`` logs (NFLOG group :data:`NFLOG_GROUP`, rate-limited) and drops
  its packets on their way into ``ipsec0`` while it has no CHILD_SA (it is *armed*); a listener
  thread on that NFLOG group initiates the child and disarms it, and so does a ``child-updown``
  event for it (the peer brought it up).  Unlike charon's trap it is not re-armed when the
  CHILD_SA goes later (only at the next change of the path set, see the backend's
  ``_sync_traps``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import vici
from vici.exception import CommandException, SessionException

from daemons.runtime.log import EventLog
from daemons.vpn.path import PathError, VpnPath
from daemons.vpn.strongswan.charon import children, conn_name, list_sas, open_session, text

log = EventLog("mipvpn.strongswan")

# reqids of trapped children (on-traffic paths): our own band, far above charon's own
# allocation (which counts from 1)
TRAP_REQID_BASE = 0x6D740000
TRAP_REQID_SPAN = 0x00010000
# what libipsec logs (group ESP, level 1) when a packet hits a policy whose SA does not exist:
# the acquire that kernel-libipsec never raises
NO_SA_RE = re.compile(r"could not find an outbound IPsec SA for reqid \{(\d+)\}")
ACQUIRE_MIN_INTERVAL = 1.0  # seconds between two initiates of the same trapped path
# our own trap for on-traffic paths that an established SA shadows (see shadowing): an
# nftables table that logs (NFLOG) and drops their packets on the way into ipsec0
NFT_TABLE = "mipvpn-trap"
NFLOG_GROUP = 2701
NFLOG_PREFIX = "mipvpn-trap "
NETLINK_NETFILTER = 12
UP_STATES = ("INSTALLED", "INSTALLING", "CREATED")  # a CHILD_SA that is there or on its way


def shadowing(path: VpnPath, paths: Iterable[VpnPath]) -> VpnPath | None:
    """Another path of ``paths``, brought up at install, whose selectors overlap ``path``'s.

    kernel-libipsec puts every trap policy in a lower priority class than any established
    SA's policy (whatever the selector sizes; a fixed child ``priority`` is not honoured —
    both measured), so the first packets of such a path would go into the other path's SA
    and never hit the trap: e.g. at an FA the MN's home-address ⇄ any path to the HA covers
    the home-address ⇄ correspondent path to a dynamic CN-GW."""
    for q in paths:
        if q.id == path.id or q.on_traffic:
            continue
        if any(lt.overlaps(ql) for lt in path.local_ts for ql in q.local_ts) and \
                any(rt.overlaps(qr) for rt in path.remote_ts for qr in q.remote_ts):
            return q
    return None


def nflog_tokens(data: bytes) -> list[int]:
    """The trap tokens named by the NFLOG packet messages in one netlink read."""
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


class Traps:
    """The on-traffic traps of one node's charon (see the module docstring).

    ``paths`` returns the backend's installed paths (by id) whenever asked: the watcher threads
    read it too.  The backend decides *which* paths are trapped how after every change of its
    path set (charon's trap: :meth:`trapped` paths, in their child config with :meth:`reqid`;
    ours: :meth:`arm`).
    """

    def __init__(self, node: str, netns: str | None, socket_path: Path, tun_ifname: str,
                 initiate_timeout_ms: int, paths: Callable[[], Mapping[str, VpnPath]]) -> None:
        self.node = node
        self.netns = netns
        self.socket_path = socket_path
        self.tun_ifname = tun_ifname
        self.initiate_timeout_ms = initiate_timeout_ms
        self._paths = paths
        # charon's traps: (connection, path id) -> reqid of the trapped child
        self._reqids: dict[tuple[str, str], int] = {}
        self._next_reqid = TRAP_REQID_BASE
        self._reqid_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._watch_ready = threading.Event()  # subscribed to charon's log (reset on disconnect)
        self._watch_sock: socket.socket | None = None
        self._acquire_last: dict[str, float] = {}  # child name -> last initiate attempt
        #: number of acquires turned into an initiate (for tests and show)
        self.acquires = 0
        # shadowed on-traffic paths waiting for their first packet in our nftables trap:
        # path id -> token (the NFLOG prefix names it)
        self._armed: dict[str, int] = {}
        self._next_token = 1
        self._nft_lock = threading.Lock()
        self._nft_present = False
        self._nflog: threading.Thread | None = None
        self._nflog_ready = threading.Event()

    # ---- which trap a path gets ---------------------------------------------------------

    def shadowing(self, path: VpnPath) -> VpnPath | None:
        """See :func:`shadowing`, over the installed paths."""
        return shadowing(path, self._paths().values())

    def trapped(self, path: VpnPath) -> bool:
        """Is ``path`` installed as charon's trap?  On-traffic and not shadowed (a shadowed
        on-traffic path is trapped in nftables instead)."""
        return path.on_traffic and self.shadowing(path) is None

    def armed(self, path_id: str) -> bool:
        """Is ``path_id`` in our nftables trap (waiting for its first packet)?"""
        return path_id in self._armed

    def start_detail(self, path: VpnPath | None) -> dict[str, str]:
        """What ``show paths`` says about how the path starts."""
        if path is None or not path.on_traffic:
            return {}
        shadow = self.shadowing(path)
        return {"start": "on-traffic", **({"shadowed_by": shadow.id} if shadow is not None else {}),
                **({"trap": "nftables"} if path.id in self._armed else {})}

    # ---- charon's traps: reqids and the acquire watcher -----------------------------------

    def reqid(self, conn: str, path_id: str) -> int:
        """The fixed reqid of a trapped child (stable while the path stays on this pair)."""
        with self._reqid_lock:
            reqid = self._reqids.get((conn, path_id))
            if reqid is None:
                used = set(self._reqids.values())
                for _ in range(TRAP_REQID_SPAN):
                    reqid = self._next_reqid
                    self._next_reqid = TRAP_REQID_BASE + (reqid + 1 - TRAP_REQID_BASE) % TRAP_REQID_SPAN
                    if reqid not in used:
                        break
                else:
                    raise PathError(f"{self.node}: no free trap reqid")
                self._reqids[(conn, path_id)] = reqid
            return reqid

    def loaded_as_trap(self, conn: str, path_id: str) -> bool:
        """Does charon hold ``path_id``'s child on ``conn`` as a trap (as last loaded)?"""
        with self._reqid_lock:
            return (conn, path_id) in self._reqids

    def prune(self, conn: str, keep: Iterable[str]) -> None:
        """Forget the reqids of ``conn``'s children other than ``keep`` (before reloading it)."""
        keep = set(keep)
        with self._reqid_lock:
            for key in [k for k in self._reqids if k[0] == conn and k[1] not in keep]:
                self._reqids.pop(key)

    def _trapped_by_reqid(self, reqid: int) -> tuple[str, str] | None:
        with self._reqid_lock:
            return next((key for key, r in self._reqids.items() if r == reqid), None)

    async def watching(self) -> None:
        """Start the acquire watcher (once) and wait until it listens: a trap must not fire
        before (e.g. right after a charon restart)."""
        self._ensure_watcher()
        if not await asyncio.to_thread(self._watch_ready.wait, 5.0):
            log.warning("trap.watcher_not_ready", gw=self.node)

    def _ensure_watcher(self) -> None:
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name=f"acquire-{self.node}", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Thread: follow charon's VICI log stream; a libipsec "no outbound SA for reqid N"
        for one of our trap reqids is the first packet of an on-traffic path (the acquire
        kernel-libipsec does not raise): initiate that child.  Reconnects after a charon
        restart; ends when the backend closes."""
        session: vici.Session | None = None  # for the initiates (the listener's is busy)
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
                self._watch_sock = sock
                for kind, event in vici.Session(sock).listen(["log", "child-updown"], timeout=0.2):
                    self._watch_ready.set()  # registered: nothing logged from now on is missed
                    if self._stop.is_set():
                        break
                    if event and text(kind) == "child-updown":
                        try:
                            self._child_updown(event)
                        except (PathError, subprocess.SubprocessError) as e:
                            log.warning("trap.failed", gw=self.node, error=e)
                        continue
                    if not event or text(event.get("group", "")) != "ESP":
                        continue
                    m = NO_SA_RE.search(text(event.get("msg", "")))
                    if m:
                        session = self._acquire(int(m.group(1)), session)
            except (OSError, SessionException, CommandException, ValueError) as e:
                self._watch_ready.clear()
                if not self._stop.is_set():
                    log.debug("trap.watcher_reconnecting", gw=self.node, error=e)
                    session = None
                    self._stop.wait(0.1)
            finally:
                self._watch_ready.clear()
                self._watch_sock = None
                with contextlib.suppress(OSError):
                    sock.close()

    def _child_updown(self, event: dict[str, Any]) -> None:
        """In the watcher thread: a CHILD_SA came up (e.g. the peer's first packet made the
        peer negotiate it): an nftables trap of ours for it would only drop the next packet."""
        if text(event.get("up", "")) != "yes" or not self._armed:
            return
        names = {text(c.get("name")) for ike in event.values() if isinstance(ike, dict)
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
            _sock, session = open_session(self.socket_path)
        if any(text(c.get("state")) in UP_STATES for _sa, c in children(list_sas(session, conn), conn, child)):
            return session, True
        log.info("trap.acquired", gw=self.node, path=child)
        msg = {"ike": conn, "child": child, "timeout": str(self.initiate_timeout_ms),
               "init-limits": "no", "loglevel": "-1"}
        up = False
        try:
            for _ in session.initiate(msg):
                pass
            self.acquires += 1
            up = True
        except CommandException as e:
            log.info("trap.initiate_failed", gw=self.node, path=child, error=e)  # the next packet retries
        self._acquire_last[child] = time.monotonic()
        return session, up

    # ---- our nftables trap for shadowed paths --------------------------------------------

    def token(self, path_id: str) -> int:
        """The NFLOG token of ``path_id`` in our trap (its current one if armed, else a new one)."""
        token = self._armed.get(path_id)
        if token is None:
            token = self._next_token
            self._next_token += 1
        return token

    async def arm(self, armed: dict[str, int], force: bool = False) -> None:
        """Make our nftables trap hold exactly ``armed`` (path id -> :meth:`token`).  ``force``:
        rewrite it even if nothing changed (after a restart: a table left by the previous
        process goes)."""
        if force:
            self._nft_present = True
        if armed == self._armed and not force:
            return
        paths = self._paths()
        for path_id in armed.keys() - self._armed.keys():
            # libipsec would send its first packets into the shadowing path's SA
            log.info("trap.nftables", gw=self.node, path=path_id,
                     shadowed_by=getattr(self.shadowing(paths[path_id]), "id", "?"))
        if armed:
            self._ensure_watcher()  # child-updown: a CHILD_SA the peer brought up disarms
            self._ensure_nflog()
            if not await asyncio.to_thread(self._nflog_ready.wait, 5.0):
                log.warning("trap.nflog_not_ready", gw=self.node)
        await asyncio.to_thread(self._set_armed, armed)

    def _set_armed(self, armed: dict[str, int]) -> None:
        """Write the nftables trap for ``armed`` (any thread)."""
        with self._nft_lock:
            self._armed = dict(armed)
            paths = self._paths()
            lines = [f"table ip {NFT_TABLE}", f"delete table ip {NFT_TABLE}"]
            if armed:
                lines += [f"table ip {NFT_TABLE} {{", "  chain post {",
                          "    type filter hook postrouting priority 0; policy accept;"]
                for path_id, token in sorted(armed.items(), key=lambda kv: kv[1]):
                    path = paths.get(path_id)
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
        self._stop.clear()
        self._nflog_ready.clear()
        self._nflog = threading.Thread(target=self._nflog_loop, name=f"nflog-{self.node}", daemon=True)
        self._nflog.start()

    def _nflog_loop(self) -> None:
        """Thread: NFLOG messages from our nftables trap -> initiate the path they name."""
        import select

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
            while not self._stop.is_set():
                ready, _, _ = select.select([sock], [], [], 0.5)
                if not ready:
                    continue
                data = sock.recv(65535)
                for token in nflog_tokens(data):
                    path_id = next((pid for pid, t in self._armed.items() if t == token), None)
                    path = self._paths().get(path_id) if path_id else None
                    if path is None:
                        continue
                    session, up = self._initiate_trapped(conn_name(path), path.id, session)
                    if up:
                        try:
                            self._set_armed({pid: t for pid, t in self._armed.items() if pid != path.id})
                        except (PathError, subprocess.SubprocessError) as e:
                            log.warning("trap.failed", gw=self.node, error=e)
        except (OSError, SessionException, CommandException, PathError) as e:
            log.warning("trap.nflog_stopped", gw=self.node, error=e)
        finally:
            self._nflog_ready.clear()
            sock.close()

    # ---- the end ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop and join the watcher threads (blocks: call it off the event loop)."""
        self._stop.set()
        sock = self._watch_sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in (self._watcher, self._nflog):
            if thread is not None:
                thread.join(timeout=3)
        self._watcher = self._nflog = None
