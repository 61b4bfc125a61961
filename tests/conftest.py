"""Shared fixtures. Lab fixtures build real namespaces and always tear them down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests check behaviour, not speed: no per-example deadline (a loaded CI machine
# would otherwise fail them for being slow).
settings.register_profile("mipvpn", deadline=None, print_blob=True)
settings.load_profile("mipvpn")

ROOT = Path(__file__).resolve().parent.parent
MIPVPN = [sys.executable, "-m", "daemons.cli.main"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab tests need root (network namespaces)")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


def leftover_namespaces(prefix: str) -> list[str]:
    netns_dir = Path("/run/netns")
    return sorted(p.name for p in netns_dir.iterdir() if p.name.startswith(prefix)) \
        if netns_dir.exists() else []


class LabEnv:
    """A lab under a run directory and namespace prefix of its own, driven through the CLI."""

    def __init__(self, run_dir: Path, prefix: str) -> None:
        self.run_dir = run_dir
        self.prefix = prefix
        self.env = {**os.environ, "MIPVPN_RUN_DIR": str(run_dir), "MIPVPN_NS_PREFIX": prefix}

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*MIPVPN, *args], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"mipvpn {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def exec(self, node: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ip", "netns", "exec", f"{self.prefix}{node}", *cmd],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{node}: {' '.join(cmd)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def ns(self, node: str) -> str:
        return f"{self.prefix}{node}"


@pytest.fixture
def lab_env(tmp_path: Path) -> Iterator[LabEnv]:
    """A run directory and namespace prefix unique to this test; torn down whatever happens."""
    prefix = f"mvt{os.getpid() % 100000}-"
    env = LabEnv(tmp_path / "run", prefix)
    try:
        yield env
    finally:
        env.cli("lab", "down", check=False)
        left = leftover_namespaces(prefix)
        for name in left:  # never leave the machine dirty, even if `down` is broken
            subprocess.run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(env.run_dir, ignore_errors=True)
        assert not left, f"lab down left namespaces behind: {left}"


@pytest.fixture
def lab_up(lab_env: LabEnv) -> LabEnv:
    """The default lab, up, with captures running on every link."""
    lab_env.cli("lab", "up", "--capture")
    return lab_env
