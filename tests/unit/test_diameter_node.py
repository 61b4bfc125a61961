"""Diameter node on asyncio TCP: CER/CEA, request/answer, relay, errors, watchdog, failover, DPR.

Everything runs on 127.0.0.1 with ephemeral ports, inside ``asyncio.run`` (no pytest-asyncio).
Timings are only bounds (a test fails if something never happens), never assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from daemons.diameter.node import DiameterError, DiameterNode, DiameterNoRoute, DiameterTimeout, require
from daemons.diameter.peer import Peer, PeerState
from daemons.wire.diameter import DisconnectCause, Message, ResultCode, message_length

LO = "127.0.0.1"
HOME = "home.example"
VISIT = "visit-a.example"


def run(coro: Awaitable[Any], timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def node(host: str, realm: str, *, listen: bool = True, tw: float = 5.0, **kw: Any) -> DiameterNode:
    return DiameterNode(host, realm, [LO], listen_address=LO if listen else None, listen_port=0,
                        watchdog_interval=tw, reconnect_min=0.05, reconnect_max=0.2, dpa_timeout=0.5, **kw)


def amr(node_: DiameterNode, realm: str = HOME, *, user: bool = True, app: int | None = None,
        dest_host: str | None = None) -> Message:
    avps: list[Any] = [("Session-Id", node_.session_id()), ("Auth-Application-Id", 2),
                       ("Origin-Host", node_.origin_host), ("Origin-Realm", node_.origin_realm),
                       ("Destination-Realm", realm)]
    if dest_host:
        avps.append(("Destination-Host", dest_host))
    if user:
        avps.append(("User-Name", "mn1@home.example"))
    avps += [
        ("MIP-Reg-Request", bytes(range(28))),
        ("MIP-MN-AAA-Auth", [("MIP-MN-AAA-SPI", 256), ("MIP-Auth-Input-Data-Length", 28),
                             ("MIP-Authenticator-Length", 16), ("MIP-Authenticator-Offset", 40)]),
    ]
    return Message.request("AMR", avps, application_id=app)


class AmrServer:
    """An AMR handler that records what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[Message, Peer]] = []

    async def __call__(self, req: Message, peer: Peer) -> Message:
        self.seen.append((req, peer))
        return req.answer(ResultCode.DIAMETER_SUCCESS, [("Auth-Application-Id", 2), ("User-Name", req.get("User-Name")),
                                                         ("MIP-Reg-Reply", b"\x03" + bytes(19))])


def serving(host: str, realm: str = HOME, **kw: Any) -> tuple[DiameterNode, AmrServer]:
    n = node(host, realm, **kw)
    h = AmrServer()
    n.register_handler(2, 260, h, required=("User-Name", "MIP-Reg-Request"))
    return n, h


def allow(n: DiameterNode, host: str, realm: str, *, agent: bool = False) -> None:
    """Configure ``host`` as a peer that may connect to ``n`` from loopback (RFC 6733 §5.3)."""
    if host.lower() not in n.peers:
        n.add_peer(host, realm, sources=[LO], agent=agent)


RAW_HOST, RAW_REALM = "raw.test.example", "test.example"


def allow_raw(n: DiameterNode) -> DiameterNode:
    """Let the RawPeer (its default CER) connect to ``n``."""
    allow(n, RAW_HOST, RAW_REALM)
    return n


def client(host: str, realm: str, *peers: tuple[DiameterNode | int, str, str], **kw: Any) -> DiameterNode:
    """A node that dials ``peers`` (node or port, host, realm) and routes their realms to them;
    each node dialled has it configured as a peer that may connect."""
    c = node(host, realm, listen=False, **kw)
    for target, phost, prealm in peers:
        port = target if isinstance(target, int) else target.port
        if isinstance(target, DiameterNode):
            allow(target, host, realm)
        c.add_peer(phost, prealm, LO, port)
        c.add_route(prealm, phost)
    return c


async def eventually(cond: Callable[[], bool], limit: float = 5.0) -> None:
    async with asyncio.timeout(limit):
        while not cond():  # noqa: ASYNC110 (polling node state from outside)
            await asyncio.sleep(0.01)


# -- a raw peer speaking the codec directly (to misbehave on purpose) -------------------------


class RawPeer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.hbh = 0x1000

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        return cls(*await asyncio.open_connection(LO, port))

    def send(self, data: Message | bytes) -> None:
        self.writer.write(data.encode() if isinstance(data, Message) else data)

    async def recv(self, timeout: float = 5.0) -> Message:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            head = await self.reader.readexactly(4)
            rest = await self.reader.readexactly(message_length(head) - 4)
        return Message.decode(head + rest)

    async def recv_not(self, command_code: int, timeout: float = 5.0) -> Message:  # noqa: ASYNC109
        """The next message that is not a ``command_code`` request (e.g. skip DWRs)."""
        while True:
            m = await self.recv(timeout)
            if not (m.is_request and m.command_code == command_code):
                return m

    def request(self, command: str | int, avps: list[Any], **kw: Any) -> Message:
        self.hbh += 1
        return Message.request(command, avps, hop_by_hop=self.hbh, end_to_end=0x5000 + self.hbh, **kw)

    async def cer(self, host: str = "raw.test.example", realm: str = "test.example", apps: tuple[int, ...] = (2,)
                  ) -> Message:
        self.send(self.request("CER", [("Origin-Host", host), ("Origin-Realm", realm), ("Host-IP-Address", LO),
                                       ("Vendor-Id", 0), ("Product-Name", "raw"),
                                       *[("Auth-Application-Id", a) for a in apps]]))
        return await self.recv()

    async def eof(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            return await self.reader.read(65536) == b""

    def close(self) -> None:
        self.writer.close()


async def fake_server(behaviour: str, host: str, realm: str = HOME) -> tuple[asyncio.Server, list[Message]]:
    """A peer that completes CER/CEA and then, on requests: "silent" swallows everything
    (DWR included), "close" aborts the connection without DPR at the first application request."""
    got: list[Message] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = RawPeer(reader, writer)
        with contextlib.suppress(Exception):
            cer = await raw.recv()
            raw.send(cer.answer(2001, [("Origin-Host", host), ("Origin-Realm", realm), ("Host-IP-Address", LO),
                                       ("Vendor-Id", 0), ("Product-Name", "fake"), ("Auth-Application-Id", 2)]))
            while True:
                m = await raw.recv(timeout=60)
                got.append(m)
                if behaviour == "close" and m.command_code == 260:
                    writer.transport.abort()
                    return
        writer.close()

    return await asyncio.start_server(serve, LO, 0), got


# -- capabilities exchange ---------------------------------------------------------------------


def test_cer_cea_between_two_nodes() -> None:
    async def main() -> None:
        server, _ = serving("aaah.home.example")
        async with server:
            c = client("aaaf.visit-a.example", VISIT, (server, "aaah.home.example", HOME), origin_state_id=77)
            async with c:
                p = await c.wait_open("aaah.home.example", 5)
                back = await server.wait_open("aaaf.visit-a.example", 5)
                assert p.state is PeerState.OPEN and p.applications == {2}
                assert p.product_name == "mipvpn" and p.origin_state_id == server.origin_state_id
                assert not back.dynamic and back.realm == VISIT and back.origin_state_id == 77
                (st,) = c.peers_status()
                assert st["peer"] == "aaah.home.example" and st["state"] == "open" and st["realm"] == HOME
                assert st["address"] == f"{LO}:{server.port}" and st["pending"] == 0 and st["last_watchdog"]
                (back_st,) = server.peers_status()
                assert back_st["direction"] == "in" and back_st["address"] is None
                assert back_st["sources"] == [f"{LO}/32"]

    run(main())


def test_cer_without_common_application_is_answered_5010() -> None:
    async def main() -> None:
        server, _ = serving("aaah.home.example")
        allow_raw(server)
        async with server:
            raw = await RawPeer.connect(server.port)
            cea = await raw.cer(apps=(5,))
            assert cea.result_code == ResultCode.DIAMETER_NO_COMMON_APPLICATION
            assert cea.get("Origin-Host") == "aaah.home.example" and cea.get("Auth-Application-Id") == 2
            assert await raw.eof()
            # our own dialler gives up on that CEA too and retries later
            c = client("x.visit-a.example", VISIT, (server, "aaah.home.example", HOME), applications=(7,))
            async with c:
                await eventually(lambda: c.result_codes_received[5010] >= 1)
                assert not c.peers["aaah.home.example"].is_open

    run(main())


def test_unknown_peers_accepted_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    """``accept_unknown_peers`` (tests and tools): any name gets in, as a dynamic peer that is
    forgotten a while after it left; the node warns at start."""
    caplog.set_level(logging.INFO, logger="daemons.diameter")

    async def main() -> None:
        server, _ = serving("aaah.home.example", accept_unknown_peers=True, dynamic_peer_ttl=0.2)
        async with server:
            raw = await RawPeer.connect(server.port)
            assert (await raw.cer()).result_code == 2001
            peer = server.peers[RAW_HOST]
            assert peer.dynamic and peer.realm == RAW_REALM
            raw.close()
            await eventually(lambda: RAW_HOST not in server.peers)
            assert server.counters["dynamic_peers_expired"] == 1

    run(main())
    assert "event=diameter.unknown_peers_accepted" in [r.getMessage() for r in caplog.records]


# -- requests and answers ------------------------------------------------------------------------


def test_amr_answered_by_handler() -> None:
    async def main() -> None:
        server, h = serving("aaah.home.example")
        async with server:
            c = client("fa1.visit-a.example", VISIT, (server, "aaah.home.example", HOME))
            async with c:
                await c.wait_open("aaah.home.example")
                req = amr(c)
                ans = await c.request(req, timeout=5)
                assert ans.name == "AMA" and ans.result_code == ResultCode.DIAMETER_SUCCESS and not ans.error
                assert ans.hop_by_hop == req.hop_by_hop and ans.end_to_end == req.end_to_end
                assert ans.session_id == req.session_id and ans.get("MIP-Reg-Reply")[0] == 3
                assert ans.get("Origin-Host") == "aaah.home.example" and ans.get("Origin-Realm") == HOME
                (seen, peer), = h.seen
                assert peer.host == "fa1.visit-a.example" and seen.get("MIP-MN-AAA-Auth", "MIP-MN-AAA-SPI") == 256
                # hop-by-hop ids are per connection and keep changing; end-to-end ids per node
                again = await c.request(amr(c), timeout=5)
                assert again.hop_by_hop != ans.hop_by_hop and again.end_to_end != ans.end_to_end
                assert server.stats()["result_codes_sent"][2001] >= 2
                # routing by Destination-Host of a connected peer
                direct = await c.request(amr(c, realm="elsewhere.example", dest_host="aaah.home.example"))
                assert direct.result_code == 2001

    run(main())


def test_no_route_raises() -> None:
    async def main() -> None:
        c = node("fa1.visit-a.example", VISIT, listen=False)
        async with c:
            with pytest.raises(DiameterNoRoute):
                await c.request(amr(c, realm="nowhere.example"), timeout=1)

    run(main())


def test_relay_adds_route_record_and_maps_answer_back() -> None:
    async def main() -> None:
        home, h = serving("aaah.home.example")
        async with home:
            relay = node("aaaf.visit-a.example", VISIT)
            relay.add_peer("aaah.home.example", HOME, LO, home.port)
            allow(home, "aaaf.visit-a.example", VISIT, agent=True)
            async with relay:
                c = client("fa1.visit-a.example", VISIT, (relay, "aaaf.visit-a.example", VISIT))
                c.add_route(HOME, "aaaf.visit-a.example")
                async with c:
                    await relay.wait_open("aaah.home.example")
                    await c.wait_open("aaaf.visit-a.example")
                    req = amr(c)
                    ans = await c.request(req, timeout=5)
                    assert ans.result_code == 2001 and ans.hop_by_hop == req.hop_by_hop
                    assert ans.get("Origin-Host") == "aaah.home.example"
                    (seen, peer), = h.seen
                    assert peer.host == "aaaf.visit-a.example"
                    assert [a.value for a in seen.find_all("Route-Record")] == ["fa1.visit-a.example"]
                    assert seen.end_to_end == req.end_to_end and seen.get("Origin-Host") == "fa1.visit-a.example"
                    assert relay.counters["relayed"] == 1 and relay.counters["relayed_answers"] == 1

    run(main())


def test_forward_and_answer_hooks_on_a_relay(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="daemons.diameter")

    async def main() -> None:
        home, h = serving("aaah.home.example")
        async with home:
            relay = node("aaaf.visit-a.example", VISIT)
            relay.add_peer("aaah.home.example", HOME, LO, home.port)
            allow(home, "aaaf.visit-a.example", VISIT, agent=True)
            calls: list[str] = []
            answers: list[tuple[Message, Message]] = []

            def broken(req: Message, peer: Peer) -> None:
                calls.append("broken")
                raise RuntimeError("hook bug")

            def tag(req: Message, peer: Peer) -> None:  # changes what is relayed
                calls.append(f"tag:{peer.host}")
                assert req.find("Route-Record") is None
                req.add("Class", b"tagged")

            def answer_locally(req: Message) -> Message | None:
                calls.append("intercept")
                return req.answer(2001, [("Auth-Application-Id", 2)]) if req.get("User-Name") == "local" else None

            def on_answer(fwd: Message, ans: Message) -> None:
                answers.append((fwd, ans))
                ans.add("Class", b"seen")  # changes what goes back

            relay.add_forward_hook(broken)
            relay.add_forward_hook(tag, application_id=2, command_code=260)
            relay.add_forward_hook(lambda req, peer: calls.append("har") and None, command_code=262)
            relay.observe(2, 260, on_request=lambda req: calls.append("observe"), on_answer=on_answer)
            relay.intercept(2, 260, answer_locally)
            async with relay:
                c = client("fa1.visit-a.example", VISIT, (relay, "aaaf.visit-a.example", VISIT))
                c.add_route(HOME, "aaaf.visit-a.example")
                async with c:
                    await relay.wait_open("aaah.home.example")
                    await c.wait_open("aaaf.visit-a.example")
                    req = amr(c)
                    ans = await c.request(req, timeout=5)
                    assert ans.result_code == 2001 and ans.get("Origin-Host") == "aaah.home.example"
                    assert ans.get("Class") == b"seen" and ans.hop_by_hop == req.hop_by_hop
                    assert calls == ["broken", "tag:fa1.visit-a.example", "observe", "intercept"]
                    (seen, _), = h.seen
                    assert seen.get("Class") == b"tagged"
                    (fwd, relayed), = answers
                    assert [a.value for a in fwd.find_all("Route-Record")] == ["fa1.visit-a.example"]
                    assert fwd.end_to_end == req.end_to_end and relayed.end_to_end == req.end_to_end
                    # a forward hook that answers: nothing is relayed, no answer hook runs
                    calls.clear()
                    local = amr(c)
                    local.find("User-Name").value = "local"
                    ans = await c.request(local, timeout=5)
                    assert ans.result_code == 2001 and ans.get("Origin-Host") == "aaaf.visit-a.example"
                    assert ans.get("Origin-Realm") == VISIT and ans.end_to_end == local.end_to_end
                    assert ans.hop_by_hop == local.hop_by_hop and ans.get("Class") is None
                    assert calls == ["broken", "tag:fa1.visit-a.example", "observe", "intercept"]
                    assert len(h.seen) == 1 and len(answers) == 1
                    assert relay.counters["relayed"] == 1 and relay.counters["relayed_answers"] == 1

    run(main())
    failed = [r for r in caplog.records if r.getMessage() == "event=hook.failed"]
    assert len(failed) == 2 and all("broken" in r.fields["hook"] for r in failed)  # type: ignore[attr-defined]


def test_loop_detected_3005() -> None:
    async def main() -> None:
        a = node("a.one.example", "one.example")
        b = node("b.two.example", "two.example")
        b.add_peer("a.one.example", "one.example", sources=[LO], agent=True)  # passive: a dials b
        b.add_route("x.example", "a.one.example")
        async with b:
            a.add_peer("b.two.example", "two.example", LO, b.port, agent=True)
            a.add_route("x.example", "b.two.example")
            async with a:
                c = client("c.three.example", "three.example", (a, "a.one.example", "one.example"))
                c.add_route("x.example", "a.one.example")
                async with c:
                    await c.wait_open("a.one.example")
                    await b.wait_open("a.one.example")
                    ans = await c.request(amr(c, realm="x.example"), timeout=5)
                    assert ans.result_code == ResultCode.DIAMETER_LOOP_DETECTED and ans.error
                    assert ans.get("Origin-Host") == "a.one.example"
                    assert a.counters["loops"] == 1 and b.counters["relayed"] == 1

    run(main())


def test_unknown_realm_3003() -> None:
    async def main() -> None:
        relay = node("aaaf.visit-a.example", VISIT)
        async with relay:
            c = node("fa1.visit-a.example", VISIT, listen=False)
            allow(relay, "fa1.visit-a.example", VISIT)
            c.add_peer("aaaf.visit-a.example", VISIT, LO, relay.port)
            c.add_default_route("aaaf.visit-a.example")
            async with c:
                await c.wait_open("aaaf.visit-a.example")
                ans = await c.request(amr(c, realm="nowhere.example"), timeout=5)
                assert ans.result_code == ResultCode.DIAMETER_REALM_NOT_SERVED and ans.error

    run(main())


def test_unsupported_application_3007_and_command_3001() -> None:
    async def main() -> None:
        server, _ = serving("aaah.home.example")
        allow_raw(server)
        async with server:
            raw = await RawPeer.connect(server.port)
            assert (await raw.cer()).result_code == 2001
            base = [("Session-Id", "raw;1"), ("Origin-Host", "raw.test.example"), ("Origin-Realm", "test.example"),
                    ("Destination-Realm", HOME)]
            raw.send(raw.request(271, base, application_id=16777255, proxiable=True))
            ans = await raw.recv_not(280)
            assert ans.result_code == ResultCode.DIAMETER_APPLICATION_UNSUPPORTED and ans.error
            assert ans.hop_by_hop == raw.hbh and ans.session_id == "raw;1"
            raw.send(raw.request("HAR", base))  # application 2 is served, HAR has no handler
            ans = await raw.recv_not(280)
            assert ans.result_code == ResultCode.DIAMETER_COMMAND_UNSUPPORTED and ans.error
            raw.close()

    run(main())


def test_missing_avp_5005_with_failed_avp() -> None:
    async def main() -> None:
        server, h = serving("aaah.home.example")

        async def har(req: Message, peer: Peer) -> Message:
            require(req, "MIP-Reg-Request", "User-Name")
            raise DiameterError(ResultCode.DIAMETER_UNABLE_TO_DELIVER, "not here")

        server.register_handler(2, 262, har)
        async with server:
            c = client("fa1.visit-a.example", VISIT, (server, "aaah.home.example", HOME))
            async with c:
                await c.wait_open("aaah.home.example")
                ans = await c.request(amr(c, user=False), timeout=5)  # required=("User-Name", ...)
                assert ans.result_code == ResultCode.DIAMETER_MISSING_AVP and not ans.error
                failed = ans.find("Failed-AVP")
                assert [a.name for a in failed.value] == ["User-Name"]
                assert not h.seen
                har_req = Message.request("HAR", [("Session-Id", c.session_id()), ("Destination-Realm", HOME)])
                ans = await c.request(har_req, timeout=5)
                assert ans.result_code == 5005
                assert [a.name for a in ans.find("Failed-AVP").value] == ["MIP-Reg-Request", "User-Name"]
                har_req = Message.request("HAR", [("Session-Id", c.session_id()), ("Destination-Realm", HOME),
                                                  ("User-Name", "u@home.example"), ("MIP-Reg-Request", b"x")])
                ans = await c.request(har_req, timeout=5)
                assert ans.result_code == 3002 and ans.error and ans.get("Error-Message") == "not here"

    run(main())


# -- watchdog, failover, disconnect -------------------------------------------------------------


def test_watchdog_suspect_fails_over_with_t_flag() -> None:
    async def main() -> None:
        fake, got = await fake_server("silent", "dead.home.example")
        async with fake:
            alt, h = serving("alt.home.example")
            async with alt:
                c = client("fa1.visit-a.example", VISIT, (fake.sockets[0].getsockname()[1], "dead.home.example", HOME),
                           (alt, "alt.home.example", HOME), tw=0.2)
                async with c:
                    await c.wait_open("dead.home.example")
                    await c.wait_open("alt.home.example")
                    req = amr(c)
                    ans = await c.request(req, timeout=10)
                    assert ans.result_code == 2001 and ans.get("Origin-Host") == "alt.home.example"
                    (seen, _), = h.seen
                    assert seen.retransmit and seen.end_to_end == req.end_to_end
                    first = next(m for m in got if m.command_code == 260)
                    assert not first.retransmit
                    assert any(m.command_code == 280 for m in got)  # our unanswered DWR
                    assert c.counters["failovers"] == 1 and c.counters["watchdog_suspect"] >= 1
                    assert c.peers["dead.home.example"].state is not PeerState.OPEN
                    # after a second Tw in SUSPECT the connection is closed and re-dialled
                    await eventually(lambda: c.counters["watchdog_down"] >= 1)

    run(main())


def test_connection_loss_fails_over_with_t_flag() -> None:
    async def main() -> None:
        fake, got = await fake_server("close", "dead.home.example")
        async with fake:
            alt, h = serving("alt.home.example")
            async with alt:
                c = client("fa1.visit-a.example", VISIT, (fake.sockets[0].getsockname()[1], "dead.home.example", HOME),
                           (alt, "alt.home.example", HOME))
                async with c:
                    await c.wait_open("dead.home.example")
                    await c.wait_open("alt.home.example")
                    ans = await c.request(amr(c), timeout=5)
                    assert ans.result_code == 2001 and ans.get("Origin-Host") == "alt.home.example"
                    (seen, _), = h.seen
                    assert seen.retransmit and [m.command_code for m in got] == [260]
                    # the dead peer is re-dialled (the fake accepts again)
                    await eventually(lambda: c.peers["dead.home.example"].is_open)

    run(main())


def test_relay_fails_over_and_answers_3002_without_alternate() -> None:
    async def main() -> None:
        fake, _ = await fake_server("close", "dead.home.example")
        async with fake:
            relay = node("aaaf.visit-a.example", VISIT)
            relay.add_peer("dead.home.example", HOME, LO, fake.sockets[0].getsockname()[1])
            async with relay:
                c = client("fa1.visit-a.example", VISIT, (relay, "aaaf.visit-a.example", VISIT))
                c.add_route(HOME, "aaaf.visit-a.example")
                async with c:
                    await relay.wait_open("dead.home.example")
                    await c.wait_open("aaaf.visit-a.example")
                    ans = await c.request(amr(c), timeout=5)
                    assert ans.result_code == ResultCode.DIAMETER_UNABLE_TO_DELIVER and ans.error
                    assert ans.get("Origin-Host") == "aaaf.visit-a.example"

    run(main())


def test_dpr_dpa_on_stop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="daemons.diameter")

    async def main() -> None:
        server, _ = serving("aaah.home.example")
        allow_raw(server)
        async with server:
            # our node sends DPR to a raw peer on stop and closes after the DPA
            raw = await RawPeer.connect(server.port)
            assert (await raw.cer()).result_code == 2001
            c = client("fa1.visit-a.example", VISIT, (server, "aaah.home.example", HOME))
            await c.start()
            await c.wait_open("aaah.home.example")
            await server.wait_open("fa1.visit-a.example")
            await c.stop()  # DPR to the server, which answers DPA
            peer = server.peers["fa1.visit-a.example"]
            await eventually(lambda: peer.state is PeerState.CLOSED)
            assert peer.last_disconnect_cause == DisconnectCause.REBOOTING
            stop = asyncio.create_task(server.stop(DisconnectCause.BUSY))
            dpr = await raw.recv_not(280)
            assert dpr.name == "DPR" and dpr.get("Disconnect-Cause") == DisconnectCause.BUSY
            assert dpr.get("Origin-Host") == "aaah.home.example"
            raw.send(dpr.answer(2001, [("Origin-Host", "raw.test.example"), ("Origin-Realm", "test.example")]))
            assert await raw.eof()
            await stop

    run(main())
    events = [r.getMessage() for r in caplog.records]
    assert "event=peer.dpa" in events and "event=peer.dpr" in events


def test_malformed_bytes_answered_or_closed_node_keeps_serving() -> None:
    async def main() -> None:
        server, _ = serving("aaah.home.example")
        allow_raw(server)
        async with server:
            c = client("fa1.visit-a.example", VISIT, (server, "aaah.home.example", HOME))
            async with c:
                await c.wait_open("aaah.home.example")
                raw = await RawPeer.connect(server.port)
                assert (await raw.cer()).result_code == 2001
                # a request whose AVP length runs past the message: 5014, connection stays up
                good = raw.request("AMR", [("Session-Id", "raw;2"), ("Origin-Host", "raw.test.example")])
                wire = bytearray(good.encode())
                struct.pack_into(">I", wire, 24, (0x40 << 24) | 200)  # first AVP's flags+length
                raw.send(bytes(wire))
                ans = await raw.recv_not(280)
                assert ans.result_code == ResultCode.DIAMETER_INVALID_AVP_LENGTH
                assert ans.hop_by_hop == good.hop_by_hop and ans.command_code == 260 and not ans.is_request
                # still usable: a DWR gets its DWA
                raw.send(raw.request("DWR", [("Origin-Host", "raw.test.example"), ("Origin-Realm", "test.example")]))
                assert (await raw.recv_not(280)).name == "DWA"
                # a version-2 header cannot be framed: answered 5011 when the header is readable, then closed
                bad = bytearray(raw.request("AMR", [("Session-Id", "raw;3")]).encode())
                bad[0] = 2
                raw.send(bytes(bad))
                ans = await raw.recv_not(280)
                assert ans.result_code == ResultCode.DIAMETER_UNSUPPORTED_VERSION
                assert await raw.eof()
                # pure garbage before CER: connection closed
                raw2 = await RawPeer.connect(server.port)
                raw2.send(b"\xff" * 7)
                assert await raw2.eof()
                assert server.counters["malformed"] == 3
                # and the node keeps serving the others
                assert (await c.request(amr(c), timeout=5)).result_code == 2001

    run(main())


def test_duplicate_t_flag_request_gets_cached_answer() -> None:
    async def main() -> None:
        server, h = serving("aaah.home.example")
        allow_raw(server)
        async with server:
            raw = await RawPeer.connect(server.port)
            assert (await raw.cer()).result_code == 2001
            req = raw.request("AMR", [("Session-Id", "raw;9"), ("Auth-Application-Id", 2),
                                      ("Origin-Host", "raw.test.example"), ("Origin-Realm", "test.example"),
                                      ("Destination-Realm", HOME), ("User-Name", "u@home.example"),
                                      ("MIP-Reg-Request", b"r")])
            raw.send(req)
            first = await raw.recv_not(280)
            req.retransmit = True
            req.hop_by_hop += 100
            raw.send(req)
            second = await raw.recv_not(280)
            assert first.result_code == second.result_code == 2001 and len(h.seen) == 1
            assert second.hop_by_hop == req.hop_by_hop and second.end_to_end == first.end_to_end
            raw.close()

    run(main())


def test_secrets_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="daemons.diameter")
    key = bytes.fromhex("00112233445566778899aabbccddeeff")

    async def main() -> None:
        server = node("aaah.home.example", HOME)

        async def handler(req: Message, peer: Peer) -> Message:
            return req.answer(2001, [("MIP-Session-Key", key), ("VPN-Info", [("VPN-Key-In", key)])])

        server.register_handler(2, 260, handler)
        async with server:
            c = client("fa1.visit-a.example", VISIT, (server, "aaah.home.example", HOME))
            async with c:
                await c.wait_open("aaah.home.example")
                ans = await c.request(amr(c), timeout=5)
                assert ans.get("MIP-Session-Key").reveal() == key

    run(main())
    text = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    assert key.hex() not in text and repr(key) not in text and "AMA" in text



def test_both_sides_dial_election_keeps_one_connection() -> None:
    async def main() -> None:
        a, _ = serving("a.one.example", "one.example")
        b, _ = serving("b.two.example", "two.example")
        async with a, b:
            a.add_peer("b.two.example", "two.example", LO, b.port)
            b.add_peer("a.one.example", "one.example", LO, a.port)
            await a.wait_open("b.two.example")
            await b.wait_open("a.one.example")
            await asyncio.sleep(0.3)  # let any duplicate connection settle
            assert (await a.request(amr(a, realm="two.example"), timeout=5)).result_code == 2001
            assert (await b.request(amr(b, realm="one.example"), timeout=5)).result_code == 2001
            sa, = a.peers_status()
            sb, = b.peers_status()
            assert sa["state"] == sb["state"] == "open"
            # Both ends keep the same one connection. When the CERs cross while both are still waiting
            # for their CEA, the election keeps the one the lower identity (a) dialled; if b's had
            # already opened at b, a's CER is refused (RFC 6733 §5.6, R-Reject) and b's is kept.
            assert {sa["direction"], sb["direction"]} == {"out", "in"}
            assert len(a.connections) == len(b.connections) == 1

    run(main())


def test_request_timeout_and_late_answer_dropped() -> None:
    async def main() -> None:
        server = node("aaah.home.example", HOME)
        release = asyncio.Event()

        async def slow(req: Message, peer: Peer) -> Message:
            await release.wait()
            return req.answer(2001)

        server.register_handler(2, 260, slow)
        async with server:
            c = client("fa1.visit-a.example", VISIT, (server, "aaah.home.example", HOME))
            async with c:
                await c.wait_open("aaah.home.example")
                with pytest.raises(DiameterTimeout):
                    await c.request(amr(c), timeout=0.2)
                assert c.counters["timeouts"] == 1 and c.peers_status()[0]["pending"] == 0
                release.set()
                await eventually(lambda: c.counters["unexpected_answers"] == 1)

    run(main())
