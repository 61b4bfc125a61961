#!/usr/bin/env python3
"""Run the kernel tier (tests/kernel/) inside a VM with a stock Debian kernel; exit with pytest's code.

Boots the kernel once with virtme-ng (the host's root filesystem over 9p, TCG emulation because
KVM aborts on these machines), runs ``python -m pytest tests/kernel`` with the repository's venv
inside it as root, and returns pytest's exit code (exit 5, "no tests collected", is reported as
a failure).  Prints the VM boot time and the total time.

Usage: .venv/bin/python tests/kernel/run_vm.py [--kernel /boot/vmlinuz-X] [--timeout S] [-- PYTEST ARGS]

Needs: Debian packages qemu-system-x86 busybox-static linux-image-amd64, PyPI virtme-ng in the
venv.  MIPVPN_VM_KERNEL overrides the kernel image; MIPVPN_VM_KVM=1 tries KVM instead of TCG.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
RC_MARK = "MIPVPN-KERNEL-TIER-RC="
UP_MARK = "MIPVPN-KERNEL-TIER-UP"
MODULES = ("esp4 xfrm4_tunnel xfrm_user veth gcm ctr ghash-generic aesni-intel cbc sha256 hmac authenc "
           "ipip tunnel4 sch_htb cls_u32 tun")


def version_key(path: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", Path(path).name)]


def find_kernel() -> str | None:
    if os.environ.get("MIPVPN_VM_KERNEL"):
        return os.environ["MIPVPN_VM_KERNEL"]
    # the generic image: the -cloud- one has no 9p and does not boot this way
    images = [p for p in glob.glob("/boot/vmlinuz-*") if "cloud" not in p]
    return max(images, key=version_key) if images else None


def problems(kernel: str | None) -> list[str]:
    found = []
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("vng", path=path) is None:
        found.append("vng not found: pip install virtme-ng into .venv")
    if shutil.which("qemu-system-x86_64") is None:
        found.append("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    if not (shutil.which("busybox") or Path("/bin/busybox").exists()):
        found.append("busybox not found: apt-get install busybox-static")
    if kernel is None or not Path(kernel).exists():
        found.append(f"no kernel image ({kernel or '/boot/vmlinuz-*'}): apt-get install linux-image-amd64")
    elif not Path("/lib/modules", Path(kernel).name.removeprefix("vmlinuz-")).is_dir():
        found.append(f"no /lib/modules for {kernel}: the VM needs its modules (esp4, veth, ...)")
    if os.geteuid() != 0:
        found.append("must run as root (the tests create namespaces inside the VM as the same user)")
    return found


def inner_script(pytest_args: list[str]) -> str:
    python = VENV_BIN / "python"
    args = " ".join(shlex.quote(a) for a in pytest_args)
    return "; ".join([
        f"echo {UP_MARK} $(cut -d' ' -f1 /proc/uptime)",
        f"cd {shlex.quote(str(ROOT))}",
        f"modprobe -a -q {MODULES} 2>/dev/null",
        # no plugin autoload: the entry-point scan over site-packages costs seconds over 9p
        "export MIPVPN_KERNEL_TIER=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1",
        f"export PATH={shlex.quote(str(VENV_BIN))}:$PATH",
        # no cache dir: the 9p root is read-only
        f"{python} -m pytest -p no:cacheprovider -q -rs --durations=5 tests/kernel {args}",
        f"echo {RC_MARK}$? $(cut -d' ' -f1 /proc/uptime)",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", default=find_kernel())
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole VM run")
    parser.add_argument("--memory", default="1G")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()

    found = problems(args.kernel)
    if found:
        for p in found:
            print(f"kernel tier: cannot run: {p}", file=sys.stderr)
        return 2

    cmd = ["vng", "--run", args.kernel, "--force-9p", "--memory", args.memory,
           "--exec", inner_script(args.pytest_args)]
    if os.environ.get("MIPVPN_VM_KVM") != "1":
        cmd.insert(3, "--disable-kvm")  # KVM aborts in QEMU here ("kvm_buf_set_msrs: Assertion")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    print(f"kernel tier: booting {args.kernel} with virtme-ng", flush=True)

    start = time.monotonic()
    up_at: float | None = None
    guest_up = "?"
    rc: int | None = None
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    timer = threading.Timer(args.timeout, lambda: os.killpg(proc.pid, 9))
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if UP_MARK in line and up_at is None:
                up_at = time.monotonic() - start
                guest_up = line.split()[-1]
                continue
            match = re.search(rf"{RC_MARK}(\d+) (\S+)", line)
            if match:
                rc = int(match[1])
                print(f"kernel tier: guest uptime {guest_up} s at the command, {match[2]} s after pytest",
                      flush=True)
                continue
            sys.stdout.write(line)
            sys.stdout.flush()
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    total = time.monotonic() - start

    boot = f"{up_at:.1f} s" if up_at is not None else "never came up"
    print(f"kernel tier: VM boot {boot}, total {total:.1f} s, vng exit {proc.returncode}", flush=True)
    if rc is None:
        why = "timed out" if total >= args.timeout else "VM ended without reporting pytest's exit code"
        print(f"kernel tier: FAILED: {why}", file=sys.stderr)
        return 1
    if rc == 5:
        print("kernel tier: no tests ran", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
