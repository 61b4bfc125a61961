"""The service-update NVSE (vendor 32473, type 3; F7, claim 24): codec round trips, garbage
raises DecodeError only, and the RRQ carries it where the MN-AAA authenticator covers it."""

from __future__ import annotations

import subprocess
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemons.runtime.config import SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.wire import mip
from daemons.wire.mip.vendor import (
    ServiceUpdate,
    requests_service_update,
    service_update,
    service_update_extension,
)


@given(st.integers(min_value=0, max_value=0xFFFF))
def test_payload_round_trip(sequence: int) -> None:
    wire = ServiceUpdate(sequence).encode()
    assert len(wire) == 4
    assert wire[:2] == b"\x01\x00"
    assert ServiceUpdate.decode(wire) == ServiceUpdate(sequence)


@given(st.binary(max_size=16))
def test_garbage_payload_raises_decode_error_only(data: bytes) -> None:
    try:
        decoded = ServiceUpdate.decode(data)
    except mip.DecodeError:
        return
    assert decoded.encode() == data  # whatever decodes is canonical


@pytest.mark.parametrize("data", [b"", b"\x01\x00\x00", b"\x02\x00\x00\x01", b"\x01\x01\x00\x01",
                                  b"\x01\x00\x00\x01\x00"])
def test_malformed_payloads(data: bytes) -> None:
    with pytest.raises(mip.DecodeError):
        ServiceUpdate.decode(data)


def test_sequence_out_of_range_is_refused_when_building() -> None:
    with pytest.raises(ValueError):
        ServiceUpdate(0x10000)


def _rrq(*extensions: mip.Extension) -> mip.RegistrationRequest:
    return mip.RegistrationRequest(home_address="198.18.100.10", home_agent="198.18.100.1",
                                   care_of_address="198.18.0.14", identification=mip.ntp_identification(time.time()),
                                   lifetime=300, extensions=[mip.NAIExtension("mn1@home.example"), *extensions])


def _signed(key: Secret, *extensions: mip.Extension) -> mip.RegistrationRequest:
    """The same request as the MN builds it without a challenge: NAI, ``extensions``, MN-HA."""
    return mip.registration_request(home_address="198.18.100.10", home_agent="198.18.100.1",
                                    care_of_address="198.18.0.14", identification=mip.ntp_identification(time.time()),
                                    lifetime=300, nai="mn1@home.example", extensions=extensions,
                                    mn_ha=SecurityAssociation(0x1000, key))


def test_nvse_in_an_rrq_round_trips_and_is_skippable() -> None:
    ext = service_update_extension(7)
    assert isinstance(ext, mip.NVSEExtension)
    assert (ext.vendor_id, ext.vendor_type) == (32473, mip.VENDOR_TYPE_SERVICE_UPDATE)
    key = Secret(b"k" * 16)
    rrq = _signed(key, ext)
    wire = rrq.encode()
    back = mip.decode_message(wire)
    assert isinstance(back, mip.RegistrationRequest)
    assert back.encode() == wire
    assert requests_service_update(back.extensions)
    assert service_update(back.extensions) == ServiceUpdate(7)
    assert mip.verify(wire, mip.EXT_MN_HA_AUTH, key, spi=0x1000)  # covered by the authenticator
    # Type 134 on the wire: skippable (RFC 5944 §1.9), so an agent that does not know it relays it.
    # type 134, length 12 (reserved 2 + vendor-id 4 + vendor-type 2 + data 4), vendor 32473, type 3.
    assert bytes([134, 12, 0, 0]) + (32473).to_bytes(4, "big") + b"\x00\x03" + b"\x01\x00\x00\x07" in wire


def test_no_or_malformed_nvse() -> None:
    assert not requests_service_update(_rrq().extensions)
    assert service_update(_rrq().extensions) is None
    bad = mip.vendor_extension(mip.VENDOR_TYPE_SERVICE_UPDATE, b"\x09", critical=False)
    assert requests_service_update(_rrq(bad).extensions)  # asked for, even if unreadable
    assert service_update(_rrq(bad).extensions) is None
    other_vendor = mip.NVSEExtension(mip.VENDOR_TYPE_SERVICE_UPDATE, ServiceUpdate(1).encode(), vendor_id=5535)
    assert not requests_service_update(_rrq(other_vendor).extensions)


def test_tshark_decodes_the_nvse(tmp_path) -> None:
    """tshark's own mip dissector shows our NVSE's vendor id, type and value."""
    pytest.importorskip("scapy")
    from scapy.all import IP, UDP, Raw, wrpcap

    wire = _signed(Secret(b"k" * 16), service_update_extension(0x0102)).encode()
    pcap = tmp_path / "su.pcap"
    wrpcap(str(pcap), [IP(src="198.18.101.10", dst="198.18.101.1") / UDP(sport=40000, dport=434) / Raw(wire)])
    try:
        out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "mip.ext.nvse.vendor_id",
                              "-e", "mip.ext.nvse.vendor_type", "-e", "mip.ext.nvse.vendor_value"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except FileNotFoundError:
        pytest.skip("no tshark")
    vendor_id, vendor_type, value = out.strip().split("\t")
    assert vendor_id == "32473" and vendor_type == "3"
    assert value.replace(":", "") == "01000102"
