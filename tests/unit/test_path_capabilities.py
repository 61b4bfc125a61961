"""The path API's capabilities: what each backend says it can do, and that the node's path
control (MAVPN) decides by capability, not by the backend's name — with a recording backend
that no code above daemons.vpn knows by name."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from daemons.runtime.secret import Secret
from daemons.store.records import RecordStore
from daemons.vpn.mavpn import MavpnControl
from daemons.vpn.path import (
    Capability,
    Endpoint,
    EndpointType,
    PathBackend,
    PathState,
    PathStatus,
    SecurityService,
    VpnPath,
)
from daemons.vpn.strongswan.backend import StrongswanBackend
from daemons.vpn.vpninfo import VpnInfo
from daemons.vpn.xfrm.backend import XfrmBackend

NAI = "mn1@home.example"
HOA, FA, HA = "198.18.1.10", IPv4Address("198.18.2.1"), IPv4Address("198.18.1.1")


class Recorder(PathBackend):
    """A backend that installs nothing and writes down what it was asked."""

    name = "recorder"

    def __init__(self, capabilities: Capability) -> None:
        self._capabilities = capabilities
        self.calls: list[tuple[str, ...]] = []

    @property
    def capabilities(self) -> Capability:
        return self._capabilities

    async def install(self, path: VpnPath) -> PathStatus:
        self.calls.append(("install", path.id))
        return PathStatus(path.id, PathState.UP)

    async def update(self, path: VpnPath) -> PathStatus:
        self.calls.append(("update", path.id))
        return PathStatus(path.id, PathState.UP)

    async def remove(self, path_id: str) -> None:
        self.calls.append(("remove", path_id))

    async def list(self) -> builtins.list[PathStatus]:
        return []

    async def flush(self) -> None:
        self.calls.append(("flush",))

    async def reconcile(self, wanted: Sequence[VpnPath]) -> builtins.list[PathStatus]:
        return []

    async def prepare_local_selector(self, address: str, access_ifname: str) -> None:
        self.calls.append(("prepare", address, access_ifname))

    async def release_local_selector(self, address: str) -> None:
        self.calls.append(("release", address))

    async def guard_access(self, access_ifname: str, visitors: Sequence[str]) -> None:
        self.calls.append(("guard_access", access_ifname, *visitors))

    async def guard_visitor(self, home_address: str) -> None:
        self.calls.append(("guard", home_address))

    async def release_visitor(self, home_address: str) -> None:
        self.calls.append(("unguard", home_address))


def fa_to_ha(hoa: str = HOA) -> VpnInfo:
    path = VpnPath(f"{NAI}:1", Endpoint(FA, EndpointType.FA), Endpoint(HA, EndpointType.HA),
                   (IPv4Network(f"{hoa}/32"),), (IPv4Network("0.0.0.0/0"),),
                   SecurityService(psk=Secret(b"pair-psk-0123456789")))
    return VpnInfo(NAI, 1, path)


def test_each_backend_says_what_it_can_do(tmp_path: Path) -> None:
    strongswan = StrongswanBackend("n", tmp_path, None).capabilities
    assert Capability.FORWARDING_PATHS in strongswan and Capability.LOCAL_SELECTOR_ADDRESS in strongswan
    # xfrm is policy-based with AAAH keys: nothing to own, no routes, no F6 forwarding path
    xfrm = XfrmBackend("n", xfrm=object())  # type: ignore[arg-type]  # a socket it never uses here
    assert xfrm.capabilities is Capability.NONE
    with pytest.raises(TypeError):  # a backend must say what it can do
        type("Mute", (PathBackend,), {"name": "mute"})()


def test_hooks_default_to_nothing() -> None:
    backend = Recorder(Capability.NONE)

    async def go() -> str | None:
        await backend.close()
        return await PathBackend.wait_ready(backend)

    assert asyncio.run(go()) is None and backend.last_negotiation_ms is None


@pytest.mark.parametrize("needs_address", [True, False])
def test_fa_owns_the_home_address_only_where_the_backend_needs_it(tmp_path: Path, needs_address: bool) -> None:
    backend = Recorder(Capability.LOCAL_SELECTOR_ADDRESS if needs_address else Capability.FORWARDING_PATHS)
    control = MavpnControl(backend, RecordStore(tmp_path / "vpn.db"), access_interface="acc")

    async def go() -> None:
        await control.apply(NAI, [fa_to_ha()])
        await control.apply(NAI, [fa_to_ha("198.18.1.11")])  # another home address: the old one goes
        await control.remove_user(NAI)

    asyncio.run(go())
    path_id = f"{NAI}:1"
    if needs_address:  # owned before the path goes in, given back once the path is out
        assert backend.calls == [("prepare", HOA, "acc"), ("install", path_id),
                                 ("release", HOA), ("prepare", "198.18.1.11", "acc"), ("update", path_id),
                                 ("remove", path_id), ("release", "198.18.1.11")]
    else:
        assert backend.calls == [("install", path_id), ("update", path_id), ("remove", path_id)]


def test_no_access_interface_no_addresses(tmp_path: Path) -> None:
    backend = Recorder(Capability.LOCAL_SELECTOR_ADDRESS)  # e.g. an HA: owns its home link already
    control = MavpnControl(backend, RecordStore(tmp_path / "vpn.db"))
    asyncio.run(control.apply(NAI, [fa_to_ha()]))
    assert [c[0] for c in backend.calls] == ["install"]
