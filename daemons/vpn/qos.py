"""Per-user QoS with Linux tc: one HTB class + one u32 filter per path (backend independent).

Layout on the shaped interface::

    qdisc 1: htb default 0          unclassified traffic is not shaped (HTB direct queue)
      class 1:1  rate/ceil = link   parent of all user classes (they may borrow up to it)
        class 1:N rate, ceil, prio  one per path; filter pref N: u32 src/dst -> 1:N

The filter's preference equals the class minor, so a path's filter can be deleted exactly
(``tc filter del ... pref N``) without knowing u32 handles.

Where to shape is the caller's decision: the matched addresses must be visible on that
interface.  With strongSwan's kernel-libipsec the cleartext enters the TUN device ``ipsec0``
(inner addresses visible), so the strongswan backend shapes there.  With kernel xfrm tunnel
mode the physical egress only sees ESP; shape on the interface where cleartext leaves
(e.g. the FA's access interface for downstream) or classify before encryption.

Uses the ``tc`` command (``tc -n NETNS``) rather than pyroute2's tc layer: u32 keys are easier
to get right, and errors read like the iproute2 documentation.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemons.runtime.log import EventLog
from daemons.vpn.path import Qos

log = EventLog("mipvpn.qos")

ROOT_HANDLE = "1:"
PARENT_CLASS = "1:1"
MIN_MINOR = 0x10
MAX_MINOR = 0xFFFE
DEFAULT_LINK_RATE = 10_000_000_000  # bit/s for the parent class


class QosError(Exception):
    pass


@dataclass(frozen=True)
class QosClass:
    key: str
    minor: int
    qos: Qos


async def tc(netns: str | None, *args: str, check: bool = True) -> str:
    """Run ``tc`` (in ``netns``); its output, or :class:`QosError` with its message."""
    cmd = ["tc", *(["-n", netns] if netns else []), *args]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise QosError(f"{' '.join(cmd)}: {err.decode(errors='replace').strip()}")
    return out.decode()


class HtbQos:
    """HTB classes for users on one interface in one namespace."""

    def __init__(
        self, netns: str | None, ifname: str, link_rate: int = DEFAULT_LINK_RATE
    ) -> None:
        self.netns = netns
        self.ifname = ifname
        self.link_rate = link_rate
        self._classes: dict[str, QosClass] = {}

    @property
    def classes(self) -> dict[str, QosClass]:
        return dict(self._classes)

    async def _root_present(self) -> bool:
        out = await tc(self.netns, "-j", "qdisc", "show", "dev", self.ifname)
        for q in json.loads(out or "[]"):
            if q.get("root") and q.get("kind") == "htb" and q.get("handle") == ROOT_HANDLE:
                return True
        return False

    async def ensure_root(self) -> None:
        if await self._root_present():
            return
        await tc(
            self.netns, "qdisc", "replace", "dev", self.ifname, "root", "handle", ROOT_HANDLE,
            "htb", "default", "0",
        )
        await tc(
            self.netns, "class", "replace", "dev", self.ifname, "parent", ROOT_HANDLE,
            "classid", PARENT_CLASS, "htb", "rate", f"{self.link_rate}bit",
            "ceil", f"{self.link_rate}bit",
        )

    async def kernel_minors(self) -> set[int]:
        """Class minors present on the interface (below the parent class)."""
        out = await tc(self.netns, "-j", "class", "show", "dev", self.ifname, check=False)
        minors: set[int] = set()
        try:
            entries = json.loads(out or "[]")
        except json.JSONDecodeError:
            return minors
        for c in entries:
            handle = str(c.get("handle", ""))
            if handle.startswith("1:"):
                minor = int(handle[2:] or "0", 16)
                if minor >= MIN_MINOR:
                    minors.add(minor)
        return minors

    async def set_class(self, key: str, qos: Qos) -> int:
        """The HTB class of ``key`` with ``qos`` (its old filters gone, the class kept if it
        exists); returns its minor, for the caller's filters."""
        await self.ensure_root()
        existing = self._classes.get(key)
        if existing is not None:
            minor = existing.minor
            await self._del_filter(minor)
        else:
            used = await self.kernel_minors() | {c.minor for c in self._classes.values()}
            minor = next((m for m in range(MIN_MINOR, MAX_MINOR) if m not in used), 0)
            if not minor:
                raise QosError("no free HTB class id")
        await tc(
            self.netns, "class", "replace", "dev", self.ifname, "parent", PARENT_CLASS,
            "classid", f"1:{minor:x}", "htb", "rate", f"{qos.rate}bit",
            "ceil", f"{qos.effective_ceil}bit", "prio", str(qos.priority),
        )
        return minor

    async def apply(
        self,
        key: str,
        qos: Qos,
        src: Sequence[ipaddress.IPv4Network] = (),
        dst: Sequence[ipaddress.IPv4Network] = (),
    ) -> QosClass:
        """Create or change the class for ``key``; traffic matching any (src, dst) combination
        (0.0.0.0/0 entries or an empty list match everything on that side) is classified into it.
        """
        srcs = [n for n in src if n.prefixlen] or [None]
        dsts = [n for n in dst if n.prefixlen] or [None]
        matches: list[list[str]] = []
        for s in srcs:
            for d in dsts:
                match: list[str] = []
                if s is not None:
                    match += ["match", "ip", "src", str(s)]
                if d is not None:
                    match += ["match", "ip", "dst", str(d)]
                matches.append(match or ["match", "u32", "0", "0"])
        return await self.classify(key, qos, matches)

    async def classify(self, key: str, qos: Qos, matches: Sequence[Sequence[str]], **log_fields: Any) -> QosClass:
        """Create or change the class for ``key``, with one u32 filter per entry of ``matches``
        (each the u32 selector words, e.g. ``["match", "ip", "src", "198.18.1.1/32"]``)."""
        minor = await self.set_class(key, qos)
        classid = f"1:{minor:x}"
        for match in matches:
            await tc(
                self.netns, "filter", "add", "dev", self.ifname, "parent", ROOT_HANDLE,
                "protocol", "ip", "pref", str(minor), "u32", *match, "flowid", classid,
            )
        qc = QosClass(key, minor, qos)
        self._classes[key] = qc
        log.info("qos.applied", path=key, rate=qos.rate, ceil=qos.effective_ceil, prio=qos.priority,
                 dev=self.ifname, classid=classid, **log_fields)
        return qc

    async def _del_filter(self, minor: int) -> None:
        await tc(
            self.netns, "filter", "del", "dev", self.ifname, "parent", ROOT_HANDLE,
            "protocol", "ip", "pref", str(minor), check=False,
        )

    async def remove(self, key: str) -> None:
        qc = self._classes.pop(key, None)
        if qc is None:
            return
        await self._del_filter(qc.minor)
        await tc(
            self.netns, "class", "del", "dev", self.ifname, "classid", f"1:{qc.minor:x}",
            check=False,
        )
        if not self._classes and not await self.kernel_minors():
            # last user class gone: leave the interface as we found it
            await tc(self.netns, "qdisc", "del", "dev", self.ifname, "root", check=False)

    async def flush(self) -> None:
        """Remove the root qdisc (and with it every class and filter) from the interface."""
        self._classes.clear()
        await tc(self.netns, "qdisc", "del", "dev", self.ifname, "root", check=False)
