"""Exceptions of the Mobile IPv4 codec.

Decoding malformed bytes raises :class:`DecodeError` and nothing else.  An unrecognised
non-skippable extension (type 0-127, RFC 5944 section 1.9) raises the subclass
:class:`UnknownExtensionError`, which carries the extension type and the part of the message
decoded before it, so an agent can still answer with the proper reply code (FA: 70, HA: 134).
"""

from __future__ import annotations

from typing import Any


class DecodeError(ValueError):
    """The bytes are not a well-formed message of this codec."""


class UnknownExtensionError(DecodeError):
    """An extension of type 0-127 that this codec does not know: discard the whole message.

    Attributes:
        ext_type: the unrecognised extension type code.
        offset: byte offset of that extension inside the decoded buffer.
        partial: the message decoded up to (not including) the unknown extension: a
            ``RegistrationRequest``/``RegistrationReply`` (or ``AgentAdvertisement``) whose
            ``extensions`` list holds the extensions that preceded it. Use its fixed fields
            (home address, home agent, identification) to build a reply with code 70/134.
    """

    def __init__(self, ext_type: int, offset: int, partial: Any = None) -> None:
        super().__init__(f"unrecognised non-skippable extension type {ext_type} at offset {offset}")
        self.ext_type = ext_type
        self.offset = offset
        self.partial = partial
