"""The registrations an AAA server caches (claims 7, 16-18): one :class:`Session` per user,
kept by a :class:`SessionStore` that persists every change, one record per session.

The home AAA server (``daemons.aaa.aaah``) caches what it built and distributed; the local one
(``daemons.aaa.aaaf``) caches what it relayed, to answer an intra-domain move itself. A
session's paths are kept as the AAAH describes them (FA-side paths in the FA's view, the rest
in the HA's); :meth:`Session.for_fa` / :meth:`Session.for_ha` give each receiver its copy and
:meth:`Session.with_fa` moves the FA end. Sessions are persisted with their VPN-Info AVPs as
hex (``daemons.vpn.vpninfo.to_record``, as ``daemons.vpn.mavpn`` does), the AAAF's local-answer
keys as hex too: key material, so the store (``sessions.db``, ``daemons.store.records``) lives in
the daemon's 0700 state directory and is 0600 itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from daemons.runtime.log import EventLog
from daemons.runtime.secret import Secret
from daemons.store.records import RecordStore
from daemons.store.state import Build
from daemons.vpn import vpninfo
from daemons.vpn.path import EndpointType
from daemons.vpn.vpninfo import VpnInfo

log = EventLog("mipvpn.sessions")


def path_text(info: VpnInfo) -> str:
    """One path for logs and ``show``: id, endpoints and their types, never keys."""
    p = info.path
    return f"{info.path_id}:{p.local.address}({p.local.type.value})<->{p.remote.address}({p.remote.type.value})"


@dataclass(frozen=True)
class Session:
    """One user's registration as an AAA server caches it."""

    nai: str
    session_id: str
    fa: IPv4Address  # the FA's care-of address: the FA end of the paths
    fa_host: str  # the FA's Diameter identity ("" if unknown)
    home_agent: IPv4Address
    home_address: IPv4Address
    paths: tuple[VpnInfo, ...]  # FA-side paths in the FA's view, the others in the HA's
    created: float = 0.0
    # The AAAF's local-answer keys (claim 17, daemons.wire.mip.localanswer): the one the MN proves
    # in its next move, and the one its last locally answered move was proven with (a
    # retransmission of that move still carries it). Never shown, never logged.
    local_key: Secret | None = None
    previous_local_key: Secret | None = None

    def for_fa(self) -> list[VpnInfo]:
        """The paths the FA installs (its own view)."""
        return [i for i in self.paths if i.path.local.type is EndpointType.FA]

    def for_ha(self) -> list[VpnInfo]:
        """What the HAR carries: the paths the HA installs (its own view: the FA's mirrored,
        plus its own) and, for route optimisation (F4), each FA⇄dynamic CN-GW path in the
        CN-GW's view (Local = the CN-GW), which the HA passes on in a Binding Update."""
        out = []
        for info in self.paths:
            if info.path.local.type is EndpointType.FA and info.path.remote.type in (EndpointType.HA,
                                                                                      EndpointType.CNGW_DYNAMIC):
                out.append(info.mirrored())
            elif info.path.local.type is EndpointType.HA:
                out.append(info)
        return out

    def with_fa(self, coa: IPv4Address | str, session_id: str | None = None, fa_host: str | None = None) -> Session:
        """The same paths with the FA end moved to ``coa`` (an MN changed FA: claims 7, 17, 18)."""
        coa = IPv4Address(coa)
        return replace(self, fa=coa, paths=tuple(vpninfo.moved_to(self.paths, coa)),
                       session_id=session_id or self.session_id,
                       fa_host=self.fa_host if fa_host is None else fa_host)

    def with_local_keys(self, key: Secret | None, previous: Secret | None) -> Session:
        """The same session holding other local-answer keys."""
        return replace(self, local_key=key, previous_local_key=previous)

    def summary(self) -> dict[str, Any]:
        """What ``show sessions`` lists: identities, endpoints and selectors, never keys."""
        return {"mn": self.nai, "session": self.session_id, "fa": str(self.fa), "fa_host": self.fa_host,
                "home_agent": str(self.home_agent), "home_address": str(self.home_address),
                "paths": " ".join(path_text(i) for i in self.paths),
                "age": int(time.time() - self.created) if self.created else None}

    def spis(self) -> list[tuple[str, int]]:
        """(receiving gateway, SPI) of every manually keyed SA of this session."""
        out = []
        for info in self.paths:
            sec = info.path.security
            if sec.inbound is not None and sec.outbound is not None:
                out += [(str(info.path.local.address), sec.inbound.spi),
                        (str(info.path.remote.address), sec.outbound.spi)]
        return out

    # ---- persistence (VPN-Info AVPs as hex: the file holds keys, keep it private) ----------
    def to_json(self) -> dict[str, Any]:
        out = {"nai": self.nai, "session_id": self.session_id, "fa": str(self.fa), "fa_host": self.fa_host,
               "home_agent": str(self.home_agent), "home_address": str(self.home_address),
               "created": self.created, "paths": vpninfo.to_record(self.paths)}
        for name, key in (("local_key", self.local_key), ("previous_local_key", self.previous_local_key)):
            if key is not None:
                out[name] = key.reveal().hex()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Session:
        """TypeError/KeyError/ValueError (VpnInfoError) for a record that is not a session."""
        nai, session_id, fa_host = data["nai"], data["session_id"], data.get("fa_host", "")
        if not all(isinstance(v, str) for v in (nai, session_id, fa_host)):
            raise TypeError("nai, session_id and fa_host must be strings")
        keys = [data.get(name) for name in ("local_key", "previous_local_key")]
        if not all(k is None or isinstance(k, str) for k in keys):
            raise TypeError("local_key and previous_local_key must be hex strings")
        local_key, previous_local_key = (None if k is None else Secret.from_hex(k) for k in keys)
        return cls(nai, session_id, IPv4Address(data["fa"]), fa_host,
                   IPv4Address(data["home_agent"]), IPv4Address(data["home_address"]),
                   tuple(vpninfo.from_record(data["paths"], nai)), float(data.get("created", 0.0)),
                   local_key, previous_local_key)


class SessionStore:
    """Sessions by NAI, each change persisted (one record per session, in ``<state_dir>/<name>.db``,
    which takes over ``<name>.json``), with the small records of the owner (e.g. the AAAH's SPI
    counters) in sections of their own."""

    SECTION = "sessions"

    def __init__(self, state_dir: Path, name: str = "sessions") -> None:
        self.state = RecordStore.in_dir(state_dir, name)
        self.path = self.state.path
        self.sessions: dict[str, Session] = {}

    def load(self, extra: Mapping[str, Build] | None = None) -> dict[str, dict[str, Any]]:
        """The sessions from the store, record by record: one that cannot be read (a changed
        schema, a corrupt entry) is dropped, logged and deleted (``daemons.store.records``).
        Returns the owner's ``extra`` sections, built the same way."""
        builders: dict[str, Build] = {**(extra or {}), self.SECTION: lambda _, item: Session.from_json(item)}
        loaded = self.state.load_records(builders, keys={self.SECTION: lambda s: s.nai})
        self.sessions = {s.nai: s for s in loaded.pop(self.SECTION).values()}
        return loaded

    def put_extra(self, section: str, key: str, record: Any) -> None:
        """One record of the owner's (see :meth:`load`)."""
        self.state.put(section, key, record)

    def get(self, nai: str) -> Session | None:
        return self.sessions.get(nai)

    def put(self, session: Session) -> Session | None:
        """Cache (and persist) ``session``; returns the one it replaces."""
        old = self.sessions.get(session.nai)
        self.sessions[session.nai] = session
        self.state.put(self.SECTION, session.nai, session.to_json())
        return old

    def drop(self, nai: str) -> Session | None:
        old = self.sessions.pop(nai, None)
        if old is not None:
            self.state.delete(self.SECTION, nai)
        return old

    def show(self) -> list[dict[str, Any]]:
        return [s.summary() for s in sorted(self.sessions.values(), key=lambda s: s.nai)]


__all__ = ["Session", "SessionStore", "path_text"]
