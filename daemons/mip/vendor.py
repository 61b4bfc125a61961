"""Our data inside Mobile IP messages: RFC 3115 vendor extensions under Vendor-Id 32473.

The payloads (VPN info, previous FA, service update) are opaque bytes here; their formats
are defined by the modules that own them.  Use CVSE (critical, type 38) when a receiver
that does not understand the data must reject the registration, NVSE (type 134) when it
may ignore it.
"""

from __future__ import annotations

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
