"""RFC 3012 / RFC 4721 challenges that an FA checks without remembering what it advertised.

The FA used to keep the last 8 challenges it had advertised; every solicitation brings a new
advertisement with a new challenge, so a solicitation flood pushed a real MN's challenge out
before its request came (104, issue #15). Here no list of advertised challenges exists, so
nothing a flood does can make a real MN's challenge invalid:

* A challenge is 16 octets: ``epoch`` (4, big-endian) | ``nonce`` (4, random) | ``tag`` (8):
  the first 8 octets of HMAC-SHA256(secret, epoch | nonce), under a secret drawn when the
  daemon starts. ``epoch`` counts advertisement intervals on the monotonic clock from a
  random start. So every advertisement still carries a fresh, unpredictable challenge
  (RFC 3012 §2: a random value of at least 32 bits), and checking one needs only the secret.
* Accepted while its epoch is one of the last ``window`` (``challenge_window``, default 8):
  (window - 1) to window advertisement intervals after it was advertised, what the old
  8-entry window gave when nobody flooded it.
* Spent once it bought a registration (the HA's yes), per mobile node: a replay of an
  accepted request is refused however long the window lasts, while two MNs that heard the
  same (multicast) advertisement may each use it. A spent entry is forgotten when its epoch
  leaves the window, after which the challenge is stale anyway, so the table holds only what
  real registrations (each authenticated by a home agent) spent in the last window.

Verdicts and the codes the FA answers with (RFC 3012 §3.2, RFC 4721 §3.2):
no challenge -> 105 (missing); not one of ours (length or tag) -> 104 (unknown);
ours but older than the window, or spent by this MN -> 106 (stale).
The secret is not kept across restarts: after one, earlier challenges are unknown (104), as
they were with the old list, and the MN registers again with a new one.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Hashable

CHALLENGE_LEN = 16
_TAG_LEN = 8


class Verdict(enum.Enum):
    FRESH = "fresh"
    UNKNOWN = "unknown"  # not issued by us (or by us before a restart)
    STALE = "stale"  # ours, but older than the window
    SPENT = "spent"  # ours and in the window, but this MN registered with it already


class ChallengeWindow:
    def __init__(self, interval: float, window: int, clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0 or window < 1:
            raise ValueError("challenge window: interval must be > 0 and window >= 1")
        self.interval = interval
        self.window = window
        self.clock = clock
        self._secret = secrets.token_bytes(32)
        self._base = secrets.randbits(32)
        self._spent: dict[tuple[Hashable, bytes], int] = {}  # (MN, challenge) -> epoch

    def epoch(self) -> int:
        return (int(self.clock() // self.interval) + self._base) & 0xFFFFFFFF

    def _tag(self, head: bytes) -> bytes:
        return hmac.new(self._secret, head, hashlib.sha256).digest()[:_TAG_LEN]

    def issue(self) -> bytes:
        """A new challenge for the next advertisement."""
        head = self.epoch().to_bytes(4, "big") + secrets.token_bytes(4)
        return head + self._tag(head)

    def _age(self, epoch: int) -> int:
        return (self.epoch() - epoch) & 0xFFFFFFFF

    def check(self, challenge: bytes, mn: Hashable) -> Verdict:
        """What ``challenge`` in a request of mobile node ``mn`` (its home address, NAI ...) is."""
        if len(challenge) != CHALLENGE_LEN or not hmac.compare_digest(self._tag(challenge[:8]), challenge[8:]):
            return Verdict.UNKNOWN
        if self._age(int.from_bytes(challenge[:4], "big")) >= self.window:
            return Verdict.STALE  # a wrapped-around "future" epoch lands here too
        if (mn, challenge) in self._spent:
            return Verdict.SPENT
        return Verdict.FRESH

    def spend(self, challenge: bytes, mn: Hashable) -> None:
        """``mn`` registered with ``challenge``: it may not do so again (a replay)."""
        self._forget_stale()
        if len(challenge) == CHALLENGE_LEN:
            self._spent[(mn, challenge)] = int.from_bytes(challenge[:4], "big")

    def _forget_stale(self) -> None:
        for key, epoch in list(self._spent.items()):
            if self._age(epoch) >= self.window:
                del self._spent[key]

    @property
    def spent(self) -> int:
        """How many (MN, challenge) pairs are held as spent (for ``show counters``)."""
        self._forget_stale()
        return len(self._spent)
