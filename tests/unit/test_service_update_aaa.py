"""F7 over the real AAA chain on loopback (claim 24): the user changes a profile through the
AAAH's profile API; an intra-domain move without a service update is still answered from the
AAAF's cache (the old VPN info), one with the service-update NVSE goes through to the AAAH,
which rebuilds the VPN info from the changed profile. The AAAH, AAAF, VPN database and API are
the real objects; FA and HA are bare Diameter nodes (tests.unit.test_aaa)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import aiohttp

from daemons.aaa.aaah import HomeAAAServer
from daemons.aaa.profileapi import ProfileApi
from daemons.runtime.config import ConfigError, ProfileApiConfig, SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.vpn import vpninfo
from daemons.vpn.path import EndpointType, Qos
from daemons.wire import mip
from daemons.wire.diameter import ResultCode
from daemons.wire.mip.vendor import service_update, service_update_extension
from tests.unit.httpskit import make_pki
from tests.unit.test_aaa import (
    COA,
    COA2,
    HA_ADDR,
    HOA,
    LO,
    MN_AAA,
    MN_HA,
    NAI,
    SPI_MN_AAA,
    SPI_MN_HA,
    aaah_config,
    free_port,
    run,
    world,
)

OTHER = "mn3@home.example"


def rrq(coa: IPv4Address, *, previous: IPv4Address | None = None, update: int | None = None,
        challenge: bytes = bytes(range(16)), local_key: Secret | None = None) -> bytes:
    extensions: list[mip.Extension] = []
    if previous is not None:
        extensions.append(mip.previous_fa_extension(previous))
    if update is not None:
        extensions.append(service_update_extension(update))
    return mip.registration_request(home_address=HOA, home_agent=HA_ADDR, care_of_address=coa,
                                    identification=mip.ntp_identification(time.time()), lifetime=300, nai=NAI,
                                    extensions=extensions, mn_ha=SecurityAssociation(SPI_MN_HA, MN_HA),
                                    challenge=challenge, mn_aaa=SecurityAssociation(SPI_MN_AAA, MN_AAA),
                                    local_key=local_key).encode()


def key_of(challenge: bytes) -> Secret:
    """The MN's local-answer key once a registration answering ``challenge`` is accepted."""
    return mip.local_answer_key(MN_AAA, NAI, challenge, HA_ADDR)


async def patch(base: str, nai: str, pid: int, token: str, body: dict[str, Any],
                tls: ssl.SSLContext) -> tuple[int, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as s, \
            s.patch(f"{base}/v1/users/{nai}/profiles/{pid}", json=body,
                    headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


def path_to_ha(infos: list[vpninfo.VpnInfo]) -> vpninfo.VpnInfo:
    (info,) = [i for i in infos if i.path.remote.type is EndpointType.HA]
    return info


def test_service_update_bypasses_the_aaaf_cache_and_uses_the_changed_profile(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            db = w.aaah.db
            assert db is not None
            db.add_user(OTHER, "198.18.1.12", HA_ADDR, SPI_MN_AAA, Secret(b"o" * 16))
            token, other = db.issue_token(NAI), db.issue_token(OTHER)
            tls = make_pki(tmp_path / "pki")
            api = ProfileApi(db, LO, 0, tls=tls.server_context())
            await api.start()
            try:
                base = f"https://{LO}:{api.port}"
                _, ama = await w.register(rrq(COA))
                assert ama.result_code == ResultCode.DIAMETER_SUCCESS
                assert path_to_ha(vpninfo.from_message(ama, NAI)).path.qos == Qos(1_000_000, 2_000_000, 2)
                static = next(p for p in db.profiles_for(NAI) if p.gateway == "cngw")

                # Another user's token cannot touch it; the user's own can.
                status, answer = await patch(base, NAI, static.id, other, {"qos_rate": 1}, tls.client_context())
                assert (status, answer["error"]) == (403, "forbidden")
                status, answer = await patch(base, NAI, static.id, token,
                                             {"qos_rate": 5_000_000, "qos_ceil": 8_000_000, "qos_priority": 1},
                                             tls.client_context())
                assert status == 200, answer

                # A move inside the domain (to fa2) without a service update: the AAAF answers from
                # its cache (the MN proves the key of its registration at fa1).
                amrs = len(w.amrs_at_aaah)
                c2 = bytes(range(1, 17))
                _, ama = await w.register(rrq(COA2, previous=COA, challenge=c2, local_key=key_of(bytes(range(16)))),
                                          via=w.fa2)
                assert ama.result_code == ResultCode.DIAMETER_SUCCESS and ama.get("MIP-Reg-Reply") is None
                assert ama.get("Auth-Application-Id") == 2  # RFC 4004 §5.2, also when the AAAF answers
                assert len(w.amrs_at_aaah) == amrs
                assert path_to_ha(vpninfo.from_message(ama, NAI)).path.qos == Qos(1_000_000, 2_000_000, 2)

                # The same move back with a service update (and the proof: the MN cannot know who
                # answers): relayed to the AAAH, RRQ unchanged, VPN info rebuilt from the changed
                # profile, a fresh HAR to the HA.
                hars = len(w.ha.hars)
                raw = rrq(COA, previous=COA2, update=7, challenge=bytes(range(2, 18)), local_key=key_of(c2))
                _, ama = await w.register(raw)
                assert ama.result_code == ResultCode.DIAMETER_SUCCESS
                assert mip.decode_message(ama.get("MIP-Reg-Reply")).accepted
                assert len(w.amrs_at_aaah) == amrs + 1
                seen = w.amrs_at_aaah[-1]
                assert seen.get("MIP-Reg-Request") == raw
                assert service_update(mip.decode_message(raw).extensions).sequence == 7
                assert len(w.ha.hars) == hars + 1
                infos = vpninfo.from_message(ama, NAI)
                assert path_to_ha(infos).path.qos == Qos(5_000_000, 8_000_000, 1)
                assert path_to_ha(infos).path.local.address == COA
                # ...and the AAAF caches the new info for the next intra-domain move.
                cached = w.aaaf.store.get(NAI)
                assert cached is not None and cached.fa == COA
                assert path_to_ha(cached.for_fa()).path.qos == Qos(5_000_000, 8_000_000, 1)
                counters = w.aaah.counters
                assert counters.get("service_updates") == 1
            finally:
                await api.stop()

    run(main())


def test_aaah_serves_the_profile_api_when_configured(tmp_path: Path) -> None:
    """The AAAH daemon starts the API from its configuration (HTTPS, its certificate and key
    files; a key file others may read stops the start, naming the field) and stops it with itself."""
    tls = make_pki(tmp_path / "pki")

    async def main() -> None:
        async with world(tmp_path) as w:
            db = w.aaah.db
            assert db is not None
            token = db.issue_token(NAI)
            config = dataclasses.replace(aaah_config(tmp_path / "second", w.aaah.config.db_url, free_port()),
                                         profile_api=ProfileApiConfig(IPv4Address(LO), free_port(),
                                                                      cert_file=tls.server.cert,
                                                                      key_file=tls.server.key))
            tls.server.key.chmod(0o644)
            refused = HomeAAAServer(config)
            try:
                await refused.start()
                raise AssertionError("started with a world-readable key file")
            except ConfigError as exc:
                assert "profile_api.key_file" in str(exc) and "mode 0644" in str(exc)
            finally:
                await refused.stop()
            tls.server.key.chmod(0o600)
            aaah = HomeAAAServer(config)
            await aaah.start()
            try:
                assert aaah.profile_api is not None
                base = f"https://{LO}:{config.profile_api.port}"  # type: ignore[union-attr]
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client_context())) as s:
                    async with s.get(f"{base}/v1/users/{NAI}/profiles",
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                        assert r.status == 200
                        assert {p["gateway"] for p in (await r.json())["profiles"]} >= {"cngw"}
                    async with s.get(f"{base}/v1/users/{NAI}/profiles") as r:
                        assert r.status == 401
            finally:
                await aaah.stop()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client_context())) as s:
                try:
                    async with s.get(f"{base}/v1/gateways", timeout=aiohttp.ClientTimeout(total=5)) as r:
                        raise AssertionError(f"still serving after stop: {r.status}")
                except aiohttp.ClientConnectionError:
                    pass

    run(asyncio.wait_for(main(), 60))


def test_a_service_update_the_mn_did_not_sign_is_not_one(tmp_path: Path) -> None:
    """The AAAH reads a service update only from what the MN-AAA authenticator covers: the same
    NVSE appended after it (anyone on the way can) is not counted as the MN's request."""

    async def main() -> None:
        async with world(tmp_path) as w:
            appended = rrq(COA) + service_update_extension(9).encode()
            _, ama = await w.register(appended)
            assert ama.result_code == ResultCode.DIAMETER_SUCCESS  # MN-AAA covers what precedes it
            assert w.aaah.counters["service_updates"] == 0
            _, ama = await w.register(rrq(COA, update=9, challenge=bytes(range(1, 17))))
            assert ama.result_code == ResultCode.DIAMETER_SUCCESS and w.aaah.counters["service_updates"] == 1

    run(main())
