"""Kernel tier: tests that need a kernel with ESP (stock distribution kernel).

They run inside the VM started by ``tests/kernel/run_vm.py`` (which sets ``MIPVPN_KERNEL_TIER=1``),
or natively when this machine's kernel can install an ESP SA.  Anywhere else they are skipped
with the reason, so a plain ``pytest`` on a machine without ESP stays green; the runner is what
makes the tier count.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator

import pytest

IN_VM = os.environ.get("MIPVPN_KERNEL_TIER") == "1"
_reason: str | None = None


def _skip_reason() -> str | None:
    global _reason
    if IN_VM:
        return None
    if _reason is None:
        if os.geteuid() != 0:
            _reason = "kernel tier needs root"
        else:
            from daemons.vpn.xfrm.netlink import probe_kernel_esp

            probe = probe_kernel_esp(scratch_prefix="mipvpn-t-probe-")
            _reason = "" if probe is True else f"no kernel ESP here ({probe}); run tests/kernel/run_vm.py"
    return _reason or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    mine = [item for item in items if str(item.fspath).startswith(here)]
    if not mine:
        return
    reason = _skip_reason()
    if reason:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))


def redact(text: str) -> str:
    """Key material out of test output: long hex strings (``ip xfrm`` keys, tshark's esp_sa
    table) become <redacted>."""
    return re.sub(r"0x[0-9a-fA-F]{16,}", "0x<redacted>", text)


def run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(redact(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"))
    return proc


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], str]]:
    """Creates namespaces ``mipvpn-t-k<pid>-<tag>``; removes them whatever happens."""
    made: list[str] = []

    def make(tag: str) -> str:
        name = f"mipvpn-t-k{os.getpid()}-{tag}"
        run("ip", "netns", "add", name)
        made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], check=False)
