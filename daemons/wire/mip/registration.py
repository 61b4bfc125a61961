"""A mobile node's Registration Request, built the one way every sender of a full registration
builds it (the MN daemon, the registration benchmark, the tests). Pure code, no I/O.

Extensions in the order RFC 5944 and RFC 3012 ask for::

    NAI (131, RFC 2794) | the caller's extensions (e.g. previous FA, service update NVSEs)
    | MN-HA authentication (32) | MN-FA challenge (132) | MN-AAA authentication (36/1)
    | MN-AAAF authenticator (NVSE vendor 32473 type 4, a move with a local-answer key only)

The MN-HA authenticator covers the NAI and the caller's extensions; the challenge answer
follows it, and the MN-AAA authenticator covers everything before it, the challenge included
(RFC 3012: it answers the challenge, so it comes only with one). The MN-AAAF authenticator
(``daemons.wire.mip.localanswer``) follows MN-AAA and covers everything before it, so neither
MN-HA nor MN-AAA covers it: the HA and the home AAA server check exactly what they did without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Protocol

from daemons.runtime.secret import Secret

from .auth import sign
from .constants import EXT_GEN_AUTH, EXT_MN_HA_AUTH
from .extensions import Extension, MNFAChallengeExtension, NAIExtension
from .localanswer import registration_local_key, with_local_answer_proof
from .messages import RegistrationRequest

__all__ = ["SpiAndKey", "registration_request"]


class SpiAndKey(Protocol):
    """An SPI and its key, e.g. ``daemons.runtime.config.SecurityAssociation``."""

    @property
    def spi(self) -> int: ...

    @property
    def key(self) -> Secret: ...


def registration_request(*, home_address: IPv4Address | str, home_agent: IPv4Address | str,
                         care_of_address: IPv4Address | str, identification: int, lifetime: int, nai: str,
                         mn_ha: SpiAndKey, extensions: Iterable[Extension] = (),
                         challenge: bytes | None = None, mn_aaa: SpiAndKey | None = None,
                         local_key: Secret | None = None) -> RegistrationRequest:
    """The RRQ with ``nai``, ``extensions``, the MN-HA authenticator, and with a ``challenge``
    (an FA's, RFC 3012) its answer and, given ``mn_aaa``, the MN-AAA authenticator; given
    ``local_key`` too (a move: the key of the MN's last accepted registration), the MN-AAAF
    authenticator under it, carrying the key this request's acceptance brings.
    ``mn_aaa`` without a challenge, or ``local_key`` without ``mn_aaa``, is a ValueError."""
    if mn_aaa is not None and challenge is None:
        raise ValueError("MN-AAA authentication answers an FA challenge: none given")
    if local_key is not None and mn_aaa is None:
        raise ValueError("the MN-AAAF authenticator follows MN-AAA: no MN-AAA key given")
    rrq = RegistrationRequest(home_address=home_address, home_agent=home_agent,  # type: ignore[arg-type]
                              care_of_address=care_of_address, identification=identification,  # type: ignore[arg-type]
                              lifetime=lifetime, extensions=[NAIExtension(nai), *extensions])
    rrq = sign(rrq, EXT_MN_HA_AUTH, mn_ha.spi, mn_ha.key)
    if challenge is not None:
        rrq = rrq.with_extensions(MNFAChallengeExtension(challenge))
        if mn_aaa is not None:
            rrq = sign(rrq, EXT_GEN_AUTH, mn_aaa.spi, mn_aaa.key)
            following = registration_local_key(mn_aaa.key, rrq, nai)
            if local_key is not None and following is not None:
                rrq = with_local_answer_proof(rrq, local_key, following)
    return rrq
