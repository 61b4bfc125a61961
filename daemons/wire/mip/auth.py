"""Authenticators of registration messages (RFC 5944 section 3.5.1, RFC 3012 section 8).

What is covered: the bytes of the UDP payload from the first octet of the message through
the SPI field of the authentication extension itself, i.e. the fixed part, every preceding
extension in its entirety (including preceding authentication extensions) and this
extension's type, [subtype,] length and SPI.  The length field already counts the
16-octet authenticator that follows.

Algorithms:

* MN-HA (32), MN-FA (33), FA-HA (34), and MN-AAA (36/1) with any SPI other than the reserved
  ones: HMAC-MD5(key, covered bytes), the RFC 5944 default.  (This is also what RFC 4004
  deployments use between the MN and its AAA server when an ordinary SPI is configured.)
* MN-AAA with SPI ``CHAP_SPI`` (2), RFC 3012 section 8 (CHAP style)::

      MD5(high-order byte of Challenge || key || MD5(covered bytes)
          || least-order 237 bytes of Challenge)

  where Challenge is the MN-FA Challenge extension (132) value of the same request; for a
  challenge shorter than 238 bytes the first byte thus enters twice, as the RFC notes.
* MN-AAA with SPI ``HMAC_CHAP_SPI`` (3, RFC 4721) is not implemented: signing raises
  ``ValueError`` and verification returns False.

Verification always works on the raw bytes as received, never on a re-encoding.
Keys are :class:`daemons.runtime.secret.Secret`; they are revealed only inside the MAC call.

Every helper works on any message :func:`~daemons.wire.mip.messages.decode_message` knows: the
registration messages and the binding messages of :mod:`daemons.wire.mip.binding` (whose
authenticator, ``EXT_BINDING_AUTH`` = FA-HA 34, covers the same "everything before the
authenticator").
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import replace
from typing import TypeVar

from daemons.runtime.secret import Secret

from .constants import (
    AUTHENTICATOR_LEN,
    CHAP_SPI,
    EXT_FA_HA_AUTH,
    EXT_GEN_AUTH,
    EXT_MN_FA_AUTH,
    EXT_MN_HA_AUTH,
    GEN_AUTH_SUBTYPE_MN_AAA,
    HMAC_CHAP_SPI,
)
from .extensions import (
    AuthExtension,
    Extension,
    FAHAAuthExtension,
    GeneralizedAuthExtension,
    MNFAAuthExtension,
    MNFAChallengeExtension,
    MNHAAuthExtension,
)
from .messages import Message, decode_message_with_offsets

__all__ = [
    "AUTH_EXTENSION_TYPES",
    "append_authenticator",
    "authenticated",
    "authenticator_location",
    "compute_authenticator",
    "covered",
    "sign",
    "strip_after",
    "verify",
]

AUTH_EXTENSION_TYPES: dict[int, type[Extension]] = {
    EXT_MN_HA_AUTH: MNHAAuthExtension,
    EXT_MN_FA_AUTH: MNFAAuthExtension,
    EXT_FA_HA_AUTH: FAHAAuthExtension,
    EXT_GEN_AUTH: GeneralizedAuthExtension,  # subtype 1 = MN-AAA
}

# Any registered message: RRQ, RRP and the binding messages of binding.py.
MsgT = TypeVar("MsgT", bound=Message)


def compute_authenticator(
    covered: bytes,
    key: Secret,
    *,
    ext_type: int,
    spi: int,
    challenge: bytes | None = None,
) -> bytes:
    """The 16-byte authenticator over ``covered`` (message through this extension's SPI)."""
    if not isinstance(key, Secret):
        raise TypeError("key must be a daemons.runtime.secret.Secret")
    if ext_type == EXT_GEN_AUTH and spi == CHAP_SPI:
        if not challenge:
            raise ValueError("MN-AAA with CHAP_SPI needs the MN-FA challenge")
        inner = hashlib.md5(covered).digest()
        return hashlib.md5(challenge[:1] + key.reveal() + inner + challenge[-237:]).digest()
    if ext_type == EXT_GEN_AUTH and spi == HMAC_CHAP_SPI:
        raise ValueError("HMAC_CHAP_SPI (RFC 4721) is not implemented")
    return hmac.new(key.reveal(), covered, hashlib.md5).digest()


def _header(ext_type: int, spi: int) -> bytes:
    if ext_type not in AUTH_EXTENSION_TYPES:
        raise ValueError(f"{ext_type} is not an authentication extension type")
    if not 0 <= spi <= 0xFFFFFFFF:
        raise ValueError("spi out of range for 32 bits")
    if ext_type == EXT_GEN_AUTH:
        return struct.pack("!BBHI", ext_type, GEN_AUTH_SUBTYPE_MN_AAA, 4 + AUTHENTICATOR_LEN, spi)
    return struct.pack("!BBI", ext_type, 4 + AUTHENTICATOR_LEN, spi)


def _last_challenge(msg: Message, upto: int) -> bytes | None:
    found = None
    for ext in msg.extensions[:upto]:
        if isinstance(ext, MNFAChallengeExtension):
            found = ext.challenge
    return found


def append_authenticator(
    raw: bytes,
    ext_type: int,
    spi: int,
    key: Secret,
    *,
    challenge: bytes | None = None,
) -> bytes:
    """Append an authentication extension to the raw encoded message ``raw``.

    ``ext_type`` is 32 (MN-HA), 33 (MN-FA), 34 (FA-HA) or 36 (MN-AAA, subtype 1).  For
    MN-AAA with CHAP_SPI the challenge defaults to the last MN-FA Challenge extension in
    ``raw``.  Use this on bytes you received (an FA appending FA-HA auth to a relayed RRQ)
    so that nothing the MN signed is re-encoded.
    """
    raw = bytes(raw)
    msg, _ = decode_message_with_offsets(raw)  # validates the input
    if challenge is None and ext_type == EXT_GEN_AUTH and spi == CHAP_SPI:
        challenge = _last_challenge(msg, len(msg.extensions))
    covered = raw + _header(ext_type, spi)
    return covered + compute_authenticator(
        covered, key, ext_type=ext_type, spi=spi, challenge=challenge
    )


def sign(
    message: MsgT,
    ext_type: int,
    spi: int,
    key: Secret,
    *,
    challenge: bytes | None = None,
) -> MsgT:
    """Return a copy of ``message`` with the authentication extension appended.

    ``message.encode()`` of the result is exactly the signed byte string.
    """
    if challenge is None and ext_type == EXT_GEN_AUTH and spi == CHAP_SPI:
        challenge = _last_challenge(message, len(message.extensions))
    covered = message.encode() + _header(ext_type, spi)
    auth = compute_authenticator(covered, key, ext_type=ext_type, spi=spi, challenge=challenge)
    cls = AUTH_EXTENSION_TYPES[ext_type]
    return message.with_extensions(cls(spi=spi, authenticator=auth))  # type: ignore[call-arg]


def _index(extensions: list[Extension], ext_type: int) -> int | None:
    """Index of the first authentication extension of ``ext_type`` in ``extensions``."""
    want = AUTH_EXTENSION_TYPES.get(ext_type)
    if want is None:
        raise ValueError(f"{ext_type} is not an authentication extension type")
    for i, ext in enumerate(extensions):
        if type(ext) is want and (
            not isinstance(ext, GeneralizedAuthExtension) or ext.subtype == GEN_AUTH_SUBTYPE_MN_AAA
        ):
            return i
    return None


def _locate(
    raw: bytes, ext_type: int
) -> tuple[Message, int, int] | None:
    """(message, index, offset) of the first authentication extension of ``ext_type``."""
    msg, offsets = decode_message_with_offsets(raw)
    index = _index(msg.extensions, ext_type)
    return None if index is None else (msg, index, offsets[index])


def _verified(
    raw: bytes,
    ext_type: int,
    key: Secret,
    spi: int | None,
    challenge: bytes | None,
) -> tuple[Message, int] | None:
    """(message, index of the authentication extension) if it verifies, else None."""
    found = _locate(raw, ext_type)
    if found is None:
        return None
    msg, index, off = found
    ext = msg.extensions[index]
    if not isinstance(ext, AuthExtension | GeneralizedAuthExtension):  # pragma: no cover
        return None
    if spi is not None and ext.spi != spi:
        return None
    if challenge is None and ext_type == EXT_GEN_AUTH and ext.spi == CHAP_SPI:
        challenge = _last_challenge(msg, index)
        if challenge is None:
            return None
    covered_bytes = raw[: off + ext.HEADER_LEN + 4]
    try:
        expected = compute_authenticator(
            covered_bytes, key, ext_type=ext_type, spi=ext.spi, challenge=challenge
        )
    except ValueError:
        return None
    return (msg, index) if hmac.compare_digest(expected, ext.authenticator) else None


def verify(
    raw: bytes,
    ext_type: int,
    key: Secret,
    *,
    spi: int | None = None,
    challenge: bytes | None = None,
) -> bool:
    """Check the first authentication extension of ``ext_type`` in the raw received bytes.

    False if that extension is absent, its SPI differs from ``spi`` (when given), or the
    authenticator does not match. Raises DecodeError if ``raw`` is not a valid message.
    For MN-AAA with CHAP_SPI the challenge defaults to the MN-FA Challenge preceding it.

    True says nothing about extensions *after* the authentication extension: they are not
    covered. Read what a verified message says from :func:`authenticated` (or
    :func:`covered`), never from the whole decoded message.
    """
    return _verified(bytes(raw), ext_type, key, spi, challenge) is not None


def covered(message: MsgT, ext_type: int) -> MsgT:
    """``message`` with only the extensions its first authentication extension of ``ext_type``
    covers (RFC 5944 §3.5: everything before it), that extension included; what follows
    is left out. Without such an extension nothing is covered: no extensions at all.

    For a receiver that reads a message whose authenticator someone else checks (the FA
    reading what the MN-HA authenticator covers, which the HA verifies), or that looks up the
    key by a field of the message before verifying (the HA reading the NAI): once that
    authenticator verifies, exactly these extensions are authentic."""
    index = _index(message.extensions, ext_type)
    return replace(message, extensions=[] if index is None else message.extensions[: index + 1])  # type: ignore[type-var]


def authenticated(
    raw: bytes,
    ext_type: int,
    key: Secret,
    *,
    spi: int | None = None,
    challenge: bytes | None = None,
) -> Message | None:
    """The message in the raw received bytes as its first authenticator of ``ext_type``
    vouches for it: decoded, with the extensions up to and including that authentication
    extension only (whatever followed it is not authenticated and is left out), or None when
    :func:`verify` would be False. Compare its extensions with the whole message's to tell
    whether anything followed the authenticator."""
    found = _verified(bytes(raw), ext_type, key, spi, challenge)
    if found is None:
        return None
    msg, index = found
    return replace(msg, extensions=msg.extensions[: index + 1])  # type: ignore[type-var]


def strip_after(raw: bytes, ext_type: int) -> bytes:
    """``raw`` cut right after the first extension of ``ext_type`` (e.g. an FA relaying an
    RRQ removes what follows the MN-HA authentication extension, RFC 5944 3.7.3.1).

    Raises ValueError if there is no such extension, DecodeError if ``raw`` is malformed.
    """
    raw = bytes(raw)
    msg, offsets = decode_message_with_offsets(raw)
    for ext, off in zip(msg.extensions, offsets, strict=True):
        if ext.ext_type == ext_type:
            return raw[: off + len(ext.encode())]
    raise ValueError(f"no extension of type {ext_type}")


def authenticator_location(raw: bytes, ext_type: int) -> tuple[int, int, int] | None:
    """Where the first authentication extension of ``ext_type`` sits in the raw message:
    (length of the data it covers, offset of the authenticator, authenticator length) — the
    values RFC 4004's MIP-MN-AAA-Auth AVP carries. None if there is no such extension."""
    found = _locate(bytes(raw), ext_type)
    if found is None:
        return None
    msg, index, off = found
    ext = msg.extensions[index]
    covered = off + ext.HEADER_LEN + 4  # through the SPI
    return covered, covered, len(ext.authenticator)  # type: ignore[attr-defined]
