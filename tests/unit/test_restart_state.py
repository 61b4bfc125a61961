"""A restarted daemon (issue 15): its state loads record by record, and its paths follow its
live bindings only.

Real state in tmp_path (the JSON files the daemons wrote before per-record storage, imported
at the first load: daemons/store/records.py; tests/unit/test_record_store.py tests the
store itself), the real daemon objects (HA, FA, CN-GW, AAAH, AAAF) and their
real MAVPN control; the path backend is a fake that keeps what is installed like a kernel
would across a daemon's death (the thing under test is the reconciliation, not the backend:
tests/unit/test_xfrm_backend_native.py and the lab tests cover the backends themselves).
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from daemons.aaa.aaaf import ForeignAAAServer
from daemons.aaa.aaah import HomeAAAServer
from daemons.aaa.sessions import Session
from daemons.agents.cngw import CnBinding, CorrespondentGateway
from daemons.agents.fa import ForeignAgent, Visitor
from daemons.agents.ha import Binding, HomeAgent
from daemons.runtime.config import AAAFConfig, AAAHConfig, CNGWConfig, DiameterPeer, FAConfig, HAConfig, HomeAgentRef
from daemons.runtime.log import EventFormatter
from daemons.runtime.secret import Secret
from daemons.store.records import RecordStore, read_rows
from daemons.store.state import StateFile
from daemons.vpn import mavpn as mavpn_module
from daemons.vpn.mavpn import MavpnControl
from daemons.vpn.path import (
    Capability,
    Endpoint,
    EndpointType,
    EspSuite,
    PathBackend,
    PathState,
    PathStatus,
    SecurityService,
    VpnPath,
)
from daemons.vpn.vpninfo import FORWARD_PATH_ID, STATIC_OWNER, VpnInfo, to_record
from tests.unit.sealkit import key_files

NOTHING = Capability(0)
HA, FA1, FA2 = IPv4Address("198.18.100.1"), IPv4Address("198.18.0.14"), IPv4Address("198.18.0.18")
GW = IPv4Address("198.18.0.34")
USERS = {"mn1@home.example": "198.18.100.10", "mn2@home.example": "198.18.100.11",
         "mn3@home.example": "198.18.100.12"}
MN1, MN2, MN3 = USERS


class KernelLike(PathBackend):
    """A backend whose installed paths outlive the daemon (as SAs and policies do), with the
    path API's contract: ``reconcile`` leaves exactly the wanted paths, ``remove`` of an
    unknown id is no error. Writes down what it was asked."""

    name = "kernel-like"

    def __init__(self, capabilities: Capability = NOTHING, installed: Iterable[VpnPath] = ()) -> None:
        self._capabilities = capabilities
        self.installed: dict[str, VpnPath] = {p.id: p for p in installed}
        self.calls: list[tuple[str, str]] = []

    @property
    def capabilities(self) -> Capability:
        return self._capabilities

    async def install(self, path: VpnPath) -> PathStatus:
        self.calls.append(("install", path.id))
        self.installed[path.id] = path
        return PathStatus(path.id, PathState.UP)

    async def update(self, path: VpnPath) -> PathStatus:
        return await self.install(path)

    async def remove(self, path_id: str) -> None:
        self.calls.append(("remove", path_id))
        self.installed.pop(path_id, None)

    async def list(self) -> builtins.list[PathStatus]:
        return [PathStatus(i, PathState.UP) for i in self.installed]

    async def flush(self) -> None:
        self.installed.clear()

    async def reconcile(self, wanted: Sequence[VpnPath]) -> builtins.list[PathStatus]:
        keep = {p.id for p in wanted}
        for path_id in [i for i in self.installed if i not in keep]:
            await self.remove(path_id)
        for path in wanted:
            if self.installed.get(path.id) != path:
                await self.install(path)
        return await self.list()

    async def prepare_local_selector(self, address: str, access_ifname: str) -> None:
        self.calls.append(("prepare", address))

    async def release_local_selector(self, address: str) -> None:
        self.calls.append(("release", address))

    async def guard_access(self, access_ifname: str, visitors: Sequence[str]) -> None:
        self.calls.append(("guard_access", ",".join(visitors)))

    async def guard_visitor(self, home_address: str) -> None:
        self.calls.append(("guard", home_address))

    async def release_visitor(self, home_address: str) -> None:
        self.calls.append(("unguard", home_address))

    def installs(self, path_id: str) -> int:
        return self.calls.count(("install", path_id))


def info(nai: str, path_id: int, local: Endpoint, remote: Endpoint, local_ts: str, remote_ts: str) -> VpnInfo:
    return VpnInfo(nai, path_id, VpnPath(
        id=VpnInfo.path_name(nai, path_id), local=local, remote=remote,
        local_ts=(IPv4Network(local_ts),), remote_ts=(IPv4Network(remote_ts),),
        security=SecurityService(EspSuite.AES128GCM16, psk=Secret(b"pair psk of the test 0123456789ab"))))


def ha_path(nai: str) -> VpnInfo:  # the HA's view of its path to the FA
    return info(nai, 1, Endpoint(HA, EndpointType.HA), Endpoint(FA1, EndpointType.FA), "0.0.0.0/0",
                f"{USERS[nai]}/32")


def fa_path(nai: str, fa: IPv4Address = FA1) -> VpnInfo:  # the FA's view of its path to the HA
    return info(nai, 1, Endpoint(fa, EndpointType.FA), Endpoint(HA, EndpointType.HA), f"{USERS[nai]}/32",
                "0.0.0.0/0")


def forward_path(nai: str) -> VpnInfo:  # an F6 forwarding path between two FAs
    return info(nai, FORWARD_PATH_ID, Endpoint(FA1, EndpointType.FA), Endpoint(FA2, EndpointType.FA), "0.0.0.0/0",
                f"{USERS[nai]}/32")


def cngw_path(nai: str) -> VpnInfo:  # a dynamic CN-GW's view of its path to the FA
    return info(nai, 3, Endpoint(GW, EndpointType.CNGW_DYNAMIC), Endpoint(FA1, EndpointType.FA), "198.18.3.0/24",
                f"{USERS[nai]}/32")


def write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def write_cache(state_dir: Path, infos: list[VpnInfo]) -> None:
    """The MAVPN cache file as the daemon left it when it died."""
    by_user: dict[str, list[VpnInfo]] = {}
    for i in infos:
        by_user.setdefault(i.nai, []).append(i)
    write(state_dir / "vpn.json", {"vpn": {nai: to_record(group) for nai, group in by_user.items()}})


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> KernelLike:
    """The node's backend: what make_backend gives every daemon of the test."""
    kernel = KernelLike()
    monkeypatch.setattr(mavpn_module, "make_backend", lambda *_: kernel)
    return kernel


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.INFO)
    return lambda: "\n".join(EventFormatter().format(r) for r in caplog.records)


def ha_config(tmp: Path, backend: str = "none") -> HAConfig:
    return HAConfig(node="ha", role="ha", state_dir=tmp / "ha", control_socket=tmp / "ha.sock", ipsec_backend=backend,
                    address=HA, home_prefix=IPv4Network("198.18.100.0/24"))


def fa_config(tmp: Path, backend: str = "none") -> FAConfig:
    return FAConfig(node="fa1", role="fa", state_dir=tmp / "fa", control_socket=tmp / "fa.sock",
                    ipsec_backend=backend, care_of_address=FA1, access_address=IPv4Address("198.18.101.1"))


def cngw_config(tmp: Path, backend: str = "none") -> CNGWConfig:
    return CNGWConfig(node="cngw2", role="cngw", state_dir=tmp / "gw", control_socket=tmp / "gw.sock",
                      ipsec_backend=backend, address=GW)


def binding(nai: str, expires: float) -> dict[str, Any]:
    return asdict(Binding(nai, USERS[nai], str(FA1), 300, expires, 1, str(FA1)))


def visitor(nai: str, expires: float) -> dict[str, Any]:
    return asdict(Visitor(nai, USERS[nai], str(HA), 434, 300, expires, 1, f"fa1;{nai}"))


def cn_binding(nai: str, expires: float) -> dict[str, Any]:
    return asdict(CnBinding(nai, USERS[nai], str(FA1), str(HA), 300, expires, 1))


# ---- a record of an old schema, a corrupt record: dropped, counted, the rest loads ---------------


def test_ha_loads_the_good_binding_and_drops_one_of_an_old_schema(tmp_path: Path, events: Any) -> None:
    now = time.time()
    old_schema = {k: v for k, v in binding(MN2, now + 100).items() if k != "relayed_by"}
    old_schema["fa"] = old_schema.pop("care_of_address")  # a field renamed since
    write(tmp_path / "ha" / "bindings.json", {"bindings": {USERS[MN1]: binding(MN1, now + 100), USERS[MN2]: old_schema},
                                              "last_ident": {USERS[MN1]: 7, USERS[MN2]: "not a number"}})
    ha = HomeAgent(ha_config(tmp_path))
    ha.restore()
    assert list(ha.bindings) == [USERS[MN1]] and ha.bindings[USERS[MN1]].nai == MN1
    assert ha.last_ident == {USERS[MN1]: 7}
    assert ha.counters["state_dropped"] == 2
    text = events()
    assert f"event=state.record_dropped file=bindings.json section=bindings key={USERS[MN2]} reason=" in text
    assert "not a number" not in text  # a stored value is never repeated in the log
    # The store now says what the HA holds: the bad records warn once, not at every start.
    assert list(read_rows(tmp_path / "ha" / "bindings.db", "bindings")) == [USERS[MN1]]
    assert not (tmp_path / "ha" / "bindings.json").exists() and (tmp_path / "ha" / "bindings.json.migrated").exists()
    again = HomeAgent(ha_config(tmp_path))
    again.restore()
    assert list(again.bindings) == [USERS[MN1]] and again.last_ident == {USERS[MN1]: 7}
    assert again.counters["state_dropped"] == 0


def test_fa_and_cngw_drop_an_unreadable_record_and_keep_the_rest(tmp_path: Path) -> None:
    now = time.time()
    write(tmp_path / "fa" / "visitors.json", {
        "visitors": {USERS[MN1]: visitor(MN1, now + 100), USERS[MN2]: {**visitor(MN2, now + 100), "mn_port": "434"},
                     USERS[MN3]: ["an", "older", "tuple", "schema"]},
        "forwards": {MN1: now + 5, MN2: None}})
    fa = ForeignAgent(fa_config(tmp_path))
    fa.restore()
    assert list(fa.visitors) == [USERS[MN1]] and fa.forwards == {MN1: pytest.approx(now + 5)}
    assert fa.counters["state_dropped"] == 3

    write(tmp_path / "gw" / "bindings.json", {"bindings": {
        USERS[MN1]: cn_binding(MN1, now + 100), USERS[MN2]: {**cn_binding(MN2, now + 100), "expires": "soon"}}})
    gw = CorrespondentGateway(cngw_config(tmp_path))
    gw.restore()
    assert list(gw.table.bindings) == [USERS[MN1]]
    assert gw.counters["state_dropped"] == 1


def test_aaa_sessions_load_record_by_record(tmp_path: Path) -> None:
    good = Session(MN1, "fa1;1;1", FA1, "fa1.visit.example", HA, IPv4Address(USERS[MN1]), (fa_path(MN1),), 1.0)
    sessions = [good.to_json(), [MN2, "fa1;1;2"], {**good.to_json(), "nai": MN3, "created": None}]
    aaah_config = AAAHConfig(node="aaah", role="aaah", state_dir=tmp_path / "aaah", control_socket=tmp_path / "h.sock",
                             master_secret=Secret(b"m" * 32), address=IPv4Address("127.0.0.1"),
                             diameter_transport="tcp",
                             home_agents=[HomeAgentRef(HA, "ha.home.example", IPv4Network("198.18.100.0/24"))],
                             seal_keys=key_files(tmp_path, "ha.home.example"))
    write(aaah_config.state_dir / "sessions.json", {"spi_next": {str(HA): 70000, str(FA1): "x"}, "sessions": sessions})
    aaah = HomeAAAServer(aaah_config)
    aaah.restore()
    assert list(aaah.store.sessions) == [MN1] and aaah.store.get(MN1) == good
    assert aaah.spis.next == {str(HA): 70000}
    assert aaah.counters["state_dropped"] == 3

    aaaf_config = AAAFConfig(node="aaaf1", role="aaaf", state_dir=tmp_path / "aaaf", control_socket=tmp_path / "f.sock",
                             address=IPv4Address("127.0.0.1"), diameter_transport="tcp",
                             home_servers=[DiameterPeer("aaah.home.example", "home.example", IPv4Address("127.0.0.1"))])
    write(aaaf_config.state_dir / "sessions.json", {"sessions": sessions})
    aaaf = ForeignAAAServer(aaaf_config)
    aaaf.restore()
    assert list(aaaf.store.sessions) == [MN1]
    assert aaaf.counters["state_dropped"] == 2


# ---- a file that is not JSON (or not an object): moved aside, the daemon starts empty ----------


@pytest.mark.parametrize("content", ['{"visitors": {"198.18.100.10": {"nai": "mn1@ho', "[]", "\udcff"],
                         ids=["torn", "not-an-object", "not-utf8"])
def test_a_corrupt_state_file_is_moved_aside_and_the_daemon_starts_empty(tmp_path: Path, content: str,
                                                                          events: Any) -> None:
    state = tmp_path / "fa" / "visitors.json"
    state.parent.mkdir(parents=True)
    state.write_bytes(content.encode("utf-8", "surrogateescape"))
    fa = ForeignAgent(fa_config(tmp_path))
    fa.restore()
    assert fa.visitors == {} and fa.forwards == {}
    (aside,) = state.parent.glob("visitors.json.corrupt-*")
    assert aside.read_bytes() == content.encode("utf-8", "surrogateescape")  # kept for inspection
    assert "event=state.file_corrupt file=visitors.json moved_to=visitors.json.corrupt-" in events()
    assert fa.counters["state_dropped"] == 1


def test_a_second_corrupt_file_does_not_overwrite_the_first(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "bindings.json")
    for text in ("first {", "second ["):
        state.path.write_text(text)
        assert state.load() == {}
    kept = sorted(p.read_text() for p in tmp_path.glob("bindings.json.corrupt-*"))
    assert kept == ["first {", "second ["] and state.dropped == 2


# ---- restart: paths follow the live bindings only ---------------------------------------------


def test_ha_restart_reinstalls_only_the_paths_of_live_bindings(tmp_path: Path, backend: KernelLike) -> None:
    """mn2's binding ran out while the HA was down: its path is not installed again, leaves
    the kernel (where the dead daemon left it) and the MAVPN cache; mn1's stays."""
    async def main() -> None:
        now = time.time()
        config = ha_config(tmp_path, "xfrm")
        write(config.state_dir / "bindings.json", {"bindings": {USERS[MN1]: binding(MN1, now + 100),
                                                                USERS[MN2]: binding(MN2, now - 10)}})
        write_cache(config.state_dir, [ha_path(MN1), ha_path(MN2)])
        backend.installed = {i.path.id: i.path for i in (ha_path(MN1), ha_path(MN2))}
        ha = HomeAgent(config)
        ha.restore()
        assert list(ha.bindings) == [USERS[MN1]]  # the expired binding is dropped at load
        task = await ha.start_paths()
        assert ha.mavpn is not None and task is not None
        assert list(ha.mavpn.cache) == [MN1]  # cut before anything else runs
        await task
        assert set(backend.installed) == {ha_path(MN1).path.id}
        assert backend.installs(ha_path(MN2).path.id) == 0
        assert ("remove", ha_path(MN2).path.id) in backend.calls
        assert list(read_rows(config.state_dir / "vpn.db", "vpn")) == [MN1]
        assert ha.show_bindings()[0]["mn"] == MN1

    asyncio.run(asyncio.wait_for(main(), 10))


def test_fa_restart_keeps_live_visitors_and_forwards_and_their_paths_only(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """mn1 is still a visitor but its F6 forwarding path ran out; mn2's visitor entry ran out;
    mn3 is gone from here but still forwarded for (the old FA's side of F6). The FA owns its
    MNs' home addresses (a backend with LOCAL_SELECTOR_ADDRESS): mn2's is given back."""
    kernel = KernelLike(Capability.LOCAL_SELECTOR_ADDRESS)
    monkeypatch.setattr(mavpn_module, "make_backend", lambda *_: kernel)

    async def main() -> None:
        now = time.time()
        config = fa_config(tmp_path, "strongswan")
        write(config.state_dir / "visitors.json", {
            "visitors": {USERS[MN1]: visitor(MN1, now + 100), USERS[MN2]: visitor(MN2, now - 1)},
            "forwards": {MN1: now - 1, MN3: now + 5}})
        cached = [forward_path(MN1), fa_path(MN1), fa_path(MN2), forward_path(MN3)]
        write_cache(config.state_dir, cached)
        kernel.installed = {i.path.id: i.path for i in cached}
        fa = ForeignAgent(config)
        fa.restore()
        assert list(fa.visitors) == [USERS[MN1]] and list(fa.forwards) == [MN3]
        task = await fa.start_paths()
        assert fa.mavpn is not None and task is not None
        await task
        assert sorted(kernel.installed) == sorted([fa_path(MN1).path.id, forward_path(MN3).path.id])
        assert {nai: sorted(paths) for nai, paths in fa.mavpn.cache.items()} == {MN1: [1], MN3: [FORWARD_PATH_ID]}
        for gone in (forward_path(MN1), fa_path(MN2)):
            assert kernel.installs(gone.path.id) == 0 and ("remove", gone.path.id) in kernel.calls
        assert ("release", USERS[MN2]) in kernel.calls and ("prepare", USERS[MN2]) not in kernel.calls
        assert ("release", USERS[MN1]) not in kernel.calls

    asyncio.run(asyncio.wait_for(main(), 10))


def test_cngw_restart_never_reinstalls_the_path_of_an_expired_binding(tmp_path: Path, backend: KernelLike) -> None:
    async def main() -> None:
        now = time.time()
        config = cngw_config(tmp_path, "xfrm")
        write(config.state_dir / "bindings.json", {"bindings": {USERS[MN1]: cn_binding(MN1, now + 100),
                                                                USERS[MN2]: cn_binding(MN2, now - 10)}})
        write_cache(config.state_dir, [cngw_path(MN1), cngw_path(MN2)])
        gw = CorrespondentGateway(config)
        gw.restore()
        task = await gw.start_paths()
        assert gw.mavpn is not None and task is not None
        await task
        assert set(backend.installed) == {cngw_path(MN1).path.id}
        assert backend.installs(cngw_path(MN2).path.id) == 0
        assert list(gw.mavpn.cache) == [MN1]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_reconcile_keeps_static_paths_and_a_registration_made_meanwhile(tmp_path: Path) -> None:
    """The configuration's static paths are always live; a user dropped at restart who
    registers again before the backend is reconciled keeps the new path."""
    async def main() -> None:
        kernel = KernelLike()
        control = MavpnControl(kernel, RecordStore(tmp_path / "vpn.db"))
        static = info(STATIC_OWNER, 1, Endpoint(HA, EndpointType.HA), Endpoint(GW, EndpointType.CNGW_STATIC),
                      "198.18.100.0/24", "198.18.3.0/24")
        control.cache = {STATIC_OWNER: {1: static}, MN1: {1: ha_path(MN1)}, MN2: {1: ha_path(MN2)}}
        task = control.reconcile([MN1])
        assert set(control.cache) == {STATIC_OWNER, MN1}
        await control.apply(MN2, [ha_path(MN2)])  # mn2 registers again at once
        await task
        assert set(kernel.installed) == {control.backend_path(static).id, ha_path(MN1).path.id, ha_path(MN2).path.id}
        assert set(control.cache) == {STATIC_OWNER, MN1, MN2}

    asyncio.run(asyncio.wait_for(main(), 10))


def test_records_that_would_fail_later_are_dropped_at_load(tmp_path: Path) -> None:
    """Well-typed records whose values the daemon cannot use: an address that is not one (it would
    reach the kernel in routes.reconcile or home_link.reconcile and stop the start), an expiry
    of JSON's Infinity (a visitor, binding or forwarding path that never ends)."""
    now = time.time()
    write(tmp_path / "fa" / "visitors.json", {  # json.dumps writes float("inf") as Infinity, json.loads reads it
        "visitors": {USERS[MN1]: visitor(MN1, now + 100),
                     USERS[MN2]: {**visitor(MN2, now + 100), "home_address": "mn2.example"},
                     USERS[MN3]: visitor(MN3, float("inf"))},
        "forwards": {MN1: float("inf")}})
    fa = ForeignAgent(fa_config(tmp_path))
    fa.restore()
    assert list(fa.visitors) == [USERS[MN1]] and fa.forwards == {} and fa.counters["state_dropped"] == 3

    write(tmp_path / "ha" / "bindings.json", {"bindings": {
        USERS[MN1]: binding(MN1, now + 100), USERS[MN2]: {**binding(MN2, now + 100), "care_of_address": "10.0.0.1 "},
        USERS[MN3]: {**binding(MN3, now + 100), "home_address": "198.18.100.012"}}})
    ha = HomeAgent(ha_config(tmp_path))
    ha.restore()
    assert list(ha.bindings) == [USERS[MN1]] and ha.counters["state_dropped"] == 2

    write(tmp_path / "gw" / "bindings.json", {"bindings": {
        USERS[MN1]: cn_binding(MN1, now + 100), USERS[MN2]: {**cn_binding(MN2, now + 100), "home_agent": "ha"}}})
    gw = CorrespondentGateway(cngw_config(tmp_path))
    gw.restore()
    assert list(gw.table.bindings) == [USERS[MN1]] and gw.counters["state_dropped"] == 1


def test_a_file_nested_too_deep_to_parse_is_moved_aside(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "visitors.json")
    state.path.write_text('{"visitors": ' + "[" * 100_000)
    assert state.load() == {} and state.dropped == 1
    assert len(list(tmp_path.glob("visitors.json.corrupt-*"))) == 1
