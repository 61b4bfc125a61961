"""The AAAF's local answer (claim 17, flow F2) only for a move it can authenticate (issue #15).

Over the real AAA chain on loopback (tests.unit.test_aaa: the AAAH and the AAAF are the real
objects, the two FAs of the visited domain and the HA bare Diameter nodes): the AAAH hands the
AAAF a per-registration key in the AMA (and the FA never sees it), the MN proves it in its next
move (the MN-AAAF authenticator, ``daemons.wire.mip.localanswer``), the AAAF answers only then,
from the FA that owns the care-of address, and rolls the key over; a forged intra-domain AMR
gets nothing from the cache and changes nothing, it goes to the AAAH instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from daemons.aaa import application
from daemons.aaa.aaaf import ForeignAAAServer
from daemons.agents.mn import MobileNode
from daemons.runtime.config import SecurityAssociation
from daemons.runtime.log import EventFormatter
from daemons.runtime.secret import Secret
from daemons.store.records import read_rows
from daemons.vpn import seal, vpninfo
from daemons.wire import mip
from daemons.wire.diameter import Message, ResultCode
from tests.unit.sealkit import seal_key
from tests.unit.test_aaa import (
    AAAF_HOST,
    COA,
    COA2,
    HA_ADDR,
    HOA,
    MN_AAA,
    MN_HA,
    NAI,
    SPI_MN_AAA,
    SPI_MN_HA,
    World,
    run,
    world,
)
from tests.unit.test_mn_service_update import fa as advertised_agent
from tests.unit.test_mn_service_update import node as mobile_node

KEY_AVP = "VPN-Local-Answer-Key"


@pytest.fixture
def event_log(caplog: pytest.LogCaptureFixture) -> Any:
    """Every log line of the test as the daemons write it (DEBUG included)."""
    caplog.set_level(logging.DEBUG)
    fmt = EventFormatter()
    return lambda: "\n".join(fmt.format(r) for r in caplog.records)
ELSEWHERE = IPv4Address("198.18.3.1")  # an FA of another domain


def key_of(challenge: bytes) -> Secret:
    """What the MN (and the AAAH) derive once a registration answering ``challenge`` is accepted."""
    return mip.local_answer_key(MN_AAA, NAI, challenge, HA_ADDR)


def rrq(coa: IPv4Address, challenge: bytes, *, previous: IPv4Address | None = None, local_key: Secret | None = None,
        mn_aaa: Secret = MN_AAA) -> bytes:
    """The MN's RRQ (as daemons.agents.mn builds it: the one RRQ builder)."""
    return mip.registration_request(
        home_address=HOA, home_agent=HA_ADDR, care_of_address=coa, identification=mip.ntp_identification(time.time()),
        lifetime=300, nai=NAI, extensions=[mip.previous_fa_extension(previous)] if previous else [],
        mn_ha=SecurityAssociation(SPI_MN_HA, MN_HA), challenge=challenge,
        mn_aaa=SecurityAssociation(SPI_MN_AAA, mn_aaa), local_key=local_key).encode()


def fresh() -> bytes:
    return secrets.token_bytes(16)  # an FA's challenge (its format does not matter to the AAA)


def answered_locally(ama: Message) -> bool:
    return ama.result_code == ResultCode.DIAMETER_SUCCESS and ama.get("MIP-Reg-Reply") is None \
        and bool(ama.find_all("VPN-Info"))


def stored_sessions(w: World) -> dict[str, Any]:
    """The AAAF's session records as its store holds them (read by another connection)."""
    return read_rows(w.aaaf.config.state_dir / "sessions.db", "sessions")


async def registered_at_fa1(w: World) -> bytes:
    """F1 through fa1: the challenge it answered."""
    c1 = fresh()
    _, ama = await w.register(rrq(COA, c1))
    assert ama.result_code == ResultCode.DIAMETER_SUCCESS and ama.get("MIP-Reg-Reply") is not None
    return c1


# ---- the key: AAAH -> AAAF, never to the FA ---------------------------------------------------------


def test_the_aaah_hands_the_aaaf_the_key_and_the_fa_never_sees_it(tmp_path: Path, event_log: Any) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            c1 = fresh()
            _, ama = await w.register(rrq(COA, c1))
            assert ama.result_code == ResultCode.DIAMETER_SUCCESS
            key = key_of(c1)
            # As it left the AAAH: the key of this registration, sealed for the AAAF (a relay on
            # the way, and the FA, could not read it), bound to the user and the session.
            (sent,) = w.amas_from_aaah
            assert sent.find(KEY_AVP) is not None and key.reveal() not in sent.encode()
            context = application.local_key_context(NAI, sent.session_id or "")
            assert seal.unseal_secret(seal_key(AAAF_HOST), AAAF_HOST, context, sent.get(KEY_AVP)) == key
            with pytest.raises(seal.SealError):  # another session's, or another AAA's
                seal.unseal_secret(seal_key(AAAF_HOST), AAAF_HOST, context + b"x", sent.get(KEY_AVP))
            with pytest.raises(seal.SealError):
                seal.unseal_secret(seal_key("aaaf2.visit-b.example"), "aaaf2.visit-b.example", context,
                                   sent.get(KEY_AVP))
            # As it reached the FA: the AVP is gone, and so is every byte of the key.
            assert ama.find(KEY_AVP) is None and key.reveal() not in ama.encode()
            cached = w.aaaf.store.get(NAI)
            assert cached is not None and cached.local_key == key and cached.previous_local_key is None

            # Persisted with the session (the 0600 state file), restored after a restart ...
            assert key.reveal().hex() in json.dumps(stored_sessions(w))
            again = ForeignAAAServer(w.aaaf.config)
            again.store.load()
            assert again.store.get(NAI) == cached and again.store.get(NAI).local_key == key  # type: ignore[union-attr]
            # ... but never shown nor logged.
            rows = await asyncio.to_thread(w.show, "aaaf")
            shown = json.dumps(rows)
            assert key.reveal().hex() not in shown and "key" not in shown.lower()
            assert key.reveal().hex() not in event_log() and repr(cached).count("Secret(***)") >= 1

    run(main())


# ---- a real MN moving between the two FAs of the domain ---------------------------------------------


def test_a_real_move_is_answered_locally_and_the_key_rolls_over(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            c1 = await registered_at_fa1(w)
            amrs, hars = len(w.amrs_at_aaah), len(w.ha.hars)

            # fa1 -> fa2: proven with the key of the registration at fa1; answered by the AAAF.
            c2 = fresh()
            _, ama = await w.register(rrq(COA2, c2, previous=COA, local_key=key_of(c1)), via=w.fa2)
            assert answered_locally(ama), ama
            assert {i.path.local.address for i in vpninfo.from_message(ama, NAI)} == {COA2}
            assert ama.find(KEY_AVP) is None
            session = w.aaaf.store.get(NAI)
            assert session is not None and session.fa == COA2
            # The next key is the one the MN derives once this move is accepted.
            assert session.local_key == key_of(c2) and session.previous_local_key == key_of(c1)

            # The MN retransmits the same move (new identification, the FA's latest challenge),
            # still with the key it holds: answered the same way.
            c2b = fresh()
            _, ama = await w.register(rrq(COA2, c2b, previous=COA, local_key=key_of(c1)), via=w.fa2)
            assert answered_locally(ama)
            session = w.aaaf.store.get(NAI)
            assert session.local_key == key_of(c2b) and session.previous_local_key == key_of(c1)  # type: ignore[union-attr]

            # fa2 -> fa1, the second local move: proven with the rolled-over key.
            c3 = fresh()
            _, ama = await w.register(rrq(COA, c3, previous=COA2, local_key=key_of(c2b)))
            assert answered_locally(ama)
            session = w.aaaf.store.get(NAI)
            assert session is not None and session.fa == COA and session.local_key == key_of(c3)
            assert (len(w.amrs_at_aaah), len(w.ha.hars)) == (amrs, hars)  # the home side never asked
            assert w.aaaf.counters["answered_locally"] == 3 and not w.aaaf.local_answer_refused

            # A key already rolled over proves nothing any more: that move goes to the AAAH.
            _, ama = await w.register(rrq(COA2, fresh(), previous=COA, local_key=key_of(c1)), via=w.fa2)
            assert ama.get("MIP-Reg-Reply") is not None and len(w.amrs_at_aaah) == amrs + 1
            assert w.aaaf.local_answer_refused == {"MN-AAAF authenticator mismatch": 1}

    run(main())


def test_after_a_move_the_aaah_answered_both_ends_hold_the_same_fresh_key(tmp_path: Path) -> None:
    """The MN cannot tell who answered its move. Arriving from another domain (F3: the AAAF
    knows neither its previous FA nor its key), the proof goes to the AAAH inside the RRQ (after
    MN-AAA, which still verifies); the AAAH's fresh key is what the MN derives, so the next
    move inside the domain is answered locally."""

    async def main() -> None:
        async with world(tmp_path) as w:
            c1 = fresh()
            raw = rrq(COA, c1, previous=ELSEWHERE, local_key=Secret(secrets.token_bytes(32)))
            _, ama = await w.register(raw)
            assert ama.result_code == ResultCode.DIAMETER_SUCCESS and ama.get("MIP-Reg-Reply") is not None
            assert w.amrs_at_aaah[-1].get("MIP-Reg-Request") == raw and w.ha.hars[-1].get("MIP-Reg-Request") == raw
            assert w.aaaf.store.get(NAI).local_key == key_of(c1)  # type: ignore[union-attr]
            assert w.aaaf.local_answer_refused == {"no cached session": 1}

            amrs = len(w.amrs_at_aaah)
            _, ama = await w.register(rrq(COA2, fresh(), previous=COA, local_key=key_of(c1)), via=w.fa2)
            assert answered_locally(ama) and len(w.amrs_at_aaah) == amrs

    run(main())


def test_a_session_cached_without_a_key_is_not_answered_locally(tmp_path: Path) -> None:
    """A session cached before the AAAH sent keys (a state file of an older version): the move
    goes to the AAAH, which gives the AAAF the key for the next one."""

    async def main() -> None:
        async with world(tmp_path) as w:
            c1 = await registered_at_fa1(w)
            w.aaaf.store.put(w.aaaf.store.get(NAI).with_local_keys(None, None))  # type: ignore[union-attr]
            c2 = fresh()
            _, ama = await w.register(rrq(COA2, c2, previous=COA, local_key=key_of(c1)), via=w.fa2)
            assert ama.get("MIP-Reg-Reply") is not None
            assert w.aaaf.local_answer_refused == {"no local-answer key": 1}
            assert w.aaaf.store.get(NAI).local_key == key_of(c2)  # type: ignore[union-attr]
            _, ama = await w.register(rrq(COA, fresh(), previous=COA2, local_key=key_of(c2)))
            assert answered_locally(ama)

    run(main())


# ---- forged intra-domain AMRs ----------------------------------------------------------------------


FORGERIES = ["no proof", "wrong proof", "proof under the key of another user", "not the sender's care-of address"]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_intra_domain_amr_gets_nothing_and_changes_nothing(tmp_path: Path, forgery: str) -> None:
    """fa2, a configured FA of the domain, sends an AMR naming the user's NAI, the cached FA as
    previous FA and the HA. Without the MN's proof (it does not hold the MN-AAA key either), or
    with a proof of someone else's, or for a care-of address that is not its own (the MN's
    genuine RRQ, captured on fa1's link): no VPN info, no key, the cache as it was (in memory
    and on disk); the AMR goes on to the AAAH, which refuses it."""

    async def main() -> None:
        async with world(tmp_path) as w:
            c1 = await registered_at_fa1(w)
            before, on_disk = dict(w.aaaf.store.sessions), stored_sessions(w)
            amrs, hars = len(w.amrs_at_aaah), len(w.ha.hars)
            forger_key = Secret(b"not-the-mn-aaa-secret")
            expected = ResultCode.DIAMETER_AUTHENTICATION_REJECTED
            if forgery == "no proof":
                raw, reason = rrq(COA2, fresh(), previous=COA, mn_aaa=forger_key), "no MN-AAAF authenticator"
            elif forgery == "wrong proof":
                raw = rrq(COA2, fresh(), previous=COA, mn_aaa=forger_key, local_key=Secret(secrets.token_bytes(32)))
                reason = "MN-AAAF authenticator mismatch"
            elif forgery == "proof under the key of another user":
                other = mip.local_answer_key(MN_AAA, "mn9@home.example", c1, HA_ADDR)
                raw = rrq(COA2, fresh(), previous=COA, mn_aaa=forger_key, local_key=other)
                reason = "MN-AAAF authenticator mismatch"
            else:
                # The MN's own move to fa1's neighbour ... sent by fa1, which does not own that
                # address. The AAAH checks MN-AAA (genuine) and asks the HA, which refuses a
                # replayed identification (RFC 5944 §5.7); the fake HA is told to.
                raw, reason = rrq(COA2, fresh(), previous=COA, local_key=key_of(c1)), "care-of address not the FA's"
                w.ha.mode, expected = "refuse", ResultCode.DIAMETER_ERROR_MIP_REPLY_FAILURE
            via = w.fa if forgery == "not the sender's care-of address" else w.fa2
            _, ama = await w.register(raw, via=via)

            assert ama.result_code == expected, ama
            assert ama.find("VPN-Info") is None and ama.find(KEY_AVP) is None
            key = key_of(c1).reveal()
            assert key not in ama.encode()
            assert w.aaaf.store.sessions == before and stored_sessions(w) == on_disk
            assert len(w.amrs_at_aaah) == amrs + 1 and w.amrs_at_aaah[-1].get("MIP-Reg-Request") == raw
            if expected == ResultCode.DIAMETER_AUTHENTICATION_REJECTED:
                assert len(w.ha.hars) == hars
            assert w.aaaf.counters["answered_locally"] == 0
            assert w.aaaf.local_answer_refused == {reason: 1}
            counters = await asyncio.to_thread(w.show, "aaaf", "counters")
            assert counters["local_answer_refused"] == {reason: 1}

            # The real MN's move afterwards still gets its local answer.
            w.ha.mode = "accept"
            _, ama = await w.register(rrq(COA2, fresh(), previous=COA, local_key=key_of(c1)), via=w.fa2)
            assert answered_locally(ama)

    run(main())


def test_a_proof_does_not_survive_being_moved_to_another_request(tmp_path: Path) -> None:
    """The authenticator covers the whole request before it: the MN's proof cut from its RRQ and
    pasted onto another (another care-of address, here fa2's own) verifies nothing."""

    async def main() -> None:
        async with world(tmp_path) as w:
            c1 = await registered_at_fa1(w)
            genuine = mip.decode_message(rrq(IPv4Address("198.18.2.9"), fresh(), previous=COA, local_key=key_of(c1)))
            proof = genuine.extensions[-1]
            forged = mip.decode_message(rrq(COA2, fresh(), previous=COA, mn_aaa=Secret(b"x" * 16)))
            raw = forged.with_extensions(proof).encode()
            before = dict(w.aaaf.store.sessions)
            _, ama = await w.register(raw, via=w.fa2)
            assert ama.result_code == ResultCode.DIAMETER_AUTHENTICATION_REJECTED and ama.find("VPN-Info") is None
            assert w.aaaf.store.sessions == before
            assert w.aaaf.local_answer_refused == {"MN-AAAF authenticator mismatch": 1}

    run(main())


# ---- the wire format and the MN ---------------------------------------------------------------------


def test_the_proof_follows_mn_aaa_and_the_home_checks_are_unchanged() -> None:
    key, challenge = Secret(secrets.token_bytes(32)), fresh()
    wire = rrq(COA2, challenge, previous=COA, local_key=key)
    msg = mip.decode_message(wire)
    kinds = [type(e).__name__ for e in msg.extensions]
    assert kinds == ["NAIExtension", "NVSEExtension", "MNHAAuthExtension", "MNFAChallengeExtension",
                     "GeneralizedAuthExtension", "NVSEExtension"]
    last = msg.extensions[-1]
    assert (last.vendor_id, last.vendor_type, len(last.data)) == (32473, mip.VENDOR_TYPE_LOCAL_ANSWER, 56)
    assert mip.verify(wire, mip.EXT_MN_HA_AUTH, MN_HA, spi=SPI_MN_HA)
    assert mip.verify(wire, mip.EXT_GEN_AUTH, MN_AAA, spi=SPI_MN_AAA)
    # The FA sending it straight to the HA cuts it off with the rest after MN-HA.
    assert not mip.has_local_answer_proof(mip.decode_message(mip.strip_after(wire, mip.EXT_MN_HA_AUTH)))

    proof = mip.verify_local_answer(wire, key)
    assert proof is not None and proof.next_key == key_of(challenge) and "Secret" not in repr(proof)
    assert mip.verify_local_answer(wire, Secret(secrets.token_bytes(32))) is None
    # Every covered octet counts (fixed part, extensions, the wrapped key) ...
    for i in range(len(wire) - mip.LOCAL_ANSWER_AUTH_LEN):
        tampered = bytearray(wire)
        tampered[i] ^= 0x01
        try:
            assert mip.verify_local_answer(bytes(tampered), key) is None, i
        except mip.DecodeError:
            pass
    # ... what follows it does not, and is not vouched for.
    trailing = mip.decode_message(wire).with_extensions(mip.previous_fa_extension(ELSEWHERE)).encode()
    vouched = mip.verify_local_answer(trailing, key)
    assert vouched is not None and mip.previous_fa(vouched.request.extensions) == COA
    assert len(vouched.request.extensions) == len(msg.extensions)


def test_the_mn_proves_its_key_on_a_move_and_takes_the_next_one(tmp_path: Path) -> None:
    mn: MobileNode = mobile_node(tmp_path)
    agent = advertised_agent()
    mn_aaa = mn.config.mn_aaa
    assert mn_aaa is not None

    # First registration: no key yet, so no proof; the one its acceptance brings is ready.
    first = mip.decode_message(mn.request(agent, 300, agent.care_of_address))
    assert not mip.has_local_answer_proof(first)
    assert mn.outstanding_local_key == mip.local_answer_key(mn_aaa.key, mn.config.nai, agent.challenge,
                                                            mn.config.home_agent)
    held = Secret(secrets.token_bytes(32))
    mn.local_key, mn.registered_coa = held, "198.18.0.18"  # registered through another FA before
    wire = mn.request(agent, 300, agent.care_of_address)
    proof = mip.verify_local_answer(wire, held)
    assert proof is not None and proof.next_key == mn.outstanding_local_key
    # Re-registering where it is, or deregistering, is no move: no proof.
    mn.registered_coa = agent.care_of_address
    assert not mip.has_local_answer_proof(mip.decode_message(mn.request(agent, 300, agent.care_of_address)))
    mn.registered_coa = "198.18.0.18"
    assert not mip.has_local_answer_proof(mip.decode_message(mn.request(agent, 0, agent.care_of_address)))
