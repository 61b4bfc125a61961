"""The Binding Update transaction (daemons/agents/binding.py) over real loopback UDP sockets:
the sender (BindingClient on 127.0.0.1) and the peer answering it (BindingPeers on 127.0.0.2)
are the real objects with the real codec and authenticators; only the peer's choice of what
to answer (nothing, late, wrong) is the test's."""

from __future__ import annotations

import asyncio
import logging
import time
from ipaddress import IPv4Address
from typing import Any

import pytest

from daemons.agents.binding import BindingClient, BindingEvents, BindingPeers, Retransmit
from daemons.runtime.config import PeerAgent
from daemons.runtime.log import EventLog
from daemons.runtime.net import UdpEndpoint
from daemons.runtime.secret import Secret
from daemons.wire import mip

ME, PEER, INTRUDER = "127.0.0.1", "127.0.0.2", "127.0.0.3"
KEY, SPI = Secret(b"pair binding key"), 0x5000
HOA, COA = IPv4Address("198.18.100.10"), IPv4Address("198.18.0.18")
log = EventLog("mipvpn.test.binding")

# What the peer does with one Binding Update it receives: ("drop",) or ("ack", delay in s).
Action = tuple[Any, ...]


def update(ident: int) -> mip.BindingUpdate:
    return mip.BindingUpdate(home_address=HOA, care_of_address=COA, identification=ident, lifetime=10,
                             flags=mip.BUFlag.A, extensions=[mip.NAIExtension("mn1@home.example")])


class Peer:
    """The agent at 127.0.0.2: authenticates each Binding Update with the pair key and
    answers it as ``actions`` say, one action per update received (then: acknowledge)."""

    def __init__(self, actions: list[Action]) -> None:
        self.actions = actions
        self.peers = BindingPeers({ME: PeerAgent(IPv4Address(ME), SPI, KEY)})
        self.received: list[tuple[bytes, mip.BindingUpdate, bool]] = []  # raw, decoded, authentic
        self.udp: UdpEndpoint | None = None

    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        bu = mip.decode_message(data)
        assert isinstance(bu, mip.BindingUpdate)
        self.received.append((data, bu, self.peers.authentic(data, addr[0]) is not None))
        action = self.actions[len(self.received) - 1] if len(self.received) <= len(self.actions) else ("ack", 0)
        loop = asyncio.get_running_loop()
        assert self.udp is not None
        udp = self.udp
        if action[0] == "ack":
            loop.call_later(action[1], lambda: self.peers.acknowledge(udp, bu, mip.BindingStatus.ACCEPTED, addr,
                                                                      bu.lifetime))


class World:
    def __init__(self, peer: Peer, client: BindingClient, udp: UdpEndpoint, intruder: UdpEndpoint) -> None:
        self.peer, self.client, self.udp, self.intruder = peer, client, udp, intruder
        self.counters = client.counters

    def close(self) -> None:
        for u in (self.udp, self.peer.udp, self.intruder):
            if u is not None:
                u.close()


async def world(actions: list[Action], events: BindingEvents | None = None) -> World:
    peer = Peer(actions)
    peer.udp = await UdpEndpoint.open(peer.on_datagram, PEER, 0)
    port = peer.udp.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
    counters = {"malformed": 0, "bu_sent": 0, "ba_received": 0}
    client = BindingClient(BindingPeers({PEER: PeerAgent(IPv4Address(PEER), SPI, KEY)}, port=port), log, counters,
                           events or BindingEvents(sent_counter="bu_sent", ack_counter="ba_received"))

    def on_datagram(data: bytes, addr: tuple[str, int]) -> None:
        msg = mip.decode_message(data)
        assert isinstance(msg, mip.BindingAcknowledge)
        client.on_ack(msg, data, addr)

    udp = await UdpEndpoint.open(on_datagram, ME, 0)
    intruder = await UdpEndpoint.open(lambda *_: None, INTRUDER, 0)
    return World(peer, client, udp, intruder)


def ack_for(bu: mip.BindingUpdate, ident: int | None = None, key: Secret | None = KEY) -> bytes:
    ack = mip.BindingAcknowledge(status=0, home_address=bu.home_address,
                                 identification=bu.identification if ident is None else ident, lifetime=bu.lifetime)
    return (mip.sign(ack, mip.EXT_BINDING_AUTH, SPI, key) if key is not None else ack).encode()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_schedules_of_the_agents() -> None:
    assert Retransmit.backoff(0.5, 3, fresh_identification=True) == Retransmit((0.5, 1.0, 2.0), True)  # FA, F6
    assert Retransmit.backoff(0.2, 2).waits == (0.2, 0.4)  # FA, F6 with VPN info
    assert Retransmit.backoff(0.4, 3, ceiling=0.8).waits == (0.4, 0.8, 0.8)  # HA -> CN-GW


def test_the_same_update_is_retransmitted_until_acknowledged() -> None:
    async def main() -> None:
        w = await world([("drop",), ("drop",), ("ack", 0)])
        try:
            t0 = time.monotonic()
            ack = await w.client.update(w.udp, PEER, update, Retransmit((0.1, 0.2, 1.0)), mn="mn1@home.example")
            elapsed = time.monotonic() - t0
            assert ack is not None and ack.accepted and ack.lifetime == 10
            raws = [r for r, _, _ in w.peer.received]
            assert len(raws) == 3 and len(set(raws)) == 1  # the same signed update three times
            assert all(ok for _, _, ok in w.peer.received)  # authenticated with the pair key
            assert ack.identification == w.peer.received[0][1].identification
            assert elapsed >= 0.3  # it waited out the first two tries
            assert (w.counters["bu_sent"], w.counters["ba_received"], w.counters["malformed"]) == (3, 1, 0)
            assert w.client.waiting == {}
        finally:
            w.close()

    run(main())


def test_fresh_identification_per_try_and_a_late_answer_to_an_earlier_try_is_ignored() -> None:
    async def main() -> None:
        # Try 1 is answered after 0.15 s, while try 2 (sent at 0.1 s) waits; try 2 at 0.3 s.
        w = await world([("ack", 0.15), ("ack", 0.2)])
        try:
            ack = await w.client.update(w.udp, PEER, update, Retransmit((0.1, 1.0), fresh_identification=True),
                                        mn=None)
            first, second = (bu for _, bu, _ in w.peer.received)
            assert first.identification != second.identification
            assert ack is not None and ack.identification == second.identification
            assert w.counters["malformed"] == 1  # the answer to try 1: nobody waits for it any more
            assert w.counters["ba_received"] == 1 and w.client.waiting == {}
        finally:
            w.close()

    run(main())


def test_wrong_identification_bad_authenticator_and_wrong_source_are_ignored() -> None:
    async def main() -> None:
        w = await world([])
        genuine = {"answer": False}

        def peer_answers(data: bytes, addr: tuple[str, int]) -> None:
            """Four answers that must not count, then (if ``genuine``) the right one, later."""
            bu = mip.decode_message(data)
            assert isinstance(bu, mip.BindingUpdate) and w.peer.udp is not None
            w.peer.received.append((data, bu, True))
            peer = w.peer.udp
            peer.send(ack_for(bu, ident=(bu.identification or 0) + 1), addr)  # another identification
            peer.send(ack_for(bu, key=Secret(b"not the pair key")), addr)  # a bad authenticator
            peer.send(ack_for(bu, key=None), addr)  # no authenticator at all
            w.intruder.send(ack_for(bu), addr)  # the right key, but not from the peer's address
            if genuine["answer"]:
                asyncio.get_running_loop().call_later(0.1, lambda: peer.send(ack_for(bu), addr))

        assert w.peer.udp is not None
        w.peer.udp.handler = peer_answers
        try:
            assert await w.client.update(w.udp, PEER, update, Retransmit((0.3,)), mn=None) is None
            assert w.counters["malformed"] == 4 and w.counters["ba_received"] == 0
            genuine["answer"] = True
            ack = await w.client.update(w.udp, PEER, update, Retransmit((2.0,)), mn=None)
            assert ack is not None and ack.identification == w.peer.received[-1][1].identification
            assert w.counters["malformed"] == 8 and w.counters["ba_received"] == 1
        finally:
            w.close()

    run(main())


def test_unanswered_update_times_out_after_the_last_wait(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        w = await world([("drop",)] * 3, BindingEvents(peer="cngw", ack_peer="cngw", unacknowledged_id=True,
                                                      sent_counter="bu_sent"))
        try:
            t0 = time.monotonic()
            ack = await w.client.update(w.udp, PEER, update, Retransmit.backoff(0.05, 3), mn="mn1@home.example",
                                        coa=COA, paths=1)
            assert ack is None and time.monotonic() - t0 >= 0.35  # 0.05 + 0.1 + 0.2
            assert len(w.peer.received) == 3 and w.counters["bu_sent"] == 3 and w.client.waiting == {}
        finally:
            w.close()

    with caplog.at_level(logging.INFO, logger=log.logger.name):
        run(main())
    events = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    sent = [f for m, f in events if m == "event=bu.sent"]
    assert [list(f) for f in sent] == [["mn", "cngw", "coa", "paths", "id", "attempt"]] * 3
    assert [f["attempt"] for f in sent] == [1, 2, 3]
    (unacked,) = [f for m, f in events if m == "event=bu.unacknowledged"]
    assert unacked == {"mn": "mn1@home.example", "cngw": PEER, "id": sent[0]["id"]}


def test_log_lines_of_an_acknowledged_update(caplog: pytest.LogCaptureFixture) -> None:
    async def main(events: BindingEvents) -> None:
        w = await world([("ack", 0)], events)
        try:
            assert await w.client.update(w.udp, PEER, update, Retransmit((1.0,)), mn="mn1@home.example",
                                         vpn_info=True) is not None
        finally:
            w.close()

    with caplog.at_level(logging.INFO, logger=log.logger.name):
        run(main(BindingEvents(peer="to", ack_peer="src")))  # the FA's
        run(main(BindingEvents(peer="cngw", ack_peer="cngw", ack_lifetime=True)))  # the HA's
    acks = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "event=ba.received"]
    assert acks == [{"mn": "mn1@home.example", "src": PEER, "status": 0},
                    {"mn": "mn1@home.example", "cngw": PEER, "status": 0, "lifetime": 10}]


def test_acknowledge_answers_signed_to_a_peer_and_unsigned_to_a_stranger() -> None:
    class Sent:
        def __init__(self) -> None:
            self.sent: list[tuple[bytes, tuple[str, int]]] = []

        def send(self, data: bytes, addr: tuple[str, int]) -> None:
            self.sent.append((data, addr))

    peers = BindingPeers({PEER: PeerAgent(IPv4Address(PEER), SPI, KEY)})
    out = Sent()
    bu = mip.BindingUpdate(home_address=HOA, care_of_address=COA, identification=None, lifetime=10)
    peers.acknowledge(out, bu, mip.BindingStatus.IDENTIFICATION_MISMATCH, (PEER, 4434), 0)  # type: ignore[arg-type]
    peers.acknowledge(out, bu, mip.BindingStatus.IDENTIFICATION_MISMATCH, (INTRUDER, 434), 0)  # type: ignore[arg-type]
    (signed, to_peer), (plain, to_stranger) = out.sent
    assert (to_peer, to_stranger) == ((PEER, 4434), (INTRUDER, 434))
    assert peers.authentic(signed, PEER) is not None and peers.authentic(plain, PEER) is None
    assert peers.authentic(signed, INTRUDER) is None  # the right key, the wrong address
    ack = mip.decode_message(signed)
    assert isinstance(ack, mip.BindingAcknowledge) and ack.identification == 0 and not ack.accepted
    assert mip.decode_message(plain).extensions == []


def test_a_refusal_of_an_update_that_was_not_wholly_authentic_goes_unsigned() -> None:
    """131 and 134 answer bytes anyone may have sent with a genuine update's identification: a
    signed one would end the peer's transaction for the genuine update (BindingClient takes
    authentic acknowledgements only)."""

    class Sent:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def send(self, data: bytes, addr: tuple[str, int]) -> None:
            self.sent.append(data)

    peers = BindingPeers({PEER: PeerAgent(IPv4Address(PEER), SPI, KEY)})
    out = Sent()
    bu = mip.BindingUpdate(home_address=HOA, care_of_address=COA, identification=7, lifetime=10)
    for status in (mip.BindingStatus.AUTHENTICATION_FAILED, mip.BindingStatus.POORLY_FORMED_UPDATE):
        peers.acknowledge(out, bu, status, (PEER, 434), 0)  # type: ignore[arg-type]
    assert [peers.authentic(data, PEER) for data in out.sent] == [None, None]
    assert [mip.decode_message(data).identification for data in out.sent] == [7, 7]  # type: ignore[attr-defined]
