"""The MN-AAAF authenticator (claim 17, issue #15): how a mobile node proves to the local AAA
server (AAAF) that an intra-domain move is its own, so that the AAAF may answer it from its
cache. Pure code, no I/O; the roles use it (the MN builds, the AAAH derives, the AAAF checks).

The key. At every registration the home AAA server (AAAH) accepts, after the MN-AAA check::

    K_local = HMAC-SHA-256(MN-AAA key, "mipvpn local answer" || NAI || FA challenge || home agent)

with the challenge of that request (the 16 octets of its MN-FA challenge extension, 132) and
the home agent address (4 octets). The MN computes the same value when the registration is
accepted; nobody else can (the FA has the challenge, not the MN-AAA key). The AAAH hands
``K_local`` to the AAAF in the AMA (``VPN-Local-Answer-Key``), which keeps it with the cached
session; the AAAF strips it before the AMA goes on to the FA.

The proof. On a move (the RRQ names its previous FA) an MN holding ``K_local`` appends, after the
MN-FA challenge and the MN-AAA authenticator (which therefore do not cover it: an authenticator
covers the message through its own SPI, ``daemons.wire.mip.auth``), an NVSE (134, vendor 32473, type 4) whose data is::

    wrapped next key (40 octets) | authenticator (16 octets)

* wrapped next key: RFC 3394 AES key wrap under ``K_local`` of the key the MN will hold once this
  request is accepted, ``K_local'`` = the formula above over this request's challenge (what the
  AAAH would derive had it answered). So the AAAF, answering locally, learns the same next key
  the MN derives, and the MN never needs to know who answered: after any accepted registration
  its key is the one derived from that registration's challenge.
* authenticator: the first 16 octets of HMAC-SHA-256(``K_local``, every octet of the request from
  its first through the wrapped next key), i.e. the fixed part (care-of address, home agent,
  identification ...), the NAI, the previous-FA NVSE, MN-HA, the FA's challenge, MN-AAA and this
  extension's header.

Skippable (NVSE): the HA and the AAAH do not know it and ignore it; the FA relays it inside the
AMR and strips it with the rest after MN-HA when it sends the RRQ straight to the HA.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import replace
from ipaddress import IPv4Address

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from daemons.runtime.secret import Secret

from .constants import EXT_NVSE, VENDOR_ID, VENDOR_TYPE_LOCAL_ANSWER
from .extensions import MNFAChallengeExtension, NVSEExtension
from .messages import RegistrationRequest, decode_message_with_offsets

__all__ = [
    "LOCAL_ANSWER_AUTH_LEN",
    "LOCAL_ANSWER_KEY_LEN",
    "LocalAnswerProof",
    "has_local_answer_proof",
    "local_answer_key",
    "registration_local_key",
    "verify_local_answer",
    "with_local_answer_proof",
]

LOCAL_ANSWER_KEY_LEN = 32  # HMAC-SHA-256 output; an AES-256 key-encryption key for the wrap
LOCAL_ANSWER_AUTH_LEN = 16
_WRAPPED_LEN = LOCAL_ANSWER_KEY_LEN + 8  # RFC 3394 adds one 64-bit block
_NVSE_HEADER_LEN = 10  # type, length, reserved(16), vendor-id(32), vendor-type(16)
_LABEL = b"mipvpn local answer"


def local_answer_key(mn_aaa_key: Secret, nai: str, challenge: bytes, home_agent: IPv4Address | str) -> Secret:
    """``K_local`` of a registration with ``challenge`` that the AAAH accepted (see the module)."""
    if not isinstance(mn_aaa_key, Secret):
        raise TypeError("mn_aaa_key must be a daemons.runtime.secret.Secret")
    data = _LABEL + nai.encode() + bytes(challenge) + IPv4Address(home_agent).packed
    return Secret(hmac.new(mn_aaa_key.reveal(), data, hashlib.sha256).digest())


def registration_local_key(mn_aaa_key: Secret, rrq: RegistrationRequest, nai: str) -> Secret | None:
    """The key the MN holds once ``rrq`` is accepted: ``K_local`` over its challenge (None
    without one: no AAA registration, no key)."""
    challenge = rrq.find(MNFAChallengeExtension)
    return None if challenge is None else local_answer_key(mn_aaa_key, nai, challenge.challenge, rrq.home_agent)


def _mac(key: Secret, covered: bytes) -> bytes:
    return hmac.new(key.reveal(), covered, hashlib.sha256).digest()[:LOCAL_ANSWER_AUTH_LEN]


def with_local_answer_proof(rrq: RegistrationRequest, key: Secret, following: Secret) -> RegistrationRequest:
    """``rrq`` (complete through MN-AAA) with the MN-AAAF authenticator under ``key`` appended,
    carrying ``following`` (the next key) wrapped under ``key``."""
    if len(key) != LOCAL_ANSWER_KEY_LEN or len(following) != LOCAL_ANSWER_KEY_LEN:
        raise ValueError(f"local answer keys are {LOCAL_ANSWER_KEY_LEN} octets")
    wrapped = aes_key_wrap(key.reveal(), following.reveal())
    body_len = _NVSE_HEADER_LEN - 2 + _WRAPPED_LEN + LOCAL_ANSWER_AUTH_LEN
    header = struct.pack("!BBHIH", EXT_NVSE, body_len, 0, VENDOR_ID, VENDOR_TYPE_LOCAL_ANSWER)
    auth = _mac(key, rrq.encode() + header + wrapped)
    return rrq.with_extensions(NVSEExtension(vendor_type=VENDOR_TYPE_LOCAL_ANSWER, data=wrapped + auth))


class LocalAnswerProof:
    """A verified MN-AAAF authenticator: ``request``, the RRQ as the authenticator vouches for it
    (extensions up to and including it: anything after is nobody's word), and ``next_key``."""

    __slots__ = ("next_key", "request")

    def __init__(self, request: RegistrationRequest, following: Secret) -> None:
        self.request = request
        self.next_key = following

    def __repr__(self) -> str:
        return "LocalAnswerProof(***)"


def _is_proof(ext: object) -> bool:
    return isinstance(ext, NVSEExtension) and ext.vendor_id == VENDOR_ID \
        and ext.vendor_type == VENDOR_TYPE_LOCAL_ANSWER


def has_local_answer_proof(rrq: RegistrationRequest) -> bool:
    """Whether ``rrq`` carries an MN-AAAF authenticator extension (checked or not)."""
    return any(_is_proof(e) for e in rrq.extensions)


def verify_local_answer(raw: bytes, key: Secret) -> LocalAnswerProof | None:
    """The first MN-AAAF authenticator of the raw RRQ ``raw``, checked under ``key`` (constant
    time), with the next key it carries; None when absent, malformed or wrong. Raises
    DecodeError when ``raw`` is not a Mobile IP message."""
    raw = bytes(raw)
    msg, offsets = decode_message_with_offsets(raw)
    if not isinstance(msg, RegistrationRequest):
        return None
    for index, (ext, offset) in enumerate(zip(msg.extensions, offsets, strict=True)):
        if not _is_proof(ext):
            continue
        assert isinstance(ext, NVSEExtension)
        if len(ext.data) != _WRAPPED_LEN + LOCAL_ANSWER_AUTH_LEN or len(key) != LOCAL_ANSWER_KEY_LEN:
            return None
        wrapped, auth = ext.data[:_WRAPPED_LEN], ext.data[_WRAPPED_LEN:]
        covered = raw[:offset + _NVSE_HEADER_LEN + _WRAPPED_LEN]
        if not hmac.compare_digest(_mac(key, covered), auth):
            return None
        try:
            following = Secret(aes_key_unwrap(key.reveal(), wrapped))
        except InvalidUnwrap:
            return None
        return LocalAnswerProof(replace(msg, extensions=list(msg.extensions[:index + 1])), following)
    return None
