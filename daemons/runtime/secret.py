"""A wrapper that keeps key material out of logs, reprs and exceptions."""

from __future__ import annotations


class Secret:
    """Holds secret bytes; prints as ``Secret(***)`` everywhere.

    Use ``.reveal()`` only at the point where the bytes go into a MAC, a cipher or the kernel.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes | str) -> None:
        self._value = value.encode() if isinstance(value, str) else bytes(value)

    @classmethod
    def from_hex(cls, text: str) -> Secret:
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise ValueError("not a hex string (value withheld)") from None

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        import hmac

        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__
