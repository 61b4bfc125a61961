"""What every part of the Diameter engine shares: this node's identity and settings, the
end-to-end identifiers, the counters, the background tasks, and sending or receiving one
message (counted and logged), with the base and error answers built from this identity.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from daemons.runtime.log import EventLog
from daemons.wire.diameter.avp import Avp
from daemons.wire.diameter.constants import ResultCode
from daemons.wire.diameter.message import Identifiers, Message

from .connection import Connection
from .errors import DiameterError

log = EventLog("daemons.diameter")

CMD_CER = 257
CMD_DWR = 280
CMD_DPR = 282
BASE_COMMANDS = frozenset({CMD_CER, CMD_DWR, CMD_DPR})


def hex_id(v: int) -> str:
    """A hop-by-hop or end-to-end identifier as logs print it."""
    return f"0x{v:08x}"


def dest_text(msg: Message) -> str:
    """A request's destination as logs and error messages name it."""
    return str(msg.get("Destination-Host") or msg.get("Destination-Realm") or "-")


@dataclass
class Settings:
    """Timers (seconds) and limits of a node. Read when used: a change applies from then on."""

    watchdog_interval: float = 30.0  # Tw (RFC 3539); a peer may have its own
    reconnect_min: float = 1.0  # back-off of a dialled peer, doubling up to reconnect_max
    reconnect_max: float = 30.0
    connect_timeout: float = 5.0  # TCP connect of a dialled peer
    cea_timeout: float = 5.0  # CER sent, no CEA: close and re-dial
    cer_timeout: float = 5.0  # connection accepted, no CER: close
    dpa_timeout: float = 2.0  # DPR sent, no DPA: close anyway
    relay_timeout: float = 30.0  # relayed request without answer: 3002 back
    # Who may connect (RFC 6733 §5.3): a CER from a host that is not a configured peer, or from a
    # source address that is not that peer's, is answered 3010. True only for tests and tools:
    # unknown hosts then become ``dynamic`` peers, forgotten dynamic_peer_ttl after they leave.
    accept_unknown_peers: bool = False
    dynamic_peer_ttl: float = 300.0
    peer_probe_timeout: float = 2.0  # CER for a peer already open: its live connection must answer a DWR by then
    # Duplicate detection (RFC 6733 §3, §6.1): answers by (peer, end-to-end id, Session-Id).
    answer_cache_size: int = 1024
    answer_cache_ttl: float = 240.0  # end-to-end ids are unique for at least 4 minutes (RFC 6733 §3)
    # Limits
    max_frame_before_cer: int = 4096  # bytes of a message before the capabilities exchange is done
    max_frame: int = 65536  # bytes of a message from an open peer
    max_connections_per_source: int = 8  # transport connections from one source address
    max_pending_per_peer: int = 256  # requests from one peer being served or relayed at once (3004 beyond)


class LocalNode:
    """This node: identity, settings, identifiers, counters, tasks, and one-message I/O."""

    def __init__(
        self,
        origin_host: str,
        origin_realm: str,
        host_ip_addresses: Iterable[str],
        applications: Iterable[int],
        product_name: str,
        vendor_id: int,
        origin_state_id: int,
        settings: Settings,
    ) -> None:
        self.origin_host = origin_host
        self.origin_realm = origin_realm
        self.host_ip_addresses = [ipaddress.ip_address(a) for a in host_ip_addresses]
        self.applications: set[int] = set(applications)
        self.product_name = product_name
        self.vendor_id = vendor_id
        self.origin_state_id = origin_state_id
        self.settings = settings
        self.local_realms: set[str] = {origin_realm.lower()}
        self.counters: Counter[str] = Counter()
        self.result_codes_sent: Counter[int] = Counter()
        self.result_codes_received: Counter[int] = Counter()
        self.ids = Identifiers()  # end-to-end ids: unique per node
        self.tasks: set[asyncio.Task[Any]] = set()
        self.running = False
        self.stopping = False

    def next_end_to_end(self) -> int:
        return self.ids.next_end_to_end()

    # -- background tasks ------------------------------------------------------------------

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def cancel_tasks(self) -> None:
        """Cancel every background task (but the calling one) and wait for them."""
        tasks = [t for t in self.tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one message -----------------------------------------------------------------------

    def send(self, conn: Connection, msg: Message) -> bool:
        """Queue ``msg`` on ``conn``, count and log it; False if the connection is closing."""
        ok = conn.send(msg)
        if ok:
            self.counters["sent"] += 1
            if not msg.is_request:
                rc = msg.result_code
                if rc is not None:
                    self.result_codes_sent[int(rc)] += 1
        self.log_msg("tx" if ok else "tx.dropped", conn, msg)
        return ok

    def received(self, conn: Connection, msg: Message) -> None:
        """Count and log a decoded message that ``conn`` brought."""
        if msg.is_request:
            self.counters["requests_received"] += 1
        else:
            self.counters["answers_received"] += 1
            if msg.result_code is not None:
                self.result_codes_received[int(msg.result_code)] += 1
        self.log_msg("rx", conn, msg)

    def log_msg(self, what: str, conn: Connection, msg: Message, **extra: Any) -> None:
        level_debug = msg.command_code == CMD_DWR
        fields = {
            "peer": conn.peer.host if conn.peer else conn.remote_text,
            "cmd": msg.name,
            "hbh": hex_id(msg.hop_by_hop),
            "e2e": hex_id(msg.end_to_end),
            "sid": msg.session_id,
            "rc": None if msg.is_request else msg.result_code and int(msg.result_code),
            "flags": "T" if msg.retransmit else None,
            **extra,
        }
        if level_debug:
            log.debug(f"msg.{what}", **fields)
        else:
            log.info(f"msg.{what}", **fields)

    # -- messages from this identity -------------------------------------------------------

    def fill_origin(self, msg: Message) -> None:
        """Add Origin-Host/Origin-Realm to a request when missing (after Session-Id)."""
        at = 1 if msg.avps and msg.avps[0].name == "Session-Id" else 0
        if msg.find("Origin-Realm") is None:
            msg.avps.insert(at, Avp.new("Origin-Realm", self.origin_realm))
        if msg.find("Origin-Host") is None:
            msg.avps.insert(at, Avp.new("Origin-Host", self.origin_host))

    def fill_answer_origin(self, ans: Message) -> None:
        """Add Origin-Host/Origin-Realm to an answer when missing (after Result-Code)."""
        names = [a.name for a in ans.avps]
        at = names.index("Result-Code") + 1 if "Result-Code" in names else (1 if names[:1] == ["Session-Id"] else 0)
        if ans.find("Origin-Realm") is None:
            ans.avps.insert(at, Avp.new("Origin-Realm", self.origin_realm))
        if ans.find("Origin-Host") is None:
            ans.avps.insert(at, Avp.new("Origin-Host", self.origin_host))

    def base_answer(self, req: Message, extra: list[Any] | None = None,
                    rc: int = ResultCode.DIAMETER_SUCCESS) -> Message:
        return req.answer(rc, [("Origin-Host", self.origin_host), ("Origin-Realm", self.origin_realm), *(extra or [])])

    def error_answer(self, req: Message, e: DiameterError) -> Message:
        avps: list[Any] = [("Origin-Host", self.origin_host), ("Origin-Realm", self.origin_realm)]
        if e.error_message:
            avps.append(("Error-Message", e.error_message))
        if e.failed_avp:
            avps.append(("Failed-AVP", e.failed_avp))
        return req.answer(e.result_code, avps)


__all__ = ["BASE_COMMANDS", "CMD_CER", "CMD_DPR", "CMD_DWR", "LocalNode", "Settings", "dest_text", "hex_id", "log"]
