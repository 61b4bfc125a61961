"""VPN-only access at an FA: nothing that arrives on the access segment is forwarded in clear.

Both backends start from the same policy-routing guard (:class:`AccessGuard`): a rule
``iif ACCESS lookup 224`` (pref :attr:`AccessGuard.PREF`) into a table that holds only
``blackhole default``.  Whatever arrives on the access segment and no earlier rule claims is
dropped instead of leaving toward the core: a host that never registered, an MN whose
registration is still in flight (it uses the FA as its router as soon as it sends its request),
an MN whose path is not up.  Traffic to the FA itself is unaffected (the ``local`` table is
looked up first).  What claims a visitor's traffic before the blackhole is the backend's own:

* strongswan (kernel-libipsec, route-based): the per-user source rules into ``ipsec0``
  (pref 900..964, daemons/vpn/strongswan/routes.py), there exactly while the user's path is.
* xfrm (policy-based): :meth:`AccessGuard.admit` puts ``from HOA iif ACCESS lookup main``
  (pref :attr:`AccessGuard.ADMIT_PREF`) when the FA takes the visitor in, and the backend's
  BLOCK policy for the home address makes sure that what is then routed leaves in ESP or not
  at all (daemons/vpn/xfrm/backend.py, ``guard_policies``).

Changes go through rtnetlink (pyroute2), one socket per guard, opened on first use.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import Any

from daemons.runtime.rtnl import Rtnl
from daemons.vpn.path import PathError

MAIN_TABLE = 254


class AccessGuard:
    """The access segment's blackhole and the per-visitor exceptions a policy-based backend
    needs (see the module doc).  ``netns`` None: this namespace."""

    TABLE = 224
    PREF = 990
    ADMIT_PREF = 980  # after the strongswan steering rules (900..964), before the blackhole

    def __init__(self, interface: str, netns: str | None = None) -> None:
        self.interface = interface
        self.netns = netns
        self.rtnl = Rtnl(netns, error=PathError)

    async def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return await self.rtnl.call(f"access guard: {what}", method, *args, **kwargs)

    async def _rules(self) -> list[Any]:
        return await self._call("rules", "rule", "dump", family=socket.AF_INET)

    async def install(self) -> None:
        """The blackhole for the access segment.  Idempotent."""
        await self._call(f"blackhole default table {self.TABLE}", "route", "replace", dst="0.0.0.0/0",
                         type="blackhole", table=self.TABLE)
        if not any(r.get("priority") == self.PREF for r in await self._rules()):
            await self._call(f"rule iif {self.interface} lookup {self.TABLE}", "rule", "add", priority=self.PREF,
                             iifname=self.interface, table=self.TABLE, family=socket.AF_INET)

    async def admitted(self) -> set[str]:
        """The home addresses :meth:`admit` let through (our pref, iif and table)."""
        return {r.get("src") for r in await self._rules()
                if r.get("priority") == self.ADMIT_PREF and r.get("iifname") == self.interface
                and r.get("table") == MAIN_TABLE and r["src_len"] == 32 and r.get("src")}

    async def admit(self, home_address: str) -> None:
        """Route what ``home_address`` sends from the access segment by the main table (before
        the blackhole).  Idempotent (an existing rule is left: no dump per registration)."""
        hoa = str(ipaddress.IPv4Address(home_address))
        try:
            await self._call(f"rule from {hoa} iif {self.interface} lookup main", "rule", "add",
                             priority=self.ADMIT_PREF, src=hoa, src_len=32, iifname=self.interface,
                             table=MAIN_TABLE, family=socket.AF_INET)
        except PathError as exc:
            if os.strerror(errno.EEXIST) not in str(exc):
                raise

    async def refuse(self, home_address: str) -> None:
        """Undo :meth:`admit`; nothing to undo is not an error."""
        hoa = str(ipaddress.IPv4Address(home_address))
        try:
            await self._call(f"rule from {hoa} iif {self.interface} lookup main", "rule", "del",
                             priority=self.ADMIT_PREF, src=hoa, src_len=32, iifname=self.interface,
                             table=MAIN_TABLE, family=socket.AF_INET)
        except PathError as exc:
            if os.strerror(errno.ENOENT) not in str(exc) and os.strerror(errno.ESRCH) not in str(exc):
                raise

    def close(self) -> None:
        self.rtnl.close()
