"""Backend selection: the one place that maps a backend's name to its code.

``auto`` picks xfrm where the kernel can install an ESP SA, strongswan otherwise:
``choose_backend`` probes in a scratch namespace (``mipvpn-probe-<pid>``, created and removed
again, never the host's own namespace) by adding and deleting one rfc4106 AES-GCM tunnel SA,
and returns the choice with a human-readable reason the CLI and the lab print.
``make_backend`` builds a backend by name; ``node_daemon`` says which process, if any, a
backend needs running on the node first (strongswan: charon).  Everything else asks the
backend itself (:attr:`PathBackend.capabilities`), never its name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class NodeDaemon:
    """A process a backend drives, to run inside the node's namespace before the backend's
    :meth:`PathBackend.wait_ready` (strongswan: charon)."""

    name: str  # e.g. "charon"
    argv: list[str]
    socket: Path  # it is up once this unix socket accepts connections


def node_daemon(name: str, run_dir: str | os.PathLike[str], node: str) -> NodeDaemon | None:
    """The process backend ``name`` needs on ``node`` (its configuration written under
    ``run_dir``), None if it needs none.  ``name`` must be concrete, as for :func:`make_backend`."""
    if name == "xfrm":
        return None
    if name == "strongswan":
        from daemons.vpn.strongswan.charon import charon_command, vici_socket_path

        return NodeDaemon("charon", charon_command(run_dir, node), vici_socket_path(run_dir, node))
    raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")


def make_backend(name: str, node: str, run_dir: str | os.PathLike[str], netns: str | None = None) -> PathBackend:
    """A backend for one node.  ``name`` must be concrete (resolve ``auto`` with
    :func:`choose_backend` first).  Run its :func:`node_daemon` first, then
    ``await backend.wait_ready()``."""
    if name == "xfrm":
        from daemons.vpn.xfrm.backend import XfrmBackend

        return XfrmBackend(node, netns)
    if name == "strongswan":
        from daemons.vpn.strongswan.backend import StrongswanBackend

        return StrongswanBackend(node, Path(run_dir), netns)
    raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
