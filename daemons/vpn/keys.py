"""Key material for VPN paths.

Per-user keys come fresh from the CSPRNG at every registration: the ESP keys (``new_esp_key``)
and the IKE pre-shared secret of each of the user's paths (``new_psk``: the strongswan backend
runs one IKE_SA per path, daemons/vpn/strongswan/backend.py), so a re-registration rotates them.
A standing tunnel between two gateways (to a static CN-GW) is the pair's, not a user's: its PSK is
derived from the AAA domain's master secret and the two addresses (``pair_psk``), so every
party that holds the master secret (the AAAH, the provisioning of static paths) gets the same
value without storing one per pair. A smooth-handoff forwarding path's PSK is derived by both
FAs from their shared key and that path's SPIs (``forward_psk``).
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


def forward_psk(fa_fa_key: Secret, a: IPv4Address | str, spi_at_a: int, b: IPv4Address | str,
                spi_at_b: int) -> Secret:
    """The IKE PSK of one forwarding path between two FAs: bound to its two ends and the SPI each
    receives on (random per path), so each forwarding path has its own; both FAs compute it."""
    ends = sorted((IPv4Address(a).packed + spi_at_a.to_bytes(4, "big"),
                   IPv4Address(b).packed + spi_at_b.to_bytes(4, "big")))
    label = b"mipvpn forward psk " + b"".join(ends)
    return Secret(hmac.new(fa_fa_key.reveal(), label, hashlib.sha256).digest())


def new_psk() -> Secret:
    """A user path's IKE PSK, fresh at every registration (256 bits)."""
    return Secret(secrets.token_bytes(32))


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
