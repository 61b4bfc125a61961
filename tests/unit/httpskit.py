"""Throwaway TLS credentials for tests on loopback: a CA made with the lab's PKI module
(``daemons.provision.pki``) and a server certificate for 127.0.0.1 / localhost."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from daemons.aaa.profileapi import server_context
from daemons.provision import pki

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TestPki:
    ca: pki.Authority
    server: pki.Issued

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.server.cert, self.server.key)

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server against this CA only (chain and host name)."""
        return ssl.create_default_context(cafile=str(self.ca.cert_path))


def make_pki(directory: Path, name: str = "localhost", ips: tuple[str, ...] = (LOOPBACK,)) -> TestPki:
    ca = pki.make_ca(directory / "ca")
    return TestPki(ca, pki.issue(ca, name, directory / name, ips=ips))
