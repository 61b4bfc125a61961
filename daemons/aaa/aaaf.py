"""The local (foreign) AAA server (AAAF, claims 10-12, 16, 17): the Diameter agent of a
visited domain.

FAs dial it; it dials the home AAA server of every realm it serves visitors from and relays
their AMRs there by the NAI's realm (RFC 6733 relay: Route-Record, new hop-by-hop id). It is
a proxy in that it reads what it relays, through the Diameter node's hooks on relayed
messages (``observe``/``intercept``): from each successful AMA it caches the FA's VPN info
per user (:class:`daemons.aaa.sessions.Session`: NAI, Diameter session, the FA it belongs to, the
paths, and the local-answer key the AAAH adds for us) before the AMA goes on to the FA (claim
16), without that key. ``show sessions`` lists the cache without key material.

The cache is keyed by NAI and remembers the FA, so that an intra-domain move (claim 17) can
answer the new FA itself, ``session.with_fa(new_coa)``, once the MN proved the session's key
and the FA owns the care-of address (``answer_intra_domain_move``; docs/protocol.md, "Who
holds what, who proves what"). Messages are built and
parsed by ``daemons.aaa.application``; the hooks are handed the AMR itself (the answer hook
the relayed copy) and parse it where they need it.
"""

from __future__ import annotations

import time
from collections import Counter
from ipaddress import IPv4Address

from daemons.aaa import application
from daemons.aaa.sessions import Session, SessionStore
from daemons.diameter.node import wait_for_peers
from daemons.diameter.peer import Peer
from daemons.diameter.setup import Dial, diameter_node
from daemons.runtime.config import AAAFConfig, ConfigError, agent_seal_key
from daemons.runtime.control import ControlServer
from daemons.runtime.log import EventLog
from daemons.runtime.secret import Secret
from daemons.runtime.tasks import serve
from daemons.vpn.seal import Recipient, SealError
from daemons.wire import mip
from daemons.wire.diameter import Message, ResultCode
from daemons.wire.mip.vendor import requests_service_update

log = EventLog("mipvpn.aaaf")


class ForeignAAAServer:
    def __init__(self, config: AAAFConfig) -> None:
        if not config.home_servers:
            raise ConfigError(f"{config.node} (aaaf)", "home_servers", "at least one home AAA server is needed")
        self.config = config
        self.store = SessionStore(config.state_dir)
        self.counters: dict[str, int] = {"amr_relayed": 0, "ama_success": 0, "ama_failure": 0, "cached": 0,
                                         "answered_locally": 0, "request_refused": 0, "local_key_unopened": 0}
        self.control = ControlServer(config.control_socket)
        # We dial the home AAA servers (or relays); the FAs of accept_peers dial us, nobody else.
        self.diameter = diameter_node(
            config, host_ip_addresses=(str(config.address),), listen_address=str(config.address),
            listen_port=config.port, relay_timeout=config.relay_timeout,
            dial=[Dial.of(f"home_servers[{i}]", s) for i, s in enumerate(config.home_servers)])
        for server in config.home_servers:
            for realm in server.routes or [server.realm]:
                self.diameter.add_route(realm, server.host)
        self.fa_peers = {p.host.lower() for p in config.accept_peers if not p.agent}
        # Each FA's addresses: a care-of address it may answer for locally (claim 17).
        self.fa_addresses = {p.host.lower(): tuple(p.addresses) for p in config.accept_peers if not p.agent}
        self.local_answer_refused: Counter[str] = Counter()  # by reason
        # Our seal key: opens the local-answer keys the AAAH seals for us (and nothing else).
        own_key = agent_seal_key(config.seal, f"{config.node} (aaaf)", False, "")
        self.seal = Recipient(*own_key) if own_key else None
        # Hooks on what we relay, in this order: refuse AMRs and STRs from anyone but our FAs,
        # count and log every AMR (answered here or not), answer intra-domain moves and STRs
        # ourselves, cache VPN info from each AMA.
        app = application.APPLICATION_ID
        self.diameter.add_forward_hook(self.refuse_unless_from_fa, application_id=app)
        self.diameter.observe(app, application.AMR_COMMAND, on_request=self.on_amr, on_answer=self.on_ama)
        self.diameter.add_answer_hook(self.take_local_key, application_id=app, command_code=application.AMR_COMMAND)
        self.diameter.add_forward_hook(self.answer_intra_domain_move, application_id=app,
                                       command_code=application.AMR_COMMAND)
        self.diameter.intercept(app, application.STR_COMMAND, self.end_session)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.restore()
        await self.diameter.start()
        self.control.register("sessions", lambda _: self.store.show())
        self.control.register("counters", lambda _: {**self.counters, **self.diameter.stats(),
                                                     "local_answer_refused": dict(self.local_answer_refused)})
        self.control.register("peers", lambda _: self.diameter.peers_status())
        await wait_for_peers(self.diameter, [s.host for s in self.config.home_servers])
        await self.control.start()
        if self.seal is None:
            log.warning("aaaf.local_answers_off", reason="no seal key (seal): every intra-domain move goes to the AAAH")
        log.info("aaaf.ready", host=self.config.diameter_host, realm=self.config.diameter_realm,
                 port=self.diameter.port,
                 realms=",".join(r for s in self.config.home_servers for r in s.routes or [s.realm]),
                 sessions=len(self.store.sessions))

    def restore(self) -> None:
        """The cached sessions, record by record (one that cannot be read is dropped, logged
        and deleted: ``daemons.store.records``)."""
        self.store.load()
        self.counters["state_dropped"] = self.store.state.dropped
        if self.store.sessions or self.store.state.dropped:
            log.info("aaaf.restored", sessions=len(self.store.sessions), dropped=self.store.state.dropped)

    async def stop(self) -> None:
        await self.control.stop()
        await self.diameter.stop()

    async def run(self) -> None:
        await serve(self.start, self.stop)

    # ---- what goes through -------------------------------------------------------------------
    def refuse_unless_from_fa(self, msg: Message, peer: Peer) -> Message | None:
        """AMRs and STRs come from our FAs (accept_peers), on their own connection: from any other
        peer (a home server or relay we dial) they are answered 5003 and go no further."""
        if not peer.dynamic and peer.key in self.fa_peers:
            return None
        self.counters["request_refused"] += 1
        log.warning("request.refused", cmd=msg.name, mn=msg.get("User-Name"), sid=msg.session_id, peer=peer.host,
                    reason="not an FA of this AAAF")
        return msg.answer(ResultCode.DIAMETER_AUTHORIZATION_REJECTED, [("Error-Message", "not an FA of this AAAF")])

    def on_amr(self, msg: Message) -> None:
        self.counters["amr_relayed"] += 1
        log.info("amr.received", mn=msg.get("User-Name"), sid=msg.session_id, fa=msg.get("Origin-Host"),
                 realm=msg.get("Destination-Realm"))

    def on_ama(self, msg: Message, answer: Message) -> None:
        """Cache the FA's VPN info of a successful registration before the AMA goes on."""
        nai = msg.get("User-Name")
        sid = msg.session_id or ""
        code = int(answer.result_code or 0)
        if code != ResultCode.DIAMETER_SUCCESS or not nai:
            self.counters["ama_failure"] += 1
            log.info("ama.relayed", mn=nai, sid=sid, result=code, cached=False)
            return
        self.counters["ama_success"] += 1
        try:
            amr = application.parse_amr(msg)
            ama = application.parse_ama(answer, nai)
        except application.ApplicationError as exc:
            log.warning("ama.relayed", mn=nai, sid=sid, result=code, cached=False, reason=str(exc))
            return
        rrq = amr.rrq
        if rrq.is_deregistration:
            self.store.drop(nai)
            log.info("ama.relayed", mn=nai, sid=sid, result=code, cached=False, reason="deregistration")
            return
        infos = ama.vpn
        session = Session(nai, sid, rrq.care_of_address, amr.origin_host or "", rrq.home_agent,
                          rrq.home_address, tuple(infos), time.time(), local_key=self.open_local_key(ama, nai, sid))
        previous = self.store.put(session)
        self.counters["cached"] += 1
        log.info("ama.relayed", mn=nai, sid=sid, result=code, cached=True, fa=session.fa, paths=len(infos),
                 previous_fa=previous.fa if previous is not None and previous.fa != session.fa else None)

    # ---- the local answer (claim 17, flow F2; issue #15) -------------------------------------------
    def answer_intra_domain_move(self, msg: Message, peer: Peer) -> Message | None:
        """Claim 17 (flow F2): the MN moved between two FAs of our domain. Its RRQ names the
        previous FA, whose session we cached: rewrite the cached VPN info to the new FA and
        answer the new FA ourselves (no AMR reaches the home AAA server); the new FA then
        sends the RRQ straight to the HA, which rewrites its side.

        Only for a request we can authenticate, checked in this order before anything changes
        (docs/protocol.md, "Who holds what, who proves what"): the AMR comes from one of our FAs,
        the RRQ's care-of address is one of that FA's addresses (``accept_peers``), we hold a
        session of the user at the named previous FA, the RRQ answers an FA challenge, and its
        MN-AAAF authenticator verifies under the key the AAAH gave us for that session. Any
        failure: relayed to the home AAA server like any other AMR (which checks MN-AAA itself),
        counted and logged (``local_answer_refused``), the cache untouched."""
        nai = msg.get("User-Name")
        session = self.store.sessions.get(nai) if nai else None
        try:
            amr = application.parse_amr(msg)
        except application.ApplicationError:
            return None
        rrq = amr.rrq
        if rrq.is_deregistration:
            return None
        if requests_service_update(rrq.extensions):
            # F7: the user changed their profile; only the home AAA server can rebuild the VPN
            # info from it, so our cached copy must not answer (relayed like any other AMR).
            log.info("amr.not_answered_locally", mn=nai, sid=amr.session_id, reason="service update")
            return None
        # A move names its previous FA where the MN-HA authenticator covers it (as the FA reads it).
        previous = mip.previous_fa(mip.covered(rrq, mip.EXT_MN_HA_AUTH).extensions)
        if previous is None or previous == rrq.care_of_address:
            return None  # not a move: nothing we could answer
        checked = self.check_local_answer(amr, peer, session, previous)
        if isinstance(checked, str):
            self.refuse_local_answer(amr, peer, checked)
            return None
        assert session is not None
        key, next_key = checked
        moved = session.with_fa(rrq.care_of_address, amr.session_id, amr.origin_host or "")
        moved = moved.with_local_keys(next_key, key)
        self.store.put(moved)
        self.counters["answered_locally"] += 1
        log.info("amr.answered_locally", mn=nai, sid=amr.session_id, previous_fa=session.fa,
                 fa=moved.fa, paths=len(moved.for_fa()))
        return application.build_ama(amr, ResultCode.DIAMETER_SUCCESS, vpn=moved.for_fa())

    def check_local_answer(self, amr: application.Amr, peer: Peer, session: Session | None,
                           previous: IPv4Address) -> tuple[Secret, Secret] | str:
        """The checks of :meth:`answer_intra_domain_move`, changing nothing: (the key the MN
        proved, the next key it carries) or why not."""
        rrq = amr.rrq
        addresses = self.fa_addresses.get(peer.key) if not peer.dynamic else None
        if addresses is None:
            return "not an FA of this AAAF"
        if not any(rrq.care_of_address in net for net in addresses):
            return "care-of address not the FA's"
        if session is None:
            return "no cached session"
        # The move we cached is from the named previous FA, or it is this very move again (the
        # MN retransmitted before the first answer reached it): answer both the same way; the
        # retransmission is proven with the key the first one was (the MN changes keys only
        # once a registration is accepted).
        if session.fa not in (previous, rrq.care_of_address) or rrq.home_agent != session.home_agent \
                or not session.for_fa():
            return "no cached session at the previous FA"
        if rrq.find(mip.MNFAChallengeExtension) is None:
            return "no FA challenge"
        key = session.local_key if session.fa == previous else session.previous_local_key
        if key is None:
            return "no local-answer key"
        if not mip.has_local_answer_proof(rrq):
            return "no MN-AAAF authenticator"
        try:
            proof = mip.verify_local_answer(amr.rrq_raw, key)
        except mip.DecodeError:
            proof = None
        if proof is None:
            return "MN-AAAF authenticator mismatch"
        # What the authenticator vouches for is what we act on (the same request, cut after it).
        vouched = proof.request
        if mip.previous_fa(vouched.extensions) != previous or vouched.find(mip.MNFAChallengeExtension) is None:
            return "MN-AAAF authenticator does not cover the move"
        return key, proof.next_key

    def refuse_local_answer(self, amr: application.Amr, peer: Peer, reason: str) -> None:
        self.local_answer_refused[reason] += 1
        benign = reason in ("no cached session", "no cached session at the previous FA")
        log.event("local_answer.refused", mn=amr.nai, sid=amr.session_id, peer=peer.host,
                  coa=amr.rrq.care_of_address, reason=reason, level=20 if benign else 30)

    def open_local_key(self, ama: application.Ama, nai: str, sid: str) -> Secret | None:
        """The local-answer key the AAAH sealed for us in this AMA (None: it sent none, or it
        does not open — then this user's moves go to the AAAH)."""
        if ama.local_key is None or self.seal is None:
            return None
        try:
            return self.seal.open_secret(application.local_key_context(nai, sid), ama.local_key)
        except SealError as exc:
            self.counters["local_key_unopened"] += 1
            log.warning("local_key.unopened", mn=nai, sid=sid, reason=str(exc))
            return None

    def take_local_key(self, msg: Message, answer: Message) -> None:
        """The AAAH's local-answer key is ours (``on_ama`` cached it): the FA must not see it."""
        if application.take_local_key(answer):
            log.debug("ama.local_key_removed", mn=msg.get("User-Name"), sid=msg.session_id)

    def end_session(self, msg: Message) -> Message:
        """An FA's STR: the user left it. Drop our cached session if it is that one and that
        FA's (after an intra-domain move the cache already belongs to the new FA's session: keep
        it; another FA naming the session id ends nothing). The home AAA server is not
        bothered: its session follows the user's latest registration."""
        str_ = application.parse_str(msg)
        nai = str_.nai
        session = self.store.sessions.get(nai) if nai else None
        # Origin-Host is the FA's own: the engine answers 5004 to an FA claiming another's.
        owner = "" if session is None else session.fa_host.lower()
        dropped = session is not None and session.session_id == str_.session_id \
            and owner in ("", str(msg.get("Origin-Host") or "").lower())
        if dropped:
            self.store.drop(nai)
        log.info("session.terminated", mn=nai, sid=str_.session_id, dropped=dropped)
        return application.build_sta(msg)

    def sessions_at(self, fa_host: str) -> list[Session]:
        """The cached sessions that belong to one FA (by its Diameter identity)."""
        return [s for s in self.store.sessions.values() if s.fa_host.lower() == fa_host.lower()]


__all__ = ["ForeignAAAServer"]
