"""No key in clear between the AAA servers and the agents (issue 15): the AAAH seals every
path's keys for the agent that installs it (daemons.vpn.seal); the AAAF caches and re-answers
them (claim 17) without being able to read them, and any FA of its domain opens them. Over the
real AAAH and AAAF on loopback (tests.unit.test_aaa's world)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from daemons.aaa.aaah import HomeAAAServer
from daemons.aaa.sessions import Session
from daemons.vpn import vpninfo
from daemons.vpn.seal import Keyring, SealError
from daemons.wire.diameter import Message, ResultCode
from tests.unit.sealkit import key_files, opened, seal_key
from tests.unit.test_aaa import COA, HA_HOST, NAI, VISIT, aaah_config, fa_paths, ha_paths, run, world
from tests.unit.test_service_update_aaa import COA2, key_of, rrq

CLEAR = {"VPN-Key-In", "VPN-Key-Out", "VPN-IKE-PSK"}


def key_material(infos: list[vpninfo.VpnInfo]) -> list[bytes]:
    """Every ESP key and PSK of open paths."""
    out = []
    for info in infos:
        sec = info.path.security
        assert isinstance(sec, vpninfo.SecurityService)
        for keys in (sec.inbound, sec.outbound):
            if keys is not None:
                out += [keys.enc_key.reveal(), *([keys.auth_key.reveal()] if keys.auth_key else [])]
        if sec.psk is not None:
            out.append(sec.psk.reveal())
    return out


def session_keys(session: Session) -> list[bytes]:
    return key_material(list(session.paths))


def leaked(keys: list[bytes], data: bytes) -> list[int]:
    """Which keys (by index, never by value) occur in ``data``, raw or as hex."""
    return [i for i, k in enumerate(keys) if k in data or k.hex().encode() in data]


def vpn_members(msg: Message) -> list[list[str]]:
    return [[a.name for a in info.value] for info in msg.find_all("VPN-Info")]


def test_ama_and_har_carry_no_key_in_clear(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            _, ama = await w.register(rrq(COA))
            assert ama.result_code == ResultCode.DIAMETER_SUCCESS
            session = w.aaah.store.get(NAI)
            assert session is not None
            keys = session_keys(session)
            assert len(keys) == 3 * 3  # three paths: two ESP keys and a PSK each
            (har,) = w.ha.hars
            for msg in (ama, har):
                assert leaked(keys, msg.encode()) == []
                members = vpn_members(msg)
                assert members and all("VPN-Sealed-Keys" in m and not CLEAR & set(m) for m in members)
            # Still what each agent needs: the FA's domain opens its paths, the HA its own, the CN-GW its copy.
            assert sorted(i.path_id for i in fa_paths(ama)) == [1, 3]
            assert sorted(i.path_id for i in ha_paths(har)) == [1, 2, 3]
            # The AAAF's cache (memory and its state file) holds the sealed copies only.
            cached = w.aaaf.store.get(NAI)
            assert cached is not None and cached.paths and all(i.sealed for i in cached.paths)
            assert leaked(keys, w.aaaf.store.path.read_bytes()) == []

    run(main())


def test_aaaf_re_answers_an_intra_domain_move_it_cannot_read_and_fa2_opens_it(tmp_path: Path) -> None:
    """Claim 17: FA1 -> FA2 in the same domain; the AAAF answers from its cache, the FA end
    rewritten, the keys still sealed for the domain's FAs: FA2 opens them (the same keys FA1
    got), another domain's FAs cannot, and no AMR reaches the AAAH."""

    async def main() -> None:
        async with world(tmp_path) as w:
            _, first = await w.register(rrq(COA))
            at_fa1 = {i.path_id: i for i in fa_paths(first)}
            keys = key_material(list(at_fa1.values()))
            amrs, hars = len(w.amrs_at_aaah), len(w.ha.hars)
            # The MN proves the AAAH's local-answer key of its first registration; fa2 owns COA2.
            move = rrq(COA2, previous=COA, challenge=bytes(range(1, 17)), local_key=key_of(bytes(range(16))))
            _, local = await w.register(move, via=w.fa2)
            assert local.result_code == ResultCode.DIAMETER_SUCCESS and local.get("MIP-Reg-Reply") is None
            assert (len(w.amrs_at_aaah), len(w.ha.hars)) == (amrs, hars)  # answered by the AAAF itself
            assert w.aaaf.counters["answered_locally"] == 1
            assert leaked(keys, local.encode()) == []
            carried = vpninfo.from_message(local, NAI)
            assert carried and all(i.sealed for i in carried)  # the AAAF passed on what it cannot open
            at_fa2 = {i.path_id: i for i in opened(VISIT, carried)}
            assert sorted(at_fa2) == sorted(at_fa1)
            for path_id, info in at_fa2.items():
                assert info.path.local.address == COA2 and info.path.security == at_fa1[path_id].path.security
            with pytest.raises(SealError):
                opened("visit-b.example", carried)
            cached = w.aaaf.store.get(NAI)
            assert cached is not None and cached.fa == COA2 and all(i.sealed for i in cached.paths)
            assert leaked(keys, w.aaaf.store.path.read_bytes()) == []

    run(main())


def test_aaah_without_a_seal_key_for_the_fas_domain_answers_5025(tmp_path: Path) -> None:
    """RFC 4004 DIAMETER_ERROR_END_TO_END_MIP_KEY_ENCRYPTION: keys that cannot be delivered
    sealed are not delivered at all; the HA is not asked, nothing is cached."""

    async def main() -> None:
        async with world(tmp_path) as w:
            # The same server holding no key for the FA's domain (the HA's and the CN-GW's only).
            w.aaah.seal_keys = Keyring({name: seal_key(name) for name in (HA_HOST, "cngw2")})
            _, ama = await w.register(rrq(COA))
            assert ama.result_code == ResultCode.DIAMETER_ERROR_END_TO_END_MIP_KEY_ENCRYPTION
            assert ama.find("VPN-Info") is None and w.ha.hars == [] and w.aaah.store.sessions == {}
            assert w.aaah.counters["seal_no_key"] == 1

    run(main())


def test_ha_refusing_its_sealed_keys_ends_in_an_ama_4007(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, ha_mode="bad-key") as w:
            _, ama = await w.register(rrq(COA))
            assert ama.result_code == ResultCode.DIAMETER_ERROR_BAD_KEY and ama.find("VPN-Info") is None
            assert w.aaah.counters["ha_bad_key"] == 1 and w.aaah.store.sessions == {}
            assert w.aaaf.store.sessions == {}

    run(main())


def test_aaah_refuses_to_start_without_a_seal_key_for_each_home_agent(tmp_path: Path) -> None:
    from daemons.runtime.config import ConfigError

    config = dataclasses.replace(aaah_config(tmp_path, "sqlite:///x.db", 3868), seal_keys=key_files(tmp_path, VISIT))
    with pytest.raises(ConfigError, match=r"seal_keys: no seal key for home agent ha.home.example"):
        HomeAAAServer(config)
    loose = key_files(tmp_path, HA_HOST)
    loose[0].key_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"seal_keys\[0\]\.key_file: .*mode 0644"):
        HomeAAAServer(dataclasses.replace(config, seal_keys=loose))
    twice = [*key_files(tmp_path, HA_HOST), *key_files(tmp_path / "again", HA_HOST.upper())]
    with pytest.raises(ConfigError, match=r"seal_keys\[1\]\.name: .* has a seal key already"):
        HomeAAAServer(dataclasses.replace(config, seal_keys=twice))
