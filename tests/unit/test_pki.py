"""The lab's CA and certificates (daemons.provision.pki): what a TLS peer checks is there, key
files are 0600, and Python's ssl verifies an issued certificate against the CA (and not another's)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from daemons.provision import pki


def test_ca_is_made_once_and_issues_certificates_for_a_name(tmp_path: Path) -> None:
    ca = pki.make_ca(tmp_path / "pki")
    assert pki.make_ca(tmp_path / "pki").cert == ca.cert  # loaded again, not made anew
    assert stat.S_IMODE((tmp_path / "pki" / pki.CA_KEY).stat().st_mode) == 0o600
    issued = pki.issue(ca, "aaah.home.example", tmp_path / "aaah", ips=["198.18.0.6"])
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["aaah.home.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["198.18.0.6"]
    assert cert.issuer == ca.cert.subject
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Python's ssl takes it, and verifies it under this CA only
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.load_cert_chain(issued.cert, issued.key)
    other = pki.make_ca(tmp_path / "other")
    store = ssl.create_default_context(cafile=str(other.cert_path))
    assert store.get_ca_certs()[0]["subject"] == ctx.get_ca_certs()[0]["subject"]  # same name, another key
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(other.cert)
    cert.verify_directly_issued_by(ca.cert)
