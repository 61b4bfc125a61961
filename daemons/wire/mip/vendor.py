"""Our data inside Mobile IP messages: RFC 3115 vendor extensions under Vendor-Id 32473.

The payloads (VPN info, previous FA, service update, the MN-AAAF authenticator of
``localanswer``) are opaque bytes here; their formats
are defined by the modules that own them.  Use CVSE (critical, type 38) when a receiver
that does not understand the data must reject the registration, NVSE (type 134) when it
may ignore it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from .constants import (
    VENDOR_ID,
    VENDOR_TYPE_LOCAL_ANSWER,
    VENDOR_TYPE_PREVIOUS_FA,
    VENDOR_TYPE_SERVICE_UPDATE,
    VENDOR_TYPE_VPN_INFO,
)
from .errors import DecodeError
from .extensions import CVSEExtension, Extension, NVSEExtension, VendorExtension

__all__ = [
    "VENDOR_ID",
    "VENDOR_TYPE_LOCAL_ANSWER",
    "VENDOR_TYPE_PREVIOUS_FA",
    "VENDOR_TYPE_SERVICE_UPDATE",
    "VENDOR_TYPE_VPN_INFO",
    "ServiceUpdate",
    "find_vendor_data",
    "previous_fa",
    "previous_fa_extension",
    "requests_service_update",
    "service_update",
    "service_update_extension",
    "vendor_extension",
]


def vendor_extension(vendor_type: int, data: bytes, *, critical: bool) -> VendorExtension:
    """A CVSE (``critical=True``) or NVSE carrying ``data`` under our Vendor-Id 32473."""
    cls = CVSEExtension if critical else NVSEExtension
    return cls(vendor_type=vendor_type, data=bytes(data), vendor_id=VENDOR_ID)


def find_vendor_data(
    extensions: list[Extension], vendor_type: int, vendor_id: int = VENDOR_ID
) -> bytes | None:
    """Payload of the first CVSE/NVSE with ``vendor_id``/``vendor_type`` in ``extensions``."""
    for ext in extensions:
        if (
            isinstance(ext, VendorExtension)
            and ext.vendor_id == vendor_id
            and ext.vendor_type == vendor_type
        ):
            return ext.data
    return None


def previous_fa_extension(care_of_address: IPv4Address | str) -> VendorExtension:
    """NVSE naming the foreign agent the MN was registered through before this one (its
    care-of address, 4 octets). Normal (skippable): an agent that does not know it may
    ignore it; ours use it to notify the previous FA (smooth handoff, F2/F6)."""
    return vendor_extension(VENDOR_TYPE_PREVIOUS_FA, IPv4Address(care_of_address).packed, critical=False)


def previous_fa(extensions: list[Extension]) -> IPv4Address | None:
    """The previous FA's care-of address, if the extensions name one (malformed → None)."""
    data = find_vendor_data(extensions, VENDOR_TYPE_PREVIOUS_FA)
    return IPv4Address(data) if data is not None and len(data) == 4 else None


# ---- service update (F7, claim 24) -----------------------------------------------------------

SERVICE_UPDATE_VERSION = 1
_SERVICE_UPDATE = struct.Struct("!BBH")


@dataclass(frozen=True)
class ServiceUpdate:
    """The payload of the service-update NVSE (vendor type 3): the MN asks its home AAA server
    to rebuild and redistribute its VPN information from the (changed) profile, instead of
    anyone answering from a cache.

    Wire format, 4 octets::

        version(8) = 1 | reserved(8) = 0 | sequence(16)

    ``sequence`` numbers the MN's service-update requests (it wraps at 2**16), so the logs of
    the MN, the AAAF and the AAAH can tell one request from the next.
    """

    sequence: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.sequence <= 0xFFFF:
            raise ValueError("sequence out of range (0..65535)")

    def encode(self) -> bytes:
        return _SERVICE_UPDATE.pack(SERVICE_UPDATE_VERSION, 0, self.sequence)

    @classmethod
    def decode(cls, data: bytes) -> ServiceUpdate:
        if len(data) != _SERVICE_UPDATE.size:
            raise DecodeError(f"service update: {len(data)} octets, expected {_SERVICE_UPDATE.size}")
        version, reserved, sequence = _SERVICE_UPDATE.unpack(data)
        if version != SERVICE_UPDATE_VERSION:
            raise DecodeError(f"service update: unknown version {version}")
        if reserved:
            raise DecodeError("service update: reserved octet not zero")
        return cls(sequence)


def service_update_extension(sequence: int = 0) -> VendorExtension:
    """NVSE (vendor 32473, type 3) asking for a service update. Normal (skippable): an agent
    that does not know it relays the registration unchanged; the AAA servers act on it."""
    return vendor_extension(VENDOR_TYPE_SERVICE_UPDATE, ServiceUpdate(sequence).encode(), critical=False)


def requests_service_update(extensions: list[Extension]) -> bool:
    """True if the extensions carry a service-update vendor extension (well-formed or not:
    whoever could answer from a cache must not, either way)."""
    return find_vendor_data(extensions, VENDOR_TYPE_SERVICE_UPDATE) is not None


def service_update(extensions: list[Extension]) -> ServiceUpdate | None:
    """The service-update request in the extensions, if there is a well-formed one."""
    data = find_vendor_data(extensions, VENDOR_TYPE_SERVICE_UPDATE)
    if data is None:
        return None
    try:
        return ServiceUpdate.decode(data)
    except DecodeError:
        return None
