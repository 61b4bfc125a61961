"""The F1 data path on the xfrm backend: the paths the AAAH distributes, with the same shapes
and key derivations, installed by XfrmBackend in a five-namespace chain; ping both ways.

    mn (HoA 198.18.100.10) --acc-- fa ==== ha (198.18.100.1 on lo) ==== cngw --lan-- cn 198.18.2.10
                       198.18.101.0/24   198.18.0.0/30        198.18.0.4/30       198.18.2.0/24

Path 1, FA⇄HA: home address/32 ⇄ any (the FA's view; the HA gets it mirrored). Path 2, HA⇄CN-GW:
home prefix ⇄ corporate prefix, keyed from the master secret as the CN-GW's static tunnel.
The daemons (AAAH, HA, FA) are tested with the strongswan backend on the build machines; this
checks that the same selectors and tunnel endpoints carry traffic with kernel ESP.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from ipaddress import IPv4Address, IPv4Network

import pytest

from daemons.runtime.secret import Secret
from daemons.vpn.keys import new_esp_key, static_esp_key, static_spi
from daemons.vpn.path import DirectionKeys, Endpoint, EndpointType, EspSuite, SecurityService, VpnPath
from daemons.vpn.vpninfo import VpnInfo
from daemons.vpn.xfrm.backend import XfrmBackend
from tests.kernel.conftest import run

PREFIX = f"mipvpn-t-f1-{os.getpid()}-"
HOA, CN = "198.18.100.10", "198.18.2.10"
FA, HA, HA_WAN, CNGW = "198.18.0.1", "198.18.100.1", "198.18.0.2", "198.18.0.6"
SUITE = EspSuite.AES128GCM16
ANY = IPv4Network("0.0.0.0/0")


def batch(ns: str, *lines: str) -> None:
    proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def f1_paths(master: Secret) -> tuple[VpnInfo, VpnInfo]:
    """Path 1 in the FA's view and path 2 in the HA's view, as daemons/aaah.py builds them."""
    path1 = VpnPath("mn1@home.example:1", Endpoint(IPv4Address(FA), EndpointType.FA),
                    Endpoint(IPv4Address(HA), EndpointType.HA), (IPv4Network(f"{HOA}/32"),), (ANY,),
                    SecurityService(SUITE, outbound=DirectionKeys(0x10001, new_esp_key(SUITE)),
                                    inbound=DirectionKeys(0x10002, new_esp_key(SUITE))))
    out_spi, in_spi = static_spi(HA, CNGW), static_spi(CNGW, HA)
    path2 = VpnPath("net:ha-cngw", Endpoint(IPv4Address(HA), EndpointType.HA),
                    Endpoint(IPv4Address(CNGW), EndpointType.CNGW_STATIC),
                    (IPv4Network("198.18.100.0/24"),), (IPv4Network("198.18.2.0/24"),),
                    SecurityService(SUITE, outbound=DirectionKeys(out_spi, static_esp_key(master, HA, CNGW, out_spi,
                                                                                          SUITE)),
                                    inbound=DirectionKeys(in_spi, static_esp_key(master, CNGW, HA, in_spi, SUITE))))
    return VpnInfo("mn1@home.example", 1, path1), VpnInfo("mn1@home.example", 2, path2)


def test_f1_paths_carry_traffic_with_kernel_esp() -> None:
    names = {n: f"{PREFIX}{n}" for n in ("mn", "fa", "ha", "cngw", "cn")}
    made: list[str] = []
    backends: list[XfrmBackend] = []
    try:
        for ns in names.values():
            run("ip", "netns", "add", ns)
            made.append(ns)
        mn, fa, ha, cngw, cn = names.values()
        run("ip", "-n", mn, "link", "add", "eth0", "type", "veth", "peer", "name", "acc", "netns", fa)
        run("ip", "-n", fa, "link", "add", "wan", "type", "veth", "peer", "name", "fa", "netns", ha)
        run("ip", "-n", ha, "link", "add", "cngw", "type", "veth", "peer", "name", "ha", "netns", cngw)
        run("ip", "-n", cngw, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", cn)
        batch(mn, "link set lo up", "link set eth0 up", f"addr add {HOA}/32 dev eth0",
              "route add default via 198.18.101.1 dev eth0 onlink")
        batch(fa, "link set lo up", "link set acc up", "link set wan up", "addr add 198.18.101.1/24 dev acc",
              f"addr add {FA}/30 dev wan", f"route add {HOA}/32 dev acc", f"route add default via {HA_WAN}")
        batch(ha, "link set lo up", "link set fa up", "link set cngw up", f"addr add {HA}/32 dev lo",
              f"addr add {HA_WAN}/30 dev fa", "addr add 198.18.0.5/30 dev cngw",
              f"route add 198.18.2.0/24 via {CNGW}", f"route add default via {FA}")
        batch(cngw, "link set lo up", "link set ha up", "link set lan up", f"addr add {CNGW}/30 dev ha",
              "addr add 198.18.2.1/24 dev lan", "route add default via 198.18.0.5")
        batch(cn, "link set lo up", "link set eth0 up", f"addr add {CN}/24 dev eth0",
              "route add default via 198.18.2.1")
        for ns in (fa, ha, cngw):
            run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")

        path1, path2 = f1_paths(Secret(os.urandom(32)))
        installs = {fa: [path1], ha: [path1.mirrored(), path2], cngw: [path2.mirrored()]}

        async def install() -> None:
            for ns, infos in installs.items():
                backend = XfrmBackend(ns.removeprefix(PREFIX), ns)
                backends.append(backend)
                for info in infos:
                    await backend.install(info.path)

        asyncio.run(install())
        run("ip", "netns", "exec", mn, "ping", "-c", "3", "-i", "0.2", "-W", "2", CN, timeout=30)
        run("ip", "netns", "exec", cn, "ping", "-c", "3", "-i", "0.2", "-W", "2", HOA, timeout=30)
        # Both legs carried ESP: every SA of the chain, in both directions, counted packets.
        for ns in (fa, ha, cngw):
            text = run("ip", "-s", "-n", ns, "xfrm", "state").stdout
            packets = [int(n) for n in re.findall(r"(\d+)\(packets\)", text)]
            assert len(packets) == 2 * len(installs[ns]) and all(packets), (ns, packets)
    finally:
        for backend in backends:
            asyncio.run(backend.close())
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        left = [n for n in run("ip", "netns", "list").stdout.split() if n.startswith(PREFIX)]
        assert not left, f"namespaces left behind: {left}"


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
