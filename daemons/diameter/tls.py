"""Diameter over TLS (RFC 6733 §2.1, §13): TLS from the first byte of a connection, TLS 1.3
only, both ends authenticated by certificates of one configured CA (Python's ``ssl``).

:func:`contexts` makes the two ``ssl.SSLContext`` a node needs (it accepts with one and dials
with the other). Both verify the other end's certificate chain (``CERT_REQUIRED``), neither
checks a name: who a connection's peer is stays decided in one place,
:meth:`daemons.diameter.peer.PeerTable.identify`, which compares the certificate's
subjectAltName DNS names (:func:`peer_names`) with the Origin-Host of the CER or CEA.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Tls:
    """The node's TLS contexts: ``server`` for accepted connections, ``client`` for dialled ones."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    keylog: Path | None = None


@dataclass(frozen=True)
class TlsSession:
    """What a connection's TLS session says about the other end (after the handshake)."""

    version: str  # e.g. "TLSv1.3"
    cipher: str
    dns_names: tuple[str, ...]  # the peer certificate's subjectAltName DNS entries

    def names(self, host: str) -> bool:
        """Whether the certificate names Diameter identity ``host`` (DNS SAN, case-insensitive)."""
        return host.lower() in {n.lower() for n in self.dns_names}


def _context(purpose: int, ca: Path, cert: Path, key: Path, keylog: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the name is checked against the CER/CEA (PeerTable.identify)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    if keylog is not None:
        ctx.keylog_filename = str(keylog)
    return ctx


def contexts(ca: Path, cert: Path, key: Path, keylog: Path | None = None) -> Tls:
    """Server and client contexts for a node holding ``cert``/``key``, trusting CA ``ca``.

    ``keylog``: write the TLS secrets there (NSS key log format, for Wireshark) — a lab and
    debugging aid only. Raises ``ssl.SSLError``/``OSError`` for unusable files.
    """
    return Tls(_context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key, keylog),
               _context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key, keylog), keylog)


def session_of(ssl_object: Any) -> TlsSession | None:
    """The session of a connection (``writer.get_extra_info("ssl_object")``); None for plain TCP."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert() or {}
    names = tuple(str(v) for k, v in cert.get("subjectAltName", ()) if k == "DNS")
    cipher = ssl_object.cipher()
    return TlsSession(str(ssl_object.version()), cipher[0] if cipher else "-", names)


def reason(exc: BaseException) -> str:
    """A handshake failure as logs print it (the ssl module's reason, never key material)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or type(exc).__name__)
    if isinstance(exc, TimeoutError):
        return "handshake timeout"
    return type(exc).__name__


__all__ = ["Tls", "TlsSession", "contexts", "reason", "session_of"]
