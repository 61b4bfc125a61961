"""A lab's certificate authority and the certificates it issues (``cryptography.x509``, EC P-256).

Made fresh per lab (short validity), never reused: the CA key lives only in the lab's own
directory (mode 0600) and signs one certificate per node that speaks TLS (Diameter peers,
the relay, the profile API). Every private key file is written 0600. The certificates name
the node the way its peers check it: subjectAltName DNS = its identity (a Diameter node's
Origin-Host), plus its IP addresses if given.

    ca = make_ca(run_dir / "pki")                       # ca.pem (+ ca.key, 0600), or load it again
    files = issue(ca, "aaah.home.example", node_dir, ips=["198.18.0.6"])
    files.cert, files.key, ca.cert_path                 # PEM paths for a configuration

Both server and client use (``extendedKeyUsage`` serverAuth + clientAuth): the Diameter peers
authenticate each other mutually (RFC 6733 §13) and each may dial or be dialled.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
VALIDITY = datetime.timedelta(days=7)  # a lab lives for hours: a week is plenty, and short
SKEW = datetime.timedelta(minutes=5)  # not-before this much in the past (clocks of namespaces are one clock)


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate (and where it is written) and its private key (in memory)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path


@dataclass(frozen=True)
class Issued:
    """The PEM files of one issued certificate and its key (the key file is 0600)."""

    cert: Path
    key: Path


def write_private(path: Path, data: bytes) -> None:
    """Write a file that only its owner may read (0600 before any byte is in it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: Path, name: str = "mipvpn lab CA") -> Authority:
    """The CA in ``directory``: made there (``ca.pem``, ``ca.key`` 0600) if it is not there yet,
    else loaded, so that every part of one lab's provisioning issues under the same CA."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return Authority(cert, key, cert_path)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(cert, key, cert_path)


def issue(ca: Authority, name: str, directory: Path, *, ips: Iterable[str | ipaddress.IPv4Address] = (),
          stem: str = "tls") -> Issued:
    """A fresh P-256 key and a certificate for ``name`` (subjectAltName DNS ``name`` and the
    ``ips``), signed by ``ca``, for TLS servers and clients alike: ``DIRECTORY/STEM.pem`` and
    ``DIRECTORY/STEM.key`` (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    sans += [x509.IPAddress(ipaddress.ip_address(str(ip))) for ip in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW).not_valid_after(min(now + VALIDITY, ca.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    out = Issued(directory / f"{stem}.pem", directory / f"{stem}.key")
    write_private(out.key, _key_pem(key))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


__all__ = ["CA_CERT", "CA_KEY", "Authority", "Issued", "issue", "make_ca", "write_private"]
