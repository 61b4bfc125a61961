"""The mobile node (RFC 5944 §3.6, RFC 3012, RFC 2794): movement detection, registration
with back-off, re-registration before expiry, deregistration at home.

Movement is detected from link events (netlink: carrier lost/regained → solicit at once) and
from advertisements (a new agent, or the current one's advertisement lifetime running out).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute

from daemons.agents.advertiser import ALL_ROUTERS, read_icmp
from daemons.agents.routing import MobileNodeLink
from daemons.runtime.config import MNConfig
from daemons.runtime.control import ControlServer
from daemons.runtime.log import EventLog
from daemons.runtime.net import UdpEndpoint, icmp_socket
from daemons.runtime.secret import Secret
from daemons.runtime.tasks import background
from daemons.wire import mip
from daemons.wire.mip.vendor import service_update_extension

log = EventLog("mipvpn.mn")


@dataclass
class Agent:
    address: str  # the advertisement's source on our link
    care_of_address: str
    home: bool  # our own home agent, advertising on our home link
    challenge: bytes | None
    registration_lifetime: int
    heard: float
    lifetime: int  # advertisement lifetime: gone if not heard again by then


class MobileNode:
    def __init__(self, config: MNConfig) -> None:
        self.config = config
        self.link = MobileNodeLink(config.interface, str(config.home_address), config.home_prefix.prefixlen)
        self.agent: Agent | None = None
        self.registered_until = 0.0
        self.registered_at: str | None = None  # the agent we are registered through
        self.registered_coa: str | None = None  # ...and its care-of address
        self.state = "detached"  # detached | registering | registered | home
        self.last_code: int | None = None
        self.clock_offset = 0.0  # learned from a 133 reply (RFC 5944 §5.7)
        self.reply: asyncio.Future[mip.RegistrationReply] | None = None
        self.outstanding_id: int | None = None
        # Claim 17 (docs/protocol.md, "Who holds what"): the key of our last accepted registration
        # through an FA (daemons.wire.mip.localanswer), proven to the local AAA on a move, and the
        # one the outstanding request's acceptance brings.
        self.local_key: Secret | None = None
        self.outstanding_local_key: Secret | None = None
        self.kick = asyncio.Event()  # something changed: (re)consider registering
        self.udp: UdpEndpoint | None = None
        self.icmp: socket.socket | None = None
        self.control = ControlServer(config.control_socket)
        self.counters: dict[str, int] = {"requests": 0, "replies": 0, "malformed": 0, "solicitations": 0,
                                         "service_updates": 0}
        # F7: a service update asked for over the control socket: (sequence, its outcome). Every
        # RRQ carries the service-update NVSE until a reply to one that carried it arrives.
        self.service_update: tuple[int, asyncio.Future[int]] | None = None
        self.service_update_seq = 0
        self.service_update_sent: int | None = None  # the sequence the last RRQ carried
        self.events: list[dict[str, Any]] = []  # timestamped story, for the benchmarks

    def note(self, event: str, **fields: Any) -> None:
        self.events.append({"t": time.time(), "event": event, **{k: str(v) for k, v in fields.items()}})
        del self.events[:-200]
        log.info(event, mn=self.config.nai, **fields)

    # ---- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        self.udp = await UdpEndpoint.open(self.on_datagram, "0.0.0.0", 0, device=self.config.interface)
        self.icmp = icmp_socket(self.config.interface)
        asyncio.get_running_loop().add_reader(self.icmp.fileno(), self.on_icmp)
        self.control.register("registration", lambda _: self.show())
        self.control.register("events", lambda _: list(self.events))
        self.control.register("counters", lambda _: dict(self.counters))
        self.control.register("service-update", self.request_service_update)
        await self.control.start()
        log.info("mn.ready", mn=self.config.nai, hoa=self.config.home_address)
        if await self.link.carrier():
            self.solicit()
        await asyncio.gather(self.watch_link(), self.registration_loop())

    async def watch_link(self) -> None:
        """Netlink link events: carrier loss means we left the agent; carrier back means we
        are attached somewhere new, so ask for an advertisement straight away."""
        had_carrier = await self.link.carrier()
        async with AsyncIPRoute() as ipr:
            await ipr.bind()
            while True:
                async for msg in ipr.get():
                    if msg.get("event") != "RTM_NEWLINK" or msg.get_attr("IFLA_IFNAME") != self.config.interface:
                        continue
                    carrier = msg.get_attr("IFLA_CARRIER") == 1
                    if carrier == had_carrier:
                        continue
                    had_carrier = carrier
                    if carrier:
                        self.note("link.up")
                        background(self.solicit_until_heard())
                    else:
                        self.note("link.down")
                        self.agent = None
                        self.state = "detached"
                        self.kick.set()

    # ---- agent discovery -----------------------------------------------------------------
    def solicit(self) -> None:
        assert self.icmp is not None
        try:
            self.icmp.sendto(mip.AgentSolicitation().encode(), (ALL_ROUTERS, 0))
            self.counters["solicitations"] += 1
            self.note("solicitation.sent")
        except OSError as exc:
            log.debug("solicitation.failed", reason=exc)

    async def solicit_until_heard(self, tries: int = 3) -> None:
        """Solicit at once on a new link, and again (0.1 s, 0.2 s, 0.4 s later) until an
        advertisement arrives: the first one can go out before the new segment forwards
        (RFC 1256 allows up to three solicitations; we space them tighter than its 3 s
        because a handover is waiting on the answer)."""
        delay = 0.1
        for _ in range(tries + 1):
            self.solicit()
            await asyncio.sleep(delay)
            if self.agent is not None:
                return
            delay *= 2

    def on_icmp(self) -> None:
        assert self.icmp is not None
        try:
            got = read_icmp(self.icmp, mip.ICMP_ROUTER_ADVERTISEMENT)
            if got is None:
                return
            src, adv = got[0], mip.decode_icmp(got[1])
        except mip.DecodeError as exc:
            self.counters["malformed"] += 1
            log.debug("advertisement.malformed", reason=exc)
            return
        mobility = adv.mobility if isinstance(adv, mip.AgentAdvertisement) else None
        if mobility is None:
            return
        assert isinstance(adv, mip.AgentAdvertisement)
        home = bool(mobility.flags & mip.AdvFlag.H) and str(src) == str(self.config.home_agent)
        coa = str(mobility.care_of_addresses[0]) if mobility.care_of_addresses else str(src)
        agent = Agent(str(src), coa, home, adv.challenge, mobility.registration_lifetime, time.monotonic(),
                      adv.lifetime)
        new = self.agent is None or self.agent.address != agent.address
        self.agent = agent
        if new:
            self.note("agent.found", agent=agent.address, coa=agent.care_of_address, home=agent.home)
            self.kick.set()

    # ---- registration --------------------------------------------------------------------
    async def registration_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.kick.wait(), 0.25)
            self.kick.clear()
            agent = self.agent
            now = time.monotonic()
            if agent is None:
                continue
            if now - agent.heard > agent.lifetime:
                self.note("agent.lost", agent=agent.address)
                self.agent = None
                self.state = "detached"
                self.solicit()
                continue
            if agent.home:
                if self.state != "home":
                    await self.go_home(agent)
                continue
            renew_at = self.registered_until - max(2.0, 0.2 * (self.registered_until - now))
            if self.state != "registered" or self.registered_at != agent.address or now >= renew_at \
                    or self.service_update is not None:
                await self.register(agent)

    async def register(self, agent: Agent) -> None:
        self.state = "registering"
        await self.link.away(agent.address)
        reply = await self.exchange(agent, self.config.lifetime, str(agent.care_of_address), agent.address)
        self.service_update_answered(reply)
        if reply is None:
            self.state = "detached"
            return
        if reply.accepted:
            self.state = "registered"
            self.local_key = self.outstanding_local_key  # after a registration answered by anyone
            self.registered_at = agent.address
            self.registered_coa = agent.care_of_address
            self.registered_until = time.monotonic() + reply.lifetime
            self.note("registered", agent=agent.address, coa=agent.care_of_address, lifetime=reply.lifetime)
        else:
            self.state = "detached"
            self.registered_until = 0.0
            await asyncio.sleep(1.0)  # do not hammer an agent that said no

    async def go_home(self, agent: Agent) -> None:
        """Back on the home link: stop being mobile, then deregister all bindings
        (RFC 5944 §3.6.1.1: care-of address = home address, lifetime 0, straight to the HA)."""
        await self.link.home(agent.address)
        self.note("home", agent=agent.address)
        reply = await self.exchange(agent, 0, str(self.config.home_address), str(self.config.home_agent))
        if reply is not None and reply.accepted:
            self.state = "home"
            self.local_key = None
            self.registered_at = None
            self.registered_coa = None
            self.registered_until = 0.0
            self.note("deregistered")

    def request(self, agent: Agent, lifetime: int, coa: str) -> bytes:
        ident = mip.ntp_identification(time.time() + self.clock_offset)
        extensions: list[mip.Extension] = []  # after the NAI, before the authenticators
        moved = bool(self.registered_coa and self.registered_coa != coa and not agent.home)
        if moved:
            # Name the FA we were registered through, so the new one can tell it (F2/F6).
            extensions.append(mip.previous_fa_extension(self.registered_coa))
        self.service_update_sent = None
        if self.service_update is not None and not agent.home and lifetime > 0:
            # F7: ask the home AAA server to rebuild our VPN info from the changed profile.
            self.service_update_sent = self.service_update[0]
            extensions.append(service_update_extension(self.service_update_sent))
        assert self.config.mn_ha is not None
        # RFC 3012: answer an FA's challenge; the MN-AAA authenticator covers it.
        challenge = agent.challenge if agent.challenge and not agent.home else None
        mn_aaa = self.config.mn_aaa if challenge else None
        # Claim 17: on a move, prove our local-answer key to the local AAA (it, or the home AAA
        # server, answers: we cannot know which; the home side ignores the proof).
        local_key = self.local_key if moved and mn_aaa is not None and lifetime > 0 else None
        rrq = mip.registration_request(home_address=self.config.home_address, home_agent=self.config.home_agent,
                                       care_of_address=coa, identification=ident, lifetime=lifetime,
                                       nai=self.config.nai, extensions=extensions, mn_ha=self.config.mn_ha,
                                       challenge=challenge, mn_aaa=mn_aaa, local_key=local_key)
        self.outstanding_id = ident
        self.outstanding_local_key = None if mn_aaa is None else mip.registration_local_key(mn_aaa.key, rrq,
                                                                                             self.config.nai)
        return rrq.encode()

    async def exchange(self, agent: Agent, lifetime: int, coa: str, to: str) -> mip.RegistrationReply | None:
        """Send an RRQ and wait for its reply, retransmitting with exponential back-off
        (RFC 5944 §3.6.3); every retransmission is a new request with a new identification
        (and the latest challenge). A 133 resynchronises our clock and retries at once."""
        timeout = self.config.retransmit_initial
        while self.agent is agent or (self.agent and self.agent.address == agent.address):
            agent = self.agent or agent
            wire = self.request(agent, lifetime, coa)
            loop = asyncio.get_running_loop()
            self.reply = loop.create_future()
            assert self.udp is not None
            self.udp.send(wire, (to, mip.MIP_UDP_PORT))
            self.counters["requests"] += 1
            self.note("rrq.sent", agent=to, id=hex(self.outstanding_id or 0), lifetime=lifetime)
            try:
                reply = await asyncio.wait_for(self.reply, timeout)
            except TimeoutError:
                timeout = min(timeout * 2, self.config.retransmit_max)
                self.note("rrq.retransmit", next_timeout=timeout)
                continue
            self.last_code = int(reply.code)
            self.note("rrp.received", code=int(reply.code), lifetime=reply.lifetime, id=hex(reply.identification))
            if reply.code == mip.ReplyCode.HA_IDENTIFICATION_MISMATCH:
                self.clock_offset = mip.clock_offset(reply.identification, time.time())
                continue
            return reply
        return None

    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = mip.decode_message(data)
        except mip.DecodeError as exc:
            self.counters["malformed"] += 1
            log.warning("rrp.malformed", src=addr[0], reason=exc)
            return
        if not isinstance(reply, mip.RegistrationReply) or self.outstanding_id is None \
                or not mip.reply_matches_request(self.outstanding_id, reply.identification):
            self.counters["malformed"] += 1
            return
        # Replies from the HA carry MN-HA authentication; FA denials (64-127) cannot.
        assert self.config.mn_ha is not None
        authentic = mip.verify(data, mip.EXT_MN_HA_AUTH, self.config.mn_ha.key, spi=self.config.mn_ha.spi)
        if not authentic and not (64 <= int(reply.code) <= 127):
            self.counters["malformed"] += 1
            log.warning("rrp.auth_failed", src=addr[0], code=int(reply.code))
            return
        self.counters["replies"] += 1
        if self.reply and not self.reply.done():
            self.reply.set_result(reply)

    # ---- service update (F7, claim 24) ---------------------------------------------------
    async def request_service_update(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Control command ``service-update``: re-register at once with the service-update
        NVSE (the user changed a VPN profile) and answer with the registration's reply code."""
        agent = self.agent
        if agent is None or agent.home or self.state not in ("registered", "registering"):
            raise RuntimeError(f"not registered through a foreign agent (state {self.state}): "
                               "a service update rides on a registration")
        if self.service_update is None:
            self.service_update_seq = (self.service_update_seq + 1) & 0xFFFF
            self.service_update = (self.service_update_seq, asyncio.get_running_loop().create_future())
            self.note("service_update.requested", seq=self.service_update_seq)
        seq, outcome = self.service_update
        self.kick.set()
        code = await asyncio.wait_for(asyncio.shield(outcome), 4 * self.config.retransmit_max)
        return {"mn": self.config.nai, "sequence": seq, "code": code,
                "accepted": code in (mip.ReplyCode.ACCEPTED, mip.ReplyCode.ACCEPTED_NO_SIMULTANEOUS_BINDINGS),
                "agent": self.registered_at, "care_of_address": self.registered_coa}

    def service_update_answered(self, reply: mip.RegistrationReply | None) -> None:
        """A registration ended: if its request carried the pending service update, that is
        the update's outcome (reply code; -1: no reply, the agent is gone)."""
        pending, sent = self.service_update, self.service_update_sent
        if pending is None or sent != pending[0]:
            return
        self.service_update = None
        code = -1 if reply is None else int(reply.code)
        self.counters["service_updates"] += 1
        self.note("service_update.answered", seq=sent, code=code)
        if not pending[1].done():
            pending[1].set_result(code)

    # ---- show --------------------------------------------------------------------------
    def show(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"mn": self.config.nai, "home_address": str(self.config.home_address), "state": self.state,
                "agent": self.agent.address if self.agent else None,
                "care_of_address": self.agent.care_of_address if self.agent else None,
                "remaining": max(0, int(self.registered_until - now)) if self.state == "registered" else 0,
                "last_code": self.last_code}
