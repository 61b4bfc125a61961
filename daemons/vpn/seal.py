"""Key material sealed end to end, from the home AAA server to the agent that installs a path.

The AAAH shares a 256-bit *seal key* with every agent that installs paths: each HA and each
dynamic CN-GW (named by its own identity), and the FAs of one visited domain together (named
by the domain's realm: any FA of the domain must open the copy the local AAA cached for an
intra-domain move, claim 17, and the local AAA must not). It seals each path's keys for the
path's recipient; whoever carries the VPN info on (the local AAA, a Diameter relay, the HA for
a CN-GW's copy) holds an opaque envelope, the ``VPN-Sealed-Keys`` AVP inside VPN-Info
(docs/protocol.md)::

    version (1) = 1 | key id (8) | nonce (12) | AES-256-GCM ciphertext + tag (16)

* key id: the first 8 octets of HMAC-SHA256(seal key, "mipvpn seal v1 key id" | recipient):
  tells a recipient an envelope is not under its key (another domain's, an old key) without
  trying it, and tells nobody anything about the key;
* the AEAD key: HKDF-SHA256(seal key, info "mipvpn seal v1 aes-256-gcm");
* plaintext: TLVs ``type (1) | length (2) | value``: 1 the inbound key, 2 the outbound key
  (ESP key, with salt for GCM, then the integrity key), 3 the IKE PSK;
* additional data (what the envelope is bound to, and must not change on the way): version,
  recipient, NAI, path id, SPI-In, SPI-Out, ESP suite. Not the endpoints: the local AAA and the
  HA move a path's FA end on intra-domain moves, and the keys stay.

Pure functions: no I/O, no key look-up (the daemons hold their keys, ``daemons.runtime.config``
reads the key files). Failures raise :class:`SealError`, whose text names no secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from daemons.runtime.secret import Secret
from daemons.vpn.path import DirectionKeys, SealedSecurity, SecurityService
from daemons.vpn.vpninfo import VpnInfo, direction_keys, spis_of

VERSION = 1
KEY_BYTES = 32  # a seal key: 256 bits
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = 1 + KEY_ID_BYTES + NONCE_BYTES
T_KEY_IN, T_KEY_OUT, T_PSK = 1, 2, 3


class SealError(ValueError):
    """An envelope that cannot be made or opened (wrong key, tampered, not a path of ours)."""


def _check_key(key: Secret) -> bytes:
    raw = key.reveal()
    if len(raw) != KEY_BYTES:
        raise SealError(f"a seal key is {KEY_BYTES} bytes, not {len(raw)}")
    return raw


def _name(recipient: str) -> bytes:
    if not recipient:
        raise SealError("no recipient")
    return recipient.lower().encode()


def key_id(key: Secret, recipient: str) -> bytes:
    """The envelope's key id for ``recipient`` under ``key``."""
    return hmac.new(_check_key(key), b"mipvpn seal v1 key id" + _name(recipient), hashlib.sha256).digest()[
        :KEY_ID_BYTES]


def _aead(key: Secret) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"mipvpn seal v1 aes-256-gcm")
    return AESGCM(hkdf.derive(_check_key(key)))


def _lv(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def additional_data(recipient: str, info: VpnInfo) -> bytes:
    """What an envelope is bound to: recipient, NAI, path id, SPIs, suite (not the endpoints)."""
    spis = spis_of(info.path.security) or (0, 0)
    return (b"mipvpn VPN-Sealed-Keys" + bytes([VERSION]) + _lv(_name(recipient)) + _lv(info.nai.encode())
            + struct.pack("!III", info.path_id, *spis) + _lv(info.path.security.suite.value.encode()))


def _key_bytes(keys: DirectionKeys) -> bytes:
    return keys.enc_key.reveal() + (keys.auth_key.reveal() if keys.auth_key is not None else b"")


def _seal_blob(key: Secret, recipient: str, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return bytes([VERSION]) + key_id(key, recipient) + nonce + _aead(key).encrypt(nonce, plaintext, aad)


def _open_blob(key: Secret, recipient: str, blob: bytes, aad: bytes, what: str) -> bytes:
    if len(blob) < HEADER_BYTES + TAG_BYTES or blob[0] != VERSION:
        raise SealError(f"{what}: not a version {VERSION} envelope")
    if not hmac.compare_digest(blob[1:1 + KEY_ID_BYTES], key_id(key, recipient)):
        raise SealError(f"{what}: sealed for another recipient or key (key id {blob[1:9].hex()})")
    try:
        return _aead(key).decrypt(blob[1 + KEY_ID_BYTES:HEADER_BYTES], blob[HEADER_BYTES:], aad)
    except InvalidTag:
        raise SealError(f"{what}: envelope does not authenticate (tampered, or moved to another "
                        "user, session, path, SPI or suite)") from None


def secret_additional_data(recipient: str, context: bytes) -> bytes:
    return b"mipvpn sealed secret" + bytes([VERSION]) + _lv(_name(recipient)) + _lv(context)


def seal_secret(key: Secret, recipient: str, context: bytes, secret: Secret) -> bytes:
    """One secret (not a path's: e.g. the AAAF's local-answer key) sealed for ``recipient``,
    bound to ``context`` (what it belongs to: the receiver must name the same to open it)."""
    return _seal_blob(key, recipient, secret.reveal(), secret_additional_data(recipient, context))


def unseal_secret(key: Secret, recipient: str, context: bytes, blob: bytes) -> Secret:
    """What :func:`seal_secret` sealed; SealError if not ours, changed, or for another context."""
    return Secret(_open_blob(key, recipient, bytes(blob), secret_additional_data(recipient, context), "secret"))


def seal(key: Secret, recipient: str, info: VpnInfo) -> VpnInfo:
    """``info`` (open: it holds its keys) with its keys and PSK sealed for ``recipient``."""
    sec = info.path.security
    if not isinstance(sec, SecurityService):
        raise SealError(f"path {info.path_id}: already sealed")
    tlvs = b""
    if sec.inbound is not None and sec.outbound is not None:
        tlvs += bytes([T_KEY_IN]) + _lv(_key_bytes(sec.inbound)) + bytes([T_KEY_OUT]) + _lv(_key_bytes(sec.outbound))
    if sec.psk is not None:
        tlvs += bytes([T_PSK]) + _lv(sec.psk.reveal())
    blob = _seal_blob(key, recipient, tlvs, additional_data(recipient, info))
    spis = spis_of(sec)
    sealed = SealedSecurity(sec.suite, sec.lifetime, spis[0] if spis else None, spis[1] if spis else None, blob)
    return replace(info, path=replace(info.path, security=sealed))


def unseal(key: Secret, recipient: str, info: VpnInfo) -> VpnInfo:
    """``info`` (sealed for ``recipient``) with its keys opened; SealError if the envelope is
    not under our key, was changed, or was moved to another user, path, SPI or suite."""
    sec = info.path.security
    if not isinstance(sec, SealedSecurity):
        raise SealError(f"path {info.path_id}: no sealed keys")
    plain = _open_blob(key, recipient, sec.blob, additional_data(recipient, info), f"path {info.path_id}")
    fields: dict[int, bytes] = {}
    at = 0
    while at < len(plain):
        if at + 3 > len(plain):
            raise SealError(f"path {info.path_id}: truncated key list")
        kind, length = plain[at], struct.unpack_from("!H", plain, at + 1)[0]
        value = plain[at + 3:at + 3 + length]
        if len(value) != length or kind not in (T_KEY_IN, T_KEY_OUT, T_PSK) or kind in fields:
            raise SealError(f"path {info.path_id}: malformed key list")
        fields[kind] = value
        at += 3 + length
    inbound = outbound = None
    try:
        if (T_KEY_IN in fields) != (T_KEY_OUT in fields) or (T_KEY_IN in fields) != (sec.spi_in is not None):
            raise ValueError("keys and SPIs do not match")
        if T_KEY_IN in fields:
            assert sec.spi_in is not None and sec.spi_out is not None
            inbound = direction_keys(sec.suite, sec.spi_in, Secret(fields[T_KEY_IN]))
            outbound = direction_keys(sec.suite, sec.spi_out, Secret(fields[T_KEY_OUT]))
        psk = Secret(fields[T_PSK]) if T_PSK in fields else None
        opened = SecurityService(sec.suite, outbound, inbound, psk, sec.lifetime)
    except ValueError as exc:  # VpnInfoError too: lengths that do not fit the suite
        raise SealError(f"path {info.path_id}: sealed keys unusable: {exc}") from None
    return replace(info, path=replace(info.path, security=opened))


class Recipient:
    """An agent's own seal key: opens what the AAAH sealed for ``name``."""

    def __init__(self, name: str, key: Secret) -> None:
        _check_key(key)
        self.name = name
        self.key = key

    def open(self, infos: Iterable[VpnInfo]) -> list[VpnInfo]:
        return [unseal(self.key, self.name, info) for info in infos]

    def open_secret(self, context: bytes, blob: bytes) -> Secret:
        return unseal_secret(self.key, self.name, context, blob)

    def __repr__(self) -> str:
        return f"Recipient({self.name!r}, Secret(***))"


class Keyring:
    """The AAAH's seal keys, by recipient name (case-insensitive, as Diameter identities)."""

    def __init__(self, keys: dict[str, Secret]) -> None:
        for key in keys.values():
            _check_key(key)
        self.keys = {name.lower(): key for name, key in keys.items()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.keys

    def seal(self, recipient: str, infos: Iterable[VpnInfo]) -> list[VpnInfo]:
        """Every path of ``infos`` sealed for ``recipient``; SealError without its key."""
        key = self.keys.get(recipient.lower())
        if key is None:
            raise SealError(f"no seal key for {recipient}")
        return [seal(key, recipient, info) for info in infos]

    def seal_secret(self, recipient: str, context: bytes, secret: Secret) -> bytes:
        """``secret`` sealed for ``recipient`` (:func:`seal_secret`); SealError without its key."""
        key = self.keys.get(recipient.lower())
        if key is None:
            raise SealError(f"no seal key for {recipient}")
        return seal_secret(key, recipient, context, secret)

    def __repr__(self) -> str:
        return f"Keyring({sorted(self.keys)})"


__all__ = ["KEY_BYTES", "Keyring", "Recipient", "SealError", "additional_data", "key_id", "seal", "seal_secret",
           "secret_additional_data", "unseal", "unseal_secret"]
