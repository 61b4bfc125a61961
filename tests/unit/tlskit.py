"""TLS credentials for unit tests: one CA per test directory (``daemons.provision.pki``, as the
lab makes them), a certificate per Diameter identity, as a daemon's ``diameter_tls`` or as the
engine's contexts."""

from __future__ import annotations

from pathlib import Path

from daemons.diameter.tls import Tls, contexts
from daemons.provision import pki
from daemons.runtime.config import DiameterTls


def credentials(tmp: Path, host: str, *, ca_dir: str = "pki", keylog: Path | None = None) -> DiameterTls:
    """``host``'s certificate and key under the CA of ``tmp/ca_dir`` (made on first use)."""
    ca = pki.make_ca(tmp / ca_dir)
    issued = pki.issue(ca, host, tmp / ca_dir / "issued" / host)
    return DiameterTls(ca.cert_path, issued.cert, issued.key, keylog)


def node_tls(tmp: Path, host: str, *, ca_dir: str = "pki", keylog: Path | None = None) -> Tls:
    """The engine's TLS contexts for ``host`` (``DiameterNode(..., tls=...)``)."""
    c = credentials(tmp, host, ca_dir=ca_dir, keylog=keylog)
    return contexts(c.ca, c.cert, c.key, c.keylog)


DIAMETER_TLS_PORT = 5658


def tshark_tls_options(keylog: Path | None) -> list[str]:
    """tshark options that show Diameter over TLS: tshark 4.0 maps TLS to Diameter on port 5868
    only (not the IANA "diameters" port 5658 that RFC 6733 §2.1 uses), and its RDP multi-transport
    heuristic takes the first application record of a TLS session for itself. ``keylog``: the
    TLS secrets (NSS key log) to decrypt with; None: decode as TLS only."""
    opts = ["-d", f"tls.port=={DIAMETER_TLS_PORT},diameter", "--disable-protocol", "rdpmt"]
    if keylog is not None:
        opts += ["-o", f"tls.keylog_file:{keylog}"]
    return opts
