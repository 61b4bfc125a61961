"""Our data inside Mobile IP messages: RFC 3115 vendor extensions under Vendor-Id 32473.

The payloads (VPN info, previous FA, service update) are opaque bytes here; their formats
are defined by the modules that own them.  Use CVSE (critical, type 38) when a receiver
that does not understand the data must reject the registration, NVSE (type 134) when it
may ignore it.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from .constants import (
    VENDOR_ID,
    VENDOR_TYPE_PREVIOUS_FA,
    VENDOR_TYPE_SERVICE_UPDATE,
    VENDOR_TYPE_VPN_INFO,
)
from .extensions import CVSEExtension, Extension, NVSEExtension, VendorExtension

__all__ = [
    "VENDOR_ID",
    "VENDOR_TYPE_PREVIOUS_FA",
    "VENDOR_TYPE_SERVICE_UPDATE",
    "VENDOR_TYPE_VPN_INFO",
    "find_vendor_data",
    "previous_fa",
    "previous_fa_extension",
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
