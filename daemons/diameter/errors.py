"""What a Diameter request can fail with, and the error a handler raises to answer with a
Result-Code (RFC 6733 §7): :class:`DiameterUnavailable` and its kinds for the side that sends
a request, :class:`DiameterError` (with :func:`require`) for the side that serves one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from daemons.wire.diameter.avp import Avp
from daemons.wire.diameter.constants import ResultCode
from daemons.wire.diameter.datatypes import AvpType
from daemons.wire.diameter.message import Message


class DiameterUnavailable(Exception):
    """A request could not be delivered or answered (no route, peer down, timeout)."""


class DiameterNoRoute(DiameterUnavailable):
    """No peer in the routing table for the request's destination (or none usable)."""


class DiameterTimeout(DiameterUnavailable, TimeoutError):
    """No answer within the request's timeout."""


class DiameterError(Exception):
    """Raised by a handler to answer with an error::

        raise DiameterError(ResultCode.DIAMETER_MISSING_AVP, failed_avp=["User-Name"])
        raise DiameterError.missing("User-Name")

    ``failed_avp`` is a list of AVPs (or ``(name, value)`` pairs, or bare names for which a
    zero-valued example AVP is built, as RFC 6733 §7.5 asks for missing AVPs). The node puts
    them into one Failed-AVP, adds Error-Message if given, and sets the E bit for 3xxx.
    """

    def __init__(
        self,
        result_code: int,
        message: str | None = None,
        *,
        failed_avp: Iterable[Avp | tuple[str, Any] | str] = (),
    ) -> None:
        super().__init__(message or f"Diameter error {int(result_code)}")
        self.result_code = int(result_code)
        self.error_message = message
        self.failed_avp: list[Avp] = [example_avp(a) if isinstance(a, str) else _mk(a) for a in failed_avp]

    @classmethod
    def missing(cls, *names: str) -> DiameterError:
        """5005 DIAMETER_MISSING_AVP with an example of each missing AVP in Failed-AVP."""
        return cls(ResultCode.DIAMETER_MISSING_AVP, f"missing AVP: {', '.join(names)}", failed_avp=names)


def _mk(a: Avp | tuple[str, Any]) -> Avp:
    return a if isinstance(a, Avp) else Avp.new(a[0], a[1])


_ZERO: dict[AvpType, Any] = {
    AvpType.OCTET_STRING: b"",
    AvpType.INTEGER32: 0,
    AvpType.INTEGER64: 0,
    AvpType.UNSIGNED32: 0,
    AvpType.UNSIGNED64: 0,
    AvpType.FLOAT32: 0.0,
    AvpType.FLOAT64: 0.0,
    AvpType.GROUPED: [],
    AvpType.ADDRESS: ipaddress.IPv4Address(0),
    AvpType.UTF8STRING: "",
    AvpType.DIAMETER_IDENTITY: "",
    AvpType.DIAMETER_URI: "",
    AvpType.ENUMERATED: 0,
    AvpType.IP_FILTER_RULE: "",
    AvpType.IP_PREFIX: ipaddress.IPv4Network("0.0.0.0/0"),
}


def example_avp(name: str) -> Avp:
    """An AVP ``name`` with a zero-filled value of its type (for Failed-AVP of 5005)."""
    from daemons.wire.diameter.dictionary import DICTIONARY

    d = DICTIONARY.avp_by_name(name)
    if d.dtype is AvpType.TIME:
        from daemons.wire.diameter.datatypes import TIME_MIN

        return Avp.new(name, TIME_MIN)
    return Avp.new(name, _ZERO[d.dtype])


def require(request: Message, *names: str) -> None:
    """Raise :class:`DiameterError` 5005 (with Failed-AVP) unless every AVP in ``names`` is present."""
    missing = [n for n in names if request.find(n) is None]
    if missing:
        raise DiameterError.missing(*missing)


__all__ = ["DiameterError", "DiameterNoRoute", "DiameterTimeout", "DiameterUnavailable", "example_avp", "require"]
