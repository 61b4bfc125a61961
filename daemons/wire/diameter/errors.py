"""The one exception type of the Diameter codec."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .message import Header


class DecodeError(ValueError):
    """Bytes that are not a well-formed Diameter message (or AVP).

    Decoding arbitrary bytes raises this and nothing else. The message text never contains
    AVP data (which may be key material).

    Attributes a peer uses to answer a broken request (RFC 6733 §7):

    ``result_code``
        the Result-Code that describes the problem (e.g. 5014 DIAMETER_INVALID_AVP_LENGTH,
        5004 DIAMETER_INVALID_AVP_VALUE, 5015 DIAMETER_INVALID_MESSAGE_LENGTH,
        5011 DIAMETER_UNSUPPORTED_VERSION), or ``None`` when the bytes are not even a header.
    ``header``
        the parsed message :class:`~daemons.wire.diameter.message.Header` when the 20-byte header
        itself was readable (command code, flags, application id, hop-by-hop and end-to-end
        ids), so that an error answer can still be built; otherwise ``None``.
    ``avp_code`` / ``avp_vendor_id``
        the AVP at fault, if one is identified.
    """

    def __init__(
        self,
        message: str,
        *,
        result_code: int | None = None,
        header: Header | None = None,
        avp_code: int | None = None,
        avp_vendor_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.result_code = result_code
        self.header = header
        self.avp_code = avp_code
        self.avp_vendor_id = avp_vendor_id
