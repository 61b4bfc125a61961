"""Instantiate a topology as Linux network namespaces with pyroute2.

One namespace per node (``<prefix><node>``), a veth pair per link, a bridge named
``access`` in the namespace of each segment owner, the mobile nodes' ``eth0`` plugged into
their starting segment. Nothing is created in the host's own namespace: every veth is
created inside a lab namespace with its peer placed directly into the other one.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError, netns

from lab.topology import ACCESS_IFNAME, MN_IFNAME, Topology

NETNS_DIR = Path("/run/netns")


class LabBuildError(RuntimeError):
    pass


def namespace_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


@contextmanager
def ipr_in(namespace: str) -> Iterator[IPRoute]:
    """An IPRoute bound to an existing namespace (pyroute2 would silently create it)."""
    if not namespace_exists(namespace):
        raise LabBuildError(f"namespace {namespace} does not exist")
    ipr = IPRoute(netns=namespace)
    try:
        yield ipr
    finally:
        ipr.close()


def write_sysctls(namespace: str, values: dict[str, str]) -> None:
    """Set sysctls inside a namespace (/proc/sys/net follows the caller's namespace)."""
    netns.pushns(namespace)
    try:
        for key, value in values.items():
            Path("/proc/sys", *key.split(".")).write_text(value)
    finally:
        netns.popns()


class LabNetwork:
    """The namespaces and links of one topology under one namespace prefix."""

    def __init__(self, topology: Topology, prefix: str) -> None:
        self.topology = topology
        self.prefix = prefix

    def ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def namespaces(self) -> list[str]:
        return [self.ns(n) for n in self.topology.nodes]

    # ---- build -----------------------------------------------------------------------
    def build(self) -> None:
        topo = self.topology
        for node in topo.nodes:
            name = self.ns(node)
            if namespace_exists(name):
                raise LabBuildError(f"namespace {name} already exists (another lab? try `mipvpn lab down`)")
            netns.create(name)
        for node in topo.nodes.values():
            with ipr_in(self.ns(node.name)) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            sysctls = {
                "net.ipv4.ip_forward": "1" if topo.kind(node.name).forwards else "0",
                # Mobile IP paths are asymmetric by nature (tunnelled one way, routed back
                # the other): strict reverse-path filtering would drop them.
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
                # VPN gateways forward in and out of the same tunnel device; an ICMP redirect
                # there is meaningless, and would leave the gateway in clear.
                "net.ipv4.conf.all.send_redirects": "0",
                "net.ipv4.conf.default.send_redirects": "0",
                # The lab is IPv4 only; IPv6 autoconfiguration chatter would only clutter
                # every capture.
                "net.ipv6.conf.all.disable_ipv6": "1",
                "net.ipv6.conf.default.disable_ipv6": "1",
            }
            write_sysctls(self.ns(node.name), sysctls)
        for link in topo.links:
            (a, _), (b, _) = link.ends
            with ipr_in(self.ns(a)) as ipr:
                ipr.link("add", ifname=link.ifname(a), kind="veth",
                         peer={"ifname": link.ifname(b), "net_ns_fd": str(NETNS_DIR / self.ns(b))})
        for seg in topo.segments:
            with ipr_in(self.ns(seg.owner)) as ipr:
                ipr.link("add", ifname=ACCESS_IFNAME, kind="bridge", br_stp_state=0, br_forward_delay=0)
        for node in topo.nodes.values():
            if topo.kind(node.name).mobile:
                continue
            with ipr_in(self.ns(node.name)) as ipr:
                for ifname, iface in topo.addresses(node.name):
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
                    ipr.link("set", index=idx, state="up")
        for node in topo.nodes.values():
            if topo.kind(node.name).mobile:
                continue
            with ipr_in(self.ns(node.name)) as ipr:
                for dst, gateway in topo.routes(node.name):
                    ipr.route("add", dst="0.0.0.0/0" if dst == "default" else dst, gateway=str(gateway))
        for mn in topo.mobile_nodes():
            assert mn.attach is not None
            self._create_mn_port(mn.name, mn.attach)

    def _create_mn_port(self, mn: str, owner: str) -> None:
        with ipr_in(self.ns(mn)) as ipr:
            ipr.link("add", ifname=MN_IFNAME, kind="veth",
                     peer={"ifname": mn, "net_ns_fd": str(NETNS_DIR / self.ns(owner))})
            ipr.link("set", index=ipr.link_lookup(ifname=MN_IFNAME)[0], state="up")
        self._plug(mn, owner)

    def _plug(self, mn: str, owner: str) -> None:
        with ipr_in(self.ns(owner)) as ipr:
            port = ipr.link_lookup(ifname=mn)[0]
            bridge = ipr.link_lookup(ifname=ACCESS_IFNAME)[0]
            ipr.link("set", index=port, master=bridge)
            ipr.link("set", index=port, state="up")

    # ---- moves -----------------------------------------------------------------------
    def attachment(self, mn: str) -> str | None:
        """The segment owner whose namespace holds the MN's port, if any."""
        for seg in self.topology.segments:
            name = self.ns(seg.owner)
            if namespace_exists(name):
                with ipr_in(name) as ipr:
                    if ipr.link_lookup(ifname=mn):
                        return seg.owner
        return None

    def segment_ports(self, owner: str) -> list[str]:
        """Names of the ports enslaved to an owner's access bridge (one per attached MN)."""
        with ipr_in(self.ns(owner)) as ipr:
            bridge = ipr.link_lookup(ifname=ACCESS_IFNAME)[0]
            return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                          if link.get_attr("IFLA_MASTER") == bridge)

    def move(self, mn: str, owner: str) -> str | None:
        """Detach the MN's port from its segment and plug it into ``owner``'s segment.

        The port goes down before it leaves, so the MN sees its carrier drop, and comes up
        on the new bridge, so the MN sees carrier return: a real L2 detach/attach.
        Returns the previous owner.
        """
        previous = self.attachment(mn)
        if previous == owner:
            return previous
        if previous is not None:
            with ipr_in(self.ns(previous)) as ipr:
                port = ipr.link_lookup(ifname=mn)[0]
                ipr.link("set", index=port, state="down")
                ipr.link("set", index=port, net_ns_fd=str(NETNS_DIR / self.ns(owner)))
            self._plug(mn, owner)
        else:  # port lost (e.g. its namespace was deleted): make a new one
            with ipr_in(self.ns(mn)) as ipr:
                for idx in ipr.link_lookup(ifname=MN_IFNAME):
                    ipr.link("del", index=idx)
            self._create_mn_port(mn, owner)
        return previous

    # ---- teardown ----------------------------------------------------------------------
    def destroy(self) -> list[str]:
        """Delete every namespace of this lab that exists; deleting a namespace deletes the
        veths, bridges, addresses and routes inside it. Returns the names removed."""
        removed = []
        for name in self.namespaces():
            if namespace_exists(name):
                try:
                    netns.remove(name)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                removed.append(name)
        return removed


def describe_kernel_state(namespace: str) -> dict[str, list[str]]:
    """Addresses per interface as the kernel reports them, for `lab status`."""
    out: dict[str, list[str]] = {}
    try:
        with ipr_in(namespace) as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for addr in ipr.get_addr(family=2):
                ifname = names.get(addr["index"], str(addr["index"]))
                if ifname == "lo" and addr.get_attr("IFA_ADDRESS", "").startswith("127."):
                    continue
                out.setdefault(ifname, []).append(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
    except (LabBuildError, NetlinkError, OSError):
        pass
    return out


def carrier(namespace: str, ifname: str) -> bool:
    with ipr_in(namespace) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return False
        return ipr.get_links(idx[0])[0].get_attr("IFLA_CARRIER") == 1


