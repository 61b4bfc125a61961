"""Seal keys for unit tests (daemons.vpn.seal), in one place: a fixed key per recipient name,
key files written as the daemons want them (mode 0600), and sealing/opening as the AAAH and
the agents do."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from daemons.runtime.config import SealKey
from daemons.runtime.secret import Secret
from daemons.vpn import seal
from daemons.vpn.vpninfo import VpnInfo


def seal_key(name: str) -> Secret:
    """The test key of recipient ``name`` (the same in every test, different per name)."""
    return Secret(hashlib.sha256(b"mipvpn test seal key " + name.lower().encode()).digest())


def key_file(directory: Path, name: str) -> SealKey:
    """``name``'s key in a 0600 file under ``directory``, as a configuration names it."""
    path = Path(directory) / "seal" / f"{name}.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(seal_key(name).reveal().hex() + "\n")
    return SealKey(name, path)


def key_files(directory: Path, *names: str) -> list[SealKey]:
    return [key_file(directory, n) for n in names]


def sealed(name: str, infos: Iterable[VpnInfo]) -> list[VpnInfo]:
    """``infos`` as the AAAH sends them to recipient ``name``."""
    return [seal.seal(seal_key(name), name, i) for i in infos]


def opened(name: str, infos: Iterable[VpnInfo]) -> list[VpnInfo]:
    """``infos`` as recipient ``name`` opens them."""
    return [seal.unseal(seal_key(name), name, i) for i in infos]
