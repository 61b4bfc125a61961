"""Helpers for lab tests that talk Mobile IP to the daemons from inside a node."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import LabEnv
from tests.unit.tlskit import tshark_tls_options

# Runs inside a node's namespace: send one UDP datagram, print the reply (hex) if one comes.
SENDER = """
import socket, sys
dst, port, payload, wait = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(wait)
s.sendto(payload, (dst, port))
try:
    print(s.recv(65535).hex())
except TimeoutError:
    print("")
"""


# Runs inside a node's namespace: print the ICMP part of the next agent advertisement heard.
LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
s.settimeout(5)
while True:
    packet = s.recv(65535)
    icmp = packet[(packet[0] & 15) * 4:]
    if icmp[:1] == bytes([9]):
        print(icmp.hex())
        break
"""


def heard_advertisement(env: LabEnv, node: str, ifname: str = "eth0"):
    from daemons.wire import mip

    out = env.exec(node, sys.executable, "-c", LISTENER, ifname).stdout.strip()
    return mip.decode_icmp(bytes.fromhex(out))


def send_udp(env: LabEnv, node: str, dst: str, payload: bytes, port: int = 434, wait: float = 2.0) -> bytes:
    out = env.exec(node, sys.executable, "-c", SENDER, dst, str(port), payload.hex(), str(wait)).stdout.strip()
    return bytes.fromhex(out)


def show(env: LabEnv, what: str, node: str) -> object:
    return json.loads(env.cli("show", what, "--node", node, "--json").stdout)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")


def binding_via(env: LabEnv, coa: str):
    def check():
        rows = show(env, "bindings", "ha")
        return next((b for b in rows if b["care_of_address"] == coa), None)  # type: ignore[union-attr]
    return check


KEYLOG_DIR = "tls-keys"  # daemons.provision.configs.KEYLOG_DIR: RUN_DIR/tls-keys/NODE.keys


def lab_keylog(pcap) -> Path | None:
    """Every TLS key log of the lab whose capture ``pcap`` is (RUN_DIR/captures/LINK.pcap), in one
    file (tshark takes one): what decrypts the lab's Diameter over TLS. None if it has none."""
    logs = sorted((Path(pcap).parent.parent / KEYLOG_DIR).glob("*.keys"))
    if not logs:
        return None
    joined = Path(pcap).parent.parent / "tls-keys.joined"  # in the run directory: gone with the lab
    joined.write_bytes(b"".join(p.read_bytes().rstrip(b"\n") + b"\n" for p in logs))
    return joined


def tls_options(pcap, keys: bool = True) -> list[str]:
    """tshark options that decode the lab's Diameter over TLS (with its key logs unless ``keys`` is False)."""
    return tshark_tls_options(lab_keylog(pcap) if keys else None)


def tshark(pcap, *args: str, keys: bool = True) -> str:
    """tshark on a lab capture; Diameter over TLS decrypted with the lab's key logs (``keys=False``:
    as anyone on the wire sees it, TLS records only)."""
    return subprocess.run(["tshark", "-r", str(pcap), *tls_options(pcap, keys), *args], capture_output=True, text=True,
                          check=True).stdout


LUA = Path(__file__).resolve().parents[2] / "docs" / "wireshark" / "mipvpn.lua"


def expert_problems(pcap) -> list[str]:
    """Malformed packets and expert items at warning level or above, as tshark sees them (with
    our dissector for the binding messages, RFC 4064 type 255, which tshark's own `mip`
    dissector calls malformed; it hands every other Mobile IP message to that dissector)."""
    out = tshark(pcap, "-X", f"lua_script:{LUA}", "-Y", "_ws.malformed || _ws.expert.severity >= 6291456",
                 "-T", "fields", "-e", "frame.number", "-e", "_ws.expert.message")
    return [line for line in out.splitlines() if line.strip()]


def installed_secrets(run_dir: Path, node: str) -> list[bytes]:
    """The ESP keys and IKE PSKs of the paths a node installed (its MAVPN cache, its own state
    store ``state/vpn.db``: keys in clear); nothing for a node without one."""
    from daemons.store.records import read_rows
    from daemons.vpn.vpninfo import from_record

    out: list[bytes] = []
    for nai, hexes in read_rows(run_dir / "nodes" / node / "state" / "vpn.db", "vpn").items():
        for info in from_record(hexes, nai):
            sec = info.path.security
            out += [k.enc_key.reveal() for k in (sec.inbound, sec.outbound) if k is not None]
            out += [sec.psk.reveal()] if sec.psk is not None else []
    return out
