"""Backend selection: ``auto`` picks xfrm where the kernel can install an ESP SA, strongswan otherwise.

``choose_backend`` probes in a scratch namespace (``mipvpn-probe-<pid>``, created and removed
again, never the host's own namespace) by adding and deleting one rfc4106 AES-GCM tunnel SA,
and returns the choice with a human-readable reason the CLI and the lab print.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemons.vpn.path import PathBackend

BACKENDS = ("xfrm", "strongswan")
CHOICES = ("auto", *BACKENDS)


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """(backend name, reason).  ``requested`` is ``auto``, ``xfrm`` or ``strongswan``."""
    if requested not in CHOICES:
        raise ValueError(f"unknown backend {requested!r} (choose from {', '.join(CHOICES)})")
    if requested != "auto":
        return requested, f"{requested} requested"
    if os.geteuid() != 0:
        return "strongswan", "auto: not root, cannot probe kernel ESP; using strongswan"
    from daemons.vpn.xfrm.netlink import probe_kernel_esp

    try:
        probe = probe_kernel_esp(scratch_prefix="mipvpn-probe-")
    except Exception as exc:  # the probe itself failed (e.g. no namespaces)
        return "strongswan", f"auto: kernel ESP probe failed ({exc}); using strongswan (user-space ESP)"
    if probe is True:
        return "xfrm", "auto: the kernel accepted an ESP tunnel SA (rfc4106(gcm(aes))); using xfrm"
    return "strongswan", f"auto: no kernel ESP ({probe}); using strongswan (user-space ESP)"


def make_backend(name: str, node: str, run_dir: str | os.PathLike[str], netns: str | None = None) -> PathBackend:
    """A backend for one node.  ``name`` must be concrete (resolve ``auto`` with
    :func:`choose_backend` first).  The strongswan backend needs the node's charon running
    (:func:`daemons.vpn.strongswan.backend.charon_command`) and ``await backend.wait_ready()``."""
    if name == "xfrm":
        from daemons.vpn.xfrm.backend import XfrmBackend

        return XfrmBackend(node, netns)
    if name == "strongswan":
        from daemons.vpn.strongswan.backend import StrongswanBackend

        return StrongswanBackend(node, Path(run_dir), netns)
    raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
