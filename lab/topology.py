"""The lab topology: a YAML file turned into a validated, immutable model.

Describing a topology is separate from building it (see ``lab.builder``). Validation happens
entirely here, before anything touches the system, and every error names the file, the field
and the problem.

File format (see ``lab/topologies/default.yaml``)::

    name: default
    domains:                      # realm -> its AAA server node (optional)
      home.example: {aaa: aaah}   # optional relay: NODE (router or host): AAAFs reach this
                                  # realm's AAAH through a Diameter relay run in NODE
    nodes:
      core: {role: router}
      ha:   {role: ha, domain: home.example, upstream: core}
      mn1:  {role: mn, domain: home.example, attach: fa1}
      cngw2: {role: cngw, domain: corp.example, upstream: core, mode: dynamic,
              settings: {binding_request_threshold: 10}}
    links:                        # point-to-point: exactly two ends with addresses
      - {prefix: 198.18.0.0/30, ends: {core: 198.18.0.1, ha: 198.18.0.2}}
    segments:                     # access segments: a bridge owned by an agent node
      - {owner: ha, prefix: 198.18.100.0/24, address: 198.18.100.1}
    users:
      - {nai: mn1@home.example, mn: mn1, home_address: 198.18.100.10, home_agent: ha}
      - {nai: bench1@home.example, home_address: 198.18.100.11, home_agent: ha}   # synthetic

A user without ``mn`` is *synthetic*: it exists in the home network (VPN database, home agent)
but no mobile node daemon runs for it; a load generator registers on its behalf
(``mipvpn bench register``).

A CN-GW's ``mode`` is ``static`` (the default: a standing tunnel to the home agents) or
``dynamic`` (paths to the foreign agents on Binding Updates: route optimisation). A node's
``settings`` mapping is handed, unread, to the configuration of the daemon it runs (field
names of that role's configuration); the lab does not interpret it.

A node's ``role`` names its kind (``NodeKind``). The lab knows no kinds of its own: whoever
loads a file says which exist and what each may do (for mipvpn, ``daemons.provision.kinds``).

Routing intent: every node but the root names its ``upstream`` neighbour; it gets a default
route there, and every node on the way up learns the prefixes behind it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

LAB_ADDRESS_SPACE = ipaddress.ip_network("198.18.0.0/15")
# Node names become interface names (max 15 characters) and namespace suffixes.
NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,10}$")
RESERVED_NAMES = frozenset({"lo", "access", "eth0", "ipsec0"})
ACCESS_IFNAME = "access"  # the bridge of an access segment, in its owner's namespace
MN_IFNAME = "eth0"  # the mobile node's only interface


@dataclass(frozen=True)
class NodeKind:
    """A kind of node, as far as the lab cares: what a node of this kind may be and do in a
    topology. Which kinds exist is told to the parser (``load(path, kinds)``), as Mininet is
    handed its node classes; the lab itself knows none of them. A node's ``role`` field names
    its kind."""

    name: str
    forwards: bool = False  # routes packets for others (ip_forward on)
    mobile: bool = False  # plugs one interface into an access segment: no links, no upstream
    owns_segment: bool = False  # may own an access segment
    modes: tuple[str, ...] = ()  # the values its ``mode`` may take, the first the default
    domain_server: bool = False  # may be named as a domain's ``aaa``
    relay_target: bool = False  # a domain with a relay needs its ``aaa`` to be of such a kind
    runs_relay: bool = False  # may run a domain's relay (a process the composition root provides)
    serves_users: bool = False  # users may name it as their ``home_agent``; it needs a segment


def kinds_named(kinds: dict[str, NodeKind], trait: str) -> str:
    """The names of the kinds with a trait, for error messages: "fa and ha"."""
    return " and ".join(sorted(k.name for k in kinds.values() if getattr(k, trait)))


class TopologyError(ValueError):
    """A topology file is invalid; the message names the file, the field and the problem."""

    def __init__(self, source: str, where: str, problem: str) -> None:
        super().__init__(f"{source}: {where}: {problem}")
        self.source, self.where, self.problem = source, where, problem


@dataclass(frozen=True)
class Node:
    name: str
    role: str
    domain: str | None = None
    upstream: str | None = None
    attach: str | None = None  # mobile nodes: the agent whose segment they start on
    mode: str | None = None  # CN-GWs: static | dynamic (None: static)
    settings: dict[str, Any] = field(default_factory=dict, compare=False)  # for the node's daemon, opaque here


@dataclass(frozen=True)
class Link:
    """A point-to-point link: one veth pair, one prefix, two addressed ends."""

    name: str
    prefix: ipaddress.IPv4Network
    ends: tuple[tuple[str, ipaddress.IPv4Address], tuple[str, ipaddress.IPv4Address]]

    def address_of(self, node: str) -> ipaddress.IPv4Address:
        return dict(self.ends)[node]

    def other(self, node: str) -> str:
        (a, _), (b, _) = self.ends
        return b if node == a else a

    def ifname(self, node: str) -> str:
        """Each end's interface is named after the node at the other end."""
        return self.other(node)


@dataclass(frozen=True)
class Segment:
    """An access segment: a bridge in its owner's namespace that mobile nodes plug into."""

    name: str
    owner: str
    prefix: ipaddress.IPv4Network
    address: ipaddress.IPv4Address


@dataclass(frozen=True)
class User:
    nai: str
    mn: str | None  # None: a synthetic user, registered by a load generator, not by an MN daemon
    home_address: ipaddress.IPv4Address
    home_agent: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Topology:
    name: str
    source: str
    domains: dict[str, dict[str, Any]]
    nodes: dict[str, Node]
    links: tuple[Link, ...]
    segments: tuple[Segment, ...]
    users: tuple[User, ...]
    kinds: dict[str, NodeKind] = field(default_factory=dict, compare=False)

    # ---- queries used by the builder and the CLI -------------------------------------
    def links_of(self, node: str) -> list[Link]:
        return [link for link in self.links if node in dict(link.ends)]

    def segment_of(self, owner: str) -> Segment | None:
        return next((s for s in self.segments if s.owner == owner), None)

    def link_between(self, a: str, b: str) -> Link | None:
        for link in self.links:
            ends = dict(link.ends)
            if a in ends and b in ends:
                return link
        return None

    def children(self, node: str) -> list[str]:
        return [n.name for n in self.nodes.values() if n.upstream == node]

    def prefixes_behind(self, node: str) -> list[ipaddress.IPv4Network]:
        """Prefixes reachable through ``node`` from its upstream: its own links except the
        uplink, its segment, and everything behind its children."""
        up = self.nodes[node].upstream
        found: list[ipaddress.IPv4Network] = []
        for link in self.links_of(node):
            if link.other(node) != up:
                found.append(link.prefix)
        seg = self.segment_of(node)
        if seg:
            found.append(seg.prefix)
        for child in self.children(node):
            found.extend(p for p in self.prefixes_behind(child) if p not in found)
        return found

    def routes(self, node: str) -> list[tuple[str, ipaddress.IPv4Address]]:
        """(destination, gateway) pairs for one node: a default route to its upstream and a
        route for every prefix behind each child that is not directly connected."""
        result: list[tuple[str, ipaddress.IPv4Address]] = []
        me = self.nodes[node]
        if me.upstream:
            link = self.link_between(node, me.upstream)
            assert link is not None  # validated
            result.append(("default", link.address_of(me.upstream)))
        connected = {lk.prefix for lk in self.links_of(node)}
        for child in self.children(node):
            link = self.link_between(node, child)
            assert link is not None
            for prefix in self.prefixes_behind(child):
                if prefix not in connected:
                    result.append((str(prefix), link.address_of(child)))
        return result

    def addresses(self, node: str) -> list[tuple[str, ipaddress.IPv4Interface]]:
        """(interface, address/prefixlen) pairs the builder configures on a node."""
        out = [
            (lk.ifname(node), ipaddress.ip_interface(f"{lk.address_of(node)}/{lk.prefix.prefixlen}"))
            for lk in self.links_of(node)
        ]
        seg = self.segment_of(node)
        if seg:
            out.append((ACCESS_IFNAME, ipaddress.ip_interface(f"{seg.address}/{seg.prefix.prefixlen}")))
        return out

    def kind(self, node: str) -> NodeKind:
        return self.kinds[self.nodes[node].role]

    def mode(self, node: str) -> str | None:
        """A node's mode, its kind's default if the file names none."""
        modes = self.kind(node).modes
        return self.nodes[node].mode or (modes[0] if modes else None)

    def mobile_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if self.kind(n.name).mobile]

    def of_role(self, role: str) -> list[str]:
        """The names of the nodes of one kind, in file order."""
        return [n.name for n in self.nodes.values() if n.role == role]

    def user_of(self, mn: str) -> User | None:
        return next((u for u in self.users if u.mn == mn), None)


# ---- loading and validation --------------------------------------------------------------


def default_topology_path() -> Path:
    return Path(str(resources.files("lab") / "topologies" / "default.yaml"))


def load(path: str | Path | None, kinds: Iterable[NodeKind]) -> Topology:
    """Read and validate a topology file (the default one for None) for the node kinds given."""
    path = Path(path) if path else default_topology_path()
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(source, "file", f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise TopologyError(source, "file", f"not valid YAML: {exc}") from None
    return parse(data, source, kinds)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (plain YAML keeps the last one silently,
    which would hide a duplicated node name)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse(data: Any, source: str, kinds: Iterable[NodeKind]) -> Topology:
    return _Parser(source, {k.name: k for k in kinds}).parse(data)


class _Parser:
    def __init__(self, source: str, kinds: dict[str, NodeKind]) -> None:
        self.source = source
        self.kinds = kinds

    def fail(self, where: str, problem: str) -> TopologyError:
        return TopologyError(self.source, where, problem)

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {type(value).__name__}")
        return value

    def sequence(self, value: Any, where: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, got {type(value).__name__}")
        return value

    def only_keys(self, value: dict[str, Any], allowed: set[str], where: str) -> None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def network(self, value: Any, where: str) -> ipaddress.IPv4Network:
        try:
            net = ipaddress.IPv4Network(str(value), strict=True)
        except ValueError as exc:
            raise self.fail(where, f"malformed prefix {value!r}: {exc}") from None
        if not net.subnet_of(LAB_ADDRESS_SPACE):  # type: ignore[arg-type]
            raise self.fail(where, f"prefix {net} is outside the lab address space {LAB_ADDRESS_SPACE}")
        return net

    def address(self, value: Any, where: str, within: ipaddress.IPv4Network | None = None) -> ipaddress.IPv4Address:
        try:
            addr = ipaddress.IPv4Address(str(value))
        except ValueError:
            raise self.fail(where, f"malformed IPv4 address {value!r}") from None
        if addr not in LAB_ADDRESS_SPACE:
            raise self.fail(where, f"address {addr} is outside the lab address space {LAB_ADDRESS_SPACE}")
        if within is not None:
            if addr not in within:
                raise self.fail(where, f"address {addr} is not inside {within}")
            if addr in (within.network_address, within.broadcast_address) and within.prefixlen < 31:
                raise self.fail(where, f"address {addr} is the network or broadcast address of {within}")
        return addr

    def node_ref(self, value: Any, where: str, nodes: dict[str, Any]) -> str:
        if value not in nodes:
            raise self.fail(where, f"unknown node {value!r}")
        return str(value)

    def parse(self, data: Any) -> Topology:
        top = self.mapping(data, "top level")
        self.only_keys(top, {"name", "domains", "nodes", "links", "segments", "users"}, "top level")
        name = str(top.get("name") or "lab")

        domains_raw = self.mapping(top.get("domains") or {}, "domains")
        raw_nodes = self.mapping(top.get("nodes"), "nodes") if "nodes" in top else None
        if not raw_nodes:
            raise self.fail("nodes", "missing: a topology needs at least one node")

        nodes: dict[str, Node] = {}
        for nname, spec in raw_nodes.items():
            where = f"nodes.{nname}"
            if not isinstance(nname, str) or not NODE_NAME.match(nname) or nname in RESERVED_NAMES:
                raise self.fail(where, "invalid node name: lowercase letters and digits, starting "
                                "with a letter, at most 11 characters, not a reserved interface name")
            spec = self.mapping(spec, where)
            self.only_keys(spec, {"role", "domain", "upstream", "attach", "mode", "settings"}, where)
            role = spec.get("role")
            if role is None:
                raise self.fail(f"{where}.role", "missing role")
            if role not in self.kinds:
                raise self.fail(f"{where}.role", f"unknown role {role!r} (one of: {', '.join(self.kinds)})")
            kind = self.kinds[role]
            domain = spec.get("domain")
            if domain is not None and domain not in domains_raw:
                raise self.fail(f"{where}.domain", f"unknown domain {domain!r}")
            mode = spec.get("mode")
            if mode is not None and mode not in kind.modes:
                allowed = kind.modes
                raise self.fail(f"{where}.mode", f"unknown mode {mode!r} (one of: {', '.join(allowed)})" if allowed
                                else f"a {role} node has no mode")
            settings = self.mapping(spec.get("settings") or {}, f"{where}.settings")
            nodes[nname] = Node(nname, role, domain, spec.get("upstream"), spec.get("attach"), mode,
                                dict(settings))

        domains: dict[str, dict[str, Any]] = {}
        for dname, spec in domains_raw.items():
            spec = self.mapping(spec or {}, f"domains.{dname}")
            self.only_keys(spec, {"aaa", "relay"}, f"domains.{dname}")
            if "aaa" in spec:
                aaa = self.node_ref(spec["aaa"], f"domains.{dname}.aaa", nodes)
                if not self.kinds[nodes[aaa].role].domain_server:
                    raise self.fail(f"domains.{dname}.aaa", f"node {aaa!r} is not an AAA server")
            if "relay" in spec:
                relay = self.node_ref(spec["relay"], f"domains.{dname}.relay", nodes)
                if not self.kinds[nodes[relay].role].runs_relay:
                    raise self.fail(f"domains.{dname}.relay", f"node {relay!r} (role {nodes[relay].role}) cannot "
                                    f"run a relay: only {kinds_named(self.kinds, 'runs_relay')} nodes can")
                if "aaa" not in spec or not self.kinds[nodes[spec["aaa"]].role].relay_target:
                    raise self.fail(f"domains.{dname}.relay", "a relay needs the domain's home AAA server "
                                    f"(aaa: an {kinds_named(self.kinds, 'relay_target')} node)")
            domains[str(dname)] = dict(spec)

        used_prefixes: list[tuple[ipaddress.IPv4Network, str]] = []
        used_addresses: dict[ipaddress.IPv4Address, str] = {}

        def claim_prefix(net: ipaddress.IPv4Network, where: str) -> None:
            for other, other_where in used_prefixes:
                if net.overlaps(other):
                    raise self.fail(where, f"prefix {net} overlaps {other} ({other_where})")
            used_prefixes.append((net, where))

        def claim_address(addr: ipaddress.IPv4Address, where: str) -> None:
            if addr in used_addresses:
                raise self.fail(where, f"address {addr} already used at {used_addresses[addr]}")
            used_addresses[addr] = where

        links: list[Link] = []
        pairs: set[frozenset[str]] = set()
        for i, spec in enumerate(self.sequence(top.get("links"), "links")):
            where = f"links[{i}]"
            spec = self.mapping(spec, where)
            self.only_keys(spec, {"prefix", "ends"}, where)
            if "prefix" not in spec:
                raise self.fail(f"{where}.prefix", "missing prefix")
            prefix = self.network(spec["prefix"], f"{where}.prefix")
            ends_raw = self.mapping(spec.get("ends"), f"{where}.ends")
            if len(ends_raw) != 2:
                raise self.fail(f"{where}.ends", f"a link has exactly two ends, got {len(ends_raw)}")
            ends = []
            for node_name, addr in ends_raw.items():
                ref = self.node_ref(node_name, f"{where}.ends", nodes)
                if self.kinds[nodes[ref].role].mobile:
                    raise self.fail(f"{where}.ends.{ref}", "mobile nodes attach to segments, not links")
                a = self.address(addr, f"{where}.ends.{ref}", within=prefix)
                claim_address(a, f"{where}.ends.{ref}")
                ends.append((ref, a))
            pair = frozenset(dict(ends))
            if pair in pairs:
                raise self.fail(f"{where}.ends", f"duplicate link between {' and '.join(sorted(pair))}")
            pairs.add(pair)
            claim_prefix(prefix, f"{where}.prefix")
            (a_name, _), (b_name, _) = ends
            links.append(Link(f"{a_name}-{b_name}", prefix, (ends[0], ends[1])))

        segments: list[Segment] = []
        for i, spec in enumerate(self.sequence(top.get("segments"), "segments")):
            where = f"segments[{i}]"
            spec = self.mapping(spec, where)
            self.only_keys(spec, {"owner", "prefix", "address"}, where)
            for key in ("owner", "prefix", "address"):
                if key not in spec:
                    raise self.fail(f"{where}.{key}", f"missing {key}")
            owner = self.node_ref(spec["owner"], f"{where}.owner", nodes)
            if not self.kinds[nodes[owner].role].owns_segment:
                raise self.fail(f"{where}.owner", f"node {owner!r} (role {nodes[owner].role}) "
                                f"cannot own an access segment: only {kinds_named(self.kinds, 'owns_segment')} can")
            if any(s.owner == owner for s in segments):
                raise self.fail(f"{where}.owner", f"node {owner!r} already owns a segment")
            prefix = self.network(spec["prefix"], f"{where}.prefix")
            addr = self.address(spec["address"], f"{where}.address", within=prefix)
            claim_prefix(prefix, f"{where}.prefix")
            claim_address(addr, f"{where}.address")
            segments.append(Segment(f"{owner}-access", owner, prefix, addr))

        # Routing intent and attachment, checked once links exist.
        for node in nodes.values():
            where = f"nodes.{node.name}"
            if self.kinds[node.role].mobile:
                if node.upstream:
                    raise self.fail(f"{where}.upstream", "a mobile node has no upstream; use attach")
                if node.attach is None:
                    raise self.fail(f"{where}.attach", "missing: which segment owner the MN starts on")
                ref = self.node_ref(node.attach, f"{where}.attach", nodes)
                if not any(s.owner == ref for s in segments):
                    raise self.fail(f"{where}.attach", f"node {ref!r} owns no access segment")
                continue
            if node.attach:
                raise self.fail(f"{where}.attach", "only mobile nodes attach to segments")
            if node.upstream is not None:
                ref = self.node_ref(node.upstream, f"{where}.upstream", nodes)
                if not any(frozenset((node.name, ref)) == p for p in pairs):
                    raise self.fail(f"{where}.upstream", f"no link between {node.name!r} and {ref!r}")
        roots = [n.name for n in nodes.values() if not self.kinds[n.role].mobile and n.upstream is None]
        if len(roots) != 1:
            raise self.fail("nodes", "exactly one node (the backbone) must have no upstream, "
                            f"found {len(roots)}: {', '.join(roots) or 'none'}")
        for node in nodes.values():  # upstream chains must end at the root, without cycles
            seen, cur = set(), node.name
            while nodes[cur].upstream is not None:
                if cur in seen:
                    raise self.fail(f"nodes.{node.name}.upstream", "upstream chain forms a cycle")
                seen.add(cur)
                cur = nodes[cur].upstream  # type: ignore[assignment]

        users: list[User] = []
        nais: set[str] = set()
        for i, spec in enumerate(self.sequence(top.get("users"), "users")):
            where = f"users[{i}]"
            spec = self.mapping(spec, where)
            for key in ("nai", "home_address", "home_agent"):
                if key not in spec:
                    raise self.fail(f"{where}.{key}", f"missing {key}")
            nai = str(spec["nai"])
            if "@" not in nai or nai.split("@", 1)[1] not in domains:
                raise self.fail(f"{where}.nai", f"NAI {nai!r} must be user@realm with a known realm")
            if nai in nais:
                raise self.fail(f"{where}.nai", f"duplicate NAI {nai!r}")
            nais.add(nai)
            mn = None
            if spec.get("mn") is not None:
                mn = self.node_ref(spec["mn"], f"{where}.mn", nodes)
                if not self.kinds[nodes[mn].role].mobile:
                    raise self.fail(f"{where}.mn", f"node {mn!r} is not a mobile node")
            ha = self.node_ref(spec["home_agent"], f"{where}.home_agent", nodes)
            if not self.kinds[nodes[ha].role].serves_users:
                raise self.fail(f"{where}.home_agent", f"node {ha!r} is not a home agent")
            home_seg = next((s for s in segments if s.owner == ha), None)
            if home_seg is None:
                raise self.fail(f"{where}.home_agent", f"home agent {ha!r} owns no home link segment")
            hoa = self.address(spec["home_address"], f"{where}.home_address", within=home_seg.prefix)
            claim_address(hoa, f"{where}.home_address")
            extra = {k: v for k, v in spec.items() if k not in ("nai", "mn", "home_address", "home_agent")}
            users.append(User(nai, mn, hoa, ha, extra))

        return Topology(name, self.source, domains, nodes, tuple(links), tuple(segments), tuple(users),
                        dict(self.kinds))
