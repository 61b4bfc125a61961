"""Diameter over TLS (RFC 6733 §2.1, §13): TLS 1.3 from the first byte, both ends' certificates
verified against the configured CA, and the certificate bound to the Origin-Host of the CER/CEA
(``PeerTable.identify``).

Real nodes on loopback, certificates from ``daemons.provision.pki`` (as the lab makes them).
Attackers: a client without a certificate, one with a certificate of another CA, a plain-TCP
client, a peer with a valid certificate for one configured host claiming another configured
host, and a server whose certificate names another host than its CEA. Each is refused before
anything reaches the Diameter layer (or, for the name binding, with 3010 / by closing), counted,
and the real peer still works. tshark decodes a captured TLS exchange with the key log and sees
only TLS without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import ssl
import subprocess
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from daemons.aaa.aaaf import ForeignAAAServer
from daemons.diameter.node import DiameterNode
from daemons.diameter.setup import node_tls as config_tls
from daemons.provision import pki
from daemons.runtime.config import AAAFConfig, ConfigError, DiameterPeer, DiameterTls
from daemons.runtime.log import EventFormatter
from daemons.wire.diameter import Message, ResultCode
from tests.unit.test_diameter_node import HOME, LO, VISIT, allow, amr, eventually, node, run, serving
from tests.unit.tlskit import credentials, node_tls, tshark_tls_options

AAAH, FA1, FA2 = "aaah.home.example", "fa1.visit-a.example", "fa2.visit-a.example"


def secured(tmp: Path, host: str, realm: str, *, listen: bool = True, ca_dir: str = "pki", cert_for: str | None = None,
            keylog: Path | None = None, **kw: Any) -> DiameterNode:
    """A node ``host`` over TLS, its certificate issued for ``cert_for`` (default: itself)."""
    return node(host, realm, listen=listen, tls=node_tls(tmp, cert_for or host, ca_dir=ca_dir, keylog=keylog), **kw)


def dial(c: DiameterNode, server: DiameterNode, host: str, realm: str) -> None:
    assert server.port is not None
    c.add_peer(host, realm, LO, server.port)
    c.add_route(realm, host)


async def tls_client(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LO, port, ssl=ctx, server_hostname=AAAH)


def client_context(tmp: Path, host: str | None, ca_dir: str = "pki") -> ssl.SSLContext:
    """A TLS client trusting the server's CA, with ``host``'s certificate from ``ca_dir`` (None: none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(pki.make_ca(tmp / "pki").cert_path))
    if host is not None:
        c = credentials(tmp, host, ca_dir=ca_dir)
        ctx.load_cert_chain(c.cert, c.key)
    return ctx


# -- a good peer --------------------------------------------------------------------------------


def test_peers_talk_over_tls_1_3_with_certificates_of_the_ca(tmp_path: Path) -> None:
    async def main() -> None:
        server, handler = serving(AAAH, tls=node_tls(tmp_path, AAAH))
        async with server:
            c = secured(tmp_path, FA1, VISIT, listen=False)
            allow(server, FA1, VISIT)
            dial(c, server, AAAH, HOME)
            async with c:
                peer = await c.wait_open(AAAH, 5)
                ans = await c.request(amr(c), timeout=5)
                assert ans.result_code == ResultCode.DIAMETER_SUCCESS and len(handler.seen) == 1
                assert peer.conn is not None and peer.conn.tls is not None
                assert peer.conn.tls.version == "TLSv1.3" and peer.conn.tls.dns_names == (AAAH,)
                theirs = server.peers[FA1.lower()]
                assert theirs.conn is not None and theirs.conn.tls is not None
                assert theirs.conn.tls.version == "TLSv1.3" and theirs.conn.tls.names(FA1.upper())
                assert server.peers_status()[0]["tls"] == "TLSv1.3"
        assert server.counters["tls_handshake_failed"] == 0 and c.counters["tls_handshake_failed"] == 0

    run(main())


# -- refused at the handshake: nothing reaches the Diameter layer -------------------------------


@pytest.mark.parametrize("who", ["no-certificate", "other-ca", "plain-tcp"])
def test_a_peer_without_a_trusted_certificate_is_refused_at_the_handshake(tmp_path: Path, who: str,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        server, handler = serving(AAAH, tls=node_tls(tmp_path, AAAH))
        allow(server, FA1, VISIT)
        async with server:
            assert server.port is not None
            cer = Message.request("CER", [("Origin-Host", FA1), ("Origin-Realm", VISIT), ("Host-IP-Address", LO),
                                          ("Vendor-Id", 0), ("Product-Name", "raw"), ("Auth-Application-Id", 2)],
                                  hop_by_hop=1, end_to_end=1)
            if who == "plain-tcp":
                reader, writer = await asyncio.open_connection(LO, server.port)
            else:
                ctx = client_context(tmp_path, None if who == "no-certificate" else FA1, ca_dir="other")
                reader, writer = await tls_client(server.port, ctx)  # TLS 1.3: the client's side completes
            writer.write(cer.encode())
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                async with asyncio.timeout(5):
                    assert await reader.read(65536) == b""  # no CEA: refused (an alert or EOF)
            writer.close()
            await eventually(lambda: server.counters["tls_handshake_failed"] == 1)
            assert server.counters["received"] == 0 and not handler.seen
            assert server.result_codes_sent == {} and server.peers[FA1].conn is None
            assert not server.connections
            # the real peer still gets in
            c = secured(tmp_path, FA1, VISIT, listen=False)
            dial(c, server, AAAH, HOME)
            async with c:
                await c.wait_open(AAAH, 5)
        lines = [EventFormatter().format(r) for r in caplog.records]
        failed = [line for line in lines if "event=peer.tls.failed" in line]
        assert len(failed) == 1 and "address=127.0.0.1:" in failed[0] and "reason=" in failed[0], lines

    run(main())


def test_a_dialled_server_with_a_certificate_of_another_ca_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        server, handler = serving(AAAH, tls=node_tls(tmp_path, AAAH, ca_dir="other"))
        async with server:
            c = secured(tmp_path, FA1, VISIT, listen=False)
            allow(server, FA1, VISIT)
            dial(c, server, AAAH, HOME)
            async with c:
                await eventually(lambda: c.counters["tls_handshake_failed"] >= 1)
                assert not c.peers[AAAH].is_open and c.counters["received"] == 0
            assert server.counters["received"] == 0 and not handler.seen

    run(main())


# -- the certificate binds the Origin-Host ------------------------------------------------------


def test_a_cer_naming_another_configured_peer_than_the_certificate_gets_3010(tmp_path: Path) -> None:
    """fa2 holds a valid certificate of the CA, for fa2; its CER claims fa1 (also configured,
    same source address): 3010, counted apart, and fa1's own connection is untouched."""
    async def main() -> None:
        server, handler = serving(AAAH, tls=node_tls(tmp_path, AAAH))
        allow(server, FA1, VISIT)
        allow(server, FA2, VISIT)
        async with server:
            real = secured(tmp_path, FA1, VISIT, listen=False)
            dial(real, server, AAAH, HOME)
            async with real:
                await real.wait_open(AAAH, 5)
                live = server.peers[FA1].conn
                spoof = secured(tmp_path, FA1, VISIT, listen=False, cert_for=FA2)  # Origin-Host fa1, cert fa2
                dial(spoof, server, AAAH, HOME)
                async with spoof:
                    await eventually(lambda: spoof.result_codes_received[ResultCode.DIAMETER_UNKNOWN_PEER] >= 1)
                    assert not spoof.peers[AAAH].is_open
                assert server.counters["cer_certificate_mismatch"] >= 1
                assert server.result_codes_sent[ResultCode.DIAMETER_UNKNOWN_PEER] >= 1
                assert server.peers[FA1].conn is live and server.peers[FA1].is_open
                assert (await real.request(amr(real), timeout=5)).result_code == ResultCode.DIAMETER_SUCCESS
                assert [p.host for _, p in handler.seen] == [FA1]

    run(main())


def test_a_dialled_peer_whose_certificate_names_another_host_is_closed(tmp_path: Path) -> None:
    """The server answers CEA as aaah (the peer we dialled) with a valid certificate of the CA
    issued to another host: we close the connection, count it, and never send it a request."""
    async def main() -> None:
        server, handler = serving(AAAH, tls=node_tls(tmp_path, "ha.home.example"))
        async with server:
            c = secured(tmp_path, FA1, VISIT, listen=False)
            allow(server, FA1, VISIT)
            dial(c, server, AAAH, HOME)
            async with c:
                await eventually(lambda: c.counters["cea_certificate_mismatch"] >= 1)
                assert not c.peers[AAAH].is_open
            assert not handler.seen

    run(main())


# -- configuration ------------------------------------------------------------------------------


def aaaf_config(tmp: Path, **tls: Any) -> AAAFConfig:
    c = credentials(tmp, "aaaf1.visit-a.example")
    return AAAFConfig(node="aaaf1", role="aaaf", state_dir=tmp / "s", control_socket=tmp / "c",
                      diameter_host="aaaf1.visit-a.example", diameter_realm=VISIT,
                      diameter_tls=DiameterTls(**{"ca": c.ca, "cert": c.cert, "key": c.key, **tls}))


def test_tls_configuration_errors_name_the_field(tmp_path: Path) -> None:
    good = aaaf_config(tmp_path)
    assert config_tls(good, "aaaf1") is not None
    other = credentials(tmp_path, "fa1.visit-a.example")
    loose = tmp_path / "loose.key"
    loose.write_bytes(good.diameter_tls.key.read_bytes())  # type: ignore[union-attr]
    loose.chmod(0o644)
    for change, field in (({"ca": tmp_path / "nope.pem"}, "diameter_tls.ca"),
                          ({"cert": tmp_path / "nope.pem"}, "diameter_tls.cert"),
                          ({"key": loose}, "diameter_tls.key"),
                          ({"cert": other.cert, "key": other.key}, "diameter_tls.cert"),  # names another host
                          ({"key": other.key}, "diameter_tls.cert"),  # does not match the certificate
                          ({"keylog": tmp_path / "no" / "dir" / "keys"}, "diameter_tls.keylog")):
        with pytest.raises(ConfigError, match=rf"^aaaf1: {field.replace('.', r'[.]')}: "):
            config_tls(aaaf_config(tmp_path, **change), "aaaf1")
    with pytest.raises(ConfigError, match=r"^aaaf1: diameter_tls: missing"):
        config_tls(dataclasses.replace(good, diameter_tls=None), "aaaf1")
    with pytest.raises(ConfigError, match=r"^aaaf1: diameter_transport: must be one of tls, tcp"):
        config_tls(dataclasses.replace(good, diameter_transport="ssl"), "aaaf1")
    assert config_tls(dataclasses.replace(good, diameter_tls=None, diameter_transport="tcp"), "aaaf1") is None


def test_ports_follow_the_transport(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = dataclasses.replace(aaaf_config(tmp_path), address=IPv4Address(LO),
                                 home_servers=[DiameterPeer(AAAH, HOME, IPv4Address(LO))])
    assert ForeignAAAServer(config).diameter.peers[AAAH].port == 5658
    plain = dataclasses.replace(config, diameter_transport="tcp", diameter_tls=None)
    assert ForeignAAAServer(plain).diameter.peers[AAAH].port == 3868

    async def main() -> None:
        n = DiameterNode("x.visit-a.example", VISIT)
        async with n:
            pass

    run(main())
    assert any(r.levelname == "WARNING" and "event=diameter.plaintext" in EventFormatter().format(r)
               for r in caplog.records)


# -- tshark on a captured TLS exchange ------------------------------------------------------------


class Recorder:
    """A TCP relay between a client and a server that keeps every chunk, in order, per direction."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.chunks: list[tuple[bool, bytes]] = []  # (from the client, bytes)
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, LO, 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(LO, self.upstream)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    self.chunks.append((from_client, data))
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False))


def write_stream_pcap(path: Path, chunks: list[tuple[bool, bytes]], sport: int = 5658) -> None:
    from scapy.all import IP, TCP, Ether, wrpcap

    cli, srv, cport = "198.18.1.2", "198.18.1.3", 40000
    seq = {True: 1000, False: 5000}
    pkts = [Ether() / IP(src=cli, dst=srv) / TCP(sport=cport, dport=sport, flags="S", seq=999),
            Ether() / IP(src=srv, dst=cli) / TCP(sport=sport, dport=cport, flags="SA", seq=4999, ack=1000),
            Ether() / IP(src=cli, dst=srv) / TCP(sport=cport, dport=sport, flags="A", seq=1000, ack=5000)]
    for from_client, data in chunks:
        for i in range(0, len(data), 1400):
            part = data[i:i + 1400]
            src, dst, sp, dp = (cli, srv, cport, sport) if from_client else (srv, cli, sport, cport)
            pkts.append(Ether() / IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, flags="PA", seq=seq[from_client],
                                                               ack=seq[not from_client]) / part)
            seq[from_client] += len(part)
    for i, p in enumerate(pkts):
        p.time = 1_700_000_000 + i / 100
    wrpcap(str(path), pkts)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_decodes_tls_diameter_only_with_the_key_log(tmp_path: Path) -> None:
    keylog = tmp_path / "keys.log"

    async def main() -> list[tuple[bool, bytes]]:
        server, _ = serving(AAAH, tls=node_tls(tmp_path, AAAH))
        async with server:
            assert server.port is not None
            rec = Recorder(server.port)
            port = await rec.start()
            c = secured(tmp_path, FA1, VISIT, listen=False, keylog=keylog)
            allow(server, FA1, VISIT)
            c.add_peer(AAAH, HOME, LO, port)
            c.add_route(HOME, AAAH)
            async with c:
                await c.wait_open(AAAH, 5)
                assert (await c.request(amr(c), timeout=5)).result_code == ResultCode.DIAMETER_SUCCESS
            assert rec.server is not None
            rec.server.close()
            return rec.chunks

    chunks = run(main())
    pcap = tmp_path / "tls.pcap"
    write_stream_pcap(pcap, chunks)
    assert b"mn1@home.example" not in b"".join(d for _, d in chunks)  # the User-Name never in clear

    def tshark(*args: str, keys: bool = True) -> str:
        return subprocess.run(["tshark", "-n", "-r", str(pcap), *tshark_tls_options(keylog if keys else None), *args],
                              capture_output=True, text=True, check=True, timeout=120).stdout

    with_keys = tshark("-Y", "diameter", "-T", "fields", "-e", "diameter.cmd.code", "-e", "diameter.flags.request")
    seen = {tuple(line.split("\t")) for line in with_keys.splitlines()}
    assert {("257", "1"), ("257", "0"), ("260", "1"), ("260", "0"), ("282", "1"), ("282", "0")} <= seen, with_keys
    assert tshark("-Y", "_ws.malformed", "-T", "fields", "-e", "frame.number").split() == []
    versions = tshark("-Y", "tls.handshake.type == 2", "-T", "fields",
                      "-e", "tls.handshake.extensions.supported_version")
    assert versions.split() == ["0x0304"]  # TLS 1.3 (the ServerHello's supported_versions)
    # without the key log: TLS application data, no Diameter
    assert tshark("-Y", "diameter", "-T", "fields", "-e", "frame.number", keys=False).split() == []
    assert len(tshark("-Y", "tls.app_data", "-T", "fields", "-e", "frame.number", keys=False).split()) >= 4
