"""Sealed keys (daemons.vpn.seal): what the VPN-Sealed-Keys envelope binds, what opens it, and
how the daemons refuse seal keys that are not kept as files of their own (mode 0600)."""

from __future__ import annotations

import dataclasses
import secrets
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from daemons.agents.cngw import CorrespondentGateway
from daemons.agents.fa import ForeignAgent
from daemons.agents.ha import HomeAgent
from daemons.runtime.config import (
    CNGWConfig,
    ConfigError,
    DiameterPeer,
    FAConfig,
    HAConfig,
    PeerAgent,
    SealKey,
    read_key_file,
)
from daemons.runtime.secret import Secret
from daemons.vpn import seal
from daemons.vpn.path import EspSuite, SealedSecurity
from daemons.vpn.vpninfo import VpnInfo, decode_from_mip, encode_for_mip, moved_to
from daemons.wire.diameter.avp import decode_avps
from tests.unit.sealkit import key_file, seal_key
from tests.unit.test_vpninfo import NAI, info

DOMAIN, OTHER_DOMAIN = "visit-a.example", "visit-b.example"
KEY = seal_key(DOMAIN)


def key_material(original: VpnInfo) -> list[bytes]:
    sec = original.path.security
    return [sec.inbound.enc_key.reveal(), sec.outbound.enc_key.reveal(), sec.psk.reveal()]  # type: ignore[union-attr]


def on_the_wire(sealed: VpnInfo) -> VpnInfo:
    """The sealed path as a relay parses it off the wire (no key: it stays sealed)."""
    (back,) = decode_from_mip(encode_for_mip([sealed]), NAI)
    return back


def test_sealed_keys_cross_the_wire_opaque_and_open_only_for_their_recipient() -> None:
    original = info()
    sealed = seal.seal(KEY, DOMAIN, original)
    wire = encode_for_mip([sealed])
    assert [n for n, k in enumerate(key_material(original)) if k in wire] == []
    names = [a.name for a in decode_avps(wire)[0].value]
    assert "VPN-Sealed-Keys" in names and not {"VPN-Key-In", "VPN-Key-Out", "VPN-IKE-PSK"} & set(names)
    relayed = on_the_wire(sealed)
    assert isinstance(relayed.path.security, SealedSecurity) and relayed.sealed
    blob = relayed.path.security.blob
    assert blob[0] == 1 and blob[1:9] == seal.key_id(KEY, DOMAIN) and len(blob) > 1 + 8 + 12 + 16
    assert (relayed.path.security.spi_in, relayed.path.security.spi_out) == \
        (original.path.security.inbound.spi, original.path.security.outbound.spi)  # type: ignore[union-attr]
    assert "sealed=" in repr(relayed) and blob.hex() not in repr(relayed)
    assert seal.unseal(KEY, DOMAIN, relayed) == original
    assert seal.unseal(KEY, DOMAIN.upper(), relayed) == original  # names are case-insensitive, as realms
    # Two seals of the same keys differ (a fresh nonce each time).
    assert seal.seal(KEY, DOMAIN, original).path.security != sealed.path.security


def test_another_domains_key_or_another_recipient_cannot_open() -> None:
    relayed = on_the_wire(seal.seal(KEY, DOMAIN, info()))
    with pytest.raises(seal.SealError, match="another recipient or key"):
        seal.unseal(seal_key(OTHER_DOMAIN), OTHER_DOMAIN, relayed)
    with pytest.raises(seal.SealError, match="another recipient or key"):
        seal.unseal(KEY, OTHER_DOMAIN, relayed)  # the right key under another name
    with pytest.raises(seal.SealError):
        seal.unseal(seal_key(OTHER_DOMAIN), DOMAIN, relayed)


@pytest.mark.parametrize("at", [0, 1, 8, 9, 20, 21, 30, -17, -1], ids=lambda at: f"byte{at}")
def test_any_changed_byte_of_the_envelope_fails_to_open(at: int) -> None:
    sec = on_the_wire(seal.seal(KEY, DOMAIN, info())).path.security
    assert isinstance(sec, SealedSecurity)
    blob = bytearray(sec.blob)
    blob[at] ^= 0x40
    changed = on_the_wire(seal.seal(KEY, DOMAIN, info()))
    changed = dataclasses.replace(changed, path=dataclasses.replace(
        changed.path, security=dataclasses.replace(sec, blob=bytes(blob))))
    with pytest.raises(seal.SealError):
        seal.unseal(KEY, DOMAIN, changed)
    with pytest.raises(seal.SealError):  # cut short
        seal.unseal(KEY, DOMAIN, dataclasses.replace(changed, path=dataclasses.replace(
            changed.path, security=dataclasses.replace(sec, blob=sec.blob[:-1]))))


def with_security(info_: VpnInfo, **change: Any) -> VpnInfo:
    return dataclasses.replace(info_, path=dataclasses.replace(
        info_.path, security=dataclasses.replace(info_.path.security, **change)))


@pytest.mark.parametrize("what", ["spi-in", "spi-out", "nai", "path-id", "suite"])
def test_the_envelope_is_bound_to_user_path_spis_and_suite(what: str) -> None:
    """Moving an envelope to another user, path, SPI or suite makes it fail: the keys of one
    path cannot be replayed for another."""
    relayed = on_the_wire(seal.seal(KEY, DOMAIN, info()))
    sec = relayed.path.security
    assert isinstance(sec, SealedSecurity) and sec.spi_in is not None and sec.spi_out is not None
    changed = {
        "spi-in": lambda: with_security(relayed, spi_in=sec.spi_in + 1),  # type: ignore[operator]
        "spi-out": lambda: with_security(relayed, spi_out=sec.spi_out + 1),  # type: ignore[operator]
        "nai": lambda: dataclasses.replace(relayed, nai="mallory@home.example"),
        "path-id": lambda: dataclasses.replace(relayed, path_id=7),
        "suite": lambda: with_security(relayed, suite=EspSuite.AES256GCM16),
    }[what]()
    with pytest.raises(seal.SealError, match="does not authenticate"):
        seal.unseal(KEY, DOMAIN, changed)


def test_endpoints_may_move_the_keys_stay() -> None:
    """Claim 17: the local AAA moves the FA end FA1 -> FA2 of its sealed copy; FA2 opens it."""
    original = info()
    relayed = on_the_wire(seal.seal(KEY, DOMAIN, original))
    fa2 = IPv4Address("198.18.0.22")
    (moved,) = moved_to([relayed], fa2)
    assert moved.sealed and moved.path.local.address == fa2
    opened = seal.unseal(KEY, DOMAIN, on_the_wire(moved))
    assert opened.path.local.address == fa2 and opened.path.security == original.path.security


def test_errors_name_no_secret() -> None:
    original = info()
    relayed = on_the_wire(seal.seal(KEY, DOMAIN, original))
    with pytest.raises(seal.SealError) as e:
        seal.unseal(seal_key(OTHER_DOMAIN), OTHER_DOMAIN, relayed)
    text = str(e.value)
    assert [n for n, k in enumerate([*key_material(original), KEY.reveal()]) if k.hex() in text] == []
    with pytest.raises(seal.SealError):
        seal.seal(Secret(b"short"), DOMAIN, original)
    with pytest.raises(seal.SealError, match="already sealed"):
        seal.seal(KEY, DOMAIN, relayed)
    with pytest.raises(seal.SealError, match="no sealed keys"):
        seal.unseal(KEY, DOMAIN, original)
    assert "***" in repr(seal.Recipient(DOMAIN, KEY)) and KEY.reveal().hex() not in repr(seal.Recipient(DOMAIN, KEY))


# ---- key files -----------------------------------------------------------------------------------


def test_key_files_must_be_private_and_256_bits(tmp_path: Path) -> None:
    ref = key_file(tmp_path, DOMAIN)
    assert read_key_file(ref, "fa.yaml", "seal.key_file") == KEY
    ref.key_file.chmod(0o640)
    with pytest.raises(ConfigError, match=r"fa.yaml: seal.key_file: .* mode 0640"):
        read_key_file(ref, "fa.yaml", "seal.key_file")
    ref.key_file.chmod(0o600)
    ref.key_file.write_text(secrets.token_hex(16))
    with pytest.raises(ConfigError, match="must hold 64 hex digits") as e:
        read_key_file(ref, "fa.yaml", "seal.key_file")
    assert ref.key_file.read_text() not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_key_file(SealKey(DOMAIN, tmp_path / "nope.key"), "fa.yaml", "seal.key_file")


def test_agents_that_install_sealed_paths_refuse_to_start_without_their_key(tmp_path: Path) -> None:
    common: dict[str, Any] = {"state_dir": tmp_path / "s", "control_socket": tmp_path / "c.sock"}
    fa = FAConfig(node="fa1", role="fa", care_of_address=IPv4Address("198.18.0.14"),
                  access_address=IPv4Address("198.18.20.1"),
                  aaa=DiameterPeer("aaaf1.visit-a.example", DOMAIN, IPv4Address("198.18.0.9")), **common)
    with pytest.raises(ConfigError, match=r"fa1 \(fa\): seal: missing"):
        ForeignAgent(fa)
    ha = HAConfig(node="ha", role="ha", address=IPv4Address("198.18.100.1"), home_prefix=IPv4Network("198.18.100.0/24"),
                  diameter_host="ha.home.example", diameter_realm="home.example", **common)
    with pytest.raises(ConfigError, match=r"ha \(ha\): seal: missing"):
        HomeAgent(ha)
    gw = CNGWConfig(node="cngw2", role="cngw", address=IPv4Address("198.18.0.30"),
                    home_agents=[PeerAgent(IPv4Address("198.18.100.1"), 0x5000, Secret(b"k" * 16))], **common)
    with pytest.raises(ConfigError, match=r"cngw2 \(cngw\): seal: missing"):
        CorrespondentGateway(gw)
    ref = key_file(tmp_path, DOMAIN)
    ref.key_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"fa1 \(fa\): seal.key_file: .*chmod 600"):
        ForeignAgent(dataclasses.replace(fa, seal=ref))
    ref.key_file.chmod(0o600)
    assert ForeignAgent(dataclasses.replace(fa, seal=ref)).seal is not None
