"""Who may talk to a Diameter node, and what it costs them (RFC 6733 §5.3, §5.6, §3, §6.1).

Real nodes on loopback TCP, attackers speaking raw Diameter bytes through the codec
(``RawPeer``): an unknown host, a configured host from another source address (127.0.0.2), a
configured host claiming a live peer's name, a peer forging another's Origin-Host or reusing
another peer's end-to-end id, oversized frames, connection and request floods. Each attack is
refused with its RFC code (or the connection closed), counted, and changes nothing for the
real peers. Timings are only bounds, never assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

from daemons.diameter.node import DiameterNode
from daemons.diameter.peer import Peer
from daemons.wire.diameter import Message, ResultCode
from tests.unit.test_diameter_node import (
    HOME,
    LO,
    VISIT,
    RawPeer,
    allow,
    amr,
    client,
    eventually,
    fake_server,
    node,
    run,
)

OTHER = "127.0.0.2"  # another source address on the loopback interface
AAAH, FA1, FA2, AGENT = "aaah.home.example", "fa1.visit-a.example", "fa2.visit-a.example", "aaaf.visit-a.example"


async def raw_from(source: str, port: int, to: str = LO) -> RawPeer:
    """A raw peer whose connection (to ``to``:``port``) comes from ``source``."""
    return RawPeer(*await asyncio.open_connection(to, port, local_addr=(source, 0)))


async def closed_soon(raw: RawPeer, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
    """True when the node closed the connection (EOF, or a reset) within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while await raw.reader.read(65536):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


class Counting:
    """An AMR handler that counts its runs and says which run answered (Class = run number),
    optionally holding every answer until ``release`` is set."""

    def __init__(self, hold: bool = False) -> None:
        self.runs: list[tuple[Message, Peer]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, req: Message, peer: Peer) -> Message:
        self.runs.append((req, peer))
        run_no = len(self.runs)
        await self.release.wait()
        return req.answer(ResultCode.DIAMETER_SUCCESS, [("Auth-Application-Id", 2), ("Class", str(run_no).encode())])


@contextlib.asynccontextmanager
async def server(**kw: Any) -> AsyncIterator[tuple[DiameterNode, Counting]]:
    hold = kw.pop("hold", False)
    n = node(AAAH, HOME, **kw)
    h = Counting(hold)
    n.register_handler(2, 260, h)
    async with n:
        yield n, h


def raw_amr(raw: RawPeer, origin: str = FA1, realm: str = VISIT, sid: str = "fa1.visit-a.example;1;1") -> Message:
    return raw.request("AMR", [("Session-Id", sid), ("Auth-Application-Id", 2), ("Origin-Host", origin),
                               ("Origin-Realm", realm), ("Destination-Realm", HOME), ("User-Name", "mn1@home.example"),
                               ("MIP-Reg-Request", b"r")], proxiable=True)


def same_request(msg: Message, *, hop_by_hop: int, retransmit: bool) -> Message:
    """The same request again (same end-to-end id, Session-Id, Origin-Host) on a new hop."""
    again = Message.decode(msg.encode())
    again.hop_by_hop = hop_by_hop
    again.retransmit = retransmit
    return again


# ---- only configured peers (RFC 6733 §5.3) ---------------------------------------------------------


def test_unknown_peer_is_answered_3010_and_closed() -> None:
    async def main() -> None:
        async with server() as (srv, h):
            allow(srv, FA1, VISIT)  # someone is configured, just not them
            raw = await RawPeer.connect(srv.port)
            cea = await raw.cer("intruder.evil.example", "evil.example")
            assert cea.result_code == ResultCode.DIAMETER_UNKNOWN_PEER and cea.error
            assert cea.get("Origin-Host") == AAAH
            assert await closed_soon(raw)
            # a configured name with another realm is no better
            raw = await RawPeer.connect(srv.port)
            assert (await raw.cer(FA1, "evil.example")).result_code == ResultCode.DIAMETER_UNKNOWN_PEER
            assert await closed_soon(raw)
            assert srv.counters["cer_unknown_peer"] == 2 and "intruder.evil.example" not in srv.peers
            assert not srv.peers[FA1.lower()].is_open and h.runs == []

    run(main())


def test_cer_spoofing_a_configured_peer_from_another_address_is_refused_and_the_live_one_stays() -> None:
    async def main() -> None:
        async with server() as (srv, h):
            c = client(FA1, VISIT, (srv, AAAH, HOME))  # configured on srv from 127.0.0.1
            async with c:
                await c.wait_open(AAAH)
                live = srv.peers[FA1].conn
                spoof = await raw_from(OTHER, srv.port)
                cea = await spoof.cer(FA1, VISIT)
                assert cea.result_code == ResultCode.DIAMETER_UNKNOWN_PEER  # the same answer as for a stranger
                assert await closed_soon(spoof)
                assert srv.counters["cer_address_refused"] == 1
                assert srv.peers[FA1].conn is live and not live.is_closed
                assert (await c.request(amr(c), timeout=5)).result_code == 2001
                assert [p.host for _, p in h.runs] == [FA1]

    run(main())


def test_cer_for_a_live_peer_from_its_own_address_does_not_cut_it() -> None:
    """RFC 6733 §5.6: R-Conn-CER in R-Open/I-Open is R-Reject. The live connection answers the
    DWR the node probes it with, so the newcomer is refused (5012) and the live one kept."""
    async def main() -> None:
        async with server(peer_probe_timeout=0.5) as (srv, _):
            c = client(FA1, VISIT, (srv, AAAH, HOME))
            async with c:
                await c.wait_open(AAAH)
                live = srv.peers[FA1].conn
                spoof = await RawPeer.connect(srv.port)
                cea = await spoof.cer(FA1, VISIT)
                assert cea.result_code == ResultCode.DIAMETER_UNABLE_TO_COMPLY
                assert await closed_soon(spoof)
                assert srv.counters["cer_already_connected"] == 1
                assert srv.peers[FA1].conn is live and not live.is_closed and c.peers[AAAH].is_open
                assert (await c.request(amr(c), timeout=5)).result_code == 2001

    run(main())


def test_a_peer_that_restarted_replaces_its_silent_connection() -> None:
    """The old connection does not answer the probe (the peer restarted before our watchdog
    noticed): the new one takes over."""
    async def main() -> None:
        async with server(peer_probe_timeout=0.3) as (srv, _):
            allow(srv, FA1, VISIT)
            old = await RawPeer.connect(srv.port)
            assert (await old.cer(FA1, VISIT)).result_code == 2001  # and never answers anything again
            new = await RawPeer.connect(srv.port)
            assert (await new.cer(FA1, VISIT)).result_code == 2001
            assert await closed_soon(old)
            assert srv.peers[FA1].conn is not None and srv.peers[FA1].is_open
            assert srv.counters["cer_already_connected"] == 0

    run(main())


def test_cea_from_another_identity_is_not_opened() -> None:
    async def main() -> None:
        fake, _ = await fake_server("silent", "impostor.home.example")
        async with fake:
            c = client(FA1, VISIT, (fake.sockets[0].getsockname()[1], AAAH, HOME))
            async with c:
                await eventually(lambda: c.counters["cea_identity_mismatch"] >= 1)
                assert not c.peers[AAAH].is_open
                assert "impostor.home.example" not in c.peers

    run(main())


# ---- requests are the peer's own ---------------------------------------------------------------------


def test_request_with_another_origin_host_from_a_non_agent_is_answered_5004() -> None:
    async def main() -> None:
        async with server() as (srv, h):
            allow(srv, FA1, VISIT)
            raw = await RawPeer.connect(srv.port)
            assert (await raw.cer(FA1, VISIT)).result_code == 2001
            for origin, realm, avp in ((FA2, VISIT, "Origin-Host"), (FA1, HOME, "Origin-Realm")):
                raw.send(raw_amr(raw, origin, realm))
                ans = await raw.recv_not(280)
                assert ans.result_code == ResultCode.DIAMETER_INVALID_AVP_VALUE
                assert [a.name for a in ans.find("Failed-AVP").value] == [avp]
            assert h.runs == [] and srv.counters["origin_mismatch"] == 2

    run(main())


# ---- duplicates (RFC 6733 §3, §6.1) -------------------------------------------------------------------


def test_duplicates_with_and_without_t_flag_are_answered_from_the_cache() -> None:
    async def main() -> None:
        async with server() as (srv, h):
            allow(srv, FA1, VISIT)
            raw = await RawPeer.connect(srv.port)
            assert (await raw.cer(FA1, VISIT)).result_code == 2001
            first = raw_amr(raw)
            raw.send(first)
            a1 = await raw.recv_not(280)
            answers = []
            for hbh, t_flag in ((0x7001, False), (0x7002, True)):
                raw.send(same_request(first, hop_by_hop=hbh, retransmit=t_flag))
                ans = await raw.recv_not(280)
                assert ans.hop_by_hop == hbh and ans.end_to_end == first.end_to_end
                answers.append(ans)
            assert len(h.runs) == 1
            assert [a.get("Class") for a in (a1, *answers)] == [b"1", b"1", b"1"]
            assert srv.counters["duplicates"] == 2
            # a new end-to-end id (or another session) is a new request
            raw.send(raw_amr(raw))
            assert (await raw.recv_not(280)).get("Class") == b"2"

    run(main())


def test_a_duplicate_of_a_request_still_being_served_waits_for_its_answer() -> None:
    async def main() -> None:
        async with server(hold=True) as (srv, h):
            allow(srv, FA1, VISIT)
            raw = await RawPeer.connect(srv.port)
            assert (await raw.cer(FA1, VISIT)).result_code == 2001
            first = raw_amr(raw)
            raw.send(first)
            await eventually(lambda: len(h.runs) == 1)
            raw.send(same_request(first, hop_by_hop=0x7001, retransmit=False))
            await asyncio.sleep(0.1)
            h.release.set()
            got = sorted([await raw.recv_not(280), await raw.recv_not(280)], key=lambda m: m.hop_by_hop)
            assert [m.hop_by_hop for m in got] == sorted([first.hop_by_hop, 0x7001])
            assert [m.get("Class") for m in got] == [b"1", b"1"] and len(h.runs) == 1

    run(main())


def test_another_peer_with_the_same_ids_does_not_get_the_cached_answer() -> None:
    async def main() -> None:
        async with server() as (srv, h):
            allow(srv, FA1, VISIT)
            allow(srv, FA2, VISIT)
            allow(srv, AGENT, VISIT, agent=True)  # an agent may forward requests with others' Origin-Host
            victim = await RawPeer.connect(srv.port)
            assert (await victim.cer(FA1, VISIT)).result_code == 2001
            first = raw_amr(victim)
            victim.send(first)
            assert (await victim.recv_not(280)).get("Class") == b"1"
            # a plain peer replaying the victim's ids (and naming the victim as origin): refused
            thief = await RawPeer.connect(srv.port)
            assert (await thief.cer(FA2, VISIT)).result_code == 2001
            thief.send(same_request(first, hop_by_hop=0x7001, retransmit=True))
            ans = await thief.recv_not(280)
            assert ans.result_code == ResultCode.DIAMETER_INVALID_AVP_VALUE and ans.get("Class") is None
            # an agent sending the same ids: a request of its own, served afresh, not the victim's answer
            agent = await RawPeer.connect(srv.port)
            assert (await agent.cer(AGENT, VISIT)).result_code == 2001
            agent.send(same_request(first, hop_by_hop=0x7002, retransmit=True))
            assert (await agent.recv_not(280)).get("Class") == b"2"
            assert [p.host for _, p in h.runs] == [FA1, AGENT]

    run(main())


def test_answer_cache_is_bounded_in_size_and_age() -> None:
    async def main() -> None:
        async with server(answer_cache_size=2, answer_cache_ttl=0.3) as (srv, _):
            allow(srv, FA1, VISIT)
            raw = await RawPeer.connect(srv.port)
            assert (await raw.cer(FA1, VISIT)).result_code == 2001
            reqs = [raw_amr(raw) for _ in range(3)]
            for r in reqs:
                raw.send(r)
                await raw.recv_not(280)
            raw.send(same_request(reqs[0], hop_by_hop=0x7001, retransmit=True))  # pushed out by the third
            assert (await raw.recv_not(280)).get("Class") == b"4"
            await asyncio.sleep(0.4)
            raw.send(same_request(reqs[2], hop_by_hop=0x7002, retransmit=True))  # too old
            assert (await raw.recv_not(280)).get("Class") == b"5"

    run(main())


# ---- limits -------------------------------------------------------------------------------------------


def test_oversized_frame_before_cer_closes_the_connection_and_is_counted() -> None:
    async def main() -> None:
        async with server(max_frame=8192) as (srv, h):
            allow(srv, FA1, VISIT)
            raw = await RawPeer.connect(srv.port)
            # a CER header announcing 1 MiB: nothing more is read, nothing is waited for
            raw.send(struct.pack(">B3sBBBBII", 1, (1 << 20).to_bytes(3, "big"), 0x80, 0, 1, 1, 1, 1) + bytes(200))
            assert await closed_soon(raw)
            # a real CER, padded past 4096 bytes
            raw = await RawPeer.connect(srv.port)
            cer = raw.request("CER", [("Origin-Host", FA1), ("Origin-Realm", VISIT), ("Host-IP-Address", LO),
                                      ("Vendor-Id", 0), ("Product-Name", "x" * 5000), ("Auth-Application-Id", 2)])
            raw.send(cer)
            assert await closed_soon(raw)
            assert srv.counters["oversized_frames"] == 2 and not srv.peers[FA1].is_open
            # after the capabilities exchange: max_frame
            raw = await RawPeer.connect(srv.port)
            assert (await raw.cer(FA1, VISIT)).result_code == 2001
            big = raw_amr(raw)
            big.add("Class", bytes(10000))
            raw.send(big)
            assert await closed_soon(raw)
            assert srv.counters["oversized_frames"] == 3 and h.runs == []

    run(main())


def test_too_many_connections_from_one_source_are_refused() -> None:
    async def main() -> None:
        async with server(max_connections_per_source=2) as (srv, _):
            allow(srv, FA1, VISIT)
            idle = [await RawPeer.connect(srv.port) for _ in range(2)]
            extra = await RawPeer.connect(srv.port)
            assert await closed_soon(extra)
            assert srv.counters["connections_refused"] == 1
            for raw in idle:  # the first two are still there
                assert not await closed_soon(raw, 0.2)
            other = await raw_from(OTHER, srv.port)  # another source has its own allowance
            assert not await closed_soon(other, 0.2)
            idle[0].close()
            await eventually(lambda: len(srv.connections) == 2)
            again = await RawPeer.connect(srv.port)
            assert (await again.cer(FA1, VISIT)).result_code == 2001

    run(main())


def test_requests_beyond_the_peers_limit_in_flight_are_answered_3004() -> None:
    async def main() -> None:
        async with server(hold=True, max_pending_per_peer=2) as (srv, h):
            allow(srv, FA1, VISIT)
            raw = await RawPeer.connect(srv.port)
            assert (await raw.cer(FA1, VISIT)).result_code == 2001
            reqs = [raw_amr(raw) for _ in range(3)]
            for r in reqs:
                raw.send(r)
            busy = await raw.recv_not(280)
            assert busy.result_code == ResultCode.DIAMETER_TOO_BUSY and busy.error
            assert busy.hop_by_hop == reqs[2].hop_by_hop and srv.counters["too_busy"] == 1
            h.release.set()
            done = [await raw.recv_not(280), await raw.recv_not(280)]
            assert {m.result_code for m in done} == {2001} and len(h.runs) == 2
            raw.send(raw_amr(raw))  # room again
            assert (await raw.recv_not(280)).result_code == 2001

    run(main())


async def raw_server(host: str) -> tuple[asyncio.Server, asyncio.Future[RawPeer]]:
    """A listener whose first connection answers CER as ``host`` and is then handed over raw."""
    got: asyncio.Future[RawPeer] = asyncio.get_running_loop().create_future()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = RawPeer(reader, writer)
        cer = await raw.recv()
        raw.send(cer.answer(2001, [("Origin-Host", host), ("Origin-Realm", HOME), ("Host-IP-Address", LO),
                                   ("Vendor-Id", 0), ("Product-Name", "raw"), ("Auth-Application-Id", 2)]))
        if not got.done():
            got.set_result(raw)

    return await asyncio.start_server(accept, LO, 0), got


def test_an_answer_counts_only_on_the_connection_its_request_went_out_on() -> None:
    """What the FA relies on for its AMAs: the engine matches an answer to the request pending on
    the connection it arrived on; the same ids from another peer are an unexpected answer."""
    async def main() -> None:
        (home, home_raw), (other, other_raw) = await raw_server(AAAH), await raw_server("other.home.example")
        async with home, other:
            c = client(FA1, VISIT, (home.sockets[0].getsockname()[1], AAAH, HOME),
                       (other.sockets[0].getsockname()[1], "other.home.example", HOME))
            async with c:
                await c.wait_open(AAAH)
                await c.wait_open("other.home.example")
                at_home, at_other = await home_raw, await other_raw
                pending = asyncio.ensure_future(c.request(amr(c, dest_host=AAAH), timeout=3))
                seen = await at_home.recv_not(280)
                # the right ids, on the wrong peer's connection
                at_other.send(seen.answer(2001, [("Origin-Host", AAAH), ("Origin-Realm", HOME)]))
                await eventually(lambda: c.counters["unexpected_answers"] == 1)
                assert not pending.done()
                at_home.send(seen.answer(2001, [("Origin-Host", AAAH), ("Origin-Realm", HOME), ("Class", b"real")]))
                assert (await pending).get("Class") == b"real"

    run(main())


def test_two_cers_for_a_live_peer_at_once_do_not_cut_it() -> None:
    """Two CERs naming a live peer, the second arriving with the live connection's answer to the
    first one's probe: the second probe must not make the first one miss that answer (and
    replace the live connection)."""
    async def main() -> None:
        async with server(peer_probe_timeout=1.0) as (srv, _):
            allow(srv, FA1, VISIT)
            live = await RawPeer.connect(srv.port)
            assert (await live.cer(FA1, VISIT)).result_code == 2001
            conn = srv.peers[FA1].conn
            first = await RawPeer.connect(srv.port)
            first.send(first.request("CER", [("Origin-Host", FA1), ("Origin-Realm", VISIT), ("Host-IP-Address", LO),
                                             ("Vendor-Id", 0), ("Product-Name", "raw"), ("Auth-Application-Id", 2)]))
            dwr = await live.recv()  # the probe
            assert dwr.name == "DWR"
            second = await RawPeer.connect(srv.port)
            # the live peer's DWA and the second CER reach the node together
            live.send(dwr.answer(2001, [("Origin-Host", FA1), ("Origin-Realm", VISIT)]))
            second.send(second.request("CER", [("Origin-Host", FA1), ("Origin-Realm", VISIT),
                                               ("Host-IP-Address", LO), ("Vendor-Id", 0), ("Product-Name", "raw"),
                                               ("Auth-Application-Id", 2)]))
            assert (await first.recv()).result_code == ResultCode.DIAMETER_UNABLE_TO_COMPLY

            async def answer_dwrs() -> None:  # the second probe may send a DWR of its own
                while True:
                    m = await live.recv(timeout=10)
                    if m.name == "DWR":
                        live.send(m.answer(2001, [("Origin-Host", FA1), ("Origin-Realm", VISIT)]))

            responder = asyncio.ensure_future(answer_dwrs())
            try:
                assert (await second.recv()).result_code == ResultCode.DIAMETER_UNABLE_TO_COMPLY
            finally:
                responder.cancel()
            assert srv.peers[FA1].conn is conn and not conn.is_closed
            assert srv.counters["cer_already_connected"] == 2

    run(main())


def test_election_when_the_cers_cross() -> None:
    """RFC 6733 §5.6.4, deterministically (the both-sides-dial test in test_diameter_node may be
    decided by R-Reject instead): a CER that comes while our own connection waits for its CEA
    is accepted; when the CEA comes, the higher identity keeps the connection it accepted, the
    lower one the connection it dialled."""
    async def crossing(ours: str) -> tuple[bool, bool]:
        """(whether ``ours`` kept the connection it accepted, whether the other one was closed)."""
        theirs = "m.mid.example"
        cers: asyncio.Queue[RawPeer] = asyncio.Queue()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            cers.put_nowait(RawPeer(reader, writer))

        listener = await asyncio.start_server(accept, LO, 0)
        async with listener:
            n = node(ours, HOME)
            n.add_peer(theirs, VISIT, LO, listener.sockets[0].getsockname()[1])
            async with n:
                dialled = await cers.get()
                cer = await dialled.recv()  # our CER: its CEA held back
                assert cer.name == "CER" and n.peers[theirs].state.value == "wait-cea"
                incoming = await RawPeer.connect(n.port)
                assert (await incoming.cer(theirs, VISIT)).result_code == 2001
                await eventually(lambda: n.peers[theirs].conn is not None)
                dialled.send(cer.answer(2001, [("Origin-Host", theirs), ("Origin-Realm", VISIT),
                                               ("Host-IP-Address", LO), ("Vendor-Id", 0), ("Product-Name", "raw"),
                                               ("Auth-Application-Id", 2)]))
                kept_in = not await closed_soon(incoming, 0.3)
                closed_out = await closed_soon(dialled, 1.0)
                conn = n.peers[theirs].conn
                assert conn is not None and n.peers[theirs].is_open and len(n.connections) == 1
                assert conn.incoming == kept_in
                return kept_in, closed_out

    async def main() -> None:
        assert await crossing("z.high.example") == (True, True)  # higher: keeps the one it accepted
        assert await crossing("a.low.example") == (False, False)  # lower: keeps the one it dialled

    run(main())
