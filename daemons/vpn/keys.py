"""Key material for VPN paths.

Per-user ESP keys come fresh from the CSPRNG at every registration (``new_esp_key``). The
IKE pre-shared secret belongs to a gateway *pair* (the strongswan backend runs one IKE_SA
per pair, see daemons/vpn/strongswan/backend.py), so it is derived from the AAA domain's master
secret and the two gateway addresses: every party that holds the master secret (the AAAH,
and the provisioning of static paths) gets the same value without storing one per pair.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from ipaddress import IPv4Address

from daemons.runtime.secret import Secret
from daemons.vpn.path import EspSuite


def pair_psk(master: Secret, a: IPv4Address | str, b: IPv4Address | str) -> Secret:
    low, high = sorted((IPv4Address(a), IPv4Address(b)))
    label = b"mipvpn ike psk " + low.packed + high.packed
    return Secret(hmac.new(master.reveal(), label, hashlib.sha256).digest())


def static_esp_key(master: Secret, src: IPv4Address | str, dst: IPv4Address | str, spi: int,
                   suite: EspSuite) -> Secret:
    """Deterministic keys for a static path (both ends are provisioned, no AAA involved)."""
    label = b"mipvpn static esp " + IPv4Address(src).packed + IPv4Address(dst).packed + spi.to_bytes(4, "big")
    need = suite.enc_key_len + suite.auth_key_len
    material = b""
    counter = 0
    while len(material) < need:
        material += hmac.new(master.reveal(), label + bytes([counter]), hashlib.sha256).digest()
        counter += 1
    return Secret(material[:need])


def new_esp_key(suite: EspSuite) -> Secret:
    return Secret(secrets.token_bytes(suite.enc_key_len + suite.auth_key_len))


def static_spi(src: IPv4Address | str, dst: IPv4Address | str) -> int:
    """SPI of the static path's SA from ``src`` to ``dst``: 0x100-0xFFF, derived from the
    pair and direction so both ends agree without talking; SPIs the AAAH hands out per
    registration start at 0x10000, so the two never meet."""
    digest = hashlib.sha256(b"mipvpn static spi " + IPv4Address(src).packed + IPv4Address(dst).packed).digest()
    return 0x100 + int.from_bytes(digest[:2], "big") % 0xF00
